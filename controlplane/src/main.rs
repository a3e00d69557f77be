//! The `tandem` binary. See the README for its commands.

fn main() -> anyhow::Result<()> {
    tandem_controlplane::cli::main()
}
