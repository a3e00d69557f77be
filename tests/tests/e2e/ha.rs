//! HA instances: N replicas behind the proxy, a replica killed or the count changed under a
//! steady stream of requests, and the editor blocked.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::{actives, alive, hello_flows, kill9, Tandem};

/// What a request loop saw.
#[derive(Debug, Default)]
pub(crate) struct Seen {
    pub ok: u64,
    pub failed: Vec<String>,
    pub by_replica: BTreeMap<String, u64>,
}

/// `GET /hello` sent to an instance from 2 workers, one request at a time each, until
/// [`Load::finish`]. Each worker counts its answers as they come, so that a test can check that
/// the load runs at a given moment ([`Load::still_running`]): a "no failed request" means
/// something only while requests are sent. The loops end by themselves after 10 minutes or
/// 50,000 requests each, which `finish` reports as a failure.
pub(crate) struct Load {
    stop: Arc<AtomicBool>,
    /// Answers (successes and failures) per worker, so far.
    answered: Vec<Arc<AtomicU64>>,
    workers: Vec<tokio::task::JoinHandle<(Seen, Option<String>)>>,
}

impl Load {
    pub(crate) const WORKERS: usize = 2;

    pub(crate) fn start(t: &Tandem, instance: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let answered: Vec<_> = (0..Self::WORKERS)
            .map(|_| Arc::new(AtomicU64::new(0)))
            .collect();
        let workers = answered
            .iter()
            .map(|answered| {
                let (stop, answered) = (stop.clone(), answered.clone());
                let (http, host) = (t.http, format!("{instance}.localhost"));
                tokio::spawn(async move {
                    let mut seen = Seen::default();
                    let deadline = Instant::now() + Duration::from_secs(600);
                    for _ in 0..50_000 {
                        if stop.load(Ordering::Relaxed) {
                            return (seen, None);
                        }
                        if Instant::now() > deadline {
                            return (seen, Some("ran for 10 minutes".to_string()));
                        }
                        let get = crate::harness::http(http, "GET", &host, "/hello", &[], "");
                        match tokio::time::timeout(Duration::from_secs(10), get).await {
                            Ok(Ok(r)) if r.status == 200 => {
                                seen.ok += 1;
                                let replica =
                                    r.header("x-tandem-replica").unwrap_or("?").to_string();
                                *seen.by_replica.entry(replica).or_default() += 1;
                            }
                            Ok(Ok(r)) => {
                                seen.failed.push(format!("{} {}", r.status, r.body.trim()))
                            }
                            Ok(Err(e)) => seen.failed.push(e.to_string()),
                            Err(_) => seen.failed.push("no answer in 10 s".to_string()),
                        }
                        answered.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    (seen, Some("sent 50,000 requests".to_string()))
                })
            })
            .collect();
        Self {
            stop,
            answered,
            workers,
        }
    }

    /// Waits until every worker has had 10 more answers than now; panics after 30 s. Called
    /// once a change is complete, it shows that the load ran through the change.
    pub(crate) async fn still_running(&self, after: &str) {
        let now: Vec<u64> = self
            .answered
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let counts: Vec<u64> = self
                .answered
                .iter()
                .map(|a| a.load(Ordering::Relaxed))
                .collect();
            if counts.iter().zip(&now).all(|(c, n)| *c >= n + 10) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the load stopped: after {after}, answers per worker went from {now:?} to {counts:?} in 30 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the workers; what they saw. Panics if one had ended by itself.
    pub(crate) async fn finish(self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Seen::default();
        for (i, w) in self.workers.into_iter().enumerate() {
            let (s, ended) = w.await.unwrap();
            assert_eq!(ended, None, "load worker {i} ended before it was stopped");
            all.ok += s.ok;
            all.failed.extend(s.failed);
            for (k, v) in s.by_replica {
                *all.by_replica.entry(k).or_default() += v;
            }
        }
        all
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_costs_no_request_and_comes_back() {
    let t = Tandem::start("ha-kill").await;
    let (app, _) = t.team_and_app("Ha").await;
    let id = t.instance(&app, "ha", hello_flows(), 2).await;
    let s = t.wait_running(&id, 2).await;
    assert_eq!(s["summary"], "running 2/2");

    // The editor and admin API are blocked on an HA instance, whatever the spelling.
    for path in [
        "/admin",
        "/admin/",
        "/ADMIN/flows",
        "//admin/settings",
        "/%61dmin/",
    ] {
        assert_eq!(t.get("ha", path).await.unwrap().status, 403, "{path}");
    }

    let load = Load::start(&t, "ha");
    load.still_running("the start").await;
    let victim = s["replicas"][1]["pid"].as_u64().unwrap();
    kill9(victim);
    // It is restarted and back in rotation.
    let s = t
        .wait_status(&id, 60, |s| {
            s["state"] == "running" && s["ready"] == 2 && s["replicas"][1]["restarts"] == 1
        })
        .await;
    assert_ne!(s["replicas"][1]["pid"].as_u64(), Some(victim));
    let back = Instant::now();
    // Requests reach the restarted replica again.
    let before = t.get("ha", "/hello").await.unwrap();
    assert_eq!(before.status, 200);
    let mut reached = false;
    while back.elapsed() < Duration::from_secs(10) {
        let r = t.get("ha", "/hello").await.unwrap();
        if r.header("x-tandem-replica") == Some("ha-r1") {
            reached = true;
            break;
        }
    }
    assert!(reached, "ha-r1 did not come back into rotation");
    load.still_running("ha-r1 came back").await;
    let seen = load.finish().await;
    println!("kill under load: {seen:?}");
    assert!(seen.failed.is_empty(), "failed requests: {:?}", seen.failed);
    assert!(seen.ok > 50, "{seen:?}");
    assert!(
        seen.by_replica.contains_key("ha-r0") && seen.by_replica.contains_key("ha-r1"),
        "{seen:?}"
    );

    // Both replicas' lines are in the log, tagged.
    let logs = t.logs(&id, "limit=1000").await;
    for src in ["ha-r0", "ha-r1"] {
        assert!(logs.iter().any(|e| e["src"] == src), "no line from {src}");
    }
    let r1 = t.logs(&id, "replica=1&limit=1000").await;
    assert!(!r1.is_empty(), "no log line for replica=1");
    assert!(r1.iter().all(|e| e["src"] == "ha-r1"), "{r1:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_starts_and_stops_only_the_difference_without_a_failed_request() {
    let t = Tandem::start("ha-scale").await;
    let (app, _) = t.team_and_app("Scale").await;
    let id = t.instance(&app, "scale", hello_flows(), 2).await;
    let s = t.wait_running(&id, 2).await;
    let pids: Vec<Value> = (0..2).map(|i| s["replicas"][i]["pid"].clone()).collect();

    let load = Load::start(&t, "scale");
    load.still_running("the start").await;

    let r = t
        .api(
            "PUT",
            &format!("/api/v1/instances/{id}/ha"),
            json!({ "replicas": 3 }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let s = t.wait_running(&id, 3).await;
    assert_eq!(s["summary"], "running 3/3");
    // The first two kept running: same processes.
    assert_eq!(
        (
            s["replicas"][0]["pid"].clone(),
            s["replicas"][1]["pid"].clone()
        ),
        (pids[0].clone(), pids[1].clone())
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while t
        .get("scale", "/hello")
        .await
        .unwrap()
        .header("x-tandem-replica")
        != Some("scale-r2")
    {
        assert!(Instant::now() < deadline, "scale-r2 never served");
    }
    load.still_running("scaling to 3").await;
    let r2 = s["replicas"][2]["pid"].as_u64().unwrap();
    assert!(alive(r2), "scale-r2 (pid {r2}) is not running: {s}");

    let r = t
        .api(
            "PUT",
            &format!("/api/v1/instances/{id}/ha"),
            json!({ "replicas": 2 }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let s = t
        .wait_status(&id, 60, |s| {
            s["state"] == "running" && s["replicas"].as_array().map(Vec::len) == Some(2)
        })
        .await;
    assert_eq!(
        (
            s["replicas"][0]["pid"].clone(),
            s["replicas"][1]["pid"].clone()
        ),
        (pids[0].clone(), pids[1].clone())
    );
    // ... and the third is gone: its process ended, not only its place in the status.
    let deadline = Instant::now() + Duration::from_secs(30);
    while alive(r2) {
        assert!(
            Instant::now() < deadline,
            "scale-r2 (pid {r2}) still runs 30 s after scaling to 2: {s}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    load.still_running("scaling to 2").await;
    // A changed environment replaces the replicas one at a time, still without a failed request.
    let r = t
        .api(
            "PUT",
            &format!("/api/v1/instances/{id}"),
            json!({ "env": { "GREETING": "hi" } }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    t.wait_status(&id, 120, |s| {
        s["summary"] == "running 2/2"
            && s["replicas"][0]["pid"] != pids[0]
            && s["replicas"][1]["pid"] != pids[1]
    })
    .await;
    load.still_running("the rolling replacement").await;
    let seen = load.finish().await;
    println!("scale 2 -> 3 -> 2 and a rolling replacement under load: {seen:?}");
    assert!(seen.failed.is_empty(), "failed requests: {:?}", seen.failed);

    // HA off: one replica, with the editor (its API answers, not the proxy's 403).
    let r = t
        .api("DELETE", &format!("/api/v1/instances/{id}/ha"), Value::Null)
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    t.wait_status(&id, 120, |s| {
        s["state"] == "running" && s["replicas"].as_array().map(Vec::len) == Some(1)
    })
    .await;
    // Behind the editor's sign-in like any instance: Node-RED's editor with the platform
    // admin's token, 401 without credentials.
    let auth = format!("Bearer {}", t.token);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = t
            .request("scale", "GET", "/admin/", &[("Authorization", &auth)])
            .await
            .unwrap();
        if r.status == 200 && r.body.contains("Node-RED") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no editor 30 s after HA was turned off: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = t.get("scale", "/admin/").await.unwrap();
    assert_eq!(r.status, 401, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_mode_has_one_active_replica_and_fails_over() {
    let t = Tandem::start("ha-standby").await;
    let (app, _) = t.team_and_app("Standby").await;
    let id = t.standby_instance(&app, "standby", ticking_flows()).await;
    let s = t
        .wait_status(&id, 120, |s| {
            s["summary"] == "running 2/2" && actives(s).len() == 1
        })
        .await;
    let active = actives(&s)[0];
    let active_id = format!("standby-r{active}");
    // Only the active replica runs its flows: ticks come from it alone.
    let ticks = ticks_after(&t, &id, Duration::from_millis(1500)).await;
    assert!(ticks.get(&active_id).copied().unwrap_or(0) > 0, "{ticks:?}");
    assert_eq!(ticks.len(), 1, "a standby ran its flows: {ticks:?}");
    // Only the active replica answers; the standby's flows do not run.
    for _ in 0..20 {
        let r = t.get("standby", "/hello").await.unwrap();
        assert_eq!(
            (r.status, r.header("x-tandem-replica")),
            (200, Some(active_id.as_str()))
        );
    }

    // The active dies: the standby takes over (its flows started only then: checked by the
    // ticks below).
    let pid = s["replicas"][active as usize]["pid"].as_u64().unwrap();
    kill9(pid);
    let other = format!("standby-r{}", 1 - active);
    let start = Instant::now();
    loop {
        let s = t.status(&id).await;
        if let Ok(r) = t.get("standby", "/hello").await {
            if r.status == 200 {
                assert_eq!(r.header("x-tandem-replica"), Some(other.as_str()));
                break;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no failover: {s}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "standby failover: first 200 from {other} {:?} after the kill",
        start.elapsed()
    );
    // The old active comes back as the standby, with its flows stopped.
    let s = t
        .wait_status(&id, 60, |s| {
            s["summary"] == "running 2/2" && s["replicas"][active as usize]["restarts"] == 1
        })
        .await;
    assert_eq!(actives(&s), vec![1 - active], "{s}");
    // The new active ticks; the old one, back as the standby, does not.
    let ticks = ticks_after(&t, &id, Duration::from_millis(1500)).await;
    assert_eq!(ticks.keys().collect::<Vec<_>>(), vec![&other], "{ticks:?}");
    for _ in 0..10 {
        let r = t.get("standby", "/hello").await.unwrap();
        assert_eq!(r.header("x-tandem-replica"), Some(other.as_str()));
    }
}

/// `hello_flows` plus an inject node that logs `tick` every 200 ms while the flows run.
pub(crate) fn ticking_flows() -> Value {
    let mut flows = hello_flows();
    for node in [
        json!({ "id": "tick", "type": "inject", "z": "t1", "once": true, "onceDelay": 0.1, "repeat": "0.2", "wires": [["say"]] }),
        json!({ "id": "say", "type": "function", "z": "t1", "func": "node.warn('tick'); return null;", "wires": [[]] }),
    ] {
        flows.as_array_mut().unwrap().push(node);
    }
    flows
}

/// The `tick` lines per replica logged during `wait`, from now on.
pub(crate) async fn ticks_after(t: &Tandem, id: &str, wait: Duration) -> BTreeMap<String, u64> {
    let r = t
        .api(
            "GET",
            &format!("/api/v1/instances/{id}/logs?limit=1"),
            Value::Null,
        )
        .await;
    let cursor = r.json()["meta"]["next_cursor"]
        .as_str()
        .unwrap()
        .to_string();
    tokio::time::sleep(wait).await;
    let mut ticks = BTreeMap::new();
    for e in t.logs(id, &format!("cursor={cursor}&limit=1000")).await {
        if e["msg"] == "tick" {
            *ticks
                .entry(e["src"].as_str().unwrap_or("?").to_string())
                .or_default() += 1;
        }
    }
    ticks
}

/// Issue 12's cookie affinity, on by default in balanced mode: a browser stays on its replica,
/// moves once when that replica dies, and stays where it went when the replica is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_stays_on_its_replica_and_moves_once_when_it_dies() {
    let t = Tandem::start("ha-affinity").await;
    let (app, _) = t.team_and_app("Affinity").await;
    let id = t.instance(&app, "aff", hello_flows(), 2).await;
    let s = t.wait_running(&id, 2).await;
    let ask = |cookie: Option<String>| {
        let t = &t;
        async move {
            let headers: Vec<(&str, &str)> = cookie
                .as_deref()
                .map(|c| vec![("Cookie", c)])
                .unwrap_or_default();
            let r = t.request("aff", "GET", "/hello", &headers).await.unwrap();
            assert_eq!(r.status, 200, "{r:?}");
            let replica = r.header("x-tandem-replica").unwrap().to_string();
            let set = r
                .header("set-cookie")
                .map(|c| c.split(';').next().unwrap().to_string());
            (replica, set)
        }
    };
    let (home, cookie) = ask(None).await;
    let cookie = cookie.expect("a new browser gets a cookie");
    assert_eq!(cookie, format!("tandem_affinity={home}"));
    for _ in 0..10 {
        assert_eq!(ask(Some(cookie.clone())).await, (home.clone(), None));
    }

    // Its replica dies: the browser moves, told where it is now.
    let slot: usize = home.trim_start_matches("aff-r").parse().unwrap();
    let pid = s["replicas"][slot]["pid"].as_u64().unwrap();
    kill9(pid);
    let (now_on, moved) = ask(Some(cookie.clone())).await;
    assert_ne!(now_on, home);
    let moved = moved.expect("a cookie for its new replica");
    assert_eq!(moved, format!("tandem_affinity={now_on}"));

    // Back: the moved browser stays where it went.
    t.wait_status(&id, 60, |s| {
        s["state"] == "running" && s["ready"] == 2 && s["replicas"][slot]["restarts"] == 1
    })
    .await;
    for _ in 0..10 {
        assert_eq!(ask(Some(moved.clone())).await, (now_on.clone(), None));
    }
}
