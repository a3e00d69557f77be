//! Tandem's control plane (the REST admin API and its store) and the `tandem` binary's commands.
//!
//! # Layout
//! - [`cli`]: the command line: `tandem serve`, `tandem proxy`, `tandem user create`.
//! - [`serve_cmd`]: `tandem serve`: the API and the proxy in one process, first-start bootstrap.
//! - [`proxy_cmd`]: `tandem proxy`, the data plane alone, fed by a routes file.
//! - [`api`]: the routes under `/api/v1`, one module per resource, and the OpenAPI document.
//! - [`auth`]: passwords, tokens, sessions, the `Caller` extractor.
//! - [`roles`]: roles and the permission table.
//! - [`audit`]: writing audit entries.
//! - [`store`]: the database (SQLite or PostgreSQL) and its schema.
//! - [`error`]: the API's error type and JSON shape.
//! - [`state`], [`metrics`]: shared state and request metrics.
//! - [`scratch_pg`]: a throwaway PostgreSQL server for tests and benchmarks.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

pub mod api;
pub mod audit;
pub mod auth;
pub mod cli;
pub mod editor_gate;
pub mod error;
pub mod metrics;
pub mod proxy_cmd;
pub mod reconcile;
pub mod roles;
pub mod scratch_pg;
pub mod serve_cmd;
pub mod state;
pub mod store;

use state::AppState;

/// The whole HTTP surface of the control plane: `/api/v1/…`, `/healthz`, `/readyz`, `/metrics`.
pub fn app(state: AppState) -> Router {
    let ops = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state.clone());
    api::router(state.clone())
        .merge(ops)
        .layer(axum::middleware::from_fn_with_state(state, track))
}

async fn readyz(State(state): State<AppState>) -> Response {
    match sqlx::query("SELECT 1").execute(&state.store.pool).await {
        Ok(_) => "ready\n".into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "readiness check: database unreachable");
            (
                http::StatusCode::SERVICE_UNAVAILABLE,
                "the database is unreachable\n",
            )
                .into_response()
        }
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        format!(
            "{}{}{}",
            state.metrics.render(),
            state.coordinator.metrics(),
            state.more_metrics.as_ref().map(|f| f()).unwrap_or_default()
        ),
    )
        .into_response()
}

async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let resp = next.run(req).await;
    state
        .metrics
        .record(&method, &route, resp.status().as_u16(), start.elapsed());
    resp
}

/// Installs the tracing subscriber: `RUST_LOG` if set, else `info`.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Completes once the shutdown flag `rx` turns true (or its sender is gone): one flag fans the
/// shutdown out to every server and task of a command.
pub async fn stopped(mut rx: tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
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
