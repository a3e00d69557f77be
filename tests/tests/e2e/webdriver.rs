//! A minimal W3C WebDriver client for the browser tests: Debian's `chromedriver` on a free port,
//! driving headless Chromium with an empty profile per session. Only the commands the tests use
//! (navigate, run a script, read and set cookies, resize, take a screenshot), over plain HTTP/1.1
//! on loopback, so the workspace needs no WebDriver crate.
//!
//! A session dropped while its test panics saves a screenshot of its page first, under
//! [`screenshot_dir`], and says where.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

use crate::harness::free_port;

/// Where Debian's `chromium` and `chromium-driver` packages put them.
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// A `chromedriver` of the test's own; killed on drop with every browser it started.
pub struct Chromedriver {
    addr: SocketAddr,
    child: Child,
    /// Its log, and the browsers' profiles: removed on drop, after the kill.
    dir: tempfile::TempDir,
}

impl Chromedriver {
    /// Starts `chromedriver` on a free port and waits until it is ready.
    pub async fn start() -> Self {
        for bin in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                Path::new(bin).exists(),
                "{bin} is missing: apt-get install chromium chromium-driver (.ci/run does)"
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("tandem-e2e-chromedriver-")
            .tempdir()
            .unwrap();
        let port = free_port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .arg(format!(
                "--log-path={}",
                dir.path().join("chromedriver.log").display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group, so that the drop ends the browsers it started too.
            .process_group(0)
            .spawn()
            .unwrap();
        let driver = Self {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(v) = driver.call("GET", "/status", &Value::Null).await {
                if v["ready"] == true {
                    return driver;
                }
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver not ready in 20 s:\n{}",
                driver.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A new headless Chromium with an empty profile: no cookie, no cache.
    pub async fn session(&self) -> Session {
        let profile = tempfile::Builder::new()
            .prefix("profile-")
            .tempdir_in(self.dir.path())
            .unwrap();
        // The flags of a browser on a machine without a GPU, a sandbox (root in a container) or
        // a network: without the background-networking ones Chromium keeps calling home.
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1280,900",
            &format!("--user-data-dir={}", profile.path().display()),
        ];
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "timeouts": { "pageLoad": 60_000, "script": 10_000 },
            "goog:chromeOptions": { "binary": CHROMIUM, "args": args },
        } } });
        let value = self
            .call("POST", "/session", &caps)
            .await
            .unwrap_or_else(|e| panic!("no browser: {e}\n{}", self.log_tail()));
        Session {
            driver: self.addr,
            id: value["sessionId"].as_str().unwrap().to_string(),
            _profile: profile,
        }
    }

    /// The last lines of chromedriver's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text =
            std::fs::read_to_string(self.dir.path().join("chromedriver.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    async fn call(&self, method: &str, path: &str, body: &Value) -> Result<Value, String> {
        call(self.addr, method, path, body).await
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        // The whole group: chromedriver and the browsers a failed test left open.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One browser (a WebDriver session); closed on drop.
pub struct Session {
    driver: SocketAddr,
    id: String,
    /// Its profile directory: removed on drop, after the browser closed.
    _profile: tempfile::TempDir,
}

impl Session {
    /// Opens `url` and waits for its load event.
    pub async fn goto(&self, url: &str) {
        self.cmd("POST", "url", json!({ "url": url }))
            .await
            .unwrap_or_else(|e| panic!("cannot open {url}: {e}"));
    }

    /// Runs `script` (a function body) in the page; what it returns.
    pub async fn execute(&self, script: &str) -> Value {
        self.cmd(
            "POST",
            "execute/sync",
            json!({ "script": script, "args": [] }),
        )
        .await
        .unwrap_or_else(|e| panic!("script failed: {e}"))
    }

    /// The text the page shows.
    pub async fn text(&self) -> String {
        self.execute("return document.body ? document.body.innerText : '';")
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The value of the current page's cookie `name` (`HttpOnly` ones included).
    pub async fn cookie(&self, name: &str) -> Option<String> {
        self.cmd("GET", &format!("cookie/{name}"), Value::Null)
            .await
            .ok()
            .and_then(|c| c["value"].as_str().map(str::to_string))
    }

    /// Sets a cookie for the current page's host, as the proxy would (`HttpOnly`, path `/`).
    pub async fn set_cookie(&self, name: &str, value: &str) {
        let cookie = json!({ "cookie": {
            "name": name, "value": value, "path": "/", "httpOnly": true, "sameSite": "Lax",
        } });
        self.cmd("POST", "cookie", cookie)
            .await
            .unwrap_or_else(|e| panic!("cannot set cookie {name}: {e}"));
    }

    /// Deletes every cookie of the current page's host.
    pub async fn delete_cookies(&self) {
        self.cmd("DELETE", "cookie", Value::Null)
            .await
            .unwrap_or_else(|e| panic!("cannot delete cookies: {e}"));
    }

    /// The handles of the session's windows and tabs, oldest first.
    pub async fn windows(&self) -> Vec<String> {
        let v = self
            .cmd("GET", "window/handles", Value::Null)
            .await
            .unwrap_or_else(|e| panic!("cannot list windows: {e}"));
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|h| h.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Makes window `handle` the one the next commands go to.
    pub async fn switch_to(&self, handle: &str) {
        self.cmd("POST", "window", json!({ "handle": handle }))
            .await
            .unwrap_or_else(|e| panic!("cannot switch to window {handle}: {e}"));
    }

    /// Sets the window's size, in CSS pixels.
    pub async fn resize(&self, width: u32, height: u32) {
        self.cmd(
            "POST",
            "window/rect",
            json!({ "width": width, "height": height }),
        )
        .await
        .unwrap_or_else(|e| panic!("cannot resize the window: {e}"));
    }

    /// Saves a PNG of what the window shows at `path`.
    pub async fn screenshot(&self, path: &Path) -> Result<(), String> {
        use base64::Engine;
        let png = self.cmd("GET", "screenshot", Value::Null).await?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap_or_default())
            .map_err(|e| format!("the screenshot is not base64: {e}"))?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        std::fs::write(path, png).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// On a failed test (the drop runs while it panics): a screenshot of the page, named after
    /// the test's thread, which libtest names after the test. Only from a multi-threaded
    /// runtime, where a drop may wait for the driver.
    fn screenshot_of_failure(&self) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if handle.runtime_flavor() != tokio::runtime::RuntimeFlavor::MultiThread {
            return;
        }
        let test = std::thread::current()
            .name()
            .unwrap_or("test")
            .replace("::", "-");
        let id: String = self.id.chars().take(8).collect();
        let path = screenshot_dir().join(format!("{test}-failed-{id}.png"));
        match tokio::task::block_in_place(|| handle.block_on(self.screenshot(&path))) {
            Ok(()) => eprintln!("the page at the failure: {}", path.display()),
            Err(e) => eprintln!("no screenshot of the failure: {e}"),
        }
    }

    async fn cmd(&self, method: &str, what: &str, body: Value) -> Result<Value, String> {
        let path = format!("/session/{}/{what}", self.id);
        call(self.driver, method, &path, &body).await
    }
}

/// Where the browser tests save screenshots: `screenshots/` in the test's output directory
/// (Cargo's `CARGO_TARGET_TMPDIR`, under the target directory).
pub fn screenshot_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("screenshots")
}

impl Drop for Session {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.screenshot_of_failure();
        }
        // Blocking, and short: the driver is on loopback. A session left open would keep its
        // browser running until the driver's drop.
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&self.driver, Duration::from_secs(2))
        else {
            return;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let req = format!(
            "DELETE /session/{} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            self.id
        );
        // The answer comes once the browser is closed; chromedriver keeps the connection open
        // after it, so one read, not a read to the end.
        if s.write_all(req.as_bytes()).is_ok() {
            let _ = s.read(&mut [0; 1024]);
        }
    }
}

/// One WebDriver command: its `value`, or the driver's error and message.
async fn call(driver: SocketAddr, method: &str, path: &str, body: &Value) -> Result<Value, String> {
    let what = format!("{method} {path}");
    // POSTs always carry a JSON body (`{}` at least), as the protocol wants.
    let body = match (method, body) {
        ("POST", Value::Null) => "{}".to_string(),
        (_, Value::Null) => String::new(),
        (_, b) => b.to_string(),
    };
    let (status, text) = exchange(driver, method, path, &body)
        .await
        .map_err(|e| format!("{what}: {e}"))?;
    let value = serde_json::from_str::<Value>(&text).unwrap_or(Value::Null)["value"].clone();
    if status == 200 {
        Ok(value)
    } else {
        Err(format!(
            "{what}: {status} {}: {}",
            value["error"], value["message"]
        ))
    }
}

/// One request and its answer's status and body. The body is read by its `Content-Length`:
/// chromedriver answers `Connection: close` but keeps the connection open, so reading to the
/// end (as the harness's client does) would wait forever.
async fn exchange(
    driver: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    let stream = tokio::net::TcpStream::connect(driver).await?;
    let mut stream = tokio::io::BufReader::new(stream);
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.get_mut().write_all(req.as_bytes()).await?;
    let mut line = String::new();
    stream.read_line(&mut line).await?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status line in {line:?}")))?;
    let mut length = 0;
    loop {
        line.clear();
        if stream.read_line(&mut line).await? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut buf = vec![0; length];
    stream.read_exact(&mut buf).await?;
    Ok((status, String::from_utf8_lossy(&buf).into_owned()))
}
