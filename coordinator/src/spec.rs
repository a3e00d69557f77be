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
    /// npm modules the flows use, name → version or range (already checked against npm's
    /// rules); installed with the runtime. Left out of the spec's JSON when empty, so the hash
    /// of a spec without modules is the one it always had.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub modules: BTreeMap<String, String>,
    /// Where the replica keeps its flows and credentials: Tandem's store, through its storage
    /// API. Without it, in the replica's userDir (`flows.json`), written by the driver. Left
    /// out of the spec's JSON when absent, so the hash of such a spec is the one it always had.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage: Option<Storage>,
}

/// The instance-scoped storage API a replica reads and saves its flows through.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Storage {
    /// The API's base, e.g. `http://127.0.0.1:3000/api/v1/storage/<instance id>`.
    pub url: String,
    /// The instance's storage token, a secret like the admin secret: handed to the replica on
    /// standard input, never in its environment or a file.
    pub token: String,
}

/// What can be deployed to a running replica without a new process: the flows (a Node-RED flows
/// array) and their credentials, and a revision of both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flows {
    /// The flows array.
    pub value: Arc<serde_json::Value>,
    /// The credentials as Node-RED stores them: `{"$": "<iv><ciphertext>"}`, encrypted with the
    /// instance's credential secret, or `{}` when there are none (or when the flows carry their
    /// credentials inline, as flows given at creation may).
    pub credentials: Arc<serde_json::Value>,
    /// A hash of the flows and credentials: what a replica was started with or last given.
    pub rev: String,
}

impl Flows {
    /// Flows without stored credentials, and their revision.
    pub fn new(value: serde_json::Value) -> Self {
        Self::with_credentials(value, serde_json::json!({}))
    }

    /// Flows with their encrypted credentials, and the revision of both.
    pub fn with_credentials(value: serde_json::Value, credentials: serde_json::Value) -> Self {
        let rev = Self::rev_of(&value, &credentials);
        Self {
            value: Arc::new(value),
            credentials: Arc::new(credentials),
            rev,
        }
    }

    /// The revision of flows and credentials: unpadded hex, as the local driver has always
    /// recorded it in `.tandem-flows` (flows without credentials keep the revision Tandem 0.1
    /// gave them).
    pub fn rev_of(value: &serde_json::Value, credentials: &serde_json::Value) -> String {
        let mut text = value.to_string();
        if credentials.as_object().is_none_or(|c| !c.is_empty()) {
            text.push('\n');
            text.push_str(&credentials.to_string());
        }
        format!("{:x}", fnv(text.as_bytes()))
    }
}

/// An HTTP check a deploy sends to each replica it changed, after the flows started: the
/// replica must answer `path` with `expect_status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Probe {
    /// Path (and query) on the replica's flows, e.g. `/health`.
    pub path: String,
    /// The status it must answer.
    pub expect_status: u16,
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
    /// The proxy keeps each client on one replica with a cookie (balanced mode).
    pub affinity: bool,
    /// Who may call its own endpoints (checked by the proxies).
    pub http_auth: crate::proxy::HttpAuth,
    /// Its own certificate and key, served by the proxies' HTTPS listeners for those of its
    /// hosts it covers (a custom hostname).
    pub certificate: Option<crate::proxy::tls::PemKeyPair>,
    /// It sleeps (issue 17): while it should run, no replica runs; the proxies hold requests
    /// for it and wake it (their waker asks the control plane, which clears this).
    pub asleep: bool,
    /// What each replica's process runs.
    pub process: ProcessSpec,
    /// The flows every replica should run.
    pub flows: Flows,
    /// The health gate of the deploy under way, beyond the default one (flows started, no node
    /// in error, no missing node type).
    pub probe: Option<Probe>,
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

    /// The slots that should run: `0..replicas` while running and awake, none otherwise.
    pub fn slots(&self) -> BTreeSet<u32> {
        match self.state {
            DesiredState::Running if !self.asleep => (0..self.replicas).collect(),
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
