//! The coordinator: the control plane's desired state in, one [`crate::worker`] per instance,
//! routes out through a [`DataPlane`].
//!
//! The control plane hands [`Coordinator::apply`] the whole desired state after each change and
//! at start. An instance that appears gets a worker; one that changes has its worker told; one
//! that disappears (deleted) has its worker stop every replica, and then its data is removed.
//! A new instance with the name of a deleted one waits until the old one's worker is done,
//! since replica ids and directories are named after the instance.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;

use crate::dataplane::DataPlane;
use crate::driver::{Driver, InstanceDriver};
use crate::logs::LogBook;
use crate::observed::Observed;
use crate::restart::RestartPolicy;
use crate::spec::InstanceDesired;
use crate::status::{Coordination, ObservedStatus};
use crate::worker::{Input, Want, Worker};

/// The coordinator's settings.
#[derive(Debug, Clone, Copy)]
pub struct CoordinatorConfig {
    /// Restart backoff and crash-loop hold.
    pub policy: RestartPolicy,
    /// Longest wait for a draining replica's requests to finish before it is stopped. Default
    /// 10 s.
    pub drain_timeout: Duration,
    /// Wait before a failed fence, deploy or flow start/stop is tried again. Default 1 s.
    pub retry_after: Duration,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            policy: RestartPolicy::default(),
            drain_timeout: Duration::from_secs(10),
            retry_after: Duration::from_secs(1),
        }
    }
}

/// The coordinator.
pub struct Coordinator<D: Driver> {
    driver: Arc<D>,
    logs: Arc<LogBook>,
    config: CoordinatorConfig,
    observed: Arc<Observed>,
    workers: Mutex<HashMap<String, WorkerHandle>>,
    /// Workers of deleted instances still stopping, by name.
    ending: Arc<Mutex<HashMap<String, JoinHandle<()>>>>,
    changed: Arc<Notify>,
    shutting_down: AtomicBool,
    /// Whether it may act (set once, before the first [`Coordinator::apply`]).
    fence: std::sync::OnceLock<crate::Fence>,
}

struct WorkerHandle {
    /// The instance's name: its replica ids and directories.
    name: String,
    want: watch::Sender<Want>,
    /// The data plane's verdicts on the instance's replicas, and the replicas' saves.
    inputs: mpsc::UnboundedSender<Input>,
    task: JoinHandle<()>,
}

impl<D: Driver> Coordinator<D> {
    /// A coordinator running replicas with `driver` and publishing them to `plane`.
    pub fn new(
        driver: Arc<D>,
        plane: Arc<dyn DataPlane>,
        logs: Arc<LogBook>,
        config: CoordinatorConfig,
    ) -> Arc<Self> {
        let (verdicts, mut from_plane) = mpsc::unbounded_channel();
        plane.verdicts(verdicts);
        let this = Arc::new(Self {
            driver,
            logs,
            config,
            observed: Arc::new(Observed::new(plane)),
            workers: Mutex::new(HashMap::new()),
            ending: Arc::default(),
            changed: Arc::new(Notify::new()),
            shutting_down: AtomicBool::new(false),
            fence: std::sync::OnceLock::new(),
        });
        // Each verdict goes to the worker of its instance.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let weak = Arc::downgrade(&this);
            rt.spawn(async move {
                while let Some(v) = from_plane.recv().await {
                    let Some(this) = weak.upgrade() else { return };
                    let to = this.workers.lock().ok().and_then(|workers| {
                        workers
                            .values()
                            .find(|w| w.name == v.replica.instance)
                            .map(|w| w.inputs.clone())
                    });
                    if let Some(to) = to {
                        let _ = to.send(Input::Verdict(v));
                    }
                }
            });
        }
        this
    }

    /// Makes every action of the coordinator wait until `fence` answers true: the leader's
    /// check of its own lease, so that a leader that lost it (stopped, cut off) never acts on a
    /// stale term. Set once, before the first [`Coordinator::apply`].
    pub fn set_fence(&self, fence: crate::Fence) {
        let _ = self.fence.set(fence);
    }

    /// Drops every worker without stopping any replica: the leadership moved to another control
    /// plane. The replicas keep running and a coordinator on this machine adopts them later.
    pub fn abandon(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
        if let Ok(mut workers) = self.workers.lock() {
            for (_, w) in workers.drain() {
                w.task.abort();
            }
        }
    }

    /// Makes `desired` the whole desired state: instances not in it are stopped and their data
    /// removed.
    pub fn apply(self: &Arc<Self>, desired: Vec<InstanceDesired>) {
        let Ok(mut workers) = self.workers.lock() else {
            return;
        };
        let keep: HashSet<&str> = desired.iter().map(|d| d.id.as_str()).collect();
        let gone: Vec<String> = workers
            .keys()
            .filter(|id| !keep.contains(id.as_str()))
            .cloned()
            .collect();
        for id in gone {
            let Some(w) = workers.remove(&id) else {
                continue;
            };
            // Dropping the sender tells the worker the instance is gone. It is remembered by
            // name until it has stopped, and the control plane is asked to apply again then.
            drop(w.want);
            let (ending, changed, name) =
                (self.ending.clone(), self.changed.clone(), w.name.clone());
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
                        .map(|e| e.contains_key(&d.process.instance))
                        .unwrap_or(false);
                    if busy {
                        // Started once the deleted namesake has stopped.
                        continue;
                    }
                    let (id, name) = (d.id.clone(), d.process.instance.clone());
                    let (tx, rx) = watch::channel(Want {
                        desired: d,
                        restart: 0,
                        retry: 0,
                    });
                    let (inputs, inputs_rx) = mpsc::unbounded_channel();
                    let task = tokio::spawn(self.clone().run_instance(id.clone(), rx, inputs_rx));
                    workers.insert(
                        id,
                        WorkerHandle {
                            name,
                            want: tx,
                            inputs,
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

    /// Stops every replica (for `tandem serve --stop-replicas-on-exit` and tests), all
    /// instances at once, keeping their data; otherwise replicas outlive Tandem and are adopted
    /// at its next start.
    pub async fn stop_all(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
        let workers: Vec<WorkerHandle> = match self.workers.lock() {
            Ok(mut w) => w.drain().map(|(_, w)| w).collect(),
            Err(_) => return,
        };
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

    async fn run_instance(
        self: Arc<Self>,
        id: String,
        want: watch::Receiver<Want>,
        inputs: mpsc::UnboundedReceiver<Input>,
    ) {
        let log = self.logs.instance(&id);
        let first = want.borrow().clone();
        let name = first.desired.process.instance.clone();
        let (events_tx, events) = mpsc::unbounded_channel();
        let instance = Arc::new(self.driver.open(&name, log.clone(), events_tx));
        Worker::new(
            id.clone(),
            instance.clone(),
            log,
            self.observed.clone(),
            self.config,
            first,
            self.fence.get().cloned(),
        )
        .run(want, events, inputs)
        .await;
        // The instance is gone from the desired state (deleted), or Tandem stops everything.
        let deleted = !self.shutting_down.load(Ordering::Relaxed)
            && self
                .workers
                .lock()
                .map(|w| !w.contains_key(&id))
                .unwrap_or(false);
        self.observed.forget(&id);
        if deleted {
            if let Err(e) = instance.remove().await {
                tracing::warn!(instance = %name, error = %e, "cannot remove the instance's data");
            }
            self.logs.remove(&id);
        }
    }
}

impl<D: Driver> Coordination for Coordinator<D> {
    fn status(&self, instance_id: &str) -> ObservedStatus {
        self.observed.status(instance_id)
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

    fn flows_saved(&self, instance_id: &str, slot: u32, rev: &str) {
        if let Ok(workers) = self.workers.lock() {
            if let Some(w) = workers.get(instance_id) {
                let _ = w.inputs.send(Input::FlowsSaved {
                    slot,
                    rev: rev.to_owned(),
                });
            }
        }
    }

    fn modules_saved(&self, instance_id: &str, slot: u32, modules: &BTreeMap<String, String>) {
        if let Ok(workers) = self.workers.lock() {
            if let Some(w) = workers.get(instance_id) {
                let _ = w.inputs.send(Input::ModulesSaved {
                    slot,
                    modules: modules.clone(),
                });
            }
        }
    }

    fn metrics(&self) -> String {
        self.observed.metrics()
    }
}
