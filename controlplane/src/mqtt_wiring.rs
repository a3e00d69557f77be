//! Where the instances' replicas reach Tandem's MQTT proxy, and how it knows them: `TANDEM_MQTT_URL`
//! per replica, and the MQTT proxy's view of every running instance. Three ways
//! ([`MqttMode`]):
//!
//! - **One listener per replica** (`--mqtt-upstream` alone): a loopback port per replica, kept
//!   the same across restarts of Tandem (in `<data-dir>/mqtt-ports.json`) so that a replica's
//!   URL does not change and running replicas can be adopted. The port says who connects.
//! - **A shared listener in `tandem serve`** (`--mqtt-upstream` with `--mqtt-listen`): one port;
//!   each replica logs in as `<instance>-r<slot>` with its own MQTT token, which its URL
//!   carries (`mqtt://<instance>-r<slot>:<token>@host:port`).
//! - **The standalone proxies' shared listeners** (`--mqtt-proxy-url`, for `--no-proxy` and
//!   Kubernetes, where a Service cannot list a port per replica): the same logins, on the
//!   proxies' `--mqtt-listen`; the token hashes travel to them in the route feed.
//!
//! A replica's token is derived from the platform key, the instance's id and the slot: it stays
//! the same across restarts of Tandem (adopted replicas keep their environment) and no other
//! instance, even one given the same name later, has it. The MQTT proxy keeps only its SHA-256.
//! Node-RED writes a broker's URL into its log when it connects; Tandem's log handler
//! (`settings.js`) masks the password in URLs, so the instance's log does not show the token.
//!
//! An instance's environment variable `TANDEM_MQTT_EXCLUDE` (comma-separated topic filters)
//! lists the subscriptions its replicas keep unshared.

use std::path::Path;
use std::sync::Arc;

use tandem_coordinator::spec::{DesiredState, InstanceDesired};
use tandem_proxy::mqtt::{token_sha256, username, MqttInstance, MqttReplica};
use tandem_proxy::routes::feed::{FeedMqtt, FeedMqttReplica};

use crate::route_feed::RouteFeed;
use crate::secrets::PlatformKey;

/// How replicas reach the MQTT proxy.
pub enum MqttMode {
    /// A loopback listener per replica, in `tandem serve`.
    Listeners,
    /// One shared listener in `tandem serve`, at this address; replicas log in.
    Shared,
    /// The standalone proxies' shared listeners, reached at this `host:port`; replicas log in,
    /// and the proxies learn the token hashes from the route feed.
    Feed {
        /// Where replicas reach the proxies' MQTT listener, as `host:port`.
        address: String,
        /// The route feed.
        feed: Arc<RouteFeed>,
    },
}

/// The MQTT side of the running instances.
pub struct MqttWiring {
    mode: MqttMode,
    /// The MQTT proxy in `tandem serve` (none in [`MqttMode::Feed`]).
    proxy: Option<tandem_proxy::MqttProxy>,
    key: PlatformKey,
    path: std::path::PathBuf,
    ports: std::collections::BTreeMap<String, u16>,
}

impl MqttWiring {
    /// The wiring of `mode`; `config` is the MQTT proxy's in `tandem serve` (with its
    /// `shared_listen` in [`MqttMode::Shared`]), absent in [`MqttMode::Feed`]. Listener ports
    /// are kept in `data_dir`.
    pub fn new(
        mode: MqttMode,
        config: Option<tandem_proxy::MqttConfig>,
        stats: Arc<tandem_proxy::ProxyStats>,
        key: PlatformKey,
        data_dir: &Path,
    ) -> anyhow::Result<Self> {
        let proxy = match config {
            Some(config) => Some(
                tandem_proxy::MqttProxy::new(config, stats)
                    .map_err(|e| anyhow::anyhow!("--mqtt-upstream: {e}"))?,
            ),
            None => None,
        };
        let path = data_dir.join("mqtt-ports.json");
        let ports = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        Ok(Self {
            mode,
            proxy,
            key,
            path,
            ports,
        })
    }

    /// Gives every replica of the running instances its way to the MQTT proxy (`mqtt_urls`)
    /// and tells the MQTT proxy about them.
    pub async fn apply(&mut self, desired: &mut [InstanceDesired]) {
        match self.mode {
            MqttMode::Listeners => self.apply_listeners(desired).await,
            MqttMode::Shared | MqttMode::Feed { .. } => self.apply_logins(desired).await,
        }
    }

    /// The replica's token: the platform key's, for this instance and slot.
    fn token(&self, instance_id: &str, slot: usize) -> String {
        self.key.derive("mqtt", &format!("{instance_id}/{slot}"))
    }

    async fn apply_logins(&mut self, desired: &mut [InstanceDesired]) {
        let address = match (&self.mode, &self.proxy) {
            (MqttMode::Feed { address, .. }, _) => Some(address.clone()),
            (_, Some(proxy)) => shared_address(proxy).await,
            _ => None,
        };
        let mut instances = Vec::new();
        for d in desired.iter_mut() {
            d.mqtt_urls.clear();
            let mut replicas = Vec::new();
            for slot in 0..d.replicas as usize {
                let token = self.token(&d.id, slot);
                if let Some(address) = &address {
                    let user = username(&d.process.instance, slot);
                    d.mqtt_urls
                        .insert(slot as u32, format!("mqtt://{user}:{token}@{address}"));
                }
                replicas.push(MqttReplica {
                    slot,
                    listen: None,
                    token_sha256: Some(token_sha256(token.as_bytes())),
                });
            }
            if d.state == DesiredState::Running {
                instances.push(MqttInstance {
                    name: d.process.instance.clone(),
                    ha: d.process.ha,
                    exclude: exclusions(d),
                    replicas,
                });
            }
        }
        match (&self.mode, &self.proxy) {
            (MqttMode::Feed { feed, .. }, _) => feed.set_mqtt(
                instances
                    .iter()
                    .map(|i| FeedMqtt {
                        name: i.name.clone(),
                        ha: i.ha,
                        exclude: i.exclude.clone(),
                        replicas: i
                            .replicas
                            .iter()
                            .filter_map(|r| {
                                Some(FeedMqttReplica {
                                    slot: r.slot,
                                    token_sha256: r.token_sha256.clone()?,
                                })
                            })
                            .collect(),
                    })
                    .collect(),
            ),
            (_, Some(proxy)) => {
                if let Err(e) = proxy.set_instances(&instances).await {
                    tracing::error!(error = %e, "cannot apply the MQTT logins");
                }
            }
            _ => {}
        }
    }

    async fn apply_listeners(&mut self, desired: &mut [InstanceDesired]) {
        let Some(proxy) = &self.proxy else {
            return;
        };
        let before = self.ports.clone();
        for attempt in 0..2 {
            let mut instances = Vec::new();
            for d in desired.iter_mut() {
                let mut replicas = Vec::new();
                d.mqtt_urls.clear();
                for slot in 0..d.replicas as usize {
                    let key = format!("{}/{slot}", d.process.instance);
                    let port = match self.ports.get(&key) {
                        Some(p) => *p,
                        None => {
                            let Ok(p) = tandem_proxy::net::free_port() else {
                                continue;
                            };
                            self.ports.insert(key, p);
                            p
                        }
                    };
                    d.mqtt_urls
                        .insert(slot as u32, format!("mqtt://127.0.0.1:{port}"));
                    replicas.push(MqttReplica {
                        slot,
                        listen: Some(std::net::SocketAddr::from(([127, 0, 0, 1], port))),
                        token_sha256: None,
                    });
                }
                if d.state == DesiredState::Running {
                    instances.push(MqttInstance {
                        name: d.process.instance.clone(),
                        ha: d.process.ha,
                        exclude: exclusions(d),
                        replicas,
                    });
                }
            }
            match proxy.set_instances(&instances).await {
                Ok(()) => break,
                // A kept port someone else took since: pick another once.
                Err(tandem_proxy::mqtt::MqttError::Bind { instance, slot, .. }) if attempt == 0 => {
                    self.ports.remove(&format!("{instance}/{slot}"));
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot apply the MQTT listeners");
                    break;
                }
            }
        }
        // Forget the ports of deleted instances.
        let names: std::collections::HashSet<&str> = desired
            .iter()
            .map(|d| d.process.instance.as_str())
            .collect();
        self.ports
            .retain(|k, _| k.rsplit_once('/').is_some_and(|(n, _)| names.contains(n)));
        if self.ports != before {
            let text = serde_json::to_string_pretty(&self.ports).unwrap_or_default();
            if let Err(e) = std::fs::write(&self.path, text) {
                tracing::warn!(error = %e, path = %self.path.display(), "cannot keep the MQTT ports");
            }
        }
    }

    /// Closes every listener.
    pub async fn shutdown(&self) {
        if let Some(proxy) = &self.proxy {
            proxy.shutdown().await;
        }
    }
}

/// The MQTT proxy's settings of `--mqtt-upstream`, `--mqtt-tls` and `--mqtt-ca-file` (the same
/// flags in `tandem serve` and `tandem proxy`), with its shared listener at `shared_listen`.
pub fn mqtt_config(
    upstream: &str,
    tls: bool,
    ca_file: Option<&Path>,
    shared_listen: Option<std::net::SocketAddr>,
) -> anyhow::Result<tandem_proxy::MqttConfig> {
    let mut config = tandem_proxy::MqttConfig::new(upstream);
    if tls {
        config.tls = Some(
            tandem_proxy::mqtt::tls::UpstreamTls::new(ca_file.map(Path::to_path_buf))
                .map_err(|e| anyhow::anyhow!("--mqtt-tls: {e}"))?,
        );
    } else if ca_file.is_some() {
        anyhow::bail!("--mqtt-ca-file needs --mqtt-tls");
    }
    config.shared_listen = shared_listen;
    config
        .validate()
        .map_err(|e| anyhow::anyhow!("--mqtt-upstream: {e}"))?;
    Ok(config)
}

/// Where replicas on this machine reach the shared listener of `tandem serve`, bound first if
/// it is not yet. An unspecified address (`0.0.0.0`) is reached on loopback.
async fn shared_address(proxy: &tandem_proxy::MqttProxy) -> Option<String> {
    if proxy.shared_listener().await.is_none() {
        if let Err(e) = proxy.set_instances(&[]).await {
            tracing::error!(error = %e, "cannot bind the MQTT proxy's shared listener");
        }
    }
    let mut addr = proxy.shared_listener().await?;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    Some(addr.to_string())
}

/// The instance's `TANDEM_MQTT_EXCLUDE`, checked by the API and again here: one instance's bad
/// value must never fail the listeners of all the others.
fn exclusions(d: &InstanceDesired) -> Vec<String> {
    match d.process.env.get("TANDEM_MQTT_EXCLUDE") {
        Some(v) => crate::node_env::mqtt_exclude(v).unwrap_or_else(|e| {
            tracing::warn!(instance = %d.process.instance, error = %e, "TANDEM_MQTT_EXCLUDE ignored");
            Vec::new()
        }),
        None => Vec::new(),
    }
}
