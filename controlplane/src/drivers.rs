//! The driver `tandem serve` runs instances with (`--driver`): local processes, or pods on a
//! Kubernetes cluster. One type for the coordinator, whichever it is, dispatching each call.

use std::sync::Arc;

use tandem_coordinator::driver::{Driver, DriverError, Event, Gate, InstanceDriver, Prepared};
use tandem_coordinator::local::{LocalDriver, LocalInstance};
use tandem_coordinator::logs::InstanceLog;
use tandem_coordinator::replica::FlowState;
use tandem_coordinator::spec::{Flows, ProcessSpec};
use tandem_kube::{KubeDriver, KubeInstance};
use tokio::sync::mpsc;

/// `--driver`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DriverKind {
    /// Node-RED processes on this machine, each in a Landlock sandbox.
    Local,
    /// Pods on the Kubernetes cluster of the in-cluster configuration or the kubeconfig.
    Kubernetes,
}

/// The driver chosen.
pub enum AnyDriver {
    /// Local processes.
    Local(LocalDriver),
    /// Pods.
    Kubernetes(KubeDriver),
}

/// One instance, on the chosen driver.
pub enum AnyInstance {
    /// Local processes.
    Local(LocalInstance),
    /// Pods.
    Kubernetes(KubeInstance),
}

impl Driver for AnyDriver {
    type Instance = AnyInstance;

    fn open(
        &self,
        name: &str,
        log: Arc<InstanceLog>,
        events: mpsc::UnboundedSender<Event>,
    ) -> AnyInstance {
        match self {
            Self::Local(d) => AnyInstance::Local(d.open(name, log, events)),
            Self::Kubernetes(d) => AnyInstance::Kubernetes(d.open(name, log, events)),
        }
    }
}

/// The same call on whichever driver runs the instance.
macro_rules! dispatch {
    ($self:ident, $i:ident => $call:expr) => {
        match $self {
            AnyInstance::Local($i) => $call.await,
            AnyInstance::Kubernetes($i) => $call.await,
        }
    };
}

impl InstanceDriver for AnyInstance {
    async fn prepare(&self, spec: &ProcessSpec) -> Result<Prepared, DriverError> {
        dispatch!(self, i => i.prepare(spec))
    }

    async fn start(
        &self,
        slot: u32,
        run: u64,
        spec: &ProcessSpec,
        flows: &Flows,
    ) -> Result<(), DriverError> {
        dispatch!(self, i => i.start(slot, run, spec, flows))
    }

    async fn stop(&self, slot: u32) -> Result<(), DriverError> {
        dispatch!(self, i => i.stop(slot))
    }

    async fn fence(&self, slot: u32) -> Result<(), DriverError> {
        dispatch!(self, i => i.fence(slot))
    }

    async fn check(&self, slot: u32) -> Result<(), DriverError> {
        dispatch!(self, i => i.check(slot))
    }

    async fn deploy(&self, slot: u32, flows: &Flows, gate: &Gate) -> Result<(), DriverError> {
        dispatch!(self, i => i.deploy(slot, flows, gate))
    }

    async fn set_flows(&self, slot: u32, state: FlowState) -> Result<(), DriverError> {
        dispatch!(self, i => i.set_flows(slot, state))
    }

    async fn remove(&self) -> Result<(), DriverError> {
        dispatch!(self, i => i.remove())
    }
}
