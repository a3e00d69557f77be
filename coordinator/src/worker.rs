//! One instance's worker: the only task that acts on the instance's replicas, so its actions
//! never race each other.
//!
//! It is level-triggered. After every input (a new desired state, a replica event from the
//! driver, a driver call that finished, a timer) it compares what it wants with what it sees and
//! starts the calls that close the gap, at most one call per slot at a time:
//! - a slot not wanted (scale down, instance stopped or deleted) is drained, then stopped;
//! - a wanted slot with no replica is started once the runtime is prepared; one that ended is
//!   started again after the restart backoff, unless it is held as crashed;
//! - a hung replica is out of rotation at once and fenced, then handled like one that ended;
//! - a replica whose process spec is outdated is replaced (drained, stopped, started), one at a
//!   time: the next goes only once its predecessor's successor is ready, and, with several
//!   replicas, only while another one serves;
//! - a ready replica whose flows are outdated gets them deployed, one replica at a time: out of
//!   rotation while another replica serves (its requests in flight finish first), then the
//!   deploy and its health gate, then back in rotation. Standbys come first; then the active is
//!   switched to a standby that runs the new flows. A revision that fails the gate goes to no
//!   further replica, and the replica that failed stays out of rotation, until the flows
//!   change: the control plane rolls the deploy back;
//! - in standby mode, exactly one replica runs its flows (the active). Flows are started on a
//!   ready standby only once no other replica may still run them: a hung active is fenced first.
//!   Never two actives.
//!
//! Before the calls start, the new view is published, so a replica is out of rotation before
//! anything drains, stops or fences it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::coordinator::CoordinatorConfig;
use crate::dataplane::Verdict;
use crate::driver::{DriverError, Event, EventKind, Gate, InstanceDriver, Prepared, Running};
use crate::logs::{now_ms, InstanceLog};
use crate::observed::{InstanceView, Observed, Phase, ReplicaView};
use crate::replica::{ExitReason, FlowState, ReplicaId, ReplicaPhase};
use crate::restart::{Decision, RestartState};
use crate::spec::{DesiredState, Flows, InstanceDesired, ProcessSpec};

/// What the control plane wants of the instance, with the counters its actions bump.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Want {
    pub desired: InstanceDesired,
    /// Bumped by a restart: every replica is replaced.
    pub restart: u64,
    /// Bumped by a start: replicas held as crashed are tried again.
    pub retry: u64,
}

/// What reaches a worker besides its desired state and its driver's events.
#[derive(Debug)]
pub(crate) enum Input {
    /// The data plane's verdict on one of its replicas.
    Verdict(Verdict),
    /// A replica saved flows of this revision through the storage API: it runs them.
    FlowsSaved { slot: u32, rev: String },
    /// A replica's editor installed or removed a module, and the store lists this set: the
    /// replica runs it without a restart.
    ModulesSaved {
        slot: u32,
        modules: BTreeMap<String, String>,
    },
}

/// The runtime (stack) the replicas need: prepared once per Node-RED and Node.js version.
type RuntimeKey = (String, Option<String>, BTreeMap<String, String>);

#[derive(Debug, Clone, PartialEq)]
enum Runtime {
    None,
    Preparing {
        key: RuntimeKey,
        since: Instant,
    },
    Ready(RuntimeKey),
    Failed {
        key: RuntimeKey,
        reason: String,
        retry: u64,
    },
}

/// Why a replica is being drained, stopped or fenced on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leaving {
    /// Its slot is no longer wanted.
    Remove,
    /// It is replaced by a replica of the current spec.
    Replace,
}

#[derive(Debug)]
struct Slot {
    phase: ReplicaPhase,
    since: i64,
    /// The current run (see [`crate::driver::Event::run`]).
    run: u64,
    /// The spec it was started with.
    spec: Option<ProcessSpec>,
    /// The restart counter it was started under.
    generation: u64,
    running: Option<Running>,
    /// It may run its flows: from the moment they are asked to start until they are known
    /// stopped or its process is gone.
    flows_on: bool,
    flows_rev: Option<String>,
    /// Deploying out of rotation: it stays out until a deploy to it passes its gate.
    out: bool,
    /// Why the last deploy to it failed, until one succeeds.
    deploy_error: Option<String>,
    /// Flows it saved itself (its editor), and when: until the desired state has them (the
    /// control plane writes them to the store, then applies), they are not undone by a deploy
    /// of the older desired flows.
    saved: Option<(String, Instant)>,
    /// The module set its editor's palette left it running, and when: until the desired state
    /// lists the same set, it is not replaced for it (as with `saved`).
    modules_saved: Option<(BTreeMap<String, String>, Instant)>,
    /// A driver call on this slot is in flight.
    busy: bool,
    /// That call, when it may be abandoned for a fence (a flow start or stop, a deploy, a
    /// check, a drain): a hung replica is fenced at once, not after the call's timeout.
    abortable: Option<tokio::task::AbortHandle>,
    /// Its first start in this worker has not reported yet: adopted from before, it may be
    /// running its flows, so no standby is promoted meanwhile.
    unknown: bool,
    leaving: Option<Leaving>,
    /// Replaced and not yet ready: the rollout waits for it.
    replacing: bool,
    /// Time without an answer, once hung.
    silent_ms: u64,
    restart: RestartState,
    restarts: u64,
    last_exit: Option<String>,
    /// When a `Restarting` replica is started again.
    restart_at: Option<Instant>,
    /// The retry counter when it was held as crashed.
    retry_seen: u64,
    /// No fence, deploy or flow call before this (the last one failed).
    hold_until: Option<Instant>,
}

impl Slot {
    fn new() -> Self {
        Self {
            phase: ReplicaPhase::Starting,
            since: now_ms(),
            run: 0,
            spec: None,
            generation: 0,
            running: None,
            flows_on: false,
            flows_rev: None,
            out: false,
            deploy_error: None,
            saved: None,
            modules_saved: None,
            busy: false,
            abortable: None,
            unknown: true,
            leaving: None,
            replacing: false,
            silent_ms: 0,
            restart: RestartState::default(),
            restarts: 0,
            last_exit: None,
            restart_at: None,
            retry_seen: 0,
            hold_until: None,
        }
    }

    fn set_phase(&mut self, phase: ReplicaPhase) {
        if self.phase != phase {
            self.phase = phase;
            self.since = now_ms();
        }
    }

    /// Its process is gone: nothing of it serves or runs.
    fn gone(&mut self) {
        self.running = None;
        self.flows_on = false;
    }

    fn held(&self, now: Instant) -> bool {
        self.hold_until.is_some_and(|t| now < t)
    }
}

/// A driver call to make.
enum Op {
    Prepare(ProcessSpec),
    Start {
        slot: u32,
        run: u64,
        spec: ProcessSpec,
        flows: Flows,
    },
    Drain(u32),
    Stop(u32),
    Fence(u32),
    SetFlows(u32, FlowState),
    /// Standby mode: the active leaves the rotation, its requests finish, its flows stop; a
    /// standby with newer flows takes over.
    Retire(u32),
    Deploy {
        slot: u32,
        flows: Flows,
        /// Wait for its requests in flight first: it was taken out of rotation.
        drain: bool,
        gate: Gate,
    },
    /// A proxy gave up on the replica, for this reason.
    Check(u32, String),
}

impl Op {
    /// Its name, for the log.
    fn kind(&self) -> &'static str {
        match self {
            Op::Prepare(_) => "prepare",
            Op::Start { .. } => "start",
            Op::Drain(_) => "drain",
            Op::Stop(_) => "stop",
            Op::Fence(_) => "fence",
            Op::SetFlows(..) => "set-flows",
            Op::Retire(_) => "retire",
            Op::Deploy { .. } => "deploy",
            Op::Check(..) => "check",
        }
    }
}

/// A driver call that finished.
enum Done {
    Prepare(RuntimeKey, Result<Prepared, DriverError>),
    Start(u32, u64, Result<(), DriverError>),
    Drain(u32),
    Stop(u32, Result<(), DriverError>),
    Fence(u32, u64, Result<(), DriverError>),
    SetFlows(u32, u64, FlowState, Result<(), DriverError>),
    Deploy(u32, u64, String, Result<(), DriverError>),
    Check(u32, u64, String, Result<(), DriverError>),
}

/// The worker of one instance.
pub(crate) struct Worker<I: InstanceDriver> {
    id: String,
    name: String,
    driver: Arc<I>,
    log: Arc<InstanceLog>,
    observed: Arc<Observed>,
    config: CoordinatorConfig,
    want: Want,
    /// The instance left the desired state (deleted, or Tandem stops everything).
    gone: bool,
    slots: BTreeMap<u32, Slot>,
    /// Standby mode: the replica whose flows run and that takes traffic.
    active: Option<u32>,
    /// The flows revision a deploy's health gate refused, and why.
    refused: Option<(String, String)>,
    /// The module versions the runtime was last prepared with.
    modules: BTreeMap<String, String>,
    runtime: Runtime,
    next_run: u64,
    ops: JoinSet<Done>,
    pending: Vec<Op>,
    /// Whether it may act; `None`: always.
    fence: Option<crate::Fence>,
}

impl<I: InstanceDriver> Worker<I> {
    pub(crate) fn new(
        id: String,
        driver: Arc<I>,
        log: Arc<InstanceLog>,
        observed: Arc<Observed>,
        config: CoordinatorConfig,
        want: Want,
        fence: Option<crate::Fence>,
    ) -> Self {
        Self {
            fence,
            name: want.desired.process.instance.clone(),
            id,
            driver,
            log,
            observed,
            config,
            want,
            gone: false,
            slots: BTreeMap::new(),
            active: None,
            refused: None,
            modules: BTreeMap::new(),
            runtime: Runtime::None,
            next_run: 1,
            ops: JoinSet::new(),
            pending: Vec::new(),
        }
    }

    /// Converges until the desired state's sender is gone and every replica is stopped.
    pub(crate) async fn run(
        mut self,
        mut want: watch::Receiver<Want>,
        mut events: mpsc::UnboundedReceiver<Event>,
        mut inputs: mpsc::UnboundedReceiver<Input>,
    ) {
        loop {
            self.step();
            if self.gone && self.slots.is_empty() {
                // Only a stack install can still be in flight; nobody waits for it.
                self.ops.abort_all();
                return;
            }
            let wake = self.next_wake();
            tokio::select! {
                biased;
                Some(event) = events.recv() => self.on_event(event),
                Some(input) = inputs.recv() => match input {
                    Input::Verdict(verdict) => self.on_verdict(verdict),
                    Input::FlowsSaved { slot, rev } => self.on_flows_saved(slot, rev),
                    Input::ModulesSaved { slot, modules } => self.on_modules_saved(slot, modules),
                },
                Some(done) = self.ops.join_next(), if !self.ops.is_empty() => match done {
                    Ok(done) => self.on_done(done),
                    // Abandoned for a fence.
                    Err(e) if e.is_cancelled() => {}
                    Err(e) => tracing::error!(instance = %self.name, error = %e, "a driver call failed to finish"),
                },
                changed = want.changed(), if !self.gone => match changed {
                    Ok(()) => self.want = want.borrow_and_update().clone(),
                    Err(_) => self.gone = true,
                },
                _ = tokio::time::sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {}
            }
        }
    }

    fn id_of(&self, slot: u32) -> ReplicaId {
        ReplicaId::new(&self.name, slot)
    }

    /// The earliest timer: a restart due, a held call, the `installing` threshold.
    fn next_wake(&self) -> Option<Instant> {
        let slots = self
            .slots
            .values()
            .flat_map(|s| {
                [
                    s.restart_at,
                    s.hold_until,
                    s.saved.as_ref().map(|(_, at)| *at + SAVED_GRACE),
                    s.modules_saved.as_ref().map(|(_, at)| *at + SAVED_GRACE),
                ]
            })
            .flatten();
        let installing = match &self.runtime {
            Runtime::Preparing { since, .. } => Some(*since + INSTALLING_AFTER),
            _ => None,
        };
        // Calls held while the coordinator may not act are tried again soon.
        let held = (!self.pending.is_empty()).then(|| Instant::now() + FENCED_RETRY);
        slots
            .chain(installing)
            .chain(held)
            .filter(|t| *t > Instant::now())
            .min()
    }

    /// Compares what is wanted with what is seen, publishes the view, starts the calls.
    fn step(&mut self) {
        let now = Instant::now();
        let d = self.want.desired.clone();
        let target: BTreeSet<u32> = if self.gone {
            BTreeSet::new()
        } else {
            d.slots()
        };

        self.fence_hung(now);
        self.leave_unwanted(&target);
        self.adopt_saved_modules(&d, now);
        let prepared = !target.is_empty() && self.prepare(&d, now);
        if prepared {
            self.start_missing(&d, &target, now);
            self.roll_out(&d, &target);
        }
        // Before deploys: a standby taking over must not wait behind a deploy to it.
        if d.standby && !self.gone && d.state == DesiredState::Running {
            self.keep_one_active(&d, now);
        }
        for s in self.slots.values_mut() {
            if s.saved
                .as_ref()
                .is_some_and(|(r, at)| *r == d.flows.rev || now >= *at + SAVED_GRACE)
            {
                s.saved = None;
            }
        }
        // A refusal holds for the flows refused; other flows (a rollback, a new deploy) go out.
        if self
            .refused
            .as_ref()
            .is_some_and(|(r, _)| *r != d.flows.rev)
        {
            self.refused = None;
        }
        if prepared {
            self.deploy_flows(&d, now);
        }
        self.publish(&d, now);
        // A coordinator that may not act (its leadership lapsed) keeps its calls until it may
        // again, or until it is abandoned: it never acts on a stale term.
        if !self.pending.is_empty() && !self.may_act() {
            return;
        }
        for op in std::mem::take(&mut self.pending) {
            if self.fence.is_some() {
                tracing::info!(instance = %self.name, op = op.kind(), "coordinator action");
            }
            self.spawn(op);
        }
    }

    /// Whether the coordinator may act now (see [`crate::Fence`]).
    fn may_act(&self) -> bool {
        self.fence.as_ref().is_none_or(|f| f())
    }

    /// Fences every hung replica, whatever else waits (a stack install, a call on it that
    /// will only time out), and stops again any whose stop failed.
    fn fence_hung(&mut self, now: Instant) {
        for (slot, s) in &mut self.slots {
            if s.phase == ReplicaPhase::Hung {
                if let Some(call) = s.abortable.take() {
                    call.abort();
                    s.busy = false;
                }
            }
            if s.busy || s.held(now) {
                continue;
            }
            match s.phase {
                ReplicaPhase::Hung => {
                    s.busy = true;
                    self.pending.push(Op::Fence(*slot));
                }
                ReplicaPhase::Stopping => {
                    s.busy = true;
                    self.pending.push(Op::Stop(*slot));
                }
                _ => {}
            }
        }
    }

    /// Slots above the wanted count, or of an instance that should not run: drained and stopped
    /// (a hung one fenced), all at once.
    fn leave_unwanted(&mut self, target: &BTreeSet<u32>) {
        let mut noted = false;
        let mut drop_slots = Vec::new();
        for (slot, s) in &mut self.slots {
            if target.contains(slot) || s.busy {
                continue;
            }
            if !noted
                && matches!(
                    s.phase,
                    ReplicaPhase::Running | ReplicaPhase::Deploying | ReplicaPhase::Starting
                )
            {
                let what = if target.is_empty() {
                    "stopping every replica".to_owned()
                } else {
                    format!("scaling down to {} replicas", target.len())
                };
                self.log.note("info", what);
                noted = true;
            }
            s.leaving = Some(Leaving::Remove);
            match s.phase {
                ReplicaPhase::Running | ReplicaPhase::Deploying => {
                    s.set_phase(ReplicaPhase::Draining);
                    s.busy = true;
                    self.pending.push(Op::Drain(*slot));
                }
                ReplicaPhase::Starting | ReplicaPhase::Draining | ReplicaPhase::Stopping => {
                    s.set_phase(ReplicaPhase::Stopping);
                    s.busy = true;
                    self.pending.push(Op::Stop(*slot));
                }
                // Fenced by `fence_hung`, then removed.
                ReplicaPhase::Hung => {}
                ReplicaPhase::Restarting | ReplicaPhase::Crashed => drop_slots.push(*slot),
            }
        }
        for slot in drop_slots {
            self.slots.remove(&slot);
        }
    }

    /// Whether the runtime the spec needs is ready; starts preparing it when it is not.
    fn prepare(&mut self, d: &InstanceDesired, now: Instant) -> bool {
        let key = runtime_key(&d.process);
        match &self.runtime {
            Runtime::Ready(k) if *k == key => return true,
            Runtime::Preparing { .. } => return false,
            Runtime::Failed { key: k, retry, .. } if *k == key && *retry == self.want.retry => {
                return false
            }
            _ => {}
        }
        self.runtime = Runtime::Preparing { key, since: now };
        self.pending.push(Op::Prepare(d.process.clone()));
        false
    }

    /// Starts wanted slots that have no replica, restarts ended ones whose backoff is over,
    /// tries crashed ones again when asked (or when their spec changed), fences hung ones.
    fn start_missing(&mut self, d: &InstanceDesired, target: &BTreeSet<u32>, now: Instant) {
        for slot in target {
            let spec = d.process_for(*slot);
            let s = self.slots.entry(*slot).or_insert_with(|| {
                let mut s = Slot::new();
                s.restart_at = Some(now);
                s.set_phase(ReplicaPhase::Restarting);
                s
            });
            if s.busy {
                continue;
            }
            // A hung one is fenced by `fence_hung`.
            if s.leaving.is_some() || s.phase == ReplicaPhase::Hung {
                continue;
            }
            let start = match s.phase {
                ReplicaPhase::Restarting => s.restart_at.is_none_or(|t| t <= now),
                ReplicaPhase::Crashed => {
                    // Tried again on `start` (retry), `restart`, or a new spec.
                    let again = s.retry_seen != self.want.retry
                        || s.generation != self.want.restart
                        || s.spec.as_ref() != Some(&spec);
                    if again {
                        s.restart = RestartState::default();
                    }
                    again
                }
                // A replica still starting with a spec that changed since: it serves nothing
                // yet, so it is replaced without waiting for it.
                ReplicaPhase::Starting if s.spec.as_ref() != Some(&spec) && s.run != 0 => {
                    s.leaving = Some(Leaving::Replace);
                    s.set_phase(ReplicaPhase::Stopping);
                    s.busy = true;
                    self.pending.push(Op::Stop(*slot));
                    false
                }
                _ => false,
            };
            if start {
                let run = self.next_run;
                self.next_run += 1;
                begin_start(s, run, spec.clone(), self.want.restart, now);
                self.pending.push(Op::Start {
                    slot: *slot,
                    run,
                    spec,
                    flows: d.flows.clone(),
                });
            }
        }
    }

    /// Replaces one outdated ready replica at a time: its spec changed, a restart was asked
    /// for, or it was adopted with another spec.
    fn roll_out(&mut self, d: &InstanceDesired, target: &BTreeSet<u32>) {
        if self.slots.values().any(|s| s.replacing) {
            return;
        }
        // A replica a refused deploy left out of rotation is replaced too; one whose editor
        // changed its modules waits for the desired state to list them.
        let outdated = |slot: u32, s: &Slot| {
            matches!(s.phase, ReplicaPhase::Running | ReplicaPhase::Deploying)
                && !s.busy
                && s.leaving.is_none()
                && s.modules_saved.is_none()
                && (s.spec.as_ref() != Some(&d.process_for(slot))
                    || s.generation != self.want.restart
                    || s.running.as_ref().is_some_and(|r| r.stale))
        };
        // Standbys first, the active last: its flows move once.
        let mut candidates: Vec<u32> = self
            .slots
            .iter()
            .filter(|(slot, s)| target.contains(slot) && outdated(**slot, s))
            .map(|(slot, _)| *slot)
            .collect();
        candidates.sort_by_key(|slot| (Some(*slot) == self.active, *slot));
        let Some(slot) = candidates.first().copied() else {
            return;
        };
        // With several replicas, one goes down only while another serves (or while none can).
        let others: Vec<&Slot> = target
            .iter()
            .filter(|s| **s != slot)
            .filter_map(|s| self.slots.get(s))
            .collect();
        let serving = others.iter().any(|s| s.phase == ReplicaPhase::Running);
        let coming = others
            .iter()
            .any(|s| matches!(s.phase, ReplicaPhase::Starting | ReplicaPhase::Restarting));
        if !others.is_empty() && !serving && coming {
            return;
        }
        let id = self.id_of(slot);
        let Some(s) = self.slots.get_mut(&slot) else {
            return;
        };
        self.log
            .note("info", format!("replacing replica {id} (new spec)"));
        s.leaving = Some(Leaving::Replace);
        s.replacing = true;
        s.set_phase(ReplicaPhase::Draining);
        s.busy = true;
        self.pending.push(Op::Drain(slot));
    }

    /// Deploys the wanted flows to one ready replica that runs others: standbys first; in
    /// standby mode the active last, by switching to a standby that has them.
    fn deploy_flows(&mut self, d: &InstanceDesired, now: Instant) {
        // In standby mode, a takeover comes first: no deploy may hold up the standby about to
        // become active.
        let takeover = d.standby
            && (self.active.is_none()
                || self.slots.values().any(|s| s.phase == ReplicaPhase::Hung));
        let rev = d.flows.rev.as_str();
        if takeover
            || self.refused.as_ref().is_some_and(|(r, _)| r == rev)
            || self
                .pending
                .iter()
                .any(|op| matches!(op, Op::Deploy { .. }))
            || self.slots.values().any(|s| {
                s.busy && matches!(s.phase, ReplicaPhase::Running | ReplicaPhase::Deploying)
            })
        {
            return;
        }
        let current = |slot: u32, s: &Slot| s.spec.as_ref() == Some(&d.process_for(slot));
        // Flows a replica saved itself wait for the desired state to catch up with them.
        let saving = |s: &Slot| {
            s.saved
                .as_ref()
                .is_some_and(|(r, at)| s.flows_rev.as_ref() == Some(r) && now < *at + SAVED_GRACE)
        };
        let outdated: Vec<u32> = self
            .slots
            .iter()
            .filter(|(slot, s)| {
                matches!(s.phase, ReplicaPhase::Running | ReplicaPhase::Deploying)
                    && !s.busy
                    && !s.held(now)
                    && s.leaving.is_none()
                    && current(**slot, s)
                    && !saving(s)
                    && (s.flows_rev.as_deref() != Some(rev) || s.phase == ReplicaPhase::Deploying)
            })
            .map(|(slot, _)| *slot)
            .collect();
        // The replica a failed deploy left out of rotation first, then standbys, the active last.
        let Some(slot) = outdated.iter().copied().min_by_key(|slot| {
            let out = self.slots.get(slot).is_some_and(|s| s.out);
            (Some(*slot) == self.active, !out, *slot)
        }) else {
            return;
        };
        if d.standby && Some(slot) == self.active {
            // Switch: stop the active's flows, and `keep_one_active` promotes a standby that
            // runs the new ones; the old active then gets them as a standby. With no such
            // standby (one replica), the active gets them in place.
            let ready = self.slots.iter().any(|(o, s)| {
                *o != slot
                    && s.phase == ReplicaPhase::Running
                    && !s.busy
                    && s.flows_rev.as_deref() == Some(rev)
            });
            if ready {
                if let Some(s) = self.slots.get_mut(&slot) {
                    self.log.note(
                        "info",
                        format!(
                            "switching the active replica from {} to a standby with flows {rev}",
                            ReplicaId::new(&self.name, slot)
                        ),
                    );
                    // Out of rotation first, and its requests in flight answered: flows that
                    // stop under a request never answer it.
                    s.busy = true;
                    s.out = true;
                    s.set_phase(ReplicaPhase::Deploying);
                    self.pending.push(Op::Retire(slot));
                }
                return;
            }
        }
        // Out of rotation, its requests in flight answered first (flows that stop under a
        // request never answer it): the others serve meanwhile, and when it is the only one the
        // proxy holds new requests until it is back.
        let serving = if d.standby {
            self.active == Some(slot)
        } else {
            self.slots.get(&slot).is_some_and(|s| s.flows_on)
        };
        let Some(s) = self.slots.get_mut(&slot) else {
            return;
        };
        let drain = serving && !s.out;
        s.out = s.out || serving;
        s.busy = true;
        s.set_phase(ReplicaPhase::Deploying);
        let gate = Gate {
            flows_on: s.flows_on,
            probe: d.probe.clone(),
        };
        self.pending.push(Op::Deploy {
            slot,
            flows: d.flows.clone(),
            drain,
            gate,
        });
    }

    /// Standby mode: stops the flows of any ready replica that runs them besides the active;
    /// with no active, starts the flows of the lowest ready replica, once none other may run
    /// them.
    fn keep_one_active(&mut self, d: &InstanceDesired, now: Instant) {
        if let Some(a) = self.active {
            if !self.slots.get(&a).is_some_and(|s| s.flows_on) {
                self.active = None;
            }
        }
        let active = self.active;
        for (slot, s) in &mut self.slots {
            if s.flows_on
                && Some(*slot) != active
                && s.phase == ReplicaPhase::Running
                && !s.busy
                && !s.held(now)
            {
                s.busy = true;
                self.pending.push(Op::SetFlows(*slot, FlowState::Stopped));
            }
        }
        // Never promote while another replica may run its flows: one whose flows were asked to
        // start, one hung until its fence holds, one adopted from before that has not reported.
        if self.active.is_some() || self.slots.values().any(|s| s.flows_on || s.unknown) {
            return;
        }
        let candidate = self
            .slots
            .iter()
            .filter(|(_, s)| {
                s.phase == ReplicaPhase::Running && !s.busy && !s.held(now) && s.leaving.is_none()
            })
            .min_by_key(|(slot, s)| {
                (
                    s.spec.as_ref() != Some(&d.process_for(**slot)),
                    s.flows_rev.as_deref() != Some(d.flows.rev.as_str()),
                    **slot,
                )
            })
            .map(|(slot, _)| *slot);
        if let Some(slot) = candidate {
            if let Some(s) = self.slots.get_mut(&slot) {
                // From now on it may run flows: no other replica is promoted meanwhile.
                s.flows_on = true;
                s.busy = true;
            }
            self.pending.push(Op::SetFlows(slot, FlowState::Started));
        }
    }

    fn publish(&self, d: &InstanceDesired, now: Instant) {
        let phase = match &self.runtime {
            Runtime::Failed { reason, .. } if d.state == DesiredState::Running => {
                Phase::Failed(reason.clone())
            }
            Runtime::Preparing { since, .. } if now >= *since + INSTALLING_AFTER => {
                Phase::Installing
            }
            _ => Phase::Ready,
        };
        let view = InstanceView {
            name: self.name.clone(),
            secret: d.process.admin_secret.clone(),
            // Kept while a deleted instance's replicas drain: its host must still reach them.
            hosts: d.hosts.clone(),
            ha: d.process.ha,
            standby: d.standby,
            affinity: d.affinity,
            http_auth: d.http_auth,
            certificate: d.certificate.clone(),
            asleep: d.asleep && d.state == DesiredState::Running,
            desired: d.state,
            want: if d.state == DesiredState::Running && !d.asleep && !self.gone {
                d.replicas
            } else {
                0
            },
            phase,
            replicas: self
                .slots
                .iter()
                .map(|(slot, s)| {
                    (
                        *slot,
                        ReplicaView {
                            phase: s.phase,
                            addr: s.running.as_ref().map(|r| r.addr),
                            pid: s.running.as_ref().and_then(|r| r.pid),
                            restarts: s.restarts,
                            last_exit: s.last_exit.clone(),
                            since: s.since,
                            isolation: s.running.as_ref().map(|r| r.isolation),
                            start: s.running.as_ref().and_then(|r| r.start.clone()),
                            flows: s.flows_on,
                            flows_rev: s.flows_rev.clone(),
                            out: s.out,
                            deploy_error: s.deploy_error.clone(),
                            current: s.spec.as_ref() == Some(&d.process_for(*slot))
                                && s.generation == self.want.restart
                                && !s.running.as_ref().is_some_and(|r| r.stale),
                        },
                    )
                })
                .collect(),
            active: self.active,
            refused: self.refused.clone(),
            modules: self.modules.clone(),
        };
        self.observed.set(&self.id, view);
    }

    fn spawn(&mut self, op: Op) {
        let driver = self.driver.clone();
        match op {
            Op::Prepare(spec) => {
                let key = runtime_key(&spec);
                self.ops
                    .spawn(async move { Done::Prepare(key, driver.prepare(&spec).await) });
            }
            Op::Start {
                slot,
                run,
                spec,
                flows,
            } => {
                self.ops.spawn(async move {
                    Done::Start(slot, run, driver.start(slot, run, &spec, &flows).await)
                });
            }
            Op::Drain(slot) => {
                let drained = self.observed.plane().drained(&self.id_of(slot));
                let timeout = self.config.drain_timeout;
                let call = self.ops.spawn(async move {
                    let _ = tokio::time::timeout(timeout, drained).await;
                    Done::Drain(slot)
                });
                self.abortable(slot, call);
            }
            Op::Stop(slot) => {
                self.ops
                    .spawn(async move { Done::Stop(slot, driver.stop(slot).await) });
            }
            Op::Fence(slot) => {
                let run = self.slots.get(&slot).map_or(0, |s| s.run);
                self.ops
                    .spawn(async move { Done::Fence(slot, run, driver.fence(slot).await) });
            }
            Op::Retire(slot) => {
                let run = self.slots.get(&slot).map_or(0, |s| s.run);
                let drained = self.observed.plane().drained(&self.id_of(slot));
                let timeout = self.config.drain_timeout;
                let call = self.ops.spawn(async move {
                    let _ = tokio::time::timeout(timeout, drained).await;
                    let state = FlowState::Stopped;
                    Done::SetFlows(slot, run, state, driver.set_flows(slot, state).await)
                });
                self.abortable(slot, call);
            }
            Op::SetFlows(slot, state) => {
                let run = self.slots.get(&slot).map_or(0, |s| s.run);
                let call = self.ops.spawn(async move {
                    Done::SetFlows(slot, run, state, driver.set_flows(slot, state).await)
                });
                self.abortable(slot, call);
            }
            Op::Check(slot, reason) => {
                let run = self.slots.get(&slot).map_or(0, |s| s.run);
                let call = self
                    .ops
                    .spawn(async move { Done::Check(slot, run, reason, driver.check(slot).await) });
                self.abortable(slot, call);
            }
            Op::Deploy {
                slot,
                flows,
                drain,
                gate,
            } => {
                let run = self.slots.get(&slot).map_or(0, |s| s.run);
                let drained = drain.then(|| self.observed.plane().drained(&self.id_of(slot)));
                let timeout = self.config.drain_timeout;
                let call = self.ops.spawn(async move {
                    if let Some(drained) = drained {
                        let _ = tokio::time::timeout(timeout, drained).await;
                    }
                    let result = driver.deploy(slot, &flows, &gate).await;
                    Done::Deploy(slot, run, flows.rev.clone(), result)
                });
                self.abortable(slot, call);
            }
        }
    }

    fn abortable(&mut self, slot: u32, call: tokio::task::AbortHandle) {
        if let Some(s) = self.slots.get_mut(&slot) {
            s.abortable = Some(call);
        }
    }

    fn on_event(&mut self, event: Event) {
        let id = self.id_of(event.slot);
        let standby = self.want.desired.standby;
        let Some(s) = self.slots.get_mut(&event.slot) else {
            return;
        };
        if s.run != event.run {
            // A late event of a process that is gone.
            return;
        }
        if matches!(event.kind, EventKind::Ready(_) | EventKind::Exited { .. }) {
            s.unknown = false;
        }
        match event.kind {
            EventKind::Ready(running) => {
                if s.phase != ReplicaPhase::Starting {
                    // A hung replica that answers again is fenced all the same; a draining one
                    // stops.
                    return;
                }
                s.flows_on = running.flows == FlowState::Started;
                s.flows_rev = running.flows_rev.clone();
                if running.adopted {
                    // Its spec is the current one unless the driver says it is stale.
                    if !running.stale {
                        s.spec = Some(self.want.desired.process_for(event.slot));
                    }
                    s.generation = self.want.restart;
                }
                s.running = Some(running);
                s.replacing = false;
                s.set_phase(ReplicaPhase::Running);
                if standby && s.flows_on && self.active.is_none() {
                    // Adopted with its flows running: it stays the active.
                    self.active = Some(event.slot);
                }
            }
            EventKind::Hung { silent_ms } => {
                if matches!(
                    s.phase,
                    ReplicaPhase::Running | ReplicaPhase::Draining | ReplicaPhase::Deploying
                ) {
                    tracing::warn!(replica = %id, silent_ms, "replica hung; fencing it");
                    self.log.note(
                        "warn",
                        format!("replica {id} stopped answering for {silent_ms} ms; out of rotation, fencing it"),
                    );
                    s.silent_ms = silent_ms;
                    s.set_phase(ReplicaPhase::Hung);
                }
            }
            EventKind::Exited { reason, restarting } => match s.phase {
                ReplicaPhase::Draining | ReplicaPhase::Stopping => s.gone(),
                _ if restarting => {
                    // The platform starts it again itself.
                    s.gone();
                    s.restarts += 1;
                    s.last_exit = Some(reason.to_string());
                    s.set_phase(ReplicaPhase::Starting);
                    self.log.note(
                        "warn",
                        format!("replica {id} ended ({reason}); its platform restarts it"),
                    );
                }
                ReplicaPhase::Starting
                | ReplicaPhase::Running
                | ReplicaPhase::Deploying
                | ReplicaPhase::Hung => {
                    self.ended(event.slot, reason);
                }
                ReplicaPhase::Restarting | ReplicaPhase::Crashed => {}
            },
            EventKind::Fenced => {
                if s.phase == ReplicaPhase::Hung && s.leaving.is_none() {
                    let silent_ms = s.silent_ms;
                    self.ended(event.slot, ExitReason::Hung { silent_ms });
                }
            }
        }
        if self
            .active
            .is_some_and(|a| !self.slots.get(&a).is_some_and(|s| s.flows_on))
        {
            self.active = None;
        }
    }

    /// A proxy took a replica out of its rotation: check it at once rather than at the driver's
    /// next liveness check. The proxy's own probe of a flow's route can fail while the replica
    /// is fine (a flow answering 500), so the verdict alone fences nothing.
    fn on_verdict(&mut self, verdict: Verdict) {
        if verdict.healthy || verdict.replica.instance != self.name {
            return;
        }
        let slot = verdict.replica.slot;
        let Some(s) = self.slots.get_mut(&slot) else {
            return;
        };
        if s.phase == ReplicaPhase::Running && !s.busy {
            s.busy = true;
            self.pending.push(Op::Check(slot, verdict.reason));
        }
    }

    /// A replica's editor deployed flows, and they are in the store: it runs them, so the
    /// coordinator does not deploy them to it again.
    fn on_flows_saved(&mut self, slot: u32, rev: String) {
        if let Some(s) = self.slots.get_mut(&slot) {
            if s.running.is_some() && !s.busy {
                s.flows_rev = Some(rev.clone());
                s.saved = Some((rev, Instant::now()));
            }
        }
    }

    /// A replica's editor installed or removed a module, and the store has the new set: the
    /// replica runs it once the desired state lists it ([`Self::adopt_saved_modules`]).
    fn on_modules_saved(&mut self, slot: u32, modules: BTreeMap<String, String>) {
        if let Some(s) = self.slots.get_mut(&slot) {
            if s.running.is_some() && s.spec.is_some() {
                s.modules_saved = Some((modules, Instant::now()));
            }
        }
    }

    /// A replica whose editor changed its modules runs the desired set once the desired state
    /// lists what it reported: its spec takes that set, so it is current and not replaced. Past
    /// the grace, the desired state wins and it is replaced as any other.
    fn adopt_saved_modules(&mut self, d: &InstanceDesired, now: Instant) {
        for (slot, s) in &mut self.slots {
            let Some((modules, at)) = s.modules_saved.take() else {
                continue;
            };
            if s.running.is_none() {
                continue;
            }
            if d.process_for(*slot).modules == modules {
                if let Some(spec) = s.spec.as_mut() {
                    spec.modules = modules;
                }
            } else if now < at + SAVED_GRACE {
                s.modules_saved = Some((modules, at));
            }
        }
    }

    /// The replica in `slot` ended on its own (or was fenced): restart it after the backoff, or
    /// hold it as crashed.
    fn ended(&mut self, slot: u32, reason: ExitReason) {
        let id = self.id_of(slot);
        let policy = self.config.policy;
        let retry = self.want.retry;
        let Some(s) = self.slots.get_mut(&slot) else {
            return;
        };
        s.gone();
        s.unknown = false;
        if self.active == Some(slot) {
            self.active = None;
        }
        let now = Instant::now();
        let text = reason.to_string();
        s.last_exit = Some(text.clone());
        match s.restart.exited(now, &text, &policy) {
            Decision::RestartAfter(delay) => {
                tracing::warn!(replica = %id, reason = %text, ?delay, "replica ended; restarting");
                self.log.note(
                    "warn",
                    format!("replica {id} ended ({text}); restarting in {delay:?}"),
                );
                s.restarts = s.restart.restarts();
                s.restart_at = Some(now + delay);
                s.set_phase(ReplicaPhase::Restarting);
            }
            Decision::Crashed(why) => {
                tracing::error!(replica = %id, reason = %why, "replica held as crashed");
                self.log
                    .note("error", format!("replica {id} held as crashed: {why}"));
                s.last_exit = Some(why);
                s.retry_seen = retry;
                s.set_phase(ReplicaPhase::Crashed);
            }
        }
    }

    fn on_done(&mut self, done: Done) {
        let now = Instant::now();
        let slot = match &done {
            Done::Prepare(..) => None,
            Done::Start(slot, ..)
            | Done::Drain(slot)
            | Done::Stop(slot, _)
            | Done::Fence(slot, ..)
            | Done::SetFlows(slot, ..)
            | Done::Deploy(slot, ..)
            | Done::Check(slot, ..) => Some(*slot),
        };
        if let Some(s) = slot.and_then(|slot| self.slots.get_mut(&slot)) {
            s.abortable = None;
        }
        let retry_after = self.config.retry_after;
        match done {
            Done::Prepare(key, result) => match result {
                Ok(prepared) => {
                    self.modules = prepared.modules;
                    self.runtime = Runtime::Ready(key);
                }
                Err(e) => {
                    self.log.note("error", e.to_string());
                    self.runtime = Runtime::Failed {
                        key,
                        reason: e.to_string(),
                        retry: self.want.retry,
                    };
                }
            },
            Done::Start(slot, run, result) => {
                let Some(s) = self.slots.get_mut(&slot) else {
                    return;
                };
                s.busy = false;
                if let Err(e) = result {
                    if s.run == run && s.phase == ReplicaPhase::Starting {
                        self.ended(slot, ExitReason::StartFailed(e.to_string()));
                    }
                }
            }
            Done::Drain(slot) => {
                let Some(s) = self.slots.get_mut(&slot) else {
                    return;
                };
                if s.phase == ReplicaPhase::Draining {
                    s.set_phase(ReplicaPhase::Stopping);
                    self.pending.push(Op::Stop(slot));
                } else {
                    // It hung while draining: fenced instead.
                    s.busy = false;
                }
            }
            Done::Stop(slot, result) => match result {
                Ok(()) => self.left(slot, now),
                Err(e) => {
                    // It may still run: the slot stays (and so do its flows, as far as the
                    // standby rule is concerned) until a stop succeeds.
                    self.log.note(
                        "error",
                        format!("cannot stop {}: {e}; trying again", self.id_of(slot)),
                    );
                    if let Some(s) = self.slots.get_mut(&slot) {
                        s.busy = false;
                        s.hold_until = Some(now + retry_after);
                    }
                }
            },
            Done::Fence(slot, run, result) => {
                let id = self.id_of(slot);
                let Some(s) = self.slots.get_mut(&slot) else {
                    return;
                };
                s.busy = false;
                match result {
                    Err(e) => {
                        // It may still run: nothing is promoted until a fence holds.
                        self.log
                            .note("error", format!("cannot fence {id}: {e}; trying again"));
                        s.hold_until = Some(now + retry_after);
                    }
                    Ok(()) if s.run == run => {
                        s.gone();
                        match s.leaving {
                            Some(_) => self.left(slot, now),
                            None if s.phase == ReplicaPhase::Hung => {
                                let silent_ms = s.silent_ms;
                                self.ended(slot, ExitReason::Hung { silent_ms });
                            }
                            None => {}
                        }
                    }
                    Ok(()) => {}
                }
            }
            Done::SetFlows(slot, run, state, result) => {
                let id = self.id_of(slot);
                let Some(s) = self.slots.get_mut(&slot) else {
                    return;
                };
                s.busy = false;
                // A late answer from a process that has ended since changes nothing.
                if s.run != run || s.running.is_none() {
                    return;
                }
                if state == FlowState::Stopped && s.out && s.phase == ReplicaPhase::Deploying {
                    // Retired: a standby now, or, its flows not stopped, the active again.
                    s.out = false;
                    s.set_phase(ReplicaPhase::Running);
                }
                match (state, result) {
                    (FlowState::Started, Ok(())) => {
                        s.flows_on = true;
                        if s.phase == ReplicaPhase::Running && self.active.is_none() {
                            self.active = Some(slot);
                            self.log.note(
                                "info",
                                format!("{id} is now the active replica (flows started)"),
                            );
                        }
                    }
                    (FlowState::Stopped, Ok(())) => s.flows_on = false,
                    (_, Err(e)) => {
                        // Whether its flows run is unknown: it counts as running them until a
                        // stop succeeds, so no second replica starts its own.
                        self.log.note(
                            "warn",
                            format!(
                                "cannot {} the flows of {id}: {e}",
                                match state {
                                    FlowState::Started => "start",
                                    FlowState::Stopped => "stop",
                                }
                            ),
                        );
                        s.hold_until = Some(now + retry_after);
                    }
                }
            }
            Done::Check(slot, run, reason, result) => {
                let id = self.id_of(slot);
                let Some(s) = self.slots.get_mut(&slot) else {
                    return;
                };
                s.busy = false;
                if s.run != run || s.phase != ReplicaPhase::Running {
                    return;
                }
                match result {
                    Ok(()) => self.log.note(
                        "info",
                        format!("the proxy took {id} out of rotation ({reason}); its admin API answers, so it is kept"),
                    ),
                    Err(e) => {
                        tracing::warn!(replica = %id, %reason, error = %e, "replica hung by the proxy's verdict and a check; fencing it");
                        self.log.note(
                            "warn",
                            format!("the proxy took {id} out of rotation ({reason}) and its admin API does not answer ({e}); fencing it"),
                        );
                        s.set_phase(ReplicaPhase::Hung);
                    }
                }
            }
            Done::Deploy(slot, run, rev, result) => {
                let id = self.id_of(slot);
                let Some(s) = self.slots.get_mut(&slot) else {
                    return;
                };
                s.busy = false;
                if s.run != run || s.running.is_none() {
                    return;
                }
                match result {
                    Ok(()) => {
                        self.log
                            .note("info", format!("deployed flows {rev} to {id}"));
                        s.flows_rev = Some(rev);
                        s.out = false;
                        s.deploy_error = None;
                        if s.phase == ReplicaPhase::Deploying {
                            s.set_phase(ReplicaPhase::Running);
                        }
                    }
                    Err(DriverError::Refused { reason, .. }) => {
                        // It runs the bad flows: it stays out of rotation (when others serve)
                        // until it gets others, and no other replica gets these.
                        self.log.note(
                            "error",
                            format!("flows {rev} failed their health gate on {id}: {reason}; deploying them nowhere else"),
                        );
                        s.flows_rev = Some(rev.clone());
                        s.deploy_error = Some(reason.clone());
                        if !s.out && s.phase == ReplicaPhase::Deploying {
                            s.set_phase(ReplicaPhase::Running);
                        }
                        self.refused = Some((rev, reason));
                    }
                    Err(e) => {
                        self.log
                            .note("warn", format!("cannot deploy flows to {id}: {e}"));
                        s.deploy_error = Some(e.to_string());
                        s.hold_until = Some(now + retry_after);
                        // What it runs is unknown until a deploy succeeds.
                        s.flows_rev = None;
                        if !s.out && s.phase == ReplicaPhase::Deploying {
                            s.set_phase(ReplicaPhase::Running);
                        }
                    }
                }
            }
        }
    }

    /// A replica stopped or fenced on purpose is gone: its slot is removed, or started again
    /// with the current spec.
    fn left(&mut self, slot: u32, now: Instant) {
        let Some(s) = self.slots.get_mut(&slot) else {
            return;
        };
        s.busy = false;
        s.gone();
        s.unknown = false;
        if self.active == Some(slot) {
            self.active = None;
        }
        match s.leaving.take() {
            Some(Leaving::Replace) if !self.gone => {
                // Started by the next step, with the spec wanted then.
                s.restart = RestartState::default();
                s.restart_at = Some(now);
                s.set_phase(ReplicaPhase::Restarting);
            }
            _ => {
                self.slots.remove(&slot);
            }
        }
    }
}

/// What a runtime is prepared for: Node-RED, Node.js, the module set.
fn runtime_key(spec: &ProcessSpec) -> RuntimeKey {
    (
        spec.nodered_version.clone(),
        spec.node_version.clone(),
        spec.modules.clone(),
    )
}

/// How long flows a replica saved itself are kept from a deploy of older desired flows: the
/// control plane stores them and applies within moments; past this, the desired flows win.
const SAVED_GRACE: Duration = Duration::from_secs(10);

/// How often calls held while the coordinator may not act are tried again.
const FENCED_RETRY: Duration = Duration::from_millis(100);

/// A stack install shows as `installing` only once it has taken this long.
const INSTALLING_AFTER: Duration = Duration::from_millis(50);

fn begin_start(s: &mut Slot, run: u64, spec: ProcessSpec, generation: u64, now: Instant) {
    s.run = run;
    s.spec = Some(spec);
    s.generation = generation;
    s.running = None;
    s.flows_on = false;
    s.flows_rev = None;
    s.out = false;
    s.deploy_error = None;
    s.busy = true;
    s.restart_at = None;
    s.restart.started(now);
    s.set_phase(ReplicaPhase::Starting);
}
