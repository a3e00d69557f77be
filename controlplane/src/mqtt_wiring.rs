//! The MQTT proxy's listeners in `tandem serve`, one per replica, kept on the same port across
//! restarts of Tandem.

use std::path::Path;
use std::sync::Arc;

use tandem_coordinator::spec::{DesiredState, InstanceDesired};

/// The MQTT proxy in `tandem serve`: one listener per replica of every running instance, on a
/// loopback port that stays the same across restarts of Tandem (kept in
/// `<data-dir>/mqtt-ports.json`), so a replica's `TANDEM_MQTT_URL` does not change and running
/// replicas can be adopted. An instance's environment variable `TANDEM_MQTT_EXCLUDE`
/// (comma-separated topic filters) lists the subscriptions its replicas keep unshared.
pub struct MqttWiring {
    proxy: tandem_proxy::MqttProxy,
    path: std::path::PathBuf,
    ports: std::collections::BTreeMap<String, u16>,
}

impl MqttWiring {
    /// The MQTT proxy to the broker `config` names, its ports kept in `data_dir`.
    pub fn new(
        data_dir: &Path,
        config: tandem_proxy::MqttConfig,
        stats: Arc<tandem_proxy::ProxyStats>,
    ) -> anyhow::Result<Self> {
        let proxy = tandem_proxy::MqttProxy::new(config, stats)
            .map_err(|e| anyhow::anyhow!("--mqtt-upstream: {e}"))?;
        let path = data_dir.join("mqtt-ports.json");
        let ports = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        Ok(Self { proxy, path, ports })
    }

    /// Gives every replica of the running instances its listener and sets `mqtt_urls`.
    pub async fn apply(&mut self, desired: &mut [InstanceDesired]) {
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
                    replicas.push(tandem_proxy::MqttReplica {
                        slot,
                        listen: Some(std::net::SocketAddr::from(([127, 0, 0, 1], port))),
                        token_sha256: None,
                    });
                }
                if d.state == DesiredState::Running {
                    instances.push(tandem_proxy::MqttInstance {
                        name: d.process.instance.clone(),
                        ha: d.process.ha,
                        // Checked by the API and again here: one instance's bad value must
                        // never fail the listeners of all the others.
                        exclude: match d.process.env.get("TANDEM_MQTT_EXCLUDE") {
                            Some(v) => crate::node_env::mqtt_exclude(v).unwrap_or_else(|e| {
                                tracing::warn!(instance = %d.process.instance, error = %e, "TANDEM_MQTT_EXCLUDE ignored");
                                Vec::new()
                            }),
                            None => Vec::new(),
                        },
                        replicas,
                    });
                }
            }
            match self.proxy.set_instances(&instances).await {
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
        self.proxy.shutdown().await;
    }
}
