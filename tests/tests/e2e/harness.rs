//! A real `tandem serve` on free ports with its own data directory, a plain HTTP client, and
//! helpers to create teams, users and instances through the API.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Where the Node-RED stack is installed once per machine for every test run.
pub fn stacks_dir() -> PathBuf {
    std::env::var_os("TANDEM_TEST_STACKS")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("tandem-test-stacks"))
        .join("stacks")
}

/// A port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    tandem_proxy::net::free_port().unwrap()
}

/// A response.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request on a fresh connection.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<Resp> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status line in {text:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok(Resp {
        status,
        headers,
        body,
    })
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A running `tandem serve`.
pub struct Tandem {
    pub dir: PathBuf,
    pub api: SocketAddr,
    pub http: SocketAddr,
    /// The metrics listener (`--metrics-listen`): `/metrics`, `/healthz`.
    pub metrics: SocketAddr,
    pub token: String,
    child: Option<Child>,
    stop_replicas: bool,
    /// The data directory when the harness made it: removed on drop, after the stop.
    _temp: Option<tempfile::TempDir>,
}

impl Tandem {
    /// Starts `tandem serve` in a new data directory; replicas are stopped with it.
    pub async fn start(name: &str) -> Self {
        Self::start_with(name, &[]).await
    }

    /// Starts `tandem serve` in a new data directory with more flags.
    pub async fn start_with(name: &str, args: &[&str]) -> Self {
        let temp = tempfile::Builder::new()
            .prefix(&format!("tandem-e2e-{name}-"))
            .tempdir()
            .unwrap();
        // The data directory is made inside, as `mkdir` would make it (0755 under the usual
        // umask, where the temporary directory is 0700): that `tandem serve` makes it private
        // itself is checked by the isolation test.
        let mut t = Self::launch(&temp.path().join("data"), true, args).await;
        t._temp = Some(temp);
        t
    }

    /// Starts `tandem serve` on `dir`, as it is.
    pub async fn start_in(dir: &Path, stop_replicas: bool) -> Self {
        Self::launch(dir, stop_replicas, &[]).await
    }

    /// Starts `tandem serve` on `dir`, as it is, with more flags.
    pub async fn start_in_with(dir: &Path, stop_replicas: bool, args: &[&str]) -> Self {
        Self::launch(dir, stop_replicas, args).await
    }

    /// The pid of `tandem serve`, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    async fn launch(dir: &Path, stop_replicas: bool, args: &[&str]) -> Self {
        // A Tandem started again on a data directory gets the ports it had, as a restarted
        // service does: its replicas reach the storage API where they were told it is.
        std::fs::create_dir_all(dir).unwrap();
        let ports_file = dir.join("e2e-ports");
        let given = ports_file.exists();
        // Ports picked here are free when picked, not when `tandem serve` binds them: another
        // test's process or outgoing connection may take one meanwhile. A first start that
        // exits without serving picks new ones, a few times.
        let mut tries = 0;
        loop {
            tries += 1;
            let ports: Vec<u16> = match std::fs::read_to_string(&ports_file) {
                Ok(text) => text.split(' ').filter_map(|p| p.parse().ok()).collect(),
                Err(_) => {
                    let ports = vec![free_port(), free_port(), free_port()];
                    let text: Vec<String> = ports.iter().map(u16::to_string).collect();
                    std::fs::write(&ports_file, text.join(" ")).unwrap();
                    ports
                }
            };
            let api = SocketAddr::from(([127, 0, 0, 1], ports[0]));
            let http_addr = SocketAddr::from(([127, 0, 0, 1], ports[1]));
            let metrics = SocketAddr::from(([127, 0, 0, 1], ports[2]));
            let mut child = Self::spawn(dir, stop_replicas, args, api, http_addr, metrics);
            match Self::serving(api, &mut child).await {
                Ok(()) => return Self::started(dir, stop_replicas, api, http_addr, metrics, child),
                Err(exit) if !given && tries < 3 => {
                    eprintln!("tandem serve exited at start ({exit}); new ports, once more");
                    let _ = std::fs::remove_file(&ports_file);
                }
                Err(why) => {
                    let _ = child.kill();
                    let text = std::fs::read_to_string(dir.join("tandem.log")).unwrap_or_default();
                    let lines: Vec<&str> = text.lines().collect();
                    panic!(
                        "tandem serve did not start ({why}); its log ends:\n{}",
                        lines[lines.len().saturating_sub(30)..].join("\n")
                    );
                }
            }
        }
    }

    fn spawn(
        dir: &Path,
        stop_replicas: bool,
        args: &[&str],
        api: SocketAddr,
        http_addr: SocketAddr,
        metrics: SocketAddr,
    ) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("tandem.log"))
            .unwrap();
        Command::new(env!("CARGO_BIN_EXE_tandem-under-test"))
            .arg("serve")
            .arg("--data-dir")
            .arg(dir)
            .arg("--stacks-dir")
            .arg(stacks_dir())
            .args(["--api-listen", &api.to_string()])
            .args(["--http-listen", &http_addr.to_string()])
            .args(["--metrics-listen", &metrics.to_string()])
            .args(["--restart-backoff-ms", "200"])
            .args(["--crash-loop-restarts", "3"])
            .args(["--liveness-check-ms", "500"])
            .args([
                "--stop-replicas-on-exit",
                if stop_replicas { "true" } else { "false" },
            ])
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    /// Waits until `child` answers `/healthz` on `api`; why not, when it exits or takes too
    /// long.
    async fn serving(api: SocketAddr, child: &mut Child) -> Result<(), String> {
        // Generous: a loaded 2-core machine (builds beside the tests) starts it slowly.
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Ok(r) = http(api, "GET", "api", "/healthz", &[], "").await {
                if r.status == 200 {
                    return Ok(());
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("it exited: {status}"));
            }
            if Instant::now() >= deadline {
                return Err("no answer on /healthz within 90 s".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn started(
        dir: &Path,
        stop_replicas: bool,
        api: SocketAddr,
        http_addr: SocketAddr,
        metrics: SocketAddr,
        child: Child,
    ) -> Self {
        let token = std::fs::read_to_string(dir.join("admin-token"))
            .unwrap()
            .trim()
            .to_string();
        Self {
            dir: dir.to_path_buf(),
            api,
            http: http_addr,
            metrics,
            token,
            child: Some(child),
            stop_replicas,
            _temp: None,
        }
    }

    /// SIGTERM and wait for the exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(40);
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// SIGKILL, as a crash: nothing is stopped, replicas keep running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The Prometheus page of the metrics listener (the API's, the coordinator's and the
    /// proxy's series).
    pub async fn metrics(&self) -> String {
        let r = http(self.metrics, "GET", "metrics", "/metrics", &[], "")
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        r.body
    }

    /// An API call as the platform admin.
    pub async fn api(&self, method: &str, path: &str, body: Value) -> Resp {
        let token = self.token.clone();
        self.api_as(&token, method, path, body).await
    }

    /// An API call with `token`.
    pub async fn api_as(&self, token: &str, method: &str, path: &str, body: Value) -> Resp {
        let body = if body.is_null() {
            String::new()
        } else {
            body.to_string()
        };
        let auth = format!("Bearer {token}");
        http(
            self.api,
            method,
            "api",
            path,
            &[("Authorization", &auth)],
            &body,
        )
        .await
        .unwrap()
    }

    /// A request to an instance through the proxy.
    pub async fn get(&self, instance: &str, path: &str) -> std::io::Result<Resp> {
        self.request(instance, "GET", path, &[]).await
    }

    /// Any request to an instance through the proxy.
    pub async fn request(
        &self,
        instance: &str,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> std::io::Result<Resp> {
        let host = format!("{instance}.localhost");
        http(self.http, method, &host, path, headers, "").await
    }

    /// A team and an application; returns the application id and team id.
    pub async fn team_and_app(&self, team: &str) -> (String, String) {
        let t = self
            .api("POST", "/api/v1/teams", json!({ "name": team }))
            .await;
        assert_eq!(t.status, 201, "{}", t.body);
        let team_id = t.json()["id"].as_str().unwrap().to_string();
        let a = self
            .api(
                "POST",
                "/api/v1/applications",
                json!({ "name": "app", "team_id": team_id }),
            )
            .await;
        assert_eq!(a.status, 201, "{}", a.body);
        (a.json()["id"].as_str().unwrap().to_string(), team_id)
    }

    /// The default stack's id.
    pub async fn stack(&self) -> String {
        let s = self.api("GET", "/api/v1/stacks", Value::Null).await;
        s.json()["items"][0]["id"].as_str().unwrap().to_string()
    }

    /// Creates an instance with `flows`, HA when `replicas` > 1; returns its id.
    pub async fn instance(&self, app: &str, name: &str, flows: Value, replicas: u32) -> String {
        let mut body = json!({
            "name": name,
            "application_id": app,
            "stack_id": self.stack().await,
            "flows": flows,
        });
        if replicas > 1 {
            body["ha"] = json!({ "replicas": replicas });
        }
        let r = self.api("POST", "/api/v1/instances", body).await;
        assert_eq!(r.status, 201, "{}", r.body);
        r.json()["id"].as_str().unwrap().to_string()
    }

    /// Creates an HA instance of 2 replicas in standby mode with `flows`; returns its id.
    pub async fn standby_instance(&self, app: &str, name: &str, flows: Value) -> String {
        let body = json!({
            "name": name,
            "application_id": app,
            "stack_id": self.stack().await,
            "flows": flows,
            "ha": { "replicas": 2, "mode": "standby" },
        });
        let r = self.api("POST", "/api/v1/instances", body).await;
        assert_eq!(r.status, 201, "{}", r.body);
        r.json()["id"].as_str().unwrap().to_string()
    }

    /// The observed status of an instance.
    pub async fn status(&self, id: &str) -> Value {
        self.api(
            "GET",
            &format!("/api/v1/instances/{id}/status"),
            Value::Null,
        )
        .await
        .json()["observed"]
            .clone()
    }

    /// Waits until the instance's observed status satisfies `ok`; panics with the last status
    /// after `secs`.
    pub async fn wait_status(&self, id: &str, secs: u64, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let s = self.status(id).await;
            if ok(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "status not reached in {secs} s: {s}\n{}",
                self.tail_log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for `running n/n`.
    pub async fn wait_running(&self, id: &str, n: u64) -> Value {
        self.wait_status(id, 120, |s| {
            s["state"] == "running" && s["ready"] == n && s["desired"] == n
        })
        .await
    }

    /// An instance action.
    pub async fn action(&self, id: &str, action: &str) -> Resp {
        self.api(
            "POST",
            &format!("/api/v1/instances/{id}/actions/{action}"),
            Value::Null,
        )
        .await
    }

    /// The instance's log entries (newest `limit`), optionally for one replica.
    pub async fn logs(&self, id: &str, query: &str) -> Vec<Value> {
        let r = self
            .api(
                "GET",
                &format!("/api/v1/instances/{id}/logs?{query}"),
                Value::Null,
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()["log"].as_array().cloned().unwrap_or_default()
    }

    /// The end of tandem's own log, for failure messages.
    pub fn tail_log(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("tandem.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Tandem {
    fn drop(&mut self) {
        self.stop();
        if self.stop_replicas {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A flow with `GET /hello` answering `hello`.
pub fn hello_flows() -> Value {
    json!([
        { "id": "t1", "type": "tab", "label": "Hello" },
        { "id": "in", "type": "http in", "z": "t1", "url": "/hello", "method": "get", "wires": [["fn"]] },
        { "id": "fn", "type": "function", "z": "t1", "func": "msg.payload = 'hello'; return msg;", "wires": [["out"]] },
        { "id": "out", "type": "http response", "z": "t1", "statusCode": "", "headers": {}, "wires": [] }
    ])
}

/// SIGKILL a process.
pub fn kill9(pid: u64) {
    assert!(Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap()
        .success());
}

/// Whether a process runs (exists and is not a zombie).
pub fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(|st| st != "Z"))
        })
        .unwrap_or(false)
}

/// The slots an observed status shows active (taking traffic).
pub fn actives(status: &Value) -> Vec<u64> {
    status["replicas"]
        .as_array()
        .map(|rs| {
            rs.iter()
                .filter(|r| r["active"] == true)
                .filter_map(|r| r["slot"].as_u64())
                .collect()
        })
        .unwrap_or_default()
}
