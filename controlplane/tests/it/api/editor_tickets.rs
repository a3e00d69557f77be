//! The console's "Open editor" handoff (issue 14): members get a ticket for a non-HA instance's
//! editor, stored hashed; viewers, outsiders and HA instances get none. A ticket is exchanged
//! once, on its own instance's host, within a minute, while its user may still open the editor,
//! for a session of that user, in process or for a standalone proxy.

use serde_json::{json, Value};
use sqlx::Row;
use tandem_controlplane::api::editor_tickets::{exchange, TICKET_TTL_MS};
use tandem_controlplane::auth::hash_secret;
use tandem_controlplane::state::ApiConfig;
use tandem_proxy::TicketDecision;

use super::support::{both_backends, now_ms, Auth, Backend, Server};

both_backends!(
    members_get_tickets_that_are_stored_hashed_and_others_do_not,
    a_ticket_opens_one_session_once_on_its_own_instance,
    the_team_gets_tickets_to_endpoints_for_members_and_only_while_they_are,
    a_ticket_lands_on_the_custom_hostname_when_asked_and_on_no_other_host,
);

/// A member's ticket to endpoints for members can land on the instance's custom hostname (its
/// session is host-only); any other host is refused.
async fn a_ticket_lands_on_the_custom_hostname_when_asked_and_on_no_other_host(b: Backend) {
    let s = Server::start(b).await;
    let owner = s.user("owner").await;
    let team = s.team(&owner.auth).await;
    let app = s.application(&owner.auth, &team).await;
    let inst = s.instance(&owner.auth, &app, json!({})).await;
    let (id, name) = (inst["id"].as_str().unwrap(), inst["name"].as_str().unwrap());
    s.put(
        &format!("/api/v1/instances/{id}/http-auth"),
        &owner.auth,
        json!({ "mode": "members" }),
    )
    .await
    .ok(200);
    let path = format!("/api/v1/instances/{id}/access-ticket");
    // No custom hostname yet: the host is refused, naming the field.
    let r = s
        .post(
            &format!("{path}?host=flows.customer.org"),
            &owner.auth,
            json!(null),
        )
        .await;
    assert!(r.err(422).contains("host"), "{r}");
    s.put(
        &format!("/api/v1/instances/{id}/custom-hostname"),
        &owner.auth,
        json!({ "hostname": "flows.customer.org" }),
    )
    .await
    .ok(200);
    for (query, host) in [
        ("", format!("http://{name}.localhost/")),
        (
            "?host=Flows.Customer.org",
            "http://flows.customer.org/".to_string(),
        ),
    ] {
        let answer = s
            .post(&format!("{path}{query}"), &owner.auth, json!(null))
            .await;
        let url = answer.ok(201)["url"].as_str().unwrap().to_string();
        assert!(
            url.starts_with(&format!("{host}_tandem/editor-ticket?ticket=")),
            "{url}"
        );
        let editor = s
            .post(
                &format!("/api/v1/instances/{id}/editor-ticket{query}"),
                &owner.auth,
                json!(null),
            )
            .await;
        assert!(editor.ok(201)["url"].as_str().unwrap().starts_with(&host));
    }
    // Another instance's host, or any other name: refused.
    for other in [
        "other.localhost",
        "evil.example.org",
        &format!("{name}.localhost"),
    ] {
        let r = s
            .post(&format!("{path}?host={other}"), &owner.auth, json!(null))
            .await;
        assert!(r.err(422).contains("is not a host of"), "{other}: {r}");
    }
    // The ticket exchanges on the instance, whichever of its hosts the browser brought it to.
    let t = ticket_of(
        s.post(
            &format!("{path}?host=flows.customer.org"),
            &owner.auth,
            json!(null),
        )
        .await
        .ok(201),
    );
    assert!(outcome(exchange(&s.state, name, &t).await).is_ok());
}

/// Issue 16: an access ticket leads a viewer of an HA instance to its endpoints, while they are
/// for the team's members.
async fn the_team_gets_tickets_to_endpoints_for_members_and_only_while_they_are(b: Backend) {
    let s = Server::start(b).await;
    let owner = s.user("owner").await;
    let viewer = s.user("viewer").await;
    let outsider = s.user("outsider").await;
    let team = s.team(&owner.auth).await;
    s.add_member(&owner.auth, &team, &viewer, "viewer").await;
    let app = s.application(&owner.auth, &team).await;
    let inst = s
        .instance(&owner.auth, &app, json!({ "ha": { "replicas": 2 } }))
        .await;
    let (id, name) = (inst["id"].as_str().unwrap(), inst["name"].as_str().unwrap());
    let path = format!("/api/v1/instances/{id}/access-ticket");
    // Open endpoints: nothing to sign in to.
    let r = s.post(&path, &viewer.auth, json!(null)).await;
    assert!(r.err(409).contains("is none"), "{r}");
    let mode = format!("/api/v1/instances/{id}/http-auth");
    s.put(&mode, &owner.auth, json!({ "mode": "members" }))
        .await
        .ok(200);
    s.post(&path, &outsider.auth, json!(null)).await.err(404);
    // A viewer of an HA instance: a ticket to its endpoints, exchanged once for a session that
    // lands on `/`.
    let t = ticket_of(s.post(&path, &viewer.auth, json!(null)).await.ok(201));
    match exchange(&s.state, name, &t).await {
        TicketDecision::Session { secret, home } => {
            assert_eq!(home, tandem_proxy::TicketHome::Flows);
            assert_eq!(secret.len(), 64);
        }
        TicketDecision::Refused(m) => panic!("refused: {m}"),
    }
    // The mode changed since: a ticket made before opens nothing.
    let t = ticket_of(s.post(&path, &viewer.auth, json!(null)).await.ok(201));
    s.put(&mode, &owner.auth, json!({ "mode": "tokens" }))
        .await
        .ok(200);
    let why = outcome(exchange(&s.state, name, &t).await).unwrap_err();
    assert!(why.contains("no longer for its team"), "{why}");
    // An editor ticket of this HA instance is still refused.
    s.post(
        &format!("/api/v1/instances/{id}/editor-ticket"),
        &owner.auth,
        json!(null),
    )
    .await
    .err(409);
}

/// The ticket in a ticket URL.
fn ticket_of(answer: &Value) -> String {
    let url = answer["url"].as_str().unwrap();
    url.split_once("?ticket=").unwrap().1.to_string()
}

/// What the exchange answered, as `Ok(session)` or `Err(message)`.
fn outcome(d: TicketDecision) -> Result<String, String> {
    match d {
        TicketDecision::Session { secret, .. } => Ok(secret),
        TicketDecision::Refused(m) => Err(m),
    }
}

async fn members_get_tickets_that_are_stored_hashed_and_others_do_not(b: Backend) {
    let config = ApiConfig {
        instances_port: Some(8080),
        ..ApiConfig::default()
    };
    let s = Server::start_with(b, config, |_| {}).await;
    let owner = s.user("owner").await;
    let member = s.user("member").await;
    let viewer = s.user("viewer").await;
    let outsider = s.user("outsider").await;
    let team = s.team(&owner.auth).await;
    s.add_member(&owner.auth, &team, &member, "member").await;
    s.add_member(&owner.auth, &team, &viewer, "viewer").await;
    let app = s.application(&owner.auth, &team).await;
    let inst = s.instance(&owner.auth, &app, json!({})).await;
    let (id, name) = (inst["id"].as_str().unwrap(), inst["name"].as_str().unwrap());
    assert_eq!(inst["url"], format!("http://{name}.localhost:8080"));
    let path = format!("/api/v1/instances/{id}/editor-ticket");

    // A member: a URL on the instance's own host, good for a minute.
    let before = now_ms();
    let r = s.post(&path, &member.auth, json!(null)).await;
    let answer = r.ok(201).clone();
    let ticket = ticket_of(&answer);
    assert_eq!(
        answer["url"],
        format!("http://{name}.localhost:8080/_tandem/editor-ticket?ticket={ticket}")
    );
    assert_eq!(ticket.len(), 64, "256 bits as hex: {ticket}");
    assert!(ticket.bytes().all(|c| c.is_ascii_hexdigit()), "{ticket}");
    let expires = answer["expires_at"].as_i64().unwrap();
    assert!(
        (before + TICKET_TTL_MS..=now_ms() + TICKET_TTL_MS).contains(&expires),
        "{answer}"
    );
    // Stored as its hash only, for the member on this instance.
    let db = s.db().await;
    let rows: Vec<(String, String, String, i64)> =
        sqlx::query("SELECT hash, user_id, instance_id, expires_at FROM editor_tickets")
            .fetch_all(&db)
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect();
    assert_eq!(
        rows,
        [(
            hash_secret(&ticket),
            member.id.clone(),
            id.to_string(),
            expires
        )]
    );
    // Each call a new ticket.
    let again = s.post(&path, &owner.auth, json!(null)).await;
    assert_ne!(ticket_of(again.ok(201)), ticket);

    // A viewer may not open the editor, an outsider does not see the instance.
    let msg = s
        .post(&path, &viewer.auth, json!(null))
        .await
        .err(403)
        .to_string();
    assert!(msg.contains("member"), "{msg}");
    s.post(&path, &outsider.auth, json!(null)).await.err(404);
    s.post(&path, &Auth::Anon, json!(null)).await.err(401);
    // An HA instance has no editor.
    let ha = s
        .instance(&owner.auth, &app, json!({ "ha": { "replicas": 2 } }))
        .await;
    let r = s
        .post(
            &format!(
                "/api/v1/instances/{}/editor-ticket",
                ha["id"].as_str().unwrap()
            ),
            &member.auth,
            json!(null),
        )
        .await;
    assert!(r.err(409).contains("HA"), "{r}");

    // Audited, without the ticket.
    let audit = s
        .get(&format!("/api/v1/instances/{id}/audit-log"), &owner.auth)
        .await;
    let issued: Vec<&Value> = audit.ok(200)["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == "instance.editor-ticket")
        .collect();
    assert_eq!(issued.len(), 2, "{audit}");
    assert!(!audit.text.contains(&ticket), "{audit}");
}

async fn a_ticket_opens_one_session_once_on_its_own_instance(b: Backend) {
    let s = Server::start(b).await;
    let owner = s.user("owner").await;
    let member = s.user("member").await;
    let team = s.team(&owner.auth).await;
    s.add_member(&owner.auth, &team, &member, "member").await;
    let app = s.application(&owner.auth, &team).await;
    let inst = s.instance(&owner.auth, &app, json!({})).await;
    let other = s.instance(&owner.auth, &app, json!({})).await;
    let (id, name) = (inst["id"].as_str().unwrap(), inst["name"].as_str().unwrap());
    let other_name = other["name"].as_str().unwrap();
    let path = format!("/api/v1/instances/{id}/editor-ticket");
    let ticket = |who: Auth| {
        let (s, path) = (&s, path.clone());
        async move { ticket_of(s.post(&path, &who, json!(null)).await.ok(201)) }
    };

    // Brought to another instance's host: refused, and spent.
    let t = ticket(member.auth.clone()).await;
    let why = outcome(exchange(&s.state, other_name, &t).await).unwrap_err();
    assert!(why.contains(&format!("not for {other_name}")), "{why}");
    let why = outcome(exchange(&s.state, name, &t).await).unwrap_err();
    assert!(why.contains("used already"), "{why}");

    // On its own: a session of the member, once.
    let t = ticket(member.auth.clone()).await;
    let session = outcome(exchange(&s.state, name, &t).await).unwrap();
    let why = outcome(exchange(&s.state, name, &t).await).unwrap_err();
    assert!(why.contains("used already"), "{why}");
    let cookie = Auth::Cookie(format!("tandem_session={session}"));
    let me = s.get("/api/v1/user", &cookie).await;
    assert_eq!(me.ok(200)["username"], "member", "{me}");
    let stored: i64 = sqlx::query("SELECT COUNT(*) FROM sessions WHERE hash = $1")
        .bind(hash_secret(&session))
        .fetch_one(&s.db().await)
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 1, "the session is stored hashed");
    // Nothing is left of spent tickets.
    let left: i64 = sqlx::query("SELECT COUNT(*) FROM editor_tickets")
        .fetch_one(&s.db().await)
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);

    // Expired: refused.
    let old = "00".repeat(32);
    sqlx::query(
        "INSERT INTO editor_tickets (hash, user_id, instance_id, expires_at) VALUES ($1, $2, $3, $4)",
    )
    .bind(hash_secret(&old))
    .bind(&member.id)
    .bind(id)
    .bind(now_ms() - 1)
    .execute(&s.db().await)
    .await
    .unwrap();
    let why = outcome(exchange(&s.state, name, &old).await).unwrap_err();
    assert!(why.contains("expired"), "{why}");
    let why = outcome(exchange(&s.state, name, "never-issued").await).unwrap_err();
    assert!(why.contains("never issued"), "{why}");

    // A user who may no longer open the editor: refused, though the ticket was good.
    let t = ticket(member.auth.clone()).await;
    s.put(
        &format!("/api/v1/teams/{team}/members/{}", member.id),
        &owner.auth,
        json!({ "role": "viewer" }),
    )
    .await
    .ok(200);
    let why = outcome(exchange(&s.state, name, &t).await).unwrap_err();
    assert!(why.contains("may no longer open the editor"), "{why}");

    // Through a standalone proxy's route: only a proxy token; two proxies racing with one
    // ticket, one session.
    let r = s
        .post("/api/v1/proxy-tokens", &s.admin, json!({ "name": "edge" }))
        .await;
    let proxy = Auth::Bearer(r.ok(201)["token_value"].as_str().unwrap().to_string());
    let t = ticket(owner.auth.clone()).await;
    let body = json!({ "instance": name, "ticket": t });
    let route = "/api/v1/routes/editor-ticket";
    s.post(route, &owner.auth, body.clone()).await.err(401);
    let (a, b) = tokio::join!(
        s.post(route, &proxy, body.clone()),
        s.post(route, &proxy, body.clone())
    );
    let mut decisions: Vec<String> = [&a, &b]
        .iter()
        .map(|r| r.ok(200)["decision"].as_str().unwrap().to_string())
        .collect();
    decisions.sort();
    assert_eq!(decisions, ["refused", "session"], "{a}\n{b}");
    let won = if a.json["decision"] == "session" {
        &a
    } else {
        &b
    };
    let lost = if a.json["decision"] == "session" {
        &b
    } else {
        &a
    };
    assert!(lost.json.get("session").is_none(), "{lost}");
    assert!(
        lost.json["message"]
            .as_str()
            .unwrap()
            .contains("used already"),
        "{lost}"
    );
    let session = won.json["session"].as_str().unwrap();
    let cookie = Auth::Cookie(format!("tandem_session={session}"));
    assert_eq!(
        s.get("/api/v1/user", &cookie).await.ok(200)["username"],
        "owner"
    );
    s.post(route, &proxy, json!({ "instance": name }))
        .await
        .err(422);
}
