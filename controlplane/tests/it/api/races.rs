//! Changes that race: the rules must hold when two callers act at the same moment.
//!
//! Two requests sent together still mostly run one after the other: a membership change takes
//! a millisecond in the database, far less than the jitter between two HTTP requests. So the
//! tests do not hope for an overlap, they make one: a [`Gate`], a transaction of the test's own
//! that both calls queue behind, is opened only once both wait at it.

use std::time::{Duration, Instant};

use serde_json::json;
use sqlx::Row;

use super::support::{Backend, Server};

/// Holds both calls back until they wait together, then lets them go at the same moment.
///
/// - PostgreSQL: the test locks the team's member rows (`SELECT ... FOR UPDATE`). That blocks
///   no read, only the `UPDATE members` of each demotion. Without the server's own lock both
///   demotions read the owners, then both wait here, and both commit once let go: the write
///   skew the lock prevents. With it the second call waits for the first on the team row.
///   Either way two sessions wait on a lock, and `pg_stat_activity` shows when.
/// - SQLite: the test holds the write lock (`BEGIN IMMEDIATE`). The calls wait for it on the
///   busy timeout (5 s), in their own `BEGIN IMMEDIATE` or, without it, in their first write
///   after reading. SQLite shows no waiters, so the gate stays shut for [`SQLITE_HOLD`].
struct Gate {
    tx: sqlx::Transaction<'static, sqlx::Any>,
    /// Another connection to the same database, to watch `pg_stat_activity` from (PostgreSQL
    /// keeps one snapshot of it per transaction, so not from `tx`).
    watch: Option<sqlx::AnyPool>,
}

/// How long the SQLite gate stays shut: ample for two local calls to reach the database, and
/// well under the server's 5 s busy timeout.
const SQLITE_HOLD: Duration = Duration::from_millis(1_000);

impl Gate {
    async fn shut(s: &Server, team: &str) -> Self {
        let pool = s.db().await;
        match s.backend {
            Backend::Sqlite => Self {
                tx: pool.begin_with("BEGIN IMMEDIATE").await.unwrap(),
                watch: None,
            },
            Backend::Postgres => {
                let mut tx = pool.begin().await.unwrap();
                let locked =
                    sqlx::query("SELECT user_id FROM members WHERE team_id = $1 FOR UPDATE")
                        .bind(team)
                        .fetch_all(&mut *tx)
                        .await
                        .unwrap();
                assert_eq!(locked.len(), 2, "the gate locks both owners' rows");
                Self {
                    tx,
                    watch: Some(s.db().await),
                }
            }
        }
    }

    /// Opens the gate once two calls wait at it (PostgreSQL) or after [`SQLITE_HOLD`] (SQLite).
    async fn open_when_both_wait(self) {
        match &self.watch {
            None => tokio::time::sleep(SQLITE_HOLD).await,
            Some(watch) => {
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    let waiting: i64 = sqlx::query(
                        "SELECT COUNT(*) FROM pg_stat_activity \
                         WHERE datname = current_database() AND wait_event_type = 'Lock'",
                    )
                    .fetch_one(watch)
                    .await
                    .unwrap()
                    .get(0);
                    if waiting == 2 {
                        break;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "the two calls never both waited at the gate ({waiting} waiting)"
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        self.tx.rollback().await.unwrap();
    }
}

/// Two owners of a team demote each other at the same moment, three times over: one wins, the
/// other gets 409, and the team keeps an owner. Both calls are authorized before they reach
/// the gate, so neither may get 403: that would mean one ran after the other, not with it.
async fn owners_demote_each_other(b: Backend) {
    let s = Server::start(b).await;
    let ann = s.user("ann").await;
    let bob = s.user("bob").await;
    // A token's first call in a minute records its use, a write that would queue at the
    // SQLite gate before the call is authorized: have it done now.
    for who in [&ann, &bob] {
        s.get("/api/v1/user", &who.auth).await.ok(200);
    }
    let mut failures = Vec::new();
    for round in 0..3 {
        let team = s.team(&ann.auth).await;
        s.add_member(&ann.auth, &team, &bob, "owner").await;
        let demote_bob = format!("/api/v1/teams/{team}/members/{}", bob.id);
        let demote_ann = format!("/api/v1/teams/{team}/members/{}", ann.id);
        let gate = Gate::shut(&s, &team).await;
        let (a, b, ()) = tokio::join!(
            s.put(&demote_bob, &ann.auth, json!({ "role": "viewer" })),
            s.put(&demote_ann, &bob.auth, json!({ "role": "viewer" })),
            gate.open_when_both_wait(),
        );
        let mut statuses = [a.status, b.status];
        statuses.sort_unstable();
        let members = s
            .get(&format!("/api/v1/teams/{team}/members"), &s.admin)
            .await;
        let owners = members.ok(200)["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["role"] == "owner")
            .count();
        if statuses != [200, 409] || owners != 1 {
            failures.push(format!(
                "round {round}: {statuses:?}, {owners} owner(s) left\n  {a}\n  {b}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

mod sqlite {
    /// `BEGIN IMMEDIATE` makes the second demotion wait for the first to commit; a deferred
    /// transaction would read, then fail to write (SQLITE_BUSY) once the first has committed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn owners_demote_each_other() {
        super::owners_demote_each_other(super::Backend::Sqlite).await;
    }
}

mod postgres {
    /// `keep_an_owner` counts the other owners and then updates, in a READ COMMITTED
    /// transaction: without the team row's lock both demotions see the other owner and both
    /// commit (write skew).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn owners_demote_each_other() {
        super::owners_demote_each_other(super::Backend::Postgres).await;
    }
}
