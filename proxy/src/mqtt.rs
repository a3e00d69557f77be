//! The MQTT proxy between Node-RED replicas and the broker, for HA instances.
//!
//! Every replica of an instance runs the same flows, so its MQTT nodes connect with the same
//! client id and subscribe to the same filters: the replicas would kick each other off the broker
//! and each would process every message. The proxy fixes that below the flows. It knows the
//! instance and slot of every connection from the listener it arrived on or from its
//! credentials (see *Two kinds of listener*), and each accepted connection gets its own
//! connection to the upstream broker. On an HA instance:
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
//! # Two kinds of listener
//! - **A replica's own listener** ([`MqttReplica::listen`]): the port says which replica a
//!   connection is, and the CONNECT passes with its credentials, if any, untouched. For
//!   replicas that reach a port of their own on the proxy: the local driver, a sidecar.
//! - **The shared listener** ([`MqttConfig::shared_listen`]): one port for every replica with an
//!   MQTT token ([`MqttReplica::token_sha256`]); the CONNECT says which replica it is, username
//!   `<instance>-r<slot>` ([`login::username`]), password the replica's token ([`login`]). It
//!   exists for Kubernetes: pods reach the proxies through a Service, and a Service lists a
//!   fixed set of ports, not ports that come and go with replicas; one port and credentials
//!   work behind any Service or load balancer. Bad credentials get CONNACK "not authorized"
//!   and never reach the broker. Username and password are removed before the CONNECT goes
//!   upstream, so the broker never sees a token; it gets no credentials from these clients at
//!   all, so it must let the proxies in without them (a listener only the proxies can reach).
//!
//! A connection the shared listener let in is handled exactly as one from the replica's own
//! listener: client-id suffix, shared subscriptions, retained holder, the replica's counters.
//! A replica may have both kinds, either, but not neither.
//!
//! # Layout
//! - [`frame`]: fixed header and remaining length.
//! - [`rewrite`]: CONNECT, SUBSCRIBE and UNSUBSCRIBE rewrites, credentials removed, topic
//!   filters.
//! - [`conn`]: one replica connection, both directions.
//! - [`login`]: the shared listener: credentials to replica, refusals.
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
pub mod login;
pub mod rewrite;
pub mod tls;

pub use login::{token_sha256, username};

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
    /// The shared listener, where replicas with a token connect and name themselves in their
    /// credentials (see the module docs). Bound, moved or closed by the next
    /// [`MqttProxy::set_instances`]; port 0 picks a free port (see
    /// [`MqttProxy::shared_listener`]). Default `None`: no shared listener.
    pub shared_listen: Option<SocketAddr>,
    /// Time a client of the shared listener has to send its whole CONNECT; past it the
    /// connection is closed. Until then the client is unknown and has no broker connection.
    /// Default 10 s.
    pub login_timeout: Duration,
}

impl MqttConfig {
    /// Default settings for the broker at `upstream` (`host:port`).
    pub fn new(upstream: impl Into<String>) -> Self {
        Self {
            upstream: upstream.into(),
            connect_timeout: Duration::from_secs(5),
            max_packet_bytes: DEFAULT_MAX_PACKET_BYTES,
            tls: None,
            shared_listen: None,
            login_timeout: Duration::from_secs(10),
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
        if self.login_timeout.is_zero() {
            return Err(MqttError::InvalidLoginTimeout);
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
    /// The replicas and how they reach the proxy.
    pub replicas: Vec<MqttReplica>,
}

/// How one replica reaches the proxy: its own listener, the shared listener, or both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttReplica {
    /// The replica's slot: `r<slot>` in metrics, `-r<slot>` on client ids and in its shared
    /// listener username. Stable across restarts.
    pub slot: usize,
    /// The replica's own listener, where its MQTT nodes connect. Port 0 picks a free port; see
    /// [`MqttProxy::listeners`]. `None`: no listener of its own.
    pub listen: Option<SocketAddr>,
    /// Hex SHA-256 of the replica's MQTT token ([`token_sha256`]): the replica may connect
    /// through the shared listener as `<instance>-r<slot>` with the token as password. The
    /// proxy keeps only this hash. `None`: not through the shared listener. A new value closes
    /// the connections made with the old token.
    pub token_sha256: Option<String>,
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
        /// `instance/r<slot>` (or `the shared listener`) that has it first.
        first: String,
        /// `instance/r<slot>` that has it again.
        second: String,
    },
    /// A token hash is not a SHA-256 in hex.
    #[error("MQTT: instance {instance:?}: token_sha256 of r{slot} is not 64 hex digits; give the hex SHA-256 of the replica's MQTT token")]
    InvalidTokenHash {
        /// The instance.
        instance: String,
        /// The slot.
        slot: usize,
    },
    /// A replica with neither a listener nor a token could never connect.
    #[error("MQTT: instance {instance:?}: r{slot} has neither a listener nor a token; give it listen, or token_sha256 to connect through the shared listener")]
    Unreachable {
        /// The instance.
        instance: String,
        /// The slot.
        slot: usize,
    },
    /// The login timeout is zero.
    #[error("MQTT login_timeout must be more than 0")]
    InvalidLoginTimeout,
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
    /// The shared listener could not be bound. The other listeners were applied.
    #[error("MQTT: cannot listen on {addr} for the shared listener: {source}")]
    BindShared {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Checks a list of instances without applying it.
pub fn validate(instances: &[MqttInstance]) -> Result<(), MqttError> {
    validate_with(None, instances)
}

/// [`validate`], and that no replica listens on the shared listener's address.
fn validate_with(shared: Option<SocketAddr>, instances: &[MqttInstance]) -> Result<(), MqttError> {
    let mut names = std::collections::HashSet::new();
    let mut addrs: HashMap<SocketAddr, String> = HashMap::new();
    if let Some(addr) = shared.filter(|a| a.port() != 0) {
        addrs.insert(addr, "the shared listener".into());
    }
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
            if let Some(listen) = r.listen.filter(|a| a.port() != 0) {
                if let Some(first) = addrs.insert(listen, who.clone()) {
                    return Err(MqttError::DuplicateListener {
                        addr: listen,
                        first,
                        second: who,
                    });
                }
            }
            match &r.token_sha256 {
                Some(hex) if login::parse_sha256(hex).is_none() => {
                    return Err(MqttError::InvalidTokenHash {
                        instance: i.name.clone(),
                        slot: r.slot,
                    });
                }
                None if r.listen.is_none() => {
                    return Err(MqttError::Unreachable {
                        instance: i.name.clone(),
                        slot: r.slot,
                    });
                }
                _ => {}
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

/// A bound listener: a replica's own, or the shared one.
struct Listener {
    requested: SocketAddr,
    local: SocketAddr,
    task: JoinHandle<()>,
}

impl Listener {
    /// Stops accepting and drops the connections it accepted; returns once its socket is
    /// closed, so its address can be bound again right away.
    async fn close(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// A listed replica.
struct Replica {
    /// Its counters, kept while it is listed, whichever listeners it has.
    stats: Arc<MqttReplicaStats>,
    /// Its own listener, once bound.
    listener: Option<Listener>,
    /// Its token for the shared listener.
    token: Option<HeldToken>,
}

/// A replica's token as [`MqttProxy::set_instances`] holds it.
struct HeldToken {
    digest: [u8; 32],
    /// Never sent on: dropping it ends the connections made with this token.
    open: tokio::sync::watch::Sender<()>,
}

#[derive(Default)]
struct Inner {
    instances: HashMap<String, Arc<InstanceState>>,
    replicas: HashMap<(String, usize), Replica>,
    shared: Option<Listener>,
}

/// The MQTT proxy: a listener per replica and a shared one (see the module docs), bound and
/// closed by [`MqttProxy::set_instances`].
///
/// ```no_run
/// # async fn f() -> Result<(), tandem_proxy::mqtt::MqttError> {
/// use std::sync::Arc;
/// use tandem_proxy::mqtt::{token_sha256, MqttConfig, MqttInstance, MqttProxy, MqttReplica};
/// let stats = Arc::new(tandem_proxy::ProxyStats::default()); // the HTTP proxy's, for /metrics
/// let mut config = MqttConfig::new("127.0.0.1:1883");
/// config.shared_listen = Some("0.0.0.0:1883".parse().unwrap());
/// let mqtt = MqttProxy::new(config, stats)?;
/// mqtt.set_instances(&[MqttInstance {
///     name: "orders".into(),
///     ha: true,
///     exclude: vec!["replies/#".into()],
///     replicas: vec![
///         // Its own listener.
///         MqttReplica { slot: 0, listen: Some("127.0.0.1:0".parse().unwrap()), token_sha256: None },
///         // The shared listener, as user "orders-r1" with password "token-of-r1".
///         MqttReplica { slot: 1, listen: None, token_sha256: Some(token_sha256(b"token-of-r1")) },
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
    /// Who may log in on the shared listener; replaced whole by `set_instances`.
    logins: Arc<ArcSwap<login::Logins>>,
    /// Connections the shared listener closed before they reached a replica.
    rejected: Arc<AtomicU64>,
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
            inner: tokio::sync::Mutex::default(),
            next_conn: Arc::new(AtomicU64::new(1)),
            logins: Arc::new(ArcSwap::from_pointee(login::Logins::default())),
            rejected: stats.mqtt_shared_rejected.clone(),
            stats,
        })
    }

    /// Replaces the settings; connections accepted from now on use them. A changed
    /// [`MqttConfig::shared_listen`] applies at the next [`MqttProxy::set_instances`].
    pub fn set_config(&self, config: MqttConfig) -> Result<(), MqttError> {
        config.validate()?;
        self.config.store(Arc::new(config));
        Ok(())
    }

    /// The settings in use.
    pub fn config(&self) -> Arc<MqttConfig> {
        self.config.load_full()
    }

    /// Makes the listeners those of `instances`, and the shared listener that of the settings
    /// ([`MqttConfig::shared_listen`]). A replica keeps its counters while it is listed. One
    /// whose requested address is unchanged keeps its listener and its open connections (a
    /// changed `ha` or `exclude` applies to its next connections); one whose token is
    /// unchanged keeps its connections through the shared listener, and a changed or removed
    /// token closes them. Listeners no longer wanted are closed together with their
    /// connections, then new ones bound. The list is validated first and refused whole when
    /// invalid; a bind failure is returned after the other listeners were applied.
    pub async fn set_instances(&self, instances: &[MqttInstance]) -> Result<(), MqttError> {
        self.apply(instances, true).await
    }

    async fn apply(&self, instances: &[MqttInstance], shared: bool) -> Result<(), MqttError> {
        let shared_addr = self.config.load().shared_listen.filter(|_| shared);
        validate_with(shared_addr, instances)?;
        let mut inner = self.inner.lock().await;
        let wanted: HashMap<(String, usize), &MqttReplica> = instances
            .iter()
            .flat_map(|i| {
                i.replicas
                    .iter()
                    .map(move |r| ((i.name.clone(), r.slot), r))
            })
            .collect();

        // Close what is gone or moved, and wait until its socket is closed, so its address
        // can be bound again right away.
        let moved: Vec<(String, usize)> = inner
            .replicas
            .iter()
            .filter(|(k, r)| {
                r.listener
                    .as_ref()
                    .is_some_and(|l| wanted.get(*k).and_then(|r| r.listen) != Some(l.requested))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in moved {
            let listener = inner.replicas.get_mut(&key).and_then(|r| r.listener.take());
            if let Some(l) = listener {
                let local = l.local;
                l.close().await;
                tracing::info!(instance = %key.0, replica = key.1, listen = %local, "MQTT listener closed");
            }
        }
        // Replicas no longer listed: dropping their tokens ends their shared connections.
        inner.replicas.retain(|k, _| wanted.contains_key(k));
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

        let mut keys: Vec<_> = wanted.keys().cloned().collect();
        keys.sort();
        for key in &keys {
            let (Some(state), Some(r)) = (inner.instances.get(&key.0).cloned(), wanted.get(key))
            else {
                continue;
            };
            let replica = inner
                .replicas
                .entry(key.clone())
                .or_insert_with(|| Replica {
                    stats: Arc::new(MqttReplicaStats::new(state.name.clone(), key.1)),
                    listener: None,
                    token: None,
                });
            let digest = r.token_sha256.as_deref().and_then(login::parse_sha256);
            if replica.token.as_ref().map(|t| t.digest) != digest {
                if replica.token.is_some() {
                    tracing::info!(instance = %key.0, replica = key.1, "MQTT token replaced or removed: its shared-listener connections close");
                }
                replica.token = digest.map(|digest| HeldToken {
                    digest,
                    open: tokio::sync::watch::channel(()).0,
                });
            }
        }
        // The list the shared listener checks logins against, before any listener is bound.
        let mut logins = login::Logins::default();
        for ((name, slot), r) in &inner.replicas {
            if let Some(instance) = inner.instances.get(name) {
                logins.insert(login::Replica {
                    instance: instance.clone(),
                    slot: *slot,
                    stats: r.stats.clone(),
                    token: r.token.as_ref().map(|t| login::Token {
                        digest: t.digest,
                        open: t.open.subscribe(),
                    }),
                });
            }
        }
        self.logins.store(Arc::new(logins));

        let mut first_error = None;
        for key in keys {
            let Some(addr) = wanted.get(&key).and_then(|r| r.listen) else {
                continue;
            };
            let (Some(state), Some(replica)) = (
                inner.instances.get(&key.0).cloned(),
                inner.replicas.get(&key),
            ) else {
                continue;
            };
            if replica.listener.is_some() {
                continue;
            }
            match self.bind(state, key.1, replica.stats.clone(), addr).await {
                Ok(l) => {
                    tracing::info!(instance = %key.0, replica = key.1, listen = %l.local, "MQTT listener bound");
                    if let Some(replica) = inner.replicas.get_mut(&key) {
                        replica.listener = Some(l);
                    }
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

        if inner
            .shared
            .as_ref()
            .is_some_and(|l| Some(l.requested) != shared_addr)
        {
            if let Some(l) = inner.shared.take() {
                let local = l.local;
                l.close().await;
                tracing::info!(listen = %local, "MQTT shared listener closed");
            }
        }
        if let (None, Some(addr)) = (&inner.shared, shared_addr) {
            match self.bind_shared(addr).await {
                Ok(l) => {
                    tracing::info!(listen = %l.local, "MQTT shared listener bound");
                    inner.shared = Some(l);
                }
                Err(source) => {
                    tracing::error!(%addr, error = %source, "cannot bind the MQTT shared listener");
                    first_error.get_or_insert(MqttError::BindShared { addr, source });
                }
            }
        }
        self.publish_stats(&inner);
        first_error.map_or(Ok(()), Err)
    }

    /// The bound listeners of replicas as (instance, slot, local address), sorted.
    pub async fn listeners(&self) -> Vec<(String, usize, SocketAddr)> {
        let inner = self.inner.lock().await;
        let mut v: Vec<_> = inner
            .replicas
            .iter()
            .filter_map(|((name, slot), r)| Some((name.clone(), *slot, r.listener.as_ref()?.local)))
            .collect();
        v.sort();
        v
    }

    /// The local address of one replica's listener.
    pub async fn listener(&self, instance: &str, slot: usize) -> Option<SocketAddr> {
        let inner = self.inner.lock().await;
        inner
            .replicas
            .get(&(instance.to_string(), slot))
            .and_then(|r| r.listener.as_ref())
            .map(|l| l.local)
    }

    /// The local address of the shared listener, while it is bound.
    pub async fn shared_listener(&self) -> Option<SocketAddr> {
        self.inner.lock().await.shared.as_ref().map(|l| l.local)
    }

    /// Connections the shared listener closed before they reached a replica (bad or missing
    /// credentials, no CONNECT in time, not MQTT), since the proxy started; on `/metrics` as
    /// `tandem_proxy_mqtt_shared_rejected_total`. A refusal that
    /// names a listed replica is also counted in that replica's errors, kind `protocol`.
    pub fn shared_rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    /// Closes every listener, the shared one included, and every connection.
    pub async fn shutdown(&self) {
        let _ = self.apply(&[], false).await;
    }

    async fn bind(
        &self,
        instance: Arc<InstanceState>,
        slot: usize,
        stats: Arc<MqttReplicaStats>,
        addr: SocketAddr,
    ) -> std::io::Result<Listener> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let task = tokio::spawn(accept_loop(
            listener,
            instance,
            slot,
            stats,
            self.config.clone(),
            self.next_conn.clone(),
        ));
        Ok(Listener {
            requested: addr,
            local,
            task,
        })
    }

    async fn bind_shared(&self, addr: SocketAddr) -> std::io::Result<Listener> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let task = tokio::spawn(login::accept_loop(
            listener,
            self.logins.clone(),
            self.config.clone(),
            self.next_conn.clone(),
            self.rejected.clone(),
        ));
        Ok(Listener {
            requested: addr,
            local,
            task,
        })
    }

    fn publish_stats(&self, inner: &Inner) {
        let mut v: Vec<_> = inner.replicas.values().map(|r| r.stats.clone()).collect();
        v.sort_by(|a, b| (&a.instance, a.slot).cmp(&(&b.instance, b.slot)));
        self.stats.mqtt.store(Arc::new(v));
    }
}

impl Drop for MqttProxy {
    fn drop(&mut self) {
        if let Ok(inner) = self.inner.try_lock() {
            let own = inner.replicas.values().filter_map(|r| r.listener.as_ref());
            for l in own.chain(&inner.shared) {
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
                conns.spawn(conn::serve(stream, peer, cx, bytes::BytesMut::new()));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}
