//! Hung replicas (SIGSTOP: the process is there, its port accepts, nothing answers) under a
//! steady stream of requests: found by the coordinator's liveness check, taken out of rotation,
//! fenced (SIGKILL of the process group) and replaced; in standby mode a ready standby takes
//! over, and the old active never serves or runs flows again, even after SIGCONT.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::ha::{ticking_flows, ticks_after, Load};
use crate::harness::{actives, alive, hello_flows, Tandem};

fn signal(pid: u64, signal: &str) {
    // The process may be gone already (fenced): SIGCONT then has nothing to reach.
    let _ = Command::new("kill")
        .args([signal, &pid.to_string()])
        .stderr(std::process::Stdio::null())
        .status();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_active_is_fenced_a_standby_takes_over_and_the_old_one_never_serves_again() {
    let t = Tandem::start("hang-standby").await;
    let (app, _) = t.team_and_app("Hang").await;
    let id = t.standby_instance(&app, "frozen", ticking_flows()).await;
    let s = t
        .wait_status(&id, 120, |s| {
            s["summary"] == "running 2/2" && actives(s).len() == 1
        })
        .await;
    let active = actives(&s)[0];
    let other = format!("frozen-r{}", 1 - active);
    let pid = s["replicas"][active as usize]["pid"].as_u64().unwrap();

    let load = Load::start(&t, "frozen");
    load.still_running("the start").await;
    signal(pid, "-STOP");
    let stopped = Instant::now();
    loop {
        if let Ok(r) = t.get("frozen", "/hello").await {
            if r.status == 200 && r.header("x-tandem-replica") == Some(other.as_str()) {
                break;
            }
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(60),
            "no takeover: {}",
            t.status(&id).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "standby takeover after SIGSTOP: first 200 from {other} {:?} after the stop",
        stopped.elapsed()
    );
    // Fenced: the stopped process was killed, so waking it does nothing.
    assert!(!alive(pid), "the hung active {pid} was not fenced");
    signal(pid, "-CONT");
    let s = t
        .wait_status(&id, 120, |s| {
            s["summary"] == "running 2/2" && s["replicas"][active as usize]["restarts"] == 1
        })
        .await;
    assert_eq!(actives(&s), vec![1 - active], "{s}");
    let last_exit = s["replicas"][active as usize]["last_exit"]
        .as_str()
        .unwrap_or_default();
    assert!(last_exit.contains("hung"), "{s}");
    load.still_running("the takeover").await;
    let seen = load.finish().await;
    println!(
        "standby SIGSTOP: {} answered, {} failed during the takeover",
        seen.ok,
        seen.failed.len()
    );
    // Answers came from the old active until it hung, then from the new one: never from a
    // standby, never from the restarted replica.
    let old = format!("frozen-r{active}");
    assert!(
        seen.by_replica.keys().all(|k| *k == old || *k == other),
        "{:?}",
        seen.by_replica
    );
    // Only the new active answers, and only it runs flows.
    for _ in 0..20 {
        let r = t.get("frozen", "/hello").await.unwrap();
        assert_eq!(r.header("x-tandem-replica"), Some(other.as_str()));
    }
    let ticks = ticks_after(&t, &id, Duration::from_millis(1500)).await;
    assert_eq!(ticks.keys().collect::<Vec<_>>(), vec![&other], "{ticks:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_balanced_replica_leaves_rotation_and_is_replaced() {
    let t = Tandem::start("hang-balanced").await;
    let (app, _) = t.team_and_app("Hang").await;
    let id = t.instance(&app, "stuck", hello_flows(), 2).await;
    let s = t.wait_running(&id, 2).await;
    let pid = s["replicas"][1]["pid"].as_u64().unwrap();

    let load = Load::start(&t, "stuck");
    load.still_running("the start").await;
    signal(pid, "-STOP");
    let stopped = Instant::now();
    // Out of rotation: r0 alone answers, while r1 is still hung or being replaced.
    let s = t
        .wait_status(&id, 60, |s| s["replicas"][1]["state"] != "running")
        .await;
    println!(
        "balanced SIGSTOP: r1 out of rotation ({}) {:?} after the stop",
        s["replicas"][1]["state"],
        stopped.elapsed()
    );
    load.still_running("r1 left the rotation").await;
    let s = t
        .wait_status(&id, 120, |s| {
            s["summary"] == "running 2/2" && s["replicas"][1]["restarts"] == 1
        })
        .await;
    assert!(!alive(pid), "the hung replica {pid} was not fenced");
    assert_ne!(s["replicas"][1]["pid"].as_u64(), Some(pid));
    signal(pid, "-CONT");
    load.still_running("r1 came back").await;
    let seen = load.finish().await;
    println!(
        "balanced SIGSTOP: {} answered, {} failed: {:?}",
        seen.ok,
        seen.failed.len(),
        seen.failed
    );
    // At most the requests in flight at the hung replica when it stopped (one per worker).
    assert!(seen.failed.len() <= Load::WORKERS, "{:?}", seen.failed);
    assert!(
        seen.by_replica.get("stuck-r1").copied().unwrap_or(0) > 0,
        "{:?}",
        seen.by_replica
    );
}
