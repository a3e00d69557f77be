//! Issue 12's npm modules per instance, with real npm and Node-RED: a contributed node runs once
//! its module is in the instance's list, instances with the same set share one install, and a
//! version npm cannot install leaves the replicas serving the old set.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::{hello_flows, Tandem};

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
