//! One leader among the control planes that share a database (issue 13): the one that holds the
//! coordinator's lease runs the coordinator; the others serve the API by forwarding it to the
//! leader ([`forward`]).
//!
//! The lease is a row in the database (`leases`), not a session lock: a stopped (SIGSTOP)
//! leader keeps its connection open, and a lock tied to it would never let go. The holder
//! renews it every third of its time to live; another control plane takes it once it has
//! expired, by the database's clock, and the term grows by one. A leader checks its own lease
//! before every action of its coordinator ([`Leadership::may_act`]): it may act only until one
//! time to live, less a margin, after the start of its last successful renewal, by its own
//! monotonic clock. The database's expiry comes later than that, so two leaders never act at
//! once, even when the old one wakes up from a stop on a stale term.
//!
//! On a Kubernetes cluster (`--driver kubernetes`) the lease is the cluster's `coordination.k8s.io`
//! Lease instead ([`LeaseBackend::Kubernetes`], [`tandem_kube::lease`]), with the same rules for
//! acting; the database still lists the control planes for `GET /api/v1/cluster`.

use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use sqlx::Row;
use tokio::sync::watch;

use crate::error::ApiError;
use crate::state::AppState;
use crate::store::{Backend, Store};

/// Longest wait for the leader's answer (its head: streams then flow as long as they last).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// The header a forwarded request carries: the follower's id. A control plane that does not
/// lead answers such a request 503 rather than forward it again.
pub const FORWARDED: &str = "x-tandem-forwarded-by";

/// The API on a control plane that does not lead: every request goes to the leader, whose
/// coordinator holds the observed state, the logs and the deploys; 503 while no leader is
/// known (a takeover takes up to one lease time to live).
pub async fn forward(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    if state.leadership.may_act() {
        return next.run(req).await;
    }
    let unavailable = |why: String| {
        let mut r = ApiError::Unavailable(why).into_response();
        r.headers_mut().insert(
            http::header::RETRY_AFTER,
            http::HeaderValue::from_static("1"),
        );
        r
    };
    if req.headers().contains_key(FORWARDED) {
        return unavailable("this control plane does not lead either; retry".into());
    }
    let Some(address) = state.leadership.leader_address() else {
        return unavailable(
            "no control plane leads right now (a takeover is under way); retry".into(),
        );
    };
    if let Ok(v) = http::HeaderValue::from_str(&state.leadership.id) {
        req.headers_mut().insert(FORWARDED, v);
    }
    // A leader that stopped (SIGSTOP) still accepts connections: its answer is waited for
    // only so long, then the lease moves on.
    match tokio::time::timeout(FORWARD_TIMEOUT, send(&address, req)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => unavailable(format!(
            "the leading control plane at {address} did not answer: {e}"
        )),
        Err(_) => unavailable(format!(
            "the leading control plane at {address} did not answer within {FORWARD_TIMEOUT:?}"
        )),
    }
}

async fn send(address: &str, req: Request) -> Result<Response, String> {
    let stream = tokio::net::TcpStream::connect(address)
        .await
        .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let res = sender.send_request(req).await.map_err(|e| e.to_string())?;
    Ok(res.map(axum::body::Body::new))
}

/// The lease's name.
const LEASE: &str = "coordinator";

/// What this control plane knows of the lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Not known yet, or the database cannot be reached.
    Unknown,
    /// This control plane leads, with this term, until `valid_until`.
    Leader {
        /// The term: grows with every new leader.
        term: i64,
        /// When it stops acting unless the lease is renewed first.
        valid_until: Instant,
    },
    /// Another control plane leads.
    Follower {
        /// The leader's id.
        leader: String,
        /// Where its API listens.
        address: String,
        /// Its term.
        term: i64,
    },
}

/// This control plane's view of the lease, shared with the API and the coordinator.
#[derive(Debug, Clone)]
pub struct Leadership {
    /// This control plane's id.
    pub id: String,
    role: watch::Receiver<Role>,
}

impl Leadership {
    /// The current role.
    pub fn role(&self) -> Role {
        self.role.borrow().clone()
    }

    /// Whether this control plane may act as the leader now.
    pub fn may_act(&self) -> bool {
        matches!(&*self.role.borrow(), Role::Leader { valid_until, .. } if Instant::now() < *valid_until)
    }

    /// Where the leader's API is, when another control plane leads.
    pub fn leader_address(&self) -> Option<String> {
        match &*self.role.borrow() {
            Role::Follower { address, .. } => Some(address.clone()),
            _ => None,
        }
    }

    /// Changes of role.
    pub fn watch(&self) -> watch::Receiver<Role> {
        self.role.clone()
    }

    /// Waits until the first attempt on the lease has answered, for at most `limit`.
    pub async fn known(&self, limit: Duration) {
        let mut role = self.role.clone();
        let _ = tokio::time::timeout(limit, role.wait_for(|r| *r != Role::Unknown)).await;
    }

    /// A control plane that always leads (tests of the API alone).
    pub fn always(id: &str) -> Self {
        // The sender goes; the receiver keeps its last value.
        let (_, role) = watch::channel(Role::Leader {
            term: 1,
            valid_until: Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600),
        });
        Self {
            id: id.to_owned(),
            role,
        }
    }
}

/// The lease's settings: `--lease-ttl-ms`.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// How long a lease lasts without renewal. A new leader takes over within about this long
    /// after the old one stops.
    pub ttl: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(5),
        }
    }
}

/// Where the lease lives.
#[derive(Clone)]
pub enum LeaseBackend {
    /// The `leases` row of the database.
    Database,
    /// The cluster's Lease `tandem-leader`.
    Kubernetes(std::sync::Arc<tandem_kube::lease::KubeLease>),
}

/// The database's clock, in milliseconds: every control plane compares expiries with the same
/// clock.
async fn db_now(store: &Store) -> Result<i64, sqlx::Error> {
    let sql = match store.backend {
        Backend::Postgres => "SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
        Backend::Sqlite => "SELECT CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)",
    };
    Ok(sqlx::query(sql).fetch_one(&store.pool).await?.get(0))
}

/// One attempt to take or renew the lease; returns the role it leaves this control plane in.
/// With `take`, the lease is taken whoever holds it: a SQLite store belongs to one machine and
/// one `tandem serve`, so whoever held it before is gone.
async fn attempt(
    store: &Store,
    id: &str,
    address: &str,
    config: &LeaseConfig,
    started: Instant,
    take: bool,
) -> Result<Role, sqlx::Error> {
    let now = db_now(store).await?;
    let ttl = i64::try_from(config.ttl.as_millis()).unwrap_or(i64::MAX);
    sqlx::query(
        "UPDATE leases SET holder = $1, address = $2, \
         term = CASE WHEN holder = $1 THEN term ELSE term + 1 END, \
         expires_at = $3 + $4, renewed_at = $3 \
         WHERE name = $5 AND (holder = $1 OR expires_at < $3 OR $6)",
    )
    .bind(id)
    .bind(address)
    .bind(now)
    .bind(ttl)
    .bind(LEASE)
    .bind(take)
    .execute(&store.pool)
    .await?;
    seen(store, id, address).await?;
    let row = sqlx::query("SELECT holder, address, term FROM leases WHERE name = $1")
        .bind(LEASE)
        .fetch_one(&store.pool)
        .await?;
    let (holder, leader_address, term): (String, String, i64) =
        (row.get(0), row.get(1), row.get(2));
    Ok(role_of(
        id,
        holder,
        leader_address,
        term,
        config,
        started,
        take,
    ))
}

/// The role a holder's id leaves this control plane in. A leader's validity is counted from
/// before the renewal was sent, less a fifth: the lease's expiry is later than this by the
/// round trip and the margin. A SQLite store has no other control plane to yield to (`take`):
/// its one leader never pauses for a late renewal (a busy machine).
fn role_of(
    id: &str,
    holder: String,
    address: String,
    term: i64,
    config: &LeaseConfig,
    started: Instant,
    take: bool,
) -> Role {
    if holder == id {
        let valid_until = if take {
            started + Duration::from_secs(100 * 365 * 24 * 3600)
        } else {
            started + config.ttl - config.ttl / 5
        };
        Role::Leader { term, valid_until }
    } else {
        Role::Follower {
            leader: holder,
            address,
            term,
        }
    }
}

/// One attempt on the cluster's Lease; the database records this control plane as seen.
async fn attempt_kubernetes(
    lease: &tandem_kube::lease::KubeLease,
    store: &Store,
    id: &str,
    address: &str,
    config: &LeaseConfig,
    started: Instant,
) -> Result<Role, String> {
    let holder = lease
        .attempt(id, address, config.ttl)
        .await
        .map_err(|e| e.to_string())?;
    seen(store, id, address).await.map_err(|e| e.to_string())?;
    Ok(role_of(
        id,
        holder.id,
        holder.address,
        holder.term,
        config,
        started,
        false,
    ))
}

/// Records this control plane as seen now, for `GET /api/v1/cluster`.
async fn seen(store: &Store, id: &str, address: &str) -> Result<(), sqlx::Error> {
    let now = db_now(store).await?;
    sqlx::query(
        "INSERT INTO control_planes (id, address, started_at, last_seen) VALUES ($1, $2, $3, $3) \
         ON CONFLICT (id) DO UPDATE SET address = $2, last_seen = $3",
    )
    .bind(id)
    .bind(address)
    .bind(now)
    .execute(&store.pool)
    .await?;
    Ok(())
}

/// Takes or renews the lease every third of its time to live, for ever; returns the view the
/// rest of the control plane reads. `address` is where this control plane's API listens, for
/// the followers to forward to.
pub fn elect(
    store: Store,
    backend: LeaseBackend,
    id: String,
    address: String,
    config: LeaseConfig,
) -> Leadership {
    let (tx, role) = watch::channel(Role::Unknown);
    let me = id.clone();
    let take = store.backend == Backend::Sqlite && matches!(backend, LeaseBackend::Database);
    tokio::spawn(async move {
        loop {
            let started = Instant::now();
            let once = async {
                match &backend {
                    LeaseBackend::Database => {
                        attempt(&store, &me, &address, &config, started, take)
                            .await
                            .map_err(|e| e.to_string())
                    }
                    LeaseBackend::Kubernetes(lease) => {
                        attempt_kubernetes(lease, &store, &me, &address, &config, started).await
                    }
                }
            };
            let role = match tokio::time::timeout(config.ttl / 3, once).await {
                Ok(Ok(role)) => role,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot renew the coordinator's lease");
                    keep_until_lapsed(&tx)
                }
                Err(_) => {
                    tracing::warn!("renewing the coordinator's lease timed out");
                    keep_until_lapsed(&tx)
                }
            };
            let before = tx.borrow().clone();
            match (&before, &role) {
                (Role::Leader { term: a, .. }, Role::Leader { term: b, .. }) if a == b => {}
                (_, Role::Leader { term, .. }) => {
                    tracing::info!(term, "leading: this control plane runs the coordinator")
                }
                (Role::Leader { .. }, _) => {
                    tracing::warn!("lost the coordinator's lease: following")
                }
                (
                    _,
                    Role::Follower {
                        leader,
                        address,
                        term,
                    },
                ) if before != role => {
                    tracing::info!(%leader, %address, term, "following")
                }
                _ => {}
            }
            if tx.send(role).is_err() {
                return;
            }
            tokio::time::sleep_until((started + config.ttl / 3).into()).await;
        }
    });
    Leadership { id, role }
}

/// A leader that cannot reach the database keeps its lease until it would lapse, and then
/// stops acting; anyone else knows nothing.
fn keep_until_lapsed(tx: &watch::Sender<Role>) -> Role {
    match &*tx.borrow() {
        r @ Role::Leader { valid_until, .. } if Instant::now() < *valid_until => r.clone(),
        _ => Role::Unknown,
    }
}

/// Every control plane seen in the last minute, marking `leader` (the lease's holder, as the
/// control plane that answers knows it; none while nobody leads).
pub async fn control_planes(
    store: &Store,
    leader: Option<&str>,
) -> Result<Vec<ControlPlaneRow>, sqlx::Error> {
    let now = db_now(store).await?;
    let rows = sqlx::query(
        "SELECT id, address, started_at, last_seen FROM control_planes WHERE last_seen > $1 ORDER BY id",
    )
    .bind(now - 60_000)
    .fetch_all(&store.pool)
    .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let id: String = r.get(0);
            ControlPlaneRow {
                leader: leader == Some(id.as_str()),
                id,
                address: r.get(1),
                since: r.get(2),
                last_seen: r.get(3),
            }
        })
        .collect())
}

/// A control plane as `GET /api/v1/cluster` shows it.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct ControlPlaneRow {
    /// Its id (`--control-plane-id`).
    pub id: String,
    /// Where its API listens.
    pub address: String,
    /// Whether it holds the lease now.
    pub leader: bool,
    /// When it first took part, epoch ms.
    pub since: i64,
    /// Its last renewal attempt, epoch ms.
    pub last_seen: i64,
}

/// The API's handle on the coordinator of the current term: none while this control plane
/// follows (then every instance reads `unknown`, though a follower forwards the API anyway).
#[derive(Default)]
pub struct Switch {
    current: std::sync::RwLock<Option<std::sync::Arc<Leading>>>,
}

/// The coordinator of a term.
type Leading = tandem_coordinator::Coordinator<crate::drivers::AnyDriver>;

impl Switch {
    /// Puts the coordinator of a new term in place, or none.
    pub fn set(&self, c: Option<std::sync::Arc<Leading>>) {
        if let Ok(mut current) = self.current.write() {
            *current = c;
        }
    }

    fn get(&self) -> Option<std::sync::Arc<Leading>> {
        self.current.read().ok().and_then(|c| c.clone())
    }

    /// Stops every replica of the current coordinator (`--stop-replicas-on-exit`).
    pub async fn stop_all(&self) {
        if let Some(c) = self.get() {
            c.stop_all().await;
        }
    }
}

impl tandem_coordinator::status::Coordination for Switch {
    fn status(&self, instance_id: &str) -> tandem_coordinator::status::ObservedStatus {
        match self.get() {
            Some(c) => c.status(instance_id),
            None => tandem_coordinator::status::ObservedStatus::unknown(),
        }
    }
    fn changed(&self) {
        if let Some(c) = self.get() {
            c.changed();
        }
    }
    fn restart(&self, instance_id: &str) {
        if let Some(c) = self.get() {
            c.restart(instance_id);
        }
    }
    fn retry(&self, instance_id: &str) {
        if let Some(c) = self.get() {
            c.retry(instance_id);
        }
    }
    fn flows_saved(&self, instance_id: &str, slot: u32, rev: &str) {
        if let Some(c) = self.get() {
            c.flows_saved(instance_id, slot, rev);
        }
    }
    fn modules_saved(
        &self,
        instance_id: &str,
        slot: u32,
        modules: &std::collections::BTreeMap<String, String>,
    ) {
        if let Some(c) = self.get() {
            c.modules_saved(instance_id, slot, modules);
        }
    }
    fn metrics(&self) -> String {
        self.get().map(|c| c.metrics()).unwrap_or_default()
    }
    fn logs(&self) -> Option<std::sync::Arc<tandem_coordinator::logs::LogBook>> {
        self.get().and_then(|c| c.logs())
    }
}
