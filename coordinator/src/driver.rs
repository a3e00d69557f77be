//! The driver interface: how the coordinator runs an instance's replicas, whatever runs them
//! (local processes here, Kubernetes pods later).
//!
//! The split of duties: the driver does the mechanics (processes and signals, or pods) and
//! reports what happens to each replica as [`Event`]s; the coordinator decides (restart after a
//! backoff, hold a crash loop, fence, promote a standby, roll a new spec out) from those events.
//! A driver whose platform restarts replicas itself says so in [`Event::Exited`], and the
//! coordinator does not restart them a second time.
//!
//! Every event carries the replica's `run`, a number the driver gives each start of a slot, so
//! the coordinator can tell a late event of an old process from one of its successor.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::logs::InstanceLog;
use crate::replica::{ExitReason, FlowState, ReplicaId};
use crate::spec::{Flows, Probe, ProcessSpec};

/// What happened to one replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The slot.
    pub slot: u32,
    /// Which start of the slot this is about (see [`InstanceDriver::start`]).
    pub run: u64,
    /// What happened.
    pub kind: EventKind,
}

/// The kinds of [`Event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// Ready: it answers and its flows are in the state its spec asks for (or, adopted, the
    /// state it was found in).
    Ready(Running),
    /// It did not answer its liveness check for the detection time. It is out of rotation
    /// and may still run flows until it is fenced.
    Hung {
        /// Time without an answer, ms.
        silent_ms: u64,
    },
    /// It ended, or failed to start.
    Exited {
        /// How.
        reason: ExitReason,
        /// The platform restarts it itself (a Kubernetes pod); the coordinator waits for its
        /// next `Ready` instead of starting it again.
        restarting: bool,
    },
    /// [`InstanceDriver::fence`] holds: it serves and runs nothing any more.
    Fenced,
}

/// A replica that is ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running {
    /// Where its HTTP server listens.
    pub addr: SocketAddr,
    /// Process id (local driver).
    pub pid: Option<u32>,
    /// Found running from before (a restart of Tandem) and taken over rather than started.
    pub adopted: bool,
    /// Its flows run (false for a hot standby booted with flows stopped).
    pub flows: FlowState,
    /// The revision of the flows it was started with (or last given).
    pub flows_rev: Option<String>,
    /// Adopted, but started for another spec (an older Tandem, or a change made while Tandem
    /// was down): it serves until the coordinator replaces it, one replica at a time.
    pub stale: bool,
    /// What confines the replica's process.
    pub isolation: Isolation,
    /// How its process came to be, when the driver knows (not for an adopted one).
    pub start: Option<Start>,
}

/// How a replica's process came to be (issue 17).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Start {
    /// A Node-RED process started for it (a cold start).
    Cold {
        /// Why no warm runtime served it, when the driver keeps a pool of them.
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// A warm runtime of the driver's pool, given to it.
    Warm,
}

/// What confines a replica's process to its own files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// A Landlock sandbox: its own userDir read-write; the stack, the Node.js runtime and the
    /// system read-only; nothing else.
    Landlock,
    /// Nothing beyond the OS user Tandem runs as.
    None,
    /// A container of its own (a Kubernetes pod): its own filesystem, user and network; the
    /// instance's secrets readable by root alone, which it is not once Node-RED runs.
    Container,
}

/// How a driver finds a replica that hangs: it checks each ready replica's admin API every
/// `interval`, and reports [`EventKind::Hung`] once none of its checks has been answered for
/// `hang_after`. A flow that blocks Node.js's event loop longer than `hang_after` makes its
/// replica count as hung: raise it (`tandem serve --hang-after-ms`) for such flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// Time between checks. Default 250 ms.
    pub interval: Duration,
    /// Time without an answer after which a replica is hung. Default 1 s.
    pub hang_after: Duration,
}

impl Default for Liveness {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(250),
            hang_after: Duration::from_secs(1),
        }
    }
}

/// What a deploy checks on a replica before it counts as done: every node type of the flows is
/// known (Node-RED accepts flows with unknown types, and then runs none of them); when its flows
/// run, they started with no node in error; and the probe, when there is one, answers as asked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Gate {
    /// The replica's flows run (false for a standby): wait for them to start, and check them.
    pub flows_on: bool,
    /// An HTTP check of the replica's own flows.
    pub probe: Option<Probe>,
}

/// A runtime made ready.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Prepared {
    /// Each module asked for, and the version installed (a range resolved).
    pub modules: std::collections::BTreeMap<String, String>,
}

/// Why a driver call failed.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// Installing the stack (Node-RED, or the Node.js runtime it asks for) failed; the output's
    /// tail says why.
    #[error("installing {package} {version} with npm failed: {output}")]
    Install {
        /// `node-red` or `node`.
        package: String,
        /// The version asked for.
        version: String,
        /// The end of npm's output.
        output: String,
    },
    /// The replica is not running (never started, ended, or fenced).
    #[error("replica {0} is not running")]
    NotRunning(ReplicaId),
    /// The replica's admin API refused a call or did not answer.
    #[error("replica {id}: {reason}")]
    Admin {
        /// The replica.
        id: ReplicaId,
        /// What went wrong.
        reason: String,
    },
    /// Replicas must run sandboxed (`--require-isolation`) and this kernel has no Landlock.
    #[error("replica {id} was not started: isolation is required and this kernel has no Landlock")]
    Unconfined {
        /// The replica.
        id: ReplicaId,
    },
    /// New flows were deployed and failed the health gate.
    #[error("{reason}")]
    Refused {
        /// The replica.
        id: ReplicaId,
        /// What failed, e.g. `unknown node type: foo-bar`.
        reason: String,
    },
    /// A warm runtime could not be booted or given an instance (issue 17).
    #[error("warm runtime: {0}")]
    Warm(String),
    /// An operating-system error.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
}

impl DriverError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }
}

/// Runs instances. Implementations: [`crate::local::LocalDriver`], [`crate::fake::FakeDriver`].
pub trait Driver: Send + Sync + 'static {
    /// The handle on one instance.
    type Instance: InstanceDriver;

    /// Opens instance `name`. Its replicas' events go to `events`; their output goes to `log`,
    /// one entry per line, tagged with the replica's id.
    fn open(
        &self,
        name: &str,
        log: Arc<InstanceLog>,
        events: mpsc::UnboundedSender<Event>,
    ) -> Self::Instance;
}

/// One instance's replicas, as a driver runs them. Calls for different slots may run at the
/// same time; the coordinator makes one call at a time per slot.
pub trait InstanceDriver: Send + Sync + 'static {
    /// Makes the runtime `spec` asks for ready (installs Node-RED, the Node.js runtime it asks
    /// for and its modules, on first use); says which module versions were installed.
    fn prepare(
        &self,
        spec: &ProcessSpec,
    ) -> impl Future<Output = Result<Prepared, DriverError>> + Send;

    /// Runs `slot` with `spec`: adopts the replica of this slot still running from before (a
    /// restart of Tandem), or starts one with `flows`. Its events carry `run`, which the
    /// coordinator gives each start; [`EventKind::Ready`] or [`EventKind::Exited`] follows.
    fn start(
        &self,
        slot: u32,
        run: u64,
        spec: &ProcessSpec,
        flows: &Flows,
    ) -> impl Future<Output = Result<(), DriverError>> + Send;

    /// Stops `slot` gracefully (its flows stop, requests finish) and resolves once it is gone.
    /// Sends no event.
    fn stop(&self, slot: u32) -> impl Future<Output = Result<(), DriverError>> + Send;

    /// Fences `slot`: ends it at once, whatever state it is in (hung, stopped by a signal), and
    /// resolves once it serves and runs nothing any more; [`EventKind::Fenced`] follows.
    fn fence(&self, slot: u32) -> impl Future<Output = Result<(), DriverError>> + Send;

    /// Checks once, now, that the replica in `slot` answers (the check the driver otherwise
    /// makes every [`Liveness::interval`]): for a replica a proxy has given up on.
    fn check(&self, slot: u32) -> impl Future<Output = Result<(), DriverError>> + Send;

    /// Deploys `flows` to the running replica in `slot` (a full deploy; a replica whose flows are
    /// stopped keeps them stopped), then runs the health `gate` on it. A gate that fails is
    /// [`DriverError::Refused`]: the replica runs the flows, and they are bad.
    fn deploy(
        &self,
        slot: u32,
        flows: &Flows,
        gate: &Gate,
    ) -> impl Future<Output = Result<(), DriverError>> + Send;

    /// Starts or stops the flows of the running replica in `slot` without restarting it.
    fn set_flows(
        &self,
        slot: u32,
        state: FlowState,
    ) -> impl Future<Output = Result<(), DriverError>> + Send;

    /// Deletes what the driver keeps of the instance (userDirs, logs), once every slot is
    /// stopped: the instance was deleted.
    fn remove(&self) -> impl Future<Output = Result<(), DriverError>> + Send;
}
