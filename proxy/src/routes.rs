//! The route table: host names → instances → replicas.
//!
//! A [`RouteTable`] is immutable. Whoever owns the routes (the routes file watcher in
//! `tandem proxy`, the coordinator in `tandem serve`) builds a new one from a list of
//! [`InstanceSpec`]s and swaps it in through [`Routes::publish`]. Requests load the current
//! table once, clone the `Arc<Instance>` they need and keep it for their whole life, so a swap
//! never changes the instance or replica an in-flight request talks to.
//!
//! Per-replica state that must outlive a table (health, passive ejection, in-flight count,
//! pooled upstream connections, counters) lives in an `Arc<ReplicaState>` that the next table
//! carries over when the replica keeps its id and address.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::health::{self, HealthConfig, ReplicaState};
use crate::metrics::InstanceStats;

pub mod feed;
pub mod file;

/// Largest number of replicas one instance may have. Bounded so that a request can track the
/// replicas it already tried in one `u64`.
pub const MAX_REPLICAS: usize = 64;

/// What an instance should look like: the input to [`Routes::publish`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceSpec {
    /// DNS-safe name, unique in a table; used in metrics and logs.
    pub name: String,
    /// Host names served by this instance, matched case-insensitively without port or trailing dot.
    pub hosts: Vec<String>,
    /// HA instances have the editor (`/admin`) blocked at the proxy.
    pub ha: bool,
    /// The secret the instance's admin API accepts. When set, the editor (`/admin`) of a
    /// non-HA instance is reachable only through the proxy's [`crate::EditorGate`], which adds
    /// this secret upstream as `x-tandem-token`; Tandem's own credentials (session cookie,
    /// `tdm_` bearer tokens) are removed from every request to the instance. When unset
    /// (`tandem proxy` with a routes file), `/admin` of a non-HA instance passes through as is.
    pub editor_secret: Option<String>,
    /// Who may call the instance's own endpoints (not `/admin`); checked through the
    /// [`crate::EditorGate`]. Without a gate, anything but [`crate::HttpAuth::None`] refuses
    /// every request.
    pub http_auth: crate::HttpAuth,
    /// Pin clients to a replica with a cookie (consistent hashing), for WebSocket and dashboards.
    pub affinity: bool,
    /// A replica is expected to be ready soon whenever none is (a standby taking over, a deploy
    /// switching the active, a start): a request that finds none ready waits for one, up to
    /// [`crate::ProxyConfig::hold_timeout`], rather than getting 503 at once.
    pub hold: bool,
    /// The replicas, in slot order.
    pub replicas: Vec<ReplicaSpec>,
    /// Active health checking; `None` turns active probes off (passive ejection stays on).
    pub health: Option<HealthConfig>,
    /// The instance sleeps (issue 17): its replicas are stopped until a request comes; that
    /// request calls the proxy's [`crate::activity::Waker`] and waits for a replica (set
    /// [`InstanceSpec::hold`] too).
    pub asleep: bool,
    /// The instance's own certificate, served by TLS listeners for those of its hosts it covers
    /// (a custom hostname); the proxy's files serve the others. One that does not parse is
    /// logged and left out, and the table is still published.
    pub certificate: Option<crate::tls::PemKeyPair>,
}

/// One replica of an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaSpec {
    /// Stable id, unique within the instance; sent as `X-Tandem-Replica` and used as a label.
    pub id: String,
    /// Where the replica listens.
    pub addr: SocketAddr,
    /// Whether the replica may take traffic (false while starting, draining or deploying).
    pub ready: bool,
}

/// Why a list of specs cannot become a route table.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    /// The instance name is not DNS-safe.
    #[error("instance name {0:?} is invalid: use 1-63 characters a-z, 0-9 and '-', starting with a letter and not ending with '-'")]
    InvalidName(String),
    /// Two instances share a name.
    #[error("instance name {0:?} is used twice")]
    DuplicateName(String),
    /// A host name is malformed.
    #[error("instance {instance:?}: host {host:?} is not a valid host name")]
    InvalidHost {
        /// The instance that lists the host.
        instance: String,
        /// The host as written.
        host: String,
    },
    /// Two instances (or one instance twice) claim a host.
    #[error("host {host:?} is claimed by both {first:?} and {second:?}")]
    DuplicateHost {
        /// The normalized host.
        host: String,
        /// The instance that claimed it first.
        first: String,
        /// The instance that claimed it again.
        second: String,
    },
    /// An instance lists no host.
    #[error("instance {0:?} has no host names")]
    NoHosts(String),
    /// An instance has too many replicas.
    #[error("instance {0:?} has more than {MAX_REPLICAS} replicas")]
    TooManyReplicas(String),
    /// A replica id is not usable as a label and header value.
    #[error("instance {instance:?}: replica id {id:?} is invalid: use 1-63 characters a-z, A-Z, 0-9, '.', '_' and '-'")]
    InvalidReplicaId {
        /// The instance.
        instance: String,
        /// The id as written.
        id: String,
    },
    /// Two replicas of one instance share an id.
    #[error("instance {instance:?}: replica id {id:?} is used twice")]
    DuplicateReplica {
        /// The instance.
        instance: String,
        /// The repeated id.
        id: String,
    },
    /// The health check settings are unusable.
    #[error("instance {instance:?}: {reason}")]
    InvalidHealth {
        /// The instance.
        instance: String,
        /// What is wrong.
        reason: String,
    },
}

/// An immutable snapshot of every route. Cheap to read, rebuilt whole on every change.
#[derive(Debug, Default)]
pub struct RouteTable {
    hosts: HashMap<Box<str>, Arc<Instance>>,
    instances: Vec<Arc<Instance>>,
    generation: u64,
}

/// An instance as the proxy sees it.
#[derive(Debug)]
pub struct Instance {
    /// The instance's name.
    pub name: Arc<str>,
    /// Normalized host names.
    pub hosts: Vec<Box<str>>,
    /// HA: editor blocked.
    pub ha: bool,
    /// The admin secret added to editor requests that the gate lets through.
    pub editor_secret: Option<http::HeaderValue>,
    /// Who may call its own endpoints.
    pub http_auth: crate::HttpAuth,
    /// Cookie affinity on.
    pub affinity: bool,
    /// Requests wait for a ready replica when none is (see [`InstanceSpec::hold`]).
    pub hold: bool,
    /// Replicas in slot order.
    pub replicas: Vec<Replica>,
    /// Active health check settings, if any.
    pub health: Option<HealthConfig>,
    /// Its own certificate, parsed, and the hosts it covers.
    pub(crate) certificate: Option<InstanceCertificate>,
    /// It sleeps: a request wakes it.
    pub asleep: bool,
    /// Counters that survive table swaps.
    pub(crate) stats: Arc<InstanceStats>,
}

/// An instance's own certificate, as its TLS listeners serve it.
#[derive(Debug, Clone)]
pub(crate) struct InstanceCertificate {
    /// As published; a new table with the same pair reuses the parsed key.
    pem: crate::tls::PemKeyPair,
    key: Arc<tokio_rustls::rustls::sign::CertifiedKey>,
    /// The instance's hosts the certificate is valid for.
    covers: Vec<Box<str>>,
    /// Its `notAfter`, seconds since the Unix epoch.
    pub(crate) not_after: Option<u64>,
}

impl Instance {
    /// The instance's own certificate, when it covers `host`.
    pub(crate) fn certificate_for(
        &self,
        host: &str,
    ) -> Option<Arc<tokio_rustls::rustls::sign::CertifiedKey>> {
        let c = self.certificate.as_ref()?;
        c.covers.iter().any(|h| **h == *host).then(|| c.key.clone())
    }
}

/// An instance's certificate for `hosts`: the one `before` had when the pair is unchanged, else
/// parsed; `None` (logged) when it does not parse or covers none of them.
fn instance_certificate(
    name: &str,
    pem: &crate::tls::PemKeyPair,
    hosts: &[Box<str>],
    before: Option<&Instance>,
) -> Option<InstanceCertificate> {
    if let Some(c) = before.and_then(|b| b.certificate.as_ref()) {
        if c.pem == *pem {
            let covers = hosts
                .iter()
                .filter(|h| crate::tls::covers(&c.key, h))
                .cloned()
                .collect();
            return Some(InstanceCertificate {
                pem: c.pem.clone(),
                key: c.key.clone(),
                covers,
                not_after: c.not_after,
            });
        }
    }
    match crate::tls::key_pair(pem.certificate.as_bytes(), pem.key.as_bytes()) {
        Ok(key) => {
            let covers: Vec<Box<str>> = hosts
                .iter()
                .filter(|h| crate::tls::covers(&key, h))
                .cloned()
                .collect();
            if covers.is_empty() {
                tracing::warn!(instance = %name, "the instance's certificate covers none of its hosts; its hosts get the proxy's own");
            }
            Some(InstanceCertificate {
                not_after: crate::tls::expiry_checked(&key, name),
                pem: pem.clone(),
                key,
                covers,
            })
        }
        Err(error) => {
            tracing::warn!(instance = %name, %error, "the instance's certificate is unusable; its hosts get the proxy's own");
            None
        }
    }
}

/// A replica as the proxy sees it.
#[derive(Debug)]
pub struct Replica {
    /// Stable id within the instance.
    pub id: Arc<str>,
    /// Upstream address.
    pub addr: SocketAddr,
    /// The id as a header value, for `X-Tandem-Replica`.
    pub(crate) header: http::HeaderValue,
    /// Health, load and pool, shared with earlier and later tables.
    pub state: Arc<ReplicaState>,
}

/// The live route table: one `ArcSwap` that readers load and writers replace whole.
#[derive(Debug)]
pub struct Routes {
    current: ArcSwap<RouteTable>,
    generation: AtomicU64,
    /// Where replicas' health verdicts go ([`Routes::verdicts`]).
    verdicts: health::VerdictFeed,
    /// The generation of each table swapped in ([`Routes::swaps`]).
    swaps: tokio::sync::watch::Sender<u64>,
}

impl Default for Routes {
    fn default() -> Self {
        Self {
            current: ArcSwap::default(),
            generation: AtomicU64::new(0),
            verdicts: health::VerdictFeed::new(),
            swaps: tokio::sync::watch::Sender::new(0),
        }
    }
}

// === impl Routes ===

impl Routes {
    /// An empty table: every host is unknown.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current table. Hold it only for the duration of a lookup.
    pub fn load(&self) -> arc_swap::Guard<Arc<RouteTable>> {
        self.current.load()
    }

    /// The current table as an owned `Arc`.
    pub fn snapshot(&self) -> Arc<RouteTable> {
        self.current.load_full()
    }

    /// Validates `specs`, builds a new table that carries over the state of replicas that kept
    /// their id and address, and swaps it in. Starts active health probes for new replicas when
    /// called inside a tokio runtime. On error the current table stays, and so do the readiness
    /// and probe settings of its replicas.
    pub fn publish(&self, specs: &[InstanceSpec]) -> Result<Arc<RouteTable>, RouteError> {
        let previous = self.current.load_full();
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let table = Arc::new(RouteTable::build(
            specs,
            &previous,
            generation,
            &self.verdicts,
        )?);
        self.current.store(table.clone());
        table.configure_replicas(specs);
        self.swaps.send_replace(generation);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            for (i, instance) in table.instances.iter().enumerate() {
                for r in 0..instance.replicas.len() {
                    health::spawn_probe(&rt, &table, i, r);
                }
            }
        }
        Ok(table)
    }

    /// Changes once per table swapped in (after its replicas' readiness is set): for requests
    /// waiting for a ready replica.
    pub fn swaps(&self) -> tokio::sync::watch::Receiver<u64> {
        self.swaps.subscribe()
    }

    /// The health verdicts of every replica from now on: a replica that fails its active probes
    /// or gets ejected after a failed connect, and one that passes its probes again. For the
    /// owner of the routes (the coordinator), which may act on them; a receiver that falls
    /// behind loses the oldest.
    pub fn verdicts(&self) -> tokio::sync::broadcast::Receiver<health::Verdict> {
        self.verdicts.subscribe()
    }
}

// === impl RouteTable ===

impl RouteTable {
    /// Finds the instance serving `host`, which must already be normalized ([`normalize_host`]).
    pub fn lookup(&self, host: &str) -> Option<&Arc<Instance>> {
        self.hosts.get(host)
    }

    /// Every instance, in the order of the specs.
    pub fn instances(&self) -> &[Arc<Instance>] {
        &self.instances
    }

    /// Number of host names in the table.
    pub fn host_count(&self) -> usize {
        self.hosts.len()
    }

    /// Increases with every published table.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Applies each replica's readiness and its instance's probe settings from `specs`, the
    /// list this table was built from (same order, instance by instance and replica by replica).
    /// Called only once the table is live: a replica's state is shared with the table before,
    /// and changing it earlier would let a table that is then refused change live routing.
    fn configure_replicas(&self, specs: &[InstanceSpec]) {
        for (instance, spec) in self.instances.iter().zip(specs) {
            for (replica, r) in instance.replicas.iter().zip(&spec.replicas) {
                replica.state.configure(r.ready, spec.health.as_ref());
            }
        }
    }

    /// Builds a table, carrying over the state of replicas that `previous` already had. Leaves
    /// the state it carries over untouched (see [`RouteTable::configure_replicas`]).
    fn build(
        specs: &[InstanceSpec],
        previous: &RouteTable,
        generation: u64,
        verdicts: &health::VerdictFeed,
    ) -> Result<RouteTable, RouteError> {
        let old: HashMap<&str, &Arc<Instance>> =
            previous.instances.iter().map(|i| (&*i.name, i)).collect();
        let mut hosts: HashMap<Box<str>, Arc<Instance>> = HashMap::new();
        let mut instances = Vec::with_capacity(specs.len());
        let mut names: std::collections::HashSet<&str> = std::collections::HashSet::new();

        for spec in specs {
            validate_name(&spec.name)?;
            if !names.insert(&spec.name) {
                return Err(RouteError::DuplicateName(spec.name.clone()));
            }
            if spec.hosts.is_empty() {
                return Err(RouteError::NoHosts(spec.name.clone()));
            }
            if spec.replicas.len() > MAX_REPLICAS {
                return Err(RouteError::TooManyReplicas(spec.name.clone()));
            }
            if let Some(health) = &spec.health {
                health
                    .validate()
                    .map_err(|reason| RouteError::InvalidHealth {
                        instance: spec.name.clone(),
                        reason,
                    })?;
            }
            let before = old.get(spec.name.as_str()).copied();

            let mut replicas: Vec<Replica> = Vec::with_capacity(spec.replicas.len());
            for r in &spec.replicas {
                let header = valid_replica_id(&r.id)
                    .then(|| http::HeaderValue::from_str(&r.id).ok())
                    .flatten()
                    .ok_or_else(|| RouteError::InvalidReplicaId {
                        instance: spec.name.clone(),
                        id: r.id.clone(),
                    })?;
                if replicas.iter().any(|x| *x.id == *r.id) {
                    return Err(RouteError::DuplicateReplica {
                        instance: spec.name.clone(),
                        id: r.id.clone(),
                    });
                }
                let kept = before.and_then(|i| {
                    i.replicas
                        .iter()
                        .find(|x| *x.id == *r.id && x.addr == r.addr)
                });
                let state = match kept {
                    // Shared with the live table: configured by `publish` once this table has
                    // been validated and swapped in, so a refused table changes nothing.
                    Some(k) => k.state.clone(),
                    // Seen by nobody until the swap: configured now, so a new replica is
                    // ready the moment its table goes live.
                    None => {
                        let state = Arc::new(ReplicaState::new(verdicts.clone()));
                        state.configure(r.ready, spec.health.as_ref());
                        state
                    }
                };
                replicas.push(Replica {
                    id: r.id.as_str().into(),
                    addr: r.addr,
                    header,
                    state,
                });
            }
            let mut normalized = Vec::with_capacity(spec.hosts.len());
            for host in &spec.hosts {
                let Some(n) = normalize_host(host) else {
                    return Err(RouteError::InvalidHost {
                        instance: spec.name.clone(),
                        host: host.clone(),
                    });
                };
                normalized.push(n.into_owned().into_boxed_str());
            }

            let certificate = spec.certificate.as_ref().and_then(|pem| {
                instance_certificate(&spec.name, pem, &normalized, before.map(|b| &**b))
            });
            let instance = Arc::new(Instance {
                name: spec.name.as_str().into(),
                certificate,
                asleep: spec.asleep,
                hosts: normalized,
                ha: spec.ha,
                editor_secret: spec
                    .editor_secret
                    .as_deref()
                    .and_then(|s| http::HeaderValue::from_str(s).ok())
                    .map(|mut v| {
                        v.set_sensitive(true);
                        v
                    }),
                http_auth: spec.http_auth,
                affinity: spec.affinity,
                hold: spec.hold,
                replicas,
                health: spec.health.clone(),
                stats: before.map(|i| i.stats.clone()).unwrap_or_default(),
            });
            for host in &instance.hosts {
                if let Some(first) = hosts.insert(host.clone(), instance.clone()) {
                    return Err(RouteError::DuplicateHost {
                        host: host.to_string(),
                        first: first.name.to_string(),
                        second: spec.name.clone(),
                    });
                }
            }
            instances.push(instance);
        }
        Ok(RouteTable {
            hosts,
            instances,
            generation,
        })
    }
}

/// Checks an instance name: `[a-z][a-z0-9-]{0,62}`, not ending with `-`.
pub fn validate_name(name: &str) -> Result<(), RouteError> {
    let bytes = name.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= 63
        && bytes[0].is_ascii_lowercase()
        && bytes[bytes.len() - 1] != b'-'
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-');
    if ok {
        Ok(())
    } else {
        Err(RouteError::InvalidName(name.to_string()))
    }
}

/// Normalizes a `Host` value (or a URI authority): lower-cased, port removed, one trailing dot
/// removed. Returns `None` when it is not a plausible host: empty, too long, a character outside
/// letters, digits, `-`, `.` and `_`, an empty label, or a bad port. Bracketed IPv6 literals are
/// kept with their brackets. Borrows when the input is already normalized.
pub fn normalize_host(raw: &str) -> Option<std::borrow::Cow<'_, str>> {
    let host = if let Some(rest) = raw.strip_prefix('[') {
        // IPv6 literal: "[::1]" or "[::1]:8080".
        let end = rest.find(']')?;
        let after = &rest[end + 1..];
        if !(after.is_empty() || valid_port(after.strip_prefix(':')?)) {
            return None;
        }
        let inner = &rest[..end];
        if inner.is_empty()
            || !inner
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return None;
        }
        &raw[..end + 2]
    } else {
        let (host, port) = match raw.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (raw, None),
        };
        if let Some(p) = port {
            if !valid_port(p) {
                return None;
            }
        }
        let host = host.strip_suffix('.').unwrap_or(host);
        if host.is_empty()
            || host.len() > 253
            || host.split('.').any(str::is_empty)
            || !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        {
            return None;
        }
        host
    };
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Some(std::borrow::Cow::Owned(host.to_ascii_lowercase()))
    } else {
        Some(std::borrow::Cow::Borrowed(host))
    }
}

fn valid_replica_id(id: &str) -> bool {
    (1..=63).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

fn valid_port(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 5
        && p.bytes().all(|b| b.is_ascii_digit())
        && p.parse::<u16>().is_ok()
}

#[cfg(test)]
mod tests;
