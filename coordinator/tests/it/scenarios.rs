//! The coordinator's decisions on the fake driver, on paused time: every call it makes is
//! recorded, and the replicas' lives are scripted.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tandem_coordinator::driver::{EventKind, Running};
use tandem_coordinator::fake::{Call, FakeDriver, FakePlane};
use tandem_coordinator::logs::LogBook;
use tandem_coordinator::replica::{ExitReason, FlowState, ReplicaId, ReplicaPhase};
use tandem_coordinator::restart::RestartPolicy;
use tandem_coordinator::spec::{DesiredState, Flows, InstanceDesired, ProcessSpec};
use tandem_coordinator::status::{Coordination, InstanceState};
use tandem_coordinator::{Coordinator, CoordinatorConfig};

fn desired(name: &str, replicas: u32, standby: bool) -> InstanceDesired {
    InstanceDesired {
        id: format!("id-{name}"),
        hosts: vec![format!("{name}.example.com")],
        state: DesiredState::Running,
        replicas,
        standby,
        affinity: false,
        http_auth: Default::default(),
        certificate: None,
        asleep: false,
        process: ProcessSpec {
            instance: name.into(),
            nodered_version: "4.1.2".into(),
            node_version: None,
            memory_mb: 256,
            ha: replicas > 1,
            start_stopped: false,
            admin_secret: "secret".into(),
            credential_secret: "creds".into(),
            settings: serde_json::json!({}),
            env: BTreeMap::new(),
            storage: None,
            modules: BTreeMap::new(),
        },
        flows: Flows::new(serde_json::json!([])),
        mqtt_urls: BTreeMap::new(),
        probe: None,
    }
}

struct World {
    fake: FakeDriver,
    plane: FakePlane,
    coordinator: Arc<Coordinator<FakeDriver>>,
}

fn world() -> World {
    let fake = FakeDriver::new();
    let plane = FakePlane::new();
    let coordinator = Coordinator::new(
        Arc::new(fake.clone()),
        Arc::new(plane.clone()),
        Arc::new(LogBook::default()),
        CoordinatorConfig {
            policy: RestartPolicy {
                base: Duration::from_secs(1),
                max: Duration::from_secs(8),
                stable_after: Duration::from_secs(60),
                max_quick_crashes: 3,
            },
            ..CoordinatorConfig::default()
        },
    );
    World {
        fake,
        plane,
        coordinator,
    }
}

fn r(name: &str, slot: u32) -> ReplicaId {
    ReplicaId::new(name, slot)
}

fn count(calls: &[Call], f: impl Fn(&Call) -> bool) -> usize {
    calls.iter().filter(|c| f(c)).count()
}

fn starts(calls: &[Call], id: &ReplicaId) -> usize {
    count(calls, |c| matches!(c, Call::Start(i, _) if i == id))
}

/// Lets the coordinator act on what it has been told.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(5)).await;
}

impl World {
    async fn status_is(&self, id: &str, state: InstanceState) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while self.coordinator.status(id).state != state {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{id} never became {state:?}: {:#?}",
                self.coordinator.status(id)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn replicas_are_replaced_one_at_a_time_each_successor_ready_before_the_next_goes() {
    let w = world();
    w.fake.manual_ready();
    let mut d = desired("roll", 3, false);
    w.coordinator.apply(vec![d.clone()]);
    w.fake
        .until("3 starts", |c| {
            count(c, |c| matches!(c, Call::Start(..))) == 3
        })
        .await;
    for slot in 0..3 {
        w.fake.ready(&r("roll", slot));
    }
    w.status_is("id-roll", InstanceState::Running).await;

    d.process.settings = serde_json::json!({"flowFilePretty": true});
    w.coordinator.apply(vec![d.clone()]);
    for slot in 0..3 {
        let id = r("roll", slot);
        w.fake
            .until("the replacement's start", |c| starts(c, &id) == 2)
            .await;
        // Its successor is not ready: nothing else goes, however long it takes.
        tokio::time::sleep(Duration::from_secs(300)).await;
        let calls = w.fake.calls();
        let stops = count(&calls, |c| matches!(c, Call::Stop(_)));
        assert_eq!(stops, slot as usize + 1, "{calls:#?}");
        assert_eq!(
            w.plane.ready("roll").len(),
            2,
            "the other two serve while r{slot} is replaced"
        );
        w.fake.ready(&id);
        settle().await;
    }
    w.status_is("id-roll", InstanceState::Running).await;
    for slot in 0..3 {
        let spec = w.fake.spec(&r("roll", slot));
        assert_eq!(spec.map(|s| s.settings), Some(d.process.settings.clone()));
    }
    // Every table during the rollout kept at least two replicas in rotation.
    let tables = w.plane.tables();
    let from = tables
        .iter()
        .position(|t| t.iter().any(|i| i.replicas.len() == 3))
        .unwrap_or(0);
    for t in &tables[from..] {
        let ready = t[0]
            .replicas
            .iter()
            .filter(|r| r.serving == tandem_coordinator::dataplane::Serving::Ready)
            .count();
        assert!(ready >= 2, "a table with {ready} in rotation: {t:#?}");
    }
}

#[tokio::test(start_paused = true)]
async fn scaling_touches_only_the_difference() {
    let w = world();
    let mut d = desired("scale", 3, false);
    w.coordinator.apply(vec![d.clone()]);
    w.status_is("id-scale", InstanceState::Running).await;
    d.replicas = 5;
    w.coordinator.apply(vec![d.clone()]);
    w.fake
        .until("five starts", |c| {
            count(c, |c| matches!(c, Call::Start(..))) == 5
        })
        .await;
    w.status_is("id-scale", InstanceState::Running).await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    let calls = w.fake.calls();
    assert_eq!(count(&calls, |c| matches!(c, Call::Start(..))), 5);
    assert_eq!(
        count(&calls, |c| matches!(c, Call::Stop(_))),
        0,
        "{calls:#?}"
    );

    d.replicas = 2;
    w.coordinator.apply(vec![d.clone()]);
    w.fake
        .until("three stops", |c| {
            count(c, |c| matches!(c, Call::Stop(_))) == 3
        })
        .await;
    w.status_is("id-scale", InstanceState::Running).await;
    let calls = w.fake.calls();
    let stopped: Vec<u32> = calls
        .iter()
        .filter_map(|c| match c {
            Call::Stop(id) => Some(id.slot),
            _ => None,
        })
        .collect();
    assert_eq!(stopped.len(), 3);
    assert!(stopped.iter().all(|s| *s >= 2), "{stopped:?}");
    assert_eq!(count(&calls, |c| matches!(c, Call::Start(..))), 5);
    assert_eq!(w.fake.alive("scale"), [0, 1]);
    assert_eq!(w.coordinator.status("id-scale").replicas.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_hung_active_is_fenced_before_a_standby_runs_flows_and_never_serves_again() {
    let w = world();
    w.coordinator.apply(vec![desired("sb", 2, true)]);
    w.fake
        .until("an active", |c| {
            c.contains(&Call::SetFlows(r("sb", 0), FlowState::Started))
        })
        .await;
    w.status_is("id-sb", InstanceState::Running).await;
    assert_eq!(w.plane.ready("sb"), [0]);
    assert_eq!(w.fake.running_flows("sb"), [0]);

    w.fake.hang(&r("sb", 0));
    settle().await;
    // Out of rotation at once.
    assert!(!w.plane.ready("sb").contains(&0));
    w.fake
        .until("r1 active", |c| {
            c.contains(&Call::SetFlows(r("sb", 1), FlowState::Started))
        })
        .await;
    let calls = w.fake.calls();
    let fence = calls.iter().position(|c| *c == Call::Fence(r("sb", 0)));
    let promote = calls
        .iter()
        .position(|c| *c == Call::SetFlows(r("sb", 1), FlowState::Started));
    assert!(fence.is_some() && fence < promote, "{calls:#?}");
    assert_eq!(w.fake.violations(), Vec::<String>::new());
    assert_eq!(w.plane.ready("sb"), [1]);

    // The old active "wakes up" (SIGCONT): whatever its old run reports is ignored.
    let old = Running {
        addr: "127.0.0.1:10000".parse().unwrap_or_else(|_| unreachable!()),
        pid: Some(100),
        adopted: false,
        flows: FlowState::Started,
        flows_rev: None,
        stale: false,
        isolation: tandem_coordinator::driver::Isolation::None,
        start: None,
    };
    w.fake.send(&r("sb", 0), EventKind::Ready(old));
    settle().await;
    // It restarts as a standby after its backoff; r1 stays the one active.
    w.fake
        .until("r0 restarted", |c| starts(c, &r("sb", 0)) == 2)
        .await;
    w.status_is("id-sb", InstanceState::Running).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(w.fake.running_flows("sb"), [1]);
    assert_eq!(w.plane.ready("sb"), [1]);
    let status = w.coordinator.status("id-sb");
    assert!(status.replicas[0]
        .last_exit
        .as_deref()
        .unwrap_or("")
        .contains("hung"));
    assert_eq!(w.fake.violations(), Vec::<String>::new());
}

#[tokio::test(start_paused = true)]
async fn never_two_actives_whatever_happens_to_the_replicas() {
    for seed in 0..20u64 {
        let w = world();
        let mut rng = fastrand::Rng::with_seed(seed);
        w.coordinator.apply(vec![desired("rnd", 3, true)]);
        w.status_is("id-rnd", InstanceState::Running).await;
        for _ in 0..40 {
            let id = r("rnd", rng.u32(0..3));
            let alive = w.fake.alive("rnd").contains(&id.slot);
            if alive {
                match rng.u8(0..3) {
                    0 => w.fake.hang(&id),
                    1 => w.fake.crash(&id, 1),
                    _ => w.fake.send(
                        &id,
                        EventKind::Exited {
                            reason: ExitReason::Signal(9),
                            restarting: false,
                        },
                    ),
                }
            }
            tokio::time::sleep(Duration::from_millis(rng.u64(0..3000))).await;
            assert!(
                w.fake.running_flows("rnd").len() <= 1,
                "seed {seed}: {:?} run flows",
                w.fake.running_flows("rnd")
            );
            assert!(w.plane.ready("rnd").len() <= 1, "seed {seed}");
        }
        assert_eq!(w.fake.violations(), Vec::<String>::new(), "seed {seed}");
        // Left alone, it converges to one active again.
        w.coordinator.retry("id-rnd");
        w.status_is("id-rnd", InstanceState::Running).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(w.fake.running_flows("rnd").len(), 1, "seed {seed}");
        assert_eq!(w.plane.ready("rnd").len(), 1, "seed {seed}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_replica_that_keeps_crashing_is_held_then_tried_again_on_request() {
    let w = world();
    w.coordinator.apply(vec![desired("loop", 1, false)]);
    let id = r("loop", 0);
    for n in 1..=3 {
        w.fake.until("a start", |c| starts(c, &id) == n).await;
        settle().await;
        w.fake.crash(&id, 1);
    }
    w.status_is("id-loop", InstanceState::Crashed).await;
    let status = w.coordinator.status("id-loop");
    assert_eq!(status.replicas[0].state, ReplicaPhase::Crashed);
    assert!(
        status.reason.as_deref().unwrap_or("").contains("3 times"),
        "{status:#?}"
    );
    // Held: no more starts, however long.
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(starts(&w.fake.calls(), &id), 3);
    // The backoff doubled between the starts: 1 s, then 2 s (checked by the restart module);
    // here, a retry starts it again at once.
    w.coordinator.retry("id-loop");
    w.fake
        .until("a fourth start", |c| starts(c, &id) == 4)
        .await;
    w.status_is("id-loop", InstanceState::Running).await;
}

#[tokio::test(start_paused = true)]
async fn adopted_replicas_keep_one_active_and_stale_ones_are_replaced() {
    let w = world();
    // Tandem restarted: both replicas run flows (a split brain left from before), r0 with an
    // older spec.
    w.fake.adoptable(r("ad", 0), FlowState::Started, true);
    w.fake.adoptable(r("ad", 1), FlowState::Started, false);
    w.coordinator.apply(vec![desired("ad", 2, true)]);
    w.fake
        .until("r0 replaced", |c| starts(c, &r("ad", 0)) == 2)
        .await;
    w.status_is("id-ad", InstanceState::Running).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let calls = w.fake.calls();
    // The first found running its flows stayed active until it was replaced; the other one
    // was told to stop its flows, and took over only once r0 was gone.
    assert!(
        calls.contains(&Call::SetFlows(r("ad", 1), FlowState::Stopped)),
        "{calls:#?}"
    );
    assert!(
        calls.contains(&Call::SetFlows(r("ad", 1), FlowState::Started)),
        "{calls:#?}"
    );
    assert_eq!(w.fake.running_flows("ad"), [1]);
    assert_eq!(w.plane.ready("ad"), [1]);
    assert_eq!(starts(&calls, &r("ad", 1)), 1, "the current one is kept");
    assert_eq!(w.fake.violations(), Vec::<String>::new());
}

#[tokio::test(start_paused = true)]
async fn deleting_an_instance_during_a_rollout_stops_everything_and_removes_it() {
    let w = world();
    w.fake.manual_ready();
    let mut d = desired("del", 2, false);
    w.coordinator.apply(vec![d.clone()]);
    w.fake
        .until("2 starts", |c| {
            count(c, |c| matches!(c, Call::Start(..))) == 2
        })
        .await;
    w.fake.ready(&r("del", 0));
    w.fake.ready(&r("del", 1));
    w.status_is("id-del", InstanceState::Running).await;
    d.process.memory_mb = 512;
    w.coordinator.apply(vec![d]);
    w.fake
        .until("r0 replaced", |c| starts(c, &r("del", 0)) == 2)
        .await;
    w.coordinator.apply(vec![]);
    w.fake
        .until("removed", |c| c.contains(&Call::Remove("del".into())))
        .await;
    assert_eq!(w.fake.alive("del"), Vec::<u32>::new());
    assert_eq!(w.coordinator.status("id-del").state, InstanceState::Unknown);
    assert!(w.plane.tables().last().is_some_and(Vec::is_empty));
}

#[tokio::test(start_paused = true)]
async fn a_hung_balanced_replica_leaves_rotation_at_once_and_is_fenced_and_restarted() {
    let w = world();
    w.coordinator.apply(vec![desired("bal", 2, false)]);
    w.status_is("id-bal", InstanceState::Running).await;
    assert_eq!(w.plane.ready("bal"), [0, 1]);
    w.fake.hang(&r("bal", 1));
    settle().await;
    assert_eq!(w.plane.ready("bal"), [0]);
    w.fake
        .until("fenced", |c| c.contains(&Call::Fence(r("bal", 1))))
        .await;
    w.fake
        .until("restarted", |c| starts(c, &r("bal", 1)) == 2)
        .await;
    w.status_is("id-bal", InstanceState::Running).await;
    assert_eq!(w.plane.ready("bal"), [0, 1]);
    assert_eq!(w.coordinator.status("id-bal").replicas[1].restarts, 1);
}

#[tokio::test(start_paused = true)]
async fn new_flows_are_deployed_one_replica_at_a_time_without_a_restart() {
    let w = world();
    let mut d = desired("dep", 2, false);
    w.coordinator.apply(vec![d.clone()]);
    w.status_is("id-dep", InstanceState::Running).await;
    d.flows = Flows::new(serde_json::json!([{"id": "n1", "type": "tab"}]));
    let rev = d.flows.rev.clone();
    w.coordinator.apply(vec![d]);
    w.fake
        .until("two deploys", |c| {
            count(c, |c| matches!(c, Call::Deploy(_, v) if *v == rev)) == 2
        })
        .await;
    let calls = w.fake.calls();
    assert_eq!(count(&calls, |c| matches!(c, Call::Stop(_))), 0);
    assert_eq!(count(&calls, |c| matches!(c, Call::Start(..))), 2);
}

#[tokio::test(start_paused = true)]
async fn a_replica_its_platform_restarts_is_not_started_a_second_time() {
    let w = world();
    w.coordinator.apply(vec![desired("kube", 1, false)]);
    w.status_is("id-kube", InstanceState::Running).await;
    let id = r("kube", 0);
    w.fake.send(
        &id,
        EventKind::Exited {
            reason: ExitReason::Code(137),
            restarting: true,
        },
    );
    w.status_is("id-kube", InstanceState::Starting).await;
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(starts(&w.fake.calls(), &id), 1);
    w.fake.ready(&id);
    w.status_is("id-kube", InstanceState::Running).await;
    assert_eq!(w.coordinator.status("id-kube").replicas[0].restarts, 1);
}

#[tokio::test(start_paused = true)]
async fn a_stopped_instance_drains_before_it_stops() {
    let w = world();
    let mut d = desired("drain", 1, false);
    w.coordinator.apply(vec![d.clone()]);
    w.status_is("id-drain", InstanceState::Running).await;
    let held = w.plane.hold(r("drain", 0));
    d.state = DesiredState::Stopped;
    w.coordinator.apply(vec![d]);
    tokio::time::sleep(Duration::from_secs(5)).await;
    // Out of rotation, but not stopped while a request is in flight.
    assert_eq!(w.plane.ready("drain"), Vec::<u32>::new());
    assert!(!w.fake.calls().contains(&Call::Stop(r("drain", 0))));
    held.notify_one();
    w.fake
        .until("stopped", |c| c.contains(&Call::Stop(r("drain", 0))))
        .await;
    w.status_is("id-drain", InstanceState::Stopped).await;
}

#[tokio::test(start_paused = true)]
async fn a_replica_the_proxy_gives_up_on_is_checked_at_once_and_fenced_only_when_it_is_silent() {
    let w = world();
    w.coordinator.apply(vec![desired("hint", 2, false)]);
    w.status_is("id-hint", InstanceState::Running).await;
    let id = r("hint", 1);

    // The proxy's probe of a flow's route fails, but the replica answers: kept.
    w.plane
        .verdict(id.clone(), false, "health probe answered 500");
    w.fake
        .until("a check", |c| c.contains(&Call::Check(id.clone())))
        .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!w.fake.calls().contains(&Call::Fence(id.clone())));
    assert_eq!(w.coordinator.status("id-hint").replicas[1].restarts, 0);

    // It stops answering; the proxy notices before the driver's next liveness check does.
    w.fake.answers(id.clone(), false);
    w.plane
        .verdict(id.clone(), false, "connect failed: timed out");
    w.fake
        .until("fenced", |c| c.contains(&Call::Fence(id.clone())))
        .await;
    let calls = w.fake.calls();
    assert_eq!(
        count(&calls, |c| *c == Call::Check(id.clone())),
        2,
        "{calls:#?}"
    );
    w.fake.answers(id.clone(), true);
    w.fake.until("restarted", |c| starts(c, &id) == 2).await;
    w.status_is("id-hint", InstanceState::Running).await;
    let status = w.coordinator.status("id-hint");
    assert_eq!(status.replicas[1].restarts, 1);
    // Verdicts for replicas of other instances reach nobody here.
    w.plane.verdict(r("other", 0), false, "x");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(w.coordinator.status("id-hint").replicas[1].restarts, 1);
}

#[tokio::test(start_paused = true)]
async fn after_a_restart_of_tandem_no_standby_is_promoted_before_every_replica_has_reported() {
    let w = world();
    w.fake.manual_ready();
    // From before: r1 is the active (its flows run), r0 a standby. r0 answers first.
    w.fake.adoptable(r("slow", 0), FlowState::Stopped, false);
    w.fake.adoptable(r("slow", 1), FlowState::Started, false);
    w.coordinator.apply(vec![desired("slow", 2, true)]);
    w.fake
        .until("both adopted", |c| {
            count(c, |c| matches!(c, Call::Start(..))) == 2
        })
        .await;
    w.fake.ready(&r("slow", 0));
    tokio::time::sleep(Duration::from_secs(3)).await;
    // r1 has not reported: it may be running its flows, so r0's are not started.
    assert!(
        !w.fake
            .calls()
            .iter()
            .any(|c| matches!(c, Call::SetFlows(_, FlowState::Started))),
        "{:#?}",
        w.fake.calls()
    );
    w.fake.ready(&r("slow", 1));
    w.status_is("id-slow", InstanceState::Running).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(w.fake.running_flows("slow"), [1]);
    assert_eq!(w.plane.ready("slow"), [1]);
    assert_eq!(w.fake.violations(), Vec::<String>::new());
}

#[tokio::test(start_paused = true)]
async fn a_hung_replica_is_fenced_at_once_even_with_a_call_to_it_in_flight() {
    let w = world();
    let mut d = desired("busy", 2, true);
    w.coordinator.apply(vec![d.clone()]);
    w.fake
        .until("an active", |c| {
            c.contains(&Call::SetFlows(r("busy", 0), FlowState::Started))
        })
        .await;
    w.status_is("id-busy", InstanceState::Running).await;
    // Calls now take 30 s (a replica that will never answer them): a deploy starts on the
    // standby r1, then on r0 once it is switched.
    w.fake.slow_calls(Duration::from_secs(30));
    d.flows = Flows::new(serde_json::json!([{"id": "n2", "type": "tab"}]));
    w.coordinator.apply(vec![d]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let hung_at = tokio::time::Instant::now();
    w.fake.hang(&r("busy", 0));
    w.fake
        .until("r0 fenced", |c| c.contains(&Call::Fence(r("busy", 0))))
        .await;
    assert!(
        hung_at.elapsed() < Duration::from_secs(1),
        "the fence waited {:?} for the deploy",
        hung_at.elapsed()
    );
    w.fake.slow_calls(Duration::ZERO);
    // A replica takes over: r0 restarted, or r1 once its deploy is done, whichever is ready
    // first; never both.
    let fenced = w.fake.calls().len();
    w.fake
        .until("a new active", |c| {
            c[fenced..]
                .iter()
                .any(|c| matches!(c, Call::SetFlows(_, FlowState::Started)))
        })
        .await;
    assert_eq!(w.fake.violations(), Vec::<String>::new());
}

/// The tables published so far, each as the slots of `instance` in rotation.
fn rotations(plane: &FakePlane, instance: &str) -> Vec<Vec<u32>> {
    plane
        .tables()
        .iter()
        .filter_map(|t| t.iter().find(|i| i.name == instance))
        .map(|i| {
            i.replicas
                .iter()
                .filter(|r| r.serving == tandem_coordinator::dataplane::Serving::Ready)
                .map(|r| r.id.slot)
                .collect()
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_deploy_takes_one_replica_out_of_rotation_at_a_time_after_its_requests_finish() {
    let w = world();
    let mut d = desired("roll3", 3, false);
    w.coordinator.apply(vec![d.clone()]);
    w.status_is("id-roll3", InstanceState::Running).await;
    let before = w.plane.tables().len();
    // A request in flight on r0.
    let held = w.plane.hold(r("roll3", 0));
    d.flows = Flows::new(serde_json::json!([{"id": "n1", "type": "tab"}]));
    let rev = d.flows.rev.clone();
    w.coordinator.apply(vec![d]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(w.plane.ready("roll3"), [1, 2]);
    assert_eq!(
        w.coordinator.status("id-roll3").replicas[0].state,
        ReplicaPhase::Deploying
    );
    let deploys = |c: &[Call]| count(c, |c| matches!(c, Call::Deploy(_, v) if *v == rev));
    assert_eq!(
        deploys(&w.fake.calls()),
        0,
        "not before its request finished"
    );
    held.notify_one();
    w.fake.until("three deploys", |c| deploys(c) == 3).await;
    w.status_is("id-roll3", InstanceState::Running).await;
    settle().await;
    // Never fewer than two in rotation, and all three back at the end, on the new flows.
    let seen = rotations(&w.plane, "roll3");
    assert!(seen[before..].iter().all(|t| t.len() >= 2), "{seen:?}");
    assert_eq!(w.plane.ready("roll3"), [0, 1, 2]);
    let status = w.coordinator.status("id-roll3");
    assert!(status
        .replicas
        .iter()
        .all(|r| r.flows_rev.as_deref() == Some(rev.as_str())));
    assert_eq!(count(&w.fake.calls(), |c| matches!(c, Call::Stop(_))), 0);
}

#[tokio::test(start_paused = true)]
async fn flows_refused_by_the_gate_reach_no_other_replica_and_the_old_ones_come_back() {
    let w = world();
    let mut d = desired("gate", 3, false);
    let old = d.flows.clone();
    w.coordinator.apply(vec![d.clone()]);
    w.status_is("id-gate", InstanceState::Running).await;
    d.flows = Flows::new(serde_json::json!([{"id": "n1", "type": "foo-bar"}]));
    let bad = d.flows.rev.clone();
    w.fake.refuse(&bad, "unknown node type: foo-bar");
    w.coordinator.apply(vec![d.clone()]);
    w.fake
        .until("a deploy of the bad flows", |c| {
            c.iter()
                .any(|c| matches!(c, Call::Deploy(_, v) if *v == bad))
        })
        .await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    let calls = w.fake.calls();
    assert_eq!(
        count(&calls, |c| matches!(c, Call::Deploy(_, v) if *v == bad)),
        1
    );
    let status = w.coordinator.status("id-gate");
    let refused = status.deploy_refused.clone().expect("refused");
    assert_eq!(refused.rev, bad);
    assert_eq!(refused.reason, "unknown node type: foo-bar");
    let failed: Vec<_> = status
        .replicas
        .iter()
        .filter(|r| r.deploy_error.is_some())
        .collect();
    assert_eq!(failed.len(), 1);
    let slot = failed[0].slot;
    // It runs the bad flows, so it serves nothing until it has others.
    assert_eq!(failed[0].state, ReplicaPhase::Deploying);
    assert!(!w.plane.ready("gate").contains(&slot));
    assert_eq!(w.plane.ready("gate").len(), 2);

    // The control plane rolls back: the old flows again.
    d.flows = old.clone();
    w.coordinator.apply(vec![d]);
    w.fake
        .until("the old flows back on the changed replica", |c| {
            c.iter()
                .any(|c| matches!(c, Call::Deploy(i, v) if *v == old.rev && i.slot == slot))
        })
        .await;
    w.status_is("id-gate", InstanceState::Running).await;
    settle().await;
    assert_eq!(w.plane.ready("gate"), [0, 1, 2]);
    let calls = w.fake.calls();
    assert_eq!(
        count(&calls, |c| matches!(c, Call::Deploy(..))),
        2,
        "{calls:#?}"
    );
    for slot in 0..3 {
        assert_eq!(w.fake.flows_rev(&r("gate", slot)), Some(old.rev.clone()));
    }
}

#[tokio::test(start_paused = true)]
async fn in_standby_mode_standbys_get_new_flows_first_then_the_active_is_switched() {
    let w = world();
    let mut d = desired("sw", 3, true);
    w.coordinator.apply(vec![d.clone()]);
    w.status_is("id-sw", InstanceState::Running).await;
    w.fake
        .until("an active", |c| {
            c.iter()
                .any(|c| matches!(c, Call::SetFlows(_, FlowState::Started)))
        })
        .await;
    settle().await;
    let active = w.fake.running_flows("sw");
    assert_eq!(active.len(), 1);
    let active = active[0];
    d.flows = Flows::new(serde_json::json!([{"id": "n1", "type": "tab"}]));
    let rev = d.flows.rev.clone();
    w.coordinator.apply(vec![d]);
    w.fake
        .until("every replica on the new flows", |c| {
            count(c, |c| matches!(c, Call::Deploy(_, v) if *v == rev)) == 3
        })
        .await;
    settle().await;
    let calls = w.fake.calls();
    let deploy_at = |slot: u32| {
        calls
            .iter()
            .position(|c| matches!(c, Call::Deploy(i, v) if *v == rev && i.slot == slot))
            .unwrap()
    };
    let stopped_at = calls
        .iter()
        .position(|c| *c == Call::SetFlows(r("sw", active), FlowState::Stopped))
        .expect("the old active's flows stopped");
    for slot in (0..3).filter(|s| *s != active) {
        assert!(deploy_at(slot) < stopped_at, "standbys first: {calls:#?}");
    }
    assert!(stopped_at < deploy_at(active), "{calls:#?}");
    // A standby with the new flows took over; never two actives.
    let now = w.fake.running_flows("sw");
    assert_eq!(now.len(), 1);
    assert_ne!(now[0], active);
    assert!(w.fake.violations().is_empty(), "{:?}", w.fake.violations());
}

#[tokio::test(start_paused = true)]
async fn flows_a_replica_saved_itself_are_not_deployed_back_nor_undone() {
    let w = world();
    let mut d = desired("ed", 1, false);
    w.coordinator.apply(vec![d.clone()]);
    w.status_is("id-ed", InstanceState::Running).await;
    // The editor deployed new flows: the replica saved them through the storage API, and the
    // control plane's apply of them comes a moment later.
    let saved = Flows::new(serde_json::json!([{"id": "e1", "type": "tab"}]));
    w.coordinator.flows_saved("id-ed", 0, &saved.rev);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        count(&w.fake.calls(), |c| matches!(c, Call::Deploy(..))),
        0,
        "the older desired flows undid the editor's deploy"
    );
    d.flows = saved.clone();
    w.coordinator.apply(vec![d.clone()]);
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(count(&w.fake.calls(), |c| matches!(c, Call::Deploy(..))), 0);
    assert_eq!(
        w.coordinator.status("id-ed").replicas[0].flows_rev,
        Some(saved.rev)
    );
}

/// A leader whose lease lapsed (its fence answers false) does not act: a crashed replica is
/// not restarted until the fence opens again; an abandoned coordinator never restarts it.
#[tokio::test(start_paused = true)]
async fn a_coordinator_whose_fence_is_closed_holds_its_actions_and_an_abandoned_one_never_acts() {
    let w = world();
    let open = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let fence_open = open.clone();
    w.coordinator.set_fence(Arc::new(move || {
        fence_open.load(std::sync::atomic::Ordering::SeqCst)
    }));
    w.coordinator.apply(vec![desired("lease", 1, false)]);
    w.status_is("id-lease", InstanceState::Running).await;
    let id = r("lease", 0);
    assert_eq!(starts(&w.fake.calls(), &id), 1);

    open.store(false, std::sync::atomic::Ordering::SeqCst);
    w.fake.crash(&id, 1);
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(
        starts(&w.fake.calls(), &id),
        1,
        "acted with its fence closed"
    );

    open.store(true, std::sync::atomic::Ordering::SeqCst);
    w.fake
        .until("the restart once the fence opens", |c| starts(c, &id) == 2)
        .await;
    w.status_is("id-lease", InstanceState::Running).await;

    w.coordinator.abandon();
    settle().await;
    w.fake.crash(&id, 1);
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(
        starts(&w.fake.calls(), &id),
        2,
        "an abandoned coordinator acted"
    );
}
