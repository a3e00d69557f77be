//! From the store to the coordinator: reads every instance's desired state and hands it to
//! [`Coordinator::apply`], at start, after each API change and every 30 seconds.
//!
//! Instance secrets (the admin secret replicas accept, the credential secret that encrypts flow
//! credentials) are not stored: they are derived from the platform key in
//! `<data-dir>/secret-key` (32 random bytes, created at first start, mode 0600) and the
//! instance id. A restart of Tandem derives the same ones, so running replicas can be adopted.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sha2::{Digest, Sha256};
use sqlx::Row;
use tandem_coordinator::driver::{Driver, ReplicaSpec};
use tandem_coordinator::reconcile::{Coordinator, DesiredState, InstanceDesired};

use crate::api::instances::{self, HaMode, TemplateCache};
use crate::node_settings::Refused;
use crate::state::AppState;

/// The key instance secrets are derived from.
#[derive(Clone)]
pub struct PlatformKey([u8; 32]);

impl std::fmt::Debug for PlatformKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PlatformKey(..)")
    }
}

impl PlatformKey {
    /// Reads `<data_dir>/secret-key`, creating it on first use.
    pub fn load_or_create(data_dir: &Path) -> anyhow::Result<Self> {
        let path = data_dir.join("secret-key");
        if let Ok(text) = std::fs::read_to_string(&path) {
            let bytes = decode_hex(text.trim())
                .filter(|b| b.len() == 32)
                .with_context(|| format!("{} is not 64 hex digits", path.display()))?;
            let mut key = [0; 32];
            key.copy_from_slice(&bytes);
            return Ok(Self(key));
        }
        let mut key = [0; 32];
        getrandom::fill(&mut key).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
        std::fs::create_dir_all(data_dir)?;
        crate::serve_cmd::write_private(&path, &format!("{}\n", crate::store::hex(&key)))?;
        Ok(Self(key))
    }

    /// A key for tests.
    pub fn from_bytes(key: [u8; 32]) -> Self {
        Self(key)
    }

    /// The secret for `purpose` of instance `id`: SHA-256 over key, purpose and id, in hex.
    pub fn derive(&self, purpose: &str, id: &str) -> String {
        let mut h = Sha256::new();
        h.update(self.0);
        h.update(purpose.as_bytes());
        h.update([0]);
        h.update(id.as_bytes());
        crate::store::hex(&h.finalize())
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Stored settings or variables of one instance that its replicas do not get.
#[derive(Debug, Clone)]
pub struct NotApplied {
    /// Instance id.
    pub instance_id: String,
    /// Its team.
    pub team_id: String,
    /// What was left out, and why.
    pub items: Vec<Refused>,
}

/// Every instance's desired state, as the coordinator takes it, and what of each instance's
/// stored configuration the rules refuse and leave out.
pub async fn desired_instances(
    state: &AppState,
    key: &PlatformKey,
) -> anyhow::Result<(Vec<InstanceDesired>, Vec<NotApplied>)> {
    type Stack = (String, String, Option<String>, i64);
    let extra: HashMap<String, Stack> = sqlx::query(
        "SELECT i.id, i.flows, s.nodered_version, s.node_version, s.memory_mb FROM instances i JOIN stacks s ON s.id = i.stack_id",
    )
    .fetch_all(&state.store.pool)
    .await?
    .iter()
    .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3), r.get(4))))
    .collect();
    let rows = sqlx::query(&format!(
        "SELECT {} FROM instances ORDER BY id",
        instances::COLUMNS
    ))
    .fetch_all(&state.store.pool)
    .await?;
    let mut cache = TemplateCache::new();
    let mut out = Vec::with_capacity(rows.len());
    let mut not_applied = Vec::new();
    for row in &rows {
        let i = instances::view(state, row, &mut cache)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let Some((flows, version, node_version, memory_mb)) = extra.get(&i.id) else {
            continue;
        };
        let state_wanted = match i.desired_state.as_str() {
            "running" => DesiredState::Running,
            "suspended" => DesiredState::Suspended,
            _ => DesiredState::Stopped,
        };
        let flows = serde_json::from_str(flows).unwrap_or_else(|_| serde_json::json!([]));
        if !i.not_applied.is_empty() {
            not_applied.push(NotApplied {
                instance_id: i.id.clone(),
                team_id: i.team_id.clone(),
                items: i.not_applied.clone(),
            });
        }
        out.push(InstanceDesired {
            hosts: vec![format!("{}.{}", i.name, state.config.base_domain)],
            state: state_wanted,
            replicas: i.ha.map_or(1, |h| h.replicas.clamp(1, 64) as u32),
            standby: i.ha.is_some_and(|h| h.mode == HaMode::Standby),
            replica: ReplicaSpec {
                instance: i.name.clone(),
                slot: 0,
                nodered_version: version.clone(),
                node_version: node_version.clone(),
                memory_mb: (*memory_mb).clamp(64, 1 << 20) as u32,
                ha: i.ha.is_some(),
                admin_secret: key.derive("admin", &i.id),
                credential_secret: key.derive("credentials", &i.id),
                settings: i.effective_settings,
                env: i.effective_env,
                flows,
                start_stopped: false,
            },
            mqtt_urls: Vec::new(),
            id: i.id,
        });
    }
    Ok((out, not_applied))
}

/// Tells, once per change, what of an instance's stored configuration is not applied: a
/// warning in the instance's log per item, and an audit entry `instance.config-not-applied`
/// (skipped when the newest such entry already says the same, so restarts of Tandem do not
/// repeat it).
#[derive(Debug, Default)]
pub struct NotAppliedReporter {
    told: HashMap<String, Vec<Refused>>,
}

impl NotAppliedReporter {
    /// Reports what changed since the last call.
    pub async fn report(&mut self, state: &AppState, now: Vec<NotApplied>) {
        let ids: std::collections::HashSet<String> =
            now.iter().map(|n| n.instance_id.clone()).collect();
        self.told.retain(|id, _| ids.contains(id));
        for n in now {
            if self.told.get(&n.instance_id) == Some(&n.items) {
                continue;
            }
            if let Some(book) = state.coordinator.logs() {
                let log = book.instance(&n.instance_id);
                for r in &n.items {
                    log.note(
                        "warn",
                        format!(
                            "not applied: {} {} (stored before Tandem's rules refused it)",
                            r.field, r.message
                        ),
                    );
                }
            }
            let details = serde_json::json!({ "not_applied": n.items });
            if let Err(e) = audit_once(state, &n, details).await {
                tracing::warn!(instance = %n.instance_id, error = %e, "cannot record what is not applied");
                continue;
            }
            self.told.insert(n.instance_id, n.items);
        }
    }
}

const NOT_APPLIED_EVENT: &str = "instance.config-not-applied";

async fn audit_once(
    state: &AppState,
    n: &NotApplied,
    details: serde_json::Value,
) -> anyhow::Result<()> {
    let last: Option<String> = sqlx::query(
        "SELECT body FROM audit WHERE instance_id = $1 AND event = $2 ORDER BY id DESC LIMIT 1",
    )
    .bind(&n.instance_id)
    .bind(NOT_APPLIED_EVENT)
    .fetch_optional(&state.store.pool)
    .await?
    .map(|r| r.get(0));
    if last.and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        == Some(details.clone())
    {
        return Ok(());
    }
    let mut tx = state.store.write().await?;
    crate::audit::record(
        &mut tx,
        None,
        NOT_APPLIED_EVENT,
        crate::audit::Subject::instance(&n.team_id, &n.instance_id),
        details,
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

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
                    let key = format!("{}/{slot}", d.replica.instance);
                    let port = match self.ports.get(&key) {
                        Some(p) => *p,
                        None => {
                            let Ok(p) = free_port() else { continue };
                            self.ports.insert(key, p);
                            p
                        }
                    };
                    d.mqtt_urls.push(format!("mqtt://127.0.0.1:{port}"));
                    replicas.push(tandem_proxy::MqttReplica {
                        slot,
                        listen: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
                    });
                }
                if d.state == DesiredState::Running {
                    instances.push(tandem_proxy::MqttInstance {
                        name: d.replica.instance.clone(),
                        ha: d.replica.ha,
                        // Checked by the API and again here: one instance's bad value must
                        // never fail the listeners of all the others.
                        exclude: match d.replica.env.get("TANDEM_MQTT_EXCLUDE") {
                            Some(v) => crate::node_env::mqtt_exclude(v).unwrap_or_else(|e| {
                                tracing::warn!(instance = %d.replica.instance, error = %e, "TANDEM_MQTT_EXCLUDE ignored");
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
            .map(|d| d.replica.instance.as_str())
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

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Hands the store's desired state to `coordinator` (and the MQTT proxy, when there is one)
/// now, after each change the API reports, and every 30 seconds, until `stop` resolves.
pub async fn run<D: Driver>(
    state: AppState,
    key: PlatformKey,
    coordinator: Arc<Coordinator<D>>,
    mut mqtt: Option<MqttWiring>,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut reporter = NotAppliedReporter::default();
    loop {
        match desired_instances(&state, &key).await {
            Ok((mut desired, not_applied)) => {
                reporter.report(&state, not_applied).await;
                if let Some(m) = &mut mqtt {
                    m.apply(&mut desired).await;
                }
                coordinator.apply(desired);
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the desired state; retrying"),
        }
        tokio::select! {
            _ = coordinator.wait_changed() => {}
            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
            _ = &mut stop => {
                if let Some(m) = &mqtt {
                    m.shutdown().await;
                }
                return;
            }
        }
    }
}
