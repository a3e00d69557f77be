//! What the coordinator sees of every instance, written by the instances' workers and read by
//! the control plane (status, metrics); every change is published to the data plane.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use crate::dataplane::{DataPlane, InstanceRoutes, RouteReplica, Serving};
use crate::driver::Isolation;
use crate::replica::{ReplicaId, ReplicaPhase};
use crate::spec::DesiredState;
use crate::status::{DeployRefusal, InstanceState, ObservedStatus, ReplicaStatus};

/// One instance, as its worker last saw it.
#[derive(Debug, Clone)]
pub(crate) struct InstanceView {
    pub name: String,
    /// The admin secret, added by the proxy to editor requests it lets through.
    pub secret: String,
    pub hosts: Vec<String>,
    pub ha: bool,
    pub standby: bool,
    pub affinity: bool,
    pub http_auth: crate::proxy::HttpAuth,
    /// Its own certificate, for the proxies.
    pub certificate: Option<crate::proxy::tls::PemKeyPair>,
    /// It should run but sleeps.
    pub asleep: bool,
    pub desired: DesiredState,
    /// Replicas wanted (0 unless running).
    pub want: u32,
    pub phase: Phase,
    pub replicas: BTreeMap<u32, ReplicaView>,
    /// Standby mode: the replica whose flows run.
    pub active: Option<u32>,
    /// The flows revision whose deploy failed its health gate, and why: deployed nowhere more.
    pub refused: Option<(String, String)>,
    /// The module versions installed for the runtime.
    pub modules: BTreeMap<String, String>,
}

/// Where an instance's runtime is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Phase {
    Ready,
    Installing,
    Failed(String),
}

/// One replica, as its worker last saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ReplicaView {
    pub phase: ReplicaPhase,
    /// Where it listens, while it runs.
    pub addr: Option<SocketAddr>,
    pub pid: Option<u32>,
    pub restarts: u64,
    pub last_exit: Option<String>,
    pub since: i64,
    pub isolation: Option<Isolation>,
    /// How its process came to be (a warm runtime or a cold start).
    pub start: Option<crate::driver::Start>,
    /// Its flows run (or may: asked to start and not known stopped).
    pub flows: bool,
    /// The revision of the flows it runs, when known.
    pub flows_rev: Option<String>,
    /// Deploying, taken out of rotation (another replica serves meanwhile).
    pub out: bool,
    /// Why the last deploy to it failed.
    pub deploy_error: Option<String>,
    /// It runs the instance's current process spec (settings, environment, modules, stack).
    pub current: bool,
}

impl ReplicaView {
    /// It serves: running, or getting new flows in place.
    fn serves(&self) -> bool {
        self.phase == ReplicaPhase::Running || (self.phase == ReplicaPhase::Deploying && !self.out)
    }
}

/// Every instance's view, and where routes go.
pub(crate) struct Observed {
    instances: Mutex<HashMap<String, InstanceView>>,
    plane: Arc<dyn DataPlane>,
}

impl Observed {
    pub fn new(plane: Arc<dyn DataPlane>) -> Self {
        Self {
            instances: Mutex::new(HashMap::new()),
            plane,
        }
    }

    pub fn plane(&self) -> &Arc<dyn DataPlane> {
        &self.plane
    }

    /// Records `view` as instance `id`'s, and publishes the routes when its routes changed.
    pub fn set(&self, id: &str, view: InstanceView) {
        let Ok(mut map) = self.instances.lock() else {
            return;
        };
        let reroute = map
            .get(id)
            .is_none_or(|old| routes_of(old) != routes_of(&view));
        map.insert(id.to_owned(), view);
        if reroute {
            self.publish(&map);
        }
    }

    /// Forgets instance `id` (deleted, or Tandem stops).
    pub fn forget(&self, id: &str) {
        if let Ok(mut map) = self.instances.lock() {
            if map.remove(id).is_some() {
                self.publish(&map);
            }
        }
    }

    fn publish(&self, map: &HashMap<String, InstanceView>) {
        let mut all: Vec<InstanceRoutes> = map.values().filter_map(routes_of).collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        self.plane.publish(&all);
    }

    /// The observed state of instance `id`.
    pub fn status(&self, id: &str) -> ObservedStatus {
        let Some(o) = self.instances.lock().ok().and_then(|m| m.get(id).cloned()) else {
            return ObservedStatus::unknown();
        };
        let ready = o.replicas.values().filter(|r| r.serves()).count() as u32;
        let crashed = o
            .replicas
            .values()
            .find(|r| r.phase == ReplicaPhase::Crashed);
        let stopping = !o.replicas.is_empty();
        let (state, reason) = match (o.desired, &o.phase) {
            (DesiredState::Running, _) if o.asleep && stopping => (InstanceState::Stopping, None),
            (DesiredState::Running, _) if o.asleep => (InstanceState::Sleeping, None),
            (DesiredState::Stopped | DesiredState::Suspended, _) if stopping => {
                (InstanceState::Stopping, None)
            }
            (DesiredState::Stopped, _) => (InstanceState::Stopped, None),
            (DesiredState::Suspended, _) => (InstanceState::Suspended, None),
            (DesiredState::Running, Phase::Installing) => (InstanceState::Installing, None),
            (DesiredState::Running, Phase::Failed(why)) => {
                (InstanceState::Crashed, Some(why.clone()))
            }
            (DesiredState::Running, Phase::Ready) => {
                if ready >= o.want && ready > 0 {
                    (InstanceState::Running, None)
                } else if ready > 0 {
                    (
                        InstanceState::Degraded,
                        crashed.and_then(|r| r.last_exit.clone()),
                    )
                } else if let Some(r) = crashed {
                    (InstanceState::Crashed, r.last_exit.clone())
                } else {
                    (InstanceState::Starting, None)
                }
            }
        };
        ObservedStatus {
            state,
            ready,
            desired: o.want,
            summary: if o.desired == DesiredState::Running && !o.asleep {
                format!("{} {ready}/{}", state.as_str(), o.want)
            } else {
                state.as_str().to_owned()
            },
            reason,
            replicas: o
                .replicas
                .iter()
                .map(|(slot, r)| ReplicaStatus {
                    id: ReplicaId::new(&o.name, *slot).to_string(),
                    slot: *slot,
                    state: r.phase,
                    port: r.addr.map(|a| a.port()),
                    pid: r.pid,
                    restarts: r.restarts,
                    last_exit: r.last_exit.clone(),
                    since: r.since,
                    active: r.serves() && (!o.standby || o.active == Some(*slot)),
                    isolation: r.isolation,
                    start: r.start.clone(),
                    flows_rev: r.flows_rev.clone(),
                    deploy_error: r.deploy_error.clone(),
                    current: r.current,
                })
                .collect(),
            deploy_refused: o.refused.map(|(rev, reason)| DeployRefusal { rev, reason }),
            modules: o.modules,
            isolation: o
                .replicas
                .values()
                .filter_map(|r| r.isolation)
                .reduce(|a, b| if a == Isolation::None { a } else { b }),
        }
    }

    /// `tandem_instance_*` and `tandem_replica_*` series, one per instance and replica.
    pub fn metrics(&self) -> String {
        let Ok(map) = self.instances.lock() else {
            return String::new();
        };
        let mut list: Vec<&InstanceView> = map.values().filter(|o| !o.name.is_empty()).collect();
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
            let ready = o.replicas.values().filter(|r| r.serves()).count();
            let _ = writeln!(
                out,
                "tandem_instance_ready_replicas{{instance=\"{}\"}} {ready}",
                o.name
            );
        }
        out.push_str("# HELP tandem_replica_up Whether a replica is running (1) or in another phase (0), labelled with its phase.\n# TYPE tandem_replica_up gauge\n");
        for o in &list {
            for (slot, r) in &o.replicas {
                let up = u8::from(r.phase == ReplicaPhase::Running);
                let _ = writeln!(
                    out,
                    "tandem_replica_up{{instance=\"{}\",replica=\"{}\",state=\"{}\"}} {up}",
                    o.name,
                    ReplicaId::new(&o.name, *slot),
                    r.phase
                );
            }
        }
        out.push_str("# HELP tandem_replica_restarts_total Restarts of a replica since Tandem started it.\n# TYPE tandem_replica_restarts_total counter\n");
        for o in &list {
            for (slot, r) in &o.replicas {
                let _ = writeln!(
                    out,
                    "tandem_replica_restarts_total{{instance=\"{}\",replica=\"{}\"}} {}",
                    o.name,
                    ReplicaId::new(&o.name, *slot),
                    r.restarts
                );
            }
        }
        out
    }
}

/// What the data plane gets of an instance: in balanced mode every replica with an address,
/// ready only while running; in standby mode the active one, and any draining.
fn routes_of(o: &InstanceView) -> Option<InstanceRoutes> {
    if o.name.is_empty() || o.hosts.is_empty() {
        return None;
    }
    let replicas = o
        .replicas
        .iter()
        .filter_map(|(slot, r)| {
            let serving = match r.phase {
                // A replica whose flows are stopped answers 404 on its flows' routes.
                ReplicaPhase::Deploying if r.out => Serving::Draining,
                _ if r.serves() && o.standby && o.active == Some(*slot) => Serving::Ready,
                _ if r.serves() && !o.standby && r.flows => Serving::Ready,
                ReplicaPhase::Draining => Serving::Draining,
                _ if o.standby => return None,
                _ => Serving::Unready,
            };
            Some(RouteReplica {
                id: ReplicaId::new(&o.name, *slot),
                addr: r.addr?,
                serving,
            })
        })
        .collect();
    // Only while a replica is about to serve (starting, a standby being promoted, one getting
    // its flows, one stopped for its replacement): not when nothing is coming (stopped, failed,
    // every replica crashed or waiting out its restart backoff), where a request is better
    // answered 503 at once.
    // A sleeping instance holds requests too: the first one wakes it.
    let hold = (o.desired == DesiredState::Running && o.asleep)
        || o.desired == DesiredState::Running
            && o.want > 0
            && o.phase == Phase::Ready
            && o.replicas.values().any(|r| {
                matches!(
                    r.phase,
                    ReplicaPhase::Starting
                        | ReplicaPhase::Running
                        | ReplicaPhase::Draining
                        | ReplicaPhase::Deploying
                        | ReplicaPhase::Stopping
                )
            });
    Some(InstanceRoutes {
        name: o.name.clone(),
        hosts: o.hosts.clone(),
        ha: o.ha,
        affinity: o.affinity,
        http_auth: o.http_auth,
        certificate: o.certificate.clone(),
        asleep: o.asleep,
        editor_secret: o.secret.clone(),
        hold,
        replicas,
    })
}
