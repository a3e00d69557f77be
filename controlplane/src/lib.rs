//! Tandem's control plane and the `tandem` binary's commands.
//!
//! # Layout
//! - [`cli`]: the command line (`tandem proxy` today; `tandem serve` arrives with the control
//!   plane's API in issue 3).
//! - [`proxy_cmd`]: `tandem proxy`, the data plane alone, fed by a routes file.

pub mod cli;
pub mod proxy_cmd;

/// Installs the tracing subscriber: `RUST_LOG` if set, else `info`.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
