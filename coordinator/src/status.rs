//! Observed state of instances: what is actually running, as opposed to what was asked for.

use serde::Serialize;

/// What the coordinator sees of one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ObservedStatus {
    /// `running`, `degraded`, `starting`, `installing`, `stopped`, `suspended`, `crashed` or
    /// `unknown`.
    pub state: String,
    /// Replicas ready to serve.
    pub ready: u32,
    /// Replicas wanted.
    pub desired: u32,
}

impl ObservedStatus {
    /// The answer when nothing observes instances.
    pub fn unknown() -> Self {
        Self {
            state: "unknown".into(),
            ready: 0,
            desired: 0,
        }
    }
}

/// Where the control plane reads observed state from. The coordinator implements it; until it
/// runs, [`NotObserved`] answers `unknown` for every instance.
pub trait StatusSource: Send + Sync + 'static {
    /// The observed state of `instance_id`.
    fn status(&self, instance_id: &str) -> ObservedStatus;
}

/// A [`StatusSource`] for a control plane without a coordinator: every instance is `unknown`.
#[derive(Debug, Default, Clone, Copy)]
pub struct NotObserved;

impl StatusSource for NotObserved {
    fn status(&self, _instance_id: &str) -> ObservedStatus {
        ObservedStatus::unknown()
    }
}
