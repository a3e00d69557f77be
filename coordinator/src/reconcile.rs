//! The reconciler: desired state in, running replicas and a route table out.
//!
//! The control plane hands [`Coordinator::apply`] the whole desired state (every instance, its
//! state, replica count and spec) after each change and at start. Each instance has one worker
//! task that converges it, so the actions on one instance never race each other:
//! - not `running`: stop every replica;
//! - `running`: make sure the stack is installed (state `installing`), stop the replicas above
//!   the wanted count, start the missing ones (all at once), and replace the ones whose spec
//!   changed or that a restart asked for, one at a time, each waiting for its successor to be
//!   ready when there are others to keep serving. The replicas already right are not touched.
//!
//! Each replica runs under [`crate::supervise`]. Its events update the observed state and
//! publish a new route table to the proxy: a replica is in rotation only while it is ready.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tandem_proxy::routes::{InstanceSpec, ReplicaSpec as RouteReplica};
use tandem_proxy::{HealthConfig, Routes};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::driver::{Driver, Isolation, ReplicaSpec};
use crate::logs::{now_ms, InstanceLog, LogBook};
use crate::restart::RestartPolicy;
use crate::status::{Coordination, ObservedStatus, ReplicaStatus};
use crate::supervise::{supervise, Event};

/// What the control plane wants of an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DesiredState {
    /// Replicas running and serving.
    Running,
    /// Nothing running.
    Stopped,
    /// Nothing running; the instance is kept, not billed for (a suspended instance).
    Suspended,
}

/// One instance as it should be.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceDesired {
    /// Instance id (the key of the status and logs).
    pub id: String,
    /// Host names it is served at.
    pub hosts: Vec<String>,
    /// Running, stopped or suspended.
    pub state: DesiredState,
    /// Replicas: 1 without HA.
    pub replicas: u32,
    /// HA standby mode: every replica boots with its flows stopped; the coordinator starts the
    /// flows of one (the active) and routes only to it; when the active's process has ended
    /// (crash, hang, stop), another ready replica becomes active. Never two actives.
    pub standby: bool,
    /// What each replica runs; `slot` and `start_stopped` are set per replica.
    pub replica: ReplicaSpec,
    /// Per slot, the MQTT proxy listener its flows should use as their broker, given to the
    /// replica as `TANDEM_MQTT_URL`; empty when Tandem has no MQTT broker configured.
    pub mqtt_urls: Vec<String>,
}

impl InstanceDesired {
    fn spec(&self, slot: u32) -> ReplicaSpec {
        let mut spec = ReplicaSpec {
            slot,
            start_stopped: self.standby,
            ..self.replica.clone()
        };
        if let Some(url) = self.mqtt_urls.get(slot as usize) {
            spec.env.insert("TANDEM_MQTT_URL".into(), url.clone());
        }
        spec
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Want {
    desired: InstanceDesired,
    /// Bumped by a restart: every replica is replaced.
    restart: u64,
    /// Bumped by a start: replicas held as crashed are tried again.
    retry: u64,
}

/// The coordinator.
pub struct Coordinator<D: Driver> {
    driver: Arc<D>,
    logs: Arc<LogBook>,
    policy: RestartPolicy,
    shared: Arc<Shared>,
    workers: Mutex<HashMap<String, Worker>>,
    /// Workers of deleted instances still stopping, by name: a new instance of the same name
    /// waits for them, since replica ids and directories are named after the instance.
    ending: Arc<Mutex<HashMap<String, JoinHandle<()>>>>,
    changed: Arc<Notify>,
    shutting_down: std::sync::atomic::AtomicBool,
    /// Time a rolling replacement waits for a new replica to be ready. Default 120 s.
    pub ready_wait: Duration,
}

struct Worker {
    /// The instance's name: its replica ids and directories.
    name: String,
    want: watch::Sender<Want>,
    task: JoinHandle<()>,
}

/// Observed state, shared with the replica supervisors' event handlers.
struct Shared {
    instances: Mutex<HashMap<String, Observed>>,
    routes: Arc<Routes>,
}

#[derive(Debug, Clone)]
struct Observed {
    name: String,
    /// The admin secret, added by the proxy to editor requests it lets through.
    secret: String,
    hosts: Vec<String>,
    ha: bool,
    standby: bool,
    desired: DesiredState,
    want: u32,
    phase: Phase,
    replicas: BTreeMap<u32, ReplicaObserved>,
    /// Standby mode: the replica whose flows run.
    active: Option<u32>,
    /// Wakes the instance's standby promoter.
    promote: Arc<Notify>,
    /// Wakes the instance's worker to converge again (a stale replica was adopted).
    resync: Arc<Notify>,
}

#[derive(Debug, Clone, PartialEq)]
enum Phase {
    Ready,
    Installing,
    Failed(String),
}

#[derive(Debug, Clone)]
struct ReplicaObserved {
    state: &'static str,
    addr: Option<SocketAddr>,
    pid: Option<u32>,
    restarts: u64,
    last_exit: Option<String>,
    since: i64,
    flows_started: bool,
    isolation: Option<Isolation>,
}

impl<D: Driver> Coordinator<D> {
    /// A coordinator running replicas with `driver` and publishing them into `routes`.
    pub fn new(
        driver: Arc<D>,
        routes: Arc<Routes>,
        logs: Arc<LogBook>,
        policy: RestartPolicy,
    ) -> Arc<Self> {
        Arc::new(Self {
            driver,
            logs,
            policy,
            shared: Arc::new(Shared {
                instances: Mutex::new(HashMap::new()),
                routes,
            }),
            workers: Mutex::new(HashMap::new()),
            ending: Arc::default(),
            changed: Arc::new(Notify::new()),
            shutting_down: std::sync::atomic::AtomicBool::new(false),
            ready_wait: Duration::from_secs(120),
        })
    }

    /// Makes `desired` the whole desired state: instances not in it are stopped and their data
    /// removed.
    pub fn apply(self: &Arc<Self>, desired: Vec<InstanceDesired>) {
        let Ok(mut workers) = self.workers.lock() else {
            return;
        };
        let keep: std::collections::HashSet<&str> = desired.iter().map(|d| d.id.as_str()).collect();
        // Dropping a worker's sender tells it the instance is gone; it is remembered by name
        // until it has stopped, and the control plane is asked to apply again then.
        let gone: Vec<String> = workers
            .keys()
            .filter(|id| !keep.contains(id.as_str()))
            .cloned()
            .collect();
        for id in gone {
            if let Some(w) = workers.remove(&id) {
                drop(w.want);
                let (ending, changed) = (self.ending.clone(), self.changed.clone());
                let name = w.name.clone();
                let task = w.task;
                let waiter = tokio::spawn(async move {
                    let _ = task.await;
                    if let Ok(mut e) = ending.lock() {
                        e.remove(&name);
                    }
                    changed.notify_one();
                });
                if let Ok(mut e) = self.ending.lock() {
                    e.insert(w.name, waiter);
                }
            }
        }
        for d in desired {
            match workers.get(&d.id) {
                Some(w) if !w.task.is_finished() => {
                    w.want.send_if_modified(|want| {
                        let changed = want.desired != d;
                        want.desired = d;
                        changed
                    });
                }
                _ => {
                    let busy = self
                        .ending
                        .lock()
                        .map(|e| e.contains_key(&d.replica.instance))
                        .unwrap_or(false);
                    if busy {
                        // Started once the deleted namesake has stopped.
                        continue;
                    }
                    let id = d.id.clone();
                    let name = d.replica.instance.clone();
                    let (tx, rx) = watch::channel(Want {
                        desired: d,
                        restart: 0,
                        retry: 0,
                    });
                    let task = tokio::spawn(self.clone().run_instance(id.clone(), rx));
                    workers.insert(
                        id,
                        Worker {
                            name,
                            want: tx,
                            task,
                        },
                    );
                }
            }
        }
    }

    fn bump(&self, id: &str, f: impl FnOnce(&mut Want)) {
        if let Ok(workers) = self.workers.lock() {
            if let Some(w) = workers.get(id) {
                w.want.send_modify(f);
            }
        }
    }

    /// Resolves when the control plane has said the desired state changed.
    pub async fn wait_changed(&self) {
        self.changed.notified().await;
    }

    /// Stops every replica (for `tandem serve --stop-replicas-on-exit` and tests); otherwise
    /// replicas outlive Tandem and are adopted at its next start.
    pub async fn stop_all(&self) {
        self.shutting_down
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let workers: Vec<Worker> = match self.workers.lock() {
            Ok(mut w) => w.drain().map(|(_, w)| w).collect(),
            Err(_) => return,
        };
        // Each worker stops its replicas once its sender is gone, but keeps their data; all at
        // once.
        let tasks: Vec<JoinHandle<()>> = workers
            .into_iter()
            .map(|w| {
                drop(w.want);
                w.task
            })
            .collect();
        for task in tasks {
            let _ = task.await;
        }
    }

    async fn run_instance(self: Arc<Self>, id: String, mut rx: watch::Receiver<Want>) {
        let log = self.logs.instance(&id);
        // The observed entry exists before the promoter looks for it.
        self.shared.update(&id, |_| {});
        let promoter = tokio::spawn(self.clone().promote_standbys(id.clone(), log.clone()));
        let mut replicas: BTreeMap<u32, Run> = BTreeMap::new();
        let resync = self
            .shared
            .with(&id, |o| o.resync.clone())
            .unwrap_or_default();
        let name = loop {
            let want = rx.borrow_and_update().clone();
            self.converge(&id, &want, &mut replicas, &log).await;
            tokio::select! {
                changed = rx.changed() => if changed.is_err() {
                    break want.desired.replica.instance;
                },
                // A replica adopted with an older spec is ready: replace it (and any others
                // like it), one at a time.
                _ = resync.notified() => {}
            }
        };
        // The instance is gone from the desired state (deleted), or Tandem stops everything.
        promoter.abort();
        self.shared
            .stop_runs(&id, std::mem::take(&mut replicas))
            .await;
        let deleted = !self
            .shutting_down
            .load(std::sync::atomic::Ordering::Relaxed)
            && self
                .workers
                .lock()
                .map(|w| !w.contains_key(&id))
                .unwrap_or(false);
        self.shared.forget(&id);
        if deleted {
            if let Err(e) = self.driver.remove(&name).await {
                tracing::warn!(instance = %name, error = %e, "cannot remove the instance's data");
            }
            self.logs.remove(&id);
        }
    }

    /// Standby mode: keeps exactly one replica's flows running. Wakes on every replica event
    /// (and once a second): with no active, starts the flows of the lowest ready replica; stops
    /// the flows of any other replica found running them.
    async fn promote_standbys(self: Arc<Self>, id: String, log: Arc<InstanceLog>) {
        let Some(notify) = self.shared.with(&id, |o| o.promote.clone()) else {
            return;
        };
        loop {
            tokio::select! {
                _ = notify.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            let Some((name, active, ready)) = self.shared.with(&id, |o| {
                let ready: Vec<(u32, bool)> = o
                    .replicas
                    .iter()
                    .filter(|(_, r)| r.state == "running")
                    .map(|(slot, r)| (*slot, r.flows_started))
                    .collect();
                (o.standby.then(|| o.name.clone()), o.active, ready)
            }) else {
                return;
            };
            let Some(name) = name else { continue };
            for (slot, started) in &ready {
                if *started && Some(*slot) != active && active.is_some() {
                    let rid = format!("{name}-r{slot}");
                    if self.driver.set_flows_running(&rid, false).await.is_ok() {
                        self.shared.update(&id, |o| {
                            if let Some(r) = o.replicas.get_mut(slot) {
                                r.flows_started = false;
                            }
                        });
                    }
                }
            }
            if active.is_some() {
                continue;
            }
            let Some((slot, _)) = ready.first() else {
                continue;
            };
            let rid = format!("{name}-r{slot}");
            match self.driver.set_flows_running(&rid, true).await {
                Ok(()) => {
                    let mut took = false;
                    self.shared.update(&id, |o| {
                        if let Some(r) = o.replicas.get_mut(slot) {
                            r.flows_started = true;
                            if r.state == "running" && o.active.is_none() {
                                o.active = Some(*slot);
                                took = true;
                            }
                        }
                    });
                    if !took {
                        // Another replica became active meanwhile (adopted with its flows
                        // running): never two actives.
                        let _ = self.driver.set_flows_running(&rid, false).await;
                        self.shared.update(&id, |o| {
                            if let Some(r) = o.replicas.get_mut(slot) {
                                r.flows_started = false;
                            }
                        });
                        continue;
                    }
                    log.note(
                        "info",
                        format!("{rid} is now the active replica (flows started)"),
                    );
                }
                Err(e) => log.note("warn", format!("cannot start the flows of {rid}: {e}")),
            }
        }
    }

    async fn converge(
        &self,
        id: &str,
        want: &Want,
        replicas: &mut BTreeMap<u32, Run>,
        log: &Arc<InstanceLog>,
    ) {
        let d = &want.desired;
        self.shared.update(id, |o| {
            o.name = d.replica.instance.clone();
            o.secret = d.replica.admin_secret.clone();
            o.hosts = d.hosts.clone();
            o.ha = d.replica.ha;
            o.standby = d.standby;
            o.desired = d.state.clone();
            o.want = if d.state == DesiredState::Running {
                d.replicas
            } else {
                0
            };
        });
        if d.state != DesiredState::Running {
            if !replicas.is_empty() {
                log.note("info", format!("stopping ({:?})", d.state));
            }
            self.shared.stop_runs(id, std::mem::take(replicas)).await;
            self.shared.update(id, |o| o.phase = Phase::Ready);
            return;
        }

        // `installing` only when the stack is not there yet (preparing takes more than a moment).
        let prepare = self.driver.prepare(&d.replica, log);
        tokio::pin!(prepare);
        let prepared = match tokio::time::timeout(Duration::from_millis(50), &mut prepare).await {
            Ok(result) => result,
            Err(_) => {
                self.shared.update(id, |o| o.phase = Phase::Installing);
                prepare.await
            }
        };
        if let Err(e) = prepared {
            log.note("error", e.to_string());
            self.shared
                .update(id, |o| o.phase = Phase::Failed(e.to_string()));
            return;
        }
        self.shared.update(id, |o| o.phase = Phase::Ready);

        let extra: Vec<u32> = replicas.range(d.replicas..).map(|(s, _)| *s).collect();
        if !extra.is_empty() {
            log.note("info", format!("scaling down to {} replicas", d.replicas));
        }
        let extra = extra
            .iter()
            .filter_map(|s| replicas.remove(s).map(|r| (*s, r)))
            .collect();
        self.shared.stop_runs(id, extra).await;

        // Missing replicas start together; replaced ones go one at a time.
        let mut replace = Vec::new();
        for slot in 0..d.replicas {
            let spec = d.spec(slot);
            match replicas.get(&slot) {
                None => {
                    let run = self.start_run(id, spec, want, log);
                    replicas.insert(slot, run);
                }
                Some(run) if run.spec != spec || run.restart != want.restart || run.stale() => {
                    replace.push(slot)
                }
                Some(run) if run.task.is_finished() && run.retry != want.retry => {
                    replace.push(slot)
                }
                Some(_) => {}
            }
        }
        for slot in replace {
            if d.replicas > 1 {
                // Take a replica down only while another one serves.
                let deadline = tokio::time::Instant::now() + self.ready_wait;
                while self.shared.ready_besides(id, slot) == 0
                    && tokio::time::Instant::now() < deadline
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            if let Some(old) = replicas.remove(&slot) {
                self.shared
                    .stop_runs(id, BTreeMap::from([(slot, old)]))
                    .await;
            }
            let run = self.start_run(id, d.spec(slot), want, log);
            let mut events = run.events.clone();
            replicas.insert(slot, run);
            if d.replicas > 1 {
                // Keep the others serving until this one is back.
                let ready = tokio::time::timeout(
                    self.ready_wait,
                    events.wait_for(|e| matches!(e, Some(Event::Ready(_) | Event::Crashed(_)))),
                )
                .await;
                let ok = matches!(ready, Ok(Ok(ref e)) if matches!(**e, Some(Event::Ready(_))));
                if !ok {
                    log.note(
                        "error",
                        format!("replica r{slot} did not come back; the rest keep their old spec until the next change"),
                    );
                    return;
                }
            }
        }
    }

    fn start_run(&self, id: &str, spec: ReplicaSpec, want: &Want, log: &Arc<InstanceLog>) -> Run {
        let (stop_tx, stop_rx) = watch::channel(false);
        let (ev_tx, ev_rx) = watch::channel(None);
        let shared = self.shared.clone();
        let instance = id.to_owned();
        let slot = spec.slot;
        let task = tokio::spawn(supervise(
            self.driver.clone(),
            spec.clone(),
            log.clone(),
            self.policy,
            stop_rx,
            move |event: Event| {
                shared.replica_event(&instance, slot, &event);
                ev_tx.send_replace(Some(event));
            },
        ));
        Run {
            spec,
            restart: want.restart,
            retry: want.retry,
            stop: stop_tx,
            events: ev_rx,
            task,
        }
    }
}

/// A supervised replica.
struct Run {
    spec: ReplicaSpec,
    restart: u64,
    retry: u64,
    stop: watch::Sender<bool>,
    events: watch::Receiver<Option<Event>>,
    task: JoinHandle<()>,
}

impl Run {
    /// Running, adopted from before with another spec: to be replaced.
    fn stale(&self) -> bool {
        matches!(&*self.events.borrow(), Some(Event::Ready(r)) if r.stale)
    }
}

impl Shared {
    /// Stops replicas, all at once, and waits for them; they leave the rotation first.
    async fn stop_runs(&self, id: &str, runs: BTreeMap<u32, Run>) {
        if runs.is_empty() {
            return;
        }
        self.update(id, |o| {
            for slot in runs.keys() {
                if let Some(r) = o.replicas.get_mut(slot) {
                    r.state = "stopping";
                }
            }
        });
        self.drain(id, runs.keys().copied().collect()).await;
        for run in runs.values() {
            run.stop.send_replace(true);
        }
        for (_, run) in runs {
            let _ = run.task.await;
        }
    }

    /// Waits (up to 10 s) until the proxy has no request in flight to these replicas, now out
    /// of rotation.
    async fn drain(&self, id: &str, slots: Vec<u32>) {
        let Some(name) = self
            .instances
            .lock()
            .ok()
            .and_then(|m| m.get(id).map(|o| o.name.clone()))
        else {
            return;
        };
        let ids: Vec<String> = slots.iter().map(|s| format!("{name}-r{s}")).collect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let busy = self.routes.load().instances().iter().any(|i| {
                *i.name == *name
                    && i.replicas
                        .iter()
                        .any(|r| ids.iter().any(|id| *r.id == **id) && r.state.in_flight() > 0)
            });
            if !busy || tokio::time::Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Replicas ready, other than `slot`.
    fn ready_besides(&self, id: &str, slot: u32) -> usize {
        self.instances
            .lock()
            .ok()
            .and_then(|m| {
                m.get(id).map(|o| {
                    o.replicas
                        .iter()
                        .filter(|(s, r)| **s != slot && r.state == "running")
                        .count()
                })
            })
            .unwrap_or(0)
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut Observed)) {
        if let Ok(mut map) = self.instances.lock() {
            let o = map.entry(id.to_owned()).or_insert_with(|| Observed {
                name: String::new(),
                secret: String::new(),
                hosts: Vec::new(),
                ha: false,
                standby: false,
                desired: DesiredState::Stopped,
                want: 0,
                phase: Phase::Ready,
                replicas: BTreeMap::new(),
                active: None,
                promote: Arc::new(Notify::new()),
                resync: Arc::new(Notify::new()),
            });
            f(o);
            self.publish(&map);
        }
    }

    fn with<T>(&self, id: &str, f: impl FnOnce(&Observed) -> T) -> Option<T> {
        self.instances.lock().ok()?.get(id).map(f)
    }

    fn forget(&self, id: &str) {
        if let Ok(mut map) = self.instances.lock() {
            map.remove(id);
            self.publish(&map);
        }
    }

    fn replica_event(&self, id: &str, slot: u32, event: &Event) {
        self.update(id, |o| {
            let now = now_ms();
            let r = o.replicas.entry(slot).or_insert(ReplicaObserved {
                state: "starting",
                addr: None,
                pid: None,
                restarts: 0,
                last_exit: None,
                since: now,
                flows_started: false,
                isolation: None,
            });
            r.since = now;
            // Only a ready replica runs flows.
            r.flows_started = false;
            let mut gone = true;
            match event {
                Event::Starting => {
                    r.state = "starting";
                    r.addr = None;
                    r.isolation = None;
                }
                Event::Ready(running) => {
                    r.state = "running";
                    r.addr = Some(running.addr);
                    r.pid = running.pid;
                    r.flows_started = running.flows_started;
                    r.isolation = Some(running.isolation);
                    gone = false;
                    if running.stale {
                        o.resync.notify_one();
                    }
                    if o.standby && running.flows_started && o.active.is_none() {
                        // Adopted with its flows running: it stays the active.
                        o.active = Some(slot);
                    }
                }
                Event::Exited { reason, restarts } => {
                    r.state = "restarting";
                    r.isolation = None;
                    r.addr = None;
                    r.pid = None;
                    r.restarts = *restarts;
                    r.last_exit = Some(reason.clone());
                }
                Event::Crashed(reason) => {
                    r.state = "crashed";
                    r.isolation = None;
                    r.addr = None;
                    r.pid = None;
                    r.last_exit = Some(reason.clone());
                }
                Event::Stopped => {
                    o.replicas.remove(&slot);
                }
            }
            // The process of `slot` has ended (or never ran): it is no longer the active.
            if gone && o.active == Some(slot) {
                o.active = None;
            }
            if o.standby {
                o.promote.notify_one();
            }
        });
    }

    /// Publishes every instance: its ready replicas in rotation, the others out. A stopped
    /// instance stays in the table with no replica, so its host answers 503, not 404.
    fn publish(&self, map: &HashMap<String, Observed>) {
        let mut specs: Vec<InstanceSpec> = map
            .values()
            .filter(|o| !o.name.is_empty() && !o.hosts.is_empty())
            .map(|o| InstanceSpec {
                editor_secret: Some(o.secret.clone()),
                name: o.name.clone(),
                hosts: o.hosts.clone(),
                ha: o.ha,
                affinity: false,
                replicas: o
                    .replicas
                    .iter()
                    .filter(|(slot, _)| !o.standby || o.active == Some(**slot))
                    .filter_map(|(slot, r)| {
                        r.addr.map(|addr| RouteReplica {
                            id: format!("{}-r{slot}", o.name),
                            addr,
                            ready: r.state == "running",
                        })
                    })
                    .collect(),
                health: Some(HealthConfig::default()),
            })
            .collect();
        specs.sort_by(|a, b| a.name.cmp(&b.name));
        if let Err(e) = self.routes.publish(&specs) {
            tracing::error!(error = %e, "cannot publish the route table");
        }
    }

    /// `tandem_instance_*` and `tandem_replica_*` series, one per instance and replica.
    fn metrics(&self) -> String {
        use std::fmt::Write;
        let Ok(map) = self.instances.lock() else {
            return String::new();
        };
        let mut list: Vec<&Observed> = map.values().filter(|o| !o.name.is_empty()).collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        let mut out = String::new();
        out.push_str("# HELP tandem_instance_desired_replicas Replicas an instance should run (0 when stopped).\n# TYPE tandem_instance_desired_replicas gauge\n");
        for o in &list {
            let _ = writeln!(
                out,
                "tandem_instance_desired_replicas{{instance=\"{}\"}} {}",
                o.name, o.want
            );
        }
        out.push_str("# HELP tandem_instance_ready_replicas Replicas of an instance ready to serve.\n# TYPE tandem_instance_ready_replicas gauge\n");
        for o in &list {
            let ready = o.replicas.values().filter(|r| r.state == "running").count();
            let _ = writeln!(
                out,
                "tandem_instance_ready_replicas{{instance=\"{}\"}} {ready}",
                o.name
            );
        }
        out.push_str("# HELP tandem_replica_up Whether a replica is running (1) or starting, restarting, stopping or crashed (0).\n# TYPE tandem_replica_up gauge\n");
        for o in &list {
            for (slot, r) in &o.replicas {
                let up = u8::from(r.state == "running");
                let _ = writeln!(
                    out,
                    "tandem_replica_up{{instance=\"{}\",replica=\"{}-r{slot}\",state=\"{}\"}} {up}",
                    o.name, o.name, r.state
                );
            }
        }
        out.push_str("# HELP tandem_replica_restarts_total Restarts of a replica since Tandem started it.\n# TYPE tandem_replica_restarts_total counter\n");
        for o in &list {
            for (slot, r) in &o.replicas {
                let _ = writeln!(
                    out,
                    "tandem_replica_restarts_total{{instance=\"{}\",replica=\"{}-r{slot}\"}} {}",
                    o.name, o.name, r.restarts
                );
            }
        }
        out
    }

    fn status(&self, id: &str) -> ObservedStatus {
        let Some(o) = self.instances.lock().ok().and_then(|m| m.get(id).cloned()) else {
            return ObservedStatus::unknown();
        };
        let ready = o.replicas.values().filter(|r| r.state == "running").count() as u32;
        let crashed = o.replicas.values().find(|r| r.state == "crashed");
        let stopping = !o.replicas.is_empty();
        let (state, reason) = match (&o.desired, &o.phase) {
            (DesiredState::Stopped, _) if stopping => ("stopping", None),
            (DesiredState::Suspended, _) if stopping => ("stopping", None),
            (DesiredState::Stopped, _) => ("stopped", None),
            (DesiredState::Suspended, _) => ("suspended", None),
            (DesiredState::Running, Phase::Installing) => ("installing", None),
            (DesiredState::Running, Phase::Failed(why)) => ("crashed", Some(why.clone())),
            (DesiredState::Running, Phase::Ready) => {
                if ready >= o.want && ready > 0 {
                    ("running", None)
                } else if ready > 0 {
                    ("degraded", crashed.and_then(|r| r.last_exit.clone()))
                } else if let Some(r) = crashed {
                    ("crashed", r.last_exit.clone())
                } else {
                    ("starting", None)
                }
            }
        };
        ObservedStatus {
            state: state.into(),
            ready,
            desired: o.want,
            summary: if o.desired == DesiredState::Running {
                format!("{state} {ready}/{}", o.want)
            } else {
                state.to_string()
            },
            reason,
            replicas: o
                .replicas
                .iter()
                .map(|(slot, r)| ReplicaStatus {
                    id: format!("{}-r{slot}", o.name),
                    slot: *slot,
                    state: r.state.into(),
                    port: r.addr.map(|a| a.port()),
                    pid: r.pid,
                    restarts: r.restarts,
                    last_exit: r.last_exit.clone(),
                    since: r.since,
                    active: r.state == "running" && (!o.standby || o.active == Some(*slot)),
                    isolation: r.isolation,
                })
                .collect(),
            isolation: o
                .replicas
                .values()
                .filter_map(|r| r.isolation)
                .reduce(|a, b| if a == Isolation::None { a } else { b }),
        }
    }
}

impl<D: Driver> Coordination for Coordinator<D> {
    fn status(&self, instance_id: &str) -> ObservedStatus {
        self.shared.status(instance_id)
    }

    fn changed(&self) {
        self.changed.notify_one();
    }

    fn restart(&self, instance_id: &str) {
        self.bump(instance_id, |w| w.restart += 1);
    }

    fn retry(&self, instance_id: &str) {
        self.bump(instance_id, |w| w.retry += 1);
    }

    fn logs(&self) -> Option<Arc<LogBook>> {
        Some(self.logs.clone())
    }

    fn metrics(&self) -> String {
        self.shared.metrics()
    }
}
