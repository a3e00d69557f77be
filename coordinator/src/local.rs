//! The local driver: Node-RED replicas as processes on this machine.
//!
//! Layout under the data directory:
//! - `stacks/node-red-<version>/`: `npm install node-red@<version>`, installed on first use
//!   ([`install`]).
//! - `instances/<instance>/r<slot>/`: the replica's userDir, with the generated `settings.js`
//!   ([`settings`]), `flows.json`, `.tandem-flows` (the revision of the flows Tandem last wrote)
//!   and `replica.json` (pid, port and spec hash, for adoption; [`process`]).
//! - `instances/<instance>/logs/r<slot>.log`: the replica's stdout and stderr, appended; rotated
//!   to `r<slot>.log.1` past [`LocalDriver::max_log_bytes`] ([`tail`]).
//! - `pool/rt-<n>/`: a warm runtime's userDir ([`pool`]); once given to a replica,
//!   `instances/<instance>/r<slot>` is a link to it.
//!
//! Node-RED writes its output to that file, not to a pipe, so it keeps running when Tandem
//! restarts; Tandem tails the file into the instance's log. On start, a replica still running
//! from before (same pid, its userDir as working directory, answering with the secret) is
//! adopted instead of started again; it is stale when it was started for another spec.
//!
//! Each replica listens on 127.0.0.1 only, serves flows at `/` and the editor and admin API at
//! `/admin`, and accepts admin calls only with its secret in `x-tandem-token` ([`crate::admin`]). It
//! runs in its own process group, so a stop or a fence reaches everything it started.
//!
//! Each started replica has a watcher task ([`watcher`]): it waits for readiness, then checks the
//! admin API every [`Liveness::interval`] and reports [`EventKind::Hung`] once nothing has
//! answered for [`Liveness::hang_after`], and reports how the process ended. Signals go to the
//! replica's process group through rustix; a stop or fence holds once no process of the group
//! runs.

mod install;
mod pool;
mod process;
mod settings;
mod tail;
mod watcher;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::process::Signal;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

pub use install::{write_userconfig, NpmOptions, RegistryError, DEFAULT_REGISTRY};
pub use settings::{
    legacy_spec_hash, settings_js, spec_hash, Placement, POD_PORT, SECRETS_ON_STDIN,
};

use crate::admin;
use crate::driver::{
    Driver, DriverError, Event, EventKind, Gate, InstanceDriver, Isolation, Liveness, Prepared,
    Running, Start,
};
use crate::logs::InstanceLog;
use crate::replica::{ExitReason, FlowState, ReplicaId};
use crate::spec::{Flows, ProcessSpec};
use process::Record;
use watcher::{watch_replica, Boot, Watcher};

/// How the local driver sandboxes replicas: the `tandem` binary re-executed as
/// `tandem sandbox-exec`, which restricts itself with Landlock and then runs Node.js.
#[derive(Debug, Clone)]
pub struct SandboxLauncher {
    /// The `tandem` binary.
    pub exe: PathBuf,
    /// Refuse to start a replica the kernel cannot sandbox (default: start it with a warning).
    pub required: bool,
}

/// The local driver.
#[derive(Debug, Clone)]
pub struct LocalDriver {
    data_dir: PathBuf,
    /// Where stacks are installed. Default `<data_dir>/stacks`; several data dirs can share one.
    pub stacks_dir: PathBuf,
    /// Time a replica gets to answer its first readiness probe. Default 60 s.
    pub ready_timeout: Duration,
    /// Time between SIGTERM and SIGKILL. Default 10 s.
    pub stop_grace: Duration,
    /// A replica's log file is rotated (one old file kept) past this size. Default 8 MiB.
    pub max_log_bytes: u64,
    /// How hung replicas are found.
    pub liveness: Liveness,
    /// How instances' npm modules are installed.
    pub npm: install::NpmOptions,
    /// How replicas are sandboxed; `None` runs them as plain processes (the coordinator's own
    /// tests, which have no `tandem` binary).
    sandbox: Option<(SandboxLauncher, Isolation)>,
    /// Warm runtimes ([`LocalDriver::with_warm_runtimes`]); `None` starts every replica cold.
    warm: Option<Arc<pool::WarmPool>>,
}

impl LocalDriver {
    /// A driver keeping stacks and replicas under `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        // Absolute, since replicas run in their userDir.
        let data_dir: PathBuf = data_dir.into();
        let data_dir = std::path::absolute(&data_dir).unwrap_or(data_dir);
        Self {
            stacks_dir: data_dir.join("stacks"),
            data_dir,
            ready_timeout: Duration::from_secs(60),
            stop_grace: Duration::from_secs(10),
            max_log_bytes: 8 << 20,
            liveness: Liveness::default(),
            npm: install::NpmOptions::default(),
            sandbox: None,
            warm: None,
        }
    }

    /// Keeps `size` warm runtimes ready per stack in use (issue 17, [`pool`]); 0 turns the pool
    /// off. Stops the warm runtimes an earlier Tandem left in `<data dir>/pool`. Set the
    /// sandbox first: warm runtimes are sandboxed as replicas are.
    pub fn with_warm_runtimes(mut self, size: usize) -> Self {
        self.warm =
            (size > 0).then(|| Arc::new(pool::WarmPool::open(self.data_dir.join("pool"), size)));
        self
    }

    /// Stops the warm runtimes not given to any instance (when Tandem exits: replicas keep
    /// running for the next Tandem to adopt, warm runtimes do not).
    pub fn close_warm_runtimes(&self) {
        if let Some(p) = &self.warm {
            p.close();
        }
    }

    /// Sandboxes every replica through `launcher`. Probes the kernel once: without Landlock,
    /// replicas start unconfined with a warning in their log (or, when `launcher.required`,
    /// do not start).
    pub fn with_sandbox(mut self, launcher: SandboxLauncher) -> Self {
        let isolation = match crate::sandbox::probe() {
            crate::sandbox::Isolation::Landlock { .. } => Isolation::Landlock,
            crate::sandbox::Isolation::None { reason } => {
                tracing::warn!(%reason, required = launcher.required, "this kernel cannot sandbox replicas (Landlock)");
                Isolation::None
            }
        };
        self.sandbox = Some((launcher, isolation));
        self
    }

    /// What confines the replicas this driver starts.
    pub fn isolation(&self) -> Isolation {
        match &self.sandbox {
            Some((_, i)) => *i,
            None => Isolation::None,
        }
    }

    /// Installs Node-RED `version` unless it is there already; returns the path of `red.js`.
    pub async fn install_stack(
        &self,
        version: &str,
        log: &InstanceLog,
    ) -> Result<PathBuf, DriverError> {
        let dir = install::install_package(&self.stacks_dir, "node-red", version, log).await?;
        Ok(dir.join("node_modules/node-red/red.js"))
    }

    /// Installs the Node.js runtime `version` from npm (the `node` package, which carries the
    /// official binary) unless it is there already; returns the path of the `node` binary.
    pub async fn install_runtime(
        &self,
        version: &str,
        log: &InstanceLog,
    ) -> Result<PathBuf, DriverError> {
        let dir = install::install_package(&self.stacks_dir, "node", version, log).await?;
        Ok(dir.join("node_modules/node/bin/node"))
    }

    /// Where the module set of `spec` is installed (see [`install::install_modules`]); `None`
    /// without modules.
    pub fn modules_dir(&self, spec: &ProcessSpec) -> Option<PathBuf> {
        install::modules_dir(&self.stacks_dir, spec)
    }

    /// Everything the driver keeps of an instance: its replicas' userDirs and logs.
    pub fn instance_dir(&self, instance: &str) -> PathBuf {
        self.data_dir.join("instances").join(instance)
    }

    /// The userDir of a replica.
    pub fn user_dir(&self, id: &ReplicaId) -> PathBuf {
        self.instance_dir(&id.instance)
            .join(format!("r{}", id.slot))
    }

    /// The output file of a replica.
    pub fn log_file(&self, id: &ReplicaId) -> PathBuf {
        self.instance_dir(&id.instance)
            .join("logs")
            .join(format!("r{}.log", id.slot))
    }

    /// Whether `id` would run unconfined (a kernel without Landlock, where the driver
    /// sandboxes); an error when confinement is required.
    fn unconfined(&self, id: &ReplicaId) -> Result<bool, DriverError> {
        match &self.sandbox {
            Some((launcher, Isolation::None)) if launcher.required => {
                Err(DriverError::Unconfined { id: id.clone() })
            }
            Some((_, Isolation::None)) => Ok(true),
            _ => Ok(false),
        }
    }

    /// The command that runs Node-RED (`red`, on `node`) with `dir` as its userDir, working
    /// directory and home, sandboxed to it when the driver sandboxes, its output appended to
    /// `log_path`, standard input a pipe (for its secrets); and the log's length before it.
    #[allow(clippy::too_many_arguments)]
    fn node_command(
        &self,
        dir: &Path,
        red: &Path,
        node: &Path,
        modules: Option<&Path>,
        memory_mb: u32,
        env: &std::collections::BTreeMap<String, String>,
        log_path: &Path,
    ) -> Result<(Command, u64), DriverError> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .map_err(DriverError::io(format!(
                "cannot open {}",
                log_path.display()
            )))?;
        let offset = out.metadata().map(|m| m.len()).unwrap_or(0);
        let err = out.try_clone().map_err(DriverError::io("cannot dup"))?;
        // A private temporary directory: the sandbox leaves the system's /tmp out.
        let tmp = dir.join(".tmp");
        std::fs::create_dir_all(&tmp)
            .map_err(DriverError::io(format!("cannot create {}", tmp.display())))?;
        let mut cmd = match &self.sandbox {
            Some((launcher, _)) => {
                let rules = self.sandbox_rules(dir, red, node, modules);
                let mut c = Command::new(&launcher.exe);
                c.arg("sandbox-exec").args(rules.to_args());
                if launcher.required {
                    c.arg("--require");
                }
                c.arg("--").arg(node);
                c
            }
            None => Command::new(node),
        };
        cmd.arg(format!(
            "--max-old-space-size={}",
            (memory_mb * 3 / 4).max(64)
        ))
        .arg(red)
        .args(["--settings"])
        .arg(dir.join("settings.js"))
        .args(["--userDir"])
        .arg(dir)
        // Only what Node.js needs of Tandem's own environment (which may hold a database
        // URL with its password), then the instance's variables (checked by the control
        // plane). `NODE_EXTRA_CA_CERTS` is the machine's trust (a path, no secret): flows'
        // and the palette's HTTPS calls need it where a proxy re-signs TLS.
        .env_clear()
        .envs(
            [
                "PATH",
                "LANG",
                "LC_ALL",
                "LC_CTYPE",
                "TZ",
                "NODE_EXTRA_CA_CERTS",
            ]
            .into_iter()
            .filter_map(|k| std::env::var_os(k).map(|v| (k, v))),
        )
        .env("HOME", dir)
        .env("TMPDIR", &tmp)
        .envs(env)
        .env("NODE_RED_DISABLE_TELEMETRY", "true")
        .current_dir(dir)
        // The secrets: written once to this pipe, read by settings.js.
        .stdin(Stdio::piped())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .process_group(0);
        Ok((cmd, offset))
    }

    /// What a replica may touch: its userDir read-write; the stack, the Node.js runtime, its
    /// module set and the system read-only; nothing else (not the rest of the data directory).
    fn sandbox_rules(
        &self,
        user_dir: &Path,
        red: &Path,
        node: &Path,
        modules: Option<&Path>,
    ) -> crate::sandbox::Rules {
        let mut rules = crate::sandbox::Rules::system();
        rules.read_write.push(user_dir.to_path_buf());
        rules.read_only.extend(modules.map(Path::to_path_buf));
        // `<stacks>/node-red-<v>/node_modules/node-red/red.js` → `<stacks>/node-red-<v>`.
        if let Some(stack) = red.ancestors().nth(3) {
            rules.read_only.push(stack.to_path_buf());
        }
        if let Some(runtime) = node_home(node) {
            rules.read_only.push(runtime);
        }
        rules
    }
}

impl Driver for LocalDriver {
    type Instance = LocalInstance;

    fn open(
        &self,
        name: &str,
        log: Arc<InstanceLog>,
        events: mpsc::UnboundedSender<Event>,
    ) -> LocalInstance {
        LocalInstance {
            driver: Arc::new(self.clone()),
            name: name.to_owned(),
            log,
            events,
            replicas: Mutex::new(HashMap::new()),
        }
    }
}

/// One instance's replicas on this machine.
#[derive(Debug)]
pub struct LocalInstance {
    driver: Arc<LocalDriver>,
    name: String,
    log: Arc<InstanceLog>,
    events: mpsc::UnboundedSender<Event>,
    replicas: Mutex<HashMap<u32, Replica>>,
}

/// A replica process this driver started or adopted.
#[derive(Debug, Clone)]
struct Replica {
    /// The run it was started or adopted for.
    run: u64,
    pid: u32,
    addr: SocketAddr,
    secret: String,
    exit: watch::Receiver<Option<ExitReason>>,
    /// Stopped or fenced on purpose: its watcher reports no exit.
    ending: Arc<AtomicBool>,
    /// It ended and its whole process group is gone: its pid may belong to another process
    /// now, so nothing signals it any more.
    reaped: Arc<AtomicBool>,
}

impl LocalInstance {
    fn id(&self, slot: u32) -> ReplicaId {
        ReplicaId::new(&self.name, slot)
    }

    fn replica(&self, slot: u32) -> Result<Replica, DriverError> {
        self.replicas
            .lock()
            .ok()
            .and_then(|m| m.get(&slot).cloned())
            .ok_or_else(|| DriverError::NotRunning(self.id(slot)))
    }

    /// Takes over the replica recorded in `dir` if it still runs and answers with the secret;
    /// otherwise kills whatever of it is left.
    async fn adopt(
        &self,
        id: &ReplicaId,
        run: u64,
        spec: &ProcessSpec,
        flows: &Flows,
        dir: &Path,
    ) -> Option<(Replica, Running)> {
        let text = tokio::fs::read_to_string(dir.join("replica.json"))
            .await
            .ok()?;
        let record: Record = serde_json::from_str(&text).ok()?;
        if !process::is_replica_process(record.pid, dir).await {
            return None;
        }
        let addr = SocketAddr::from(([127, 0, 0, 1], record.port));
        let Ok(state) = admin::flow_state(addr, &spec.admin_secret, Duration::from_secs(2)).await
        else {
            tracing::info!(replica = %id, pid = record.pid, "a replica from before does not answer with its secret; stopping it");
            process::signal_group(record.pid, Signal::KILL);
            return None;
        };
        let sandboxed = self.driver.sandbox.is_some();
        let written = tokio::fs::read_to_string(dir.join(".tandem-flows"))
            .await
            .ok()
            .map(|t| t.trim().to_owned());
        let stale = record.spec != spec_hash(spec, id.slot, sandboxed)
            && record.spec != legacy_spec_hash(spec, id.slot, &flows.value, sandboxed);
        let replica = Replica {
            run,
            pid: record.pid,
            addr,
            secret: spec.admin_secret.clone(),
            exit: process::watch_pid(record.pid),
            ending: Arc::default(),
            reaped: Arc::default(),
        };
        let running = Running {
            addr,
            pid: Some(record.pid),
            adopted: true,
            flows: if state == "start" {
                FlowState::Started
            } else {
                FlowState::Stopped
            },
            flows_rev: written,
            stale,
            // Started by whichever Tandem ran before; only a current spec says how.
            isolation: if stale {
                Isolation::None
            } else {
                self.driver.isolation()
            },
            start: None,
        };
        Some((replica, running))
    }

    /// Writes the replica's files, spawns Node-RED and hands it its secrets.
    async fn spawn(
        &self,
        id: &ReplicaId,
        spec: &ProcessSpec,
        flows: &Flows,
        dir: &Path,
        log_path: &Path,
    ) -> Result<(tokio::process::Child, u16, u64), DriverError> {
        let red = self
            .driver
            .install_stack(&spec.nodered_version, &self.log)
            .await?;
        let node = match &spec.node_version {
            Some(v) => self.driver.install_runtime(v, &self.log).await?,
            None => PathBuf::from("node"),
        };
        // Bound and released: Node-RED fails clearly if it is taken since.
        let port =
            tandem_proxy::net::free_port().map_err(DriverError::io("cannot find a free port"))?;
        let write = |name: &str, text: String| {
            let path = dir.join(name);
            async move {
                tokio::fs::write(&path, text)
                    .await
                    .map_err(DriverError::io(format!("cannot write {}", path.display())))
            }
        };
        let modules = self.driver.modules_dir(spec);
        install::link_modules(dir, spec, modules.as_deref()).await?;
        write(
            "settings.js",
            settings_js(spec, id, Placement::Process { port }, dir, &self.driver.npm),
        )
        .await?;
        // With Tandem's store, the replica reads its flows from there. Otherwise the flows are
        // written when they differ from the ones last written, so flows deployed from the
        // editor survive restarts until the instance's flows are changed through Tandem.
        let written = tokio::fs::read_to_string(dir.join(".tandem-flows"))
            .await
            .unwrap_or_default();
        if spec.storage.is_none()
            && (written.trim() != flows.rev || !dir.join("flows.json").exists())
        {
            write("flows.json", flows.value.to_string()).await?;
            if flows.credentials.as_object().is_some_and(|c| !c.is_empty()) {
                write("flows_cred.json", flows.credentials.to_string()).await?;
            }
        }
        write(".tandem-flows", flows.rev.clone()).await?;
        let state = if spec.start_stopped { "stop" } else { "start" };
        write(
            ".config.runtime.json",
            serde_json::json!({ "runtimeFlowState": state }).to_string(),
        )
        .await?;
        if self.driver.unconfined(id)? {
            self.log.note(
                "warn",
                format!("replica {id} runs without a sandbox: this kernel has no Landlock, so its flows can read whatever Tandem's OS user can"),
            );
        }
        let (mut cmd, offset) = self.driver.node_command(
            dir,
            &red,
            &node,
            modules.as_deref(),
            spec.memory_mb,
            &spec.env,
            log_path,
        )?;
        // The persisted runtime state alone did not always hold on a fresh userDir (flows were
        // started in about one boot in five); safe mode is Node-RED's own "load, do not start",
        // left by `POST /admin/flows/state {"state":"start"}`.
        cmd.args(spec.start_stopped.then_some("--safe"));
        let mut child = cmd.spawn().map_err(DriverError::io("cannot start node"))?;
        if let Some(mut stdin) = child.stdin.take() {
            let secrets = serde_json::json!({
                "admin": spec.admin_secret,
                "credentials": spec.credential_secret,
                "storage": spec.storage.as_ref().map(|s| &s.token),
            });
            // A process that died at once shows in its exit, with its output.
            let _ = stdin.write_all(format!("{secrets}\n").as_bytes()).await;
        }
        Ok((child, port, offset))
    }

    fn send(&self, slot: u32, run: u64, kind: EventKind) {
        let _ = self.events.send(Event { slot, run, kind });
    }
}

impl InstanceDriver for LocalInstance {
    async fn prepare(&self, spec: &ProcessSpec) -> Result<Prepared, DriverError> {
        self.driver
            .install_stack(&spec.nodered_version, &self.log)
            .await?;
        if let Some(v) = &spec.node_version {
            self.driver.install_runtime(v, &self.log).await?;
        }
        let modules =
            install::install_modules(&self.driver.stacks_dir, spec, &self.driver.npm, &self.log)
                .await?;
        Ok(Prepared { modules })
    }

    async fn start(
        &self,
        slot: u32,
        run: u64,
        spec: &ProcessSpec,
        flows: &Flows,
    ) -> Result<(), DriverError> {
        let id = self.id(slot);
        let dir = self.driver.user_dir(&id);
        let log_path = self.driver.log_file(&id);
        // The userDir may be a link to a warm runtime's directory (made at its assignment).
        let linked = tokio::fs::symlink_metadata(&dir)
            .await
            .is_ok_and(|m| m.file_type().is_symlink());
        for d in [(!linked).then_some(dir.as_path()), log_path.parent()]
            .into_iter()
            .flatten()
        {
            tokio::fs::create_dir_all(d)
                .await
                .map_err(DriverError::io(format!("cannot create {}", d.display())))?;
        }
        if let Some((replica, running)) = self.adopt(&id, run, spec, flows, &dir).await {
            // Replay the end of the file (its last 64 KiB, from a line start) so the log is not
            // empty after Tandem's restart.
            let from = tail::replay_start(&log_path, 64 << 10).await;
            let seen = Arc::new(tail::Seen::default());
            let (src, log) = (id.to_string(), self.log.clone());
            tail::tail(
                log_path,
                from,
                src,
                log,
                replica.exit.clone(),
                self.driver.max_log_bytes,
                seen,
            )
            .await;
            let pid = replica.pid;
            if running.stale {
                self.log.note("info", format!("adopted replica {id} (pid {pid}); it was started for another spec or by an older Tandem and will be replaced"));
            } else {
                self.log
                    .note("info", format!("adopted replica {id} (pid {pid})"));
            }
            tracing::info!(replica = %id, addr = %replica.addr, pid, stale = running.stale, "adopted a running replica");
            if let Ok(mut m) = self.replicas.lock() {
                m.insert(slot, replica.clone());
            }
            self.send(slot, run, EventKind::Ready(running.clone()));
            tokio::spawn(watch_replica(
                self.watcher(slot, run, replica),
                None,
                running,
            ));
            return Ok(());
        }

        // A warm runtime when the pool has one for this spec; the pool refills either way.
        let cold = match (&self.driver.warm, pool::servable(spec)) {
            (None, _) => None,
            (Some(_), Err(why)) => Some(why),
            (Some(p), Ok(key)) => {
                let taken = p.take(&key);
                p.refill(&self.driver, &key);
                match taken {
                    None => Some("no warm runtime was ready".to_owned()),
                    Some(warm) => match self.assign(slot, run, spec, flows, warm).await {
                        Ok(()) => return Ok(()),
                        Err(e) => Some(format!("the warm runtime failed ({e})")),
                    },
                }
            }
        };
        if let Some(why) = &cold {
            self.log
                .note("info", format!("replica {id} starts cold: {why}"));
        }
        // A link to a warm runtime's directory that served this slot before: a cold start gets
        // a directory of its own again.
        self.unlink_warm_dir(&dir).await;
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(DriverError::io(format!("cannot create {}", dir.display())))?;
        let hash = spec_hash(spec, slot, self.driver.sandbox.is_some());
        let (child, port, offset) = self.spawn(&id, spec, flows, &dir, &log_path).await?;
        let pid = child.id().unwrap_or_default();
        let exit = process::watch_child(child);
        let seen = Arc::new(tail::Seen::default());
        tail::tail(
            log_path,
            offset,
            id.to_string(),
            self.log.clone(),
            exit.clone(),
            self.driver.max_log_bytes,
            seen.clone(),
        )
        .await;
        self.log
            .note("info", format!("starting replica {id} (pid {pid})"));
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let replica = Replica {
            run,
            pid,
            addr,
            secret: spec.admin_secret.clone(),
            exit,
            ending: Arc::default(),
            reaped: Arc::default(),
        };
        if let Ok(mut m) = self.replicas.lock() {
            m.insert(slot, replica.clone());
        }
        let record = Record {
            pid,
            port,
            spec: hash,
        };
        let boot = Boot {
            start_stopped: spec.start_stopped,
            seen,
            deadline: Instant::now() + self.driver.ready_timeout,
            record_at: dir.join("replica.json"),
            record,
        };
        let running = Running {
            addr,
            pid: Some(pid),
            adopted: false,
            flows: if spec.start_stopped {
                FlowState::Stopped
            } else {
                FlowState::Started
            },
            flows_rev: Some(flows.rev.clone()),
            stale: false,
            isolation: self.driver.isolation(),
            start: Some(Start::Cold { reason: cold }),
        };
        tokio::spawn(watch_replica(
            self.watcher(slot, run, replica),
            Some(boot),
            running,
        ));
        Ok(())
    }

    async fn stop(&self, slot: u32) -> Result<(), DriverError> {
        let Ok(mut r) = self.replica(slot) else {
            return Ok(());
        };
        if r.reaped.load(Ordering::Relaxed) {
            return self.gone(slot, r).await;
        }
        r.ending.store(true, Ordering::Relaxed);
        process::signal_group(r.pid, Signal::TERM);
        if tokio::time::timeout(self.driver.stop_grace, process::exited(&mut r.exit))
            .await
            .is_err()
        {
            tracing::warn!(replica = %self.id(slot), grace = ?self.driver.stop_grace, "replica did not stop in time; killing it");
            process::signal_group(r.pid, Signal::KILL);
        }
        self.gone(slot, r).await
    }

    async fn fence(&self, slot: u32) -> Result<(), DriverError> {
        let Ok(r) = self.replica(slot) else {
            return Ok(());
        };
        r.ending.store(true, Ordering::Relaxed);
        // SIGKILL ends a process even while it is stopped (SIGSTOP) or blocked.
        if !r.reaped.load(Ordering::Relaxed) {
            process::signal_group(r.pid, Signal::KILL);
        }
        let run = r.run;
        self.gone(slot, r).await?;
        self.send(slot, run, EventKind::Fenced);
        Ok(())
    }

    async fn check(&self, slot: u32) -> Result<(), DriverError> {
        let r = self.replica(slot)?;
        admin::check(
            &self.id(slot),
            r.addr,
            &r.secret,
            self.driver.liveness.hang_after,
        )
        .await
    }

    async fn deploy(&self, slot: u32, flows: &Flows, gate: &Gate) -> Result<(), DriverError> {
        let r = self.replica(slot)?;
        let id = self.id(slot);
        // From here on, an error line of one of the flows' nodes fails the gate.
        let lines = self.log.subscribe();
        admin::push_flows(&id, r.addr, &r.secret, flows).await?;
        let dir = self.driver.user_dir(&id);
        let _ = tokio::fs::write(dir.join(".tandem-flows"), &flows.rev).await;
        admin::gate(&id, r.addr, &r.secret, lines, flows, gate).await
    }

    async fn set_flows(&self, slot: u32, state: FlowState) -> Result<(), DriverError> {
        let r = self.replica(slot)?;
        admin::set_flows(&self.id(slot), r.addr, &r.secret, state).await
    }

    async fn remove(&self) -> Result<(), DriverError> {
        let dir = self.driver.instance_dir(&self.name);
        // The warm runtimes' directories its replicas' userDirs link to go with it.
        if let Ok(mut entries) = tokio::fs::read_dir(&dir).await {
            while let Ok(Some(entry)) = entries.next_entry().await {
                self.unlink_warm_dir(&entry.path()).await;
            }
        }
        match tokio::fs::remove_dir_all(&dir).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(DriverError::Io {
                context: format!("cannot remove {}", dir.display()),
                source: e,
            }),
            _ => Ok(()),
        }
    }
}

impl LocalInstance {
    /// Removes `path` when it is a link to a warm runtime's directory, and that directory.
    async fn unlink_warm_dir(&self, path: &Path) {
        let Ok(target) = tokio::fs::read_link(path).await else {
            return;
        };
        let _ = tokio::fs::remove_file(path).await;
        if let Some(pool) = &self.driver.warm {
            if target.starts_with(pool.dir()) {
                let _ = tokio::fs::remove_dir_all(&target).await;
            }
        }
    }

    /// Gives `warm` to replica `slot` (see [`pool`]): its directory becomes the replica's
    /// userDir and its output the replica's log, it gets the instance's secrets, storage and
    /// variables, then loads and starts the flows from the store. On error the runtime is
    /// stopped and the replica's files are as a cold start expects them.
    async fn assign(
        &self,
        slot: u32,
        run: u64,
        spec: &ProcessSpec,
        flows: &Flows,
        mut warm: pool::Warm,
    ) -> Result<(), DriverError> {
        let id = self.id(slot);
        let dir = self.driver.user_dir(&id);
        let log_path = self.driver.log_file(&id);
        let io = |what: &str, p: &Path| DriverError::io(format!("cannot {what} {}", p.display()));
        // The slot's directory from before: a link to an earlier runtime, or a cold start's
        // (the flows are in the store; what is left is the editor's per-user settings).
        self.unlink_warm_dir(&dir).await;
        if tokio::fs::symlink_metadata(&dir).await.is_ok() {
            if let Err(e) = tokio::fs::remove_dir_all(&dir).await {
                warm.discard();
                return Err(io("remove", &dir)(e));
            }
        }
        let linked = async {
            tokio::fs::symlink(&warm.dir, &dir)
                .await
                .map_err(io("link", &dir))?;
            // The runtime's output becomes the replica's log, the earlier one its rotation.
            if tokio::fs::metadata(&log_path).await.is_ok() {
                let old = log_path.with_extension("log.1");
                tokio::fs::rename(&log_path, &old)
                    .await
                    .map_err(io("rotate", &log_path))?;
            }
            tokio::fs::rename(&warm.log, &log_path)
                .await
                .map_err(io("move", &warm.log))?;
            tokio::fs::write(dir.join(".tandem-flows"), &flows.rev)
                .await
                .map_err(io("write", &dir))?;
            // Given out: a later Tandem does not stop it as a leftover of the pool.
            let _ = tokio::fs::remove_file(warm.dir.with_extension("pid")).await;
            Ok::<u64, DriverError>(
                tokio::fs::metadata(&log_path)
                    .await
                    .map(|m| m.len())
                    .unwrap_or(0),
            )
        };
        let offset = match linked.await {
            Ok(o) => o,
            Err(e) => {
                let _ = tokio::fs::remove_file(&dir).await;
                warm.discard();
                return Err(e);
            }
        };
        let storage = spec.storage.as_ref().map(
            |s| serde_json::json!({ "url": s.url, "token": s.token, "replica": id.to_string() }),
        );
        let message = serde_json::json!({
            "secrets": { "admin": spec.admin_secret, "credentials": spec.credential_secret },
            "storage": storage,
            "env": spec.env,
        });
        let written = warm
            .stdin
            .write_all(
                format!(
                    "{message}
"
                )
                .as_bytes(),
            )
            .await;
        let _ = warm.stdin.shutdown().await;
        let seen = Arc::new(tail::Seen::default());
        let fail = |warm: pool::Warm, why: String| {
            warm.discard();
            DriverError::Warm(why)
        };
        if let Err(e) = written {
            let _ = tokio::fs::remove_file(&dir).await;
            return Err(fail(warm, format!("cannot write its instance: {e}")));
        }
        // The runtime reads its instance as soon as it can; until then its admin API refuses
        // the instance's secret.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match admin::reload(warm.addr(), &spec.admin_secret, Duration::from_secs(5)).await {
                Ok(s) if (200..300).contains(&s) => break,
                Ok(401) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                other => {
                    let _ = tokio::fs::remove_file(&dir).await;
                    return Err(fail(warm, format!("loading the flows: {other:?}")));
                }
            }
        }
        tail::tail(
            log_path,
            offset,
            id.to_string(),
            self.log.clone(),
            warm.exit.clone(),
            self.driver.max_log_bytes,
            seen.clone(),
        )
        .await;
        let (pid, port) = (warm.pid, warm.port);
        self.log.note(
            "info",
            format!("starting replica {id} on a warm runtime (pid {pid})"),
        );
        let addr = warm.addr();
        let replica = Replica {
            run,
            pid,
            addr,
            secret: spec.admin_secret.clone(),
            exit: warm.exit.clone(),
            ending: Arc::default(),
            reaped: Arc::default(),
        };
        if let Ok(mut m) = self.replicas.lock() {
            m.insert(slot, replica.clone());
        }
        let boot = Boot {
            start_stopped: false,
            seen,
            deadline: Instant::now() + self.driver.ready_timeout,
            record_at: dir.join("replica.json"),
            record: Record {
                pid,
                port,
                spec: spec_hash(spec, slot, self.driver.sandbox.is_some()),
            },
        };
        let running = Running {
            addr,
            pid: Some(pid),
            adopted: false,
            flows: FlowState::Started,
            flows_rev: Some(flows.rev.clone()),
            stale: false,
            isolation: self.driver.isolation(),
            start: Some(Start::Warm),
        };
        tokio::spawn(watch_replica(
            self.watcher(slot, run, replica),
            Some(boot),
            running,
        ));
        Ok(())
    }

    fn watcher(&self, slot: u32, run: u64, replica: Replica) -> Watcher {
        Watcher {
            id: self.id(slot),
            slot,
            run,
            replica,
            liveness: self.driver.liveness,
            events: self.events.clone(),
        }
    }

    /// Waits until the replica's process, and every process of its group, has ended; then it
    /// holds that it serves and runs nothing, and it is forgotten (its record goes too: nothing
    /// adopts it). Until then it stays known, so a stop or fence tried again signals it again.
    async fn gone(&self, slot: u32, r: Replica) -> Result<(), DriverError> {
        let id = self.id(slot);
        if !r.reaped.load(Ordering::Relaxed) {
            process::reap_group(&id, r.pid, r.exit.clone()).await?;
            r.reaped.store(true, Ordering::Relaxed);
        }
        if let Ok(mut m) = self.replicas.lock() {
            if m.get(&slot).is_some_and(|x| x.pid == r.pid) {
                m.remove(&slot);
            }
        }
        let _ = tokio::fs::remove_file(self.driver.user_dir(&id).join("replica.json")).await;
        Ok(())
    }
}

/// The installation a `node` binary belongs to (`<prefix>/bin/node` → `<prefix>`), found on
/// `PATH` when it is a bare name: the sandbox must let Node.js read it.
fn node_home(node: &Path) -> Option<PathBuf> {
    let binary = if node.components().count() == 1 {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(node))
                .find(|p| p.is_file())
        })?
    } else {
        node.to_path_buf()
    };
    let real = std::fs::canonicalize(binary).ok()?;
    real.parent()?.parent().map(Path::to_path_buf)
}
