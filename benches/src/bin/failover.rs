//! Failover benchmark (`failover` binary): how long an HA instance of `tandem serve` serves
//! errors when a replica hangs (SIGSTOP) or dies (SIGKILL) under a steady stream of requests.
//!
//! Usage: `cargo run --release -p tandem-benches --bin failover -- <tandem binary> [rounds]`
//! (at most 8 rounds: more would hit each replica five times within a minute, a crash loop)
//! (`benches/failover.sh` builds tandem and runs it). Stacks are shared with the tests
//! (`TANDEM_TEST_STACKS`, default `<tmp>/tandem-test-stacks`).
//!
//! Scenarios, each `rounds` times (default 3), medians printed with every round's numbers:
//! - standby, SIGSTOP of the active: time from the stop to the first 200 from the new active,
//!   and the requests that failed meanwhile;
//! - standby, SIGKILL of the active: the same;
//! - balanced (2 replicas), SIGSTOP of one: time until it is out of rotation (its status leaves
//!   `running`, published to the proxy at the same moment), and the requests that failed.
//!
//! The load is 4 workers, each sending `GET /hello` one at a time through Tandem's proxy, with a
//! 5 s deadline per request.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[path = "../common.rs"]
mod common;
use common::{call, free_port, median, Error};

struct Tandem {
    api: SocketAddr,
    http: SocketAddr,
    token: String,
    child: std::process::Child,
    dir: std::path::PathBuf,
}

impl Tandem {
    async fn start(bin: &str) -> Result<Self, Error> {
        let dir = std::env::temp_dir().join(format!("tandem-failover-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let stacks = std::env::var_os("TANDEM_TEST_STACKS")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| std::env::temp_dir().join("tandem-test-stacks"));
        let (api, http, metrics) = (free_port()?, free_port()?, free_port()?);
        let log = std::fs::File::create(dir.join("tandem.log"))?;
        let child = Command::new(bin)
            .arg("serve")
            .arg("--data-dir")
            .arg(&dir)
            .arg("--stacks-dir")
            .arg(&stacks)
            .args(["--api-listen", &api.to_string()])
            .args(["--http-listen", &http.to_string()])
            .args(["--metrics-listen", &metrics.to_string()])
            .args(["--stop-replicas-on-exit", "true"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !matches!(call(api, "GET", "api", "/healthz", None, None).await, Ok(a) if a.status == 200)
        {
            if Instant::now() > deadline {
                return Err("tandem serve did not start".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let token = std::fs::read_to_string(dir.join("admin-token"))?
            .trim()
            .to_owned();
        Ok(Self {
            api,
            http,
            token,
            child,
            dir,
        })
    }

    async fn api(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, Error> {
        let a = call(
            self.api,
            method,
            "api",
            path,
            Some(&self.token),
            body.as_ref(),
        )
        .await?;
        if a.status >= 300 {
            return Err(format!(
                "{method} {path}: {} {}",
                a.status,
                String::from_utf8_lossy(&a.body)
            )
            .into());
        }
        Ok(serde_json::from_slice(&a.body).unwrap_or(Value::Null))
    }

    /// The observed status of an instance.
    async fn status(&self, id: &str) -> Result<Value, Error> {
        let s = self
            .api("GET", &format!("/api/v1/instances/{id}/status"), None)
            .await?;
        Ok(s["observed"].clone())
    }

    async fn wait(
        &self,
        id: &str,
        what: &str,
        ok: impl Fn(&Value) -> bool,
    ) -> Result<Value, Error> {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let s = self.status(id).await?;
            if ok(&s) {
                return Ok(s);
            }
            if Instant::now() > deadline {
                return Err(format!("{id} never {what}: {s}").into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Tandem {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Requests that failed, and which replica answered last, from 4 workers.
struct Load {
    stop: Arc<AtomicBool>,
    failed: Arc<AtomicU64>,
    ok: Arc<AtomicU64>,
    last: Arc<Mutex<Option<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(http: SocketAddr, host: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(AtomicU64::new(0));
        let ok = Arc::new(AtomicU64::new(0));
        let last = Arc::new(Mutex::new(None));
        let tasks = (0..4)
            .map(|_| {
                let (stop, failed, ok, last, host) = (
                    stop.clone(),
                    failed.clone(),
                    ok.clone(),
                    last.clone(),
                    host.clone(),
                );
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let get = call(http, "GET", &host, "/hello", None, None);
                        match tokio::time::timeout(Duration::from_secs(5), get).await {
                            Ok(Ok(a)) if a.status == 200 => {
                                ok.fetch_add(1, Ordering::Relaxed);
                                if let Ok(mut l) = last.lock() {
                                    *l = a.replica;
                                }
                            }
                            _ => {
                                failed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                })
            })
            .collect();
        Self {
            stop,
            failed,
            ok,
            last,
            tasks,
        }
    }

    async fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

fn signal(pid: u64, sig: &str) {
    let _ = Command::new("kill")
        .args([sig, &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

fn flows() -> Value {
    json!([
        { "id": "t1", "type": "tab", "label": "Hello" },
        { "id": "in", "type": "http in", "z": "t1", "url": "/hello", "method": "get", "wires": [["out"]] },
        { "id": "out", "type": "http response", "z": "t1", "statusCode": "", "headers": {}, "wires": [] }
    ])
}

fn actives(s: &Value) -> Vec<u64> {
    s["replicas"]
        .as_array()
        .map(|rs| {
            rs.iter()
                .filter(|r| r["active"] == true)
                .filter_map(|r| r["slot"].as_u64())
                .collect()
        })
        .unwrap_or_default()
}

/// One standby takeover: `sig` to the active; time to the first 200 from another replica, and
/// the requests that failed until the instance is whole again.
async fn standby_round(
    t: &Tandem,
    id: &str,
    name: &str,
    sig: &str,
) -> Result<(Duration, u64), Error> {
    let s = t
        .wait(id, "had one active of 2", |s| {
            s["summary"] == "running 2/2" && actives(s).len() == 1
        })
        .await?;
    let active = actives(&s)[0];
    let pid = s["replicas"][active as usize]["pid"].as_u64().unwrap_or(0);
    let old = format!("{name}-r{active}");
    let load = Load::start(t.http, format!("{name}.localhost"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = load.failed.load(Ordering::Relaxed);
    signal(pid, sig);
    let start = Instant::now();
    let took = loop {
        let last = load.last.lock().ok().and_then(|l| l.clone());
        if last.is_some_and(|r| r != old) {
            break start.elapsed();
        }
        if start.elapsed() > Duration::from_secs(120) {
            return Err(format!("no takeover: {}", t.status(id).await?).into());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    t.wait(id, "whole again", |s| {
        s["summary"] == "running 2/2" && actives(s).len() == 1
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let failed = load.failed.load(Ordering::Relaxed) - before;
    load.finish().await;
    signal(pid, "-CONT");
    Ok((took, failed))
}

/// One balanced hang: SIGSTOP of the replica in `slot`; time until it leaves the rotation,
/// and the requests that failed until it is back.
async fn balanced_round(
    t: &Tandem,
    id: &str,
    name: &str,
    slot: usize,
) -> Result<(Duration, u64), Error> {
    let s = t
        .wait(id, "ran 2/2", |s| s["summary"] == "running 2/2")
        .await?;
    let pid = s["replicas"][slot]["pid"].as_u64().unwrap_or(0);
    let restarts = s["replicas"][slot]["restarts"].as_u64().unwrap_or(0);
    let load = Load::start(t.http, format!("{name}.localhost"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = load.failed.load(Ordering::Relaxed);
    signal(pid, "-STOP");
    let start = Instant::now();
    t.wait(id, "took the replica out", |s| {
        s["replicas"][slot]["state"] != "running"
    })
    .await?;
    let took = start.elapsed();
    t.wait(id, "brought the replica back", |s| {
        s["summary"] == "running 2/2" && s["replicas"][slot]["restarts"].as_u64() > Some(restarts)
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let failed = load.failed.load(Ordering::Relaxed) - before;
    let ok = load.ok.load(Ordering::Relaxed);
    load.finish().await;
    signal(pid, "-CONT");
    println!("  balanced round: {ok} answered");
    Ok((took, failed))
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let bin = args
        .next()
        .ok_or("usage: failover <tandem binary> [rounds]")?;
    let rounds: usize = args
        .next()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3)
        .clamp(1, 8);
    let t = Tandem::start(&bin).await?;
    let team = t
        .api("POST", "/api/v1/teams", Some(json!({"name": "Bench"})))
        .await?;
    let app = t
        .api(
            "POST",
            "/api/v1/applications",
            Some(json!({"name": "app", "team_id": team["id"]})),
        )
        .await?;
    let stacks = t.api("GET", "/api/v1/stacks", None).await?;
    let stack = stacks["items"][0]["id"].clone();
    // One instance per scenario, and the replica hit alternates: a replica killed or hung
    // again and again within a minute of its start is a crash loop, held as designed.
    let mut ids = Vec::new();
    for (name, mode) in [
        ("stopped", "standby"),
        ("killed", "standby"),
        ("balanced", "balanced"),
    ] {
        let i = t
            .api(
                "POST",
                "/api/v1/instances",
                Some(json!({
                    "name": name, "application_id": app["id"], "stack_id": stack,
                    "flows": flows(), "ha": {"replicas": 2, "mode": mode},
                })),
            )
            .await?;
        ids.push(i["id"].as_str().unwrap_or_default().to_owned());
    }
    let mut table = Vec::new();
    for (i, (label, name, sig)) in [
        ("standby, SIGSTOP of the active", "stopped", "-STOP"),
        ("standby, SIGKILL of the active", "killed", "-KILL"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut times = Vec::new();
        let mut fails = Vec::new();
        for _ in 0..rounds {
            let (took, failed) = standby_round(&t, &ids[i], name, sig).await?;
            println!("  {label}: first 200 from the new active after {took:?}, {failed} failed");
            times.push(took);
            fails.push(failed);
        }
        table.push((label, median(times), fails));
    }
    let mut times = Vec::new();
    let mut fails = Vec::new();
    for round in 0..rounds {
        let (took, failed) = balanced_round(&t, &ids[2], "balanced", round % 2).await?;
        println!(
            "  balanced, SIGSTOP of r{}: out of rotation after {took:?}, {failed} failed",
            round % 2
        );
        times.push(took);
        fails.push(failed);
    }
    table.push((
        "balanced, SIGSTOP of one replica (out of rotation)",
        median(times),
        fails,
    ));
    println!();
    println!("| scenario | median time | failed requests per round | target |");
    println!("|---|---|---|---|");
    let targets = [
        "< 2 s",
        "< 200 ms",
        "< 2 s, 0 failed beyond those in flight",
    ];
    for ((label, took, fails), target) in table.iter().zip(targets) {
        println!("| {label} | {took:?} | {fails:?} | {target} |");
    }
    Ok(())
}
