//! The route feed of standalone proxies (issue 13): the table the coordinator publishes, kept
//! for every proxy that follows `GET /api/v1/routes`, and what the proxies report back (their
//! presence, the generation they serve, requests in flight to replicas out of rotation).
//!
//! [`FeedDataPlane`] is the coordinator's data plane in `tandem serve`: it publishes to the
//! in-process proxy (unless `--no-proxy`) and to the feed, and a replica is drained once the
//! in-process proxy and every connected proxy have no request in flight to it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_coordinator::dataplane::{DataPlane, InProcess, InstanceRoutes, Pending, Verdict};
use tandem_coordinator::replica::ReplicaId;
use tandem_proxy::control::Report;
use tandem_proxy::routes::feed::FeedTable;
use tokio::sync::{mpsc, watch};

/// A proxy that has not reported for this long is gone: drains no longer wait for it.
pub const PROXY_TTL: Duration = Duration::from_secs(3);

/// A proxy as its reports show it.
#[derive(Debug, Clone)]
pub struct Presence {
    /// Where it takes requests.
    pub address: String,
    /// The generation of the table it serves.
    pub generation: u64,
    /// Requests in flight to replicas out of rotation.
    pub in_flight: HashMap<String, u64>,
    /// Its last report.
    pub last_seen: Instant,
    /// The same, epoch ms.
    pub last_seen_ms: i64,
}

/// The table and the proxies following it.
#[derive(Debug)]
pub struct RouteFeed {
    table: watch::Sender<Arc<FeedTable>>,
    proxies: Mutex<HashMap<String, Presence>>,
    /// When each instance was last used through a standalone proxy, epoch ms (their reports).
    activity: Mutex<HashMap<String, u64>>,
    /// Set when Tandem stops: open feeds end, so the API's graceful shutdown does not wait for
    /// the proxies to hang up.
    closed: watch::Sender<bool>,
}

impl Default for RouteFeed {
    fn default() -> Self {
        Self::new()
    }
}

impl RouteFeed {
    /// An empty table. Its generation starts at the clock's milliseconds, so a restarted control
    /// plane's tables are newer than its predecessor's, which its proxies may still report.
    pub fn new() -> Self {
        let start = u64::try_from(crate::store::now_ms()).unwrap_or(1);
        Self {
            table: watch::channel(Arc::new(FeedTable {
                generation: start,
                instances: Vec::new(),
                mqtt: Vec::new(),
            }))
            .0,
            proxies: Mutex::default(),
            activity: Mutex::default(),
            closed: watch::channel(false).0,
        }
    }

    /// Ends every open feed (Tandem is stopping); proxies keep serving and reconnect.
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    /// Resolves once [`RouteFeed::close`] was called.
    pub fn closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.closed.subscribe();
        async move {
            let _ = rx.wait_for(|c| *c).await;
        }
    }

    /// Publishes the coordinator's routes: a new generation when they changed.
    pub fn publish(&self, instances: &[InstanceRoutes]) {
        let instances = tandem_coordinator::dataplane::feed_instances(instances);
        self.table.send_if_modified(|t| {
            if t.instances == instances {
                return false;
            }
            *t = Arc::new(FeedTable {
                generation: t.generation + 1,
                instances,
                mqtt: t.mqtt.clone(),
            });
            true
        });
    }

    /// Publishes the MQTT identities of the running instances' replicas (for the proxies'
    /// shared MQTT listeners): a new generation when they changed.
    pub fn set_mqtt(&self, mqtt: Vec<tandem_proxy::routes::feed::FeedMqtt>) {
        self.table.send_if_modified(|t| {
            if t.mqtt == mqtt {
                return false;
            }
            *t = Arc::new(FeedTable {
                generation: t.generation + 1,
                instances: t.instances.clone(),
                mqtt,
            });
            true
        });
    }

    /// The current table, then every new one.
    pub fn subscribe(&self) -> watch::Receiver<Arc<FeedTable>> {
        self.table.subscribe()
    }

    /// The current generation.
    pub fn generation(&self) -> u64 {
        self.table.borrow().generation
    }

    /// Records a proxy's report.
    pub fn report(&self, report: Report) {
        if let Ok(mut activity) = self.activity.lock() {
            for (name, at) in &report.active {
                let last = activity.entry(name.clone()).or_default();
                *last = (*last).max(*at);
            }
        }
        if let Ok(mut proxies) = self.proxies.lock() {
            proxies.insert(
                report.id,
                Presence {
                    address: report.address,
                    generation: report.generation,
                    in_flight: report.in_flight,
                    last_seen: Instant::now(),
                    last_seen_ms: crate::store::now_ms(),
                },
            );
        }
    }

    /// When `instance` was last used through a standalone proxy, epoch ms (0: never reported).
    pub fn last_active(&self, instance: &str) -> u64 {
        self.activity
            .lock()
            .ok()
            .and_then(|a| a.get(instance).copied())
            .unwrap_or(0)
    }

    /// The proxies that reported within [`PROXY_TTL`], by id; older ones are forgotten.
    pub fn proxies(&self) -> Vec<(String, Presence)> {
        let Ok(mut proxies) = self.proxies.lock() else {
            return Vec::new();
        };
        proxies.retain(|_, p| p.last_seen.elapsed() < PROXY_TTL);
        let mut out: Vec<(String, Presence)> = proxies
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Resolves once every connected proxy serves a table at least as new as the current one
    /// (where `replica` is out of rotation) and has reported, since this call, no request in
    /// flight to it. The coordinator's drain deadline bounds the wait.
    pub fn drained(self: &Arc<Self>, replica: &ReplicaId) -> Pending {
        let (feed, id) = (self.clone(), replica.to_string());
        let (mark, since) = (self.generation(), Instant::now());
        Box::pin(async move {
            loop {
                let done = feed.proxies().iter().all(|(_, p)| {
                    p.generation >= mark
                        && p.last_seen > since
                        && p.in_flight.get(&id).copied().unwrap_or(0) == 0
                });
                if done {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    }
}

/// The coordinator's data plane in `tandem serve`: the in-process proxy, if any, and the feed.
#[derive(Debug, Clone)]
pub struct FeedDataPlane {
    /// The proxy of this process; `None` with `--no-proxy`.
    pub local: Option<InProcess>,
    /// The standalone proxies' feed.
    pub feed: Arc<RouteFeed>,
}

impl DataPlane for FeedDataPlane {
    fn publish(&self, instances: &[InstanceRoutes]) {
        if let Some(local) = &self.local {
            local.publish(instances);
        }
        self.feed.publish(instances);
    }

    fn drained(&self, replica: &ReplicaId) -> Pending {
        let local = self.local.as_ref().map(|l| l.drained(replica));
        let remote = self.feed.drained(replica);
        Box::pin(async move {
            if let Some(local) = local {
                local.await;
            }
            remote.await;
        })
    }

    /// The in-process proxy's verdicts. Standalone proxies keep theirs: the coordinator's own
    /// liveness checks find a dead replica within moments anyway.
    fn verdicts(&self, to: mpsc::UnboundedSender<Verdict>) {
        if let Some(local) = &self.local {
            local.verdicts(to);
        }
    }
}

#[cfg(test)]
mod tests {
    use tandem_coordinator::dataplane::Serving;

    use super::*;

    fn routes(serving: Serving) -> Vec<InstanceRoutes> {
        vec![InstanceRoutes {
            name: "a".into(),
            hosts: vec!["a.localhost".into()],
            ha: true,
            affinity: true,
            editor_secret: "s".into(),
            http_auth: Default::default(),
            certificate: None,
            asleep: false,
            hold: false,
            replicas: vec![tandem_coordinator::dataplane::RouteReplica {
                id: ReplicaId::new("a", 0),
                addr: "127.0.0.1:1".parse().unwrap(),
                serving,
            }],
        }]
    }

    fn report(generation: u64, in_flight: u64) -> Report {
        Report {
            id: "p1".into(),
            address: "127.0.0.1:8080".into(),
            generation,
            in_flight: if in_flight > 0 {
                HashMap::from([("a-r0".to_string(), in_flight)])
            } else {
                HashMap::new()
            },
            active: HashMap::new(),
        }
    }

    #[tokio::test]
    async fn a_drain_waits_for_every_proxy_to_serve_the_new_table_with_nothing_in_flight() {
        let feed = Arc::new(RouteFeed::new());
        feed.publish(&routes(Serving::Ready));
        let ready = feed.generation();
        feed.publish(&routes(Serving::Ready));
        assert_eq!(feed.generation(), ready, "no change, no new generation");
        // No proxy: drained at once.
        feed.drained(&ReplicaId::new("a", 0)).await;

        feed.report(report(ready, 0));
        feed.publish(&routes(Serving::Draining));
        let draining = feed.generation();
        assert_eq!(draining, ready + 1);
        let mut drained = feed.drained(&ReplicaId::new("a", 0));
        let poll = |d: &mut Pending| futures_util::FutureExt::now_or_never(d.as_mut()).is_some();
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(
            !poll(&mut drained),
            "the proxy still serves the older table"
        );
        feed.report(report(draining, 2));
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!poll(&mut drained), "two requests in flight");
        feed.report(report(draining, 0));
        tokio::time::timeout(Duration::from_secs(1), drained)
            .await
            .expect("drained once the proxy reports none");
        assert_eq!(feed.proxies().len(), 1);
    }
}
