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
//! hold = false              # optional: with no healthy replica, requests wait up to 5 s for one
//! mqtt_listeners = ["127.0.0.1:11883", "127.0.0.1:11884"]  # optional, one per replica
//! mqtt_exclude = ["replies/#"]                             # optional
//!
//! [mqtt]                    # required when an instance has mqtt_listeners
//! upstream = "127.0.0.1:1883"
//! max_packet_bytes = 16777216   # optional
//! connect_timeout_ms = 5000     # optional
//! tls = false                   # optional: TLS to the broker
//! ca_file = "/etc/ssl/broker-ca.pem"  # optional with tls: CAs to trust (default Mozilla's roots)
//!
//! [tls]                     # optional: certificates of the HTTPS listener (--https-listen)
//! cert = "tls/wildcard.pem" # the default certificate, unless --tls-cert gives it
//! key = "tls/wildcard.key"
//!
//! [[tls.certificate]]       # a certificate for named hosts, chosen by SNI
//! hosts = ["flows.customer.org"]   # or "*.customer.org"
//! cert = "tls/customer.pem"
//! key = "tls/customer.key"
//! ```
//!
//! Relative certificate paths are relative to the routes file's directory. Certificate files
//! are checked for changes every few seconds as well, and reloaded.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::{InstanceSpec, ReplicaSpec, RouteError, Routes};
use crate::health::HealthConfig;
use crate::metrics::ProxyStats;
use crate::mqtt::{self, MqttConfig, MqttError, MqttInstance, MqttProxy, MqttReplica};
use crate::tls::{Certificates, FilePair, HostFiles, TlsFiles};

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
    /// The MQTT part of the file is invalid, or a listener could not be bound.
    #[error("routes file {path}: {source}")]
    Mqtt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: MqttError,
    },
    /// The `[tls]` section is invalid, or a certificate in it does not load.
    #[error("routes file {path}: [tls]: {message}")]
    Tls {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// Where a routes file's `[tls]` section goes: the HTTPS listener's certificates, and the
/// default certificate the command line gave (`--tls-cert`, `--tls-key`), if any.
#[derive(Debug)]
pub struct FileTls {
    /// The HTTPS listener's certificates.
    pub certificates: Arc<Certificates>,
    /// The command line's default certificate.
    pub default: Option<FilePair>,
}

impl FileTls {
    /// The files to serve: the command line's default and the file's section, which may give
    /// the default only when the command line does not.
    fn merge(&self, file: &TlsFiles) -> Result<TlsFiles, String> {
        let default = match (&self.default, &file.default) {
            (Some(_), Some(_)) => return Err(
                "the default certificate is given twice, by --tls-cert and by [tls] cert; keep one"
                    .into(),
            ),
            (a, b) => a.clone().or_else(|| b.clone()),
        };
        Ok(TlsFiles {
            default,
            hosts: file.hosts.clone(),
        })
    }

    /// Applies the file's section; the current certificates stay on error.
    fn apply(&self, file: &TlsFiles) -> Result<(), String> {
        let files = self.merge(file)?;
        self.certificates
            .set_files(files)
            .map_err(|e| e.to_string())
    }
}

/// Everything a routes file describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutesFile {
    /// The HTTP routes.
    pub instances: Vec<InstanceSpec>,
    /// The `[mqtt]` section, if any.
    pub mqtt: Option<MqttConfig>,
    /// Instances with `mqtt_listeners`.
    pub mqtt_instances: Vec<MqttInstance>,
    /// The `[tls]` section (empty without one), its paths as written.
    pub tls: TlsFiles,
}

impl RoutesFile {
    /// Checks the MQTT part: one listener per replica, an `[mqtt]` section when there are
    /// listeners, valid settings, names, exclusions and distinct addresses.
    pub fn validate_mqtt(&self) -> Result<(), MqttError> {
        if let Some(c) = &self.mqtt {
            c.validate()?;
        }
        for m in &self.mqtt_instances {
            let replicas = self
                .instances
                .iter()
                .find(|i| i.name == m.name)
                .map_or(0, |i| i.replicas.len());
            if replicas != m.replicas.len() {
                return Err(MqttError::ListenerCount {
                    instance: m.name.clone(),
                    replicas,
                    listeners: m.replicas.len(),
                });
            }
            if self.mqtt.is_none() {
                return Err(MqttError::NoUpstream(m.name.clone()));
            }
        }
        mqtt::validate(&self.mqtt_instances)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    health: RawHealth,
    #[serde(default, rename = "instance")]
    instances: Vec<RawInstance>,
    #[serde(default)]
    mqtt: Option<RawMqtt>,
    #[serde(default)]
    tls: Option<RawTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    #[serde(default)]
    cert: Option<PathBuf>,
    #[serde(default)]
    key: Option<PathBuf>,
    #[serde(default, rename = "certificate")]
    certificates: Vec<RawCertificate>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCertificate {
    hosts: Vec<String>,
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMqtt {
    upstream: String,
    #[serde(default)]
    max_packet_bytes: Option<usize>,
    #[serde(default)]
    connect_timeout_ms: Option<u64>,
    #[serde(default)]
    tls: bool,
    #[serde(default)]
    ca_file: Option<PathBuf>,
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
    #[serde(default)]
    hold: bool,
    #[serde(default)]
    mqtt_listeners: Vec<SocketAddr>,
    #[serde(default)]
    mqtt_exclude: Vec<String>,
}

/// Parses the text of a routes file into instance specs (validated when published).
pub fn parse(text: &str) -> Result<Vec<InstanceSpec>, String> {
    parse_file(text).map(|f| f.instances)
}

/// Parses the text of a routes file, the MQTT part included (checked by
/// [`RoutesFile::validate_mqtt`]; the HTTP routes are validated when published).
pub fn parse_file(text: &str) -> Result<RoutesFile, String> {
    let raw: RawFile = toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())?;
    let h = raw.health;
    let mqtt = match raw.mqtt {
        None => None,
        Some(m) => {
            let mut c = MqttConfig::new(m.upstream);
            if let Some(max) = m.max_packet_bytes {
                c.max_packet_bytes = max;
            }
            if let Some(ms) = m.connect_timeout_ms {
                c.connect_timeout = Duration::from_millis(ms);
            }
            match (m.tls, m.ca_file) {
                (true, ca) => {
                    c.tls =
                        Some(mqtt::tls::UpstreamTls::new(ca).map_err(|e| format!("[mqtt] {e}"))?)
                }
                (false, Some(_)) => {
                    return Err("[mqtt] ca_file is set but tls is not; add tls = true".into())
                }
                (false, None) => {}
            }
            Some(c)
        }
    };
    let mqtt_instances = raw
        .instances
        .iter()
        .filter(|i| !i.mqtt_listeners.is_empty())
        .map(|i| MqttInstance {
            name: i.name.clone(),
            ha: i.ha,
            exclude: i.mqtt_exclude.clone(),
            replicas: i
                .mqtt_listeners
                .iter()
                .enumerate()
                .map(|(slot, listen)| MqttReplica {
                    slot,
                    listen: Some(*listen),
                    token_sha256: None,
                })
                .collect(),
        })
        .collect();
    let tls = match raw.tls {
        None => TlsFiles::default(),
        Some(t) => TlsFiles {
            default: match (t.cert, t.key) {
                (Some(cert), Some(key)) => Some(FilePair { cert, key }),
                (None, None) => None,
                _ => return Err("[tls] cert and key go together; give both or neither".into()),
            },
            hosts: t
                .certificates
                .into_iter()
                .map(|c| {
                    if c.hosts.is_empty() {
                        return Err(format!(
                            "[[tls.certificate]] {} names no hosts",
                            c.cert.display()
                        ));
                    }
                    Ok(HostFiles {
                        hosts: c.hosts,
                        files: FilePair {
                            cert: c.cert,
                            key: c.key,
                        },
                    })
                })
                .collect::<Result<_, String>>()?,
        },
    };
    let instances = raw
        .instances
        .into_iter()
        .map(|i| InstanceSpec {
            certificate: None,
            asleep: false,
            editor_secret: None,
            http_auth: Default::default(),
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
            hold: i.hold,
        })
        .collect();
    Ok(RoutesFile {
        instances,
        mqtt,
        mqtt_instances,
        tls,
    })
}

/// `files` with relative paths made relative to `dir`.
fn relative_to(dir: &Path, mut files: TlsFiles) -> TlsFiles {
    let fix = |p: &mut FilePair| {
        p.cert = dir.join(&p.cert);
        p.key = dir.join(&p.key);
    };
    if let Some(d) = files.default.as_mut() {
        fix(d);
    }
    for h in &mut files.hosts {
        fix(&mut h.files);
    }
    files
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

/// Reads, parses and applies `path`: publishes the HTTP routes, makes `mqtt`'s settings
/// and listeners those of the file (none when it has no `[mqtt]` section), and, with `tls`,
/// serves the certificates of its `[tls]` section. An invalid file changes nothing; a listener
/// that cannot be bound is reported after the rest was applied.
pub async fn load_with_mqtt(
    path: &Path,
    routes: &Routes,
    mqtt: &MqttProxy,
    tls: Option<&FileTls>,
) -> Result<usize, FileError> {
    let text = std::fs::read_to_string(path).map_err(|source| FileError::Read {
        path: path.to_owned(),
        source,
    })?;
    let file = parse_file(&text).map_err(|message| FileError::Parse {
        path: path.to_owned(),
        message,
    })?;
    let mqtt_error = |source| FileError::Mqtt {
        path: path.to_owned(),
        source,
    };
    file.validate_mqtt().map_err(mqtt_error)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    match tls {
        Some(t) => t
            .apply(&relative_to(dir, file.tls))
            .map_err(|message| FileError::Tls {
                path: path.to_owned(),
                message,
            })?,
        None if file.tls != TlsFiles::default() => {
            return Err(FileError::Tls {
                path: path.to_owned(),
                message:
                    "certificates are given but there is no HTTPS listener; add --https-listen"
                        .into(),
            })
        }
        None => {}
    }
    let n = routes
        .publish(&file.instances)
        .map_err(|source| FileError::Invalid {
            path: path.to_owned(),
            source,
        })?
        .instances()
        .len();
    if let Some(c) = file.mqtt {
        mqtt.set_config(c).map_err(mqtt_error)?;
    }
    mqtt.set_instances(&file.mqtt_instances)
        .await
        .map_err(mqtt_error)?;
    Ok(n)
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
    watch_from(path, routes, None, stats, poll, shutdown, last)
}

/// [`watch`], applying the MQTT part of the file to `mqtt` too, and its `[tls]` section to
/// `tls` (see [`load_with_mqtt`]).
pub fn watch_with_mqtt(
    path: PathBuf,
    routes: Arc<Routes>,
    mqtt: Arc<MqttProxy>,
    tls: Option<Arc<FileTls>>,
    stats: Arc<ProxyStats>,
    poll: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) -> impl std::future::Future<Output = ()> {
    let last = std::fs::read(&path).ok();
    watch_from(path, routes, Some((mqtt, tls)), stats, poll, shutdown, last)
}

async fn watch_from(
    path: PathBuf,
    routes: Arc<Routes>,
    mqtt: Option<(Arc<MqttProxy>, Option<Arc<FileTls>>)>,
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
        let loaded = match &mqtt {
            Some((m, tls)) => load_with_mqtt(&path, &routes, m, tls.as_deref()).await,
            None => load(&path, &routes),
        };
        match loaded {
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
