//! Proxy metrics in the Prometheus text format.
//!
//! Counters are plain atomics kept where the request path already is: per replica in its
//! [`ReplicaState`](crate::health::ReplicaState), per instance in the instance, and global ones in
//! [`ProxyStats`]. Nothing on the request path hashes a label set; `/metrics` walks the current
//! route table instead. Series of a removed instance or replica disappear with it.

use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use tokio::time::Instant;

use crate::routes::RouteTable;

/// Upper bounds of the latency histogram buckets, in seconds.
const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Status classes used as labels: 1xx to 5xx.
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

fn class_index(status: u16) -> usize {
    usize::from(status / 100).clamp(1, 5) - 1
}

/// A latency histogram with fixed buckets.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

/// Counters of one replica.
#[derive(Debug, Default)]
pub struct ReplicaStats {
    requests: [AtomicU64; 5],
    connect_errors: AtomicU64,
}

impl ReplicaStats {
    pub(crate) fn record(&self, status: u16) {
        self.requests[class_index(status)].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn connect_error(&self) {
        self.connect_errors.fetch_add(1, Ordering::Relaxed);
    }
}

/// Counters of one instance.
#[derive(Debug, Default)]
pub struct InstanceStats {
    /// Answers of the proxy's own (403 editor, 503, 502 after failed connects, 413, ...).
    local: [AtomicU64; 5],
    retries: AtomicU64,
    editor_blocked: AtomicU64,
    held: AtomicU64,
    latency: Histogram,
    /// Its use, for sleeping when idle.
    pub(crate) activity: crate::activity::Activity,
    /// Wake-ups asked by requests to it while it slept.
    wakes: AtomicU64,
}

impl InstanceStats {
    pub(crate) fn record_local(&self, status: u16) {
        self.local[class_index(status)].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn editor_blocked(&self) {
        self.editor_blocked.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn held(&self) {
        self.held.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn woken(&self) {
        self.wakes.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn observe(&self, d: Duration) {
        self.latency.observe(d);
    }
}

/// Process-wide proxy counters.
#[derive(Debug, Default)]
pub struct ProxyStats {
    pub(crate) open_connections: AtomicI64,
    pub(crate) websocket_tunnels: AtomicI64,
    pub(crate) unknown_host: AtomicU64,
    pub(crate) bad_requests: AtomicU64,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
    last_reload_ok: AtomicBool,
    last_reload_unix: AtomicU64,
    /// A standalone proxy's route feed: connected to its control plane, and the generation of
    /// the table it serves (0 without a feed).
    feed_connected: AtomicBool,
    feed_generation: AtomicU64,
    /// Routes come from a control plane's feed: only then are the two series above shown.
    feed_used: AtomicBool,
    /// Counters of the MQTT proxy's listeners, one per replica, published by
    /// [`MqttProxy`](crate::mqtt::MqttProxy) whenever its listeners change.
    pub(crate) mqtt: ArcSwap<Vec<Arc<MqttReplicaStats>>>,
    /// Connections the MQTT proxy's shared listener closed before they reached a replica.
    pub(crate) mqtt_shared_rejected: Arc<AtomicU64>,
    /// Access log lines dropped because the log's writer was behind.
    pub(crate) access_log_dropped: Arc<AtomicU64>,
    /// TLS handshakes that failed or timed out on the HTTPS listener.
    pub(crate) tls_handshake_failures: AtomicU64,
    /// The HTTPS listener's files' certificates: name and `notAfter` ([`crate::tls`]).
    file_certificates: std::sync::Mutex<Vec<(Box<str>, u64)>>,
}

impl ProxyStats {
    pub(crate) fn set_file_certificates(&self, expiries: Vec<(Box<str>, u64)>) {
        *self
            .file_certificates
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = expiries;
    }

    /// Records the outcome of a routes reload (file or control plane).
    pub fn record_reload(&self, ok: bool) {
        if ok {
            self.reloads_ok.fetch_add(1, Ordering::Relaxed);
        } else {
            self.reloads_failed.fetch_add(1, Ordering::Relaxed);
        }
        self.last_reload_ok.store(ok, Ordering::Relaxed);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.last_reload_unix.store(now, Ordering::Relaxed);
    }

    /// Records whether the route feed is connected to its control plane.
    pub fn record_feed_connected(&self, connected: bool) {
        self.feed_used.store(true, Ordering::Relaxed);
        self.feed_connected.store(connected, Ordering::Relaxed);
    }

    /// Records the generation of the route table the feed applied.
    pub fn record_feed_generation(&self, generation: u64) {
        self.feed_used.store(true, Ordering::Relaxed);
        self.feed_generation.store(generation, Ordering::Relaxed);
    }

    /// Open client connections.
    pub fn open_connections(&self) -> i64 {
        self.open_connections.load(Ordering::Relaxed)
    }

    /// Open connections of `instance`'s replicas through the MQTT proxy.
    pub fn mqtt_open(&self, instance: &str) -> i64 {
        self.mqtt
            .load()
            .iter()
            .filter(|r| &*r.instance == instance)
            .map(|r| r.open.load(Ordering::Relaxed))
            .sum()
    }
}

/// Why an MQTT connection was closed by the proxy (the `kind` label of
/// `tandem_proxy_mqtt_errors_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MqttErrorKind {
    /// Not MQTT, or a packet the proxy reads is invalid.
    Malformed,
    /// A packet over the size limit.
    TooLarge,
    /// A valid packet out of place (first packet not CONNECT, a second CONNECT).
    Protocol,
    /// The broker could not be reached.
    UpstreamConnect,
    /// A socket error either side.
    Io,
}

impl MqttErrorKind {
    const ALL: [MqttErrorKind; 5] = [
        Self::Malformed,
        Self::TooLarge,
        Self::Protocol,
        Self::UpstreamConnect,
        Self::Io,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::TooLarge => "too_large",
            Self::Protocol => "protocol",
            Self::UpstreamConnect => "upstream_connect",
            Self::Io => "io",
        }
    }
}

/// Counters of one replica's MQTT listener.
#[derive(Debug)]
pub struct MqttReplicaStats {
    pub(crate) instance: Arc<str>,
    pub(crate) slot: usize,
    pub(crate) open: AtomicI64,
    pub(crate) connections: AtomicU64,
    packets_to_broker: AtomicU64,
    bytes_to_broker: AtomicU64,
    packets_to_client: AtomicU64,
    bytes_to_client: AtomicU64,
    pub(crate) client_id_rewrites: AtomicU64,
    pub(crate) filter_rewrites: AtomicU64,
    pub(crate) retained_dropped: AtomicU64,
    errors: [AtomicU64; 5],
}

impl MqttReplicaStats {
    pub(crate) fn new(instance: Arc<str>, slot: usize) -> Self {
        Self {
            instance,
            slot,
            open: AtomicI64::new(0),
            connections: AtomicU64::new(0),
            packets_to_broker: AtomicU64::new(0),
            bytes_to_broker: AtomicU64::new(0),
            packets_to_client: AtomicU64::new(0),
            bytes_to_client: AtomicU64::new(0),
            client_id_rewrites: AtomicU64::new(0),
            filter_rewrites: AtomicU64::new(0),
            retained_dropped: AtomicU64::new(0),
            errors: Default::default(),
        }
    }

    pub(crate) fn to_broker(&self, packets: u64, bytes: u64) {
        self.packets_to_broker.fetch_add(packets, Ordering::Relaxed);
        self.bytes_to_broker.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn to_client(&self, packets: u64, bytes: u64) {
        self.packets_to_client.fetch_add(packets, Ordering::Relaxed);
        self.bytes_to_client.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn error(&self, kind: MqttErrorKind) {
        let i = MqttErrorKind::ALL
            .iter()
            .position(|k| *k == kind)
            .unwrap_or(0);
        self.errors[i].fetch_add(1, Ordering::Relaxed);
    }
}

fn render_mqtt(out: &mut String, stats: &ProxyStats) {
    let replicas = stats.mqtt.load();
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let label =
        |r: &MqttReplicaStats| format!("instance=\"{}\",replica=\"r{}\"", r.instance, r.slot);
    header(
        out,
        "tandem_proxy_mqtt_connections",
        "gauge",
        "Open MQTT connections from a replica.",
    );
    for r in replicas.iter() {
        let _ = writeln!(
            out,
            "tandem_proxy_mqtt_connections{{{}}} {}",
            label(r),
            r.open.load(Ordering::Relaxed)
        );
    }
    header(
        out,
        "tandem_proxy_mqtt_connections_total",
        "counter",
        "MQTT connections accepted from a replica.",
    );
    for r in replicas.iter() {
        let _ = writeln!(
            out,
            "tandem_proxy_mqtt_connections_total{{{}}} {}",
            label(r),
            load(&r.connections)
        );
    }
    header(out, "tandem_proxy_mqtt_packets_total", "counter", "MQTT packets forwarded, by direction (to_broker, to_client); retained replays dropped are not counted.");
    for r in replicas.iter() {
        let l = label(r);
        let _ = writeln!(
            out,
            "tandem_proxy_mqtt_packets_total{{{l},direction=\"to_broker\"}} {}",
            load(&r.packets_to_broker)
        );
        let _ = writeln!(
            out,
            "tandem_proxy_mqtt_packets_total{{{l},direction=\"to_client\"}} {}",
            load(&r.packets_to_client)
        );
    }
    header(
        out,
        "tandem_proxy_mqtt_bytes_total",
        "counter",
        "MQTT bytes forwarded, by direction, as written (after rewrites).",
    );
    for r in replicas.iter() {
        let l = label(r);
        let _ = writeln!(
            out,
            "tandem_proxy_mqtt_bytes_total{{{l},direction=\"to_broker\"}} {}",
            load(&r.bytes_to_broker)
        );
        let _ = writeln!(
            out,
            "tandem_proxy_mqtt_bytes_total{{{l},direction=\"to_client\"}} {}",
            load(&r.bytes_to_client)
        );
    }
    header(out, "tandem_proxy_mqtt_rewrites_total", "counter", "Rewrites on HA instances: client ids suffixed, filters shared (SUBSCRIBE and UNSUBSCRIBE).");
    for r in replicas.iter() {
        let l = label(r);
        let _ = writeln!(
            out,
            "tandem_proxy_mqtt_rewrites_total{{{l},kind=\"client_id\"}} {}",
            load(&r.client_id_rewrites)
        );
        let _ = writeln!(
            out,
            "tandem_proxy_mqtt_rewrites_total{{{l},kind=\"filter\"}} {}",
            load(&r.filter_rewrites)
        );
    }
    header(out, "tandem_proxy_mqtt_retained_dropped_total", "counter", "Retained replays to shared subscriptions dropped because another replica of the instance processes them.");
    for r in replicas.iter() {
        let _ = writeln!(
            out,
            "tandem_proxy_mqtt_retained_dropped_total{{{}}} {}",
            label(r),
            load(&r.retained_dropped)
        );
    }
    header(out, "tandem_proxy_mqtt_errors_total", "counter", "MQTT connections closed by an error, by kind (malformed, too_large, protocol, upstream_connect, io).");
    for r in replicas.iter() {
        let l = label(r);
        for (i, k) in MqttErrorKind::ALL.iter().enumerate() {
            let _ = writeln!(
                out,
                "tandem_proxy_mqtt_errors_total{{{l},kind=\"{}\"}} {}",
                k.label(),
                load(&r.errors[i])
            );
        }
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Renders every metric for `table` and `stats`.
pub fn render(table: &RouteTable, stats: &ProxyStats) -> String {
    let mut out = String::with_capacity(4096);
    let now = Instant::now();
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);

    header(&mut out, "tandem_proxy_requests_total", "counter", "Requests answered, by instance, replica (\"none\" for the proxy's own answers) and status class.");
    for inst in table.instances() {
        for r in &inst.replicas {
            for (i, class) in CLASSES.iter().enumerate() {
                let _ = writeln!(out, "tandem_proxy_requests_total{{instance=\"{}\",replica=\"{}\",class=\"{class}\"}} {}", inst.name, r.id, load(&r.state.stats.requests[i]));
            }
        }
        for (i, class) in CLASSES.iter().enumerate() {
            let _ = writeln!(out, "tandem_proxy_requests_total{{instance=\"{}\",replica=\"none\",class=\"{class}\"}} {}", inst.name, load(&inst.stats.local[i]));
        }
    }
    header(
        &mut out,
        "tandem_proxy_request_duration_seconds",
        "histogram",
        "Time from request head received to response head sent, by instance.",
    );
    for inst in table.instances() {
        inst.stats.latency.render(
            &mut out,
            "tandem_proxy_request_duration_seconds",
            &format!("instance=\"{}\"", inst.name),
        );
    }
    header(
        &mut out,
        "tandem_proxy_upstream_connect_errors_total",
        "counter",
        "Failed or timed-out connects to a replica.",
    );
    for inst in table.instances() {
        for r in &inst.replicas {
            let _ = writeln!(
                out,
                "tandem_proxy_upstream_connect_errors_total{{instance=\"{}\",replica=\"{}\"}} {}",
                inst.name,
                r.id,
                load(&r.state.stats.connect_errors)
            );
        }
    }
    header(&mut out, "tandem_proxy_retries_total", "counter", "Requests sent again to another replica after a connect failure or a closed idle connection.");
    header(
        &mut out,
        "tandem_proxy_editor_blocked_total",
        "counter",
        "Requests to /admin refused on HA instances.",
    );
    for inst in table.instances() {
        let _ = writeln!(
            out,
            "tandem_proxy_retries_total{{instance=\"{}\"}} {}",
            inst.name,
            load(&inst.stats.retries)
        );
        let _ = writeln!(
            out,
            "tandem_proxy_editor_blocked_total{{instance=\"{}\"}} {}",
            inst.name,
            load(&inst.stats.editor_blocked)
        );
    }
    header(
        &mut out,
        "tandem_proxy_requests_held_total",
        "counter",
        "Requests that found no replica ready and waited for one (a takeover, a deploy, a start).",
    );
    for inst in table.instances() {
        let _ = writeln!(
            out,
            "tandem_proxy_requests_held_total{{instance=\"{}\"}} {}",
            inst.name,
            load(&inst.stats.held)
        );
    }
    header(
        &mut out,
        "tandem_proxy_wakes_total",
        "counter",
        "Requests that came while the instance slept and asked for it to wake.",
    );
    for inst in table.instances() {
        let _ = writeln!(
            out,
            "tandem_proxy_wakes_total{{instance=\"{}\"}} {}",
            inst.name,
            load(&inst.stats.wakes)
        );
    }
    header(
        &mut out,
        "tandem_proxy_replica_ready",
        "gauge",
        "1 when the owner of the routes lets the replica take traffic.",
    );
    header(
        &mut out,
        "tandem_proxy_replica_healthy",
        "gauge",
        "1 when the replica passes its probes and is not ejected.",
    );
    header(
        &mut out,
        "tandem_proxy_replica_ejections_total",
        "counter",
        "Passive ejections after connect failures.",
    );
    header(
        &mut out,
        "tandem_proxy_replica_in_flight",
        "gauge",
        "Requests whose responses have not finished.",
    );
    header(
        &mut out,
        "tandem_proxy_replica_idle_connections",
        "gauge",
        "Pooled keep-alive connections to the replica.",
    );
    for inst in table.instances() {
        for r in &inst.replicas {
            let l = format!("instance=\"{}\",replica=\"{}\"", inst.name, r.id);
            let s = &r.state;
            let _ = writeln!(
                out,
                "tandem_proxy_replica_ready{{{l}}} {}",
                u8::from(s.is_ready())
            );
            let _ = writeln!(
                out,
                "tandem_proxy_replica_healthy{{{l}}} {}",
                u8::from(s.health.is_healthy(now))
            );
            let _ = writeln!(
                out,
                "tandem_proxy_replica_ejections_total{{{l}}} {}",
                s.health.ejections_total()
            );
            let _ = writeln!(
                out,
                "tandem_proxy_replica_in_flight{{{l}}} {}",
                s.in_flight()
            );
            let _ = writeln!(
                out,
                "tandem_proxy_replica_idle_connections{{{l}}} {}",
                s.pool.idle_count()
            );
        }
    }
    header(
        &mut out,
        "tandem_proxy_routes_instances",
        "gauge",
        "Instances in the route table.",
    );
    let _ = writeln!(
        out,
        "tandem_proxy_routes_instances {}",
        table.instances().len()
    );
    header(
        &mut out,
        "tandem_proxy_routes_hosts",
        "gauge",
        "Host names in the route table.",
    );
    let _ = writeln!(out, "tandem_proxy_routes_hosts {}", table.host_count());
    header(
        &mut out,
        "tandem_proxy_routes_generation",
        "gauge",
        "Generation of the route table in use.",
    );
    let _ = writeln!(out, "tandem_proxy_routes_generation {}", table.generation());
    header(
        &mut out,
        "tandem_proxy_route_reloads_total",
        "counter",
        "Route reloads by result.",
    );
    let _ = writeln!(
        out,
        "tandem_proxy_route_reloads_total{{result=\"ok\"}} {}",
        load(&stats.reloads_ok)
    );
    let _ = writeln!(
        out,
        "tandem_proxy_route_reloads_total{{result=\"error\"}} {}",
        load(&stats.reloads_failed)
    );
    header(
        &mut out,
        "tandem_proxy_route_last_reload_success",
        "gauge",
        "Whether the last reload succeeded (1) or failed (0).",
    );
    let _ = writeln!(
        out,
        "tandem_proxy_route_last_reload_success {}",
        u8::from(stats.last_reload_ok.load(Ordering::Relaxed))
    );
    header(
        &mut out,
        "tandem_proxy_route_last_reload_timestamp_seconds",
        "gauge",
        "Unix time of the last reload attempt.",
    );
    let _ = writeln!(
        out,
        "tandem_proxy_route_last_reload_timestamp_seconds {}",
        load(&stats.last_reload_unix)
    );
    // Only a proxy fed by a control plane has a link to it to show.
    if stats.feed_used.load(Ordering::Relaxed) {
        header(
            &mut out,
            "tandem_proxy_control_plane_connected",
            "gauge",
            "1 while the route feed of a standalone proxy is connected to its control plane.",
        );
        let _ = writeln!(
            out,
            "tandem_proxy_control_plane_connected {}",
            u8::from(stats.feed_connected.load(Ordering::Relaxed))
        );
        header(
            &mut out,
            "tandem_proxy_feed_generation",
            "gauge",
            "Generation of the route table the feed applied (0 without a feed).",
        );
        let _ = writeln!(
            out,
            "tandem_proxy_feed_generation {}",
            load(&stats.feed_generation)
        );
    }
    header(
        &mut out,
        "tandem_proxy_open_connections",
        "gauge",
        "Open client connections.",
    );
    let _ = writeln!(
        out,
        "tandem_proxy_open_connections {}",
        stats.open_connections.load(Ordering::Relaxed)
    );
    header(
        &mut out,
        "tandem_proxy_websocket_tunnels",
        "gauge",
        "Open upgraded (WebSocket) tunnels.",
    );
    let _ = writeln!(
        out,
        "tandem_proxy_websocket_tunnels {}",
        stats.websocket_tunnels.load(Ordering::Relaxed)
    );
    header(
        &mut out,
        "tandem_proxy_unknown_host_total",
        "counter",
        "Requests for a host no instance serves.",
    );
    let _ = writeln!(
        out,
        "tandem_proxy_unknown_host_total {}",
        load(&stats.unknown_host)
    );
    header(
        &mut out,
        "tandem_proxy_bad_requests_total",
        "counter",
        "Requests refused as malformed (bad Host and the like).",
    );
    let _ = writeln!(
        out,
        "tandem_proxy_bad_requests_total {}",
        load(&stats.bad_requests)
    );
    header(
        &mut out,
        "tandem_proxy_tls_handshake_failures_total",
        "counter",
        "TLS handshakes that failed or timed out on the HTTPS listener (no certificate for the name, a client that distrusts it, not TLS).",
    );
    let _ = writeln!(
        out,
        "tandem_proxy_tls_handshake_failures_total {}",
        load(&stats.tls_handshake_failures)
    );
    header(
        &mut out,
        "tandem_proxy_certificate_expiry_timestamp_seconds",
        "gauge",
        "When a certificate the HTTPS listener serves stops being valid (its notAfter), in seconds since the Unix epoch: the files' (source=\"file\", name \"default\" or the certificate's hosts) and instances' own (source=\"instance\", name the instance).",
    );
    for (name, at) in stats
        .file_certificates
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
    {
        let _ = writeln!(out, "tandem_proxy_certificate_expiry_timestamp_seconds{{source=\"file\",name=\"{name}\"}} {at}");
    }
    for inst in table.instances() {
        if let Some(at) = inst.certificate.as_ref().and_then(|c| c.not_after) {
            let _ = writeln!(out, "tandem_proxy_certificate_expiry_timestamp_seconds{{source=\"instance\",name=\"{}\"}} {at}", inst.name);
        }
    }
    render_mqtt(&mut out, stats);
    header(
        &mut out,
        "tandem_proxy_access_log_dropped_total",
        "counter",
        "Access log lines dropped because the log's writer was behind (a slow terminal or pipe).",
    );
    let _ = writeln!(
        out,
        "tandem_proxy_access_log_dropped_total {}",
        load(&stats.access_log_dropped)
    );
    header(
        &mut out,
        "tandem_proxy_mqtt_shared_rejected_total",
        "counter",
        "Connections the MQTT proxy's shared listener closed before they reached a replica: bad or missing credentials, no CONNECT in time, not MQTT.",
    );
    let _ = writeln!(
        out,
        "tandem_proxy_mqtt_shared_rejected_total {}",
        load(&stats.mqtt_shared_rejected)
    );
    out
}
