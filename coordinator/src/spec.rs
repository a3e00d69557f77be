//! What the control plane wants of an instance, split by what a change costs: the
//! [`ProcessSpec`] needs new processes when it changes; the [`Flows`] are deployed live.

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;
use std::sync::Arc;

use serde::Serialize;

/// What the control plane wants of an instance: one type, shared with the control plane's store
/// (`instances.desired_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DesiredState {
    /// Replicas running and serving.
    Running,
    /// Nothing running.
    Stopped,
    /// Nothing running; the instance is kept, not billed for.
    Suspended,
}

impl DesiredState {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Stopped => "stopped",
            Self::Suspended => "suspended",
        }
    }
}

/// A stored desired state that is none of the three.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown desired state {0:?}: expected running, stopped or suspended")]
pub struct UnknownState(pub String);

impl FromStr for DesiredState {
    type Err = UnknownState;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "running" => Ok(Self::Running),
            "stopped" => Ok(Self::Stopped),
            "suspended" => Ok(Self::Suspended),
            other => Err(UnknownState(other.into())),
        }
    }
}

/// What a replica's process is started with. Any change to it needs a new process, so the
/// coordinator replaces the instance's replicas one at a time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProcessSpec {
    /// The instance's name (DNS-safe).
    pub instance: String,
    /// Node-RED version of the stack, e.g. `4.1.2`.
    pub nodered_version: String,
    /// Node.js version the stack asks for, installed from npm; the system's `node` when absent.
    pub node_version: Option<String>,
    /// Heap cap, MiB (the stack's memory limit).
    pub memory_mb: u32,
    /// HA replicas run with the editor disabled.
    pub ha: bool,
    /// Boot with flows stopped: HA standby mode, where the coordinator starts the flows of one.
    pub start_stopped: bool,
    /// Secret the admin API accepts (header `x-tandem-token`); never written to disk.
    pub admin_secret: String,
    /// Fixed per instance so every replica decrypts the same credentials.
    pub credential_secret: String,
    /// Effective Node-RED settings (template merged with overrides), a JSON object, already
    /// checked against the control plane's allowlist.
    pub settings: serde_json::Value,
    /// Effective environment, already checked; per replica, `TANDEM_MQTT_URL` is added.
    pub env: BTreeMap<String, String>,
}

/// What can be deployed to a running replica without a new process: the flows (a Node-RED flows
/// array, whose nodes carry their credentials), and their revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flows {
    /// The flows array.
    pub value: Arc<serde_json::Value>,
    /// A hash of the flows: what a replica was started with or last given.
    pub rev: String,
}

impl Flows {
    /// Flows and their revision.
    pub fn new(value: serde_json::Value) -> Self {
        // Unpadded hex, as the local driver has always recorded it in `.tandem-flows`.
        let rev = format!("{:x}", fnv(value.to_string().as_bytes()));
        Self {
            value: Arc::new(value),
            rev,
        }
    }
}

/// One instance as it should be.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceDesired {
    /// Instance id (the key of the status and logs).
    pub id: String,
    /// Host names it is served at.
    pub hosts: Vec<String>,
    /// Running, stopped or suspended.
    pub state: DesiredState,
    /// Replicas: 1 without HA.
    pub replicas: u32,
    /// HA standby mode: every replica boots with its flows stopped; the coordinator starts the
    /// flows of one (the active) and routes only to it. Never two actives.
    pub standby: bool,
    /// What each replica's process runs.
    pub process: ProcessSpec,
    /// The flows every replica should run.
    pub flows: Flows,
    /// By slot, the MQTT proxy listener that replica's flows use as their broker, given to it as
    /// `TANDEM_MQTT_URL`; empty when Tandem has no MQTT broker configured.
    pub mqtt_urls: BTreeMap<u32, String>,
}

impl InstanceDesired {
    /// The process spec of `slot`: the instance's, with its own MQTT listener.
    pub fn process_for(&self, slot: u32) -> ProcessSpec {
        let mut spec = ProcessSpec {
            start_stopped: self.standby,
            ..self.process.clone()
        };
        if let Some(url) = self.mqtt_urls.get(&slot) {
            spec.env.insert("TANDEM_MQTT_URL".into(), url.clone());
        }
        spec
    }

    /// The slots that should run: `0..replicas` while running, none otherwise.
    pub fn slots(&self) -> BTreeSet<u32> {
        match self.state {
            DesiredState::Running => (0..self.replicas).collect(),
            _ => BTreeSet::new(),
        }
    }
}

/// FNV-1a, 64 bits: a stable hash for revisions (not for secrets).
pub(crate) fn fnv(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_desired_state_is_an_error_not_stopped() {
        assert_eq!("running".parse(), Ok(DesiredState::Running));
        assert_eq!("suspended".parse(), Ok(DesiredState::Suspended));
        assert_eq!(
            "Running".parse::<DesiredState>(),
            Err(UnknownState("Running".into()))
        );
    }
}
