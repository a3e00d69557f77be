//! Deploys: a snapshot put into an instance's store, rolled out by the coordinator replica by
//! replica (out of rotation, deploy, health gate, back in), watched here until every replica
//! runs it; rolled back to what ran before when the gate refuses it on any replica.
//!
//! The store is the source of truth at every step: the deploy writes the snapshot's flows into
//! it and the coordinator converges the replicas on it; a rollback writes the previous flows
//! back (taken as a snapshot when the deploy began) and the coordinator converges again. A
//! deploy under way when Tandem stops is rolled back at its next start, so an instance never
//! stays half on new flows.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::Row;
use tandem_coordinator::replica::ReplicaPhase;
use tandem_coordinator::spec::Probe;
use tandem_coordinator::status::ObservedStatus;

use crate::api::instances::Instance;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::snapshots::{self, Content};
use crate::state::AppState;
use crate::store::{new_id, now_ms};

/// Where a deploy is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeployStatus {
    /// Recorded, not begun.
    Pending,
    /// Replicas are getting the new flows.
    Running,
    /// Every replica runs them.
    Succeeded,
    /// It stopped short; `error` says why.
    Failed,
    /// The health gate refused the new flows on a replica; every replica runs the previous
    /// ones again.
    RolledBack,
}

impl DeployStatus {
    fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::RolledBack => "rolled_back",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "pending" => Self::Pending,
            "running" => Self::Running,
            "succeeded" => Self::Succeeded,
            "rolled_back" => Self::RolledBack,
            _ => Self::Failed,
        }
    }
}

/// Where one replica is in a deploy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaDeployStatus {
    /// Not changed yet.
    Pending,
    /// Out of rotation, getting the flows and passing the gate.
    Deploying,
    /// Runs the deploy's flows and serves.
    Deployed,
    /// The gate refused the flows on it (or the deploy call failed).
    Failed,
    /// Runs the previous flows again after a rollback.
    Restored,
}

/// One replica in a deploy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReplicaDeploy {
    /// `<instance>-r<slot>`.
    pub id: String,
    /// Where it is in the deploy.
    pub status: ReplicaDeployStatus,
    /// The revision of the flows it runs, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flows_rev: Option<String>,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A deploy of a snapshot to an instance.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Deployment {
    /// Id.
    pub id: String,
    /// The instance.
    pub instance_id: String,
    /// What is deployed.
    pub snapshot_id: String,
    /// What ran before, taken as a snapshot when the deploy began: what a rollback restores.
    pub previous_snapshot_id: String,
    /// Where it is.
    pub status: DeployStatus,
    /// Each replica.
    pub replicas: Vec<ReplicaDeploy>,
    /// The health gate's HTTP probe, when the deploy has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe: Option<ProbeBody>,
    /// When it began, epoch ms.
    pub started_at: i64,
    /// When it ended, epoch ms.
    pub finished_at: Option<i64>,
    /// Why it failed or was rolled back.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// An HTTP check of each changed replica's own flows, after they started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProbeBody {
    /// Path on the instance's flows, starting with `/`, e.g. `/health`.
    pub path: String,
    /// The status it must answer, 100 to 599.
    pub expect_status: u16,
}

impl ProbeBody {
    /// Checks the probe a caller sent.
    pub fn check(&self, field: &str) -> ApiResult<Probe> {
        let ok_path = self.path.starts_with('/')
            && self.path.len() <= 2048
            && self.path.bytes().all(|b| b.is_ascii_graphic());
        if !ok_path {
            return Err(ApiError::invalid(
                format!("{field}.path"),
                "must be a path starting with '/', printable ASCII, at most 2048 characters",
            ));
        }
        if !(100..=599).contains(&self.expect_status) {
            return Err(ApiError::invalid(
                format!("{field}.expect_status"),
                "must be an HTTP status, 100 to 599",
            ));
        }
        Ok(Probe {
            path: self.path.clone(),
            expect_status: self.expect_status,
        })
    }
}

/// What a deploy puts into the instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Flows, credentials and the modules the flows use: a `PUT .../flows` and a pipeline deploy
    /// (the target keeps its own settings and environment).
    Flows,
    /// Flows, credentials, settings overrides and environment: a rollback to a snapshot. New
    /// settings or environment replace the replicas one at a time, as any such change does.
    Everything,
}

impl Scope {
    fn as_str(self) -> &'static str {
        match self {
            Self::Flows => "flows",
            Self::Everything => "everything",
        }
    }

    fn parse(s: &str) -> Self {
        if s == "flows" {
            Self::Flows
        } else {
            Self::Everything
        }
    }
}

/// 409 when a deploy of `instance` is under way: checked before anything is written for a new
/// one (its snapshot), as well as by the store when it begins.
pub async fn ensure_idle(state: &AppState, instance: &Instance) -> ApiResult<()> {
    let running: Option<String> =
        sqlx::query("SELECT id FROM deployments WHERE instance_id = $1 AND status = 'running'")
            .bind(&instance.id)
            .fetch_optional(&state.store.pool)
            .await?
            .map(|r| r.get(0));
    match running {
        Some(id) => Err(under_way(instance, Some(&id))),
        None => Ok(()),
    }
}

fn under_way(instance: &Instance, id: Option<&str>) -> ApiError {
    let which = id.map_or_else(String::new, |id| format!(" ({id})"));
    ApiError::Conflict(format!(
        "a deploy of instance {}{which} is under way; wait for it to end",
        instance.name
    ))
}

const COLUMNS: &str = "id, instance_id, snapshot_id, previous_snapshot_id, status, replicas, probe, started_at, finished_at, error";

fn from_row(r: &sqlx::any::AnyRow) -> Deployment {
    Deployment {
        id: r.get(0),
        instance_id: r.get(1),
        snapshot_id: r.get(2),
        previous_snapshot_id: r.get(3),
        status: DeployStatus::parse(&r.get::<String, _>(4)),
        replicas: serde_json::from_str(&r.get::<String, _>(5)).unwrap_or_default(),
        probe: r
            .get::<Option<String>, _>(6)
            .and_then(|p| serde_json::from_str(&p).ok()),
        started_at: r.get(7),
        finished_at: r.get(8),
        error: r.get(9),
    }
}

/// One deploy.
pub async fn load(state: &AppState, id: &str) -> ApiResult<Deployment> {
    let row = sqlx::query(&format!("SELECT {COLUMNS} FROM deployments WHERE id = $1"))
        .bind(id)
        .fetch_optional(&state.store.pool)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no deployment {id}")))?;
    Ok(from_row(&row))
}

/// An instance's deploys, newest first, a page before `before` (every one when empty).
pub async fn list(
    state: &AppState,
    instance_id: &str,
    before: &str,
    limit: i64,
) -> ApiResult<Vec<Deployment>> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM deployments WHERE instance_id = $1 AND ($2 = '' OR id < $2) ORDER BY id DESC LIMIT $3"
    ))
    .bind(instance_id)
    .bind(before)
    .bind(limit)
    .fetch_all(&state.store.pool)
    .await?;
    Ok(rows.iter().map(from_row).collect())
}

/// The probes of the deploys under way, by instance: the coordinator's gate for them.
pub async fn running_probes(
    state: &AppState,
) -> anyhow::Result<std::collections::HashMap<String, Probe>> {
    let rows = sqlx::query(
        "SELECT instance_id, probe FROM deployments WHERE status = 'running' AND probe IS NOT NULL",
    )
    .fetch_all(&state.store.pool)
    .await?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            let probe: ProbeBody = serde_json::from_str(&r.get::<String, _>(1)).ok()?;
            Some((r.get(0), probe.check("probe").ok()?))
        })
        .collect())
}

/// Begins deploying `content` (snapshot `snapshot_id`, already fit for the instance) to
/// `instance`: what runs now is taken as a snapshot, the store gets the new content, and a task
/// watches the rollout. 409 when a deploy of the instance is under way.
pub async fn begin(
    state: &AppState,
    caller: &Caller,
    instance: &Instance,
    snapshot_id: &str,
    content: &Content,
    scope: Scope,
    probe: Option<ProbeBody>,
) -> ApiResult<Deployment> {
    ensure_idle(state, instance).await?;
    // A snapshot or a pipeline's modules pass the instance's template as a list set by hand.
    let modules: BTreeMap<String, String> =
        serde_json::from_value(content.modules.clone()).unwrap_or_default();
    crate::api::modules::check_policy(state, instance, modules.keys()).await?;
    let previous = snapshots::current(state, &instance.id).await?;
    let id = new_id();
    let started_at = now_ms();
    let mut tx = state.store.write().await?;
    let before = snapshots::insert(
        &mut tx,
        Some(caller),
        instance,
        &format!("Before deployment {id}"),
        "What the instance ran when the deploy began: what a rollback restores.",
        &previous,
    )
    .await?;
    write_content(&mut tx, &instance.id, content, scope).await?;
    sqlx::query(
        "INSERT INTO deployments (id, instance_id, team_id, snapshot_id, previous_snapshot_id, scope, status, replicas, probe, error, actor_id, started_at, finished_at) \
         VALUES ($1, $2, $3, $4, $5, $6, 'running', '[]', $7, NULL, $8, $9, NULL)",
    )
    .bind(&id)
    .bind(&instance.id)
    .bind(&instance.team_id)
    .bind(snapshot_id)
    .bind(&before.id)
    .bind(scope.as_str())
    .bind(probe.as_ref().map(|p| json!(p).to_string()))
    .bind(&caller.id)
    .bind(started_at)
    .execute(&mut *tx)
    .await
    .map_err(|e| match ApiError::from(e) {
        ApiError::Conflict(_) => under_way(instance, None),
        other => other,
    })?;
    crate::audit::record(
        &mut tx,
        Some(caller),
        "instance.deploy-started",
        crate::audit::Subject::instance(&instance.team_id, &instance.id),
        json!({ "deployment_id": id, "snapshot_id": snapshot_id, "previous_snapshot_id": before.id }),
    )
    .await?;
    tx.commit().await?;
    state.coordinator.changed();
    // The revision as the store has it, which is what the coordinator deploys.
    let target = snapshots::stored_flows(state, &instance.id).await?.rev;
    let watch = Watch {
        state: state.clone(),
        id: id.clone(),
        instance_id: instance.id.clone(),
        team_id: instance.team_id.clone(),
        target,
        previous,
        scope,
    };
    tokio::spawn(watch.run());
    load(state, &id).await
}

/// Writes what `scope` covers of `content` into the instance's row.
async fn write_content(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    instance_id: &str,
    content: &Content,
    scope: Scope,
) -> ApiResult<()> {
    let now = now_ms();
    let modules = if content.modules.is_object() {
        content.modules.to_string()
    } else {
        "{}".to_owned()
    };
    match scope {
        Scope::Flows => sqlx::query(
            "UPDATE instances SET flows = $1, credentials = $2, modules = $3, flows_in_store = 1, updated_at = $4 WHERE id = $5",
        )
        .bind(content.flows.to_string())
        .bind(content.credentials.to_string())
        .bind(modules)
        .bind(now)
        .bind(instance_id),
        Scope::Everything => sqlx::query(
            "UPDATE instances SET flows = $1, credentials = $2, flows_in_store = 1, settings = $3, env = $4, modules = $5, updated_at = $6 WHERE id = $7",
        )
        .bind(content.flows.to_string())
        .bind(content.credentials.to_string())
        .bind(content.settings.to_string())
        .bind(json!(content.env).to_string())
        .bind(modules)
        .bind(now)
        .bind(instance_id),
    }
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// How long a deploy may take before it is given up as failed. Replicas that do not get the
/// flows in this time are stuck (crashing, an install that fails), not slow.
const DEPLOY_TIMEOUT: Duration = Duration::from_secs(600);

/// How often a deploy looks at the instance's replicas.
const WATCH_INTERVAL: Duration = Duration::from_millis(100);

/// The task that follows one deploy to its end.
struct Watch {
    state: AppState,
    id: String,
    instance_id: String,
    team_id: String,
    /// The flows revision every replica must run.
    target: String,
    /// What ran before.
    previous: Content,
    scope: Scope,
}

impl Watch {
    async fn run(mut self) {
        let deadline = tokio::time::Instant::now() + DEPLOY_TIMEOUT;
        // Set once the gate refused the new flows: why, and the deploy now restores the old.
        let mut refused: Option<String> = None;
        let mut shown: Vec<ReplicaDeploy> = Vec::new();
        // Crashed when the deploy began (a deploy may be the fix): only a crash that comes
        // during the deploy counts against it.
        let crashed_before = self.state.coordinator.status(&self.instance_id).state
            == tandem_coordinator::status::InstanceState::Crashed;
        // Why each replica that failed the new flows failed, kept once it has the old ones back.
        let mut failed: std::collections::BTreeMap<String, String> = Default::default();
        loop {
            tokio::time::sleep(WATCH_INTERVAL).await;
            // The watch belongs to the leader's coordinator: a control plane that lost the lease
            // leaves the deploy to the next leader, which rolls it back ([`recover`]).
            if !self.state.leadership.may_act() {
                tracing::warn!(deployment = %self.id, "no longer leading: the next leader takes the deploy over");
                return;
            }
            let stored = match snapshots::stored_flows(&self.state, &self.instance_id).await {
                Ok(f) => f,
                Err(ApiError::NotFound(_)) => {
                    return self
                        .finish(
                            DeployStatus::Failed,
                            Some("the instance was deleted".into()),
                        )
                        .await
                }
                Err(e) => {
                    tracing::warn!(deployment = %self.id, error = %e, "cannot read the instance's flows; trying again");
                    continue;
                }
            };
            if stored.rev != self.target {
                return self
                    .finish(
                        DeployStatus::Failed,
                        Some("the instance's flows were changed (from its editor) while the deploy ran".into()),
                    )
                    .await;
            }
            let status = self.state.coordinator.status(&self.instance_id);
            if refused.is_none() {
                for r in &status.replicas {
                    if let Some(e) = &r.deploy_error {
                        failed.insert(r.id.clone(), e.clone());
                    }
                }
            }
            let mut replicas = replicas(&status, &self.target, refused.is_some());
            for r in &mut replicas {
                if r.error.is_none() {
                    r.error = failed.get(&r.id).cloned();
                }
            }
            if replicas != shown {
                shown = replicas;
                self.save_replicas(&shown).await;
            }
            // A runtime that cannot be prepared (modules npm cannot install), or replicas that
            // crash with the new content, refuse it as the gate does.
            let crash = (status.state == tandem_coordinator::status::InstanceState::Crashed
                && !crashed_before)
                .then(|| tandem_coordinator::status::DeployRefusal {
                    rev: self.target.clone(),
                    reason: status
                        .reason
                        .clone()
                        .unwrap_or_else(|| "the instance crashed".into()),
                });
            if let Some(r) = status
                .deploy_refused
                .clone()
                .filter(|r| r.rev == self.target)
                .or(crash.filter(|_| refused.is_none()))
                .as_ref()
            {
                if let Some(first) = &refused {
                    return self
                        .finish(
                            DeployStatus::Failed,
                            Some(format!(
                                "{first}; and the previous flows failed the health gate too: {}",
                                r.reason
                            )),
                        )
                        .await;
                }
                tracing::warn!(deployment = %self.id, reason = %r.reason, "the new flows failed the health gate; rolling back");
                if let Err(e) = self.restore().await {
                    return self
                        .finish(
                            DeployStatus::Failed,
                            Some(format!(
                                "{}; and the previous flows could not be restored: {e}",
                                r.reason
                            )),
                        )
                        .await;
                }
                refused = Some(r.reason.clone());
                self.target = match snapshots::stored_flows(&self.state, &self.instance_id).await {
                    Ok(f) => f.rev,
                    Err(_) => self.previous.flows().rev,
                };
                continue;
            }
            if converged(&status, &self.target) {
                return match refused {
                    Some(reason) => self.finish(DeployStatus::RolledBack, Some(reason)).await,
                    None => self.finish(DeployStatus::Succeeded, None).await,
                };
            }
            if tokio::time::Instant::now() >= deadline {
                return self
                    .finish(
                        DeployStatus::Failed,
                        Some(format!(
                            "not every replica ran the flows within {} s ({})",
                            DEPLOY_TIMEOUT.as_secs(),
                            status.summary
                        )),
                    )
                    .await;
            }
        }
    }

    /// Puts what ran before back into the store; the coordinator converges on it.
    async fn restore(&self) -> ApiResult<()> {
        let mut tx = self.state.store.write().await?;
        write_content(&mut tx, &self.instance_id, &self.previous, self.scope).await?;
        // Without the deploy's probe, which the old flows may not answer.
        sqlx::query("UPDATE deployments SET probe = NULL WHERE id = $1")
            .bind(&self.id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        self.state.coordinator.changed();
        Ok(())
    }

    async fn save_replicas(&self, replicas: &[ReplicaDeploy]) {
        let r = sqlx::query("UPDATE deployments SET replicas = $1 WHERE id = $2")
            .bind(json!(replicas).to_string())
            .bind(&self.id)
            .execute(&self.state.store.pool)
            .await;
        if let Err(e) = r {
            tracing::warn!(deployment = %self.id, error = %e, "cannot record the replicas' progress");
        }
    }

    async fn finish(&self, status: DeployStatus, error: Option<String>) {
        let end = match status {
            DeployStatus::Succeeded => Some(crate::metrics::DeployEnd::Succeeded),
            DeployStatus::Failed => Some(crate::metrics::DeployEnd::Failed),
            DeployStatus::RolledBack => Some(crate::metrics::DeployEnd::RolledBack),
            DeployStatus::Pending | DeployStatus::Running => None,
        };
        if let Some(end) = end {
            self.state.metrics.deploy_ended(end);
        }
        let result = async {
            let mut tx = self.state.store.write().await?;
            sqlx::query(
                "UPDATE deployments SET status = $1, error = $2, finished_at = $3 WHERE id = $4",
            )
            .bind(status.as_str())
            .bind(error.clone())
            .bind(now_ms())
            .bind(&self.id)
            .execute(&mut *tx)
            .await?;
            crate::audit::record(
                &mut tx,
                None,
                &format!("instance.deploy-{}", status.as_str().replace('_', "-")),
                crate::audit::Subject::instance(&self.team_id, &self.instance_id),
                json!({ "deployment_id": self.id, "error": error }),
            )
            .await?;
            tx.commit().await?;
            Ok::<(), sqlx::Error>(())
        }
        .await;
        if let Err(e) = result {
            tracing::error!(deployment = %self.id, error = %e, "cannot record the end of a deploy");
        }
        if let Some(book) = self.state.coordinator.logs() {
            let log = book.instance(&self.instance_id);
            match &error {
                None => log.note(
                    "info",
                    format!("deployment {} {}", self.id, status.as_str()),
                ),
                Some(e) => log.note(
                    "warn",
                    format!("deployment {} {}: {e}", self.id, status.as_str()),
                ),
            }
        }
        // The coordinator drops the deploy's probe.
        self.state.coordinator.changed();
    }
}

/// Each replica's place in the deploy of flows `target`.
fn replicas(status: &ObservedStatus, target: &str, restoring: bool) -> Vec<ReplicaDeploy> {
    status
        .replicas
        .iter()
        .map(|r| {
            let on_target = r.flows_rev.as_deref() == Some(target);
            let status = if r.deploy_error.is_some() && !on_target {
                ReplicaDeployStatus::Failed
            } else if r.state == ReplicaPhase::Deploying {
                ReplicaDeployStatus::Deploying
            } else if on_target && r.state == ReplicaPhase::Running {
                if restoring {
                    ReplicaDeployStatus::Restored
                } else {
                    ReplicaDeployStatus::Deployed
                }
            } else {
                ReplicaDeployStatus::Pending
            };
            ReplicaDeploy {
                id: r.id.clone(),
                status,
                flows_rev: r.flows_rev.clone(),
                error: r.deploy_error.clone().filter(|_| !on_target || restoring),
            }
        })
        .collect()
}

/// Every replica wanted serves, on flows `target`: none is left to change.
fn converged(status: &ObservedStatus, target: &str) -> bool {
    if status.desired == 0 {
        // Stopped: the store has the flows, and the replicas get them when it starts.
        return true;
    }
    status.ready >= status.desired
        && status.replicas.len() as u32 == status.desired
        && status.replicas.iter().all(|r| {
            r.state == ReplicaPhase::Running && r.current && r.flows_rev.as_deref() == Some(target)
        })
}

/// At start, before the coordinator runs: deploys that were under way when Tandem stopped are
/// rolled back (the store gets what ran before), so no instance stays half on new flows.
pub async fn recover(state: &AppState) -> anyhow::Result<()> {
    let rows = sqlx::query(
        "SELECT d.id, d.instance_id, d.team_id, d.previous_snapshot_id, d.scope FROM deployments d WHERE d.status = 'running'",
    )
    .fetch_all(&state.store.pool)
    .await?;
    for r in rows {
        let (id, instance_id, team_id, previous): (String, String, String, String) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        let scope = Scope::parse(&r.get::<String, _>(4));
        let restored = match snapshots::load(state, &previous).await {
            Ok((_, content)) => {
                let mut tx = state.store.write().await?;
                write_content(&mut tx, &instance_id, &content, scope)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                tx.commit().await?;
                true
            }
            Err(_) => false,
        };
        let error = if restored {
            "Tandem stopped while the deploy ran; what ran before was restored"
        } else {
            "Tandem stopped while the deploy ran, and what ran before is gone"
        };
        let mut tx = state.store.write().await?;
        sqlx::query(
            "UPDATE deployments SET status = $1, error = $2, finished_at = $3 WHERE id = $4",
        )
        .bind(if restored { "rolled_back" } else { "failed" })
        .bind(error)
        .bind(now_ms())
        .bind(&id)
        .execute(&mut *tx)
        .await?;
        crate::audit::record(
            &mut tx,
            None,
            if restored {
                "instance.deploy-rolled-back"
            } else {
                "instance.deploy-failed"
            },
            crate::audit::Subject::instance(&team_id, &instance_id),
            json!({ "deployment_id": id, "error": error }),
        )
        .await?;
        tx.commit().await?;
        tracing::warn!(deployment = %id, instance = %instance_id, "{error}");
    }
    Ok(())
}
