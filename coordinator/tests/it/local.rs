use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;
use tandem_coordinator::driver::{Driver, DriverError, ReplicaSpec};
use tandem_coordinator::local::{probe, LocalDriver, TOKEN_HEADER};
use tandem_coordinator::logs::{Cursor, InstanceLog, LogBook};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const VERSION: &str = "4.1.2";

fn driver() -> LocalDriver {
    let dir = std::env::var_os("TANDEM_TEST_STACKS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("tandem-test-stacks"));
    LocalDriver::new(dir)
}

fn log() -> std::sync::Arc<InstanceLog> {
    LogBook::default().instance("test")
}

fn unique(prefix: &str) -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{}-{}", std::process::id(), n % 1_000_000_000)
}

fn hello_flows() -> serde_json::Value {
    json!([
        { "id": "t1", "type": "tab", "label": "Hello" },
        { "id": "in", "type": "http in", "z": "t1", "url": "/hello", "method": "get", "wires": [["ch"]] },
        { "id": "ch", "type": "change", "z": "t1", "rules": [{ "t": "set", "p": "payload", "pt": "msg", "to": "REPLICA", "tot": "env" }], "wires": [["out"]] },
        { "id": "out", "type": "http response", "z": "t1", "statusCode": "", "headers": {}, "wires": [] }
    ])
}

fn spec(instance: &str, slot: u32, ha: bool, start_stopped: bool) -> ReplicaSpec {
    ReplicaSpec {
        instance: instance.into(),
        slot,
        nodered_version: VERSION.into(),
        node_version: None,
        memory_mb: 256,
        ha,
        admin_secret: format!("secret-{instance}-{slot}"),
        credential_secret: "credential-secret".into(),
        settings: json!({ "httpNodeCors": { "origin": "*" }, "uiPort": 1 }),
        env: [("REPLICA".to_string(), format!("r{slot}"))]
            .into_iter()
            .collect(),
        flows: hello_flows(),
        start_stopped,
    }
}

/// One HTTP/1.1 request; status and body.
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .unwrap_or("0")
        .parse()
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_serves_its_flows_and_guards_its_admin_api() {
    let d = driver();
    let s = spec(&unique("solo"), 0, false, false);
    let r = d.start(&s, log()).await.unwrap();
    assert!(r.addr.ip().is_loopback());
    assert_ne!(
        r.addr.port(),
        1,
        "the port is Tandem's, whatever the settings say"
    );

    let (status, body) = http(r.addr, "GET", "/hello", &[], "").await;
    assert_eq!((status, body == "r0"), (200, true), "{body}");
    // The admin API needs the replica's secret, in Tandem's header only.
    assert_eq!(http(r.addr, "GET", "/admin/flows", &[], "").await.0, 401);
    assert_eq!(
        http(
            r.addr,
            "GET",
            "/admin/flows",
            &[(TOKEN_HEADER, "wrong")],
            ""
        )
        .await
        .0,
        401
    );
    assert_eq!(
        http(
            r.addr,
            "GET",
            "/admin/flows",
            &[("authorization", &format!("Bearer {}", s.admin_secret))],
            ""
        )
        .await
        .0,
        401
    );
    assert_eq!(
        http(
            r.addr,
            "GET",
            "/admin/flows",
            &[(TOKEN_HEADER, &s.admin_secret)],
            ""
        )
        .await
        .0,
        200
    );
    // Not HA: the editor is there.
    assert_eq!(http(r.addr, "GET", "/admin/", &[], "").await.0, 200);
    // The secrets never reach the disk.
    let settings =
        std::fs::read_to_string(r.user_dir.as_ref().unwrap().join("settings.js")).unwrap();
    assert!(!settings.contains(&s.admin_secret) && !settings.contains("credential-secret"));

    d.stop(&r.id).await.unwrap();
    assert!(
        tokio::net::TcpStream::connect(r.addr).await.is_err(),
        "stopped replicas stop listening"
    );
    let pid = r.pid.unwrap();
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the process is gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_replicas_have_no_editor_and_can_boot_with_flows_stopped() {
    let d = driver();
    let s = spec(&unique("ha"), 1, true, true);
    let r = d.start(&s, log()).await.unwrap();
    assert_eq!(
        http(r.addr, "GET", "/admin/", &[], "").await.0,
        404,
        "no editor on HA replicas"
    );
    // Node-RED reports "start" for a moment each time it re-evaluates its flows (for example
    // when node types finish registering) before it applies the stopped state, without starting
    // anything; the state it settles in is the one that counts.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let state = probe(r.addr, &s.admin_secret).await.unwrap();
        if state == "stop" || state == "safe" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "flows must not run: {state}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        http(r.addr, "GET", "/hello", &[], "").await.0,
        404,
        "flows are stopped"
    );
    let (status, body) = http(
        r.addr,
        "POST",
        "/admin/flows/state",
        &[
            (TOKEN_HEADER, &s.admin_secret),
            ("content-type", "application/json"),
        ],
        r#"{"state":"start"}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = http(r.addr, "GET", "/hello", &[], "").await;
    assert_eq!((status, body == "r1"), (200, true), "{body}");
    d.stop(&r.id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_routes_to_a_real_replica() {
    use tandem_coordinator::proxy::{
        InstanceSpec, Proxy, ProxyConfig, ProxyStats, ReplicaSpec as Route, Routes,
    };
    let d = driver();
    let name = unique("routed");
    let s = spec(&name, 0, true, false);
    let r = d.start(&s, log()).await.unwrap();
    let routes = std::sync::Arc::new(Routes::new());
    routes
        .publish(&[InstanceSpec {
            editor_secret: None,
            name: name.clone(),
            hosts: vec![format!("{name}.localhost")],
            ha: true,
            affinity: false,
            replicas: vec![Route {
                id: r.id.clone(),
                addr: r.addr,
                ready: true,
            }],
            health: None,
        }])
        .unwrap();
    let proxy = std::sync::Arc::new(Proxy::new(
        routes,
        ProxyConfig::default(),
        std::sync::Arc::new(ProxyStats::default()),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(tandem_coordinator::proxy::server::serve(
        listener,
        proxy,
        std::future::pending(),
    ));
    let host = format!("{name}.localhost");
    let (status, body) = http(addr, "GET", "/hello", &[("host", &host)], "").await;
    assert_eq!((status, body == "r0"), (200, true), "{body}");
    // HA: the editor and admin API are refused at the proxy, secret or not.
    let (status, _) = http(
        addr,
        "GET",
        "/admin/flows",
        &[("host", &host), (TOKEN_HEADER, &s.admin_secret)],
        "",
    )
    .await;
    assert_eq!(status, 403);
    server.abort();
    d.stop(&r.id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_npm_cannot_install_is_a_clear_error() {
    let d = driver();
    let mut s = spec(&unique("bad"), 0, false, false);
    s.nodered_version = "0.0.0-no-such-version".into();
    let install_log = log();
    let started = tokio::time::timeout(Duration::from_secs(120), d.start(&s, install_log.clone()))
        .await
        .unwrap();
    match started {
        Err(DriverError::Install {
            package,
            version,
            output,
        }) => {
            assert_eq!(package, "node-red");
            assert_eq!(version, "0.0.0-no-such-version");
            assert!(!output.is_empty());
            // npm's own words reach the instance log.
            assert!(!install_log
                .read(Cursor::Latest, 100, Some("npm"))
                .entries
                .is_empty());
        }
        other => panic!("expected an install error, got {other:?}"),
    }
    s.nodered_version = "4.1.2; rm -rf /".into();
    assert!(matches!(
        d.start(&s, log()).await,
        Err(DriverError::Install { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_is_restarted_and_serves_again() {
    use tandem_coordinator::restart::RestartPolicy;
    use tandem_coordinator::supervise::{supervise, Event};
    let d = std::sync::Arc::new(driver());
    let s = spec(&unique("phoenix"), 0, false, false);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let policy = RestartPolicy {
        base: Duration::from_millis(100),
        ..RestartPolicy::default()
    };
    let task = tokio::spawn(supervise(
        d.clone(),
        s.clone(),
        log(),
        policy,
        stop_rx,
        move |e| {
            let _ = tx.send(e);
        },
    ));
    let Event::Ready(first) = next(&mut rx).await else {
        panic!("expected Ready")
    };
    assert_eq!(
        http(first.addr, "GET", "/hello", &[], "").await,
        (200, "r0".to_string())
    );

    // SIGKILL, as the OOM killer would.
    let pid = first.pid.unwrap();
    assert!(std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    match next(&mut rx).await {
        Event::Exited { reason, restarts } => {
            assert!(
                reason.contains("signal: 9") || reason.contains("SIGKILL"),
                "{reason}"
            );
            assert_eq!(restarts, 1);
        }
        other => panic!("expected Exited, got {other:?}"),
    }
    let Event::Ready(second) = next(&mut rx).await else {
        panic!("expected Ready again")
    };
    assert_ne!(second.pid, first.pid);
    assert_eq!(
        http(second.addr, "GET", "/hello", &[], "").await,
        (200, "r0".to_string())
    );

    stop_tx.send(true).unwrap();
    assert_eq!(next(&mut rx).await, Event::Stopped);
    task.await.unwrap();
    assert!(tokio::net::TcpStream::connect(second.addr).await.is_err());
}

async fn next(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<tandem_coordinator::supervise::Event>,
) -> tandem_coordinator::supervise::Event {
    loop {
        let e = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .unwrap()
            .unwrap();
        if e != tandem_coordinator::supervise::Event::Starting {
            return e;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_is_logged_by_replica_and_a_new_driver_adopts_a_running_replica() {
    let s = spec(&unique("adopt"), 1, false, false);
    let first = driver();
    let log1 = log();
    let r = first.start(&s, log1.clone()).await.unwrap();
    assert!(!r.adopted);
    // Node-RED's JSON lines arrive tagged with the replica.
    let page = log1.read(Cursor::Latest, 1000, Some(&s.id()));
    assert!(
        page.entries
            .iter()
            .any(|e| e.msg.contains("Started flows") && e.level == "info"),
        "{page:?}"
    );
    assert!(page.entries.iter().all(|e| e.src == s.id()));

    // A second driver over the same data dir (Tandem restarted) takes it over as it runs.
    let second = driver();
    let log2 = log();
    let again = second.start(&s, log2.clone()).await.unwrap();
    assert!(again.adopted);
    assert_eq!((again.pid, again.addr), (r.pid, r.addr));
    assert_eq!(
        http(again.addr, "GET", "/hello", &[], "").await,
        (200, "r1".to_string())
    );
    // Its recent output is replayed into the new log.
    assert!(log2
        .read(Cursor::Latest, 1000, Some(&s.id()))
        .entries
        .iter()
        .any(|e| e.msg.contains("Started flows")));
    assert!(!again.stale);
    // A changed spec (a change made while Tandem was down, or an upgrade of Tandem) is adopted
    // as stale: it keeps serving until the coordinator replaces it, when it can spare it.
    let mut changed = s.clone();
    changed.env.insert("EXTRA".into(), "1".into());
    let third = driver();
    let stale = third.start(&changed, log()).await.unwrap();
    assert!(stale.adopted && stale.stale, "{stale:?}");
    assert_eq!(stale.pid, r.pid);
    // Replaced: the old process goes, a new one starts with the new spec.
    third.stop(&stale.id).await.unwrap();
    let fresh = third.start(&changed, log()).await.unwrap();
    assert!(!fresh.adopted && !fresh.stale);
    assert_ne!(fresh.pid, r.pid);
    assert!(!std::path::Path::new(&format!("/proc/{}", r.pid.unwrap())).exists());
    third.stop(&fresh.id).await.unwrap();
    assert!(tokio::net::TcpStream::connect(fresh.addr).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stack_can_bring_its_own_node_runtime() {
    let d = driver();
    let mut s = spec(&unique("runtime"), 0, false, false);
    s.node_version = Some("22.12.0".into());
    let log = log();
    let r = d.start(&s, log.clone()).await.unwrap();
    // The replica runs on the runtime installed from npm, not the system's node.
    let exe = std::fs::read_link(format!("/proc/{}/exe", r.pid.unwrap())).unwrap();
    assert!(
        exe.to_string_lossy().contains("node-22.12.0"),
        "{}",
        exe.display()
    );
    assert_eq!(
        http(r.addr, "GET", "/hello", &[], "").await,
        (200, "r0".to_string())
    );
    d.stop(&r.id).await.unwrap();
    // A runtime npm does not have is a clear error naming it.
    s.node_version = Some("0.0.1-no-such-node".into());
    match d.start(&s, log).await {
        Err(DriverError::Install { package, .. }) => assert_eq!(package, "node"),
        other => panic!("expected an install error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_log_file_is_rotated_and_every_line_still_reaches_the_log() {
    let mut d = driver();
    d.max_log_bytes = 4096;
    let mut s = spec(&unique("chatty"), 0, false, false);
    // 200 warnings of ~100 bytes each at start: several rotations' worth.
    let mut flows = hello_flows();
    for node in [
        json!({ "id": "go", "type": "inject", "z": "t1", "once": true, "onceDelay": 0.1, "repeat": "", "wires": [["talk"]] }),
        json!({ "id": "talk", "type": "function", "z": "t1", "func": "for (let i = 0; i < 200; i++) { node.warn('line ' + i + ' ' + 'x'.repeat(80)); } return null;", "wires": [[]] }),
    ] {
        flows.as_array_mut().unwrap().push(node);
    }
    s.flows = flows;
    let log = log();
    let r = d.start(&s, log.clone()).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let seen = loop {
        let page = log.read(Cursor::Latest, 1000, Some(&s.id()));
        let n = page
            .entries
            .iter()
            .filter(|e| e.level == "warn" && e.msg.starts_with("line "))
            .count();
        if n == 200 || std::time::Instant::now() > deadline {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(seen, 200, "every line reached the log");
    let file = d.log_file(&s.instance, 0);
    let old = file.with_extension("log.1");
    assert!(old.exists(), "rotated into {}", old.display());
    let size = std::fs::metadata(&file).unwrap().len();
    assert!(
        size <= 4096 + 1024,
        "the live file stays near the limit: {size}"
    );
    d.stop(&r.id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_can_be_deployed_and_stopped_without_a_restart() {
    let d = driver();
    let s = spec(&unique("deploy"), 0, false, false);
    let r = d.start(&s, log()).await.unwrap();
    assert_eq!(
        http(r.addr, "GET", "/hello", &[], "").await,
        (200, "r0".to_string())
    );
    // New flows through the admin API: the same process answers with them.
    let flows = json!([
        { "id": "t1", "type": "tab", "label": "Hello" },
        { "id": "in", "type": "http in", "z": "t1", "url": "/hello", "method": "get", "wires": [["fn"]] },
        { "id": "fn", "type": "function", "z": "t1", "func": "msg.payload = 'deployed'; return msg;", "wires": [["out"]] },
        { "id": "out", "type": "http response", "z": "t1", "statusCode": "", "headers": {}, "wires": [] }
    ]);
    d.deploy(&r.id, &flows).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while http(r.addr, "GET", "/hello", &[], "").await.1 != "deployed" {
        assert!(
            std::time::Instant::now() < deadline,
            "the deploy did not take"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Flows stopped: the endpoint is gone; started again: back, same process.
    d.set_flows_running(&r.id, false).await.unwrap();
    assert_eq!(probe(r.addr, &s.admin_secret).await.unwrap(), "stop");
    assert_eq!(http(r.addr, "GET", "/hello", &[], "").await.0, 404);
    d.set_flows_running(&r.id, true).await.unwrap();
    assert_eq!(probe(r.addr, &s.admin_secret).await.unwrap(), "start");
    assert_eq!(
        http(r.addr, "GET", "/hello", &[], "").await,
        (200, "deployed".to_string())
    );
    // Bad flows are refused with Node-RED's reason, and unknown replicas are an error.
    assert!(d
        .deploy(&r.id, &json!({ "not": "an array" }))
        .await
        .is_err());
    assert!(d.deploy("nope-r0", &flows).await.is_err());
    d.stop(&r.id).await.unwrap();
}
