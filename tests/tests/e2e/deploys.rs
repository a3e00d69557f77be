//! Issue 11: flows in Tandem's store, snapshots, deploys, rollbacks and pipelines, on real
//! Node-RED replicas behind the real proxy, with requests flowing throughout.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{http, kill9, Tandem};

/// Flows answering `GET /version` with `version`.
fn version_flows(version: &str) -> Value {
    json!([
        { "id": "t1", "type": "tab", "label": "Version" },
        { "id": "in", "type": "http in", "z": "t1", "url": "/version", "method": "get", "wires": [["fn"]] },
        { "id": "fn", "type": "function", "z": "t1", "func": format!("msg.payload = '{version}'; return msg;"), "wires": [["out"]] },
        { "id": "out", "type": "http response", "z": "t1", "statusCode": "", "headers": {}, "wires": [] }
    ])
}

/// One answer of the request loop.
#[derive(Debug, Clone)]
struct Answer {
    sent: Instant,
    status: u16,
    body: String,
}

/// `GET /version` of `instance` in a loop, two at a time, until stopped: every answer, or 0
/// for a request that got none.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<Answer>>>,
}

impl Load {
    fn start(t: &Tandem, instance: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let host = format!("{instance}.localhost");
        let tasks = (0..2)
            .map(|_| {
                let (stop, host, addr) = (stop.clone(), host.clone(), t.http);
                tokio::spawn(async move {
                    let mut out = Vec::new();
                    // Bounded: a deploy that never ends fails the test, not the machine.
                    while !stop.load(Ordering::Relaxed) && out.len() < 200_000 {
                        let sent = Instant::now();
                        let r = http(addr, "GET", &host, "/version", &[], "").await;
                        out.push(match r {
                            Ok(r) => Answer {
                                sent,
                                status: r.status,
                                body: r.body,
                            },
                            Err(e) => Answer {
                                sent,
                                status: 0,
                                body: e.to_string(),
                            },
                        });
                    }
                    out
                })
            })
            .collect();
        Self { stop, tasks }
    }

    async fn stop(self) -> Vec<Answer> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for t in self.tasks {
            all.extend(t.await.unwrap());
        }
        all.sort_by_key(|a| a.sent);
        all
    }
}

/// Waits for the deployment to end; returns it.
async fn deployment_end(t: &Tandem, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let d = t
            .api("GET", &format!("/api/v1/deployments/{id}"), Value::Null)
            .await
            .json();
        if !matches!(d["status"].as_str(), Some("running" | "pending")) {
            return d;
        }
        assert!(
            Instant::now() < deadline,
            "deployment {id} never ended: {d}\n{}",
            t.tail_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asserts that every answer was a 200, and that every answer to a request sent after `done`
/// was `expect`; returns how many answers there were.
fn check_answers(answers: &[Answer], done: Instant, expect: &str) -> usize {
    let failed: Vec<&Answer> = answers.iter().filter(|a| a.status != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed, first: {:?}",
        failed.len(),
        answers.len(),
        failed.first()
    );
    let after: Vec<&Answer> = answers.iter().filter(|a| a.sent >= done).collect();
    assert!(!after.is_empty(), "no request after the deploy ended");
    let wrong: Vec<&&Answer> = after.iter().filter(|a| a.body != expect).collect();
    assert!(
        wrong.is_empty(),
        "{} answers after the deploy were not {expect:?}: {:?}",
        wrong.len(),
        wrong.first()
    );
    answers.len()
}

/// A deploy through the editor of a non-HA instance, as Node-RED's editor makes it (through the
/// proxy, with the caller's token).
async fn editor_deploy(t: &Tandem, instance: &str, flows: &Value) {
    let auth = format!("Bearer {}", t.token);
    let r = http(
        t.http,
        "POST",
        &format!("{instance}.localhost"),
        "/admin/flows",
        &[
            ("Authorization", &auth),
            ("Node-RED-Deployment-Type", "full"),
        ],
        &flows.to_string(),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 204, "{r:?}");
}

/// Waits until `GET /version` of `instance` answers `expect`.
async fn answers(t: &Tandem, instance: &str, expect: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = t.get(instance, "/version").await.unwrap();
        if r.status == 200 && r.body == expect {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{instance} answers {r:?}, not {expect}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_editor_deploy_is_in_the_store_at_once_and_survives_a_restart() {
    let t = Tandem::start("editor-store").await;
    let (app, _) = t.team_and_app("Store").await;
    let id = t.instance(&app, "dev", version_flows("v1"), 1).await;
    t.wait_running(&id, 1).await;
    answers(&t, "dev", "v1").await;

    editor_deploy(&t, "dev", &version_flows("v2")).await;
    // In the store at once: the flows route and a snapshot taken right after have it.
    let flows = t
        .api("GET", &format!("/api/v1/instances/{id}/flows"), Value::Null)
        .await
        .json();
    assert!(flows["flows"].to_string().contains("'v2'"), "{flows}");
    let snap = t
        .api(
            "POST",
            &format!("/api/v1/instances/{id}/snapshots"),
            json!({ "name": "after the editor" }),
        )
        .await;
    assert_eq!(snap.status, 201, "{}", snap.body);
    let full = t
        .api(
            "GET",
            &format!(
                "/api/v1/snapshots/{}/full",
                snap.json()["id"].as_str().unwrap()
            ),
            Value::Null,
        )
        .await
        .json();
    assert!(
        full["flows"].to_string().contains("'v2'"),
        "{full}\n{:#?}",
        t.logs(&id, "limit=100").await
    );
    answers(&t, "dev", "v2").await;
    // The replica reports the revision it runs, and the coordinator deploys nothing back to it.
    let rev = flows["rev"].as_str().unwrap().to_string();
    let s = t
        .wait_status(&id, 10, |s| s["replicas"][0]["flows_rev"] == rev.as_str())
        .await;
    assert_eq!(s["replicas"][0]["state"], "running", "{s}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let logs = t.logs(&id, "limit=1000").await;
    assert!(
        !logs.iter().any(|l| l["msg"]
            .as_str()
            .unwrap_or("")
            .starts_with("deployed flows")),
        "the coordinator deployed the editor's flows back"
    );

    // A restart replaces the replica; the new one reads the store.
    let pid = s["replicas"][0]["pid"].as_u64().unwrap();
    assert_eq!(t.action(&id, "restart").await.status, 200);
    t.wait_status(&id, 60, |s| {
        s["state"] == "running" && s["replicas"][0]["pid"].as_u64() != Some(pid)
    })
    .await;
    answers(&t, "dev", "v2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_deploys_to_three_replicas_without_a_failed_request_and_rolls_back_the_same_way()
{
    let t = Tandem::start("pipeline").await;
    let (app, _) = t.team_and_app("Pipeline").await;
    let dev = t.instance(&app, "dev", version_flows("v2"), 1).await;
    let prod = t.instance(&app, "prod", version_flows("v1"), 3).await;
    t.wait_running(&dev, 1).await;
    t.wait_running(&prod, 3).await;
    answers(&t, "prod", "v1").await;

    let p = t
        .api(
            "POST",
            "/api/v1/pipelines",
            json!({ "application_id": app, "name": "to prod" }),
        )
        .await;
    assert_eq!(p.status, 201, "{}", p.body);
    let pid = p.json()["id"].as_str().unwrap().to_string();
    let stages = format!("/api/v1/pipelines/{pid}/stages");
    let s = t
        .api(
            "POST",
            &stages,
            json!({ "name": "dev", "instance_id": dev, "action": "create_snapshot" }),
        )
        .await;
    assert_eq!(s.status, 201, "{}", s.body);
    let dev_stage = s.json()["stages"][0]["id"].as_str().unwrap().to_string();
    let s = t
        .api(
            "POST",
            &stages,
            json!({ "name": "prod", "instance_id": prod, "action": "prompt" }),
        )
        .await;
    assert_eq!(s.status, 201, "{}", s.body);

    // dev → prod under a steady request loop.
    let load = Load::start(&t, "prod");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = t
        .api(
            "POST",
            &format!("{stages}/{dev_stage}/deploy"),
            json!({ "probe": { "path": "/version", "expect_status": 200 } }),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let d = r.json();
    assert_eq!(d["status"], "running", "{d}");
    let d = deployment_end(&t, d["id"].as_str().unwrap()).await;
    let done = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = load.stop().await;
    assert_eq!(d["status"], "succeeded", "{d}");
    let replicas = d["replicas"].as_array().unwrap();
    assert_eq!(replicas.len(), 3, "{d}");
    assert!(replicas.iter().all(|r| r["status"] == "deployed"), "{d}");
    let n = check_answers(&got, done, "v2");
    eprintln!("pipeline deploy: {n} requests, 0 failed");
    // No replica was restarted for it.
    let s = t.status(&prod).await;
    assert!(
        s["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["restarts"] == 0),
        "{s}"
    );

    // Rollback to what ran before, the same way.
    let load = Load::start(&t, "prod");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = t
        .api(
            "POST",
            &format!("/api/v1/instances/{prod}/actions/rollback"),
            json!({ "snapshot_id": d["previous_snapshot_id"] }),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let d = deployment_end(&t, r.json()["id"].as_str().unwrap()).await;
    let done = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = load.stop().await;
    assert_eq!(d["status"], "succeeded", "{d}");
    let n = check_answers(&got, done, "v1");
    eprintln!("rollback: {n} requests, 0 failed");

    // The history, newest first.
    let list = t
        .api(
            "GET",
            &format!("/api/v1/instances/{prod}/deployments"),
            Value::Null,
        )
        .await
        .json();
    let ids: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["status"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["succeeded", "succeeded"], "{list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_with_an_unknown_node_type_are_rolled_back_and_never_answer() {
    let t = Tandem::start("gate").await;
    let (app, _) = t.team_and_app("Gate").await;
    let prod = t.instance(&app, "prod", version_flows("v1"), 3).await;
    t.wait_running(&prod, 3).await;
    answers(&t, "prod", "v1").await;
    let before = t
        .api(
            "GET",
            &format!("/api/v1/instances/{prod}/flows"),
            Value::Null,
        )
        .await
        .json();

    let mut bad = version_flows("v2");
    bad.as_array_mut()
        .unwrap()
        .push(json!({ "id": "x", "type": "foo-bar", "z": "t1", "wires": [] }));
    let load = Load::start(&t, "prod");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = t
        .api("PUT", &format!("/api/v1/instances/{prod}/flows"), bad)
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    // One deploy at a time.
    let again = t
        .api(
            "PUT",
            &format!("/api/v1/instances/{prod}/flows"),
            version_flows("v3"),
        )
        .await;
    assert_eq!(again.status, 409, "{}", again.body);
    let d = deployment_end(&t, r.json()["id"].as_str().unwrap()).await;
    let done = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = load.stop().await;
    assert_eq!(d["status"], "rolled_back", "{d}");
    assert_eq!(d["error"], "unknown node type: foo-bar", "{d}");
    // Prod answered the old version throughout: the replica that got the bad flows was out of
    // rotation, the others never got them.
    assert!(
        got.iter().all(|a| a.body == "v1"),
        "{:?}",
        got.iter().find(|a| a.body != "v1")
    );
    check_answers(&got, done, "v1");
    let after = t
        .api(
            "GET",
            &format!("/api/v1/instances/{prod}/flows"),
            Value::Null,
        )
        .await
        .json();
    assert_eq!(
        after["rev"], before["rev"],
        "the store has the old flows back"
    );
    // The replica that refused them says why in the deploy; the instance itself is whole again.
    assert!(
        d["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["error"].as_str().is_some_and(|e| e.contains("foo-bar"))),
        "{d}"
    );
    let s = t.wait_running(&prod, 3).await;
    assert!(s["deploy_refused"].is_null(), "{s}");
}

/// A local HTTP server that answers every request with the `Authorization` header it got.
async fn echo_auth_server() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&got);
                let auth = text
                    .lines()
                    .find_map(|l| {
                        l.split_once(':')
                            .filter(|(k, _)| k.eq_ignore_ascii_case("authorization"))
                            .map(|(_, v)| v.trim().to_string())
                    })
                    .unwrap_or_else(|| "none".into());
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{auth}",
                    auth.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    port
}

/// Flows whose `GET /call` calls `url` with basic auth from the node's credentials, and answers
/// with what came back.
fn calling_flows(url: &str, credentials: Option<Value>) -> Value {
    let mut req = json!({
        "id": "req", "type": "http request", "z": "t1", "method": "GET", "ret": "txt",
        "url": url, "authType": "basic", "wires": [["out"]]
    });
    if let Some(c) = credentials {
        req["credentials"] = c;
    }
    json!([
        { "id": "t1", "type": "tab", "label": "Call" },
        { "id": "in", "type": "http in", "z": "t1", "url": "/call", "method": "get", "wires": [["req"]] },
        req,
        { "id": "out", "type": "http response", "z": "t1", "statusCode": "", "headers": {}, "wires": [] }
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exported_snapshot_carries_a_working_credential_to_another_instance() {
    let t = Tandem::start("export").await;
    let (app, _) = t.team_and_app("Export").await;
    let port = echo_auth_server().await;
    let url = format!("http://127.0.0.1:{port}/");
    let password = "pa55-w0rd-never-in-clear";
    let source = t
        .instance(
            &app,
            "source",
            calling_flows(&url, Some(json!({ "user": "ada", "password": password }))),
            1,
        )
        .await;
    let target = t
        .instance(&app, "target", calling_flows(&url, None), 1)
        .await;
    t.wait_running(&source, 1).await;
    t.wait_running(&target, 1).await;
    use base64::Engine;
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("ada:{password}"))
    );
    let r = t.get("source", "/call").await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, basic.as_str()));
    let r = t.get("target", "/call").await.unwrap();
    assert_eq!(r.body, "none", "the target has no credential yet");

    let snap = t
        .api(
            "POST",
            &format!("/api/v1/instances/{source}/snapshots"),
            json!({ "name": "with a password" }),
        )
        .await
        .json();
    let doc = t
        .api(
            "POST",
            &format!("/api/v1/snapshots/{}/export", snap["id"].as_str().unwrap()),
            json!({ "credential_secret": "between-tandems" }),
        )
        .await;
    assert_eq!(doc.status, 200, "{}", doc.body);
    assert!(
        !doc.body.contains(password),
        "the export holds the password in clear"
    );
    let doc = doc.json();
    assert!(doc["credentials"]["$"].is_string(), "{doc}");

    // The wrong secret is refused, naming it.
    let r = t
        .api(
            "POST",
            &format!("/api/v1/instances/{target}/snapshots/import"),
            json!({ "snapshot": doc, "credential_secret": "wrong" }),
        )
        .await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(r.body.contains("credential_secret"), "{}", r.body);

    let r = t
        .api(
            "POST",
            &format!("/api/v1/instances/{target}/snapshots/import"),
            json!({ "snapshot": doc, "credential_secret": "between-tandems" }),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let imported = r.json()["id"].as_str().unwrap().to_string();
    let r = t
        .api(
            "POST",
            &format!("/api/v1/instances/{target}/actions/rollback"),
            json!({ "snapshot_id": imported }),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let d = deployment_end(&t, r.json()["id"].as_str().unwrap()).await;
    assert_eq!(d["status"], "succeeded", "{d}");
    let r = t.get("target", "/call").await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, basic.as_str()));

    // Nothing of Tandem's holds the password in clear: not the database, not the replicas' files.
    for entry in walk(&t.dir) {
        let bytes = std::fs::read(&entry).unwrap_or_default();
        assert!(
            !bytes
                .windows(password.len())
                .any(|w| w == password.as_bytes()),
            "{} holds the password in clear",
            entry.display()
        );
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            let Ok(kind) = e.file_type() else { continue };
            if kind.is_dir() {
                // The installed stacks are not Tandem's data.
                if p.file_name().is_some_and(|n| n == "node_modules") {
                    continue;
                }
                todo.push(p);
            } else if kind.is_file() {
                out.push(p);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_deploy_leaves_every_replica_on_the_same_flows() {
    let t = Tandem::start("killed-deploy").await;
    let (app, _) = t.team_and_app("Killed").await;
    let prod = t.instance(&app, "prod", version_flows("v1"), 3).await;
    let s = t.wait_running(&prod, 3).await;
    answers(&t, "prod", "v1").await;
    // The last replica to get the flows dies as the deploy begins.
    let victim = s["replicas"][2]["pid"].as_u64().unwrap();
    let r = t
        .api(
            "PUT",
            &format!("/api/v1/instances/{prod}/flows"),
            version_flows("v2"),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    kill9(victim);
    let d = deployment_end(&t, r.json()["id"].as_str().unwrap()).await;
    let expect = match d["status"].as_str() {
        Some("succeeded") => "v2",
        Some("rolled_back") => {
            assert!(d["error"].is_string(), "{d}");
            "v1"
        }
        _ => panic!("the deploy ended neither all new nor all old: {d}"),
    };
    let s = t.wait_running(&prod, 3).await;
    assert_eq!(s["replicas"][2]["restarts"], 1, "{s}");
    // Every replica answers the same version: many requests, spread by the proxy.
    for _ in 0..30 {
        let r = t.get("prod", "/version").await.unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, expect), "{s}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_deployed_before_the_store_held_them_move_into_it_on_upgrade() {
    let temp = tempfile::Builder::new()
        .prefix("tandem-e2e-upgrade-")
        .tempdir()
        .unwrap();
    let dir = temp.path().join("data");
    let mut first = Tandem::start_in(&dir, true).await;
    let (app, _) = first.team_and_app("Upgrade").await;
    let id = first
        .instance(&app, "legacy", version_flows("created"), 1)
        .await;
    first.wait_running(&id, 1).await;
    first.stop();

    // What the previous version left: the flows the editor deployed, with a credential, in the
    // replica's own files, and a store that never had them.
    let port = echo_auth_server().await;
    let mut flows = calling_flows(&format!("http://127.0.0.1:{port}/"), None);
    for node in version_flows("from the editor")
        .as_array()
        .unwrap()
        .iter()
        .skip(1)
    {
        let mut node = node.clone();
        node["id"] = json!(format!("v-{}", node["id"].as_str().unwrap()));
        if let Some(w) = node["wires"][0][0].as_str() {
            node["wires"] = json!([[format!("v-{w}")]]);
        }
        flows.as_array_mut().unwrap().push(node);
    }
    let key = tandem_controlplane::secrets::PlatformKey::load_or_create(&dir).unwrap();
    let plain = json!({ "req": { "user": "ada", "password": "from-the-old-files" } });
    let creds = tandem_controlplane::node_credentials::encrypt(
        plain.as_object().unwrap(),
        &key.derive("credentials", &id),
    )
    .unwrap();
    let user_dir = dir.join("instances/legacy/r0");
    std::fs::write(user_dir.join("flows.json"), flows.to_string()).unwrap();
    std::fs::write(user_dir.join("flows_cred.json"), creds.to_string()).unwrap();
    // And a function its editor saved to the library.
    std::fs::create_dir_all(user_dir.join("lib/functions/tools")).unwrap();
    std::fs::write(
        user_dir.join("lib/functions/tools/greet.js"),
        "// name: greet\n// outputs: 1\nmsg.payload = 'hi';\nreturn msg;",
    )
    .unwrap();
    let store = tandem_controlplane::store::Store::open(&dir, None)
        .await
        .unwrap();
    sqlx::query("UPDATE instances SET flows_in_store = 0")
        .execute(&store.pool)
        .await
        .unwrap();
    drop(store);

    // The upgraded Tandem's replica reads its own files once and hands them to the store.
    let t = Tandem::start_in(&dir, true).await;
    t.wait_running(&id, 1).await;
    answers(&t, "legacy", "from the editor").await;
    use base64::Engine;
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("ada:from-the-old-files")
    );
    let r = t.get("legacy", "/call").await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, basic.as_str()));
    let stored = t
        .api("GET", &format!("/api/v1/instances/{id}/flows"), Value::Null)
        .await
        .json();
    assert!(
        stored["flows"].to_string().contains("from the editor"),
        "{stored}"
    );
    assert_eq!(stored["has_credentials"], true, "{stored}");
    // The library came along, and what the editor saves to it now goes to the store.
    let library = |method: &'static str, path: &'static str, body: Value| {
        let (addr, auth) = (t.http, format!("Bearer {}", t.token));
        async move {
            http(
                addr,
                method,
                "legacy.localhost",
                &format!("/admin/library/local/functions/{path}"),
                &[("Authorization", &auth)],
                &if body.is_null() {
                    String::new()
                } else {
                    body.to_string()
                },
            )
            .await
            .unwrap()
        }
    };
    let r = library("GET", "tools/", Value::Null).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.json(),
        json!([{ "fn": "greet.js", "name": "greet", "outputs": "1" }])
    );
    let r = library("GET", "tools/greet.js", Value::Null).await;
    assert_eq!(r.body, "msg.payload = 'hi';\nreturn msg;");
    let r = library(
        "POST",
        "tools/bye.js",
        json!({ "name": "bye", "text": "return null;" }),
    )
    .await;
    assert_eq!(r.status, 204, "{r:?}");
    // From now on the store is the source: the files may go.
    std::fs::remove_file(user_dir.join("flows.json")).unwrap();
    std::fs::remove_file(user_dir.join("flows_cred.json")).unwrap();
    std::fs::remove_dir_all(user_dir.join("lib")).unwrap();
    assert_eq!(t.action(&id, "restart").await.status, 200);
    let pid = t.status(&id).await["replicas"][0]["pid"].clone();
    t.wait_status(&id, 60, |s| {
        s["state"] == "running" && s["replicas"][0]["pid"] != pid
    })
    .await;
    answers(&t, "legacy", "from the editor").await;
    let r = t.get("legacy", "/call").await.unwrap();
    assert_eq!(r.body, basic);
    let r = library("GET", "tools/", Value::Null).await;
    assert_eq!(
        r.json(),
        json!([{ "fn": "bye.js", "name": "bye" }, { "fn": "greet.js", "name": "greet", "outputs": "1" }])
    );
    let r = library("GET", "tools/bye.js", Value::Null).await;
    assert_eq!(r.body, "return null;");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_standby_mode_a_deploy_reaches_the_standbys_then_switches_the_active() {
    let t = Tandem::start("standby-deploy").await;
    let (app, _) = t.team_and_app("Standby").await;
    let id = t.standby_instance(&app, "sb", version_flows("v1")).await;
    t.wait_running(&id, 2).await;
    answers(&t, "sb", "v1").await;
    let before = crate::harness::actives(&t.status(&id).await);
    assert_eq!(before.len(), 1);

    let load = Load::start(&t, "sb");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = t
        .api(
            "PUT",
            &format!("/api/v1/instances/{id}/flows"),
            version_flows("v2"),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let d = deployment_end(&t, r.json()["id"].as_str().unwrap()).await;
    let done = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = load.stop().await;
    assert_eq!(d["status"], "succeeded", "{d}");
    // The active moved to the standby that got the new flows first; one active throughout.
    let s = t.status(&id).await;
    let after = crate::harness::actives(&s);
    assert_eq!(after.len(), 1, "{s}");
    assert_ne!(after, before, "the active was switched: {s}");
    let failed = got.iter().filter(|a| a.status != 200).count();
    eprintln!(
        "standby deploy: {} requests, {failed} failed ({:?})",
        got.len(),
        got.iter()
            .filter(|a| a.status != 200)
            .map(|a| a.status)
            .collect::<std::collections::BTreeSet<_>>()
    );
    check_answers(&got, done, "v2");
}
