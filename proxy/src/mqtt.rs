//! The MQTT proxy between Node-RED replicas and the broker, for HA instances.
//!
//! Every replica of an instance runs the same flows, so its MQTT nodes connect with the same
//! client id and subscribe to the same filters: the replicas would kick each other off the broker
//! and each would process every message. The proxy fixes that below the flows. Each replica gets
//! its own listener, so the proxy knows instance and slot of every connection, and each accepted
//! connection gets its own connection to the upstream broker. On an HA instance:
//!
//! - CONNECT: a non-empty client id becomes `<id>-r<slot>`. The slot is the replica's position,
//!   stable across restarts, so a restarted replica resumes its session instead of leaving a stale
//!   one in the shared-subscription group. Empty ids are left to the broker.
//! - SUBSCRIBE and UNSUBSCRIBE: each filter becomes `$share/<instance>/<filter>`, except filters
//!   starting with `$` (`$SYS`, an explicit `$share`, `$queue`) and filters covered by the
//!   instance's exclusion list ([`rewrite::covers`]). QoS, Retain As Published, Retain Handling
//!   and subscription identifiers are kept; No Local is cleared on shared filters (a protocol
//!   error there; Mosquitto ignores it anyway).
//! - Retained messages: Mosquitto before 2.0.13 (Debian 12 ships 2.0.11) sends retained messages
//!   to new shared subscriptions, so every replica would process them. For each client id
//!   of an instance (one per broker config node in its flows), the *retained holder*, the
//!   longest-connected of the replicas' connections with that id, receives them; on the others
//!   a PUBLISH with RETAIN = 1 that matches only shared filters without Retain As Published is
//!   dropped and acknowledged to the broker by the proxy (PUBACK, or PUBREC and later PUBCOMP).
//!   Live messages reach shared subscribers with RETAIN = 0, so they are never dropped. When
//!   the holder disconnects, the next-oldest connection takes over; a replica that restarts
//!   while another is connected does not process retained messages again.
//! - Everything else passes through byte for byte, PUBLISH both ways, PING, DISCONNECT and AUTH
//!   included (never re-encoded: rumqttc mishandles v5 DISCONNECT and AUTH).
//!
//! Non-HA instances pass through byte for byte. A malformed packet, or one larger than
//! [`MqttConfig::max_packet_bytes`], closes that connection (logged with the reason, counted in
//! the errors metric); other connections are untouched. When the broker cannot be reached or
//! closes, the replica's connection is closed at once, and the replica's reconnects get a new
//! broker connection each.
//!
//! # Layout
//! - [`frame`]: fixed header and remaining length.
//! - [`rewrite`]: CONNECT, SUBSCRIBE and UNSUBSCRIBE rewrites, topic filters.
//! - [`conn`]: one replica connection, both directions.
//! - [`tls`]: TLS to the broker.
//! - This module: [`MqttProxy`], its listeners and their configuration.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

use crate::metrics::{MqttReplicaStats, ProxyStats};
use crate::routes::{validate_name, RouteError, MAX_REPLICAS};

pub mod conn;
pub mod frame;
pub mod rewrite;
pub mod tls;

use rewrite::ShareRules;

/// Default largest MQTT packet, in bytes: 16 MiB.
pub const DEFAULT_MAX_PACKET_BYTES: usize = 16 * 1024 * 1024;

/// Proxy-wide MQTT settings. Changes apply to connections accepted afterwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttConfig {
    /// The broker, as `host:port` (resolved at every connect).
    pub upstream: String,
    /// Time to open the TCP connection to the broker; past it the replica's connection is
    /// closed. Default 5 s.
    pub connect_timeout: Duration,
    /// Largest packet accepted either way, in bytes (remaining length). The proxy holds a whole
    /// packet in memory before forwarding it, so this bounds memory per connection; a larger
    /// packet closes the connection. Default 16 MiB ([`DEFAULT_MAX_PACKET_BYTES`]): room for the
    /// images and files flows move, far below MQTT's 256 MiB.
    pub max_packet_bytes: usize,
    /// TLS to the broker; plain TCP when absent.
    pub tls: Option<tls::UpstreamTls>,
}

impl MqttConfig {
    /// Default settings for the broker at `upstream` (`host:port`).
    pub fn new(upstream: impl Into<String>) -> Self {
        Self {
            upstream: upstream.into(),
            connect_timeout: Duration::from_secs(5),
            max_packet_bytes: DEFAULT_MAX_PACKET_BYTES,
            tls: None,
        }
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), MqttError> {
        let ok = self.upstream.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !ok {
            return Err(MqttError::InvalidUpstream(self.upstream.clone()));
        }
        if self.max_packet_bytes < 128 || self.max_packet_bytes > frame::MAX_REMAINING_LENGTH {
            return Err(MqttError::InvalidMaxPacket(self.max_packet_bytes));
        }
        Ok(())
    }
}

/// An instance as the MQTT proxy sees it: the input to [`MqttProxy::set_instances`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttInstance {
    /// The instance's name (DNS-safe); the share name of its subscriptions.
    pub name: String,
    /// HA: rewrite client ids and subscriptions. Otherwise every byte passes through.
    pub ha: bool,
    /// Topic filters whose subscriptions stay unshared, so every replica gets every message
    /// (reply topics, broadcasts, retained configuration). An entry covers a subscription when
    /// every topic the subscription can match is matched by the entry: `replies/#` covers
    /// `replies/abc` and `replies/+/x`.
    pub exclude: Vec<String>,
    /// The replicas and their listeners.
    pub replicas: Vec<MqttReplica>,
}

/// One replica's listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MqttReplica {
    /// The replica's slot: `r<slot>` in metrics, `-r<slot>` on client ids. Stable across restarts.
    pub slot: usize,
    /// Where the replica's MQTT nodes connect. Port 0 picks a free port; see
    /// [`MqttProxy::listeners`].
    pub listen: SocketAddr,
}

/// Why MQTT settings were refused.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    /// The upstream is not `host:port`.
    #[error("MQTT upstream {0:?} is invalid: write host:port, e.g. \"127.0.0.1:1883\"")]
    InvalidUpstream(String),
    /// The packet limit is out of range.
    #[error("MQTT max_packet_bytes {0} is out of range: use 128 to 268435455")]
    InvalidMaxPacket(usize),
    /// An instance name is invalid.
    #[error("MQTT: {0}")]
    Name(#[from] RouteError),
    /// Two instances share a name.
    #[error("MQTT: instance {0:?} is listed twice")]
    DuplicateInstance(String),
    /// Two replicas of an instance share a slot, or a slot is too high.
    #[error("MQTT: instance {instance:?}: slot {slot} is used twice or is {MAX_REPLICAS} or more")]
    BadSlot {
        /// The instance.
        instance: String,
        /// The slot.
        slot: usize,
    },
    /// Two listeners share an address.
    #[error("MQTT: listener {addr} is given to both {first} and {second}")]
    DuplicateListener {
        /// The address.
        addr: SocketAddr,
        /// `instance/r<slot>` that has it first.
        first: String,
        /// `instance/r<slot>` that has it again.
        second: String,
    },
    /// An exclusion is not a valid topic filter.
    #[error("MQTT: instance {instance:?}: exclusion {filter:?} is not a valid topic filter (use '+' and '#' only as whole levels, '#' last)")]
    InvalidExclude {
        /// The instance.
        instance: String,
        /// The filter as written.
        filter: String,
    },
    /// The routes file gives an instance a different number of listeners than replicas.
    #[error("instance {instance:?} has {replicas} replicas but {listeners} mqtt_listeners: give one listener per replica, in the same order")]
    ListenerCount {
        /// The instance.
        instance: String,
        /// Replicas listed.
        replicas: usize,
        /// Listeners listed.
        listeners: usize,
    },
    /// The routes file gives MQTT listeners without an `[mqtt]` section.
    #[error("instance {0:?} has mqtt_listeners but the file has no [mqtt] section with the upstream broker")]
    NoUpstream(String),
    /// A listener could not be bound. Listeners bound before it stay.
    #[error("MQTT: cannot listen on {addr} for {instance}/r{slot}: {source}")]
    Bind {
        /// The instance.
        instance: String,
        /// The slot.
        slot: usize,
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Checks a list of instances without applying it.
pub fn validate(instances: &[MqttInstance]) -> Result<(), MqttError> {
    let mut names = std::collections::HashSet::new();
    let mut addrs: HashMap<SocketAddr, String> = HashMap::new();
    for i in instances {
        validate_name(&i.name)?;
        if !names.insert(i.name.as_str()) {
            return Err(MqttError::DuplicateInstance(i.name.clone()));
        }
        if let Some(filter) = i.exclude.iter().find(|f| !rewrite::valid_filter(f)) {
            return Err(MqttError::InvalidExclude {
                instance: i.name.clone(),
                filter: filter.clone(),
            });
        }
        let mut slots = std::collections::HashSet::new();
        for r in &i.replicas {
            if r.slot >= MAX_REPLICAS || !slots.insert(r.slot) {
                return Err(MqttError::BadSlot {
                    instance: i.name.clone(),
                    slot: r.slot,
                });
            }
            let who = format!("{}/r{}", i.name, r.slot);
            if r.listen.port() != 0 {
                if let Some(first) = addrs.insert(r.listen, who.clone()) {
                    return Err(MqttError::DuplicateListener {
                        addr: r.listen,
                        first,
                        second: who,
                    });
                }
            }
        }
    }
    Ok(())
}

/// State of one instance shared by its listeners and connections.
#[derive(Debug)]
pub struct InstanceState {
    /// The instance's name.
    pub name: Arc<str>,
    /// Sharing rules for new connections; `None` when the instance is not HA.
    rules: ArcSwap<Option<Arc<ShareRules>>>,
    /// HA connections with the client id they sent, in the order their CONNECT passed; per
    /// client id (one per broker config node in the flows) the first is the retained holder.
    connected: Mutex<VecDeque<(u64, String)>>,
}

impl InstanceState {
    fn new(i: &MqttInstance) -> Self {
        let s = Self {
            name: i.name.as_str().into(),
            rules: ArcSwap::from_pointee(None),
            connected: Mutex::new(VecDeque::new()),
        };
        s.set(i);
        s
    }

    fn set(&self, i: &MqttInstance) {
        let rules = i.ha.then(|| {
            Arc::new(ShareRules {
                group: i.name.clone(),
                exclude: i.exclude.clone(),
            })
        });
        self.rules.store(Arc::new(rules));
    }

    fn connected(&self) -> std::sync::MutexGuard<'_, VecDeque<(u64, String)>> {
        self.connected.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn join(&self, conn: u64, client_id: &str) {
        self.connected().push_back((conn, client_id.to_owned()));
    }

    pub(crate) fn leave(&self, conn: u64) {
        self.connected().retain(|(c, _)| *c != conn);
    }

    /// Whether `conn` is the oldest connection of its client id: the replicas' copies of one
    /// broker config node share a client id, so each such node has one holder.
    pub(crate) fn is_holder(&self, conn: u64) -> bool {
        let connected = self.connected();
        let Some((_, id)) = connected.iter().find(|(c, _)| *c == conn) else {
            return false;
        };
        connected.iter().find(|(_, i)| i == id).map(|(c, _)| *c) == Some(conn)
    }
}

/// A bound listener of one replica.
struct Listener {
    requested: SocketAddr,
    local: SocketAddr,
    stats: Arc<MqttReplicaStats>,
    task: JoinHandle<()>,
}

#[derive(Default)]
struct Inner {
    instances: HashMap<String, Arc<InstanceState>>,
    listeners: HashMap<(String, usize), Listener>,
}

/// The MQTT proxy: one listener per replica, bound and closed by [`MqttProxy::set_instances`].
///
/// ```no_run
/// # async fn f() -> Result<(), tandem_proxy::mqtt::MqttError> {
/// use std::sync::Arc;
/// use tandem_proxy::mqtt::{MqttConfig, MqttInstance, MqttProxy, MqttReplica};
/// let stats = Arc::new(tandem_proxy::ProxyStats::default()); // the HTTP proxy's, for /metrics
/// let mqtt = MqttProxy::new(MqttConfig::new("127.0.0.1:1883"), stats)?;
/// mqtt.set_instances(&[MqttInstance {
///     name: "orders".into(),
///     ha: true,
///     exclude: vec!["replies/#".into()],
///     replicas: vec![
///         MqttReplica { slot: 0, listen: "127.0.0.1:0".parse().unwrap() },
///         MqttReplica { slot: 1, listen: "127.0.0.1:0".parse().unwrap() },
///     ],
/// }])
/// .await?;
/// for (instance, slot, addr) in mqtt.listeners().await {
///     println!("{instance} r{slot}: TANDEM_MQTT_URL=mqtt://{addr}");
/// }
/// # Ok(()) }
/// ```
pub struct MqttProxy {
    config: Arc<ArcSwap<MqttConfig>>,
    stats: Arc<ProxyStats>,
    inner: tokio::sync::Mutex<Inner>,
    next_conn: Arc<AtomicU64>,
}

impl std::fmt::Debug for MqttProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttProxy")
            .field("config", &self.config.load())
            .finish_non_exhaustive()
    }
}

// === impl MqttProxy ===

impl MqttProxy {
    /// A proxy to the broker of `config`, with no listeners yet. Its counters are registered
    /// in `stats`, so they appear on the admin `/metrics` next to the HTTP proxy's.
    pub fn new(config: MqttConfig, stats: Arc<ProxyStats>) -> Result<Self, MqttError> {
        config.validate()?;
        Ok(Self {
            config: Arc::new(ArcSwap::from_pointee(config)),
            stats,
            inner: tokio::sync::Mutex::default(),
            next_conn: Arc::new(AtomicU64::new(1)),
        })
    }

    /// Replaces the settings; connections accepted from now on use them.
    pub fn set_config(&self, config: MqttConfig) -> Result<(), MqttError> {
        config.validate()?;
        self.config.store(Arc::new(config));
        Ok(())
    }

    /// The settings in use.
    pub fn config(&self) -> Arc<MqttConfig> {
        self.config.load_full()
    }

    /// Makes the listeners those of `instances`. A replica whose instance, slot and requested
    /// address are unchanged keeps its listener, its open connections and its counters (a
    /// changed `ha` or `exclude` applies to its next connections). Listeners no longer wanted are
    /// closed together with their connections, then new ones bound. The list is validated
    /// first and refused whole when invalid; a bind failure is returned after the other
    /// listeners were applied.
    pub async fn set_instances(&self, instances: &[MqttInstance]) -> Result<(), MqttError> {
        validate(instances)?;
        let mut inner = self.inner.lock().await;
        let wanted: HashMap<(String, usize), (SocketAddr, &MqttInstance)> = instances
            .iter()
            .flat_map(|i| {
                i.replicas
                    .iter()
                    .map(move |r| ((i.name.clone(), r.slot), (r.listen, i)))
            })
            .collect();

        // Close what is gone or moved, and wait until its socket is closed, so its address
        // can be bound again right away.
        let gone: Vec<(String, usize)> = inner
            .listeners
            .iter()
            .filter(|(k, l)| wanted.get(*k).map(|(a, _)| *a) != Some(l.requested))
            .map(|(k, _)| k.clone())
            .collect();
        for key in gone {
            if let Some(l) = inner.listeners.remove(&key) {
                l.task.abort();
                let _ = l.task.await;
                tracing::info!(instance = %key.0, replica = key.1, listen = %l.local, "MQTT listener closed");
            }
        }
        inner
            .instances
            .retain(|name, _| instances.iter().any(|i| &i.name == name));
        for i in instances {
            match inner.instances.get(&i.name) {
                Some(state) => state.set(i),
                None => {
                    inner
                        .instances
                        .insert(i.name.clone(), Arc::new(InstanceState::new(i)));
                }
            }
        }

        let mut first_error = None;
        let mut keys: Vec<_> = wanted.keys().cloned().collect();
        keys.sort();
        for key in keys {
            if inner.listeners.contains_key(&key) {
                continue;
            }
            let Some(&(addr, _)) = wanted.get(&key) else {
                continue;
            };
            let Some(state) = inner.instances.get(&key.0).cloned() else {
                continue;
            };
            match self.bind(state, key.1, addr).await {
                Ok(l) => {
                    tracing::info!(instance = %key.0, replica = key.1, listen = %l.local, "MQTT listener bound");
                    inner.listeners.insert(key, l);
                }
                Err(source) => {
                    tracing::error!(instance = %key.0, replica = key.1, %addr, error = %source, "cannot bind MQTT listener");
                    first_error.get_or_insert(MqttError::Bind {
                        instance: key.0.clone(),
                        slot: key.1,
                        addr,
                        source,
                    });
                }
            }
        }
        self.publish_stats(&inner);
        first_error.map_or(Ok(()), Err)
    }

    /// The bound listeners as (instance, slot, local address), sorted.
    pub async fn listeners(&self) -> Vec<(String, usize, SocketAddr)> {
        let inner = self.inner.lock().await;
        let mut v: Vec<_> = inner
            .listeners
            .iter()
            .map(|((name, slot), l)| (name.clone(), *slot, l.local))
            .collect();
        v.sort();
        v
    }

    /// The local address of one replica's listener.
    pub async fn listener(&self, instance: &str, slot: usize) -> Option<SocketAddr> {
        let inner = self.inner.lock().await;
        inner
            .listeners
            .get(&(instance.to_string(), slot))
            .map(|l| l.local)
    }

    /// Closes every listener and every connection.
    pub async fn shutdown(&self) {
        let _ = self.set_instances(&[]).await;
    }

    async fn bind(
        &self,
        instance: Arc<InstanceState>,
        slot: usize,
        addr: SocketAddr,
    ) -> std::io::Result<Listener> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let stats = Arc::new(MqttReplicaStats::new(instance.name.clone(), slot));
        let task = tokio::spawn(accept_loop(
            listener,
            instance,
            slot,
            stats.clone(),
            self.config.clone(),
            self.next_conn.clone(),
        ));
        Ok(Listener {
            requested: addr,
            local,
            stats,
            task,
        })
    }

    fn publish_stats(&self, inner: &Inner) {
        let mut v: Vec<_> = inner.listeners.values().map(|l| l.stats.clone()).collect();
        v.sort_by(|a, b| (&a.instance, a.slot).cmp(&(&b.instance, b.slot)));
        self.stats.mqtt.store(Arc::new(v));
    }
}

impl Drop for MqttProxy {
    fn drop(&mut self) {
        if let Ok(inner) = self.inner.try_lock() {
            for l in inner.listeners.values() {
                l.task.abort();
            }
        }
    }
}

/// Accepts connections of one replica until aborted; aborting drops every connection.
async fn accept_loop(
    listener: TcpListener,
    instance: Arc<InstanceState>,
    slot: usize,
    stats: Arc<MqttReplicaStats>,
    config: Arc<ArcSwap<MqttConfig>>,
    next_conn: Arc<AtomicU64>,
) {
    let mut conns = JoinSet::new();
    let label = format!("MQTT {}/r{slot}", instance.name);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Some((stream, peer)) =
                    crate::server::accepted_or_back_off(accepted, &label).await
                else {
                    continue;
                };
                let cx = conn::Context {
                    instance: instance.clone(),
                    rules: instance.rules.load_full().as_ref().clone(),
                    slot,
                    stats: stats.clone(),
                    config: config.load_full(),
                    id: next_conn.fetch_add(1, Ordering::Relaxed),
                };
                conns.spawn(conn::serve(stream, peer, cx));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}
