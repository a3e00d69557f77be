//! Issue 13's standalone proxies: `tandem proxy --control-plane` in front of `tandem serve`,
//! fed by its route feed. They keep serving while the control plane is killed and restarted,
//! follow it afterwards, serve from their cache when they start during an outage, and hold a
//! replica's drain until their own requests to it are done.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::{free_port, http, Tandem};

/// A running `tandem proxy --control-plane`.
pub(crate) struct Standalone {
    child: Option<Child>,
    addr: std::net::SocketAddr,
    metrics: std::net::SocketAddr,
}

impl Standalone {
    fn start(t: &Tandem, id: &str, token_file: &Path, cache: &Path, port: u16) -> Self {
        Self::start_with(t, id, token_file, cache, port, &[])
    }

    /// [`Standalone::start`] with more flags.
    pub(crate) fn start_with(
        t: &Tandem,
        id: &str,
        token_file: &Path,
        cache: &Path,
        port: u16,
        extra: &[&str],
    ) -> Self {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(t.dir.join(format!("{id}.log")))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_tandem-under-test"))
            .arg("proxy")
            .args(["--control-plane", &format!("http://{}", t.api)])
            .arg("--token-file")
            .arg(token_file)
            .arg("--cache-file")
            .arg(cache)
            .args(["--proxy-id", id])
            .args(["--listen", &addr.to_string()])
            .args(["--metrics-listen", &metrics.to_string()])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        Self {
            child: Some(child),
            addr,
            metrics,
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub(crate) async fn get(&self, instance: &str, path: &str) -> Option<(u16, String)> {
        http(
            self.addr,
            "GET",
            &format!("{instance}.localhost"),
            path,
            &[],
            "",
        )
        .await
        .ok()
        .map(|r| (r.status, r.body))
    }

    /// Waits until `GET path` of `instance` through this proxy answers 200 `body`.
    async fn serves(&self, instance: &str, path: &str, body: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = self.get(instance, path).await;
            if got.as_ref().is_some_and(|(s, b)| *s == 200 && b == body) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{instance}{path} through {} answers {got:?}",
                self.addr
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The value of `name` on the proxy's metrics page.
    async fn metric(&self, name: &str) -> Option<f64> {
        let r = http(self.metrics, "GET", "metrics", "/metrics", &[], "")
            .await
            .ok()?;
        r.body
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
    }

    pub(crate) async fn connected(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.metric("tandem_proxy_control_plane_connected").await != Some(1.0) {
            assert!(Instant::now() < deadline, "{} never connected", self.addr);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Standalone {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `GET /hello` answers `hello`; `GET /slow` answers `slow` after 400 ms.
fn flows() -> Value {
    json!([
        { "id": "t1", "type": "tab", "label": "Edge" },
        { "id": "in", "type": "http in", "z": "t1", "url": "/hello", "method": "get", "wires": [["fn"]] },
        { "id": "fn", "type": "function", "z": "t1", "func": "msg.payload = 'hello'; return msg;", "wires": [["out"]] },
        { "id": "sin", "type": "http in", "z": "t1", "url": "/slow", "method": "get", "wires": [["wait"]] },
        { "id": "wait", "type": "delay", "z": "t1", "pauseType": "delay", "timeout": "400", "timeoutUnits": "milliseconds", "wires": [["sfn"]] },
        { "id": "sfn", "type": "function", "z": "t1", "func": "msg.payload = 'slow'; return msg;", "wires": [["out"]] },
        { "id": "out", "type": "http response", "z": "t1", "statusCode": "", "headers": {}, "wires": [] }
    ])
}

/// Requests through every proxy, one at a time per proxy and path, until stopped: every answer
/// but 200 with the expected body counts as failed.
struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    failed: Arc<std::sync::Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(proxies: &[&Standalone], instance: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for p in proxies {
            for (path, body) in [("/hello", "hello"), ("/slow", "slow")] {
                let (addr, host) = (p.addr, format!("{instance}.localhost"));
                let (stop, sent, failed) = (stop.clone(), sent.clone(), failed.clone());
                tasks.push(tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let r = tokio::time::timeout(
                            Duration::from_secs(10),
                            http(addr, "GET", &host, path, &[], ""),
                        )
                        .await;
                        sent.fetch_add(1, Ordering::Relaxed);
                        match r {
                            Ok(Ok(r)) if r.status == 200 && r.body == body => {}
                            other => failed
                                .lock()
                                .unwrap()
                                .push(format!("{addr}{path}: {other:?}")),
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }));
            }
        }
        Self {
            stop,
            sent,
            failed,
            tasks,
        }
    }

    async fn stop(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        (
            self.sent.load(Ordering::Relaxed),
            self.failed.lock().unwrap().clone(),
        )
    }
}

pub(crate) async fn proxy_token(t: &Tandem) -> PathBuf {
    let r = t
        .api("POST", "/api/v1/proxy-tokens", json!({ "name": "edge" }))
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let path = t.dir.join("proxy-token");
    std::fs::write(&path, r.json()["token_value"].as_str().unwrap()).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_proxies_serve_through_a_control_plane_crash_and_hold_drains_for_their_requests()
{
    let mut t = Tandem::start_with("standalone", &["--drain-timeout-ms", "20000"]).await;
    let dir = t.dir.clone();
    let (app, _) = t.team_and_app("Edge").await;
    let id = t.instance(&app, "edge", flows(), 2).await;
    t.wait_running(&id, 2).await;
    let token = proxy_token(&t).await;
    let caches = [dir.join("p1-routes.json"), dir.join("p2-routes.json")];
    let ports = [free_port(), free_port()];
    let mut p1 = Standalone::start(&t, "p1", &token, &caches[0], ports[0]);
    let p2 = Standalone::start(&t, "p2", &token, &caches[1], ports[1]);
    for p in [&p1, &p2] {
        p.connected().await;
        p.serves("edge", "/hello", "hello").await;
    }

    // The control plane crashes and comes back: no request through either proxy fails.
    let load = Load::start(&[&p1, &p2], "edge");
    tokio::time::sleep(Duration::from_millis(500)).await;
    t.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t2 = Tandem::start_in(&dir, true).await;
    for p in [&p1, &p2] {
        p.connected().await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Every replica replaced, one at a time, while both proxies have requests in flight to
    // them (400 ms each): each replica's drain waits for the proxies' own requests.
    let before: Vec<Value> = t2.wait_running(&id, 2).await["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["pid"].clone())
        .collect();
    assert_eq!(t2.action(&id, "restart").await.status, 200);
    t2.wait_status(&id, 120, |s| {
        s["ready"] == 2
            && s["replicas"]
                .as_array()
                .unwrap()
                .iter()
                .all(|r| r["pid"].is_u64() && !before.contains(&r["pid"]))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (sent, failed) = load.stop().await;
    assert!(sent > 50, "only {sent} requests");
    assert!(
        failed.is_empty(),
        "{} of {sent} failed: {failed:?}",
        failed.len()
    );

    // A change made after the restart reaches both proxies.
    let after = t2.instance(&app, "after", flows(), 1).await;
    t2.wait_running(&after, 1).await;
    for p in [&p1, &p2] {
        p.serves("after", "/hello", "hello").await;
    }
    // The editor of a non-HA instance through a standalone proxy: the control plane's gate
    // decides (a team member's token opens it, no credentials get 401), and the proxy adds the
    // instance's admin secret.
    let auth = format!("Bearer {}", t2.token);
    let host = "after.localhost";
    let r = http(
        p1.addr,
        "GET",
        host,
        "/admin/settings",
        &[("Authorization", &auth)],
        "",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let r = http(p1.addr, "GET", host, "/admin/settings", &[], "")
        .await
        .unwrap();
    assert_eq!(r.status, 401, "{r:?}");
    // The console's editor ticket, through a standalone proxy: exchanged by the control plane
    // for a host-only session cookie that opens the editor; good once, whichever proxy it is
    // brought to next.
    let r = t2
        .api(
            "POST",
            &format!("/api/v1/instances/{after}/editor-ticket"),
            Value::Null,
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let url = r.json()["url"].as_str().unwrap().to_string();
    let ticket_path = &url[url.find("/_tandem/").unwrap()..];
    let r = http(p1.addr, "GET", host, ticket_path, &[], "")
        .await
        .unwrap();
    assert_eq!(r.status, 303, "{r:?}");
    assert_eq!(r.header("location"), Some("/admin/"));
    let set = r.header("set-cookie").unwrap().to_string();
    assert!(
        set.starts_with("tandem_session=") && set.ends_with("; Path=/; HttpOnly; SameSite=Lax"),
        "{set}"
    );
    let cookie = set.split(';').next().unwrap();
    let r = http(
        p1.addr,
        "GET",
        host,
        "/admin/settings",
        &[("Cookie", cookie)],
        "",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    for p in [&p1, &p2] {
        let r = http(p.addr, "GET", host, ticket_path, &[], "")
            .await
            .unwrap();
        assert_eq!(r.status, 403, "{r:?}");
        assert!(r.body.contains("used already"), "{}", r.body);
    }

    // A proxy started while the control plane is down serves from its cache (0600: it holds
    // admin secrets).
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&caches[0]).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let mut t2 = t2;
    t2.kill();
    p1.kill();
    let p1 = Standalone::start(&t2, "p1", &token, &caches[0], ports[0]);
    p1.serves("edge", "/hello", "hello").await;
    p1.serves("after", "/hello", "hello").await;
    assert_eq!(
        p1.metric("tandem_proxy_control_plane_connected").await,
        Some(0.0)
    );
    // Back, for the replicas to be stopped with it. A SIGTERM does not wait for the proxies
    // to hang up their feeds (the harness would SIGKILL it after 40 s).
    let mut t3 = Tandem::start_in(&dir, true).await;
    p1.connected().await;
    let stopping = Instant::now();
    t3.stop();
    assert!(
        stopping.elapsed() < Duration::from_secs(20),
        "tandem serve took {:?} to stop with a proxy on its feed",
        stopping.elapsed()
    );
    drop(t3);
    drop(t2);
    drop(t);
}

/// The MQTT path of a cluster (`--driver kubernetes`, where a Service cannot list a port per
/// replica): `tandem serve --no-proxy --mqtt-proxy-address` gives each replica a URL with its own
/// token on the standalone proxies' MQTT listener, and the proxies learn the tokens' hashes from
/// the route feed. An HA instance's replicas log in there and share the jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_log_in_to_the_standalone_proxys_mqtt_listener_with_tokens_from_the_feed() {
    let broker = crate::mqtt::Mosquitto::start();
    let mqtt = format!("127.0.0.1:{}", free_port());
    let t = Tandem::start_with(
        "standalone-mqtt",
        &["--no-proxy", "--mqtt-proxy-address", &mqtt],
    )
    .await;
    let token = proxy_token(&t).await;
    let upstream = broker.addr.to_string();
    let proxy = Standalone::start_with(
        &t,
        "edge-mqtt",
        &token,
        &t.dir.join("edge-mqtt.json"),
        free_port(),
        &["--mqtt-listen", &mqtt, "--mqtt-upstream", &upstream],
    );
    proxy.connected().await;
    let id = crate::mqtt::replicas_share_jobs(&t, &broker).await;
    let logs = t.logs(&id, "limit=1000").await;
    for src in ["mq-r0", "mq-r1"] {
        assert_eq!(
            crate::mqtt::connected_to(&logs, src),
            format!("mqtt://{src}:***@{mqtt}")
        );
    }
    // The proxy counts the replicas' connections, and refused nobody.
    assert_eq!(
        proxy
            .metric("tandem_proxy_mqtt_connections{instance=\"mq\",replica=\"r0\"}")
            .await,
        Some(1.0)
    );
    assert_eq!(
        proxy
            .metric("tandem_proxy_mqtt_shared_rejected_total")
            .await,
        Some(0.0)
    );
}

/// HTTP auth of flows' endpoints through a standalone proxy: the mode comes with the route
/// feed, and the proxy asks the control plane about each new credential.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_proxy_keeps_an_instances_endpoints_to_its_tokens() {
    let t = Tandem::start("standalone-http-auth").await;
    let token_file = proxy_token(&t).await;
    let proxy = Standalone::start(
        &t,
        "edge-auth",
        &token_file,
        &t.dir.join("edge-auth.json"),
        free_port(),
    );
    proxy.connected().await;
    let (app, _) = t.team_and_app("Edge").await;
    let id = t.instance(&app, "walled", flows(), 1).await;
    t.wait_running(&id, 1).await;
    proxy.serves("walled", "/hello", "hello").await;
    let path = format!("/api/v1/instances/{id}");
    let r = t
        .api(
            "PUT",
            &format!("{path}/http-auth"),
            json!({ "mode": "tokens" }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = t
        .api(
            "POST",
            &format!("{path}/http-tokens"),
            json!({ "name": "edge" }),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let token = r.json()["token_value"].as_str().unwrap().to_string();
    let call = |auth: Option<String>| {
        let addr = proxy.addr;
        async move {
            let headers: Vec<(&str, &str)> = auth
                .as_deref()
                .map(|a| ("Authorization", a))
                .into_iter()
                .collect();
            http(addr, "GET", "walled.localhost", "/hello", &headers, "")
                .await
                .unwrap()
        }
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while call(None).await.status != 401 {
        assert!(
            Instant::now() < deadline,
            "the proxy never protected walled"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = call(Some("Bearer tdh_wrong".into())).await;
    assert_eq!(r.status, 401);
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer realm=\"walled\"")
    );
    let r = call(Some(format!("Bearer {token}"))).await;
    assert_eq!((r.status, r.body.as_str()), (200, "hello"));
}
