//! From the store to the coordinator: every instance's desired state, projected from the store
//! and handed to [`Coordinator::apply`] at start, after each API change and every 30 seconds;
//! and the report of what stored configuration the rules leave out.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use sqlx::Row;
use tandem_coordinator::driver::Driver;
use tandem_coordinator::spec::{Flows, InstanceDesired, ProcessSpec, Storage};
use tandem_coordinator::Coordinator;

use crate::api::instances::{self, HaMode, TemplateCache};
use crate::mqtt_wiring::MqttWiring;
use crate::node_settings::Refused;
use crate::state::AppState;

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
) -> anyhow::Result<(Vec<InstanceDesired>, Vec<NotApplied>)> {
    type Stack = (Flows, BTreeMap<String, String>, String, Option<String>, i64);
    let extra: HashMap<String, Stack> = sqlx::query(
        "SELECT i.id, i.flows, i.credentials, i.modules, s.nodered_version, s.node_version, s.memory_mb FROM instances i JOIN stacks s ON s.id = i.stack_id",
    )
    .fetch_all(&state.store.pool)
    .await?
    .iter()
    .map(|r| {
        let flows = crate::snapshots::flows_of(&r.get::<String, _>(1), &r.get::<String, _>(2));
        let modules = serde_json::from_str(&r.get::<String, _>(3)).unwrap_or_default();
        (r.get(0), (flows, modules, r.get(4), r.get(5), r.get(6)))
    })
    .collect();
    let probes = crate::deployments::running_probes(state).await?;
    let mut custom = crate::custom_hostname::load_all(state).await?;
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
        let Some((flows, modules, version, node_version, memory_mb)) = extra.get(&i.id) else {
            continue;
        };
        let flows = flows.clone();
        if !i.not_applied.is_empty() {
            not_applied.push(NotApplied {
                instance_id: i.id.clone(),
                team_id: i.team_id.clone(),
                items: i.not_applied.clone(),
            });
        }
        let mut hosts = vec![format!("{}.{}", i.name, state.config.base_domain)];
        let mut certificate = None;
        if let Some(c) = custom.remove(&i.id) {
            hosts.push(c.hostname);
            certificate = c.certificate;
        }
        out.push(InstanceDesired {
            hosts,
            state: i.desired_state,
            replicas: i.ha.map_or(1, |h| h.replicas.clamp(1, 64) as u32),
            standby: i.ha.is_some_and(|h| h.mode == HaMode::Standby),
            affinity: i.ha.is_some_and(|h| h.affinity_on()),
            http_auth: i.http_auth,
            certificate,
            // HA instances stay awake (the API refuses sleep on them).
            asleep: i.asleep_since.is_some() && i.ha.is_none(),
            process: ProcessSpec {
                instance: i.name.clone(),
                nodered_version: version.clone(),
                node_version: node_version.clone(),
                memory_mb: (*memory_mb).clamp(64, 1 << 20) as u32,
                ha: i.ha.is_some(),
                admin_secret: state.key.derive("admin", &i.id),
                credential_secret: state.key.derive("credentials", &i.id),
                settings: i.effective_settings,
                env: i.env_revealed,
                start_stopped: false,
                modules: modules.clone(),
                storage: state.config.storage_base.as_ref().map(|base| Storage {
                    url: format!("{base}/api/v1/storage/{}", i.id),
                    token: state.key.derive("storage", &i.id),
                }),
            },
            flows,
            mqtt_urls: BTreeMap::new(),
            probe: probes.get(&i.id).cloned(),
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

/// Hands the store's desired state to `coordinator` (and the MQTT proxy, when there is one)
/// now, after each change the API reports, and every 30 seconds, until `stop` resolves.
pub async fn run<D: Driver>(
    state: AppState,
    coordinator: Arc<Coordinator<D>>,
    mut mqtt: Option<MqttWiring>,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut reporter = NotAppliedReporter::default();
    loop {
        match desired_instances(&state).await {
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
