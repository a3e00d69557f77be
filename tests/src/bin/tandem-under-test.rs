//! The `tandem` command, built for the end-to-end tests (a binary of this crate, so the tests
//! can find it through `CARGO_BIN_EXE_tandem-under-test`).

fn main() -> anyhow::Result<()> {
    tandem_controlplane::cli::main()
}
