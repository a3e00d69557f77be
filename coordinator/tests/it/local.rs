//! The local driver with real Node-RED processes: each test has its own data directory (a
//! `tempfile` directory) and shares the stacks installed with npm (`TANDEM_TEST_STACKS`, default
//! `<tmp>/tandem-test-stacks`, under `stacks/`).
//!
//! Deadlines here only keep a broken test from hanging; nothing asserts how fast anything is.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustix::process::{Pid, Signal};
use serde_json::json;
use tandem_coordinator::dataplane::InProcess;
use tandem_coordinator::driver::{
    Driver, DriverError, Event, EventKind, Gate, InstanceDriver, Liveness, Running,
};
use tandem_coordinator::local::{legacy_spec_hash, LocalDriver, LocalInstance};
use tandem_coordinator::logs::{Cursor, InstanceLog, LogBook};
use tandem_coordinator::proxy::credentials::ADMIN_TOKEN;
use tandem_coordinator::replica::{ExitReason, FlowState, ReplicaId, ReplicaPhase};
use tandem_coordinator::spec::{DesiredState, Flows, InstanceDesired, Probe, ProcessSpec};
use tandem_coordinator::status::Coordination;
use tandem_coordinator::{Coordinator, CoordinatorConfig};
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};

const VERSION: &str = "4.1.2";

/// Longest wait for anything (an event, an answer, an install): a guard against hanging, not a
/// measure of speed.
const DEADLINE: Duration = Duration::from_secs(120);

// === fixtures ===

/// The stacks shared by every test run (npm installs are slow).
fn stacks_dir() -> PathBuf {
    std::env::var_os("TANDEM_TEST_STACKS")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("tandem-test-stacks"))
        .join("stacks")
}

/// One test's data directory. Replicas outlive their driver by design, so whatever still runs
/// in it when the test ends (after a failed assertion) is killed before it is deleted.
struct DataDir(tempfile::TempDir);

impl DataDir {
    fn new() -> Self {
        Self(tempfile::tempdir().unwrap())
    }

    fn path(&self) -> &Path {
        self.0.path()
    }

    /// The directory the local driver keeps an instance in.
    fn instance(&self, name: &str) -> PathBuf {
        LocalDriver::new(self.path()).instance_dir(name)
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        let Ok(root) = self.path().canonicalize() else {
            return;
        };
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return;
        };
        for p in procs.flatten() {
            let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            // Replicas run with their userDir as working directory.
            if std::fs::read_link(p.path().join("cwd")).is_ok_and(|cwd| cwd.starts_with(&root)) {
                let _ = signal(pid, Signal::KILL);
            }
        }
    }
}

/// A driver over `data`. A replica counts as hung only after a minute, so a busy machine (two
/// cores, several Node-REDs starting at once) does not make one look hung; the hang test sets
/// its own.
fn driver(data: &DataDir) -> LocalDriver {
    let mut d = LocalDriver::new(data.path());
    d.stacks_dir = stacks_dir();
    d.liveness = Liveness {
        interval: Duration::from_millis(250),
        hang_after: Duration::from_secs(60),
    };
    d
}

fn hello_flows() -> serde_json::Value {
    json!([
        { "id": "t1", "type": "tab", "label": "Hello" },
        { "id": "in", "type": "http in", "z": "t1", "url": "/hello", "method": "get", "wires": [["ch"]] },
        { "id": "ch", "type": "change", "z": "t1", "rules": [{ "t": "set", "p": "payload", "pt": "msg", "to": "REPLICA", "tot": "env" }], "wires": [["out"]] },
        { "id": "out", "type": "http response", "z": "t1", "statusCode": "", "headers": {}, "wires": [] }
    ])
}

/// A secret no file, path or log line holds by chance.
fn secret(what: &str) -> String {
    format!(
        "{what}-{:016x}{:016x}",
        fastrand::u64(..),
        fastrand::u64(..)
    )
}

/// The spec of replica `slot` of `instance`; its flows answer `/hello` with `r<slot>`.
fn spec(instance: &str, slot: u32, ha: bool, start_stopped: bool) -> ProcessSpec {
    ProcessSpec {
        instance: instance.into(),
        nodered_version: VERSION.into(),
        node_version: None,
        memory_mb: 256,
        ha,
        start_stopped,
        admin_secret: secret("admin"),
        credential_secret: secret("credentials"),
        settings: json!({ "httpNodeCors": { "origin": "*" }, "uiPort": 1 }),
        env: BTreeMap::from([("REPLICA".to_string(), format!("r{slot}"))]),
        storage: None,
        modules: BTreeMap::new(),
    }
}

/// An instance opened on a driver, with its events and its log.
struct Opened {
    instance: LocalInstance,
    events: mpsc::UnboundedReceiver<Event>,
    log: Arc<InstanceLog>,
}

fn open(driver: &LocalDriver, name: &str) -> Opened {
    let log = LogBook::default().instance(name);
    let (tx, events) = mpsc::unbounded_channel();
    Opened {
        instance: driver.open(name, log.clone(), tx),
        events,
        log,
    }
}

impl Opened {
    async fn next(&mut self) -> Event {
        timeout(DEADLINE, self.events.recv())
            .await
            .expect("no event in time")
            .expect("the event channel closed")
    }

    /// Starts (or adopts) `slot` as `run` and waits for it to be ready.
    async fn start(&mut self, slot: u32, run: u64, spec: &ProcessSpec, flows: &Flows) -> Running {
        self.instance.start(slot, run, spec, flows).await.unwrap();
        let e = self.next().await;
        assert_eq!((e.slot, e.run), (slot, run), "{e:?}");
        match e.kind {
            EventKind::Ready(running) => running,
            other => panic!("expected Ready, got {other:?}"),
        }
    }

    /// Drops the instance and reads its events until its watchers are gone (the channel
    /// closes): only events `allowed` accepts may still come.
    async fn close(self, allowed: impl Fn(&Event) -> bool) {
        let Self {
            instance,
            mut events,
            ..
        } = self;
        drop(instance);
        while let Some(e) = timeout(DEADLINE, events.recv())
            .await
            .expect("a replica's watcher outlived it")
        {
            assert!(allowed(&e), "unexpected event {e:?}");
        }
    }
}

/// Sends `signal` to process `pid`.
fn signal(pid: u32, signal: Signal) -> std::io::Result<()> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or(std::io::ErrorKind::InvalidInput)?;
    rustix::process::kill_process(pid, signal).map_err(std::io::Error::from)
}

fn proc_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether anything accepts connections at `addr`.
async fn listening(addr: SocketAddr) -> bool {
    tokio::net::TcpStream::connect(addr).await.is_ok()
}

/// One HTTP/1.1 request: status and body. A `host` header in `headers` replaces the default.
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let call = async {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut request = http::Request::builder().method(method).uri(path);
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            request = request.header(http::header::HOST, addr.to_string());
        }
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let request = request
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    };
    timeout(DEADLINE, call)
        .await
        .unwrap_or_else(|_| panic!("{method} {path} at {addr}: no answer"))
}

/// The replica's flow state (`start`, `stop`, `safe`), from its admin API.
async fn flow_state(addr: SocketAddr, secret: &str) -> String {
    let (status, body) = http(
        addr,
        "GET",
        "/admin/flows/state",
        &[(ADMIN_TOKEN.as_str(), secret)],
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["state"].as_str().unwrap_or_default().to_owned()
}

/// Every regular file under `dir`, recursively (symbolic links not followed).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                todo.push(entry.path());
            } else if kind.is_file() {
                found.push(entry.path());
            }
        }
    }
    found
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

// === tests ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_serves_its_flows_and_guards_its_admin_api() {
    let data = DataDir::new();
    let d = driver(&data);
    let s = spec("solo", 0, false, false);
    let mut i = open(&d, "solo");
    let r = i.start(0, 1, &s, &Flows::new(hello_flows())).await;
    assert!(!r.adopted && !r.stale);
    assert_eq!(r.flows, FlowState::Started);
    assert!(r.addr.ip().is_loopback());
    assert_ne!(
        r.addr.port(),
        1,
        "the port is Tandem's, whatever the settings say"
    );

    let (status, body) = http(r.addr, "GET", "/hello", &[], "").await;
    assert_eq!((status, body.as_str()), (200, "r0"));
    // The admin API needs the replica's secret, in Tandem's header only.
    let header = ADMIN_TOKEN;
    let token = header.as_str();
    let bearer = format!("Bearer {}", s.admin_secret);
    for (headers, expected) in [
        (vec![], 401),
        (vec![(token, "wrong")], 401),
        (vec![("authorization", bearer.as_str())], 401),
        (vec![(token, s.admin_secret.as_str())], 200),
    ] {
        let (status, body) = http(r.addr, "GET", "/admin/flows", &headers, "").await;
        assert_eq!(status, expected, "{headers:?}: {body}");
    }
    // Not HA: the editor is there.
    assert_eq!(http(r.addr, "GET", "/admin/", &[], "").await.0, 200);

    // A stop is graceful and sends no event.
    i.instance.stop(0).await.unwrap();
    assert!(!listening(r.addr).await, "stopped replicas stop listening");
    assert!(!proc_exists(r.pid.unwrap()), "the process is gone");
    i.close(|_| false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_replicas_have_no_editor_and_can_boot_with_flows_stopped() {
    let data = DataDir::new();
    let d = driver(&data);
    let s = spec("ha", 1, true, true);
    let mut i = open(&d, "ha");
    let r = i.start(1, 1, &s, &Flows::new(hello_flows())).await;
    assert_eq!(r.flows, FlowState::Stopped);
    assert_eq!(
        http(r.addr, "GET", "/admin/", &[], "").await.0,
        404,
        "no editor on HA replicas"
    );
    // Node-RED reports "start" for a moment each time it re-evaluates its flows (for example
    // when node types finish registering) before it applies the stopped state, without starting
    // anything; the state it settles in is the one that counts.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let state = flow_state(r.addr, &s.admin_secret).await;
        if state == "stop" || state == "safe" {
            break;
        }
        assert!(Instant::now() < deadline, "flows must not run: {state}");
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
            (ADMIN_TOKEN.as_str(), &s.admin_secret),
            ("content-type", "application/json"),
        ],
        r#"{"state":"start"}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = http(r.addr, "GET", "/hello", &[], "").await;
    assert_eq!((status, body.as_str()), (200, "r1"));
    i.instance.stop(1).await.unwrap();
    i.close(|_| false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_routes_to_a_real_replica() {
    use tandem_coordinator::proxy::{
        InstanceSpec, Proxy, ProxyConfig, ProxyStats, ReplicaSpec as Route, Routes,
    };
    let data = DataDir::new();
    let d = driver(&data);
    let name = "routed";
    let s = spec(name, 0, true, false);
    let mut i = open(&d, name);
    let r = i.start(0, 1, &s, &Flows::new(hello_flows())).await;
    let routes = Arc::new(Routes::new());
    routes
        .publish(&[InstanceSpec {
            certificate: None,
            asleep: false,
            editor_secret: None,
            http_auth: Default::default(),
            name: name.into(),
            hosts: vec![format!("{name}.localhost")],
            ha: true,
            affinity: false,
            hold: false,
            replicas: vec![Route {
                id: ReplicaId::new(name, 0).to_string(),
                addr: r.addr,
                ready: true,
            }],
            health: None,
        }])
        .unwrap();
    let proxy = Arc::new(Proxy::new(
        routes,
        ProxyConfig::default(),
        Arc::new(ProxyStats::default()),
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
    assert_eq!((status, body.as_str()), (200, "r0"));
    // HA: the editor and admin API are refused at the proxy, secret or not.
    let (status, _) = http(
        addr,
        "GET",
        "/admin/flows",
        &[("host", &host), (ADMIN_TOKEN.as_str(), &s.admin_secret)],
        "",
    )
    .await;
    assert_eq!(status, 403);
    server.abort();
    i.instance.stop(0).await.unwrap();
    i.close(|_| false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_npm_cannot_install_is_a_clear_error() {
    let data = DataDir::new();
    let d = driver(&data);
    let mut s = spec("bad", 0, false, false);
    s.nodered_version = "0.0.0-no-such-version".into();
    let i = open(&d, "bad");
    let prepared = timeout(Duration::from_secs(600), i.instance.prepare(&s))
        .await
        .expect("npm did not finish");
    match prepared {
        Err(DriverError::Install {
            package,
            version,
            output,
        }) => {
            assert_eq!(package, "node-red");
            assert_eq!(version, "0.0.0-no-such-version");
            assert!(!output.is_empty());
            // npm's own words reach the instance log.
            assert!(!i
                .log
                .read(Cursor::Latest, 100, Some("npm"))
                .entries
                .is_empty());
        }
        other => panic!("expected an install error, got {other:?}"),
    }
    // Not a version at all: refused before npm sees it, by start as by prepare.
    s.nodered_version = "4.1.2; rm -rf /".into();
    assert!(matches!(
        i.instance.start(0, 1, &s, &Flows::new(hello_flows())).await,
        Err(DriverError::Install { .. })
    ));
    i.close(|_| false).await;
}

/// Restarting is the coordinator's decision now; the driver reports the exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_is_restarted_and_serves_again() {
    let data = DataDir::new();
    let routes = Arc::new(tandem_coordinator::proxy::Routes::new());
    let coordinator = Coordinator::new(
        Arc::new(driver(&data)),
        Arc::new(InProcess(routes)),
        Arc::new(LogBook::default()),
        CoordinatorConfig::default(),
    );
    let name = "phoenix";
    coordinator.apply(vec![InstanceDesired {
        id: format!("id-{name}"),
        hosts: vec![format!("{name}.localhost")],
        state: DesiredState::Running,
        replicas: 1,
        standby: false,
        affinity: false,
        http_auth: Default::default(),
        certificate: None,
        asleep: false,
        process: spec(name, 0, false, false),
        flows: Flows::new(hello_flows()),
        mqtt_urls: BTreeMap::new(),
        probe: None,
    }]);
    // The replica of slot 0 once it runs with a pid other than `not`: (pid, address).
    let running = |not: Option<u32>| {
        let coordinator = coordinator.clone();
        async move {
            let deadline = Instant::now() + DEADLINE;
            loop {
                let status = coordinator.status(&format!("id-{name}"));
                if let Some(r) = status.replicas.first() {
                    if let (ReplicaPhase::Running, Some(pid), Some(port)) = (r.state, r.pid, r.port)
                    {
                        if Some(pid) != not {
                            return (r.clone(), pid, SocketAddr::from(([127, 0, 0, 1], port)));
                        }
                    }
                }
                assert!(Instant::now() < deadline, "never running: {status:#?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let (_, first, addr) = running(None).await;
    assert_eq!(
        http(addr, "GET", "/hello", &[], "").await,
        (200, "r0".to_string())
    );

    // SIGKILL, as the OOM killer would.
    signal(first, Signal::KILL).unwrap();
    let (replica, second, addr) = running(Some(first)).await;
    assert_eq!(replica.restarts, 1, "{replica:?}");
    assert_eq!(
        replica.last_exit,
        Some(ExitReason::Signal(9).to_string()),
        "the exit is reported as the driver saw it"
    );
    assert!(!proc_exists(first));
    assert_eq!(
        http(addr, "GET", "/hello", &[], "").await,
        (200, "r0".to_string())
    );

    coordinator.stop_all().await;
    assert!(!listening(addr).await);
    assert!(!proc_exists(second));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_is_logged_by_replica_and_a_new_driver_adopts_a_running_replica() {
    let data = DataDir::new();
    let name = "adopt";
    let id = ReplicaId::new(name, 1).to_string();
    let s = spec(name, 1, false, false);
    let flows = Flows::new(hello_flows());
    let mut first = open(&driver(&data), name);
    let r = first.start(1, 1, &s, &flows).await;
    assert!(!r.adopted);
    // Node-RED's JSON lines arrive tagged with the replica.
    let page = first.log.read(Cursor::Latest, 1000, Some(&id));
    assert!(
        page.entries
            .iter()
            .any(|e| e.msg.contains("Started flows") && e.level == "info"),
        "{page:?}"
    );
    assert!(page.entries.iter().all(|e| e.src == id));

    // A second driver over the same data dir (Tandem restarted) takes it over as it runs.
    let mut second = open(&driver(&data), name);
    let again = second.start(1, 1, &s, &flows).await;
    assert!(again.adopted && !again.stale, "{again:?}");
    assert_eq!((again.pid, again.addr), (r.pid, r.addr));
    assert_eq!(again.flows, FlowState::Started);
    assert_eq!(again.flows_rev.as_deref(), Some(flows.rev.as_str()));
    assert_eq!(
        http(again.addr, "GET", "/hello", &[], "").await,
        (200, "r1".to_string())
    );
    // Its recent output is replayed into the new log.
    assert!(second
        .log
        .read(Cursor::Latest, 1000, Some(&id))
        .entries
        .iter()
        .any(|e| e.msg.contains("Started flows")));

    // A changed spec (a change made while Tandem was down, or an upgrade of Tandem) is adopted
    // as stale: it keeps serving until the coordinator replaces it, when it can spare it.
    let mut changed = s.clone();
    changed.env.insert("EXTRA".into(), "1".into());
    let mut third = open(&driver(&data), name);
    let stale = third.start(1, 1, &changed, &flows).await;
    assert!(stale.adopted && stale.stale, "{stale:?}");
    assert_eq!(stale.pid, r.pid);
    // Replaced: the old process goes, a new one starts with the new spec.
    third.instance.stop(1).await.unwrap();
    let fresh = third.start(1, 2, &changed, &flows).await;
    assert!(!fresh.adopted && !fresh.stale, "{fresh:?}");
    assert_ne!(fresh.pid, r.pid);
    assert!(!proc_exists(r.pid.unwrap()));
    third.instance.stop(1).await.unwrap();
    assert!(!listening(fresh.addr).await);
    third.close(|_| false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_by_tandem_0_1_is_adopted_as_current() {
    let data = DataDir::new();
    let name = "legacy";
    let s = spec(name, 0, false, false);
    let flows = Flows::new(hello_flows());
    let mut first = open(&driver(&data), name);
    let r = first.start(0, 1, &s, &flows).await;
    let record_at = driver(&data)
        .user_dir(&ReplicaId::new(name, 0))
        .join("replica.json");
    let record = |hash: &str| {
        let mut record: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&record_at).unwrap()).unwrap();
        assert_eq!(record["pid"], json!(r.pid.unwrap()), "{record}");
        record["spec"] = json!(hash);
        std::fs::write(&record_at, record.to_string()).unwrap();
    };

    // What Tandem 0.1 recorded for the same spec and flows (the tests' driver has no sandbox).
    record(&legacy_spec_hash(&s, 0, &flows.value, false));
    let mut second = open(&driver(&data), name);
    let adopted = second.start(0, 1, &s, &flows).await;
    assert!(adopted.adopted && !adopted.stale, "{adopted:?}");
    assert_eq!((adopted.pid, adopted.addr), (r.pid, r.addr));

    // A hash neither Tandem wrote: started for another spec.
    record("0123456789abcdef");
    let mut third = open(&driver(&data), name);
    let stale = third.start(0, 1, &s, &flows).await;
    assert!(stale.adopted && stale.stale, "{stale:?}");
    assert_eq!(stale.pid, r.pid);

    third.instance.stop(0).await.unwrap();
    assert!(!proc_exists(r.pid.unwrap()));
    third.close(|_| false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stack_can_bring_its_own_node_runtime() {
    let data = DataDir::new();
    let d = driver(&data);
    let mut s = spec("runtime", 0, false, false);
    s.node_version = Some("22.12.0".into());
    let mut i = open(&d, "runtime");
    let r = i.start(0, 1, &s, &Flows::new(hello_flows())).await;
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
    i.instance.stop(0).await.unwrap();
    // A runtime npm does not have is a clear error naming it.
    s.node_version = Some("0.0.1-no-such-node".into());
    let started = timeout(
        Duration::from_secs(600),
        i.instance.start(0, 2, &s, &Flows::new(hello_flows())),
    )
    .await
    .expect("npm did not finish");
    match started {
        Err(DriverError::Install { package, .. }) => assert_eq!(package, "node"),
        other => panic!("expected an install error, got {other:?}"),
    }
    i.close(|_| false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_log_file_is_rotated_and_every_line_still_reaches_the_log() {
    let data = DataDir::new();
    let mut d = driver(&data);
    d.max_log_bytes = 4096;
    let name = "chatty";
    let id = ReplicaId::new(name, 0);
    let s = spec(name, 0, false, false);
    // 200 warnings of ~100 bytes each at start: several rotations' worth.
    let mut flows = hello_flows();
    for node in [
        json!({ "id": "go", "type": "inject", "z": "t1", "once": true, "onceDelay": 0.1, "repeat": "", "wires": [["talk"]] }),
        json!({ "id": "talk", "type": "function", "z": "t1", "func": "for (let i = 0; i < 200; i++) { node.warn('line ' + i + ' ' + 'x'.repeat(80)); } return null;", "wires": [[]] }),
    ] {
        flows.as_array_mut().unwrap().push(node);
    }
    let mut i = open(&d, name);
    i.start(0, 1, &s, &Flows::new(flows)).await;
    let deadline = Instant::now() + DEADLINE;
    let seen = loop {
        let page = i.log.read(Cursor::Latest, 1000, Some(&id.to_string()));
        let n = page
            .entries
            .iter()
            .filter(|e| e.level == "warn" && e.msg.starts_with("line "))
            .count();
        if n == 200 || Instant::now() > deadline {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(seen, 200, "every line reached the log");
    let file = d.log_file(&id);
    let old = file.with_extension("log.1");
    // The tailer pushes what it read, then rotates: the old file follows the lines shortly.
    let deadline = Instant::now() + DEADLINE;
    while !old.exists() {
        assert!(
            Instant::now() < deadline,
            "never rotated into {}",
            old.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The tailer frees what it has read past the limit (a hole punched over it, or a
    // truncation where holes are not supported), so the file's disk use is back near the limit
    // once the tailer has caught up.
    let deadline = Instant::now() + DEADLINE;
    loop {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&file).unwrap();
        let size = meta.len().min(meta.blocks() * 512);
        if size <= 4096 + 8192 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the live file stays near the limit: {size}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    i.instance.stop(0).await.unwrap();
    i.close(|_| false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_can_be_deployed_and_stopped_without_a_restart() {
    let data = DataDir::new();
    let d = driver(&data);
    let name = "deploy";
    let s = spec(name, 0, false, false);
    let mut i = open(&d, name);
    let r = i.start(0, 1, &s, &Flows::new(hello_flows())).await;
    assert_eq!(
        http(r.addr, "GET", "/hello", &[], "").await,
        (200, "r0".to_string())
    );
    // New flows through the admin API: the same process answers with them.
    let flows = Flows::new(json!([
        { "id": "t1", "type": "tab", "label": "Hello" },
        { "id": "in", "type": "http in", "z": "t1", "url": "/hello", "method": "get", "wires": [["fn"]] },
        { "id": "fn", "type": "function", "z": "t1", "func": "msg.payload = 'deployed'; return msg;", "wires": [["out"]] },
        { "id": "out", "type": "http response", "z": "t1", "statusCode": "", "headers": {}, "wires": [] }
    ]));
    i.instance
        .deploy(0, &flows, &Gate::default())
        .await
        .unwrap();
    let deadline = Instant::now() + DEADLINE;
    while http(r.addr, "GET", "/hello", &[], "").await.1 != "deployed" {
        assert!(Instant::now() < deadline, "the deploy did not take");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Its revision is recorded, so a restart does not overwrite what was deployed.
    let written = d.user_dir(&ReplicaId::new(name, 0)).join(".tandem-flows");
    assert_eq!(std::fs::read_to_string(written).unwrap().trim(), flows.rev);
    // Flows stopped: the endpoint is gone; started again: back, same process.
    i.instance.set_flows(0, FlowState::Stopped).await.unwrap();
    assert_eq!(flow_state(r.addr, &s.admin_secret).await, "stop");
    assert_eq!(http(r.addr, "GET", "/hello", &[], "").await.0, 404);
    i.instance.set_flows(0, FlowState::Started).await.unwrap();
    assert_eq!(flow_state(r.addr, &s.admin_secret).await, "start");
    assert_eq!(
        http(r.addr, "GET", "/hello", &[], "").await,
        (200, "deployed".to_string())
    );
    // Flows Node-RED refuses are refused with its reason, and slots that do not run are an error.
    match i
        .instance
        .deploy(
            0,
            &Flows::new(json!({ "not": "an array" })),
            &Gate::default(),
        )
        .await
    {
        Err(DriverError::Refused { id, reason }) => {
            assert_eq!(id, ReplicaId::new(name, 0));
            assert!(
                reason.starts_with("Node-RED refused the flows (400)"),
                "{reason}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(matches!(
        i.instance.deploy(5, &flows, &Gate::default()).await,
        Err(DriverError::NotRunning(id)) if id == ReplicaId::new(name, 5)
    ));
    assert!(matches!(
        i.instance.set_flows(5, FlowState::Started).await,
        Err(DriverError::NotRunning(_))
    ));
    i.instance.stop(0).await.unwrap();
    i.close(|_| false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_the_disk_the_environment_or_the_command_line() {
    let data = DataDir::new();
    let d = driver(&data);
    let name = "secret";
    let s = spec(name, 0, false, false);
    let mut i = open(&d, name);
    let r = i.start(0, 1, &s, &Flows::new(hello_flows())).await;
    let pid = r.pid.unwrap();
    // A deploy with a node's credentials: Node-RED encrypts them with the credential secret
    // into flows_cred.json.
    let password = secret("password");
    let mut flows = hello_flows();
    flows.as_array_mut().unwrap().push(json!({
        "id": "req", "type": "http request", "z": "t1", "method": "GET",
        "url": "http://127.0.0.1:9/", "authType": "basic",
        "credentials": { "user": "someone", "password": password },
        "wires": [[]]
    }));
    i.instance
        .deploy(0, &Flows::new(flows), &Gate::default())
        .await
        .unwrap();
    let cred = d.user_dir(&ReplicaId::new(name, 0)).join("flows_cred.json");
    let deadline = Instant::now() + DEADLINE;
    while !cred.exists() {
        assert!(Instant::now() < deadline, "the deploy wrote no credentials");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let secrets = [s.admin_secret.as_str(), s.credential_secret.as_str()];
    for what in ["environ", "cmdline"] {
        let bytes = std::fs::read(format!("/proc/{pid}/{what}")).unwrap();
        for secret in secrets {
            assert!(
                !contains(&bytes, secret),
                "a secret is in /proc/{pid}/{what}"
            );
        }
    }
    // Everything the instance has on disk, while it runs and once it has stopped (when
    // Node-RED has written what it writes on the way out).
    let check_files = || {
        let files = files_under(&data.instance(name));
        for expected in ["settings.js", "flows.json", "flows_cred.json", "r0.log"] {
            assert!(
                files.iter().any(|f| f.ends_with(expected)),
                "{expected} not among {files:#?}"
            );
        }
        for file in &files {
            let bytes = std::fs::read(file).unwrap();
            for secret in secrets {
                assert!(
                    !contains(&bytes, secret),
                    "a secret is in {}",
                    file.display()
                );
            }
            assert!(
                !contains(&bytes, &password),
                "a credential is in clear in {}",
                file.display()
            );
        }
    };
    check_files();
    i.instance.stop(0).await.unwrap();
    check_files();
    i.close(|_| false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_replica_is_reported_and_fenced() {
    let data = DataDir::new();
    let mut d = driver(&data);
    d.liveness = Liveness {
        interval: Duration::from_millis(100),
        hang_after: Duration::from_millis(500),
    };
    let s = spec("hung", 0, false, false);
    let mut i = open(&d, "hung");
    let r = i.start(0, 1, &s, &Flows::new(hello_flows())).await;
    let pid = r.pid.unwrap();

    signal(pid, Signal::STOP).unwrap();
    let e = i.next().await;
    assert_eq!((e.slot, e.run), (0, 1), "{e:?}");
    match e.kind {
        EventKind::Hung { silent_ms } => assert!(silent_ms >= 500, "{silent_ms}"),
        other => panic!("expected Hung, got {other:?}"),
    }

    // SIGKILL ends it, stopped as it is.
    timeout(DEADLINE, i.instance.fence(0))
        .await
        .expect("the fence did not hold")
        .unwrap();
    assert!(!proc_exists(pid), "the process is gone, reaped");
    // Too late to wake it.
    let _ = signal(pid, Signal::CONT);
    assert!(!listening(r.addr).await, "nothing answers on its port");
    assert!(matches!(
        i.instance
            .deploy(0, &Flows::new(hello_flows()), &Gate::default())
            .await,
        Err(DriverError::NotRunning(_))
    ));
    // Of that run, nothing more than that the fence holds.
    i.close(|e| e.kind == EventKind::Fenced && (e.slot, e.run) == (0, 1))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deploy_gate_refuses_unknown_node_types_nodes_in_error_and_a_failed_probe() {
    let data = DataDir::new();
    let d = driver(&data);
    let name = "gate";
    let s = spec(name, 0, false, false);
    let mut i = open(&d, name);
    let r = i.start(0, 1, &s, &Flows::new(hello_flows())).await;
    let gate = Gate {
        flows_on: true,
        probe: Some(Probe {
            path: "/hello".into(),
            expect_status: 200,
        }),
    };
    // Good flows pass, probe and all.
    i.instance
        .deploy(0, &Flows::new(hello_flows()), &gate)
        .await
        .unwrap();

    // A type nothing provides: Node-RED takes the flows (and runs none of them); the gate
    // does not.
    let mut unknown = hello_flows();
    unknown
        .as_array_mut()
        .unwrap()
        .push(json!({ "id": "x", "type": "foo-bar", "z": "t1", "wires": [] }));
    match i.instance.deploy(0, &Flows::new(unknown), &gate).await {
        Err(DriverError::Refused { reason, .. }) => {
            assert_eq!(reason, "unknown node type: foo-bar")
        }
        other => panic!("expected the gate to refuse, got {other:?}"),
    }
    assert_eq!(http(r.addr, "GET", "/hello", &[], "").await.0, 404);

    // A node that fails as it starts (an `http in` node on a route no HTTP server serves is
    // fine; a `tcp in` server on a port taken is not).
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut failing = hello_flows();
    failing.as_array_mut().unwrap().push(json!({
        "id": "tcp", "type": "tcp in", "z": "t1", "server": "server", "host": "",
        "port": port.to_string(), "datamode": "stream", "datatype": "buffer",
        "newline": "", "topic": "", "base64": false, "wires": [[]]
    }));
    match i.instance.deploy(0, &Flows::new(failing), &gate).await {
        Err(DriverError::Refused { reason, .. }) => {
            assert!(
                reason.starts_with("a node failed as the flows started"),
                "{reason}"
            )
        }
        other => panic!("expected the gate to refuse, got {other:?}"),
    }

    // A probe answered otherwise.
    let wrong = Gate {
        flows_on: true,
        probe: Some(Probe {
            path: "/nowhere".into(),
            expect_status: 200,
        }),
    };
    match i
        .instance
        .deploy(0, &Flows::new(hello_flows()), &wrong)
        .await
    {
        Err(DriverError::Refused { reason, .. }) => {
            assert_eq!(reason, "probe GET /nowhere answered 404, not 200")
        }
        other => panic!("expected the probe to fail, got {other:?}"),
    }
    drop(taken);
    i.instance.stop(0).await.unwrap();
    i.close(|_| false).await;
}

/// A private npm registry on 127.0.0.1 that answers only with its token: one package, its
/// packument and tarball. Records the `Authorization` header of every request.
struct Registry {
    url: String,
    seen: Arc<std::sync::Mutex<Vec<Option<String>>>>,
    server: tokio::task::JoinHandle<()>,
}

impl Registry {
    /// Serves `tarball` (from `npm pack`) as `name@1.0.0` to requests with `Bearer <token>`.
    async fn start(name: &str, tarball: Vec<u8>, token: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let packument = json!({
            "name": name,
            "dist-tags": { "latest": "1.0.0" },
            "versions": { "1.0.0": {
                "name": name,
                "version": "1.0.0",
                "dist": { "tarball": format!("{url}{name}/-/{name}-1.0.0.tgz") },
            } },
        })
        .to_string();
        let (expected, tarball) = (format!("Bearer {token}"), Bytes::from(tarball));
        let (name, log) = (name.to_owned(), seen.clone());
        let server = tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (packument, tarball, expected) =
                    (packument.clone(), tarball.clone(), expected.clone());
                let (name, log) = (name.clone(), log.clone());
                let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
                    let auth = req
                        .headers()
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    log.lock().unwrap().push(auth.clone());
                    let path = req.uri().path().to_owned();
                    let (status, body) = if auth.as_deref() != Some(expected.as_str()) {
                        (401, Bytes::from_static(b"{\"error\":\"unauthorized\"}"))
                    } else if path == format!("/{name}") {
                        (200, Bytes::from(packument.clone()))
                    } else if path.ends_with(".tgz") {
                        (200, tarball.clone())
                    } else {
                        (404, Bytes::from_static(b"{}"))
                    };
                    async move {
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .status(status)
                                .body(Full::new(body))
                                .unwrap(),
                        )
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        Self { url, seen, server }
    }
}

/// A package of one file, packed by npm: its tarball.
fn packed(dir: &Path, name: &str) -> Vec<u8> {
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(
        src.join("package.json"),
        json!({ "name": name, "version": "1.0.0", "main": "index.js" }).to_string(),
    )
    .unwrap();
    std::fs::write(src.join("index.js"), "module.exports = 1;\n").unwrap();
    let out = std::process::Command::new("npm")
        .args(["pack", "--silent", "--pack-destination"])
        .arg(dir)
        .current_dir(&src)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let file = String::from_utf8(out.stdout).unwrap();
    std::fs::read(dir.join(file.trim())).unwrap()
}

/// `tandem serve --npm-registry URL --npm-token-file F`: modules install from a private
/// registry with its token, which reaches that registry alone and no log line; without the
/// token, the registry's refusal is the install's error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modules_install_from_a_private_registry_with_its_token_and_never_show_it() {
    let data = DataDir::new();
    // A name of this run only: a set installed by an earlier run would be found in the cache.
    let name = format!("tandem-private-{:016x}", fastrand::u64(..));
    let token = secret("npm-token");
    let registry = Registry::start(&name, packed(data.path(), &name), &token).await;
    let mut s = spec("private", 0, false, false);
    s.modules = BTreeMap::from([(name.clone(), "^1.0.0".to_string())]);

    // Without the token: refused, in npm's words.
    let mut d = driver(&data);
    d.npm = tandem_coordinator::local::NpmOptions {
        registry: Some(registry.url.clone()),
        ..Default::default()
    };
    let i = open(&d, "private");
    let refused = timeout(DEADLINE, i.instance.prepare(&s)).await.unwrap();
    match refused {
        Err(DriverError::Install { output, .. }) => {
            assert!(
                output.contains("401") || output.contains("E401"),
                "{output}"
            )
        }
        other => panic!("expected npm's refusal, got {other:?}"),
    }
    i.close(|_| false).await;

    // With it.
    let userconfig = tandem_coordinator::local::write_userconfig(
        &data.path().join("npm"),
        Some(&registry.url),
        &format!("{token}\n"),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&userconfig).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    d.npm.userconfig = Some(userconfig);
    let i = open(&d, "private");
    let prepared = timeout(DEADLINE, i.instance.prepare(&s))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        prepared.modules,
        BTreeMap::from([(name.clone(), "1.0.0".to_string())])
    );
    let seen = registry.seen.lock().unwrap().clone();
    assert!(
        seen.iter()
            .any(|a| a.as_deref() == Some(format!("Bearer {token}").as_str())),
        "{seen:?}"
    );
    let log = i.log.read(Cursor::Latest, 1000, None);
    assert!(!log.entries.is_empty());
    assert!(
        log.entries.iter().all(|e| !e.msg.contains(&token)),
        "the token reached the instance log"
    );
    registry.server.abort();
    i.close(|_| false).await;
}

#[test]
fn a_registry_token_needs_an_http_registry_and_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let write = |registry: Option<&str>, token: &str| {
        tandem_coordinator::local::write_userconfig(dir.path(), registry, token)
    };
    let path = write(Some("https://npm.example.com/private"), "abc\n").unwrap();
    assert_eq!(
        std::fs::read_to_string(path).unwrap(),
        "//npm.example.com/private/:_authToken=abc\n"
    );
    let path = write(None, "abc").unwrap();
    assert_eq!(
        std::fs::read_to_string(path).unwrap(),
        "//registry.npmjs.org/:_authToken=abc\n"
    );
    for (registry, token) in [
        (Some("file:///etc"), "abc"),
        (Some("https://"), "abc"),
        (Some("https://x/"), ""),
        (Some("https://x/"), "a b"),
        (Some("https://x/"), "a\nregistry=https://evil/"),
    ] {
        assert!(write(registry, token).is_err(), "{registry:?} {token:?}");
    }
}
