//! Replica health: readiness from the owner of the routes, active probes, passive ejection.
//!
//! A replica takes new requests only while it is *available*: ready (its owner says so),
//! healthy by its active probes (or probes are off), and not ejected. Ejection is passive: a
//! connect error or connect timeout ejects the replica for a backoff period that doubles with
//! each ejection in a row (base and cap in [`crate::ProxyConfig`]); a successful request or probe
//! ends the streak. Times are `tokio::time` instants so the logic runs on paused time in tests.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http_body_util::Empty;
use hyper::Request;
use tokio::time::Instant;

use crate::metrics::ReplicaStats;
use crate::pool::Pool;
use crate::routes::RouteTable;

/// Active health check settings of an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    /// Path probed with `GET`; any response below 500 counts as healthy. Default `/`.
    pub path: String,
    /// Time between probes. Default 2 s.
    pub interval: Duration,
    /// Time a probe may take, connect included. Default 1 s.
    pub timeout: Duration,
    /// Consecutive successes that make an unhealthy replica healthy. Default 2.
    pub healthy_threshold: u32,
    /// Consecutive failures that make a healthy replica unhealthy. Default 2.
    pub unhealthy_threshold: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            path: "/".into(),
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            healthy_threshold: 2,
            unhealthy_threshold: 2,
        }
    }
}

impl HealthConfig {
    /// Says what is wrong, if anything.
    pub fn validate(&self) -> Result<(), String> {
        if !self.path.starts_with('/') || self.path.parse::<http::uri::PathAndQuery>().is_err() {
            return Err(format!(
                "health path {:?} must be an absolute path such as \"/\"",
                self.path
            ));
        }
        if self.interval.is_zero() || self.timeout.is_zero() {
            return Err("health interval and timeout must be greater than zero".into());
        }
        if self.healthy_threshold == 0 || self.unhealthy_threshold == 0 {
            return Err("health thresholds must be at least 1".into());
        }
        Ok(())
    }
}

/// Passive ejection backoff: the first ejection lasts `base`, each further one in a row twice as
/// long, up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EjectionPolicy {
    /// First ejection period. Default 1 s.
    pub base: Duration,
    /// Longest ejection period. Default 30 s.
    pub max: Duration,
}

impl Default for EjectionPolicy {
    fn default() -> Self {
        Self {
            base: Duration::from_secs(1),
            max: Duration::from_secs(30),
        }
    }
}

impl EjectionPolicy {
    /// The ejection period for the `n`th ejection in a row (1-based).
    pub fn period(&self, n: u32) -> Duration {
        let factor = 1u32 << n.saturating_sub(1).min(20);
        self.base.saturating_mul(factor).min(self.max)
    }
}

/// A change in a replica's health as the proxy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The instance's name.
    pub instance: Arc<str>,
    /// The replica's id.
    pub replica: Arc<str>,
    /// Passed its probes again (true), or failed them or a connect (false).
    pub healthy: bool,
    /// What failed, for logs.
    pub reason: String,
}

/// Where verdicts go: one channel per [`crate::Routes`], shared by its replicas.
#[derive(Debug, Clone)]
pub(crate) struct VerdictFeed(tokio::sync::broadcast::Sender<Verdict>);

impl VerdictFeed {
    pub(crate) fn new() -> Self {
        Self(tokio::sync::broadcast::channel(256).0)
    }

    pub(crate) fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Verdict> {
        self.0.subscribe()
    }

    /// Sends a verdict; nobody listening is fine.
    pub(crate) fn send(&self, verdict: Verdict) {
        let _ = self.0.send(verdict);
    }
}

/// Everything the proxy knows about one replica, shared across route tables.
#[derive(Debug)]
pub struct ReplicaState {
    ready: AtomicBool,
    /// Health verdicts.
    pub health: Health,
    in_flight: AtomicUsize,
    pub(crate) pool: Pool,
    pub(crate) stats: ReplicaStats,
    probe_config: ArcSwapOption<HealthConfig>,
    probing: AtomicBool,
    pub(crate) verdicts: VerdictFeed,
}

impl ReplicaState {
    pub(crate) fn new(verdicts: VerdictFeed) -> Self {
        Self {
            verdicts,
            ready: AtomicBool::new(false),
            health: Health::new(),
            in_flight: AtomicUsize::new(0),
            pool: Pool::default(),
            stats: ReplicaStats::default(),
            probe_config: ArcSwapOption::empty(),
            probing: AtomicBool::new(false),
        }
    }

    /// Whether the owner of the routes lets this replica take traffic.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Ready, healthy and not ejected at `now`.
    pub fn is_available(&self, now: Instant) -> bool {
        self.is_ready() && self.health.is_healthy(now)
    }

    /// Requests sent to this replica whose responses have not finished.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub(crate) fn begin_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Applies what the owner of the routes published for this replica: readiness and the
    /// instance's probe settings. A replica whose probes were switched off is healthy by
    /// definition; one whose probes were switched on keeps its last verdict until its first
    /// probe.
    pub(crate) fn configure(&self, ready: bool, probes: Option<&HealthConfig>) {
        self.ready.store(ready, Ordering::Relaxed);
        if probes.is_none() {
            self.health.set_probed_healthy(true);
        }
        self.probe_config.store(probes.cloned().map(Arc::new));
    }

    /// The probe settings in force; `None` when probes are off.
    pub(crate) fn probe_config(&self) -> Option<Arc<HealthConfig>> {
        self.probe_config.load_full()
    }
}

/// Counts a request as in flight on a replica until dropped.
#[derive(Debug)]
pub(crate) struct InFlight(Arc<ReplicaState>);

impl InFlight {
    pub(crate) fn replica(&self) -> &Arc<ReplicaState> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Active and passive health of one replica.
#[derive(Debug)]
pub struct Health {
    epoch: Instant,
    probed_healthy: AtomicBool,
    ejected: AtomicBool,
    /// Milliseconds after `epoch` when the current ejection ends.
    ejected_until: AtomicU64,
    /// Ejections in a row without a success in between.
    streak: AtomicU32,
    ejections_total: AtomicU64,
}

impl Health {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            probed_healthy: AtomicBool::new(true),
            ejected: AtomicBool::new(false),
            ejected_until: AtomicU64::new(0),
            streak: AtomicU32::new(0),
            ejections_total: AtomicU64::new(0),
        }
    }

    fn millis(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    /// Healthy by probes and not ejected at `now`.
    pub fn is_healthy(&self, now: Instant) -> bool {
        self.probed_healthy.load(Ordering::Relaxed) && !self.is_ejected(now)
    }

    /// The verdict of the active probes (true when probes are off).
    pub fn probed_healthy(&self) -> bool {
        self.probed_healthy.load(Ordering::Relaxed)
    }

    pub(crate) fn set_probed_healthy(&self, healthy: bool) {
        self.probed_healthy.store(healthy, Ordering::Relaxed);
    }

    /// Whether a passive ejection is in force at `now`.
    pub fn is_ejected(&self, now: Instant) -> bool {
        self.ejected.load(Ordering::Relaxed)
            && self.millis(now) < self.ejected_until.load(Ordering::Relaxed)
    }

    /// Ejects the replica after a connect failure; returns the ejection period.
    pub fn eject(&self, now: Instant, policy: &EjectionPolicy) -> Duration {
        // Failures of requests that raced each other count once: a replica already ejected stays
        // ejected for the period it got.
        if self.is_ejected(now) {
            let left = self.ejected_until.load(Ordering::Relaxed) - self.millis(now);
            return Duration::from_millis(left);
        }
        let n = self.streak.fetch_add(1, Ordering::Relaxed) + 1;
        let period = policy.period(n);
        let until = self
            .millis(now)
            .saturating_add(u64::try_from(period.as_millis()).unwrap_or(u64::MAX));
        self.ejected_until.store(until, Ordering::Relaxed);
        self.ejected.store(true, Ordering::Relaxed);
        self.ejections_total.fetch_add(1, Ordering::Relaxed);
        period
    }

    /// A request or probe succeeded: the ejection streak ends.
    pub fn record_success(&self) {
        if self.streak.load(Ordering::Relaxed) != 0 || self.ejected.load(Ordering::Relaxed) {
            self.streak.store(0, Ordering::Relaxed);
            self.ejected.store(false, Ordering::Relaxed);
        }
    }

    /// Ejections since the replica appeared.
    pub fn ejections_total(&self) -> u64 {
        self.ejections_total.load(Ordering::Relaxed)
    }
}

/// Consecutive-result counter for active probes.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProbeCounter {
    successes: u32,
    failures: u32,
}

impl ProbeCounter {
    /// Records one probe result; returns the new verdict when it changes from `current`.
    pub fn record(&mut self, ok: bool, current: bool, cfg: &HealthConfig) -> Option<bool> {
        if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            (!current && self.successes >= cfg.healthy_threshold).then_some(true)
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            (current && self.failures >= cfg.unhealthy_threshold).then_some(false)
        }
    }
}

/// Starts the probe loop of `table.instances()[instance].replicas[replica]` unless one runs.
/// The loop ends by itself once the replica leaves the routes (its state is dropped) or its
/// instance turns probes off.
pub(crate) fn spawn_probe(
    rt: &tokio::runtime::Handle,
    table: &RouteTable,
    instance: usize,
    replica: usize,
) {
    let Some(inst) = table.instances().get(instance) else {
        return;
    };
    let Some(r) = inst.replicas.get(replica) else {
        return;
    };
    if inst.health.is_none() || r.state.probing.swap(true, Ordering::AcqRel) {
        return;
    }
    let state = Arc::downgrade(&r.state);
    let name = inst.name.clone();
    let id = r.id.clone();
    let addr = r.addr;
    let host = inst
        .hosts
        .first()
        .map(|h| h.to_string())
        .unwrap_or_default();
    rt.spawn(probe_loop(state, name, id, addr, host));
}

async fn probe_loop(
    state: Weak<ReplicaState>,
    instance: Arc<str>,
    replica: Arc<str>,
    addr: std::net::SocketAddr,
    host: String,
) {
    let mut counter = ProbeCounter::default();
    loop {
        let Some(s) = state.upgrade() else { return };
        let Some(cfg) = s.probe_config() else {
            s.probing.store(false, Ordering::Release);
            return;
        };
        drop(s);
        let result = tokio::time::timeout(cfg.timeout, probe_once(addr, &host, &cfg.path)).await;
        let ok = matches!(result, Ok(Ok(status)) if status < 500);
        let Some(s) = state.upgrade() else { return };
        let current = s.health.probed_healthy();
        if let Some(verdict) = counter.record(ok, current, &cfg) {
            s.health.set_probed_healthy(verdict);
            let reason = if verdict {
                tracing::info!(%instance, %replica, %addr, "replica passed its health probes and is back in rotation");
                String::new()
            } else {
                let reason = match &result {
                    Err(_) => format!("no answer to its health probe within {:?}", cfg.timeout),
                    Ok(Err(e)) => e.to_string(),
                    Ok(Ok(status)) => format!("health probe answered {status}"),
                };
                tracing::warn!(%instance, %replica, %addr, %reason, "replica failed its health probes and is out of rotation");
                reason
            };
            s.verdicts.send(Verdict {
                instance: instance.clone(),
                replica: replica.clone(),
                healthy: verdict,
                reason,
            });
        }
        if ok {
            s.health.record_success();
        }
        drop(s);
        tokio::time::sleep(cfg.interval).await;
    }
}

/// One probe: a fresh connection (so connecting is tested too), `GET path`, the status code.
async fn probe_once(
    addr: std::net::SocketAddr,
    host: &str,
    path: &str,
) -> Result<u16, Box<dyn std::error::Error + Send + Sync>> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    let conn = tokio::spawn(conn);
    let req = Request::get(path)
        .header(http::header::HOST, host)
        .header(http::header::USER_AGENT, "tandem-health-probe")
        .header(http::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())?;
    let status = send.send_request(req).await?.status().as_u16();
    conn.abort();
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn ejection_backs_off_and_expires() {
        let h = Health::new();
        let policy = EjectionPolicy {
            base: Duration::from_secs(1),
            max: Duration::from_secs(5),
        };
        let t0 = Instant::now();
        assert!(h.is_healthy(t0));
        assert_eq!(h.eject(t0, &policy), Duration::from_secs(1));
        assert!(!h.is_healthy(t0));
        // A second failure while ejected does not extend or count.
        assert_eq!(
            h.eject(t0 + Duration::from_millis(400), &policy),
            Duration::from_millis(600)
        );
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(!h.is_healthy(Instant::now()));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(
            h.is_healthy(Instant::now()),
            "ejection ends after its period"
        );

        // Failing again right after: twice as long, then capped.
        assert_eq!(h.eject(Instant::now(), &policy), Duration::from_secs(2));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(h.eject(Instant::now(), &policy), Duration::from_secs(4));
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(h.eject(Instant::now(), &policy), Duration::from_secs(5));
        assert_eq!(h.ejections_total(), 4);

        // A success ends the streak and the ejection.
        h.record_success();
        assert!(h.is_healthy(Instant::now()));
        assert_eq!(h.eject(Instant::now(), &policy), Duration::from_secs(1));
    }

    #[test]
    fn probe_thresholds() {
        let cfg = HealthConfig {
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            ..HealthConfig::default()
        };
        let mut c = ProbeCounter::default();
        assert_eq!(c.record(false, true, &cfg), None);
        assert_eq!(c.record(false, true, &cfg), None);
        assert_eq!(
            c.record(true, true, &cfg),
            None,
            "a success resets the failures"
        );
        assert_eq!(c.record(false, true, &cfg), None);
        assert_eq!(c.record(false, true, &cfg), None);
        assert_eq!(c.record(false, true, &cfg), Some(false));
        assert_eq!(c.record(true, false, &cfg), None);
        assert_eq!(c.record(true, false, &cfg), Some(true));
        assert_eq!(c.record(true, true, &cfg), None);
    }

    #[test]
    fn backoff_periods() {
        let p = EjectionPolicy::default();
        assert_eq!(p.period(1), Duration::from_secs(1));
        assert_eq!(p.period(2), Duration::from_secs(2));
        assert_eq!(p.period(6), Duration::from_secs(30));
        assert_eq!(p.period(u32::MAX), Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn probes_take_a_failing_replica_out_and_end_with_it() {
        use crate::routes::{InstanceSpec, ReplicaSpec, Routes};
        // A replica that accepts connections, counts them and closes them unanswered: every
        // probe is one connection here, and every probe fails.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        let server = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::Relaxed);
                drop(stream);
            }
        });
        let interval = Duration::from_secs(1);
        let routes = Routes::new();
        let spec = InstanceSpec {
            certificate: None,
            asleep: false,
            editor_secret: None,
            http_auth: Default::default(),
            name: "orders".into(),
            hosts: vec!["orders.localhost".into()],
            ha: false,
            affinity: false,
            hold: false,
            replicas: vec![ReplicaSpec {
                id: "r0".into(),
                addr,
                ready: true,
            }],
            health: Some(HealthConfig {
                interval,
                ..HealthConfig::default()
            }),
        };
        let table = routes.publish(&[spec]).unwrap();
        let state = table.instances()[0].replicas[0].state.clone();
        assert!(state.health.probed_healthy());
        // Two failed probes, one interval apart.
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if !state.health.probed_healthy() {
                break;
            }
        }
        assert!(
            !state.health.probed_healthy(),
            "two failed probes mark the replica unhealthy"
        );
        assert!(!state.is_available(Instant::now()));
        assert!(
            connections.load(Ordering::Relaxed) >= 2,
            "each probe opened a connection"
        );

        // The replica leaves the routes; the test lets go of it too.
        routes.publish(&[]).unwrap();
        drop((table, state));
        // A probe already under way may still connect; it ends within its timeout.
        tokio::time::sleep(3 * interval).await;
        let settled = connections.load(Ordering::Relaxed);
        tokio::time::sleep(20 * interval).await;
        assert_eq!(
            connections.load(Ordering::Relaxed),
            settled,
            "no probe connection after the replica left the routes"
        );
        server.abort();
    }
}
