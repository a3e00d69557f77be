//! The `tandem` binary. See the README for its commands.

use clap::Parser;
use tandem_controlplane::cli::{Cli, Command};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tandem_controlplane::init_tracing();
    match cli.command {
        Command::Proxy(args) => {
            let mut rt = if args.threads == 1 {
                tokio::runtime::Builder::new_current_thread()
            } else {
                let mut b = tokio::runtime::Builder::new_multi_thread();
                if args.threads > 1 {
                    b.worker_threads(args.threads);
                }
                b
            };
            rt.enable_all()
                .build()?
                .block_on(tandem_controlplane::proxy_cmd::run(args))
        }
    }
}
