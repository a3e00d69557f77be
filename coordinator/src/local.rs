//! The local driver: Node-RED replicas as processes on this machine.
//!
//! Layout under the data directory:
//! - `stacks/node-red-<version>/`: `npm install node-red@<version>`, installed on first use.
//! - `instances/<instance>/r<slot>/`: the replica's userDir, with the generated `settings.js`
//!   and `flows.json`.
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

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{watch, Mutex};

use crate::driver::{Driver, DriverError, ReplicaSpec, Running};

/// Header that carries the admin secret to a replica.
pub const TOKEN_HEADER: &str = "x-tandem-token";

/// A running replica process: its pid and how it ended (set once it has).
#[derive(Debug, Clone)]
struct Watched {
    pid: Option<u32>,
    exit: watch::Receiver<Option<String>>,
}

/// Owns the child until it exits and says how it ended.
fn watch_exit(mut child: Child) -> watch::Receiver<Option<String>> {
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

async fn exited(mut rx: watch::Receiver<Option<String>>) -> String {
    match rx.wait_for(Option::is_some).await {
        Ok(r) => r.clone().unwrap_or_default(),
        Err(_) => "the process watcher ended".into(),
    }
}

/// The local driver.
#[derive(Debug)]
pub struct LocalDriver {
    data_dir: PathBuf,
    /// Time a replica gets to answer its first readiness probe. Default 60 s.
    pub ready_timeout: Duration,
    /// Time between SIGTERM and SIGKILL. Default 10 s.
    pub stop_grace: Duration,
    children: Mutex<HashMap<String, Watched>>,
}

impl LocalDriver {
    /// A driver keeping stacks and replicas under `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            ready_timeout: Duration::from_secs(60),
            stop_grace: Duration::from_secs(10),
            children: Mutex::new(HashMap::new()),
        }
    }

    /// Installs Node-RED `version` unless it is there already; returns the path of `red.js`.
    pub async fn install_stack(&self, version: &str) -> Result<PathBuf, DriverError> {
        let valid = !version.is_empty()
            && version
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
        if !valid {
            return Err(DriverError::Install {
                version: version.into(),
                output: "not a version".into(),
            });
        }
        let stacks = self.data_dir.join("stacks");
        let dir = stacks.join(format!("node-red-{version}"));
        let red = dir.join("node_modules/node-red/red.js");
        // One install at a time in this process, whichever driver asks.
        static INSTALLS: Mutex<()> = Mutex::const_new(());
        let _guard = INSTALLS.lock().await;
        if installed_version(&dir).await.as_deref() == Some(version) {
            return Ok(red);
        }
        // Install beside the target and rename it into place, so a stack directory is either
        // complete or absent, whoever else installs the same version at the same time.
        let staging = stacks.join(format!(".node-red-{version}-{}", std::process::id()));
        let _ = tokio::fs::remove_dir_all(&staging).await;
        tokio::fs::create_dir_all(&staging)
            .await
            .map_err(DriverError::io(format!(
                "cannot create {}",
                staging.display()
            )))?;
        tracing::info!(%version, dir = %dir.display(), "installing Node-RED");
        let out = Command::new("npm")
            .args([
                "install",
                "--no-audit",
                "--no-fund",
                "--loglevel=error",
                "--prefix",
            ])
            .arg(&staging)
            .arg(format!("node-red@{version}"))
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(DriverError::io("cannot run npm (is Node.js installed?)"))?;
        if !out.status.success() || installed_version(&staging).await.as_deref() != Some(version) {
            let _ = tokio::fs::remove_dir_all(&staging).await;
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(20)..].join("\n");
            return Err(DriverError::Install {
                version: version.into(),
                output: tail,
            });
        }
        if tokio::fs::rename(&staging, &dir).await.is_err() {
            // Someone else finished first; theirs is as good as ours.
            let _ = tokio::fs::remove_dir_all(&staging).await;
            if installed_version(&dir).await.as_deref() != Some(version) {
                return Err(DriverError::Install {
                    version: version.into(),
                    output: format!("cannot move the stack into {}", dir.display()),
                });
            }
        }
        Ok(red)
    }

    /// The userDir of a replica.
    pub fn user_dir(&self, instance: &str, slot: u32) -> PathBuf {
        self.data_dir
            .join("instances")
            .join(instance)
            .join(format!("r{slot}"))
    }
}

async fn installed_version(dir: &Path) -> Option<String> {
    let text = tokio::fs::read_to_string(dir.join("node_modules/node-red/package.json"))
        .await
        .ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("version")?.as_str().map(str::to_owned)
}

/// The `settings.js` of a replica: the instance's effective settings, then the keys Tandem
/// manages, which always win.
pub fn settings_js(spec: &ReplicaSpec, port: u16, user_dir: &Path) -> String {
    let user = if spec.settings.is_object() {
        spec.settings.to_string()
    } else {
        "{}".into()
    };
    let user_dir = serde_json::Value::String(user_dir.display().to_string());
    format!(
        r#"// Generated by Tandem for replica {id}. Changes are overwritten at the next start.
const user = {user};
module.exports = Object.assign({{}}, user, {{
    uiHost: "127.0.0.1",
    uiPort: {port},
    userDir: {user_dir},
    flowFile: "flows.json",
    httpAdminRoot: "/admin",
    httpNodeRoot: "/",
    disableEditor: {ha},
    credentialSecret: process.env.TANDEM_CREDENTIAL_SECRET,
    adminAuth: {{
        tokenHeader: "{header}",
        tokens: function (token) {{
            const ok = typeof token === "string" && token.length > 0 && token === process.env.TANDEM_ADMIN_SECRET;
            return Promise.resolve(ok ? {{ username: "tandem", permissions: "*" }} : null);
        }},
    }},
    runtimeState: {{ enabled: true }},
    diagnostics: {{ enabled: false }},
    telemetry: {{ enabled: false }},
    externalModules: {{ palette: {{ allowInstall: false }}, modules: {{ allowInstall: false }} }},
    editorTheme: Object.assign({{}}, user.editorTheme, {{ palette: {{ catalogues: [] }}, tours: false }}),
    logging: {{
        console: {{
            level: "info",
            metrics: false,
            audit: false,
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
    )
}

/// A free port on 127.0.0.1 (bound and released; Node-RED fails clearly if it is taken since).
fn free_port() -> Result<u16, DriverError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(DriverError::io("cannot find a free port"))
}

/// `GET /admin/flows/state` with the secret; the flow state on a 200.
pub async fn probe(addr: SocketAddr, secret: &str) -> Result<String, String> {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let req = format!("GET /admin/flows/state HTTP/1.1\r\nHost: {addr}\r\n{TOKEN_HEADER}: {secret}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&buf);
    let status = text.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        return Err(format!("status {status}"));
    }
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
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
        .status()
        .await;
}

impl Driver for LocalDriver {
    async fn wait(&self, id: &str) -> String {
        let rx = self.children.lock().await.get(id).map(|w| w.exit.clone());
        match rx {
            Some(rx) => exited(rx).await,
            None => format!("no replica {id} is running"),
        }
    }

    async fn start(&self, spec: &ReplicaSpec) -> Result<Running, DriverError> {
        let red = self.install_stack(&spec.nodered_version).await?;
        let id = spec.id();
        let dir = self.user_dir(&spec.instance, spec.slot);
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(DriverError::io(format!("cannot create {}", dir.display())))?;
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
        write("flows.json", spec.flows.to_string()).await?;
        let state = if spec.start_stopped { "stop" } else { "start" };
        write(
            ".config.runtime.json",
            serde_json::json!({ "runtimeFlowState": state }).to_string(),
        )
        .await?;

        let mut cmd = Command::new("node");
        cmd.arg(format!(
            "--max-old-space-size={}",
            (spec.memory_mb * 3 / 4).max(64)
        ))
        .arg(&red)
        .args(["--settings"])
        .arg(dir.join("settings.js"))
        .args(["--userDir"])
        .arg(&dir)
        .envs(&spec.env)
        .env("TANDEM_ADMIN_SECRET", &spec.admin_secret)
        .env("TANDEM_CREDENTIAL_SECRET", &spec.credential_secret)
        .env("NODE_RED_DISABLE_TELEMETRY", "true")
        // The persisted runtime state alone did not always hold on a fresh userDir (flows were
        // started in about one boot in five); safe mode is Node-RED's own "load, do not start",
        // left by `POST /admin/flows/state {"state":"start"}`.
        .args(spec.start_stopped.then_some("--safe"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(DriverError::io("cannot start node"))?;
        let pid = child.id();
        let last_lines =
            std::sync::Arc::new(std::sync::Mutex::new(std::collections::VecDeque::new()));
        // Node-RED logs "Started flows" once its flows run; its flow state says "start" a little
        // earlier, before the http-in routes exist.
        let flows_started = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        ]
        .into_iter()
        .flatten()
        {
            let id = id.clone();
            let last = last_lines.clone();
            let started = flows_started.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stream).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if line.contains("Started flows") {
                        started.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    tracing::info!(target: "tandem::replica", src = %id, "{line}");
                    if let Ok(mut l) = last.lock() {
                        l.push_back(line);
                        if l.len() > 20 {
                            l.pop_front();
                        }
                    }
                }
            });
        }
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = tokio::time::Instant::now() + self.ready_timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let tail = last_lines
                    .lock()
                    .map(|l| l.iter().cloned().collect::<Vec<_>>().join("\n"))
                    .unwrap_or_default();
                return Err(DriverError::NotReady {
                    id,
                    seconds: self.ready_timeout.as_secs(),
                    reason: format!("node exited with {status}: {tail}"),
                });
            }
            // Ready means the flows are in the state asked for: right after the port opens,
            // Node-RED can still report the state it had before it applied the stored one.
            let reason = match probe(addr, &spec.admin_secret).await {
                Ok(state)
                    if state_matches(&state, spec.start_stopped)
                        && (spec.start_stopped
                            || flows_started.load(std::sync::atomic::Ordering::Relaxed)) =>
                {
                    break
                }
                Ok(state) => format!("flows are in state {state:?}"),
                Err(e) => e,
            };
            if tokio::time::Instant::now() >= deadline {
                if let Some(pid) = pid {
                    signal_group(pid, "-KILL").await;
                }
                return Err(DriverError::NotReady {
                    id,
                    seconds: self.ready_timeout.as_secs(),
                    reason,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let exit = watch_exit(child);
        self.children
            .lock()
            .await
            .insert(id.clone(), Watched { pid, exit });
        tracing::info!(replica = %id, %addr, ?pid, "replica ready");
        Ok(Running {
            id,
            addr,
            pid,
            user_dir: Some(dir),
        })
    }

    async fn stop(&self, id: &str) -> Result<(), DriverError> {
        let Some(w) = self.children.lock().await.remove(id) else {
            return Ok(());
        };
        if let Some(pid) = w.pid {
            signal_group(pid, "-TERM").await;
            if tokio::time::timeout(self.stop_grace, exited(w.exit.clone()))
                .await
                .is_err()
            {
                tracing::warn!(replica = %id, grace = ?self.stop_grace, "replica did not stop in time; killing it");
                signal_group(pid, "-KILL").await;
            }
        }
        exited(w.exit).await;
        Ok(())
    }
}
