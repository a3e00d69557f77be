//! `tandem serve` and `tandem user create` as processes: first start, a second start, users from
//! the command line, and a SIGKILL in the middle of writes.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::api::support::{http, Auth, TempDir};

/// A running `tandem serve` on free ports, its addresses read from its start-up line.
struct Serve {
    child: Child,
    api: SocketAddr,
    metrics: SocketAddr,
    lines: Vec<String>,
}

impl Serve {
    fn start(data: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args([
                "serve",
                "--api-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(data)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut lines = Vec::new();
        while Instant::now() < deadline {
            if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
                let serving = line.contains("tandem serving");
                lines.push(line.clone());
                if serving {
                    let field = |k: &str| -> SocketAddr {
                        let rest = &line[line.find(&format!(" {k}=")).unwrap() + k.len() + 2..];
                        rest.split_whitespace().next().unwrap().parse().unwrap()
                    };
                    let (api, metrics) = (field("api"), field("metrics"));
                    return Self {
                        child,
                        api,
                        metrics,
                        lines,
                    };
                }
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("tandem serve did not start: {lines:?}");
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A temporary data directory for a Tandem that is SIGKILLed: what it started that outlives it
/// (npm installing the stack, in a directory under it) is killed before the directory is
/// removed, or it would write the directory back as it is removed.
struct Reaped(TempDir);

impl Reaped {
    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        let Ok(root) = std::fs::canonicalize(self.0.path()) else {
            return;
        };
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return;
        };
        for p in procs.flatten() {
            let pid = p.file_name();
            let Some(pid) = pid
                .to_str()
                .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
            else {
                continue;
            };
            if std::fs::read_link(p.path().join("cwd")).is_ok_and(|cwd| cwd.starts_with(&root)) {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
    }
}

async fn call(
    api: SocketAddr,
    method: &str,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let bytes = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
    let ct = (!bytes.is_empty()).then_some("application/json");
    let r = http(
        api,
        method,
        path,
        &Auth::Bearer(token.to_string()),
        ct,
        bytes,
    )
    .await;
    (r.status, r.json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_start_writes_a_private_admin_token_once() {
    let dir = TempDir::new("tandem-serve-first");
    let data = dir.path().join("data");
    let serve = Serve::start(&data);
    let token_file = data.join("admin-token");
    assert!(
        serve.lines.iter().any(|l| l.contains("admin-token")),
        "the log says where the token is: {:?}",
        serve.lines
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_string();
    assert!(token.starts_with("tdm_"));
    let (status, me) = call(serve.api, "GET", "/api/v1/user", &token, None).await;
    assert_eq!(
        (status, me["username"].as_str(), me["admin"].as_bool()),
        (200, Some("admin"), Some(true))
    );
    let (_, stacks) = call(serve.api, "GET", "/api/v1/stacks", &token, None).await;
    assert_eq!(
        stacks["items"].as_array().unwrap().len(),
        1,
        "a default stack exists"
    );
    drop(serve);

    // A second start keeps the users and does not write a new token.
    let before = std::fs::read_to_string(&token_file).unwrap();
    let serve = Serve::start(&data);
    assert!(!serve.lines.iter().any(|l| l.contains("first start")));
    assert_eq!(std::fs::read_to_string(&token_file).unwrap(), before);
    assert_eq!(
        call(serve.api, "GET", "/api/v1/user", &token, None).await.0,
        200
    );
}

/// `/metrics` names every team's instances: the API listener answers 404 for it, to anyone;
/// the metrics listener of the same process serves it, with `/healthz`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_on_their_own_listener_only() {
    let dir = TempDir::new("tandem-serve-metrics");
    let data = dir.path().join("data");
    let serve = Serve::start(&data);
    assert_ne!(serve.metrics, serve.api);
    let token = std::fs::read_to_string(data.join("admin-token"))
        .unwrap()
        .trim()
        .to_string();
    for auth in [Auth::Anon, Auth::Bearer(token)] {
        let r = http(serve.api, "GET", "/metrics", &auth, None, Vec::new()).await;
        assert_eq!(r.status, 404, "{r}");
    }
    let r = http(
        serve.metrics,
        "GET",
        "/metrics",
        &Auth::Anon,
        None,
        Vec::new(),
    )
    .await;
    assert_eq!(r.status, 200, "{r}");
    for series in [
        "# TYPE tandem_api_requests_total counter",
        "# TYPE tandem_proxy_requests_total counter",
        "tandem_proxy_routes_instances ",
    ] {
        assert!(r.text.contains(series), "no {series} in\n{}", r.text);
    }
    let r = http(
        serve.metrics,
        "GET",
        "/healthz",
        &Auth::Anon,
        None,
        Vec::new(),
    )
    .await;
    assert_eq!((r.status, r.text.as_str()), (200, "ok\n"));
}

fn user_create(data: &Path, args: &[&str], password: &str) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["user", "create"])
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{password}\n").as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_created_on_the_command_line_can_sign_in() {
    let dir = TempDir::new("tandem-user-create");
    let data = dir.path().join("data");
    let out = user_create(
        &data,
        &["alice", "--admin", "--email", "alice@example.com"],
        "correct horse",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("created user alice"));
    let out = user_create(&data, &["alice"], "another password");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("taken"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = user_create(&data, &["bob"], "short");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 8"));

    let serve = Serve::start(&data);
    let r = http(
        serve.api,
        "POST",
        "/api/v1/auth/login",
        &Auth::Anon,
        Some("application/json"),
        json!({ "username": "alice", "password": "correct horse" })
            .to_string()
            .into_bytes(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["admin"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_in_the_middle_of_writes_loses_nothing_committed_and_leaves_nothing_half_done() {
    let dir = Reaped(TempDir::new("tandem-serve-kill"));
    let data = dir.path().join("data");
    let mut serve = Serve::start(&data);
    let token = std::fs::read_to_string(data.join("admin-token"))
        .unwrap()
        .trim()
        .to_string();
    let api = serve.api;
    let (_, team) = call(
        api,
        "POST",
        "/api/v1/teams",
        &token,
        Some(json!({ "name": "Kill" })),
    )
    .await;
    let team = team["id"].as_str().unwrap().to_string();
    let (_, app) = call(
        api,
        "POST",
        "/api/v1/applications",
        &token,
        Some(json!({ "name": "a", "team_id": team })),
    )
    .await;
    let app = app["id"].as_str().unwrap().to_string();
    let (_, stacks) = call(api, "GET", "/api/v1/stacks", &token, None).await;
    let stack = stacks["items"][0]["id"].as_str().unwrap().to_string();

    // Four writers create instances as fast as they can; the process is killed under them.
    let mut writers = Vec::new();
    for w in 0..4 {
        let (token, app, stack) = (token.clone(), app.clone(), stack.clone());
        writers.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            // Bounded: the kill comes long before the last one.
            for i in 0..100_000 {
                let body = json!({ "name": format!("k{w}-{i}"), "application_id": app, "stack_id": stack });
                let bytes = body.to_string().into_bytes();
                let auth = Auth::Bearer(token.clone());
                // In a task of its own: once the server is gone the client panics, which ends
                // this writer instead of the test.
                let r = tokio::spawn(async move {
                    http(api, "POST", "/api/v1/instances", &auth, Some("application/json"), bytes).await
                });
                match r.await {
                    Ok(r) if r.status == 201 => acknowledged.push(r.json["id"].as_str().unwrap().to_string()),
                    _ => break,
                }
            }
            acknowledged
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    serve.kill9();
    let mut acknowledged = Vec::new();
    for w in writers {
        acknowledged.extend(w.await.unwrap_or_default());
    }
    assert!(
        acknowledged.len() > 10,
        "the writers ran: {}",
        acknowledged.len()
    );

    let serve = Serve::start(&data);
    let mut listed = all_pages(
        serve.api,
        &token,
        &format!("/api/v1/teams/{team}/instances?limit=500"),
        "id",
    )
    .await;
    for id in &acknowledged {
        assert!(listed.contains(id), "acknowledged instance {id} was lost");
    }
    // Every instance that exists has its audit entry, and no entry names a missing instance.
    let mut audited = all_pages(
        serve.api,
        &token,
        &format!("/api/v1/teams/{team}/audit-log?event=instance.created&limit=500"),
        "object_id",
    )
    .await;
    audited.sort();
    listed.sort();
    let only_audited: Vec<_> = audited.iter().filter(|a| !listed.contains(a)).collect();
    let only_listed: Vec<_> = listed.iter().filter(|l| !audited.contains(l)).collect();
    assert!(
        only_audited.is_empty() && only_listed.is_empty() && audited.len() == listed.len(),
        "each instance and its audit entry are written together or not at all: audit without instance {only_audited:?}, instance without audit {only_listed:?}"
    );
}

/// `key` of every item of a cursor-paginated list.
async fn all_pages(api: SocketAddr, token: &str, path: &str, key: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let url = match &cursor {
            Some(c) => format!("{path}&cursor={c}"),
            None => path.to_string(),
        };
        let (status, page) = call(api, "GET", &url, token, None).await;
        assert_eq!(status, 200, "{page}");
        for item in page["items"].as_array().unwrap() {
            out.push(item[key].as_str().unwrap().to_string());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return out,
        }
    }
}
