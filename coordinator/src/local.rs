//! The local driver: Node-RED replicas as processes on this machine.
//!
//! Layout under the data directory:
//! - `stacks/node-red-<version>/`: `npm install node-red@<version>`, installed on first use.
//! - `instances/<instance>/r<slot>/`: the replica's userDir, with the generated `settings.js`,
//!   `flows.json` and `replica.json` (pid, port and spec hash, for adoption).
//! - `instances/<instance>/logs/r<slot>.log`: the replica's stdout and stderr, appended; rotated
//!   to `r<slot>.log.1` past [`LocalDriver::max_log_bytes`].
//!
//! Node-RED writes its output to that file, not to a pipe, so it keeps running when Tandem
//! restarts; Tandem tails the file into the instance's log. On start, a replica still running
//! from before with the same spec (same pid, its userDir on the command line, same spec hash,
//! answering with the secret) is adopted instead of started again.
//!
//! Each replica listens on 127.0.0.1 only, serves flows at `/` and the editor and admin API at
//! `/admin`, and accepts admin calls only with its secret in `x-tandem-token`. The secrets reach
//! the process through its environment, never a file. It runs in its own process group so a
//! stop reaches everything it started.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::sync::{watch, Mutex};

use crate::driver::{Driver, DriverError, Isolation, ReplicaSpec, Running};
use crate::logs::InstanceLog;

/// Longest an `npm install` may take.
const NPM_TIMEOUT: Duration = Duration::from_secs(600);

/// Header that carries the admin secret to a replica.
pub const TOKEN_HEADER: &str = "x-tandem-token";

/// A replica process: where it listens, its secret, and how it ended (set once it has).
#[derive(Debug, Clone)]
struct Watched {
    pid: u32,
    addr: SocketAddr,
    secret: String,
    exit: watch::Receiver<Option<String>>,
}

/// Owns the child until it exits and says how it ended.
fn watch_child(mut child: Child) -> watch::Receiver<Option<String>> {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let reason = match child.wait().await {
            Ok(status) => status.to_string(),
            Err(e) => format!("cannot wait for the process: {e}"),
        };
        let _ = tx.send(Some(reason));
    });
    rx
}

/// Watches a process that is not our child (adopted): it has ended when `/proc/<pid>` is gone
/// or a zombie.
fn watch_pid(pid: u32) -> watch::Receiver<Option<String>> {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        while process_alive(pid).await {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let _ = tx.send(Some(format!("process {pid} ended")));
    });
    rx
}

async fn process_alive(pid: u32) -> bool {
    match tokio::fs::read_to_string(format!("/proc/{pid}/stat")).await {
        // The state is the field after the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Whether `pid` is the Node-RED of the replica in `user_dir` (and not a reused pid): replicas
/// run with their userDir as working directory. (Node-RED rewrites its command line, so that
/// cannot tell.)
async fn is_replica_process(pid: u32, user_dir: &Path) -> bool {
    let Ok(cwd) = tokio::fs::read_link(format!("/proc/{pid}/cwd")).await else {
        return false;
    };
    let same = match tokio::fs::canonicalize(user_dir).await {
        Ok(dir) => cwd == dir,
        Err(_) => false,
    };
    same && process_alive(pid).await
}

async fn exited(mut rx: watch::Receiver<Option<String>>) -> String {
    exited_ref(&mut rx).await
}

/// Kills a process group when dropped, unless disarmed: a start that fails or is cancelled
/// leaves nothing running.
struct KillOnDrop(Option<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// What `replica.json` records about a running replica.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Record {
    pid: u32,
    port: u16,
    spec: String,
}

/// A stable hash of a spec (FNV-1a over its JSON) and of how it is launched (how secrets are
/// passed, whether it is sandboxed), to tell whether a running replica is the one asked for.
pub fn spec_hash(spec: &ReplicaSpec, sandboxed: bool) -> String {
    let text = format!(
        "{}\n{SECRETS_ON_STDIN}\nsandboxed={sandboxed}",
        serde_json::to_string(spec).unwrap_or_default()
    );
    format!("{:016x}", fnv(text.as_bytes()))
}

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
#[derive(Debug)]
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
    /// How replicas are sandboxed; `None` runs them as plain processes (the coordinator's own
    /// tests, which have no `tandem` binary).
    sandbox: Option<(SandboxLauncher, Isolation)>,
    children: Mutex<HashMap<String, Watched>>,
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
            sandbox: None,
            children: Mutex::new(HashMap::new()),
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
    /// The install's output goes to `log`.
    pub async fn install_stack(
        &self,
        version: &str,
        log: &InstanceLog,
    ) -> Result<PathBuf, DriverError> {
        let dir = self.install_package("node-red", version, log).await?;
        Ok(dir.join("node_modules/node-red/red.js"))
    }

    /// Installs the Node.js runtime `version` from npm (the `node` package, which carries the
    /// official binary) unless it is there already; returns the path of the `node` binary.
    pub async fn install_runtime(
        &self,
        version: &str,
        log: &InstanceLog,
    ) -> Result<PathBuf, DriverError> {
        let dir = self.install_package("node", version, log).await?;
        Ok(dir.join("node_modules/node/bin/node"))
    }

    /// `npm install <package>@<version>` into `<stacks_dir>/<package>-<version>`, once.
    async fn install_package(
        &self,
        package: &str,
        version: &str,
        log: &InstanceLog,
    ) -> Result<PathBuf, DriverError> {
        let fail = |output: String| DriverError::Install {
            package: package.into(),
            version: version.into(),
            output,
        };
        let valid = !version.is_empty()
            && version
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
        if !valid {
            return Err(fail("not a version".into()));
        }
        let stacks = &self.stacks_dir;
        let dir = stacks.join(format!("{package}-{version}"));
        // Installed stacks do not wait for installs of others.
        if installed_version(&dir, package).await.as_deref() == Some(version) {
            return Ok(dir);
        }
        // One install at a time in this process, whichever driver asks.
        static INSTALLS: Mutex<()> = Mutex::const_new(());
        let _guard = INSTALLS.lock().await;
        if installed_version(&dir, package).await.as_deref() == Some(version) {
            return Ok(dir);
        }
        // Install beside the target and rename it into place, so a stack directory is either
        // complete or absent, whoever else installs the same version at the same time.
        let staging = stacks.join(format!(".{package}-{version}-{}", std::process::id()));
        let _ = tokio::fs::remove_dir_all(&staging).await;
        tokio::fs::create_dir_all(&staging)
            .await
            .map_err(DriverError::io(format!(
                "cannot create {}",
                staging.display()
            )))?;
        tracing::info!(%package, %version, dir = %dir.display(), "installing with npm");
        log.note("info", format!("installing {package} {version} with npm"));
        let out = Command::new("npm")
            .args([
                "install",
                "--no-audit",
                "--no-fund",
                "--loglevel=error",
                "--prefix",
            ])
            .arg(&staging)
            .arg(format!("{package}@{version}"))
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        // A hung npm must not hold every other install forever.
        let out = match tokio::time::timeout(NPM_TIMEOUT, out).await {
            Ok(out) => out.map_err(DriverError::io("cannot run npm (is Node.js installed?)"))?,
            Err(_) => {
                let _ = tokio::fs::remove_dir_all(&staging).await;
                return Err(fail(format!("npm did not finish within {NPM_TIMEOUT:?}")));
            }
        };
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            log.push_line("npm", line);
        }
        if !out.status.success()
            || installed_version(&staging, package).await.as_deref() != Some(version)
        {
            let _ = tokio::fs::remove_dir_all(&staging).await;
            let lines: Vec<&str> = text.lines().collect();
            return Err(fail(lines[lines.len().saturating_sub(20)..].join("\n")));
        }
        if tokio::fs::rename(&staging, &dir).await.is_err() {
            // Someone else finished first; theirs is as good as ours.
            let _ = tokio::fs::remove_dir_all(&staging).await;
            if installed_version(&dir, package).await.as_deref() != Some(version) {
                return Err(fail(format!("cannot move it into {}", dir.display())));
            }
        }
        log.note("info", format!("installed {package} {version}"));
        Ok(dir)
    }

    /// The userDir of a replica.
    pub fn user_dir(&self, instance: &str, slot: u32) -> PathBuf {
        self.data_dir
            .join("instances")
            .join(instance)
            .join(format!("r{slot}"))
    }

    /// The output file of a replica.
    pub fn log_file(&self, instance: &str, slot: u32) -> PathBuf {
        self.data_dir
            .join("instances")
            .join(instance)
            .join("logs")
            .join(format!("r{slot}.log"))
    }

    /// Takes over the replica recorded in `dir` if it still runs and answers with the secret;
    /// otherwise kills whatever of it is left. Returns the replica, whether its flows run, and
    /// whether it runs another spec (stale: the coordinator replaces it when it can spare it).
    async fn adopt(
        &self,
        spec: &ReplicaSpec,
        dir: &Path,
        hash: &str,
    ) -> Option<(Watched, bool, bool)> {
        let text = tokio::fs::read_to_string(dir.join("replica.json"))
            .await
            .ok()?;
        let record: Record = serde_json::from_str(&text).ok()?;
        if !is_replica_process(record.pid, dir).await {
            return None;
        }
        let addr = SocketAddr::from(([127, 0, 0, 1], record.port));
        let state =
            match tokio::time::timeout(Duration::from_secs(2), probe(addr, &spec.admin_secret))
                .await
            {
                Ok(Ok(state)) => Some(state),
                _ => None,
            };
        let Some(state) = state else {
            tracing::info!(replica = %spec.id(), pid = record.pid, "a replica from before does not answer with its secret; stopping it");
            signal_group(record.pid, "-KILL").await;
            return None;
        };
        let stale = record.spec != hash;
        let flows_started = state == "start";
        Some((
            Watched {
                pid: record.pid,
                addr,
                secret: spec.admin_secret.clone(),
                exit: watch_pid(record.pid),
            },
            flows_started,
            stale,
        ))
    }

    /// SIGTERM (unless `grace` is zero), SIGKILL after `grace`, then wait for the end.
    async fn end(&self, id: &str, grace: Duration) -> Result<(), DriverError> {
        let Some(w) = self.children.lock().await.remove(id) else {
            return Ok(());
        };
        if grace.is_zero() {
            signal_group(w.pid, "-KILL").await;
        } else {
            signal_group(w.pid, "-TERM").await;
            if tokio::time::timeout(grace, exited(w.exit.clone()))
                .await
                .is_err()
            {
                tracing::warn!(replica = %id, ?grace, "replica did not stop in time; killing it");
                signal_group(w.pid, "-KILL").await;
            }
        }
        exited(w.exit).await;
        if let Some((instance, slot)) = id.rsplit_once("-r") {
            if let Ok(slot) = slot.parse() {
                let _ = tokio::fs::remove_file(self.user_dir(instance, slot).join("replica.json"))
                    .await;
            }
        }
        Ok(())
    }

    /// What a replica may touch: its userDir read-write; the stack, the Node.js runtime and the
    /// system read-only; nothing else (not the rest of the data directory).
    fn sandbox_rules(&self, user_dir: &Path, red: &Path, node: &Path) -> crate::sandbox::Rules {
        let mut rules = crate::sandbox::Rules::system();
        rules.read_write.push(user_dir.to_path_buf());
        // `<stacks>/node-red-<v>/node_modules/node-red/red.js` → `<stacks>/node-red-<v>`.
        if let Some(stack) = red.ancestors().nth(3) {
            rules.read_only.push(stack.to_path_buf());
        }
        if let Some(runtime) = node_home(node) {
            rules.read_only.push(runtime);
        }
        rules
    }

    async fn watched(&self, id: &str) -> Result<Watched, DriverError> {
        self.children
            .lock()
            .await
            .get(id)
            .cloned()
            .ok_or_else(|| DriverError::Admin {
                id: id.into(),
                reason: "not running".into(),
            })
    }
}

/// Follows a replica's output file from `offset` into `log` until the process has ended and the
/// file is read to its end. Rotates the file past `max_bytes`.
///
/// What the file already holds past `offset` is in the log when this returns.
async fn tail(
    path: PathBuf,
    offset: u64,
    src: String,
    log: Arc<InstanceLog>,
    mut exit: watch::Receiver<Option<String>>,
    max_bytes: u64,
    seen: Arc<Seen>,
) {
    let mut t = Tail {
        offset,
        partial: Vec::new(),
        src,
        log,
        seen,
    };
    if let Ok(mut f) = tokio::fs::File::open(&path).await {
        t.read(&mut f).await;
    }
    tokio::spawn(async move {
        // The sender gone without an exit reason: the start was abandoned (and its process
        // killed); read what is left and end.
        let mut abandoned = false;
        loop {
            let done = abandoned || exit.borrow_and_update().is_some();
            if let Ok(mut f) = tokio::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .await
            {
                t.read(&mut f).await;
                if t.offset > max_bytes {
                    // Keep one old file. The writer appends (O_APPEND), so after the truncation
                    // it goes on at the new end. Lines written between the last read and the
                    // truncation are read first; the window left is the copy itself.
                    let old = path.with_extension("log.1");
                    if tokio::fs::copy(&path, &old).await.is_ok() {
                        t.read(&mut f).await;
                        if f.set_len(0).await.is_ok() {
                            t.offset = 0;
                        }
                    }
                }
            }
            if done {
                if !t.partial.is_empty() {
                    t.log
                        .push_line(&t.src, &String::from_utf8_lossy(&t.partial));
                }
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                changed = exit.changed() => abandoned = changed.is_err(),
            }
        }
    });
}

/// The offset of the first line that starts in the last `window` bytes of `path`.
async fn replay_start(path: &Path, window: u64) -> u64 {
    let Ok(mut f) = tokio::fs::File::open(path).await else {
        return 0;
    };
    let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(window);
    if start == 0 || f.seek(std::io::SeekFrom::Start(start - 1)).await.is_err() {
        return start;
    }
    let mut buf = Vec::new();
    if (&mut f)
        .take(window + 1)
        .read_to_end(&mut buf)
        .await
        .is_err()
    {
        return len;
    }
    // The byte before the window included: a newline there means the window starts a line.
    match buf.iter().position(|b| *b == b'\n') {
        Some(i) => start - 1 + i as u64 + 1,
        None => len,
    }
}

/// Where a tailer is in a replica's output file.
struct Tail {
    offset: u64,
    partial: Vec<u8>,
    src: String,
    log: Arc<InstanceLog>,
    seen: Arc<Seen>,
}

impl Tail {
    /// Reads `f` from the offset to its end, pushing every whole line.
    async fn read(&mut self, f: &mut tokio::fs::File) {
        let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
        if len < self.offset {
            // Truncated under us: start over.
            self.offset = 0;
            self.partial.clear();
        }
        if len <= self.offset || f.seek(std::io::SeekFrom::Start(self.offset)).await.is_err() {
            return;
        }
        let mut buf = Vec::with_capacity((len - self.offset) as usize);
        if f.read_to_end(&mut buf).await.is_err() {
            return;
        }
        self.offset += buf.len() as u64;
        self.partial.extend_from_slice(&buf);
        let mut lines: Vec<&[u8]> = self.partial.split(|b| *b == b'\n').collect();
        let rest = lines.pop().unwrap_or_default().to_vec();
        for line in lines {
            let line = String::from_utf8_lossy(line);
            let line = line.trim_end_matches('\r');
            if !line.is_empty() {
                self.seen.line(line);
                self.log.push_line(&self.src, line);
            }
        }
        self.partial = rest;
    }
}

/// What the start of a replica waits for in its output: "Started flows", and the last lines to
/// explain a failed start.
#[derive(Debug, Default)]
struct Seen {
    flows_started: std::sync::atomic::AtomicBool,
    last: std::sync::Mutex<std::collections::VecDeque<String>>,
}

impl Seen {
    fn line(&self, line: &str) {
        // Node-RED logs "Started flows" once its flows run; its flow state says "start" a
        // little earlier, before the http-in routes exist.
        if line.contains("Started flows") {
            self.flows_started
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        if let Ok(mut l) = self.last.lock() {
            l.push_back(line.to_owned());
            if l.len() > 20 {
                l.pop_front();
            }
        }
    }

    fn tail(&self) -> String {
        self.last
            .lock()
            .map(|l| l.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }
}

async fn installed_version(dir: &Path, package: &str) -> Option<String> {
    let text =
        tokio::fs::read_to_string(dir.join("node_modules").join(package).join("package.json"))
            .await
            .ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("version")?.as_str().map(str::to_owned)
}

/// The `settings.js` of a replica: the instance's effective settings (already checked against
/// the control plane's allowlist), then the keys Tandem manages, which always win.
///
/// The secrets are not in it and not in the environment: the file reads them once from
/// standard input, a pipe Tandem writes them to and closes ([`SECRETS_ON_STDIN`]). So no flow
/// finds them with `env.get`, in `/proc/<pid>/environ`, or in a file it can open.
pub fn settings_js(spec: &ReplicaSpec, port: u16, user_dir: &Path) -> String {
    let user = if spec.settings.is_object() {
        spec.settings.to_string()
    } else {
        "{}".into()
    };
    let user_dir = serde_json::Value::String(user_dir.display().to_string());
    // Users set the console's level and switches; the handler stays Tandem's (JSON lines).
    let console = spec.settings.pointer("/logging/console");
    let console_str = |k: &str, default: &str| {
        serde_json::Value::String(
            console
                .and_then(|c| c.get(k))
                .and_then(|v| v.as_str())
                .unwrap_or(default)
                .to_owned(),
        )
    };
    let console_bool = |k: &str| {
        console
            .and_then(|c| c.get(k))
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false)
    };
    let diagnostics = spec
        .settings
        .get("diagnostics")
        .cloned()
        .unwrap_or_else(|| serde_json::json!({ "enabled": false }));
    format!(
        r#"// Generated by Tandem for replica {id}. Changes are overwritten at the next start.
// The instance's secrets come once, on standard input (a pipe Tandem closes after writing
// them): never in the environment, where flows could read them.
const secrets = JSON.parse(require("fs").readFileSync(0, "utf8"));
const user = {user};
module.exports = Object.assign({{}}, user, {{
    uiHost: "127.0.0.1",
    uiPort: {port},
    userDir: {user_dir},
    flowFile: "flows.json",
    httpAdminRoot: "/admin",
    httpNodeRoot: "/",
    disableEditor: {ha},
    credentialSecret: secrets.credentials,
    adminAuth: {{
        tokenHeader: "{header}",
        tokens: function (token) {{
            const ok = typeof token === "string" && token.length > 0 && token === secrets.admin;
            return Promise.resolve(ok ? {{ username: "tandem", permissions: "*" }} : null);
        }},
    }},
    // The admin secret is for the admin API alone: a flow's own routes (even under /admin,
    // where Node-RED's admin app passes on what it does not serve) never see the header.
    httpNodeMiddleware: function (req, res, next) {{
        delete req.headers["{header}"];
        for (let i = req.rawHeaders.length - 2; i >= 0; i -= 2) {{
            if (String(req.rawHeaders[i]).toLowerCase() === "{header}") {{ req.rawHeaders.splice(i, 2); }}
        }}
        next();
    }},
    runtimeState: {{ enabled: true }},
    diagnostics: {diagnostics},
    telemetry: {{ enabled: false }},
    externalModules: {{ palette: {{ allowInstall: false }}, modules: {{ allowInstall: false }} }},
    editorTheme: Object.assign({{}}, user.editorTheme, {{ palette: {{ catalogues: [] }}, tours: false }}),
    logging: {{
        console: {{
            level: {level},
            metrics: {metrics},
            audit: {audit},
            handler: function () {{
                return function (msg) {{
                    const line = Object.assign({{}}, msg, {{ ts: msg.timestamp, level: levelName(msg.level) }});
                    delete line.timestamp;
                    if (line.msg instanceof Error || (line.msg && line.msg.stack)) {{ line.msg = String(line.msg.stack || line.msg); }}
                    try {{ process.stdout.write(JSON.stringify(line) + "\n"); }} catch (e) {{ process.stdout.write(String(msg.msg) + "\n"); }}
                }};
            }},
        }},
    }},
}});
function levelName(l) {{
    return {{ 10: "fatal", 20: "error", 30: "warn", 40: "info", 50: "debug", 60: "trace", 98: "audit", 99: "metric" }}[l] || String(l);
}}
"#,
        id = spec.id(),
        ha = spec.ha,
        header = TOKEN_HEADER,
        level = console_str("level", "info"),
        metrics = console_bool("metrics"),
        audit = console_bool("audit"),
    )
}

/// How a replica gets its secrets: one JSON line on standard input, `{"admin", "credentials"}`.
/// Part of the spec hash, so replicas started the older way (secrets in the environment) are
/// replaced, one at a time, after an upgrade.
pub const SECRETS_ON_STDIN: &str = "secrets-on-stdin";

/// A free port on 127.0.0.1 (bound and released; Node-RED fails clearly if it is taken since).
fn free_port() -> Result<u16, DriverError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(DriverError::io("cannot find a free port"))
}

/// One admin API call with the secret; the status and body.
async fn admin_call(
    addr: SocketAddr,
    secret: &str,
    method: &str,
    path: &str,
    body: &str,
) -> Result<(u16, String), String> {
    let call = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let req = format!(
            "{method} /admin{path} HTTP/1.1\r\nHost: {addr}\r\n{TOKEN_HEADER}: {secret}\r\nContent-Type: application/json\r\nNode-RED-Deployment-Type: full\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&buf);
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        Ok((status, body.to_owned()))
    };
    tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .map_err(|_| "no answer within 30 s".to_string())?
}

/// `GET /admin/flows/state` with the secret; the flow state on a 200.
pub async fn probe(addr: SocketAddr, secret: &str) -> Result<String, String> {
    let (status, body) = admin_call(addr, secret, "GET", "/flows/state", "").await?;
    if status != 200 {
        return Err(format!("status {status}"));
    }
    let v: serde_json::Value =
        serde_json::from_str(body.trim()).map_err(|e| format!("{e}: {body}"))?;
    Ok(v.get("state")
        .and_then(|s| s.as_str())
        .unwrap_or("")
        .to_string())
}

/// Whether a reported flow state is the one a replica was started for.
fn state_matches(state: &str, start_stopped: bool) -> bool {
    if start_stopped {
        state == "stop" || state == "safe"
    } else {
        state == "start"
    }
}

async fn signal_group(pid: u32, signal: &str) {
    // The replica leads its own process group; `kill -SIG -pgid` reaches all of it.
    let _ = Command::new("kill")
        .args([signal, "--", &format!("-{pid}")])
        .stderr(Stdio::null())
        .status()
        .await;
}

impl Driver for LocalDriver {
    async fn prepare(&self, spec: &ReplicaSpec, log: &InstanceLog) -> Result<(), DriverError> {
        self.install_stack(&spec.nodered_version, log).await?;
        if let Some(v) = &spec.node_version {
            self.install_runtime(v, log).await?;
        }
        Ok(())
    }

    async fn wait(&self, id: &str) -> String {
        let rx = self.children.lock().await.get(id).map(|w| w.exit.clone());
        match rx {
            Some(rx) => exited(rx).await,
            None => format!("no replica {id} is running"),
        }
    }

    async fn check(&self, id: &str) -> Result<(), String> {
        let w = self.watched(id).await.map_err(|e| e.to_string())?;
        match tokio::time::timeout(Duration::from_secs(5), probe(w.addr, &w.secret)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err("no answer within 5 s".into()),
        }
    }

    async fn start(
        &self,
        spec: &ReplicaSpec,
        log: Arc<InstanceLog>,
    ) -> Result<Running, DriverError> {
        let red = self.install_stack(&spec.nodered_version, &log).await?;
        let node = match &spec.node_version {
            Some(v) => self.install_runtime(v, &log).await?,
            None => PathBuf::from("node"),
        };
        let id = spec.id();
        let dir = self.user_dir(&spec.instance, spec.slot);
        let log_path = self.log_file(&spec.instance, spec.slot);
        for d in [Some(dir.as_path()), log_path.parent()]
            .into_iter()
            .flatten()
        {
            tokio::fs::create_dir_all(d)
                .await
                .map_err(DriverError::io(format!("cannot create {}", d.display())))?;
        }
        let hash = spec_hash(spec, self.sandbox.is_some());
        if let Some((w, flows_started, stale)) = self.adopt(spec, &dir, &hash).await {
            // Replay the end of the file (its last 64 KiB, from a line start) so the log is not
            // empty after Tandem's restart.
            let from = replay_start(&log_path, 64 << 10).await;
            let seen = Arc::new(Seen::default());
            tail(
                log_path,
                from,
                id.clone(),
                log.clone(),
                w.exit.clone(),
                self.max_log_bytes,
                seen,
            )
            .await;
            if stale {
                log.note("info", format!("adopted replica {id} (pid {}); it was started for another spec or by an older Tandem and will be replaced", w.pid));
            } else {
                log.note("info", format!("adopted replica {id} (pid {})", w.pid));
            }
            tracing::info!(replica = %id, addr = %w.addr, pid = w.pid, stale, "adopted a running replica");
            let running = Running {
                id: id.clone(),
                addr: w.addr,
                pid: Some(w.pid),
                user_dir: Some(dir),
                adopted: true,
                flows_started,
                stale,
                // Started by whichever Tandem ran before; only a current spec says how.
                isolation: if stale {
                    Isolation::None
                } else {
                    self.isolation()
                },
            };
            self.children.lock().await.insert(id, w);
            return Ok(running);
        }

        let port = free_port()?;
        let write = |name: &str, text: String| {
            let path = dir.join(name);
            async move {
                tokio::fs::write(&path, text)
                    .await
                    .map_err(DriverError::io(format!("cannot write {}", path.display())))
            }
        };
        write("settings.js", settings_js(spec, port, &dir)).await?;
        // The flows are written when they differ from the ones last written, so flows deployed
        // from the editor survive restarts until the instance's flows are changed through Tandem.
        let flows = spec.flows.to_string();
        let flows_hash = format!("{:x}", fnv(flows.as_bytes()));
        let written = tokio::fs::read_to_string(dir.join(".tandem-flows"))
            .await
            .unwrap_or_default();
        if written != flows_hash || !dir.join("flows.json").exists() {
            write("flows.json", flows).await?;
            write(".tandem-flows", flows_hash).await?;
        }
        let state = if spec.start_stopped { "stop" } else { "start" };
        write(
            ".config.runtime.json",
            serde_json::json!({ "runtimeFlowState": state }).to_string(),
        )
        .await?;

        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(DriverError::io(format!(
                "cannot open {}",
                log_path.display()
            )))?;
        let offset = out.metadata().map(|m| m.len()).unwrap_or(0);
        let err = out.try_clone().map_err(DriverError::io("cannot dup"))?;
        // A private temporary directory: the sandbox leaves the system's /tmp out.
        let tmp = dir.join(".tmp");
        tokio::fs::create_dir_all(&tmp)
            .await
            .map_err(DriverError::io(format!("cannot create {}", tmp.display())))?;
        let mut cmd = match &self.sandbox {
            Some((launcher, isolation)) => {
                if *isolation == Isolation::None {
                    if launcher.required {
                        return Err(DriverError::Unconfined { id });
                    }
                    log.note(
                        "warn",
                        format!("replica {id} runs without a sandbox: this kernel has no Landlock, so its flows can read whatever Tandem's OS user can"),
                    );
                }
                let rules = self.sandbox_rules(&dir, &red, &node);
                let mut c = Command::new(&launcher.exe);
                c.arg("sandbox-exec").args(rules.to_args());
                if launcher.required {
                    c.arg("--require");
                }
                c.arg("--").arg(&node);
                c
            }
            None => Command::new(&node),
        };
        cmd.arg(format!(
            "--max-old-space-size={}",
            (spec.memory_mb * 3 / 4).max(64)
        ))
        .arg(&red)
        .args(["--settings"])
        .arg(dir.join("settings.js"))
        .args(["--userDir"])
        .arg(&dir)
        // Only what Node.js needs of Tandem's own environment (which may hold a database URL
        // with its password), then the instance's variables (checked by the control plane).
        .env_clear()
        .envs(
            ["PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ"]
                .into_iter()
                .filter_map(|k| std::env::var_os(k).map(|v| (k, v))),
        )
        .env("HOME", &dir)
        .env("TMPDIR", &tmp)
        .envs(&spec.env)
        .env("NODE_RED_DISABLE_TELEMETRY", "true")
        // The persisted runtime state alone did not always hold on a fresh userDir (flows were
        // started in about one boot in five); safe mode is Node-RED's own "load, do not start",
        // left by `POST /admin/flows/state {"state":"start"}`.
        .args(spec.start_stopped.then_some("--safe"))
        .current_dir(&dir)
        // The secrets: written once to this pipe, read once by settings.js.
        .stdin(Stdio::piped())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .process_group(0);
        let mut child = cmd.spawn().map_err(DriverError::io("cannot start node"))?;
        let pid = child.id().unwrap_or_default();
        let mut guard = KillOnDrop(Some(pid));
        if let Some(mut stdin) = child.stdin.take() {
            let secrets = serde_json::json!({
                "admin": spec.admin_secret,
                "credentials": spec.credential_secret,
            });
            // A process that died at once shows in its exit below, with its output.
            let _ = stdin.write_all(format!("{secrets}\n").as_bytes()).await;
        }
        log.note("info", format!("starting replica {id} (pid {pid})"));
        let (exit_tx, exit_rx) = watch::channel(None);
        let seen = Arc::new(Seen::default());
        tail(
            log_path,
            offset,
            id.clone(),
            log.clone(),
            exit_rx.clone(),
            self.max_log_bytes,
            seen.clone(),
        )
        .await;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = tokio::time::Instant::now() + self.ready_timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                guard.0 = None;
                let _ = exit_tx.send(Some(status.to_string()));
                // Let the tailer read the last lines before quoting them.
                tokio::time::sleep(Duration::from_millis(150)).await;
                return Err(DriverError::Exited {
                    id,
                    reason: format!("{status}: {}", seen.tail()),
                });
            }
            // Ready means the flows are in the state asked for: right after the port opens,
            // Node-RED can still report the state it had before it applied the stored one.
            let reason = match probe(addr, &spec.admin_secret).await {
                Ok(state)
                    if state_matches(&state, spec.start_stopped)
                        && (spec.start_stopped
                            || seen
                                .flows_started
                                .load(std::sync::atomic::Ordering::Relaxed)) =>
                {
                    break
                }
                Ok(state) => format!("flows are in state {state:?}"),
                Err(e) => e,
            };
            if tokio::time::Instant::now() >= deadline {
                drop(guard);
                let _ = exit_tx.send(Some("killed: not ready in time".into()));
                return Err(DriverError::NotReady {
                    id,
                    seconds: self.ready_timeout.as_secs(),
                    reason,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let record = Record {
            pid,
            port,
            spec: hash,
        };
        write(
            "replica.json",
            serde_json::to_string(&record).unwrap_or_default(),
        )
        .await?;
        guard.0 = None;
        let exit = watch_child(child);
        // The tailer follows the process's end through the same channel.
        tokio::spawn({
            let mut exit = exit.clone();
            async move {
                let reason = exited_ref(&mut exit).await;
                let _ = exit_tx.send(Some(reason));
            }
        });
        self.children.lock().await.insert(
            id.clone(),
            Watched {
                pid,
                addr,
                secret: spec.admin_secret.clone(),
                exit,
            },
        );
        tracing::info!(replica = %id, %addr, pid, "replica ready");
        Ok(Running {
            id,
            addr,
            pid: Some(pid),
            user_dir: Some(dir),
            adopted: false,
            flows_started: !spec.start_stopped,
            stale: false,
            isolation: self.isolation(),
        })
    }

    async fn stop(&self, id: &str) -> Result<(), DriverError> {
        self.end(id, self.stop_grace).await
    }

    async fn kill(&self, id: &str) -> Result<(), DriverError> {
        self.end(id, Duration::ZERO).await
    }

    async fn remove(&self, instance: &str) -> Result<(), DriverError> {
        let dir = self.data_dir.join("instances").join(instance);
        match tokio::fs::remove_dir_all(&dir).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(DriverError::Io {
                context: format!("cannot remove {}", dir.display()),
                source: e,
            }),
            _ => Ok(()),
        }
    }

    async fn set_flows_running(&self, id: &str, running: bool) -> Result<(), DriverError> {
        let w = self.watched(id).await?;
        let state = if running { "start" } else { "stop" };
        let body = serde_json::json!({ "state": state }).to_string();
        match admin_call(w.addr, &w.secret, "POST", "/flows/state", &body).await {
            Ok((200, _)) => Ok(()),
            Ok((status, body)) => Err(DriverError::Admin {
                id: id.into(),
                reason: format!("POST /admin/flows/state answered {status}: {body}"),
            }),
            Err(reason) => Err(DriverError::Admin {
                id: id.into(),
                reason,
            }),
        }
    }

    async fn deploy(&self, id: &str, flows: &serde_json::Value) -> Result<(), DriverError> {
        let w = self.watched(id).await?;
        match admin_call(w.addr, &w.secret, "POST", "/flows", &flows.to_string()).await {
            Ok((200 | 204, _)) => Ok(()),
            Ok((status, body)) => Err(DriverError::Admin {
                id: id.into(),
                reason: format!("POST /admin/flows answered {status}: {body}"),
            }),
            Err(reason) => Err(DriverError::Admin {
                id: id.into(),
                reason,
            }),
        }
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

async fn exited_ref(rx: &mut watch::Receiver<Option<String>>) -> String {
    match rx.wait_for(Option::is_some).await {
        Ok(r) => r.clone().unwrap_or_default(),
        Err(_) => "the process watcher ended".into(),
    }
}

fn fnv(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}
