//! Standalone proxies' routes (issue 13): proxy tokens are made, listed and revoked by platform
//! admins; the route feed, reports and the editor gate's question take a proxy token and
//! nothing else, and a proxy token opens nothing else.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::support::{both_backends, Auth, Backend, Server};

both_backends!(
    the_route_feed_takes_proxy_tokens_only_and_sends_the_table_on_connect_and_on_change,
    reports_and_the_editor_gate_answer_proxies_as_the_in_process_proxy,
);

/// Opens the feed with `token` and reads until `want` is in what came, or 5 s pass; returns
/// the status line and what was read.
async fn feed(s: &Server, token: &str, want: &str) -> (String, String) {
    let mut stream = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let req = format!(
        "GET /api/v1/routes HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n",
        s.addr
    );
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        let done =
            text.contains(want) || (text.contains("\r\n\r\n") && !text.starts_with("HTTP/1.1 200"));
        if done {
            break;
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&got).into_owned();
    (text.lines().next().unwrap_or_default().to_string(), text)
}

/// The token of a bearer credential.
fn token(a: &Auth) -> String {
    match a {
        Auth::Bearer(t) => t.clone(),
        other => panic!("not a token: {other:?}"),
    }
}

async fn proxy_token(s: &Server) -> (String, String) {
    let r = s
        .post(
            "/api/v1/proxy-tokens",
            &s.admin,
            json!({ "name": "edge-1" }),
        )
        .await;
    let t = r.ok(201);
    let value = t["token_value"].as_str().unwrap().to_string();
    assert!(value.starts_with("tdp_"), "{t}");
    (t["id"].as_str().unwrap().to_string(), value)
}

async fn the_route_feed_takes_proxy_tokens_only_and_sends_the_table_on_connect_and_on_change(
    b: Backend,
) {
    let s = Server::start(b).await;
    let owner = s.user("owner").await;
    let (id, proxy_value) = proxy_token(&s).await;
    // Listed without its value; stored hashed.
    let list = s.get("/api/v1/proxy-tokens", &s.admin).await;
    let items = list.ok(200)["items"].as_array().unwrap().clone();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["name"], "edge-1");
    assert!(items[0].get("token_value").is_none(), "{list}");
    let stored: Vec<String> =
        sqlx::query_scalar::<_, String>("SELECT token_hash FROM proxy_tokens")
            .fetch_all(&s.db().await)
            .await
            .unwrap();
    assert_eq!(stored.len(), 1);
    assert!(!stored[0].contains(&proxy_value[4..]), "stored in clear");

    // Nobody else reads the feed: anonymous, a user's token, the admin's.
    for bearer in [
        "",
        "tdp_0000",
        token(&owner.auth).as_str(),
        token(&s.admin).as_str(),
    ] {
        let (status, _) = feed(&s, bearer, "event: table").await;
        assert!(status.starts_with("HTTP/1.1 401"), "{bearer}: {status}");
    }
    // Control planes follow each other's feed with a token derived from the platform key they
    // share; another `tdc_` token is refused.
    let key = tandem_controlplane::secrets::PlatformKey::load_or_create(s.dir.path()).unwrap();
    let own = tandem_controlplane::api::proxies::control_plane_token(&key);
    let (status, _) = feed(&s, &own, "event: table").await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let (status, _) = feed(&s, &format!("tdc_{}", "0".repeat(64)), "event: table").await;
    assert!(status.starts_with("HTTP/1.1 401"), "{status}");
    // A proxy token opens no user route.
    let r = s
        .get("/api/v1/teams", &Auth::Bearer(proxy_value.clone()))
        .await;
    assert_eq!(r.status, 401, "{r}");

    // The table on connect, and again once it changes.
    let (status, text) = feed(&s, &proxy_value, "event: table").await;
    assert!(status.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("text/event-stream"), "{text}");
    let data = text
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .expect("a data line");
    let table: Value = serde_json::from_str(data).unwrap();
    assert_eq!(table["instances"], json!([]), "{table}");
    let first = table["generation"].as_u64().unwrap();
    s.state
        .feed
        .publish(&[tandem_coordinator::dataplane::InstanceRoutes {
            name: "a".into(),
            hosts: vec!["a.localhost".into()],
            ha: false,
            affinity: false,
            editor_secret: "secret".into(),
            http_auth: Default::default(),
            certificate: None,
            asleep: false,
            hold: false,
            replicas: Vec::new(),
        }]);
    let (_, text) = feed(&s, &proxy_value, "a.localhost").await;
    assert!(
        text.contains(&format!("id: {}", first + 1)),
        "a newer generation: {text}"
    );

    // Revoked: refused at once.
    let r = s
        .delete(&format!("/api/v1/proxy-tokens/{id}"), &s.admin)
        .await;
    assert_eq!(r.status, 204, "{r}");
    let (status, _) = feed(&s, &proxy_value, "event: table").await;
    assert!(status.starts_with("HTTP/1.1 401"), "{status}");
    let r = s
        .delete(&format!("/api/v1/proxy-tokens/{id}"), &s.admin)
        .await;
    assert_eq!(r.status, 404, "{r}");
}

async fn reports_and_the_editor_gate_answer_proxies_as_the_in_process_proxy(b: Backend) {
    let s = Server::start(b).await;
    let owner = s.user("owner").await;
    let viewer = s.user("viewer").await;
    let team = s.team(&owner.auth).await;
    s.add_member(&owner.auth, &team, &viewer, "viewer").await;
    let app = s.application(&owner.auth, &team).await;
    let inst = s.instance(&owner.auth, &app, json!({})).await;
    let name = inst["name"].as_str().unwrap().to_string();
    let (_, value) = proxy_token(&s).await;
    let proxy = Auth::Bearer(value);

    let r = s
        .post(
            "/api/v1/routes/report",
            &proxy,
            json!({ "id": "edge-1", "address": "10.0.0.1:8080", "generation": 5, "in_flight": { "x-r0": 2 } }),
        )
        .await;
    r.ok(200);
    let proxies = s.state.feed.proxies();
    assert_eq!(proxies.len(), 1);
    assert_eq!(proxies[0].0, "edge-1");
    assert_eq!(proxies[0].1.in_flight.get("x-r0"), Some(&2));
    let r = s
        .post(
            "/api/v1/routes/report",
            &proxy,
            json!({ "id": "", "address": "x", "generation": 1 }),
        )
        .await;
    r.invalid("id");
    let r = s
        .post(
            "/api/v1/routes/report",
            &owner.auth,
            json!({ "id": "edge-2", "address": "x", "generation": 1 }),
        )
        .await;
    assert_eq!(r.status, 401, "{r}");

    let check = |who: Option<String>, method: &str| json!({ "instance": name, "method": method, "authorization": who.map(|t| format!("Bearer {t}")) });
    let answer = |r: &super::support::Resp| r.ok(200)["decision"].as_str().unwrap().to_string();
    let path = "/api/v1/routes/editor-check";
    let r = s
        .post(path, &proxy, check(Some(token(&owner.auth)), "GET"))
        .await;
    assert_eq!(answer(&r), "allow", "{r}");
    let r = s
        .post(path, &proxy, check(Some(token(&viewer.auth)), "GET"))
        .await;
    assert_eq!(answer(&r), "deny", "{r}");
    let r = s.post(path, &proxy, check(None, "GET")).await;
    assert_eq!(answer(&r), "sign_in", "{r}");
    let r = s.post(path, &proxy, check(None, "NOT A METHOD")).await;
    r.invalid("method");
    let r = s
        .post(path, &owner.auth, check(Some(token(&owner.auth)), "GET"))
        .await;
    assert_eq!(r.status, 401, "{r}");
}
