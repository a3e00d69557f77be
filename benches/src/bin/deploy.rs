//! Deploy benchmark (`deploy` binary): how long new flows take to reach every replica of an HA
//! instance of `tandem serve`, and how many requests fail meanwhile, for Tandem's in-place
//! deploy and for a restart of every replica (FlowFuse's way of deploying, the peer).
//!
//! Usage: `cargo run --release -p tandem-benches --bin deploy -- <tandem binary> [rounds]`
//! (at most 5 rounds) (`benches/deploy.sh` builds tandem and runs it). Stacks are shared with
//! the failover benchmark (`TANDEM_TEST_STACKS`, default `<tmp>/tandem-test-stacks`).
//!
//! For instances of 1, 3 and 5 replicas (balanced), each `rounds` times (default 3), medians
//! printed with every round's numbers:
//! - in place: `PUT /api/v1/instances/{id}/flows` with flows whose `GET /version` answers a new
//!   string, then `GET /api/v1/deployments/{id}` every 50 ms until it is no longer running;
//!   time from the PUT to `succeeded`, the requests that failed, and whether every request sent
//!   after the end got the new version;
//! - restart: new flows put in the same way (untimed), then `POST
//!   /api/v1/instances/{id}/actions/restart`, which replaces every replica one at a time (each
//!   drained first); time until the status is `running` with every replica ready under a new
//!   pid, and the requests that failed.
//!
//! The load is 4 workers, each sending `GET /version` one at a time through Tandem's proxy,
//! with a 5 s deadline per request; every answer but a 200 counts as failed. Failed requests
//! are counted from the start of the deploy (or restart) to 1 s after its end.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
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
        let dir = std::env::temp_dir().join(format!("tandem-deploy-{}", std::process::id()));
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
        // From here on, `Drop` stops it, whatever happens.
        let mut t = Self {
            api,
            http,
            token: String::new(),
            child,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !matches!(call(api, "GET", "api", "/healthz", None, None).await, Ok(a) if a.status == 200)
        {
            if Instant::now() > deadline {
                return Err("tandem serve did not start".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        t.token = std::fs::read_to_string(t.dir.join("admin-token"))?
            .trim()
            .to_owned();
        Ok(t)
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

    /// Polls the observed status every 50 ms until `ok`.
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
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Puts new flows; polls the deploy every 50 ms until it is no longer pending or running.
    /// Returns the deploy as it ended and when its end was seen.
    async fn deploy(&self, id: &str, flows: Value) -> Result<(Value, Instant), Error> {
        let d = self
            .api("PUT", &format!("/api/v1/instances/{id}/flows"), Some(flows))
            .await?;
        let did = d["id"]
            .as_str()
            .ok_or_else(|| format!("PUT flows answered no deploy id: {d}"))?
            .to_owned();
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let d = self
                .api("GET", &format!("/api/v1/deployments/{did}"), None)
                .await?;
            let seen = Instant::now();
            if !matches!(d["status"].as_str(), Some("pending" | "running")) {
                return Ok((d, seen));
            }
            if seen > deadline {
                return Err(format!("deploy {did} never ended: {d}").into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
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

/// One request of the load: when it was sent, its status (0 when it got no answer in time)
/// and its body (or the error).
struct Reply {
    sent: Instant,
    status: u16,
    body: String,
}

/// 4 workers sending `GET /version` one at a time; every reply is kept.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<Reply>>>,
}

impl Load {
    fn start(http: SocketAddr, host: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..4)
            .map(|_| {
                let (stop, host) = (stop.clone(), host.clone());
                tokio::spawn(async move {
                    let mut out = Vec::new();
                    // Bounded: a run that never ends is an error, not an exhausted machine.
                    while !stop.load(Ordering::Relaxed) && out.len() < 2_000_000 {
                        let sent = Instant::now();
                        let get = call(http, "GET", &host, "/version", None, None);
                        out.push(
                            match tokio::time::timeout(Duration::from_secs(5), get).await {
                                Ok(Ok(a)) => Reply {
                                    sent,
                                    status: a.status,
                                    body: String::from_utf8_lossy(&a.body).into_owned(),
                                },
                                Ok(Err(e)) => Reply {
                                    sent,
                                    status: 0,
                                    body: e.to_string(),
                                },
                                Err(_) => Reply {
                                    sent,
                                    status: 0,
                                    body: "no answer within 5 s".into(),
                                },
                            },
                        );
                    }
                    out
                })
            })
            .collect();
        Self { stop, tasks }
    }

    /// Stops the workers; every reply, in the order sent.
    async fn finish(self) -> Result<Vec<Reply>, Error> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for t in self.tasks {
            all.extend(t.await?);
        }
        all.sort_by_key(|r| r.sent);
        Ok(all)
    }
}

/// What the load saw of one deploy or restart.
struct Outcome {
    took: Duration,
    /// Requests sent from its start on that failed.
    failed: usize,
    /// Requests sent from its start on.
    sent: usize,
    /// Requests sent after its end, and those of them answered with another body than the new
    /// version's.
    after: usize,
    stale: usize,
}

impl Outcome {
    fn new(replies: &[Reply], from: Instant, done: Instant, expect: &str, label: &str) -> Self {
        let window: Vec<&Reply> = replies.iter().filter(|r| r.sent >= from).collect();
        let failed: Vec<&&Reply> = window.iter().filter(|r| r.status != 200).collect();
        let warmup = replies.len() - window.len();
        let warmup_failed = replies
            .iter()
            .filter(|r| r.sent < from && r.status != 200)
            .count();
        if warmup_failed > 0 {
            println!("    {label}: {warmup_failed} of {warmup} requests failed before it began");
        }
        if !failed.is_empty() {
            // Which failures, and when: a count per status and body, the first and the last.
            let mut kinds: BTreeMap<(u16, String), usize> = BTreeMap::new();
            for r in &failed {
                let body: String = r.body.chars().take(80).collect();
                *kinds.entry((r.status, body)).or_default() += 1;
            }
            let at = |r: &Reply| r.sent.saturating_duration_since(from);
            println!(
                "    {label}: {} failed, sent from +{:?} to +{:?} (end at +{:?}):",
                failed.len(),
                at(failed[0]),
                at(failed[failed.len() - 1]),
                done.saturating_duration_since(from),
            );
            for ((status, body), n) in kinds {
                println!("      {n} x {status} {body:?}");
            }
        }
        let after: Vec<&&Reply> = window.iter().filter(|r| r.sent >= done).collect();
        let stale = after
            .iter()
            .filter(|r| r.status == 200 && r.body != expect)
            .count();
        Self {
            took: done.saturating_duration_since(from),
            failed: failed.len(),
            sent: window.len(),
            after: after.len(),
            stale,
        }
    }

    /// Every request sent after the end got the new version.
    fn all_new(&self) -> bool {
        self.after > 0 && self.stale == 0
    }
}

/// Flows answering `GET /version` with `version`.
fn flows(version: &str) -> Value {
    json!([
        { "id": "t1", "type": "tab", "label": "Version" },
        { "id": "in", "type": "http in", "z": "t1", "url": "/version", "method": "get", "wires": [["fn"]] },
        { "id": "fn", "type": "function", "z": "t1", "func": format!("msg.payload = '{version}'; return msg;"), "wires": [["out"]] },
        { "id": "out", "type": "http response", "z": "t1", "statusCode": "", "headers": {}, "wires": [] }
    ])
}

fn pids(s: &Value) -> Vec<Option<u64>> {
    s["replicas"]
        .as_array()
        .map(|rs| rs.iter().map(|r| r["pid"].as_u64()).collect())
        .unwrap_or_default()
}

fn whole(s: &Value, n: u64) -> bool {
    s["state"] == "running" && s["ready"].as_u64() == Some(n)
}

/// Load for 500 ms before, and 1 s after.
const WARMUP: Duration = Duration::from_millis(500);
const AFTER: Duration = Duration::from_secs(1);

/// One in-place deploy of flows answering `version`.
async fn in_place(
    t: &Tandem,
    id: &str,
    name: &str,
    n: u64,
    version: &str,
) -> Result<Outcome, Error> {
    t.wait(id, "ran whole", |s| whole(s, n)).await?;
    let load = Load::start(t.http, format!("{name}.localhost"));
    tokio::time::sleep(WARMUP).await;
    let from = Instant::now();
    let deployed = t.deploy(id, flows(version)).await;
    tokio::time::sleep(AFTER).await;
    let replies = load.finish().await?;
    let (d, done) = deployed?;
    if d["status"] != "succeeded" {
        return Err(format!("the deploy of {version} to {name} did not succeed: {d}").into());
    }
    let o = Outcome::new(&replies, from, done, version, "in place");
    let server = d["finished_at"].as_i64().unwrap_or(0) - d["started_at"].as_i64().unwrap_or(0);
    println!(
        "  {name} ({n}), in place: succeeded after {:?} (deploy record: {server} ms), {} of {} failed, {}",
        o.took,
        o.failed,
        o.sent,
        if o.all_new() {
            format!("all {} requests after the end got the new version", o.after)
        } else {
            format!("{} of {} requests after the end got another version", o.stale, o.after)
        }
    );
    Ok(o)
}

/// One restart of every replica, after new flows answering `version` were put in (untimed).
async fn restart(
    t: &Tandem,
    id: &str,
    name: &str,
    n: u64,
    version: &str,
) -> Result<Outcome, Error> {
    t.wait(id, "ran whole", |s| whole(s, n)).await?;
    let (d, _) = t.deploy(id, flows(version)).await?;
    if d["status"] != "succeeded" {
        return Err(format!("the deploy of {version} to {name} did not succeed: {d}").into());
    }
    let s = t.wait(id, "ran whole", |s| whole(s, n)).await?;
    let before: Vec<u64> = pids(&s).into_iter().flatten().collect();
    let load = Load::start(t.http, format!("{name}.localhost"));
    tokio::time::sleep(WARMUP).await;
    let from = Instant::now();
    let restarted = async {
        t.api(
            "POST",
            &format!("/api/v1/instances/{id}/actions/restart"),
            None,
        )
        .await?;
        t.wait(id, "ran whole again under new pids", |s| {
            let now = pids(s);
            whole(s, n)
                && now.len() == n as usize
                && now.iter().all(|p| p.is_some_and(|p| !before.contains(&p)))
        })
        .await?;
        Ok::<_, Error>(Instant::now())
    }
    .await;
    tokio::time::sleep(AFTER).await;
    let replies = load.finish().await?;
    let done = restarted?;
    let o = Outcome::new(&replies, from, done, version, "restart");
    println!(
        "  {name} ({n}), restart: every replica new and ready after {:?}, {} of {} failed, {} of {} requests after the end got another version",
        o.took, o.failed, o.sent, o.stale, o.after
    );
    Ok(o)
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let bin = args
        .next()
        .ok_or("usage: deploy <tandem binary> [rounds]")?;
    let rounds: usize = args
        .next()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3)
        .clamp(1, 5);
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
    let mut table = Vec::new();
    // One instance at a time, stopped after its rounds: 9 Node-RED processes at once would
    // share the 2 cores with the one measured.
    for (name, n) in [("one", 1u64), ("three", 3), ("five", 5)] {
        let mut body = json!({
            "name": name, "application_id": app["id"], "stack_id": stack, "flows": flows("v0"),
        });
        if n > 1 {
            body["ha"] = json!({ "replicas": n });
        }
        let i = t.api("POST", "/api/v1/instances", Some(body)).await?;
        let id = i["id"]
            .as_str()
            .ok_or_else(|| format!("POST /instances answered no id: {i}"))?
            .to_owned();
        t.wait(&id, "started", |s| whole(s, n)).await?;
        let (mut inplace, mut restarts) = (Vec::new(), Vec::new());
        for round in 1..=rounds {
            inplace.push(in_place(&t, &id, name, n, &format!("{name}-{round}-in-place")).await?);
            restarts.push(restart(&t, &id, name, n, &format!("{name}-{round}-restart")).await?);
        }
        t.api(
            "POST",
            &format!("/api/v1/instances/{id}/actions/stop"),
            None,
        )
        .await?;
        t.wait(&id, "stopped", |s| s["state"] == "stopped").await?;
        table.push((n, inplace, restarts));
    }
    println!();
    println!("| replicas | in place (median) | restart (median) | restart / in place | failed in place per round | failed restart per round | all new after in place | in place per round (ms) | restart per round (ms) |");
    println!("|---:|---:|---:|---:|---|---|---|---|---|");
    for (n, inplace, restarts) in &table {
        let a = median(inplace.iter().map(|o| o.took).collect());
        let b = median(restarts.iter().map(|o| o.took).collect());
        let per_round = |os: &[Outcome]| {
            os.iter()
                .map(|o| format!("{:.0}", o.took.as_secs_f64() * 1000.0))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let failed = |os: &[Outcome]| {
            os.iter()
                .map(|o| o.failed.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "| {n} | {} | {} | {:.1} | {} | {} | {} | {} | {} |",
            ms(a),
            ms(b),
            b.as_secs_f64() / a.as_secs_f64(),
            failed(inplace),
            failed(restarts),
            if inplace.iter().all(Outcome::all_new) {
                "yes"
            } else {
                "no"
            },
            per_round(inplace),
            per_round(restarts),
        );
    }
    Ok(())
}
