//! Issue 13's control planes on one PostgreSQL database: one leads and runs the coordinator, the
//! other forwards the API to it. A SIGKILLed leader is replaced within the lease's bound and the
//! API keeps working on the survivor; a SIGSTOPped leader, woken after the other took over,
//! never acts on its stale term (checked on the coordinator's own actions, not only the lease);
//! a restarted control plane follows.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::{hello_flows, Tandem};

/// The lease's time to live in these tests.
const TTL_MS: u64 = 1500;

/// Kills every process left with its working directory under `root` (replicas outlive the
/// control plane that started them by design).
struct Reaper(PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        let Ok(root) = self.0.canonicalize() else {
            return;
        };
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return;
        };
        for p in procs.flatten() {
            let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if std::fs::read_link(p.path().join("cwd")).is_ok_and(|cwd| cwd.starts_with(&root)) {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
    }
}

/// Control planes on one fresh PostgreSQL database and platform key, each in its own
/// directory; the processes they leave are reaped with it.
struct Cluster {
    url: String,
    key: PathBuf,
    _reaper: Reaper,
    base: tempfile::TempDir,
    _pg: tandem_controlplane::scratch_pg::ScratchPostgres,
}

impl Cluster {
    async fn new(tag: &str) -> Self {
        let pg = tandem_controlplane::scratch_pg::start().await.unwrap();
        let url = pg.create_database().await.unwrap();
        let base = tempfile::Builder::new()
            .prefix(&format!("tandem-e2e-{tag}-"))
            .tempdir()
            .unwrap();
        let key = base.path().join("platform-key");
        std::fs::write(&key, format!("{}\n", "5e".repeat(32))).unwrap();
        Self {
            url,
            key,
            _reaper: Reaper(base.path().to_path_buf()),
            base,
            _pg: pg,
        }
    }

    fn dir(&self, id: &str) -> PathBuf {
        self.base.path().join(id)
    }

    /// Starts (or starts again) control plane `id`, with a lease of [`TTL_MS`]. Those after
    /// the first find the admin in the database; the harness reads its token from the data
    /// directory, copied from the first's (`a`).
    async fn start(&self, id: &str) -> Tandem {
        let dir = self.dir(id);
        std::fs::create_dir_all(&dir).unwrap();
        let token = self.dir("a").join("admin-token");
        if id != "a" && token.exists() {
            std::fs::copy(token, dir.join("admin-token")).unwrap();
        }
        let (key, ttl) = (self.key.display().to_string(), TTL_MS.to_string());
        let args = [
            "--database-url",
            &self.url,
            "--platform-key-file",
            &key,
            "--lease-ttl-ms",
            &ttl,
            "--control-plane-id",
            id,
        ];
        Tandem::start_in_with(&dir, true, &args).await
    }
}

fn signal(pid: u32, sig: &str) {
    assert!(Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success());
}

/// `GET /api/v1/cluster`, given a second: a follower forwarding to a stopped leader waits
/// longer than that for its answer.
async fn cluster(t: &Tandem) -> Option<Value> {
    let r = tokio::time::timeout(
        Duration::from_secs(1),
        t.api("GET", "/api/v1/cluster", Value::Null),
    )
    .await
    .ok()?;
    (r.status == 200).then(|| r.json())
}

/// Waits until `t` answers that `leader` leads; returns how long it took.
async fn leads(t: &Tandem, leader: &str) -> Duration {
    let start = Instant::now();
    loop {
        if let Some(c) = cluster(t).await {
            if c["self"]["id"] == leader && c["self"]["leader"] == true {
                return start.elapsed();
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{leader} never led: {:?}",
            cluster(t).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn log_len(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("tandem.log"))
        .map(|s| s.len())
        .unwrap_or(0)
}

fn log_since(dir: &Path, from: usize) -> String {
    let text = std::fs::read_to_string(dir.join("tandem.log")).unwrap_or_default();
    text.get(from..).unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_control_planes_on_one_database_have_one_leader_which_a_stopped_one_never_undercuts() {
    let control_planes = Cluster::new("leader").await;
    let a_dir = control_planes.dir("a");
    let a = control_planes.start("a").await;
    leads(&a, "a").await;
    let mut b = control_planes.start("b").await;

    // One leader, and the follower forwards: its answers are the leader's.
    let c = cluster(&b).await.unwrap();
    assert_eq!(c["self"]["id"], "a", "{c}");
    let planes = c["control_planes"].as_array().unwrap();
    assert_eq!(planes.len(), 2, "{c}");
    assert_eq!(
        planes.iter().filter(|p| p["leader"] == true).count(),
        1,
        "{c}"
    );
    // The metrics say the same.
    assert!(a
        .metrics()
        .await
        .contains("\ntandem_control_plane_leader 1\n"));
    assert!(b
        .metrics()
        .await
        .contains("\ntandem_control_plane_leader 0\n"));
    // API writes through the follower.
    let (app, _) = b.team_and_app("Leaders").await;
    let id = b.instance(&app, "led", hello_flows(), 1).await;
    let s = b.wait_running(&id, 1).await;
    let a_pid = s["replicas"][0]["pid"].as_u64().unwrap();
    // Served by both control planes' proxies: the follower's follows the leader's routes.
    let r = a.get("led", "/hello").await.unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = b.get("led", "/hello").await.unwrap();
        if r.status == 200 && r.body == "hello" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the follower's proxy answers {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The leader stops (SIGSTOP): the other takes over within the lease's bound, and runs the
    // instance itself. Meanwhile the stopped leader's replica dies: woken, the old leader would
    // restart it on its stale term.
    let a_serve = a.pid().unwrap();
    signal(a_serve, "-STOP");
    let took = leads(&b, "b").await;
    assert!(
        took < Duration::from_millis(TTL_MS * 4),
        "the takeover took {took:?}"
    );
    let s = b
        .wait_status(&id, 120, |s| {
            s["ready"] == 1 && s["replicas"][0]["pid"] != a_pid
        })
        .await;
    assert_ne!(s["replicas"][0]["pid"], a_pid, "b runs its own replica");
    signal(u32::try_from(a_pid).unwrap(), "-KILL");
    let woken = log_len(&a_dir);
    signal(a_serve, "-CONT");
    tokio::time::sleep(Duration::from_millis(TTL_MS * 3)).await;
    let after = log_since(&a_dir, woken);
    assert!(
        !after.contains("coordinator action"),
        "the old leader acted on its stale term:\n{after}"
    );
    assert!(after.contains("no longer leading"), "{after}");
    let c = cluster(&a).await.unwrap();
    assert_eq!(c["self"]["id"], "b", "a forwards to b: {c}");

    // The leader is SIGKILLed: the survivor leads and the API keeps working on it.
    b.kill();
    let took = leads(&a, "a").await;
    assert!(
        took < Duration::from_millis(TTL_MS * 4),
        "the takeover took {took:?}"
    );
    let other = a.instance(&app, "after", hello_flows(), 1).await;
    a.wait_running(&other, 1).await;
    a.wait_running(&id, 1).await;

    // Started again, the old leader follows.
    let b = control_planes.start("b").await;
    let c = cluster(&b).await.unwrap();
    assert_eq!(c["self"]["id"], "a", "{c}");
    drop(b);
    drop(a);
}

/// Sleep counts every control plane's traffic: an instance used only through the follower's
/// proxy stays awake under the leader's sleeper, and sleeps once that use stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_used_only_through_the_follower_stays_awake_until_that_use_stops() {
    let planes = Cluster::new("sleep-cluster").await;
    let a = planes.start("a").await;
    leads(&a, "a").await;
    let b = planes.start("b").await;
    let (app, _) = a.team_and_app("Naps").await;
    let id = a.instance(&app, "napper", hello_flows(), 1).await;
    a.wait_running(&id, 1).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while b
        .get("napper", "/hello")
        .await
        .map_or(true, |r| r.status != 200)
    {
        assert!(
            Instant::now() < deadline,
            "the follower's proxy never served it"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let path = format!("/api/v1/instances/{id}");
    let r = a.api("PUT", &path, json!({ "sleep_after_s": 2 })).await;
    assert_eq!(r.status, 200, "{}", r.body);

    // Four times its idle time, used through the follower only: every request answered, and
    // never asleep.
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        let r = b.get("napper", "/hello").await.unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "hello"), "{r:?}");
        let view = a.api("GET", &path, Value::Null).await.json();
        assert!(
            view["asleep_since"].is_null(),
            "put to sleep while in use: {view}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The use stops: it sleeps.
    a.wait_status(&id, 20, |s| s["state"] == "sleeping").await;
}
