//! Warm runtimes (issue 17): Node-RED processes booted ahead of need, each sandboxed to a
//! directory of its own under `<data dir>/pool/`, with no instance and no flows, waiting to be
//! given one.
//!
//! A warm runtime boots exactly as a replica does (the same command, sandbox, environment and
//! `settings.js`), except that its `settings.js` takes the instance later
//! ([`super::Placement::Pooled`]): until then its admin API takes no token, it has no
//! credential secret and its storage has no flows. Giving it an instance
//! ([`super::LocalInstance::start`]):
//! 1. makes its directory the replica's userDir (`instances/<instance>/r<slot>` becomes a link
//!    to it: the sandbox was drawn around that directory before Node-RED loaded, and cannot be
//!    moved) and its output file the replica's log;
//! 2. writes the instance's secrets, storage and variables to its standard input, once;
//! 3. asks its admin API, with the instance's secret, to load the flows from the instance's
//!    store (a `reload` deploy), which starts them.
//!
//! Starting flows on a loaded runtime takes tens of milliseconds where a new process takes a
//! second or more (`../shared/notes/node-red-runtime.md`). Only what a runtime booted without
//! an instance can serve comes from the pool ([`servable`]): no settings of the instance's own,
//! no modules, flows in Tandem's store, flows to start (not a standby). Everything else starts
//! cold, and the replica's status says why.
//!
//! The pool keeps `size` runtimes ready per [`PoolKey`] once a replica of that key has started
//! (a stack in use), refilled in the background after each one it gives away. Runtimes left by
//! an earlier Tandem are stopped when the pool opens.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::process::Signal;
use tokio::process::ChildStdin;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{process, settings_js, LocalDriver, Placement};
use crate::driver::DriverError;
use crate::logs::InstanceLog;
use crate::replica::{ExitReason, ReplicaId};
use crate::spec::{ProcessSpec, Storage};

/// What a warm runtime was booted for: replicas with the same key can take it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct PoolKey {
    nodered_version: String,
    node_version: Option<String>,
    memory_mb: u32,
    /// HA replicas run without the editor, the others with it and the palette.
    ha: bool,
}

/// The pool's key for `spec`, or why a warm runtime cannot serve it.
pub(crate) fn servable(spec: &ProcessSpec) -> Result<PoolKey, String> {
    if spec.storage.is_none() {
        return Err("its flows are not in Tandem's store".into());
    }
    if spec.start_stopped {
        return Err("a standby boots with its flows stopped".into());
    }
    if !spec.modules.is_empty() {
        return Err("it has modules of its own".into());
    }
    if spec.settings.as_object().is_some_and(|s| !s.is_empty()) {
        return Err("it has settings of its own".into());
    }
    Ok(PoolKey {
        nodered_version: spec.nodered_version.clone(),
        node_version: spec.node_version.clone(),
        memory_mb: spec.memory_mb,
        ha: spec.ha,
    })
}

/// A warm runtime, ready to be given an instance.
#[derive(Debug)]
pub(crate) struct Warm {
    pub pid: u32,
    pub port: u16,
    /// Its userDir.
    pub dir: PathBuf,
    /// Its output file.
    pub log: PathBuf,
    /// Where its instance is written, once.
    pub stdin: ChildStdin,
    pub exit: watch::Receiver<Option<ExitReason>>,
}

impl Warm {
    pub(crate) fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Stops it (a runtime the pool no longer needs, or one that failed its assignment).
    pub(crate) fn discard(self) {
        process::signal_group(self.pid, Signal::KILL);
        let dir = self.dir;
        let log = self.log;
        tokio::spawn(async move {
            let _ = tokio::fs::remove_file(dir.with_extension("pid")).await;
            let _ = tokio::fs::remove_dir_all(&dir).await;
            let _ = tokio::fs::remove_file(&log).await;
        });
    }
}

/// The pool of one driver.
#[derive(Debug)]
pub(crate) struct WarmPool {
    /// Runtimes kept ready per key.
    size: usize,
    /// `<data dir>/pool`.
    dir: PathBuf,
    ready: Mutex<HashMap<PoolKey, Vec<Warm>>>,
    /// Runtimes booting, per key.
    booting: Mutex<HashMap<PoolKey, usize>>,
    next: AtomicU64,
}

impl WarmPool {
    /// A pool of `size` runtimes per key under `dir`; stops what an earlier Tandem left there.
    pub(crate) fn open(dir: PathBuf, size: usize) -> Self {
        clear_leftovers(&dir);
        Self {
            size,
            dir,
            ready: Mutex::default(),
            booting: Mutex::default(),
            next: AtomicU64::new(1),
        }
    }

    /// Stops every runtime not given out (ready or booting) and removes its files.
    pub(crate) fn close(&self) {
        self.ready.lock().unwrap_or_else(|e| e.into_inner()).clear();
        clear_leftovers(&self.dir);
    }

    /// Where the pool's runtimes live: links of replicas' userDirs into it are theirs.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// A ready runtime for `key`, if there is one still running.
    pub(crate) fn take(&self, key: &PoolKey) -> Option<Warm> {
        let mut ready = self.ready.lock().unwrap_or_else(|e| e.into_inner());
        let list = ready.get_mut(key)?;
        while let Some(w) = list.pop() {
            if w.exit.borrow().is_none() {
                return Some(w);
            }
            w.discard();
        }
        None
    }

    /// Ready runtimes for `key`.
    fn ready_count(&self, key: &PoolKey) -> usize {
        let ready = self.ready.lock().unwrap_or_else(|e| e.into_inner());
        ready.get(key).map_or(0, Vec::len)
    }

    /// Boots runtimes for `key` in the background until `size` are ready or booting. Never
    /// waits: replicas starting meanwhile start cold.
    pub(crate) fn refill(self: &Arc<Self>, driver: &LocalDriver, key: &PoolKey) {
        let missing = {
            let ready = self.ready_count(key);
            let mut booting = self.booting.lock().unwrap_or_else(|e| e.into_inner());
            let b = booting.entry(key.clone()).or_default();
            let missing = self.size.saturating_sub(ready + *b);
            *b += missing;
            missing
        };
        for _ in 0..missing {
            let (pool, driver, key) = (self.clone(), driver.clone(), key.clone());
            tokio::spawn(async move {
                let n = pool.next.fetch_add(1, Ordering::Relaxed);
                let booted = boot(&driver, &pool.dir, &key, n).await;
                {
                    let mut booting = pool.booting.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(b) = booting.get_mut(&key) {
                        *b = b.saturating_sub(1);
                    }
                }
                match booted {
                    Ok(warm) => {
                        tracing::info!(pid = warm.pid, port = warm.port, version = %key.nodered_version, ha = key.ha, "a warm runtime is ready");
                        pool.ready
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .entry(key)
                            .or_default()
                            .push(warm);
                    }
                    Err(error) => {
                        tracing::warn!(%error, version = %key.nodered_version, "a warm runtime did not boot; replicas start cold meanwhile")
                    }
                }
            });
        }
    }
}

/// What a warm runtime's `settings.js` is made from: the key's stack, no settings, no
/// secrets, a store to be given later.
fn pool_spec(key: &PoolKey) -> ProcessSpec {
    ProcessSpec {
        instance: "pool".into(),
        nodered_version: key.nodered_version.clone(),
        node_version: key.node_version.clone(),
        memory_mb: key.memory_mb,
        ha: key.ha,
        start_stopped: false,
        admin_secret: String::new(),
        credential_secret: String::new(),
        settings: serde_json::json!({}),
        env: Default::default(),
        modules: Default::default(),
        storage: Some(Storage {
            url: String::new(),
            token: String::new(),
        }),
    }
}

/// Boots warm runtime `n` for `key` and waits until it serves (its admin API's sign-in page,
/// which needs no token), within the driver's ready timeout.
async fn boot(
    driver: &LocalDriver,
    pool_dir: &Path,
    key: &PoolKey,
    n: u64,
) -> Result<Warm, DriverError> {
    let log = InstanceLog::new(64);
    let red = driver.install_stack(&key.nodered_version, &log).await?;
    let node = match &key.node_version {
        Some(v) => driver.install_runtime(v, &log).await?,
        None => PathBuf::from("node"),
    };
    let label = ReplicaId::new("pool", u32::try_from(n).unwrap_or(u32::MAX));
    if driver.unconfined(&label)? {
        tracing::warn!("warm runtimes run without a sandbox: this kernel has no Landlock");
    }
    let dir = pool_dir.join(format!("rt-{n}"));
    let log_path = pool_dir.join(format!("rt-{n}.log"));
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(DriverError::io(format!("cannot create {}", dir.display())))?;
    let port =
        tandem_proxy::net::free_port().map_err(DriverError::io("cannot find a free port"))?;
    let spec = pool_spec(key);
    let settings = settings_js(&spec, &label, Placement::Pooled { port }, &dir, &driver.npm);
    tokio::fs::write(dir.join("settings.js"), settings)
        .await
        .map_err(DriverError::io("cannot write a warm runtime's settings.js"))?;
    let (mut cmd, _) =
        driver.node_command(&dir, &red, &node, None, key.memory_mb, &spec.env, &log_path)?;
    let mut child = cmd.spawn().map_err(DriverError::io("cannot start node"))?;
    let pid = child.id().unwrap_or_default();
    let stdin = child
        .stdin
        .take()
        .ok_or_else(|| DriverError::Warm("no standard input".into()))?;
    let exit = process::watch_child(child);
    // Recorded, so that a Tandem started after this one stops it if it is never given out.
    let _ = tokio::fs::write(pool_dir.join(format!("rt-{n}.pid")), pid.to_string()).await;
    let warm = Warm {
        pid,
        port,
        dir,
        log: log_path,
        stdin,
        exit,
    };
    let deadline = Instant::now() + driver.ready_timeout;
    loop {
        let ended = warm.exit.borrow().clone();
        if let Some(reason) = ended {
            let e = DriverError::Warm(format!("it ended while it booted: {reason}"));
            warm.discard();
            return Err(e);
        }
        if crate::admin::serves(warm.addr(), Duration::from_millis(500)).await {
            return Ok(warm);
        }
        if Instant::now() >= deadline {
            warm.discard();
            return Err(DriverError::Warm(
                "it did not serve within the ready timeout".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Stops the runtimes an earlier Tandem booted and never gave out, and removes their files.
/// Runtimes given to instances are not in the pool any more (their record is gone).
fn clear_leftovers(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(stem) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".pid"))
        else {
            continue;
        };
        let runtime = dir.join(stem);
        if let Some(pid) = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok())
        {
            let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok();
            if cwd.is_some() && cwd == std::fs::canonicalize(&runtime).ok() {
                process::signal_group(pid, Signal::KILL);
            }
        }
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_dir_all(&runtime);
        let _ = std::fs::remove_file(dir.join(format!("{stem}.log")));
    }
}
