//! The Kubernetes driver: each replica a pod of its own (`<instance>-r<slot>`), with its own
//! ConfigMap and Secret ([`crate::objects`]); what happens to it read from a watch of the
//! instance's pods ([`crate::observe`]) and reported as the coordinator's replica events.
//!
//! Pods, not a StatefulSet: the coordinator decides every replica's life (the rolling order, the
//! drain before a replacement, fencing a standby's peer), and a StatefulSet would decide some of
//! it too. Fencing deletes the pod with grace period 0 and waits until the API reports it gone;
//! a StatefulSet would recreate it at once, under the same name, while the standby takes over.
//!
//! The driver only ever touches objects with Tandem's label ([`crate::objects::MANAGED_BY`]) and
//! the instance's name; every request it makes is asserted by the scenario tests
//! (`tests/scenarios.rs`), and the Role of `deploy/kubernetes` grants exactly those.
//!
//! Readiness is the kubelet's: the pod's readiness probe. A ready pod is reported
//! [`EventKind::Ready`] with its IP, which goes to the proxies' route table as it is (no
//! Service); a ready pod that turns unready is reported [`EventKind::Hung`] within that watch
//! event, which takes it out of rotation. A container the kubelet restarts is reported
//! [`EventKind::Exited`] with `restarting: true` (the coordinator waits for its next `Ready`);
//! a pod that ends for good, or is deleted by someone else, with `restarting: false`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::{AsyncBufReadExt, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::{DeleteParams, ListParams, LogParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use tandem_coordinator::admin;
use tandem_coordinator::driver::{
    Driver, DriverError, Event, EventKind, Gate, InstanceDriver, Isolation, Prepared, Running,
};
use tandem_coordinator::local::{spec_hash, NpmOptions, POD_PORT};
use tandem_coordinator::logs::{parse_line, InstanceLog};
use tandem_coordinator::replica::{ExitReason, FlowState, ReplicaId};
use tandem_coordinator::spec::{Flows, ProcessSpec};

use crate::objects::{self, FLOWS_REV, SLOT, SPEC_HASH};
use crate::observe;

/// How the driver runs replicas on a cluster.
#[derive(Clone)]
pub struct KubeDriver {
    client: Client,
    /// The namespace of the instances' pods, ConfigMaps and Secrets.
    pub namespace: String,
    /// The Node-RED image repository; the tag is the stack's Node-RED version.
    pub image: String,
    /// How the editor's palette installs (a non-HA instance).
    pub npm: NpmOptions,
    /// The port Node-RED answers on in a pod ([`POD_PORT`]; tests change it).
    pub port: u16,
    /// How long a new pod has to become ready (its image pulled, Node-RED started) before its
    /// start counts as failed.
    pub ready_timeout: Duration,
    /// How long a replica's admin API has to answer a check.
    pub check_timeout: Duration,
}

impl KubeDriver {
    /// A driver on `client`'s cluster, in `namespace`.
    pub fn new(client: Client, namespace: impl Into<String>) -> Self {
        Self {
            client,
            namespace: namespace.into(),
            image: "nodered/node-red".into(),
            npm: NpmOptions::default(),
            port: POD_PORT,
            ready_timeout: Duration::from_secs(300),
            check_timeout: Duration::from_secs(2),
        }
    }
}

impl Driver for KubeDriver {
    type Instance = KubeInstance;

    fn open(
        &self,
        name: &str,
        log: Arc<InstanceLog>,
        events: mpsc::UnboundedSender<Event>,
    ) -> KubeInstance {
        let inner = Arc::new(Inner {
            name: name.to_owned(),
            driver: self.clone(),
            pods: Api::namespaced(self.client.clone(), &self.namespace),
            config_maps: Api::namespaced(self.client.clone(), &self.namespace),
            secrets: Api::namespaced(self.client.clone(), &self.namespace),
            log,
            events,
            state: Mutex::new(State::default()),
        });
        let watch = tokio::spawn(watch_pods(inner.clone()));
        KubeInstance { inner, watch }
    }
}

/// One instance's replicas on the cluster.
pub struct KubeInstance {
    inner: Arc<Inner>,
    watch: JoinHandle<()>,
}

impl Drop for KubeInstance {
    fn drop(&mut self) {
        self.watch.abort();
        for slot in self.inner.state().slots.values_mut() {
            slot.end_tasks();
        }
    }
}

struct Inner {
    name: String,
    driver: KubeDriver,
    pods: Api<Pod>,
    config_maps: Api<ConfigMap>,
    secrets: Api<Secret>,
    log: Arc<InstanceLog>,
    events: mpsc::UnboundedSender<Event>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The slots the coordinator started and has not stopped.
    slots: HashMap<u32, Slot>,
    /// The newest reading of each slot's pod, as the watch saw it (also of slots not started
    /// yet: a restarted Tandem's `start` adopts from it).
    seen: HashMap<u32, Pod>,
}

/// What the driver knows of a slot it runs.
struct Slot {
    run: u64,
    admin_secret: String,
    /// Adopted from before (not created by this start).
    adopted: bool,
    /// Adopted, and started for another spec.
    stale: bool,
    flows_rev: Option<String>,
    /// What was last reported: where it was ready, if it was.
    reported: Reported,
    /// The container restarts already reported.
    restarts: u32,
    /// Stopping or fencing: the pod's end is the driver's doing, not an event.
    leaving: bool,
    /// The log stream, and the container restart it follows.
    logs: Option<(u32, JoinHandle<()>)>,
    /// The deadline of a start that has not been ready yet.
    deadline: Option<JoinHandle<()>>,
    /// The ready check in flight (it asks the replica its flow state).
    announcing: Option<JoinHandle<()>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reported {
    /// Nothing since the start (or the last exit).
    Nothing,
    /// Ready at this address.
    Ready(SocketAddr),
    /// Was ready, is not.
    Unready,
    /// Ended for good.
    Ended,
}

impl Slot {
    fn end_tasks(&mut self) {
        for task in [
            self.logs.take().map(|(_, t)| t),
            self.deadline.take(),
            self.announcing.take(),
        ]
        .into_iter()
        .flatten()
        {
            task.abort();
        }
    }
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while the lock was held leaves plain data behind, still usable.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn id(&self, slot: u32) -> ReplicaId {
        ReplicaId::new(&self.name, slot)
    }

    fn send(&self, slot: u32, run: u64, kind: EventKind) {
        let _ = self.events.send(Event { slot, run, kind });
    }

    fn api_error(&self, slot: u32, doing: &str, e: kube::Error) -> DriverError {
        DriverError::Admin {
            id: self.id(slot),
            reason: format!("Kubernetes API: {doing}: {e}"),
        }
    }

    /// Where the running replica in `slot` answers, and its admin secret.
    fn running(&self, slot: u32) -> Result<(SocketAddr, String), DriverError> {
        let state = self.state();
        match state.slots.get(&slot) {
            Some(Slot {
                reported: Reported::Ready(addr),
                admin_secret,
                ..
            }) => Ok((*addr, admin_secret.clone())),
            _ => Err(DriverError::NotRunning(self.id(slot))),
        }
    }

    /// Reacts to a reading of `slot`'s pod (from the watch, or a start that adopts it).
    fn observe(self: &Arc<Self>, slot: u32, pod: &Pod) {
        let reading = observe::read(pod, self.driver.port);
        let mut state = self.state();
        let Some(s) = state.slots.get_mut(&slot) else {
            return;
        };
        if s.leaving {
            return;
        }
        let run = s.run;
        // The container restarted: its end is an exit the kubelet takes care of.
        if reading.restarts > s.restarts {
            s.restarts = reading.restarts;
            let reason = reading
                .last_exit
                .clone()
                .unwrap_or_else(|| ExitReason::Gone("the container restarted".into()));
            if let Some(t) = s.announcing.take() {
                t.abort();
            }
            s.reported = Reported::Nothing;
            self.send(
                slot,
                run,
                EventKind::Exited {
                    reason,
                    restarting: true,
                },
            );
        }
        if let Some(reason) = reading.ended.clone() {
            if s.reported != Reported::Ended {
                s.reported = Reported::Ended;
                s.end_tasks();
                self.send(
                    slot,
                    run,
                    EventKind::Exited {
                        reason,
                        restarting: false,
                    },
                );
            }
            return;
        }
        if reading.running && s.logs.as_ref().map(|(r, _)| *r) != Some(reading.restarts) {
            // An adopted pod's first stream reads back what ran before Tandem's restart.
            let first_of_adopted = s.adopted && s.logs.is_none();
            if let Some((_, old)) = s.logs.take() {
                old.abort();
            }
            let follow = tokio::spawn(follow_log(self.clone(), slot, first_of_adopted));
            s.logs = Some((reading.restarts, follow));
        }
        match (reading.ready, s.reported) {
            (Some(addr), reported)
                if reported != Reported::Ready(addr) && s.announcing.is_none() =>
            {
                s.announcing = Some(tokio::spawn(announce(self.clone(), slot, run, addr)));
            }
            (None, Reported::Ready(_)) => {
                s.reported = Reported::Unready;
                // The readiness probe's failures: `failureThreshold` × `periodSeconds`.
                self.send(slot, run, EventKind::Hung { silent_ms: 2_000 });
            }
            _ => {}
        }
    }

    /// The pod of `slot` is gone (the watch saw it deleted).
    fn deleted(&self, slot: u32) {
        let mut state = self.state();
        state.seen.remove(&slot);
        let Some(s) = state.slots.get_mut(&slot) else {
            return;
        };
        if s.leaving || s.reported == Reported::Ended {
            return;
        }
        s.reported = Reported::Ended;
        s.end_tasks();
        let run = s.run;
        self.send(
            slot,
            run,
            EventKind::Exited {
                reason: ExitReason::Gone("its pod was deleted".into()),
                restarting: false,
            },
        );
    }

    /// Deletes `slot`'s pod (immediately for a fence) and its ConfigMap and Secret, and waits
    /// until the API reports the pod gone.
    async fn delete(&self, slot: u32, immediately: bool) -> Result<(), DriverError> {
        let name = objects::name(&self.id(slot));
        let params = if immediately {
            DeleteParams::default().grace_period(0)
        } else {
            DeleteParams::default()
        };
        match self.pods.delete(&name, &params).await {
            Ok(either) => {
                if let Some(pod) = either.left() {
                    self.gone(slot, &pod).await?;
                }
            }
            Err(e) if not_found(&e) => {}
            Err(e) => return Err(self.api_error(slot, "deleting the pod", e)),
        }
        let params = DeleteParams::default();
        match self.config_maps.delete(&name, &params).await {
            Ok(_) => {}
            Err(e) if not_found(&e) => {}
            Err(e) => return Err(self.api_error(slot, "deleting the ConfigMap", e)),
        }
        match self.secrets.delete(&name, &params).await {
            Ok(_) => {}
            Err(e) if not_found(&e) => {}
            Err(e) => return Err(self.api_error(slot, "deleting the Secret", e)),
        }
        self.state().seen.remove(&slot);
        Ok(())
    }

    /// Waits until the API reports `pod` deleted (gone, or replaced by another of its name).
    async fn gone(&self, slot: u32, pod: &Pod) -> Result<(), DriverError> {
        let (Some(uid), name) = (pod.uid(), pod.name_any()) else {
            return Ok(());
        };
        await_condition(self.pods.clone(), &name, conditions::is_deleted(&uid))
            .await
            .map(drop)
            .map_err(|e| DriverError::Admin {
                id: self.id(slot),
                reason: format!("waiting for pod {name} to be deleted: {e}"),
            })
    }

    /// Creates `obj`, or replaces the one of that name left from before.
    async fn upsert<K>(&self, api: &Api<K>, slot: u32, obj: K) -> Result<(), DriverError>
    where
        K: Resource<DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + serde::Serialize
            + std::fmt::Debug,
    {
        let kind = K::kind(&()).to_string();
        let pp = PostParams::default();
        match api.create(&pp, &obj).await {
            Ok(_) => Ok(()),
            Err(e) if conflict(&e) => {
                let name = obj.name_any();
                let mut obj = obj;
                let old = api
                    .get(&name)
                    .await
                    .map_err(|e| self.api_error(slot, &format!("reading the {kind}"), e))?;
                if !objects::owned(&old) {
                    return Err(self.not_ours(slot, &kind, &name));
                }
                obj.meta_mut().resource_version = old.resource_version();
                api.replace(&name, &pp, &obj)
                    .await
                    .map(drop)
                    .map_err(|e| self.api_error(slot, &format!("replacing the {kind}"), e))
            }
            Err(e) => Err(self.api_error(slot, &format!("creating the {kind}"), e)),
        }
    }
}

impl Inner {
    /// An object with a replica's name that Tandem did not make: never touched.
    fn not_ours(&self, slot: u32, kind: &str, name: &str) -> DriverError {
        DriverError::Admin {
            id: self.id(slot),
            reason: format!(
                "a {kind} named {name} exists in namespace {} and is not Tandem's (no label {}={}): Tandem does not touch it; rename or remove it",
                self.driver.namespace,
                objects::MANAGED_BY.0,
                objects::MANAGED_BY.1
            ),
        }
    }
}

fn not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

fn conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// The watch of the instance's pods, for as long as the instance is open: a watch that breaks
/// is resumed (kube-rs's watcher, with its backoff), relisting when it must.
async fn watch_pods(inner: Arc<Inner>) {
    let config = watcher::Config::default().labels(&objects::selector(&inner.name));
    let mut stream = watcher(inner.pods.clone(), config)
        .default_backoff()
        .boxed();
    loop {
        match stream.next().await {
            Some(Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod))) => {
                let Some(slot) = slot_of(&pod) else { continue };
                inner.state().seen.insert(slot, pod.clone());
                inner.observe(slot, &pod);
            }
            Some(Ok(watcher::Event::Delete(pod))) => {
                if let Some(slot) = slot_of(&pod) {
                    inner.deleted(slot);
                }
            }
            Some(Ok(watcher::Event::Init | watcher::Event::InitDone)) => {}
            Some(Err(e)) => {
                tracing::warn!(instance = %inner.name, error = %e, "the watch of the instance's pods broke; resuming");
            }
            None => return,
        }
    }
}

fn slot_of(pod: &Pod) -> Option<u32> {
    pod.labels().get(SLOT).and_then(|s| s.parse().ok())
}

/// Reports a pod that turned ready, once it told its flow state (what `Ready` carries).
async fn announce(inner: Arc<Inner>, slot: u32, run: u64, addr: SocketAddr) {
    let secret = match inner.state().slots.get(&slot) {
        Some(s) => s.admin_secret.clone(),
        None => return,
    };
    let flows = loop {
        match admin::flow_state(addr, &secret, inner.driver.check_timeout).await {
            Ok(state) if state == "start" => break FlowState::Started,
            Ok(_) => break FlowState::Stopped,
            // Ready to the kubelet a moment before it answers Tandem: ask again.
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let mut state = inner.state();
    let Some(s) = state.slots.get_mut(&slot).filter(|s| s.run == run) else {
        return;
    };
    s.announcing = None;
    if let Some(t) = s.deadline.take() {
        t.abort();
    }
    s.reported = Reported::Ready(addr);
    let running = Running {
        addr,
        pid: None,
        adopted: s.adopted,
        flows,
        flows_rev: s.flows_rev.clone(),
        stale: s.stale,
        isolation: Isolation::Container,
        start: Some(tandem_coordinator::driver::Start::Cold { reason: None }),
    };
    inner.send(slot, run, EventKind::Ready(running));
}

/// Follows the log of `slot`'s container as it runs now (a restarted container's anew), each
/// line an entry tagged with the replica. An adopted pod's log is read from its last 1,000
/// lines: the lines before Tandem's restart are not in its memory any more.
async fn follow_log(inner: Arc<Inner>, slot: u32, adopted: bool) {
    let id = inner.id(slot);
    let src = id.to_string();
    let params = LogParams {
        follow: true,
        container: Some("node-red".into()),
        tail_lines: adopted.then_some(1_000),
        ..LogParams::default()
    };
    let stream = match inner.pods.log_stream(&objects::name(&id), &params).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(replica = %src, error = %e, "cannot follow the pod's log");
            return;
        }
    };
    let mut lines = stream.lines();
    while let Ok(Some(line)) = lines.try_next().await {
        let now = tandem_coordinator::logs::now_ms();
        inner.log.push(parse_line(&line, &src, now));
    }
}

impl InstanceDriver for KubeInstance {
    /// Nothing to install on the cluster: the kubelet pulls the stack's image. The modules are
    /// installed by the pod's init container; the versions are the ones asked for (npm resolves
    /// ranges in the pod).
    async fn prepare(&self, spec: &ProcessSpec) -> Result<Prepared, DriverError> {
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
        let inner = &self.inner;
        let id = inner.id(slot);
        if spec.storage.is_none() {
            return Err(DriverError::Admin {
                id,
                reason: "the Kubernetes driver runs instances whose flows live in Tandem's store (`tandem serve` gives every instance its storage API)".into(),
            });
        }
        let hash = spec_hash(spec, slot, true);
        let name = objects::name(&id);
        let found = inner
            .pods
            .get_opt(&name)
            .await
            .map_err(|e| inner.api_error(slot, "reading the pod", e))?;
        // A pod on its way out cannot be adopted: wait for it to go, then start anew.
        let found = match found {
            Some(p) if p.metadata.deletion_timestamp.is_some() => {
                inner.gone(slot, &p).await?;
                None
            }
            other => other,
        };
        // Only Tandem's own pods are adopted; a pod of that name that is not Tandem's is left
        // alone, and the replica cannot start until it is renamed or removed.
        if let Some(p) = found.as_ref().filter(|p| !objects::owned(*p)) {
            return Err(inner.not_ours(slot, "Pod", &p.name_any()));
        }
        let adopted = found.is_some();
        let (stale, flows_rev) = match &found {
            Some(p) => (
                p.annotations().get(SPEC_HASH) != Some(&hash),
                p.annotations().get(FLOWS_REV).cloned(),
            ),
            None => (false, Some(flows.rev.clone())),
        };
        let restarts = found
            .as_ref()
            .map_or(0, |p| observe::read(p, inner.driver.port).restarts);
        {
            let mut state = inner.state();
            if let Some(mut old) = state.slots.remove(&slot) {
                old.end_tasks();
            }
            state.slots.insert(
                slot,
                Slot {
                    run,
                    admin_secret: spec.admin_secret.clone(),
                    adopted,
                    stale,
                    flows_rev,
                    reported: Reported::Nothing,
                    restarts,
                    leaving: false,
                    logs: None,
                    deadline: None,
                    announcing: None,
                },
            );
        }
        if let Some(pod) = found {
            inner.observe(slot, &pod);
            return Ok(());
        }
        inner
            .upsert(
                &inner.config_maps,
                slot,
                objects::config_map(spec, &id, &inner.driver.npm),
            )
            .await?;
        inner
            .upsert(&inner.secrets, slot, objects::secret(spec, &id))
            .await?;
        let pod = objects::pod(
            spec,
            &id,
            &inner.driver.image,
            &inner.driver.npm,
            &hash,
            &flows.rev,
        );
        inner
            .pods
            .create(&PostParams::default(), &pod)
            .await
            .map_err(|e| inner.api_error(slot, "creating the pod", e))?;
        // A pod that never gets ready (an image that cannot be pulled, a node without room)
        // is a failed start, and is deleted so that the next start makes a new one.
        let deadline = tokio::spawn({
            let inner = inner.clone();
            let timeout = inner.driver.ready_timeout;
            async move {
                tokio::time::sleep(timeout).await;
                let why = inner
                    .state()
                    .seen
                    .get(&slot)
                    .and_then(observe::waiting_reason)
                    .unwrap_or_else(|| "no reason given".into());
                {
                    let mut state = inner.state();
                    match state.slots.get_mut(&slot) {
                        Some(s) if s.run == run && s.reported == Reported::Nothing => {
                            s.leaving = true;
                            s.deadline = None;
                        }
                        _ => return,
                    }
                }
                let _ = inner.delete(slot, true).await;
                inner.state().slots.remove(&slot);
                inner.send(
                    slot,
                    run,
                    EventKind::Exited {
                        reason: ExitReason::StartFailed(format!(
                            "the pod was not ready within {timeout:?}: {why}"
                        )),
                        restarting: false,
                    },
                );
            }
        });
        if let Some(s) = inner.state().slots.get_mut(&slot) {
            s.deadline = Some(deadline);
        }
        Ok(())
    }

    async fn stop(&self, slot: u32) -> Result<(), DriverError> {
        self.leave(slot);
        self.inner.delete(slot, false).await?;
        self.forget(slot);
        Ok(())
    }

    async fn fence(&self, slot: u32) -> Result<(), DriverError> {
        let run = self.leave(slot);
        self.inner.delete(slot, true).await?;
        self.forget(slot);
        if let Some(run) = run {
            self.inner.send(slot, run, EventKind::Fenced);
        }
        Ok(())
    }

    async fn check(&self, slot: u32) -> Result<(), DriverError> {
        let (addr, secret) = self.inner.running(slot)?;
        admin::check(
            &self.inner.id(slot),
            addr,
            &secret,
            self.inner.driver.check_timeout,
        )
        .await
    }

    async fn deploy(&self, slot: u32, flows: &Flows, gate: &Gate) -> Result<(), DriverError> {
        let (addr, secret) = self.inner.running(slot)?;
        let id = self.inner.id(slot);
        let lines = self.inner.log.subscribe();
        admin::push_flows(&id, addr, &secret, flows).await?;
        if let Some(s) = self.inner.state().slots.get_mut(&slot) {
            s.flows_rev = Some(flows.rev.clone());
        }
        admin::gate(&id, addr, &secret, lines, flows, gate).await
    }

    async fn set_flows(&self, slot: u32, state: FlowState) -> Result<(), DriverError> {
        let (addr, secret) = self.inner.running(slot)?;
        admin::set_flows(&self.inner.id(slot), addr, &secret, state).await
    }

    async fn remove(&self) -> Result<(), DriverError> {
        let inner = &self.inner;
        let lp = ListParams::default().labels(&objects::selector(&inner.name));
        let dp = DeleteParams::default();
        let failed = |what: &str, e: kube::Error| DriverError::Admin {
            id: inner.id(0),
            reason: format!("Kubernetes API: deleting the instance's {what}: {e}"),
        };
        inner
            .pods
            .delete_collection(&dp, &lp)
            .await
            .map_err(|e| failed("pods", e))?;
        inner
            .config_maps
            .delete_collection(&dp, &lp)
            .await
            .map_err(|e| failed("ConfigMaps", e))?;
        inner
            .secrets
            .delete_collection(&dp, &lp)
            .await
            .map_err(|e| failed("Secrets", e))?;
        Ok(())
    }
}

impl KubeInstance {
    /// Marks `slot` as leaving (its end is the driver's doing); its run, if it was started.
    fn leave(&self, slot: u32) -> Option<u64> {
        let mut state = self.inner.state();
        state.slots.get_mut(&slot).map(|s| {
            s.leaving = true;
            if let Some(t) = s.deadline.take() {
                t.abort();
            }
            if let Some(t) = s.announcing.take() {
                t.abort();
            }
            s.run
        })
    }

    /// Forgets `slot` once its pod is gone; its log stream ends with the container.
    fn forget(&self, slot: u32) {
        if let Some(mut s) = self.inner.state().slots.remove(&slot) {
            s.end_tasks();
        }
    }
}
