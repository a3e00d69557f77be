//! Tandem's control plane (the REST admin API and its store) and the `tandem` binary's commands.
//!
//! # Layout
//! - [`cli`]: the command line: `tandem serve`, `tandem proxy`, `tandem user create`.
//! - [`serve_cmd`]: `tandem serve`: the API and the proxy in one process, first-start bootstrap.
//! - [`proxy_cmd`]: `tandem proxy`, the data plane alone, fed by a routes file or by a
//!   control plane's route feed.
//! - [`route_feed`]: the route feed of standalone proxies and their reports; the coordinator's
//!   data plane in `tandem serve`.
//! - [`backup`]: `tandem backup` and `tandem restore`: the store and the platform key in one
//!   file.
//! - [`console`]: the web console at `/`: a page, its scripts and stylesheet, embedded.
//! - [`drivers`]: the driver of `--driver`: local processes or Kubernetes pods.
//! - [`api`]: the routes under `/api/v1`, one module per resource, and the OpenAPI document.
//! - [`auth`]: passwords, tokens, sessions, the `Caller` extractor.
//! - [`node_settings`], [`node_env`]: the Node-RED settings and environment variables users may
//!   set on instances and templates (an allowlist of typed settings; runtime, loader and shell
//!   variables refused).
//! - [`desired`]: every instance's desired state, projected from the store for the
//!   coordinator, and the report of stored configuration the rules leave out.
//! - [`snapshots`]: snapshots of instances, the store's flows, export and import.
//! - [`deployments`]: deploys of snapshots, watched replica by replica, rolled back when the
//!   health gate refuses them.
//! - [`node_credentials`]: Node-RED's credential encryption, to move credentials between
//!   secrets.
//! - [`secrets`]: instance secrets, derived from the platform key.
//! - [`sleep`]: instances that sleep when idle: the sleeper, and the waker of the in-process
//!   proxy.
//! - [`env_secrets`]: secret environment variables, sealed in the store and never shown.
//! - [`mqtt_wiring`]: the MQTT proxy's per-replica listeners in `tandem serve`.
//! - [`editor_gate`]: who may open an instance's editor through the proxy.
//! - [`http_auth`]: who may call an instance's flows' HTTP endpoints: its mode and the check of
//!   its `tdh_` tokens, for the proxy.
//! - [`custom_hostname`]: instances' custom hostnames: the rules a hostname follows, the sealing
//!   of its certificate's key, and what the desired state takes of them.
//! - [`leader`]: one leader among control planes on one database: the coordinator's lease, and
//!   the followers' forwarding of the API to the leader.
//! - [`roles`]: roles and the permission table.
//! - [`audit`]: writing audit entries.
//! - [`store`]: the database (SQLite or PostgreSQL) and its schema, migrated at start from
//!   `controlplane/migrations/`.
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
pub mod backup;
pub mod cli;
pub mod console;
pub mod custom_hostname;
pub mod deployments;
pub mod desired;
pub mod drivers;
pub mod editor_gate;
pub mod env_secrets;
pub mod error;
pub mod http_auth;
pub mod leader;
pub mod metrics;
pub mod mqtt_wiring;
pub mod node_credentials;
pub mod node_env;
pub mod node_settings;
pub mod proxy_cmd;
pub mod roles;
pub mod route_feed;
pub mod scratch_pg;
pub mod secrets;
pub mod serve_cmd;
pub mod sleep;
pub mod snapshots;
pub mod state;
pub mod store;

use state::AppState;

/// The API listener's HTTP surface: `/api/v1/…`, `/healthz`, `/readyz`, and the console at `/`. `/metrics` is not
/// here: it names every team's instances, so it has a listener of its own ([`metrics_app`]).
pub fn app(state: AppState) -> Router {
    let ops = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .merge(console::router())
        .with_state(state.clone());
    api::router(state.clone())
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            leader::forward,
        ))
        .merge(ops)
        .layer(axum::middleware::from_fn_with_state(state, track))
}

/// The metrics listener's HTTP surface (`--metrics-listen`): `/metrics`, the API's, the
/// coordinator's and the proxy's series in the Prometheus text format, and `/healthz`.
/// Unauthenticated like any Prometheus exporter, so meant for a private network; scrapes are
/// not API requests and are not counted as such.
pub fn metrics_app(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(state)
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
            "{}{}{}{}",
            state.metrics.render(),
            cluster_metrics(&state),
            state.coordinator.metrics(),
            state.more_metrics.as_ref().map(|f| f()).unwrap_or_default()
        ),
    )
        .into_response()
}

/// The cluster as this control plane sees it, the series of `GET /api/v1/cluster`.
fn cluster_metrics(state: &AppState) -> String {
    let term = match state.leadership.role() {
        leader::Role::Leader { term, .. } | leader::Role::Follower { term, .. } => term,
        leader::Role::Unknown => 0,
    };
    format!(
        "# HELP tandem_control_plane_leader 1 while this control plane leads (runs the coordinator).\n\
         # TYPE tandem_control_plane_leader gauge\n\
         tandem_control_plane_leader {}\n\
         # HELP tandem_control_plane_term The lease's term as this control plane last saw it.\n\
         # TYPE tandem_control_plane_term gauge\n\
         tandem_control_plane_term {term}\n\
         # HELP tandem_route_feed_proxies Standalone proxies that reported in the last 3 s.\n\
         # TYPE tandem_route_feed_proxies gauge\n\
         tandem_route_feed_proxies {}\n\
         # HELP tandem_route_feed_generation The generation of the route table this control plane publishes.\n\
         # TYPE tandem_route_feed_generation gauge\n\
         tandem_route_feed_generation {}\n",
        u8::from(state.leadership.may_act()),
        state.feed.proxies().len(),
        state.feed.generation(),
    )
}

async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = method_label(req.method());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let resp = next.run(req).await;
    state
        .metrics
        .record(method, &route, resp.status().as_u16(), start.elapsed());
    resp
}

/// The metrics label of a request method. Any token is a valid HTTP method, and each label value
/// is a series kept for the life of the process, so methods outside the standard set are all
/// `other`: random 60 KB methods once made `/metrics` 256 MB.
fn method_label(method: &http::Method) -> &'static str {
    use http::Method;
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
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
