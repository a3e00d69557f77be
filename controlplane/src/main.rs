//! The `tandem` binary. See the README for its commands.

use clap::Parser;
use tandem_controlplane::cli::{Cli, Command, UserCommand};

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
        Command::Serve(args) => {
            tokio::runtime::Runtime::new()?.block_on(tandem_controlplane::serve_cmd::run(args))
        }
        Command::User(UserCommand::Create {
            name,
            admin,
            email,
            data_dir,
            database_url,
        }) => {
            let mut password = String::new();
            std::io::stdin().read_line(&mut password)?;
            let password = password.trim_end_matches(['\r', '\n']);
            tokio::runtime::Runtime::new()?.block_on(async {
                let state = tandem_controlplane::serve_cmd::state(
                    &data_dir,
                    database_url.as_deref(),
                    Default::default(),
                )
                .await?;
                let user = tandem_controlplane::api::users::insert_user(
                    &state,
                    None,
                    &name,
                    Some(password),
                    email.as_deref(),
                    admin,
                )
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
                println!("created user {} ({})", user.username, user.id);
                Ok(())
            })
        }
    }
}
