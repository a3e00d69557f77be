//! A driver and a data plane for tests of the coordinator's decisions: the [`FakeDriver`] runs
//! nothing, records every call, and lets a test script what happens to each replica; the
//! [`FakePlane`] records every route table published. Both keep the facts that the invariants
//! are stated in: which replicas of an instance run flows (never two), which are in rotation.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, Notify};

use crate::dataplane::{DataPlane, InstanceRoutes, Pending, Serving, Verdict};
use crate::driver::{
    Driver, DriverError, Event, EventKind, Gate, InstanceDriver, Isolation, Prepared, Running,
};
use crate::logs::InstanceLog;
use crate::replica::{ExitReason, FlowState, ReplicaId};
use crate::spec::{Flows, ProcessSpec};

/// A call the coordinator made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// `prepare`.
    Prepare(String),
    /// `start` of a slot, with its run and whether the spec boots flows stopped.
    Start(ReplicaId, u64),
    /// `stop`.
    Stop(ReplicaId),
    /// `fence`.
    Fence(ReplicaId),
    /// `check`.
    Check(ReplicaId),
    /// `deploy`, with the flows' revision.
    Deploy(ReplicaId, String),
    /// `set_flows`.
    SetFlows(ReplicaId, FlowState),
    /// `remove`.
    Remove(String),
}

/// What the fake knows of one replica.
#[derive(Debug, Clone)]
struct Replica {
    run: u64,
    /// Its process is there (until stopped or fenced).
    alive: bool,
    flows: FlowState,
    spec: ProcessSpec,
    /// Found running from before (stale when `Some(true)`).
    adopted: Option<bool>,
    /// The revision of the flows it was started with or last given.
    flows_rev: String,
}

#[derive(Default)]
struct State {
    calls: Vec<Call>,
    replicas: BTreeMap<ReplicaId, Replica>,
    events: HashMap<String, mpsc::UnboundedSender<Event>>,
    /// Ready at once when started (default), or only when a test says so.
    manual_ready: bool,
    /// The next start of these replicas adopts one that runs its flows, with another spec
    /// when `stale`.
    adoptable: HashMap<ReplicaId, (FlowState, bool)>,
    /// Broken invariants, described.
    violations: Vec<String>,
    /// Replicas whose `check` fails.
    unanswering: std::collections::HashSet<ReplicaId>,
    /// How long a deploy, a flow start or stop and a check take.
    slow: Duration,
    /// Flows revisions whose deploy fails the health gate, with the reason.
    refused: HashMap<String, String>,
}

/// A driver that runs nothing. See the module docs.
#[derive(Clone, Default)]
pub struct FakeDriver {
    state: Arc<Mutex<State>>,
}

impl FakeDriver {
    /// A fake whose replicas are ready as soon as they are started.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut s = match self.state.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        f(&mut s)
    }

    /// Replicas become ready only through [`FakeDriver::ready`].
    pub fn manual_ready(&self) {
        self.with(|s| s.manual_ready = true);
    }

    /// The next start of `id` finds a replica running from before with its flows in `flows`,
    /// started for another spec when `stale`.
    pub fn adoptable(&self, id: ReplicaId, flows: FlowState, stale: bool) {
        self.with(|s| s.adoptable.insert(id, (flows, stale)));
    }

    /// `check` of `id` fails from now on (or answers again, when `answers`).
    pub fn answers(&self, id: ReplicaId, answers: bool) {
        self.with(|s| {
            if answers {
                s.unanswering.remove(&id);
            } else {
                s.unanswering.insert(id);
            }
        });
    }

    /// A deploy of flows revision `rev` fails its health gate from now on, for `reason`.
    pub fn refuse(&self, rev: &str, reason: &str) {
        self.with(|s| s.refused.insert(rev.to_owned(), reason.to_owned()));
    }

    /// The revision of the flows `id` runs.
    pub fn flows_rev(&self, id: &ReplicaId) -> Option<String> {
        self.with(|s| s.replicas.get(id).map(|r| r.flows_rev.clone()))
    }

    /// Deploys, flow starts and stops, and checks take `by` from now on.
    pub fn slow_calls(&self, by: Duration) {
        self.with(|s| s.slow = by);
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<Call> {
        self.with(|s| s.calls.clone())
    }

    /// Invariants the coordinator broke (empty when none).
    pub fn violations(&self) -> Vec<String> {
        self.with(|s| s.violations.clone())
    }

    /// The replicas of `instance` whose process is there and whose flows run.
    pub fn running_flows(&self, instance: &str) -> Vec<u32> {
        self.with(|s| {
            s.replicas
                .iter()
                .filter(|(id, r)| {
                    id.instance == instance && r.alive && r.flows == FlowState::Started
                })
                .map(|(id, _)| id.slot)
                .collect()
        })
    }

    /// The replicas of `instance` whose process is there.
    pub fn alive(&self, instance: &str) -> Vec<u32> {
        self.with(|s| {
            s.replicas
                .iter()
                .filter(|(id, r)| id.instance == instance && r.alive)
                .map(|(id, _)| id.slot)
                .collect()
        })
    }

    /// The spec `id` was last started with.
    pub fn spec(&self, id: &ReplicaId) -> Option<ProcessSpec> {
        self.with(|s| s.replicas.get(id).map(|r| r.spec.clone()))
    }

    /// Waits (on the test's clock, looking every 10 ms) until `f` holds of the calls; panics
    /// after a minute.
    pub async fn until(&self, what: &str, f: impl Fn(&[Call]) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !self.with(|s| f(&s.calls)) {
            if tokio::time::Instant::now() >= deadline {
                let calls = self.calls();
                panic!("waited a minute for {what}; calls: {calls:#?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Sends `kind` for the current run of `id`.
    pub fn send(&self, id: &ReplicaId, kind: EventKind) {
        self.with(|s| {
            let Some(r) = s.replicas.get_mut(id) else {
                panic!("{id} was never started");
            };
            if matches!(kind, EventKind::Exited { .. }) {
                r.alive = false;
            }
            let event = Event {
                slot: id.slot,
                run: r.run,
                kind,
            };
            if let Some(tx) = s.events.get(&id.instance) {
                let _ = tx.send(event);
            }
        });
    }

    /// `id` is ready (for [`FakeDriver::manual_ready`]), adopted when it was made adoptable.
    pub fn ready(&self, id: &ReplicaId) {
        let running = self.with(|s| {
            s.replicas
                .get(id)
                .map(|r| running(id, r, r.adopted.is_some(), r.adopted == Some(true)))
        });
        if let Some(running) = running {
            self.send(id, EventKind::Ready(running));
        }
    }

    /// `id`'s process ends with `code`.
    pub fn crash(&self, id: &ReplicaId, code: i32) {
        self.send(
            id,
            EventKind::Exited {
                reason: ExitReason::Code(code),
                restarting: false,
            },
        );
    }

    /// `id` stops answering (its process stays, and so do its flows, until it is fenced).
    pub fn hang(&self, id: &ReplicaId) {
        self.send(id, EventKind::Hung { silent_ms: 1000 });
    }
}

impl FakeDriver {
    /// Waits as long as [`FakeDriver::slow_calls`] says.
    async fn pause(&self) {
        let slow = self.with(|s| s.slow);
        if !slow.is_zero() {
            tokio::time::sleep(slow).await;
        }
    }
}

fn running(id: &ReplicaId, r: &Replica, adopted: bool, stale: bool) -> Running {
    Running {
        addr: SocketAddr::from(([127, 0, 0, 1], 10_000 + id.slot as u16)),
        pid: Some(100 + id.slot),
        adopted,
        flows: r.flows,
        flows_rev: Some(r.flows_rev.clone()),
        stale,
        isolation: Isolation::None,
        start: Some(crate::driver::Start::Cold { reason: None }),
    }
}

impl Driver for FakeDriver {
    type Instance = FakeInstance;

    fn open(
        &self,
        name: &str,
        _log: Arc<InstanceLog>,
        events: mpsc::UnboundedSender<Event>,
    ) -> FakeInstance {
        self.with(|s| s.events.insert(name.to_owned(), events));
        FakeInstance {
            fake: self.clone(),
            name: name.to_owned(),
        }
    }
}

/// One instance of a [`FakeDriver`].
pub struct FakeInstance {
    fake: FakeDriver,
    name: String,
}

impl FakeInstance {
    fn id(&self, slot: u32) -> ReplicaId {
        ReplicaId::new(&self.name, slot)
    }
}

impl InstanceDriver for FakeInstance {
    async fn prepare(&self, spec: &ProcessSpec) -> Result<Prepared, DriverError> {
        self.fake
            .with(|s| s.calls.push(Call::Prepare(spec.instance.clone())));
        Ok(Prepared {
            modules: spec.modules.clone(),
        })
    }

    async fn start(
        &self,
        slot: u32,
        run: u64,
        spec: &ProcessSpec,
        flows: &Flows,
    ) -> Result<(), DriverError> {
        let id = self.id(slot);
        self.fake.with(|s| {
            s.calls.push(Call::Start(id.clone(), run));
            let adopt = s.adoptable.remove(&id);
            let r = Replica {
                run,
                alive: true,
                flows: match adopt {
                    Some((flows, _)) => flows,
                    None if spec.start_stopped => FlowState::Stopped,
                    None => FlowState::Started,
                },
                spec: spec.clone(),
                adopted: adopt.map(|(_, stale)| stale),
                flows_rev: flows.rev.clone(),
            };
            let ready = match adopt {
                _ if s.manual_ready => None,
                Some((_, stale)) => Some(running(&id, &r, true, stale)),
                None => Some(running(&id, &r, false, false)),
            };
            s.replicas.insert(id.clone(), r);
            if let (Some(running), Some(tx)) = (ready, s.events.get(&self.name)) {
                let _ = tx.send(Event {
                    slot,
                    run,
                    kind: EventKind::Ready(running),
                });
            }
        });
        Ok(())
    }

    async fn stop(&self, slot: u32) -> Result<(), DriverError> {
        let id = self.id(slot);
        self.fake.with(|s| {
            s.calls.push(Call::Stop(id.clone()));
            if let Some(r) = s.replicas.get_mut(&id) {
                r.alive = false;
            }
        });
        Ok(())
    }

    async fn fence(&self, slot: u32) -> Result<(), DriverError> {
        let id = self.id(slot);
        self.fake.with(|s| {
            s.calls.push(Call::Fence(id.clone()));
            if let Some(r) = s.replicas.get_mut(&id) {
                r.alive = false;
                if let Some(tx) = s.events.get(&self.name) {
                    let _ = tx.send(Event {
                        slot,
                        run: r.run,
                        kind: EventKind::Fenced,
                    });
                }
            }
        });
        Ok(())
    }

    async fn check(&self, slot: u32) -> Result<(), DriverError> {
        let id = self.id(slot);
        self.fake.pause().await;
        self.fake.with(|s| {
            s.calls.push(Call::Check(id.clone()));
            if s.unanswering.contains(&id) {
                return Err(DriverError::Admin {
                    id,
                    reason: "no answer".into(),
                });
            }
            Ok(())
        })
    }

    async fn deploy(&self, slot: u32, flows: &Flows, _gate: &Gate) -> Result<(), DriverError> {
        let id = self.id(slot);
        self.fake.pause().await;
        self.fake.with(|s| {
            s.calls.push(Call::Deploy(id.clone(), flows.rev.clone()));
            match s.replicas.get_mut(&id) {
                Some(r) if r.alive => r.flows_rev = flows.rev.clone(),
                _ => return Err(DriverError::NotRunning(id.clone())),
            }
            match s.refused.get(&flows.rev) {
                Some(reason) => Err(DriverError::Refused {
                    id,
                    reason: reason.clone(),
                }),
                None => Ok(()),
            }
        })
    }

    async fn set_flows(&self, slot: u32, state: FlowState) -> Result<(), DriverError> {
        let id = self.id(slot);
        self.fake.pause().await;
        self.fake.with(|s| {
            s.calls.push(Call::SetFlows(id.clone(), state));
            let alive = s.replicas.get(&id).is_some_and(|r| r.alive);
            if !alive {
                return Err(DriverError::NotRunning(id));
            }
            if state == FlowState::Started {
                let others: Vec<String> = s
                    .replicas
                    .iter()
                    .filter(|(o, r)| {
                        o.instance == id.instance
                            && **o != id
                            && r.alive
                            && r.flows == FlowState::Started
                    })
                    .map(|(o, _)| o.to_string())
                    .collect();
                if !others.is_empty() {
                    s.violations.push(format!(
                        "flows of {id} started while {} still run theirs",
                        others.join(", ")
                    ));
                }
            }
            if let Some(r) = s.replicas.get_mut(&id) {
                r.flows = state;
            }
            Ok(())
        })
    }

    async fn remove(&self) -> Result<(), DriverError> {
        self.fake
            .with(|s| s.calls.push(Call::Remove(self.name.clone())));
        Ok(())
    }
}

/// A data plane that records the tables published. Requests in flight are whatever a test
/// says (none by default).
#[derive(Clone, Default)]
pub struct FakePlane {
    tables: Arc<Mutex<Vec<Vec<InstanceRoutes>>>>,
    busy: Arc<Mutex<HashMap<ReplicaId, Arc<Notify>>>>,
    verdicts: Arc<Mutex<Vec<mpsc::UnboundedSender<Verdict>>>>,
}

impl FakePlane {
    /// An empty plane.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every table published so far, oldest first.
    pub fn tables(&self) -> Vec<Vec<InstanceRoutes>> {
        self.tables.lock().map(|t| t.clone()).unwrap_or_default()
    }

    /// The slots of `instance` in rotation in the last table.
    pub fn ready(&self, instance: &str) -> Vec<u32> {
        self.tables()
            .last()
            .and_then(|t| t.iter().find(|i| i.name == instance).cloned())
            .map(|i| {
                i.replicas
                    .iter()
                    .filter(|r| r.serving == Serving::Ready)
                    .map(|r| r.id.slot)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A proxy's verdict on `id`, sent to the coordinator.
    pub fn verdict(&self, id: ReplicaId, healthy: bool, reason: &str) {
        if let Ok(to) = self.verdicts.lock() {
            for tx in to.iter() {
                let _ = tx.send(Verdict {
                    replica: id.clone(),
                    healthy,
                    reason: reason.into(),
                });
            }
        }
    }

    /// `id` has a request in flight until the returned notify is notified.
    pub fn hold(&self, id: ReplicaId) -> Arc<Notify> {
        let n = Arc::new(Notify::new());
        if let Ok(mut b) = self.busy.lock() {
            b.insert(id, n.clone());
        }
        n
    }
}

impl DataPlane for FakePlane {
    fn publish(&self, instances: &[InstanceRoutes]) {
        if let Ok(mut t) = self.tables.lock() {
            t.push(instances.to_vec());
        }
    }

    fn verdicts(&self, to: mpsc::UnboundedSender<Verdict>) {
        if let Ok(mut v) = self.verdicts.lock() {
            v.push(to);
        }
    }

    fn drained(&self, replica: &ReplicaId) -> Pending {
        let held = self.busy.lock().ok().and_then(|mut b| b.remove(replica));
        Box::pin(async move {
            if let Some(n) = held {
                n.notified().await;
            }
        })
    }
}
