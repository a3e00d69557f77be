//! What the control plane reads from the coordinator (observed state, logs) and tells it
//! (desired state changed, restart).

use std::sync::Arc;

use serde::Serialize;

use crate::driver::Isolation;
use crate::logs::LogBook;
use crate::replica::ReplicaPhase;

/// The state of an instance as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    /// Every replica wanted is ready.
    Running,
    /// Some replicas are ready, not all.
    Degraded,
    /// None ready yet.
    Starting,
    /// The stack is being installed.
    Installing,
    /// Replicas are being stopped.
    Stopping,
    /// Nothing runs, as asked.
    Stopped,
    /// Nothing runs, as asked (suspended).
    Suspended,
    /// It should run, but sleeps after an idle period: its first request wakes it.
    Sleeping,
    /// No replica is ready and one is held as crashed, or the stack cannot be installed.
    Crashed,
    /// Nothing observes the instance.
    Unknown,
}

impl InstanceState {
    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Degraded => "degraded",
            Self::Starting => "starting",
            Self::Installing => "installing",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::Suspended => "suspended",
            Self::Sleeping => "sleeping",
            Self::Crashed => "crashed",
            Self::Unknown => "unknown",
        }
    }
}

/// What the coordinator sees of one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ObservedStatus {
    /// The instance as a whole.
    pub state: InstanceState,
    /// Replicas ready to serve.
    pub ready: u32,
    /// Replicas wanted.
    pub desired: u32,
    /// `<state> <ready>/<desired>` while it should run, e.g. `degraded 1/2`; else the state.
    pub summary: String,
    /// Why it is crashed or degraded, when known.
    pub reason: Option<String>,
    /// Each replica, by slot.
    pub replicas: Vec<ReplicaStatus>,
    /// What confines the running replicas: `landlock`, or `none` when any runs without a
    /// sandbox (a kernel without Landlock); absent while none runs.
    pub isolation: Option<Isolation>,
    /// The flows revision a deploy tried and its health gate refused: it goes to no further
    /// replica until the flows change (the control plane rolls the deploy back).
    pub deploy_refused: Option<DeployRefusal>,
    /// The npm modules installed for the replicas, name → version (ranges resolved).
    pub modules: std::collections::BTreeMap<String, String>,
}

/// A flows revision refused by a deploy's health gate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeployRefusal {
    /// The revision.
    pub rev: String,
    /// Why, e.g. `unknown node type: foo-bar`.
    pub reason: String,
}

/// What the coordinator sees of one replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReplicaStatus {
    /// `<instance>-r<slot>`, the `src` of its log lines.
    pub id: String,
    /// Slot, 0-based, stable across restarts.
    pub slot: u32,
    /// Where it is in its life.
    pub state: ReplicaPhase,
    /// Loopback port while it runs.
    pub port: Option<u16>,
    /// Process id while it runs (local driver).
    pub pid: Option<u32>,
    /// Restarts since it was started by Tandem.
    pub restarts: u64,
    /// How its last run ended.
    pub last_exit: Option<String>,
    /// When it entered its state, epoch ms.
    pub since: i64,
    /// It takes traffic: every running replica in balanced mode, the one whose flows run in
    /// standby mode.
    pub active: bool,
    /// What confines it while it runs.
    pub isolation: Option<Isolation>,
    /// How its process came to be while it runs: `{"kind": "warm"}` (a warm runtime of the
    /// pool) or `{"kind": "cold", "reason"?}` (why the pool could not serve it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start: Option<crate::driver::Start>,
    /// The revision of the flows it runs, when known.
    pub flows_rev: Option<String>,
    /// Why the last deploy to it failed, until the next succeeds.
    pub deploy_error: Option<String>,
    /// It runs the instance's current process spec (settings, environment, modules, stack);
    /// false while it waits to be replaced.
    pub current: bool,
}

impl ObservedStatus {
    /// The answer when nothing observes instances.
    pub fn unknown() -> Self {
        Self {
            state: InstanceState::Unknown,
            ready: 0,
            desired: 0,
            summary: "unknown".into(),
            reason: None,
            replicas: Vec::new(),
            isolation: None,
            deploy_refused: None,
            modules: Default::default(),
        }
    }
}

/// The control plane's handle on the coordinator. [`crate::Coordinator`] implements
/// it; a control plane without one uses [`NotObserved`].
pub trait Coordination: Send + Sync + 'static {
    /// The observed state of `instance_id`.
    fn status(&self, instance_id: &str) -> ObservedStatus;
    /// The desired state changed in the store: reconcile soon.
    fn changed(&self) {}
    /// Replace every replica of the instance, one at a time.
    fn restart(&self, _instance_id: &str) {}
    /// Try replicas held as crashed again.
    fn retry(&self, _instance_id: &str) {}
    /// A replica saved flows of revision `rev` through the storage API (a deploy from its
    /// editor): it runs them, and needs no deploy of them.
    fn flows_saved(&self, _instance_id: &str, _slot: u32, _rev: &str) {}
    /// A replica's editor installed or removed a module, and the store now lists `modules`
    /// (name → version): the replica runs them, and is not replaced for them.
    fn modules_saved(
        &self,
        _instance_id: &str,
        _slot: u32,
        _modules: &std::collections::BTreeMap<String, String>,
    ) {
    }
    /// Metrics of the running instances, in the Prometheus text format.
    fn metrics(&self) -> String {
        String::new()
    }
    /// Instance logs, when replicas run.
    fn logs(&self) -> Option<Arc<LogBook>> {
        None
    }
}

/// A [`Coordination`] for a control plane without a coordinator: every instance is `unknown`.
#[derive(Debug, Default, Clone, Copy)]
pub struct NotObserved;

impl Coordination for NotObserved {
    fn status(&self, _instance_id: &str) -> ObservedStatus {
        ObservedStatus::unknown()
    }
}
