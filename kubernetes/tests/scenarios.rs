//! The Kubernetes driver against a mock API server (`tower-test`), scenario by scenario: every
//! request the driver makes is recorded and asserted, and the server answers with the objects it
//! was given, as an API server and a kubelet would. Each pod's "Node-RED" is a small HTTP server
//! on 127.0.0.1 answering the admin API calls the driver makes.
//!
//! What this does not show: a real cluster's behaviour (scheduling, image pulls, probes, the
//! kubelet's timing). There is none on these machines.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use kube::client::Body;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};
use tower_test::mock;

use tandem_coordinator::driver::{Driver, Event, EventKind, InstanceDriver, Isolation};
use tandem_coordinator::logs::InstanceLog;
use tandem_coordinator::replica::{ExitReason, FlowState};
use tandem_coordinator::spec::{Flows, ProcessSpec, Storage};
use tandem_kube::KubeDriver;

const NS: &str = "tandem";

// ---------------------------------------------------------------------------------------------
// The mock API server.

/// The objects the server holds, the requests it got, and the watch events it sent.
#[derive(Default)]
struct Store {
    /// `kind/name` → object (pods, configmaps, secrets).
    objects: BTreeMap<String, Value>,
    /// Every request but the watches' and lists' of the pod watch, in order: `METHOD path`, and
    /// `grace=N` for deletes that give one.
    requests: Vec<String>,
    /// The pod watch's requests (`LIST` or `WATCH`), in order.
    watches: Vec<String>,
    /// Events of pods: resourceVersion, type, object.
    history: Vec<(u64, &'static str, Value)>,
    rv: u64,
    uid: u64,
    /// The next pod watch answers with this error code instead of events.
    break_next_watch: Option<u16>,
    /// Pods being deleted stay until the test finishes them (the kubelet's grace period, or the
    /// API's own latency).
    hold_deletes: bool,
    /// Lines each pod's log answers with.
    log_lines: Vec<String>,
}

struct Server {
    store: Mutex<Store>,
    changed: Notify,
}

impl Server {
    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap()
    }

    /// The requests made since the last call, in order.
    fn requests_taken(&self) -> Vec<String> {
        std::mem::take(&mut self.store().requests)
    }

    /// A pod event, as the API server would record it.
    fn event(&self, kind: &'static str, pod: Value) {
        let mut s = self.store();
        let rv = s.rv;
        s.history.push((rv, kind, pod));
        drop(s);
        self.changed.notify_waiters();
    }

    fn bump(&self, obj: &mut Value) {
        let mut s = self.store();
        s.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(s.rv.to_string());
    }

    /// The kubelet: `name` runs, ready or not, with `restarts` and a last exit.
    fn kubelet(&self, name: &str, ready: bool, restarts: u32, last_exit: Option<Value>) {
        let key = format!("pods/{name}");
        let mut pod = self
            .store()
            .objects
            .get(&key)
            .cloned()
            .expect("no such pod");
        let mut container = json!({
            "name": "node-red", "ready": ready, "restartCount": restarts, "image": "i", "imageID": "",
            "state": { "running": {} },
        });
        if let Some(exit) = last_exit {
            container["lastState"] = json!({ "terminated": exit });
        }
        pod["status"] = json!({
            "phase": "Running",
            "podIP": "127.0.0.1",
            "conditions": [{ "type": "Ready", "status": if ready { "True" } else { "False" } }],
            "containerStatuses": [container],
        });
        self.bump(&mut pod);
        self.store().objects.insert(key, pod.clone());
        self.event("MODIFIED", pod);
    }

    /// The kubelet finishes a graceful delete.
    fn finish_delete(&self, name: &str) {
        let pod = self.store().objects.remove(&format!("pods/{name}"));
        if let Some(mut pod) = pod {
            self.bump(&mut pod);
            self.event("DELETED", pod);
        }
    }
}

fn status(code: u16, reason: &str) -> Response<Body> {
    let body = json!({ "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": reason, "reason": reason, "code": code });
    Response::builder()
        .status(code)
        .body(Body::from(body.to_string().into_bytes()))
        .unwrap()
}

fn ok(value: &Value) -> Response<Body> {
    Response::builder()
        .status(200)
        .body(Body::from(value.to_string().into_bytes()))
        .unwrap()
}

fn query(req: &Request<Body>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

/// Whether `pod` matches a watch's or list's selectors.
fn selected(pod: &Value, q: &BTreeMap<String, String>) -> bool {
    if let Some(labels) = q.get("labelSelector") {
        for pair in labels.split(',') {
            let (k, v) = pair.split_once('=').unwrap();
            if pod["metadata"]["labels"][k] != v {
                return false;
            }
        }
    }
    if let Some(field) = q.get("fieldSelector") {
        let name = field.strip_prefix("metadata.name=").unwrap();
        if pod["metadata"]["name"] != name {
            return false;
        }
    }
    true
}

/// Answers the driver's requests until the test ends.
async fn serve(server: Arc<Server>, mut handle: mock::Handle<Request<Body>, Response<Body>>) {
    while let Some((req, send)) = handle.next_request().await {
        let server = server.clone();
        tokio::spawn(async move {
            let resp = answer(&server, req).await;
            send.send_response(resp);
        });
    }
}

async fn answer(server: &Server, req: Request<Body>) -> Response<Body> {
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let q = query(&req);
    let rest = path
        .strip_prefix(&format!("/api/v1/namespaces/{NS}/"))
        .or_else(|| path.strip_prefix(&format!("/apis/coordination.k8s.io/v1/namespaces/{NS}/")))
        .unwrap_or_else(|| panic!("a request outside the namespace: {method} {path}"))
        .to_string();
    let body = http_body_util::BodyExt::collect(req.into_body())
        .await
        .unwrap()
        .to_bytes();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let parts: Vec<&str> = rest.split('/').collect();
    match (method.as_str(), parts.as_slice()) {
        ("GET", ["pods"]) if q.get("watch").map(String::as_str) == Some("true") => {
            watch(server, &q).await
        }
        ("GET", ["pods"]) => {
            let selector = q.get("fieldSelector").or(q.get("labelSelector")).cloned();
            let mut s = server.store();
            if !q.contains_key("fieldSelector") {
                s.watches
                    .push(format!("LIST {}", selector.unwrap_or_default()));
            }
            let items: Vec<Value> = s
                .objects
                .iter()
                .filter(|(k, _)| k.starts_with("pods/"))
                .map(|(_, v)| v.clone())
                .filter(|p| selected(p, &q))
                .collect();
            ok(&json!({ "kind": "PodList", "apiVersion": "v1",
                "metadata": { "resourceVersion": s.rv.to_string() }, "items": items }))
        }
        ("GET", [_, _, "log"]) => {
            server.store().requests.push(format!("GET {rest}"));
            let lines = server.store().log_lines.join("\n");
            Response::builder()
                .status(200)
                .body(Body::from(format!("{lines}\n").into_bytes()))
                .unwrap()
        }
        ("GET", [kind, name]) => {
            server.store().requests.push(format!("GET {kind}/{name}"));
            match server.store().objects.get(&format!("{kind}/{name}")) {
                Some(obj) => ok(obj),
                None => status(404, "NotFound"),
            }
        }
        ("POST", [kind]) => {
            let name = body["metadata"]["name"].as_str().unwrap().to_string();
            server.store().requests.push(format!("POST {kind}/{name}"));
            let key = format!("{kind}/{name}");
            if server.store().objects.contains_key(&key) {
                return status(409, "AlreadyExists");
            }
            let mut obj = body;
            {
                let mut s = server.store();
                s.uid += 1;
                obj["metadata"]["uid"] = json!(format!("uid-{}", s.uid));
                obj["metadata"]["namespace"] = json!(NS);
            }
            server.bump(&mut obj);
            server.store().objects.insert(key, obj.clone());
            if *kind == "pods" {
                server.event("ADDED", obj.clone());
            }
            ok(&obj)
        }
        ("PUT", [kind, name]) => {
            server.store().requests.push(format!("PUT {kind}/{name}"));
            // Optimistic concurrency: a write based on an older version is refused.
            let current = server
                .store()
                .objects
                .get(&format!("{kind}/{name}"))
                .map(|o| o["metadata"]["resourceVersion"].clone());
            let Some(current) = current else {
                return status(404, "NotFound");
            };
            if !body["metadata"]["resourceVersion"].is_null()
                && body["metadata"]["resourceVersion"] != current
            {
                return status(409, "Conflict");
            }
            let mut obj = body;
            server.bump(&mut obj);
            server
                .store()
                .objects
                .insert(format!("{kind}/{name}"), obj.clone());
            ok(&obj)
        }
        ("DELETE", [kind]) => {
            let selector = q.get("labelSelector").cloned().unwrap_or_default();
            server
                .store()
                .requests
                .push(format!("DELETE {kind}?{selector}"));
            let keys: Vec<String> = server
                .store()
                .objects
                .iter()
                .filter(|(k, v)| k.starts_with(&format!("{kind}/")) && selected(v, &q))
                .map(|(k, _)| k.clone())
                .collect();
            for key in keys {
                let obj = server.store().objects.remove(&key).unwrap();
                if *kind == "pods" {
                    server.event("DELETED", obj);
                }
            }
            ok(
                &json!({ "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success" }),
            )
        }
        ("DELETE", [kind, name]) => {
            let grace = body["gracePeriodSeconds"].as_i64();
            server.store().requests.push(match grace {
                Some(g) => format!("DELETE {kind}/{name} grace={g}"),
                None => format!("DELETE {kind}/{name}"),
            });
            let key = format!("{kind}/{name}");
            let Some(mut obj) = server.store().objects.get(&key).cloned() else {
                return status(404, "NotFound");
            };
            if *kind != "pods" {
                server.store().objects.remove(&key);
                return ok(
                    &json!({ "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success" }),
                );
            }
            obj["metadata"]["deletionTimestamp"] = json!("2026-11-29T00:00:00Z");
            server.bump(&mut obj);
            server.store().objects.insert(key, obj.clone());
            server.event("MODIFIED", obj.clone());
            if !server.store().hold_deletes {
                server.finish_delete(name);
            }
            ok(&obj)
        }
        _ => panic!("the driver made an unexpected request: {method} {path}"),
    }
}

/// A watch of pods: the events after its resourceVersion that match it, as soon as there are
/// some. Its body ends after them, and the watcher watches again from there, as it does when a
/// real watch times out.
async fn watch(server: &Server, q: &BTreeMap<String, String>) -> Response<Body> {
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let pod_watch = !q.contains_key("fieldSelector");
    if pod_watch {
        let mut s = server.store();
        s.watches.push(format!("WATCH from {from}"));
        if let Some(code) = s.break_next_watch.take() {
            let e = json!({ "type": "ERROR", "object": { "kind": "Status", "apiVersion": "v1",
                "metadata": {}, "status": "Failure", "message": "too old resource version",
                "reason": "Expired", "code": code } });
            return Response::builder()
                .status(200)
                .body(Body::from(format!("{e}\n").into_bytes()))
                .unwrap();
        }
    }
    loop {
        let notified = server.changed.notified();
        let lines: Vec<String> = server
            .store()
            .history
            .iter()
            .filter(|(rv, _, pod)| *rv > from && selected(pod, q))
            .map(|(_, kind, pod)| json!({ "type": kind, "object": pod }).to_string())
            .collect();
        if !lines.is_empty() {
            return Response::builder()
                .status(200)
                .body(Body::from(format!("{}\n", lines.join("\n")).into_bytes()))
                .unwrap();
        }
        notified.await;
    }
}

// ---------------------------------------------------------------------------------------------
// A replica's Node-RED: the admin API calls the driver makes.

/// Answers `GET /admin/flows/state` with `state`, and counts calls by path.
async fn node_red(state: &'static str) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let calls = Arc::new(Mutex::new(Vec::new()));
    let seen = calls.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = vec![0; 65536];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&got).to_string();
                let line = head.lines().next().unwrap_or("").to_string();
                seen.lock().unwrap().push(line.clone());
                let body = if line.starts_with("GET /admin/flows/state") {
                    json!({ "state": state }).to_string()
                } else {
                    "{}".to_string()
                };
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(resp.as_bytes()).await;
            });
        }
    });
    (addr, calls)
}

// ---------------------------------------------------------------------------------------------
// Scenarios.

struct Scenario {
    server: Arc<Server>,
    driver: KubeDriver,
    events: mpsc::UnboundedReceiver<Event>,
    instance: tandem_kube::KubeInstance,
    log: Arc<InstanceLog>,
}

fn spec() -> ProcessSpec {
    ProcessSpec {
        instance: "orders".into(),
        nodered_version: "4.1.2".into(),
        node_version: None,
        memory_mb: 256,
        ha: true,
        start_stopped: false,
        admin_secret: "admin-secret".into(),
        credential_secret: "credential-secret".into(),
        settings: json!({}),
        env: BTreeMap::new(),
        modules: BTreeMap::new(),
        storage: Some(Storage {
            url: "http://tandem-api.tandem.svc:3000/api/v1/storage/i1".into(),
            token: "storage-token".into(),
        }),
    }
}

fn flows() -> Flows {
    Flows::new(json!([{ "id": "t1", "type": "tab" }]))
}

impl Scenario {
    async fn start(setup: impl FnOnce(&mut Store)) -> Self {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let mut store = Store {
            log_lines: vec![r#"{"level":"info","msg":"Started flows"}"#.into()],
            ..Store::default()
        };
        setup(&mut store);
        let server = Arc::new(Server {
            store: Mutex::new(store),
            changed: Notify::new(),
        });
        tokio::spawn(serve(server.clone(), handle));
        let (node_red, _) = node_red("start").await;
        let client = kube::Client::new(service, NS);
        let mut driver = KubeDriver::new(client, NS);
        driver.port = node_red.port();
        driver.ready_timeout = Duration::from_secs(30);
        let (tx, events) = mpsc::unbounded_channel();
        let log = tandem_coordinator::logs::LogBook::new(1000).instance("i1");
        let instance = driver.open("orders", log.clone(), tx);
        Self {
            server,
            driver,
            events,
            instance,
            log,
        }
    }

    /// The next event, within 10 s.
    async fn next(&mut self) -> Event {
        tokio::time::timeout(Duration::from_secs(10), self.events.recv())
            .await
            .expect("no event within 10 s")
            .expect("the event channel closed")
    }

    /// No event for a moment.
    async fn quiet(&mut self) {
        if let Ok(Some(e)) =
            tokio::time::timeout(Duration::from_millis(300), self.events.recv()).await
        {
            panic!("an unexpected event: {e:?}");
        }
    }

    /// Waits until the pod watch has listed (the driver sees what the server has).
    async fn watching(&self) {
        for _ in 0..200 {
            if self
                .server
                .store()
                .watches
                .iter()
                .any(|w| w.starts_with("WATCH"))
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the driver never watched its pods");
    }

    /// The requests made since the last call, in order.
    fn take_requests(&self) -> Vec<String> {
        std::mem::take(&mut self.server.store().requests)
    }

    /// Every slot's pod made ready by the kubelet, and its `Ready` event.
    async fn ready(&mut self, slots: &[u32], adopted: bool) {
        for &slot in slots {
            self.server
                .kubelet(&format!("orders-r{slot}"), true, 0, None);
            let e = self.next().await;
            assert_eq!(e.slot, slot, "{e:?}");
            match e.kind {
                EventKind::Ready(r) => {
                    assert_eq!(r.addr.port(), self.driver.port);
                    assert_eq!(r.adopted, adopted);
                    assert_eq!(r.flows, FlowState::Started);
                    assert_eq!(r.isolation, Isolation::Container);
                }
                other => panic!("not ready: {other:?}"),
            }
        }
    }
}

/// The requests of a new replica in `slot`, in order.
fn creates(slot: u32) -> Vec<String> {
    vec![
        format!("GET pods/orders-r{slot}"),
        format!("POST configmaps/orders-r{slot}"),
        format!("POST secrets/orders-r{slot}"),
        format!("POST pods/orders-r{slot}"),
    ]
}

/// The requests of stopping `slot` (`grace` for a fence), in order.
fn deletes(slot: u32, grace: Option<u32>) -> Vec<String> {
    vec![
        match grace {
            Some(g) => format!("DELETE pods/orders-r{slot} grace={g}"),
            None => format!("DELETE pods/orders-r{slot}"),
        },
        format!("DELETE configmaps/orders-r{slot}"),
        format!("DELETE secrets/orders-r{slot}"),
    ]
}

/// The log requests among `requests`, removed: they come when a container runs, whenever.
fn without_logs(requests: Vec<String>) -> (Vec<String>, usize) {
    let logs = requests.iter().filter(|r| r.ends_with("/log")).count();
    (
        requests
            .into_iter()
            .filter(|r| !r.ends_with("/log"))
            .collect(),
        logs,
    )
}

#[tokio::test]
async fn three_replicas_are_created_made_ready_and_their_logs_followed() {
    let mut s = Scenario::start(|_| {}).await;
    s.watching().await;
    for slot in 0..3 {
        s.instance.start(slot, 1, &spec(), &flows()).await.unwrap();
    }
    s.ready(&[0, 1, 2], false).await;
    let (requests, logs) = without_logs(s.take_requests());
    assert_eq!(requests, [creates(0), creates(1), creates(2)].concat());
    assert_eq!(logs, 3, "each pod's log is followed once");
    // The pods are the stack's image, labelled, with the spec's hash; the secrets are in the
    // Secret alone.
    let pod = s.server.store().objects["pods/orders-r1"].clone();
    assert_eq!(
        pod["spec"]["containers"][0]["image"],
        "nodered/node-red:4.1.2"
    );
    assert_eq!(pod["metadata"]["labels"]["tandem.dev/instance"], "orders");
    assert!(!pod.to_string().contains("admin-secret"));
    let secret = s.server.store().objects["secrets/orders-r1"].to_string();
    assert!(secret.contains("admin-secret") && secret.contains("storage-token"));
    // The log lines are the instance's, tagged with their replica.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let page = s.log.read(
        tandem_coordinator::logs::Cursor::Latest,
        100,
        Some("orders-r2"),
    );
    assert!(
        page.entries.iter().any(|e| e.msg == "Started flows"),
        "{:?}",
        page.entries
    );
}

#[tokio::test]
async fn scaled_to_five_and_back_to_two() {
    let mut s = Scenario::start(|_| {}).await;
    s.watching().await;
    for slot in 0..3 {
        s.instance.start(slot, 1, &spec(), &flows()).await.unwrap();
    }
    s.ready(&[0, 1, 2], false).await;
    s.take_requests();
    for slot in 3..5 {
        s.instance.start(slot, 1, &spec(), &flows()).await.unwrap();
    }
    s.ready(&[3, 4], false).await;
    let (requests, _) = without_logs(s.take_requests());
    assert_eq!(requests, [creates(3), creates(4)].concat());
    // Back to 2: the three highest slots stop, gracefully, and no event says so.
    for slot in [4, 3, 2] {
        s.instance.stop(slot).await.unwrap();
    }
    let (requests, _) = without_logs(s.take_requests());
    assert_eq!(
        requests,
        [deletes(4, None), deletes(3, None), deletes(2, None)].concat()
    );
    s.quiet().await;
    let left: Vec<String> = s
        .server
        .store()
        .objects
        .keys()
        .filter(|k| k.starts_with("pods/"))
        .cloned()
        .collect();
    assert_eq!(left, ["pods/orders-r0", "pods/orders-r1"]);
}

#[tokio::test]
async fn a_rolling_replacement_goes_one_pod_at_a_time_with_the_new_spec() {
    let mut s = Scenario::start(|_| {}).await;
    s.watching().await;
    for slot in 0..3 {
        s.instance.start(slot, 1, &spec(), &flows()).await.unwrap();
    }
    s.ready(&[0, 1, 2], false).await;
    s.take_requests();
    // The coordinator drains each replica, stops it, starts it with the new spec and waits for
    // it to be ready before the next: the driver's part, in that order.
    let mut new = spec();
    new.env.insert("RELEASE".into(), "2".into());
    for slot in 0..3 {
        s.instance.stop(slot).await.unwrap();
        s.instance.start(slot, 2, &new, &flows()).await.unwrap();
        s.ready(&[slot], false).await;
    }
    let (requests, _) = without_logs(s.take_requests());
    let expected: Vec<String> = (0..3)
        .flat_map(|slot| [deletes(slot, None), creates(slot)].concat())
        .collect();
    assert_eq!(requests, expected);
    let pod = &s.server.store().objects["pods/orders-r2"];
    assert!(pod["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
        .contains(&json!({ "name": "RELEASE", "value": "2" })));
}

#[tokio::test]
async fn a_pod_that_turns_unready_is_reported_at_once_and_again_when_ready() {
    let mut s = Scenario::start(|_| {}).await;
    s.watching().await;
    s.instance.start(0, 1, &spec(), &flows()).await.unwrap();
    s.ready(&[0], false).await;
    s.server.kubelet("orders-r0", false, 0, None);
    let e = s.next().await;
    assert!(matches!(e.kind, EventKind::Hung { .. }), "{e:?}");
    // Out of rotation: the admin API is not called on a replica that is not ready.
    assert!(s.instance.check(0).await.is_err());
    s.ready(&[0], false).await;
    s.instance.check(0).await.unwrap();
}

#[tokio::test]
async fn an_oom_killed_container_is_an_exit_the_kubelet_restarts() {
    let mut s = Scenario::start(|_| {}).await;
    s.watching().await;
    s.instance.start(0, 7, &spec(), &flows()).await.unwrap();
    s.ready(&[0], false).await;
    s.take_requests();
    s.server.kubelet(
        "orders-r0",
        false,
        1,
        Some(json!({ "exitCode": 137, "reason": "OOMKilled" })),
    );
    let e = s.next().await;
    assert_eq!(
        e,
        Event {
            slot: 0,
            run: 7,
            kind: EventKind::Exited {
                reason: ExitReason::OutOfMemory,
                restarting: true
            }
        }
    );
    s.server.kubelet("orders-r0", true, 1, None);
    let e = s.next().await;
    assert!(matches!(e.kind, EventKind::Ready(_)), "{e:?}");
    // Nothing was recreated: the kubelet restarted the container; its new log is followed.
    let (requests, logs) = without_logs(s.take_requests());
    assert_eq!(requests, Vec::<String>::new());
    assert_eq!(logs, 1);
}

#[tokio::test]
async fn a_fence_deletes_the_pod_at_once_and_reports_only_once_the_api_says_it_is_gone() {
    let mut s = Scenario::start(|st| st.hold_deletes = true).await;
    s.watching().await;
    for slot in 0..2 {
        s.instance.start(slot, 1, &spec(), &flows()).await.unwrap();
    }
    s.ready(&[0, 1], false).await;
    s.take_requests();
    // While the API has not reported the pod gone, the fence holds and says nothing.
    let fence = {
        let instance = &s.instance;
        async move { instance.fence(0).await }
    };
    let server = s.server.clone();
    let api = async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let deleting = server.store().objects["pods/orders-r0"].clone();
        assert!(deleting["metadata"]["deletionTimestamp"].is_string());
        server.finish_delete("orders-r0");
    };
    let mut fenced_early = false;
    let (fenced, ()) = tokio::join!(fence, async {
        api.await;
        fenced_early = s.events.try_recv().is_ok();
    });
    fenced.unwrap();
    assert!(
        !fenced_early,
        "Fenced was sent before the API reported the pod gone"
    );
    let e = s.next().await;
    assert_eq!(e.kind, EventKind::Fenced);
    assert_eq!(e.slot, 0);
    let (requests, _) = without_logs(s.take_requests());
    assert_eq!(requests, deletes(0, Some(0)));
    // A graceful stop waits for the kubelet to finish the pod.
    let stop = {
        let instance = &s.instance;
        async move { instance.stop(1).await }
    };
    let server = s.server.clone();
    let kubelet = async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(server.store().objects.contains_key("pods/orders-r1"));
        server.finish_delete("orders-r1");
    };
    let (stopped, ()) = tokio::join!(stop, kubelet);
    stopped.unwrap();
    s.quiet().await;
}

#[tokio::test]
async fn a_restarted_tandem_adopts_its_pods_and_recreates_nothing() {
    // A first driver makes three pods, ready; a second one (Tandem restarted) opens the same
    // instance.
    let mut first = Scenario::start(|_| {}).await;
    first.watching().await;
    for slot in 0..3 {
        first
            .instance
            .start(slot, 1, &spec(), &flows())
            .await
            .unwrap();
    }
    first.ready(&[0, 1, 2], false).await;
    let objects = first.server.store().objects.clone();
    drop(first);
    let mut changed = spec();
    changed.env.insert("NEW".into(), "1".into());
    let mut s = Scenario::start(move |st| {
        st.objects = objects;
        st.rv = 100;
    })
    .await;
    s.watching().await;
    // Slots 0 and 1 with the spec they run, slot 2 with another: adopted, and stale.
    for slot in 0..2 {
        s.instance.start(slot, 1, &spec(), &flows()).await.unwrap();
    }
    s.instance.start(2, 1, &changed, &flows()).await.unwrap();
    let mut stale = BTreeMap::new();
    for _ in 0..3 {
        let e = s.next().await;
        match e.kind {
            EventKind::Ready(r) => {
                assert!(r.adopted, "{r:?}");
                assert_eq!(r.flows_rev.as_deref(), Some(flows().rev.as_str()));
                stale.insert(e.slot, r.stale);
            }
            other => panic!("not ready: {other:?}"),
        }
    }
    assert_eq!(stale, BTreeMap::from([(0, false), (1, false), (2, true)]));
    let (requests, logs) = without_logs(s.take_requests());
    assert_eq!(
        requests,
        [
            "GET pods/orders-r0",
            "GET pods/orders-r1",
            "GET pods/orders-r2"
        ]
    );
    assert_eq!(logs, 3);
}

#[tokio::test]
async fn a_watch_that_breaks_is_resumed_and_misses_nothing() {
    let mut s = Scenario::start(|_| {}).await;
    s.watching().await;
    s.instance.start(0, 1, &spec(), &flows()).await.unwrap();
    s.ready(&[0], false).await;
    // The next watch answers 410 Gone (its resourceVersion too old): the watcher lists again.
    s.server.store().break_next_watch = Some(410);
    s.instance.start(1, 1, &spec(), &flows()).await.unwrap();
    s.ready(&[1], false).await;
    let watches = s.server.store().watches.clone();
    let lists = watches.iter().filter(|w| w.starts_with("LIST")).count();
    assert!(lists >= 2, "no relist after the broken watch: {watches:?}");
    assert!(watches[0].starts_with("LIST"), "{watches:?}");
    // Every list and watch is of this instance's pods.
    assert!(
        watches
            .iter()
            .filter(|w| w.starts_with("LIST"))
            .all(|w| w == "LIST app.kubernetes.io/managed-by=tandem,tandem.dev/instance=orders"),
        "{watches:?}"
    );
}

#[tokio::test]
async fn a_pod_deleted_by_someone_else_is_an_exit() {
    let mut s = Scenario::start(|_| {}).await;
    s.watching().await;
    s.instance.start(0, 3, &spec(), &flows()).await.unwrap();
    s.ready(&[0], false).await;
    // Someone deletes the pod (kubectl, a node drained without a PodDisruptionBudget).
    s.server.finish_delete("orders-r0");
    let e = s.next().await;
    assert_eq!(
        e,
        Event {
            slot: 0,
            run: 3,
            kind: EventKind::Exited {
                reason: ExitReason::Gone("its pod was deleted".into()),
                restarting: false
            }
        }
    );
}

#[tokio::test]
async fn objects_that_are_not_tandems_are_never_touched() {
    let foreign = |kind: &str| {
        json!({ "apiVersion": "v1", "kind": kind,
            "metadata": { "name": "orders-r0", "namespace": NS, "uid": "theirs", "resourceVersion": "1",
                "labels": { "app": "someone-else" } } })
    };
    // A pod of that name: the replica does not start, and nothing is written or deleted.
    let s = Scenario::start(|st| {
        st.objects.insert("pods/orders-r0".into(), foreign("Pod"));
    })
    .await;
    s.watching().await;
    let e = s
        .instance
        .start(0, 1, &spec(), &flows())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("is not Tandem's"), "{e}");
    assert_eq!(s.take_requests(), ["GET pods/orders-r0"]);
    // A ConfigMap of that name: not replaced, no pod made.
    let s = Scenario::start(|st| {
        st.objects
            .insert("configmaps/orders-r0".into(), foreign("ConfigMap"));
    })
    .await;
    s.watching().await;
    let e = s
        .instance
        .start(0, 1, &spec(), &flows())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("ConfigMap named orders-r0"), "{e}");
    assert_eq!(
        s.take_requests(),
        [
            "GET pods/orders-r0",
            "POST configmaps/orders-r0",
            "GET configmaps/orders-r0"
        ]
    );
    assert_eq!(
        s.server.store().objects["configmaps/orders-r0"]["metadata"]["uid"],
        "theirs"
    );
}

// ---------------------------------------------------------------------------------------------
// The leader's Lease.

mod lease {
    use super::*;
    use tandem_kube::lease::{Holder, KubeLease};

    const TTL: Duration = Duration::from_secs(5);

    fn lease(server: &Arc<Server>) -> (KubeLease, tokio::task::JoinHandle<()>) {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let task = tokio::spawn(serve(server.clone(), handle));
        (KubeLease::new(kube::Client::new(service, NS), NS), task)
    }

    fn server() -> Arc<Server> {
        Arc::new(Server {
            store: Mutex::new(Store::default()),
            changed: Notify::new(),
        })
    }

    /// Another control plane renews the Lease it holds (or takes it).
    fn other_writes(server: &Server, holder: &str, transitions: i64) {
        let mut lease = server
            .store()
            .objects
            .get("leases/tandem-leader")
            .cloned()
            .unwrap();
        lease["spec"]["holderIdentity"] = json!(holder);
        lease["spec"]["leaseTransitions"] = json!(transitions);
        lease["metadata"]["annotations"]["tandem.dev/address"] = json!(format!("{holder}:3000"));
        server.bump(&mut lease);
        server
            .store()
            .objects
            .insert("leases/tandem-leader".into(), lease);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_of_that_name_that_is_not_tandems_is_left_alone() {
        let server = server();
        server.store().objects.insert(
            "leases/tandem-leader".into(),
            json!({ "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": { "name": "tandem-leader", "resourceVersion": "1" },
                "spec": { "holderIdentity": "someone" } }),
        );
        let (a, _t) = lease(&server);
        let e = a.attempt("cp-a", "a:3000", TTL).await.unwrap_err();
        assert!(e.to_string().contains("not Tandem's"), "{e}");
        assert_eq!(server.store().requests, ["GET leases/tandem-leader"]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_control_plane_takes_the_lease_and_renews_it() {
        let server = server();
        let (a, _t) = lease(&server);
        let held = a.attempt("cp-a", "10.0.0.1:3000", TTL).await.unwrap();
        assert_eq!(
            held,
            Holder {
                id: "cp-a".into(),
                address: "10.0.0.1:3000".into(),
                term: 1
            }
        );
        let renewed = a.attempt("cp-a", "10.0.0.1:3000", TTL).await.unwrap();
        assert_eq!(renewed, held);
        assert_eq!(
            server.store().requests,
            [
                "GET leases/tandem-leader",
                "POST leases/tandem-leader",
                "GET leases/tandem-leader",
                "PUT leases/tandem-leader",
            ]
        );
        let stored = server.store().objects["leases/tandem-leader"].clone();
        assert_eq!(stored["spec"]["leaseDurationSeconds"], 5);
        assert_eq!(
            stored["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "tandem"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_lease_is_not_taken_until_it_has_not_changed_for_its_duration() {
        let server = server();
        let (a, _ta) = lease(&server);
        let (b, _tb) = lease(&server);
        a.attempt("cp-a", "a:3000", TTL).await.unwrap();
        // B sees A's Lease: A holds it, renewed or not, until B has seen no change for 5 s.
        for _ in 0..4 {
            let seen = b.attempt("cp-b", "b:3000", TTL).await.unwrap();
            assert_eq!(seen.id, "cp-a");
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        // A renews: B's count starts again.
        a.attempt("cp-a", "a:3000", TTL).await.unwrap();
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(b.attempt("cp-b", "b:3000", TTL).await.unwrap().id, "cp-a");
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(b.attempt("cp-b", "b:3000", TTL).await.unwrap().id, "cp-a");
        // A stopped renewing 8 s ago by B's clock, 4 s of it seen by B... then 5 s unchanged.
        tokio::time::advance(Duration::from_secs(1)).await;
        let taken = b.attempt("cp-b", "b:3000", TTL).await.unwrap();
        assert_eq!(
            taken,
            Holder {
                id: "cp-b".into(),
                address: "b:3000".into(),
                term: 2
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_lease_is_seen_at_the_next_attempt_and_a_lost_race_is_not_an_error() {
        let server = server();
        let (a, _ta) = lease(&server);
        a.attempt("cp-a", "a:3000", TTL).await.unwrap();
        // Another control plane took it (A was stopped longer than the Lease lasts).
        other_writes(&server, "cp-b", 1);
        let now = a.attempt("cp-a", "a:3000", TTL).await.unwrap();
        assert_eq!(now.id, "cp-b", "A still believes it leads");
        assert_eq!(now.term, 2);
        // A write that races another is refused by the API (409): the other one holds it.
        server.store().requests.clear();
        tokio::time::advance(Duration::from_secs(6)).await;
        let racing = {
            let server = server.clone();
            async move {
                // The other writer renews between A's read and A's write.
                loop {
                    let gets = server
                        .store()
                        .requests
                        .iter()
                        .filter(|r| r.starts_with("GET"))
                        .count();
                    if gets >= 1 {
                        other_writes(&server, "cp-c", 2);
                        return;
                    }
                    tokio::task::yield_now().await;
                }
            }
        };
        let (won, ()) = tokio::join!(a.attempt("cp-a", "a:3000", TTL), racing);
        let won = won.unwrap();
        assert_ne!(won.id, "cp-a", "{won:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// The coordinator on the Kubernetes driver: the rollout's order and drains, and a leader whose
// lease lapsed, as the API server sees them.

mod coordinated {
    use super::*;
    use tandem_coordinator::fake::FakePlane;
    use tandem_coordinator::replica::ReplicaId;
    use tandem_coordinator::restart::RestartPolicy;
    use tandem_coordinator::spec::{DesiredState, InstanceDesired};
    use tandem_coordinator::{Coordinator, CoordinatorConfig};

    fn desired(release: &str) -> InstanceDesired {
        let mut process = spec();
        process.env.insert("RELEASE".into(), release.into());
        InstanceDesired {
            id: "i1".into(),
            hosts: vec!["orders.example.com".into()],
            state: DesiredState::Running,
            replicas: 3,
            standby: false,
            affinity: false,
            http_auth: Default::default(),
            certificate: None,
            asleep: false,
            process,
            flows: flows(),
            mqtt_urls: BTreeMap::new(),
            probe: None,
        }
    }

    struct World {
        server: Arc<Server>,
        plane: FakePlane,
        coordinator: Arc<Coordinator<KubeDriver>>,
    }

    /// The coordinator on the driver on the mock API server, with a kubelet that makes every new
    /// pod ready at once.
    async fn world() -> World {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let server = Arc::new(Server {
            store: Mutex::new(Store::default()),
            changed: Notify::new(),
        });
        tokio::spawn(serve(server.clone(), handle));
        let kubelet = server.clone();
        tokio::spawn(async move {
            loop {
                let new: Vec<String> = kubelet
                    .store()
                    .objects
                    .iter()
                    .filter(|(k, v)| k.starts_with("pods/") && v["status"].is_null())
                    .map(|(_, v)| v["metadata"]["name"].as_str().unwrap().to_string())
                    .collect();
                for name in new {
                    kubelet.kubelet(&name, true, 0, None);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        let (node_red, _) = node_red("start").await;
        let mut driver = KubeDriver::new(kube::Client::new(service, NS), NS);
        driver.port = node_red.port();
        let plane = FakePlane::new();
        let coordinator = Coordinator::new(
            Arc::new(driver),
            Arc::new(plane.clone()),
            Arc::new(tandem_coordinator::logs::LogBook::default()),
            CoordinatorConfig {
                policy: RestartPolicy {
                    base: Duration::from_millis(100),
                    max: Duration::from_millis(400),
                    stable_after: Duration::from_secs(60),
                    max_quick_crashes: 5,
                },
                retry_after: Duration::from_millis(100),
                ..CoordinatorConfig::default()
            },
        );
        World {
            server,
            plane,
            coordinator,
        }
    }

    impl World {
        async fn until(&self, what: &str, f: impl Fn(&World) -> bool) {
            for _ in 0..1000 {
                if f(self) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!(
                "{what} never happened; requests: {:#?}",
                self.server.store().requests
            );
        }

        fn posted(&self, slot: u32) -> usize {
            let pod = format!("POST pods/orders-r{slot}");
            self.server
                .store()
                .requests
                .iter()
                .filter(|r| **r == pod)
                .count()
        }
    }

    #[tokio::test]
    async fn a_rollout_drains_each_pod_before_deleting_it_and_waits_for_its_successor() {
        let w = world().await;
        w.coordinator.apply(vec![desired("1")]);
        w.until("3 replicas in rotation", |w| {
            w.plane.ready("orders").len() == 3
        })
        .await;
        w.server.store().requests.clear();
        // Every replica's drain is held until the test lets it go.
        let drains: Vec<_> = (0..3)
            .map(|slot| w.plane.hold(ReplicaId::new("orders", slot)))
            .collect();
        w.coordinator.apply(vec![desired("2")]);
        for (slot, drain) in drains.iter().enumerate() {
            let slot = slot as u32;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let deleted = format!("DELETE pods/orders-r{slot}");
            assert!(
                !w.server.store().requests.contains(&deleted),
                "r{slot} was deleted before it was drained"
            );
            drain.notify_one();
            w.until(&format!("r{slot} replaced and in rotation"), |w| {
                w.posted(slot) == 1 && w.plane.ready("orders").contains(&slot)
            })
            .await;
        }
        w.until("3 in rotation", |w| w.plane.ready("orders").len() == 3)
            .await;
        let (requests, _) = without_logs(w.server.requests_taken());
        let expected: Vec<String> = (0..3)
            .flat_map(|slot| [deletes(slot, None), creates(slot)].concat())
            .collect();
        assert_eq!(requests, expected);
        let pod = w.server.store().objects["pods/orders-r2"].clone();
        assert!(pod.to_string().contains("\"RELEASE\""));
    }

    #[tokio::test]
    async fn a_leader_whose_lease_lapsed_makes_no_request_until_it_leads_again() {
        let w = world().await;
        let leads = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let fence = leads.clone();
        w.coordinator.set_fence(Arc::new(move || {
            fence.load(std::sync::atomic::Ordering::SeqCst)
        }));
        w.coordinator.apply(vec![desired("1")]);
        w.until("3 replicas in rotation", |w| {
            w.plane.ready("orders").len() == 3
        })
        .await;
        // The lease lapses; then someone deletes a pod. A leader would make it again.
        leads.store(false, std::sync::atomic::Ordering::SeqCst);
        w.server.store().requests.clear();
        w.server.finish_delete("orders-r1");
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (requests, _) = without_logs(w.server.requests_taken());
        assert_eq!(requests, Vec::<String>::new(), "acted without the lease");
        leads.store(true, std::sync::atomic::Ordering::SeqCst);
        w.until("r1 made again", |w| w.posted(1) == 1).await;
        w.until("3 in rotation", |w| w.plane.ready("orders").len() == 3)
            .await;
    }
}
