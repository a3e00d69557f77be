//! The seam between the coordinator and the proxies that carry instances' traffic: the
//! coordinator publishes routes and replica states, and asks when a replica it takes out of
//! rotation has no request in flight. It never reads a proxy's tables or counters itself, so a
//! proxy can run in this process ([`InProcess`]) or, later, in another one.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tandem_proxy::routes::feed::{self, FeedInstance, FeedReplica, FeedTable};
use tandem_proxy::Routes;
use tokio::sync::{broadcast, mpsc};

use crate::replica::ReplicaId;

/// Whether a replica takes requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serving {
    /// In rotation.
    Ready,
    /// Out of rotation for new requests; those in flight finish.
    Draining,
    /// Out of rotation: starting, or hung.
    Unready,
}

/// One replica in the routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteReplica {
    /// Its id.
    pub id: ReplicaId,
    /// Where it listens.
    pub addr: std::net::SocketAddr,
    /// Whether it takes requests.
    pub serving: Serving,
}

/// One instance in the routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceRoutes {
    /// Its name.
    pub name: String,
    /// The host names it is served at.
    pub hosts: Vec<String>,
    /// HA: the editor is blocked.
    pub ha: bool,
    /// Clients stay on their replica (a cookie).
    pub affinity: bool,
    /// The admin secret, which the proxy adds to editor requests it lets through.
    pub editor_secret: String,
    /// Who may call its own endpoints.
    pub http_auth: crate::proxy::HttpAuth,
    /// Its own certificate (its custom hostname's), for HTTPS listeners.
    pub certificate: Option<crate::proxy::tls::PemKeyPair>,
    /// It sleeps: a request wakes it (and waits, as `hold` is set).
    pub asleep: bool,
    /// It should serve, and a replica is expected to be ready whenever none is (a takeover, a
    /// deploy's switch, a start): the proxy holds requests for a while rather than answer 503.
    pub hold: bool,
    /// Its replicas that have an address, in slot order.
    pub replicas: Vec<RouteReplica>,
}

/// A future the data plane resolves.
pub type Pending = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A proxy took a replica out of rotation (its probes failed, or a connect to it failed), or put
/// it back. The coordinator checks a replica the proxy gives up on at once, rather than at its
/// next liveness check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The replica.
    pub replica: ReplicaId,
    /// Back in rotation (true) or out (false).
    pub healthy: bool,
    /// What failed.
    pub reason: String,
}

/// Where the coordinator publishes routes.
pub trait DataPlane: Send + Sync + 'static {
    /// Replaces the whole table. An instance with no replica stays, so its host answers 503
    /// rather than 404.
    fn publish(&self, instances: &[InstanceRoutes]);
    /// Resolves once no request is in flight to `replica` (published as draining or removed).
    fn drained(&self, replica: &ReplicaId) -> Pending;
    /// Sends the proxies' verdicts on replicas to `to` from now on.
    fn verdicts(&self, to: mpsc::UnboundedSender<Verdict>);
}

/// The proxy of this process (`tandem serve`): its route table.
#[derive(Debug, Clone)]
pub struct InProcess(pub Arc<Routes>);

/// The routes as a proxy takes them, in the route feed's terms (the feed of standalone proxies
/// carries exactly these).
pub fn feed_instances(instances: &[InstanceRoutes]) -> Vec<FeedInstance> {
    instances
        .iter()
        .map(|i| FeedInstance {
            name: i.name.clone(),
            hosts: i.hosts.clone(),
            ha: i.ha,
            affinity: i.affinity,
            hold: i.hold,
            editor_secret: i.editor_secret.clone(),
            http_auth: i.http_auth,
            certificate: i.certificate.clone(),
            asleep: i.asleep,
            replicas: i
                .replicas
                .iter()
                .map(|r| FeedReplica {
                    id: r.id.to_string(),
                    addr: r.addr,
                    serving: match r.serving {
                        Serving::Ready => feed::Serving::Ready,
                        Serving::Draining => feed::Serving::Draining,
                        Serving::Unready => feed::Serving::Unready,
                    },
                })
                .collect(),
        })
        .collect()
}

impl DataPlane for InProcess {
    fn publish(&self, instances: &[InstanceRoutes]) {
        let specs = FeedTable {
            generation: 0,
            instances: feed_instances(instances),
            mqtt: Vec::new(),
        }
        .specs();
        if let Err(e) = self.0.publish(&specs) {
            tracing::error!(error = %e, "cannot publish the route table");
        }
    }

    fn verdicts(&self, to: mpsc::UnboundedSender<Verdict>) {
        let mut from = self.0.verdicts();
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            loop {
                let v = match from.recv().await {
                    Ok(v) => v,
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                // Replicas of routes this coordinator did not publish have other ids.
                let Some(replica) = ReplicaId::parse(&v.replica) else {
                    continue;
                };
                if replica.instance != *v.instance {
                    continue;
                }
                let verdict = Verdict {
                    replica,
                    healthy: v.healthy,
                    reason: v.reason,
                };
                if to.send(verdict).is_err() {
                    return;
                }
            }
        });
    }

    fn drained(&self, replica: &ReplicaId) -> Pending {
        let routes = self.0.clone();
        let (name, id) = (replica.instance.clone(), replica.to_string());
        Box::pin(async move {
            loop {
                let busy = routes.load().instances().iter().any(|i| {
                    *i.name == *name
                        && i.replicas
                            .iter()
                            .any(|r| *r.id == *id && r.state.in_flight() > 0)
                });
                if !busy {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    }
}
