//! Issue 12's npm modules per instance, with real npm and Node-RED: a contributed node runs once
//! its module is in the instance's list, instances with the same set share one install, and a
//! version npm cannot install leaves the replicas serving the old set.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::{hello_flows, http, Tandem};

/// `GET /roll` answers a die's roll, from `node-red-node-random`'s `random` node.
fn dice_flows() -> Value {
    json!([
        { "id": "t1", "type": "tab", "label": "Dice" },
        { "id": "in", "type": "http in", "z": "t1", "url": "/roll", "method": "get", "wires": [["rnd"]] },
        { "id": "rnd", "type": "random", "z": "t1", "low": "1", "high": "6", "inte": "true", "property": "payload", "wires": [["str"]] },
        { "id": "str", "type": "function", "z": "t1", "func": "msg.payload = String(msg.payload); return msg;", "wires": [["out"]] },
        { "id": "out", "type": "http response", "z": "t1", "statusCode": "", "headers": {}, "wires": [] }
    ])
}

async fn modules_installed(t: &Tandem, id: &str, name: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let m = t
            .api(
                "GET",
                &format!("/api/v1/instances/{id}/modules"),
                Value::Null,
            )
            .await
            .json();
        if m["modules"][name]["installed"].is_string() {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "never installed: {m}\n{}",
            t.tail_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contributed_node_runs_once_its_module_is_listed_and_a_bad_version_keeps_the_old_set() {
    let t = Tandem::start("modules").await;
    let (app, _) = t.team_and_app("Modules").await;
    let id = t.instance(&app, "dice", hello_flows(), 2).await;
    let before = t.wait_running(&id, 2).await;
    let pids = |s: &Value| -> Vec<Value> {
        s["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["pid"].clone())
            .collect()
    };
    let old_pids = pids(&before);
    let path = format!("/api/v1/instances/{id}/modules");

    // Flows that need a module the instance does not list: the deploy gate refuses them and
    // names the missing type; the replicas keep the old flows.
    let r = t
        .api(
            "PUT",
            &format!("/api/v1/instances/{id}/flows"),
            dice_flows(),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let d = deployment_end(&t, r.json()["id"].as_str().unwrap()).await;
    assert_eq!(d["status"], "rolled_back", "{d}");
    assert_eq!(d["error"], "unknown node type: random", "{d}");

    // A name npm would refuse.
    let r = t
        .api("PUT", &path, json!({ "modules": { "Bad Name": "1.0.0" } }))
        .await;
    assert_eq!(r.status, 422, "{}", r.body);

    let r = t
        .api(
            "PUT",
            &path,
            json!({ "modules": { "node-red-node-random": "~0.4.0" } }),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let d = deployment_end(&t, r.json()["id"].as_str().unwrap()).await;
    assert_eq!(d["status"], "succeeded", "{d}");
    let m = modules_installed(&t, &id, "node-red-node-random").await;
    assert_eq!(m["modules"]["node-red-node-random"]["requested"], "~0.4.0");
    let installed = m["modules"]["node-red-node-random"]["installed"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(installed.starts_with("0.4."), "{m}");
    // Every replica was replaced with the module, one at a time, before the deploy ended; then
    // flows that use it deploy.
    let s = t.status(&id).await;
    assert!(
        s["ready"] == 2 && pids(&s).iter().all(|p| p.is_u64() && !old_pids.contains(p)),
        "{s}"
    );
    let r = t
        .api(
            "PUT",
            &format!("/api/v1/instances/{id}/flows"),
            dice_flows(),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let d = deployment_end(&t, r.json()["id"].as_str().unwrap()).await;
    assert_eq!(d["status"], "succeeded", "{d}");
    for _ in 0..10 {
        let r = t.get("dice", "/roll").await.unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        let n: u32 = r.body.parse().unwrap();
        assert!((1..=6).contains(&n), "{n}");
    }

    // A second instance with the same set: installed once, the cache reused.
    let other = t.instance(&app, "dice2", hello_flows(), 1).await;
    let r = t
        .api(
            "PUT",
            &format!("/api/v1/instances/{other}/modules"),
            json!({ "modules": { "node-red-node-random": "~0.4.0" } }),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    modules_installed(&t, &other, "node-red-node-random").await;
    let logs = t.logs(&other, "limit=1000").await;
    assert!(
        !logs.iter().any(|l| l["msg"]
            .as_str()
            .unwrap_or("")
            .starts_with("installing node-red-node-random")),
        "the second instance installed the set again"
    );

    // A version npm cannot install: the deploy rolls back with npm's words, and the replicas
    // serve the old set throughout.
    let pids_before = pids(&t.status(&id).await);
    let r = t
        .api(
            "PUT",
            &path,
            json!({ "modules": { "node-red-node-random": "99.0.0" } }),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let d = deployment_end(&t, r.json()["id"].as_str().unwrap()).await;
    assert_eq!(d["status"], "rolled_back", "{d}");
    assert!(
        d["error"].as_str().unwrap_or_default().contains("99.0.0"),
        "{d}"
    );
    let m = t.api("GET", &path, Value::Null).await.json();
    assert_eq!(
        m["modules"]["node-red-node-random"]["requested"], "~0.4.0",
        "{m}"
    );
    let s = t.wait_running(&id, 2).await;
    assert_eq!(pids(&s), pids_before, "no replica was replaced: {s}");
    let r = t.get("dice", "/roll").await.unwrap();
    assert_eq!(r.status, 200, "{r:?}");
}

/// A request to the editor's admin API of `instance`, through the proxy, as the editor makes it
/// with a member's credentials.
async fn editor(
    t: &Tandem,
    instance: &str,
    method: &str,
    path: &str,
    body: &Value,
) -> (u16, String) {
    let auth = format!("Bearer {}", t.token);
    let body = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    let mut headers = vec![
        ("Authorization", auth.as_str()),
        ("Accept", "application/json"),
    ];
    if !body.is_empty() {
        headers.push(("Content-Type", "application/json"));
    }
    let r = http(
        t.http,
        method,
        &format!("{instance}.localhost"),
        path,
        &headers,
        &body,
    )
    .await
    .unwrap();
    (r.status, r.body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_palette_install_from_the_editor_lands_in_the_module_list_and_survives_a_restart() {
    let t = Tandem::start("palette").await;
    let (app, _) = t.team_and_app("Palette").await;
    let id = t.instance(&app, "palette", hello_flows(), 1).await;
    let pid = t.wait_running(&id, 1).await["replicas"][0]["pid"].clone();
    let path = format!("/api/v1/instances/{id}/modules");

    // The editor's palette manager installs a module: it runs at once, without a restart, and
    // the store lists it.
    let (status, body) = editor(
        &t,
        "palette",
        "POST",
        "/admin/nodes",
        &json!({ "module": "node-red-node-random", "version": "0.4.1" }),
    )
    .await;
    if status != 200 {
        let logs = t.logs(&id, "limit=100").await;
        panic!("{status} {body}\n{logs:#?}");
    }
    let m = t.api("GET", &path, Value::Null).await.json();
    assert_eq!(
        m["modules"]["node-red-node-random"]["requested"], "0.4.1",
        "{m}"
    );
    let (status, body) = editor(&t, "palette", "POST", "/admin/flows", &dice_flows()).await;
    assert_eq!(status, 204, "{body}");
    rolls(&t, "palette").await;
    // The new set is installed into the shared cache for the next start, and the replica,
    // which runs it already, is not replaced for it.
    modules_installed(&t, &id, "node-red-node-random").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let s = t.status(&id).await;
    assert_eq!(s["replicas"][0]["pid"], pid, "not restarted for it: {s}");
    assert_eq!(s["replicas"][0]["state"], "running", "{s}");

    // A restart installs the list into the shared cache; the module still runs, and the
    // palette shows it as installed.
    assert_eq!(t.action(&id, "restart").await.status, 200);
    t.wait_status(&id, 300, |s| {
        s["ready"] == 1 && s["replicas"][0]["pid"].is_u64() && s["replicas"][0]["pid"] != pid
    })
    .await;
    let m = modules_installed(&t, &id, "node-red-node-random").await;
    assert_eq!(
        m["modules"]["node-red-node-random"]["installed"], "0.4.1",
        "{m}"
    );
    rolls(&t, "palette").await;
    let (status, body) = editor(
        &t,
        "palette",
        "GET",
        "/admin/nodes/node-red-node-random",
        &Value::Null,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let module: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(module["user"], true, "{module}");
    assert_eq!(module["version"], "0.4.1", "{module}");

    // Removed from the palette (once no flow uses it): gone from the list.
    let (status, body) = editor(&t, "palette", "POST", "/admin/flows", &hello_flows()).await;
    assert_eq!(status, 204, "{body}");
    let (status, body) = editor(
        &t,
        "palette",
        "DELETE",
        "/admin/nodes/node-red-node-random",
        &Value::Null,
    )
    .await;
    assert_eq!(status, 204, "{body}");
    let m = t.api("GET", &path, Value::Null).await.json();
    assert_eq!(m["modules"], json!({}), "{m}");
}

/// Waits until `GET /roll` of `instance` answers a die's roll (flows start moments after a
/// deploy or a start answers).
async fn rolls(t: &Tandem, instance: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = t.get(instance, "/roll").await.unwrap();
        if r.status == 200 && r.body.parse::<u32>().is_ok_and(|n| (1..=6).contains(&n)) {
            return;
        }
        assert!(Instant::now() < deadline, "{r:?}\n{}", t.tail_log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn deployment_end(t: &Tandem, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let d = t
            .api("GET", &format!("/api/v1/deployments/{id}"), Value::Null)
            .await
            .json();
        if d["status"] != "running" {
            return d;
        }
        assert!(Instant::now() < deadline, "{d}\n{}", t.tail_log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
