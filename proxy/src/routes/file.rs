//! The routes file of `tandem proxy`: TOML, reloaded when it changes and on SIGHUP.
//!
//! ```toml
//! [health]                  # optional defaults for active probes
//! interval_ms = 2000
//! timeout_ms = 1000
//! healthy_threshold = 2
//! unhealthy_threshold = 2
//!
//! [[instance]]
//! name = "orders"           # DNS-safe
//! hosts = ["orders.localhost"]
//! ha = true                 # editor blocked
//! replicas = ["127.0.0.1:12080", "127.0.0.1:12081"]   # ids r0, r1, ...
//! health_path = "/"         # optional, default "/"
//! health_check = true       # optional, default true
//! affinity = false          # optional
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::{InstanceSpec, ReplicaSpec, RouteError, Routes};
use crate::health::HealthConfig;
use crate::metrics::ProxyStats;

/// Why a routes file was not applied.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The file could not be read.
    #[error("cannot read routes file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown or mistyped fields.
    #[error("routes file {path} is invalid: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said, with line and column.
        message: String,
    },
    /// The file parsed but describes an impossible table.
    #[error("routes file {path} is invalid: {source}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The validation error.
        source: RouteError,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    health: RawHealth,
    #[serde(default, rename = "instance")]
    instances: Vec<RawInstance>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    #[serde(default = "default_interval")]
    interval_ms: u64,
    #[serde(default = "default_timeout")]
    timeout_ms: u64,
    #[serde(default = "two")]
    healthy_threshold: u32,
    #[serde(default = "two")]
    unhealthy_threshold: u32,
}

impl Default for RawHealth {
    fn default() -> Self {
        Self {
            interval_ms: default_interval(),
            timeout_ms: default_timeout(),
            healthy_threshold: 2,
            unhealthy_threshold: 2,
        }
    }
}

fn default_interval() -> u64 {
    2000
}
fn default_timeout() -> u64 {
    1000
}
fn two() -> u32 {
    2
}
fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInstance {
    name: String,
    hosts: Vec<String>,
    #[serde(default)]
    ha: bool,
    replicas: Vec<SocketAddr>,
    #[serde(default)]
    health_path: Option<String>,
    #[serde(default = "yes")]
    health_check: bool,
    #[serde(default)]
    affinity: bool,
}

/// Parses the text of a routes file into instance specs (validated when published).
pub fn parse(text: &str) -> Result<Vec<InstanceSpec>, String> {
    let raw: RawFile = toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())?;
    let h = raw.health;
    Ok(raw
        .instances
        .into_iter()
        .map(|i| InstanceSpec {
            editor_secret: None,
            health: i.health_check.then(|| HealthConfig {
                path: i.health_path.unwrap_or_else(|| "/".into()),
                interval: Duration::from_millis(h.interval_ms),
                timeout: Duration::from_millis(h.timeout_ms),
                healthy_threshold: h.healthy_threshold,
                unhealthy_threshold: h.unhealthy_threshold,
            }),
            replicas: i
                .replicas
                .into_iter()
                .enumerate()
                .map(|(n, addr)| ReplicaSpec {
                    id: format!("r{n}"),
                    addr,
                    ready: true,
                })
                .collect(),
            name: i.name,
            hosts: i.hosts,
            ha: i.ha,
            affinity: i.affinity,
        })
        .collect())
}

/// Reads, parses and publishes `path`. On error the current table stays.
pub fn load(path: &Path, routes: &Routes) -> Result<usize, FileError> {
    let text = std::fs::read_to_string(path).map_err(|source| FileError::Read {
        path: path.to_owned(),
        source,
    })?;
    let specs = parse(&text).map_err(|message| FileError::Parse {
        path: path.to_owned(),
        message,
    })?;
    routes
        .publish(&specs)
        .map_err(|source| FileError::Invalid {
            path: path.to_owned(),
            source,
        })
        .map(|t| t.instances().len())
}

/// Watches `path` until `shutdown`: reloads when its content changes (checked every `poll`)
/// and on every SIGHUP. A file that fails to load leaves the current table serving; the
/// failure is logged with its reason and counted in the reload metrics.
///
/// The content is compared with what the file holds when `watch` is called (not when the
/// future first runs), so call it right after the initial [`load`].
pub fn watch(
    path: PathBuf,
    routes: Arc<Routes>,
    stats: Arc<ProxyStats>,
    poll: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) -> impl std::future::Future<Output = ()> {
    let last = std::fs::read(&path).ok();
    watch_from(path, routes, stats, poll, shutdown, last)
}

async fn watch_from(
    path: PathBuf,
    routes: Arc<Routes>,
    stats: Arc<ProxyStats>,
    poll: Duration,
    shutdown: impl std::future::Future<Output = ()>,
    mut last: Option<Vec<u8>>,
) {
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    tokio::pin!(shutdown);
    loop {
        #[cfg(unix)]
        let hangup = async {
            match hup.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hangup = std::future::pending::<()>();
        let forced = tokio::select! {
            _ = tokio::time::sleep(poll) => false,
            _ = hangup => true,
            _ = &mut shutdown => return,
        };
        let current = std::fs::read(&path).ok();
        if !forced && current == last {
            continue;
        }
        last = current;
        match load(&path, &routes) {
            Ok(n) => {
                stats.record_reload(true);
                tracing::info!(path = %path.display(), instances = n, signal = forced, "routes reloaded");
            }
            Err(error) => {
                stats.record_reload(false);
                tracing::error!(%error, "routes not reloaded; the previous routes stay in use");
            }
        }
    }
}
