//! Changes that race: the rules must hold when two callers act at the same moment.

use serde_json::json;

use super::support::{Backend, Server};

/// Two owners of a team demote each other at the same moment, ten times over: one wins, the
/// other gets 409 (or 403 when it was demoted before its own call was authorized), and the team
/// keeps an owner.
async fn owners_demote_each_other(b: Backend) {
    let s = Server::start(b).await;
    let ann = s.user("ann").await;
    let bob = s.user("bob").await;
    let mut failures = Vec::new();
    for round in 0..10 {
        let team = s.team(&ann.auth).await;
        s.add_member(&ann.auth, &team, &bob, "owner").await;
        let demote_bob = format!("/api/v1/teams/{team}/members/{}", bob.id);
        let demote_ann = format!("/api/v1/teams/{team}/members/{}", ann.id);
        let (a, b) = tokio::join!(
            s.put(&demote_bob, &ann.auth, json!({ "role": "viewer" })),
            s.put(&demote_ann, &bob.auth, json!({ "role": "viewer" })),
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
        if !(statuses == [200, 409] || statuses == [200, 403]) || owners != 1 {
            failures.push(format!(
                "round {round}: {statuses:?}, {owners} owner(s) left"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

mod sqlite {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn owners_demote_each_other() {
        super::owners_demote_each_other(super::Backend::Sqlite).await;
    }
}

mod postgres {
    /// `keep_an_owner` counts the other owners and then updates, in a READ COMMITTED
    /// transaction: both demotions see the other owner and both commit (write skew).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn owners_demote_each_other() {
        super::owners_demote_each_other(super::Backend::Postgres).await;
    }
}
