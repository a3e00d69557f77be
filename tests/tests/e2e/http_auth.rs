//! Issue 16's HTTP auth of flows' endpoints through `tandem serve`'s proxy, with real Node-RED:
//! an instance's own endpoints behind its HTTP tokens (none, wrong, revoked, expired, right)
//! or behind its team's sign-in (a member, a viewer, someone outside, nobody; a browser through
//! the access ticket), on a non-HA and an HA instance; the credential never reaches the flow.

use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{http, Tandem};

/// Flows whose `GET /echo` answers the request headers the flow got, as JSON.
fn echo_flows() -> Value {
    json!([
        { "id": "t1", "type": "tab", "label": "Echo" },
        { "id": "in", "type": "http in", "z": "t1", "url": "/echo", "method": "get", "wires": [["fn"]] },
        { "id": "fn", "type": "function", "z": "t1", "func": "msg.payload = msg.req.headers; return msg;", "wires": [["out"]] },
        { "id": "out", "type": "http response", "z": "t1", "statusCode": "", "headers": {}, "wires": [] }
    ])
}

/// A user in `team` as `role` (or in no team), with a personal access token: the token.
async fn user_token(t: &Tandem, team: &str, name: &str, role: Option<&str>) -> String {
    let password = "correct horse battery";
    let r = t
        .api(
            "POST",
            "/api/v1/users",
            json!({ "username": name, "password": password }),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    if let Some(role) = role {
        let r = t
            .api(
                "POST",
                &format!("/api/v1/teams/{team}/members"),
                json!({ "username": name, "role": role }),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let body = json!({ "username": name, "password": password }).to_string();
    let login = http(t.api, "POST", "api", "/api/v1/auth/login", &[], &body)
        .await
        .unwrap();
    let cookie = login
        .header("set-cookie")
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let form = login.header("x-tandem-form-token").unwrap().to_string();
    let r = http(
        t.api,
        "POST",
        "api",
        "/api/v1/user/tokens",
        &[("Cookie", &cookie), ("X-Tandem-Form-Token", &form)],
        &json!({ "name": "mine" }).to_string(),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    r.json()["token_value"].as_str().unwrap().to_string()
}

/// `GET /echo` of `instance` with `authorization`: the status, the challenge, and the body.
async fn echo(
    t: &Tandem,
    instance: &str,
    authorization: Option<&str>,
) -> (u16, Option<String>, String) {
    let headers: Vec<(&str, &str)> = authorization
        .map(|a| ("Authorization", a))
        .into_iter()
        .collect();
    let r = t.request(instance, "GET", "/echo", &headers).await.unwrap();
    (
        r.status,
        r.header("www-authenticate").map(str::to_owned),
        r.body,
    )
}

/// `GET /echo` of `instance` without credentials, once it answers `status` (the routes are
/// published again after a change of mode: the proxies take a moment), for at most 5 s.
async fn settled(t: &Tandem, instance: &str, status: u16) -> (u16, Option<String>, String) {
    let mut got = echo(t, instance, None).await;
    for _ in 0..50 {
        if got.0 == status {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        got = echo(t, instance, None).await;
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instances_endpoints_take_its_tokens_or_its_team_and_the_flow_never_sees_them() {
    let t = Tandem::start("http-auth").await;
    let (app, team) = t.team_and_app("Guarded").await;
    let stack = t.stack().await;
    let mut ids = Vec::new();
    for (name, ha) in [
        ("tokened", None),
        ("teamonly", Some(json!({ "replicas": 2 }))),
    ] {
        let mut body = json!({ "name": name, "application_id": app, "stack_id": stack, "flows": echo_flows() });
        if let Some(ha) = ha {
            body["ha"] = ha;
        }
        let r = t.api("POST", "/api/v1/instances", body).await;
        assert_eq!(r.status, 201, "{}", r.body);
        ids.push(r.json()["id"].as_str().unwrap().to_string());
    }
    t.wait_running(&ids[0], 1).await;
    t.wait_running(&ids[1], 2).await;
    // Open by default.
    assert_eq!(echo(&t, "tokened", None).await.0, 200);

    // Tokens, on the non-HA instance.
    let path = format!("/api/v1/instances/{}", ids[0]);
    let r = t
        .api(
            "PUT",
            &format!("{path}/http-auth"),
            json!({ "mode": "tokens" }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let make = |expires_at: Option<i64>| {
        let path = path.clone();
        let t = &t;
        async move {
            let mut body = json!({ "name": "webhook" });
            if let Some(e) = expires_at {
                body["expires_at"] = json!(e);
            }
            let r = t.api("POST", &format!("{path}/http-tokens"), body).await;
            assert_eq!(r.status, 201, "{}", r.body);
            let j = r.json();
            (
                j["id"].as_str().unwrap().to_string(),
                j["token_value"].as_str().unwrap().to_string(),
            )
        }
    };
    let (token_id, token) = make(None).await;
    let bearer = format!("Bearer {token}");
    let refused = settled(&t, "tokened", 401).await;
    assert_eq!(refused.0, 401, "{}", refused.2);
    assert_eq!(refused.1.as_deref(), Some("Bearer realm=\"tokened\""));
    for wrong in ["Bearer tdh_0000", "Bearer nonsense", "Basic dXNlcjpwYXNz"] {
        let (status, challenge, body) = echo(&t, "tokened", Some(wrong)).await;
        assert_eq!(status, 401, "{wrong}: {body}");
        assert!(challenge.is_some());
    }
    let (status, _, body) = echo(&t, "tokened", Some(&bearer)).await;
    assert_eq!(status, 200, "{body}");
    let seen: Value = serde_json::from_str(&body).unwrap();
    assert!(seen.get("authorization").is_none(), "the flow saw {seen}");
    assert!(!body.contains(&token), "the flow saw the token");
    // A member's own token is not one of the instance's.
    let member = user_token(&t, &team, "mona", Some("member")).await;
    assert_eq!(
        echo(&t, "tokened", Some(&format!("Bearer {member}")))
            .await
            .0,
        401
    );
    // The short-lived token works, then expires.
    let now = tandem_coordinator::logs::now_ms();
    let (_, short) = make(Some(now + 2_000)).await;
    assert_eq!(
        echo(&t, "tokened", Some(&format!("Bearer {short}")))
            .await
            .0,
        200
    );
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(
        echo(&t, "tokened", Some(&format!("Bearer {short}")))
            .await
            .0,
        401
    );
    // Revoked: refused.
    let r = t
        .api(
            "DELETE",
            &format!("{path}/http-tokens/{token_id}"),
            Value::Null,
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(echo(&t, "tokened", Some(&bearer)).await.0, 401);

    // Members, on the HA instance: its team, viewers included, and nobody else.
    let r = t
        .api(
            "PUT",
            &format!("/api/v1/instances/{}/http-auth", ids[1]),
            json!({ "mode": "members" }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let viewer = user_token(&t, &team, "vic", Some("viewer")).await;
    let outsider = user_token(&t, &team, "otto", None).await;
    let status = settled(&t, "teamonly", 401).await.0;
    assert_eq!(status, 401);
    for who in [&member, &viewer] {
        let (status, _, body) = echo(&t, "teamonly", Some(&format!("Bearer {who}"))).await;
        assert_eq!(status, 200, "{body}");
        assert!(
            !body.contains(who.as_str()),
            "the flow saw the user's token"
        );
    }
    let (status, _, body) = echo(&t, "teamonly", Some(&format!("Bearer {outsider}"))).await;
    assert_eq!(status, 403, "{body}");
    // A browser on the default base domain, where no cookie of the console reaches the
    // instance's host: the viewer's access ticket, exchanged by the proxy for a session of that
    // host, which then opens the endpoints; the flow sees no trace of it.
    let r = http(
        t.api,
        "POST",
        "api",
        &format!("/api/v1/instances/{}/access-ticket", ids[1]),
        &[("Authorization", &format!("Bearer {viewer}"))],
        "",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    let url = r.json()["url"].as_str().unwrap().to_string();
    let path = &url[url.find("/_tandem/").unwrap()..];
    let r = t.request("teamonly", "GET", path, &[]).await.unwrap();
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(r.header("location"), Some("/"));
    let cookie = r
        .header("set-cookie")
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let r = t
        .request(
            "teamonly",
            "GET",
            "/echo",
            &[("Cookie", &format!("theme=dark; {cookie}"))],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let seen: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(seen["cookie"], "theme=dark", "{seen}");
    // Spent: the same link again opens nothing.
    let r = t.request("teamonly", "GET", path, &[]).await.unwrap();
    assert_eq!(r.status, 403, "{}", r.body);
    // And open again.
    let r = t
        .api(
            "PUT",
            &format!("/api/v1/instances/{}/http-auth", ids[1]),
            json!({ "mode": "none" }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let status = settled(&t, "teamonly", 200).await.0;
    assert_eq!(status, 200);
}
