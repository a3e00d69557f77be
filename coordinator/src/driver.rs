//! The driver interface: how the coordinator starts, stops and inspects replicas, whatever runs
//! them (local processes here, Kubernetes later).

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use crate::logs::InstanceLog;

/// What one replica should run.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ReplicaSpec {
    /// The instance's name (DNS-safe).
    pub instance: String,
    /// The replica's slot, 0-based; stable across restarts.
    pub slot: u32,
    /// Node-RED version of the stack, e.g. `4.1.2`.
    pub nodered_version: String,
    /// Node.js version the stack asks for, installed from npm; the system's `node` when absent.
    pub node_version: Option<String>,
    /// Heap cap, MiB (the stack's memory limit).
    pub memory_mb: u32,
    /// HA replicas run with the editor disabled.
    pub ha: bool,
    /// Secret the admin API accepts (header `x-tandem-token`); never written to disk.
    pub admin_secret: String,
    /// Fixed per instance so every replica decrypts the same credentials.
    pub credential_secret: String,
    /// Effective Node-RED settings (template merged with overrides), a JSON object.
    pub settings: serde_json::Value,
    /// Effective environment.
    pub env: BTreeMap<String, String>,
    /// The flows to start with, a Node-RED flows array.
    pub flows: serde_json::Value,
    /// Boot with flows stopped (hot standby).
    pub start_stopped: bool,
}

impl ReplicaSpec {
    /// `<instance>-r<slot>`.
    pub fn id(&self) -> String {
        format!("{}-r{}", self.instance, self.slot)
    }
}

/// A replica the driver started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running {
    /// `<instance>-r<slot>`.
    pub id: String,
    /// Where its HTTP server listens (loopback).
    pub addr: SocketAddr,
    /// Process id (local driver).
    pub pid: Option<u32>,
    /// Its userDir (local driver).
    pub user_dir: Option<PathBuf>,
    /// Found running from before (a restart of Tandem) and taken over rather than started.
    pub adopted: bool,
    /// Its flows run (false for a hot standby booted with flows stopped).
    pub flows_started: bool,
    /// Adopted, but started for another spec (an older version of Tandem, or a change made
    /// while Tandem was down): it serves until the coordinator replaces it, one replica at a
    /// time, so an upgrade does not take an HA instance down.
    pub stale: bool,
    /// What confines the replica's process.
    pub isolation: Isolation,
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
    /// The replica did not answer its readiness probe in time.
    #[error("replica {id} was not ready within {seconds} s: {reason}")]
    NotReady {
        /// The replica.
        id: String,
        /// The deadline.
        seconds: u64,
        /// The last probe error or the process's exit.
        reason: String,
    },
    /// The replica's process ended before it was ready.
    #[error("replica {id} exited while starting: {reason}")]
    Exited {
        /// The replica.
        id: String,
        /// Exit status and the last lines of its output.
        reason: String,
    },
    /// The replica's admin API refused a call or did not answer.
    #[error("replica {id}: {reason}")]
    Admin {
        /// The replica.
        id: String,
        /// What went wrong.
        reason: String,
    },
    /// Replicas must run sandboxed (`--require-isolation`) and this kernel has no Landlock.
    #[error("replica {id} was not started: isolation is required and this kernel has no Landlock")]
    Unconfined {
        /// The replica.
        id: String,
    },
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

/// Runs replicas. Implementations: [`crate::local::LocalDriver`].
///
/// A replica's output goes to the instance's [`InstanceLog`], one entry per line, tagged with
/// the replica's id; that is how a driver's logs are read.
pub trait Driver: Send + Sync + 'static {
    /// Makes the stack `spec` runs ready (installs Node-RED, and the Node.js runtime it asks
    /// for, on first use), writing the install's output to `log`.
    fn prepare(
        &self,
        spec: &ReplicaSpec,
        log: &InstanceLog,
    ) -> impl Future<Output = Result<(), DriverError>> + Send;
    /// Starts a replica, or adopts one still running from before with the same spec, and
    /// returns once it answers its readiness probe.
    fn start(
        &self,
        spec: &ReplicaSpec,
        log: Arc<InstanceLog>,
    ) -> impl Future<Output = Result<Running, DriverError>> + Send;
    /// Resolves when the replica's process has ended, with how it ended (exit status, signal).
    fn wait(&self, id: &str) -> impl Future<Output = String> + Send;
    /// Liveness: whether the replica still answers its admin API.
    fn check(&self, id: &str) -> impl Future<Output = Result<(), String>> + Send;
    /// Stops a replica: SIGTERM, then SIGKILL after the grace period.
    fn stop(&self, id: &str) -> impl Future<Output = Result<(), DriverError>> + Send;
    /// Kills a replica at once (SIGKILL), for one that no longer answers.
    fn kill(&self, id: &str) -> impl Future<Output = Result<(), DriverError>> + Send;
    /// Deletes what the driver keeps for a deleted instance (userDirs, logs). Its replicas must
    /// be stopped first.
    fn remove(&self, instance: &str) -> impl Future<Output = Result<(), DriverError>> + Send;
    /// Starts or stops a running replica's flows without restarting it (hot standby).
    fn set_flows_running(
        &self,
        id: &str,
        running: bool,
    ) -> impl Future<Output = Result<(), DriverError>> + Send;
    /// Deploys `flows` (a Node-RED flows array) to a running replica.
    fn deploy(
        &self,
        id: &str,
        flows: &serde_json::Value,
    ) -> impl Future<Output = Result<(), DriverError>> + Send;
}
