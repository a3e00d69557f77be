//! Access control for flows' HTTP endpoints, the control plane's side: the mode, the HTTP
//! tokens and what the store keeps of them, and the check the proxy asks
//! ([`tandem_controlplane::http_auth::token_allows`]).

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sqlx::Row;
use tandem_controlplane::http_auth::token_allows;

use super::support::{both_backends, now_ms, Auth, Backend, Server, User};

fn sha256_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A team with an owner, a member, a viewer and an outsider, and two instances of it.
struct World {
    s: Server,
    owner: User,
    member: User,
    viewer: User,
    outsider: User,
    app: String,
    /// Its id and name.
    one: (String, String),
    other: (String, String),
}

impl World {
    async fn new(b: Backend) -> Self {
        let s = Server::start(b).await;
        let owner = s.user("owner").await;
        let member = s.user("member").await;
        let viewer = s.user("viewer").await;
        let outsider = s.user("outsider").await;
        let team = s.team(&owner.auth).await;
        s.add_member(&owner.auth, &team, &member, "member").await;
        s.add_member(&owner.auth, &team, &viewer, "viewer").await;
        let app = s.application(&owner.auth, &team).await;
        let one = id_name(&s.instance(&owner.auth, &app, json!({})).await);
        let other = id_name(&s.instance(&owner.auth, &app, json!({})).await);
        Self {
            s,
            owner,
            member,
            viewer,
            outsider,
            app,
            one,
            other,
        }
    }

    /// A token of instance `id`, made by its owner: the answer.
    async fn token(&self, id: &str, body: Value) -> Value {
        self.s
            .post(
                &format!("/api/v1/instances/{id}/http-tokens"),
                &self.owner.auth,
                body,
            )
            .await
            .ok(201)
            .clone()
    }
}

fn id_name(i: &Value) -> (String, String) {
    (
        i["id"].as_str().unwrap().to_string(),
        i["name"].as_str().unwrap().to_string(),
    )
}

fn value_of(created: &Value) -> String {
    created["token_value"].as_str().unwrap().to_string()
}

both_backends!(
    mode_round_trips_for_owners_only,
    tokens_are_shown_once_and_stored_hashed,
    token_allows_only_live_tokens_of_the_instance,
    deleting_the_instance_removes_its_tokens,
);

/// The mode starts `none`, shows in the instance's view, is set by owners and admins, read by
/// everyone in the team; members and viewers get 403, outsiders 404; an unknown mode is a 422
/// naming `mode`. A change is audited.
async fn mode_round_trips_for_owners_only(b: Backend) {
    let w = World::new(b).await;
    let s = &w.s;
    let (id, _) = &w.one;
    let path = format!("/api/v1/instances/{id}/http-auth");
    for auth in [&w.owner.auth, &w.member.auth, &w.viewer.auth] {
        assert_eq!(s.get(&path, auth).await.ok(200), &json!({ "mode": "none" }));
    }
    let view = s
        .get(&format!("/api/v1/instances/{id}"), &w.viewer.auth)
        .await;
    assert_eq!(view.ok(200)["http_auth"], "none");

    for mode in ["tokens", "members", "none", "members"] {
        let r = s.put(&path, &w.owner.auth, json!({ "mode": mode })).await;
        assert_eq!(r.ok(200), &json!({ "mode": mode }));
        assert_eq!(s.get(&path, &w.viewer.auth).await.ok(200)["mode"], mode);
    }
    let view = s
        .get(&format!("/api/v1/instances/{id}"), &w.viewer.auth)
        .await;
    assert_eq!(view.ok(200)["http_auth"], "members");
    let listed = s
        .get(
            &format!("/api/v1/applications/{}/instances", w.app),
            &w.owner.auth,
        )
        .await;
    let modes: Vec<(&str, &str)> = listed.ok(200)["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["id"].as_str().unwrap(), i["http_auth"].as_str().unwrap()))
        .collect();
    assert!(modes.contains(&(id.as_str(), "members")), "{modes:?}");
    assert!(modes.contains(&(w.other.0.as_str(), "none")), "{modes:?}");

    // The platform admin, outside the team, may.
    s.put(&path, &s.admin, json!({ "mode": "tokens" }))
        .await
        .ok(200);
    for auth in [&w.member.auth, &w.viewer.auth] {
        s.put(&path, auth, json!({ "mode": "none" })).await.err(403);
    }
    s.put(&path, &w.outsider.auth, json!({ "mode": "none" }))
        .await
        .err(404);
    s.get(&path, &w.outsider.auth).await.err(404);
    s.get(&path, &Auth::Anon).await.err(401);
    assert_eq!(s.get(&path, &w.owner.auth).await.ok(200)["mode"], "tokens");

    let r = s.put(&path, &w.owner.auth, json!({ "mode": "open" })).await;
    r.invalid("mode");
    s.put(&path, &w.owner.auth, json!({})).await.invalid("mode");
    s.put(
        &path,
        &w.owner.auth,
        json!({ "mode": "tokens", "extra": 1 }),
    )
    .await
    .err(422);

    let log = s
        .get(
            &format!("/api/v1/instances/{id}/audit-log?event=instance.http-auth"),
            &w.owner.auth,
        )
        .await;
    let bodies: Vec<(Value, Value)> = log.ok(200)["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["body"]["before"].clone(), e["body"]["after"].clone()))
        .collect();
    assert_eq!(bodies.len(), 5, "{log}");
    assert!(
        bodies.contains(&(json!("members"), json!("tokens"))),
        "{bodies:?}"
    );
}

/// A token's value is in the creation's answer only: lists show the rest, the store the
/// SHA-256. Names are 1 to 100 characters; an expiry in the past is refused. Members and
/// viewers list tokens but cannot make or revoke them; a token of another instance is 404.
async fn tokens_are_shown_once_and_stored_hashed(b: Backend) {
    let w = World::new(b).await;
    let s = &w.s;
    let (id, _) = &w.one;
    let path = format!("/api/v1/instances/{id}/http-tokens");
    let later = now_ms() + 3_600_000;
    let made = w
        .token(id, json!({ "name": "sensor", "expires_at": later }))
        .await;
    let value = value_of(&made);
    assert!(
        value.starts_with("tdh_") && value.len() == 4 + 64,
        "{value}"
    );
    assert_eq!(made["name"], "sensor");
    assert_eq!(made["expires_at"], later);
    assert!(made["created_at"].as_i64().unwrap() <= now_ms());
    let forever = w.token(id, json!({ "name": "forever" })).await;
    assert_eq!(forever["expires_at"], Value::Null);

    for auth in [&w.owner.auth, &w.member.auth, &w.viewer.auth, &s.admin] {
        let r = s.get(&path, auth).await;
        assert!(!r.text.contains(&value), "{r}");
        assert!(!r.text.contains("hash"), "{r}");
        let items = r.ok(200)["items"].as_array().unwrap();
        assert_eq!(items.len(), 2, "{r}");
        let first = items.iter().find(|t| t["id"] == made["id"]).unwrap();
        let keys: Vec<&str> = first
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            ["created_at", "expires_at", "id", "last_used_at", "name"]
        );
        assert_eq!(first["last_used_at"], Value::Null);
    }
    // Paged like every list.
    let all = s.all_pages(&path, &w.viewer.auth, 1, "id").await;
    assert_eq!(all.len(), 2);
    s.get(&path, &w.outsider.auth).await.err(404);

    let pool = s.db().await;
    let stored: Vec<(String, String, Option<String>)> =
        sqlx::query("SELECT instance_id, hash, created_by FROM http_tokens")
            .fetch_all(&pool)
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
    assert_eq!(stored.len(), 2);
    let hashes: Vec<&str> = stored.iter().map(|(_, h, _)| h.as_str()).collect();
    assert!(hashes.contains(&sha256_hex(&value).as_str()), "{hashes:?}");
    for (instance, hash, by) in &stored {
        assert_eq!(instance, id);
        assert_eq!(hash.len(), 64, "{hash}");
        assert!(!hash.contains("tdh_"), "{hash}");
        assert_eq!(by.as_deref(), Some(w.owner.id.as_str()));
    }
    pool.close().await;

    // Refused: past expiry, bad names, unknown fields; members and viewers; outsiders.
    let r = s
        .post(
            &path,
            &w.owner.auth,
            json!({ "name": "late", "expires_at": now_ms() - 1 }),
        )
        .await;
    r.invalid("expires_at");
    for name in [json!(""), json!("  "), json!("x".repeat(101))] {
        s.post(&path, &w.owner.auth, json!({ "name": name }))
            .await
            .invalid("name");
    }
    s.post(
        &path,
        &w.owner.auth,
        json!({ "name": "a", "value": "tdh_mine" }),
    )
    .await
    .err(422);
    for auth in [&w.member.auth, &w.viewer.auth] {
        s.post(&path, auth, json!({ "name": "mine" }))
            .await
            .err(403);
        s.delete(&format!("{path}/{}", made["id"].as_str().unwrap()), auth)
            .await
            .err(403);
    }
    s.post(&path, &w.outsider.auth, json!({ "name": "mine" }))
        .await
        .err(404);
    assert_eq!(
        s.get(&path, &w.owner.auth).await.ok(200)["items"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // Revoking: not through another instance; then gone, and audited.
    let token_id = made["id"].as_str().unwrap();
    s.delete(
        &format!("/api/v1/instances/{}/http-tokens/{token_id}", w.other.0),
        &w.owner.auth,
    )
    .await
    .err(404);
    s.delete(&format!("{path}/{token_id}"), &w.owner.auth)
        .await
        .ok(204);
    s.delete(&format!("{path}/{token_id}"), &w.owner.auth)
        .await
        .err(404);
    let left = s.get(&path, &w.owner.auth).await;
    assert_eq!(left.ok(200)["items"][0]["id"], forever["id"]);
    let log = s
        .get(
            &format!("/api/v1/instances/{id}/audit-log?event=http-token."),
            &w.owner.auth,
        )
        .await;
    let events: Vec<&str> = log.ok(200)["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(events.len(), 3, "{log}");
    assert!(events.contains(&"http-token.created") && events.contains(&"http-token.revoked"));
    assert!(!log.text.contains(&value), "{log}");
}

/// `token_allows`: the right token on its own instance, unrevoked and unexpired; nothing else.
/// It records the token's use.
async fn token_allows_only_live_tokens_of_the_instance(b: Backend) {
    let w = World::new(b).await;
    let s = &w.s;
    let (one, one_name) = &w.one;
    let (other, other_name) = &w.other;
    let right = value_of(&w.token(one, json!({ "name": "right" })).await);
    let theirs = value_of(&w.token(other, json!({ "name": "theirs" })).await);
    let revoked = w.token(one, json!({ "name": "revoked" })).await;

    assert!(token_allows(&s.state, one_name, &right).await.unwrap());
    assert!(token_allows(&s.state, other_name, &theirs).await.unwrap());
    assert!(!token_allows(&s.state, one_name, &theirs).await.unwrap());
    assert!(!token_allows(&s.state, other_name, &right).await.unwrap());
    assert!(!token_allows(&s.state, "no-such-instance", &right)
        .await
        .unwrap());
    assert!(!token_allows(&s.state, one_name, "tdh_0000").await.unwrap());
    assert!(!token_allows(&s.state, one_name, "").await.unwrap());

    // Use is recorded, and shown.
    let listed = s
        .get(
            &format!("/api/v1/instances/{one}/http-tokens"),
            &w.viewer.auth,
        )
        .await;
    let used: Vec<(String, Value)> = listed.ok(200)["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap().to_string(),
                t["last_used_at"].clone(),
            )
        })
        .collect();
    for (name, last) in &used {
        match name.as_str() {
            "right" => assert!(last.as_i64().unwrap() <= now_ms(), "{used:?}"),
            _ => assert_eq!(last, &Value::Null, "{used:?}"),
        }
    }

    // Revoked.
    let revoked_value = value_of(&revoked);
    assert!(token_allows(&s.state, one_name, &revoked_value)
        .await
        .unwrap());
    s.delete(
        &format!(
            "/api/v1/instances/{one}/http-tokens/{}",
            revoked["id"].as_str().unwrap()
        ),
        &w.owner.auth,
    )
    .await
    .ok(204);
    assert!(!token_allows(&s.state, one_name, &revoked_value)
        .await
        .unwrap());

    // Expired: the API refuses a past expiry, so the row goes straight into the store.
    let expired = "tdh_expired-for-this-test";
    let pool = s.db().await;
    sqlx::query(
        "INSERT INTO http_tokens (id, instance_id, name, hash, created_at, expires_at, created_by) VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind("0000000000000000000000ex")
    .bind(one)
    .bind("expired")
    .bind(sha256_hex(expired))
    .bind(now_ms() - 7_200_000)
    .bind(now_ms() - 1)
    .bind(&w.owner.id)
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
    assert!(!token_allows(&s.state, one_name, expired).await.unwrap());

    // A user's personal token is no HTTP token, even the owner's.
    let Auth::Bearer(personal) = &w.owner.auth else {
        panic!("users sign in with a token");
    };
    assert!(personal.starts_with("tdm_"));
    assert!(!token_allows(&s.state, one_name, personal).await.unwrap());
    let Auth::Bearer(admin) = &s.admin else {
        panic!("the admin signs in with a token");
    };
    assert!(!token_allows(&s.state, one_name, admin).await.unwrap());
    // And an HTTP token is no user's token: the API refuses it.
    s.get("/api/v1/user", &Auth::Bearer(right.clone()))
        .await
        .err(401);
    assert!(token_allows(&s.state, one_name, &right).await.unwrap());
}

/// An instance's tokens go with it.
async fn deleting_the_instance_removes_its_tokens(b: Backend) {
    let w = World::new(b).await;
    let s = &w.s;
    let (one, one_name) = &w.one;
    let value = value_of(&w.token(one, json!({ "name": "doomed" })).await);
    w.token(&w.other.0, json!({ "name": "kept" })).await;
    s.delete(&format!("/api/v1/instances/{one}"), &w.owner.auth)
        .await
        .ok(204);
    assert!(!token_allows(&s.state, one_name, &value).await.unwrap());
    let pool = s.db().await;
    let left: Vec<String> = sqlx::query("SELECT name FROM http_tokens")
        .fetch_all(&pool)
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, ["kept"]);
    pool.close().await;
    // A new instance of the same name does not inherit them.
    let again = s
        .instance(&w.owner.auth, &w.app, json!({ "name": one_name }))
        .await;
    assert_eq!(again["http_auth"], "none");
    assert!(!token_allows(&s.state, one_name, &value).await.unwrap());
}
