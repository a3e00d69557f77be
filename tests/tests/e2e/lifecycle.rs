//! One instance through its life: create, serve, stop, start, restart, suspend, crash, adopt.

use serde_json::{json, Value};

use crate::harness::{alive, hello_flows, kill9, Tandem};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_is_served_by_host_and_follows_its_actions() {
    let t = Tandem::start("life").await;
    let (app, _) = t.team_and_app("Life").await;
    let id = t.instance(&app, "life", hello_flows(), 1).await;
    let s = t.wait_running(&id, 1).await;
    assert_eq!(s["summary"], "running 1/1");
    let r0 = &s["replicas"][0];
    assert_eq!(
        (r0["id"].as_str(), r0["state"].as_str()),
        (Some("life-r0"), Some("running"))
    );
    assert!(
        r0["port"].as_u64().is_some() && r0["pid"].as_u64().is_some(),
        "{s}"
    );
    let first_pid = r0["pid"].as_u64().unwrap();

    let r = t.get("life", "/hello").await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "hello"), "{r:?}");
    assert_eq!(r.header("x-tandem-replica"), Some("life-r0"));
    // Another host is not this instance.
    assert_eq!(t.get("nope", "/hello").await.unwrap().status, 404);

    // The replica's own lines, tagged with it, and Tandem's.
    let logs = t.logs(&id, "limit=1000").await;
    assert!(
        logs.iter()
            .any(|e| e["src"] == "life-r0" && e["msg"] == "Started flows"),
        "{logs:?}"
    );
    assert!(logs.iter().any(|e| e["src"] == "tandem"));
    let only_r0 = t.logs(&id, "replica=r0&limit=1000").await;
    assert!(!only_r0.is_empty() && only_r0.iter().all(|e| e["src"] == "life-r0"));

    // Prometheus: the instance, its replica and the proxy's traffic to it, on the metrics
    // listener; the API listener does not serve /metrics (it names every team's instances).
    let r = crate::harness::http(t.api, "GET", "api", "/metrics", &[], "")
        .await
        .unwrap();
    assert_eq!(r.status, 404, "{}", r.body);
    let m = t.metrics().await;
    for series in [
        "tandem_instance_ready_replicas{instance=\"life\"} 1",
        "tandem_instance_desired_replicas{instance=\"life\"} 1",
        "tandem_replica_up{instance=\"life\",replica=\"life-r0\",state=\"running\"} 1",
        "tandem_replica_restarts_total{instance=\"life\",replica=\"life-r0\"} 0",
        "tandem_proxy_requests_total{instance=\"life\"",
        "tandem_api_requests_total{",
    ] {
        assert!(m.contains(series), "no {series} in\n{m}");
    }

    // Stop: no replica, the host answers 503.
    assert_eq!(t.action(&id, "stop").await.status, 200);
    let s = t.wait_status(&id, 60, |s| s["state"] == "stopped").await;
    assert_eq!(s["replicas"], json!([]));
    assert_eq!(t.get("life", "/hello").await.unwrap().status, 503);
    assert!(!alive(first_pid));

    // Start again.
    assert_eq!(t.action(&id, "start").await.status, 200);
    let s = t.wait_running(&id, 1).await;
    let second_pid = s["replicas"][0]["pid"].as_u64().unwrap();
    assert_ne!(second_pid, first_pid);
    assert_eq!(t.get("life", "/hello").await.unwrap().status, 200);

    // Restart: a new process.
    assert_eq!(t.action(&id, "restart").await.status, 200);
    let s = t
        .wait_status(&id, 120, |s| {
            s["state"] == "running" && s["replicas"][0]["pid"].as_u64() != Some(second_pid)
        })
        .await;
    assert!(s["replicas"][0]["pid"].as_u64().is_some());
    assert_eq!(t.get("life", "/hello").await.unwrap().status, 200);

    // Suspend.
    assert_eq!(t.action(&id, "suspend").await.status, 200);
    t.wait_status(&id, 60, |s| s["state"] == "suspended").await;
    assert_eq!(t.get("life", "/hello").await.unwrap().status, 503);

    // Delete: the instance, its host and its data are gone.
    assert_eq!(t.action(&id, "start").await.status, 200);
    t.wait_running(&id, 1).await;
    let r = t
        .api("DELETE", &format!("/api/v1/instances/{id}"), Value::Null)
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let dir = t.dir.join("instances/life");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while dir.exists() || t.get("life", "/hello").await.unwrap().status != 404 {
        assert!(std::time::Instant::now() < deadline, "instance not removed");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_is_restarted_and_a_crash_loop_is_held() {
    let t = Tandem::start("crash").await;
    let (app, _) = t.team_and_app("Crash").await;
    let id = t.instance(&app, "phoenix", hello_flows(), 1).await;
    let s = t.wait_running(&id, 1).await;
    let pid = s["replicas"][0]["pid"].as_u64().unwrap();
    kill9(pid);
    let s = t
        .wait_status(&id, 60, |s| {
            s["state"] == "running" && s["replicas"][0]["restarts"] == 1
        })
        .await;
    assert_ne!(s["replicas"][0]["pid"].as_u64(), Some(pid));
    let last_exit = s["replicas"][0]["last_exit"].as_str().unwrap_or_default();
    assert!(last_exit.contains("signal: 9"), "{s}");
    assert_eq!(t.get("phoenix", "/hello").await.unwrap().status, 200);

    // A flow that takes Node-RED down right after its flows start: held as crashed after the
    // configured 3 quick crashes, with the reason, instead of restarted forever.
    let crashing = json!([
        { "id": "t1", "type": "tab", "label": "Crash" },
        { "id": "go", "type": "inject", "z": "t1", "once": true, "onceDelay": 0.1, "repeat": "", "wires": [["boom"]] },
        { "id": "boom", "type": "function", "z": "t1", "func": "Promise.reject(new Error('boom from the flow')); return msg;", "wires": [[]] }
    ]);
    let bad = t.instance(&app, "crashy", crashing, 1).await;
    let s = t.wait_status(&bad, 120, |s| s["state"] == "crashed").await;
    assert_eq!(s["replicas"][0]["state"], "crashed", "{s}");
    assert!(s["reason"].as_str().is_some(), "{s}");
    let logs = t.logs(&bad, "limit=1000").await;
    assert!(
        logs.iter().any(|e| e["msg"]
            .as_str()
            .unwrap_or("")
            .contains("boom from the flow")),
        "{logs:?}"
    );
    assert!(logs.iter().any(
        |e| e["src"] == "tandem" && e["msg"].as_str().unwrap_or("").contains("held as crashed")
    ));
    // The other instance is not affected.
    assert_eq!(t.status(&id).await["state"], "running");

    // A flow that blocks Node-RED's event loop: the liveness check finds it hung, and the
    // replica is killed and restarted.
    let mut flows = hello_flows();
    for node in [
        json!({ "id": "hin", "type": "http in", "z": "t1", "url": "/hang", "method": "get", "wires": [["spin"]] }),
        json!({ "id": "spin", "type": "function", "z": "t1", "func": "while (true) {} return msg;", "wires": [[]] }),
    ] {
        flows.as_array_mut().unwrap().push(node);
    }
    let hang = t.instance(&app, "hangs", flows, 1).await;
    let s = t.wait_running(&hang, 1).await;
    let pid = s["replicas"][0]["pid"].as_u64().unwrap();
    let http = t.http;
    tokio::spawn(async move {
        let _ = crate::harness::http(http, "GET", "hangs.localhost", "/hang", &[], "").await;
    });
    let s = t
        .wait_status(&hang, 60, |s| {
            s["state"] == "running" && s["replicas"][0]["restarts"] == 1
        })
        .await;
    assert_ne!(s["replicas"][0]["pid"].as_u64(), Some(pid));
    let why = s["replicas"][0]["last_exit"].as_str().unwrap_or_default();
    assert!(why.contains("hung"), "{s}");
    assert!(!alive(pid));
    assert_eq!(t.get("hangs", "/hello").await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_tandem_adopts_running_replicas() {
    let temp = tempfile::Builder::new()
        .prefix("tandem-e2e-adopt-")
        .tempdir()
        .unwrap();
    // The data directory is made inside by the harness, as `Tandem::start` does.
    let dir = temp.path().join("data");
    let mut t = Tandem::start_in(&dir, false).await;
    let (app, _) = t.team_and_app("Adopt").await;
    let id = t.instance(&app, "steady", hello_flows(), 1).await;
    let s = t.wait_running(&id, 1).await;
    let pid = s["replicas"][0]["pid"].as_u64().unwrap();
    t.stop();
    assert!(alive(pid), "the replica outlives tandem");

    let t2 = Tandem::start_in(&dir, true).await;
    let s = t2.wait_running(&id, 1).await;
    assert_eq!(
        s["replicas"][0]["pid"].as_u64(),
        Some(pid),
        "adopted, not restarted: {s}"
    );
    assert_eq!(t2.get("steady", "/hello").await.unwrap().status, 200);
    let logs = t2.logs(&id, "limit=1000").await;
    assert!(logs
        .iter()
        .any(|e| e["msg"].as_str().unwrap_or("").contains("adopted")));
    drop(t2);
    assert!(!alive(pid));
}
