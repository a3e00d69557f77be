//! Who may do what to a running instance: roles on actions, and the editor through the proxy.

use serde_json::{json, Value};

use crate::harness::{hello_flows, http, Tandem};

/// Creates `name` with a password, adds them to `team` as `role` (unless `None`), signs them
/// in; returns their session cookie (`tandem_session=...`).
async fn user(t: &Tandem, team: &str, name: &str, role: Option<&str>) -> String {
    let r = t
        .api(
            "POST",
            "/api/v1/users",
            json!({ "username": name, "password": "correct horse battery" }),
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
        assert!(r.status == 201 || r.status == 200, "{}", r.body);
    }
    let body = json!({ "username": name, "password": "correct horse battery" }).to_string();
    let r = http(t.api, "POST", "api", "/api/v1/auth/login", &[], &body)
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let cookie = r.header("set-cookie").unwrap();
    cookie.split(';').next().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_hold_on_actions_and_the_editor_is_for_members_only() {
    let t = Tandem::start("access").await;
    let (app, team) = t.team_and_app("Access").await;
    let mut flows = hello_flows();
    for node in [
        json!({ "id": "ein", "type": "http in", "z": "t1", "url": "/echo", "method": "get", "wires": [["efn"]] }),
        json!({ "id": "efn", "type": "function", "z": "t1", "func": "msg.payload = msg.req.headers; return msg;", "wires": [["eout"]] }),
        json!({ "id": "eout", "type": "http response", "z": "t1", "statusCode": "", "headers": {}, "wires": [] }),
    ] {
        flows.as_array_mut().unwrap().push(node);
    }
    let id = t.instance(&app, "gated", flows, 1).await;
    t.wait_running(&id, 1).await;

    let member = user(&t, &team, "mia", Some("member")).await;
    let viewer = user(&t, &team, "vic", Some("viewer")).await;
    let outsider = user(&t, &team, "otto", None).await;

    // A viewer sees the status but cannot stop the instance. Each call is made as the console
    // makes it: the session cookie, and the session's form token from `GET /api/v1/user`.
    let as_cookie = |c: &str, method: &'static str, path: String| {
        let c = c.to_string();
        let api = t.api;
        async move {
            let me = http(api, "GET", "api", "/api/v1/user", &[("Cookie", &c)], "")
                .await
                .unwrap();
            let token = me.header("x-tandem-form-token").unwrap().to_string();
            let headers = [("Cookie", c.as_str()), ("X-Tandem-Form-Token", &token)];
            http(api, method, "api", &path, &headers, "").await.unwrap()
        }
    };
    let r = as_cookie(&viewer, "GET", format!("/api/v1/instances/{id}/status")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = as_cookie(
        &viewer,
        "POST",
        format!("/api/v1/instances/{id}/actions/stop"),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body);
    // An outsider does not even see it.
    let r = as_cookie(
        &outsider,
        "POST",
        format!("/api/v1/instances/{id}/actions/stop"),
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(t.status(&id).await["state"], "running");

    // The editor: anonymous gets 401 and where to sign in.
    let r = t.get("gated", "/admin/").await.unwrap();
    assert_eq!(r.status, 401, "{r:?}");
    assert!(r.body.contains("Sign in"), "{}", r.body);
    let r = t.get("gated", "/admin/flows").await.unwrap();
    assert_eq!(r.status, 401);
    // A wrong token: 401 too.
    let r = t
        .request(
            "gated",
            "GET",
            "/admin/flows",
            &[("Authorization", "Bearer tdm_nope")],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 401);
    // An ended session: the cookie that opened the editor gets 401 once its user signs out.
    let leaving = user(&t, &team, "lou", Some("member")).await;
    let editor = |cookie: String| {
        let t = &t;
        async move {
            t.request("gated", "GET", "/admin/flows", &[("Cookie", &cookie)])
                .await
                .unwrap()
        }
    };
    let r = editor(leaving.clone()).await;
    assert_eq!(r.status, 200, "before signing out: {r:?}");
    let r = as_cookie(&leaving, "POST", "/api/v1/auth/logout".into()).await;
    assert_eq!(r.status, 204, "{r:?}");
    let r = editor(leaving).await;
    assert_eq!(r.status, 401, "after signing out: {r:?}");
    assert!(r.body.contains("the session has ended"), "{}", r.body);
    // A non-member and a viewer: 403.
    for who in [&outsider, &viewer] {
        let r = t
            .request("gated", "GET", "/admin/flows", &[("Cookie", who)])
            .await
            .unwrap();
        assert_eq!(r.status, 403, "{r:?}");
    }
    // Guessing the replica's own header gets nowhere: the proxy removes it.
    let r = t
        .request(
            "gated",
            "GET",
            "/admin/flows",
            &[("x-tandem-token", "guess")],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 401);

    // A member with a session: the editor and its admin API answer, the secret added upstream.
    let r = t
        .request("gated", "GET", "/admin/flows", &[("Cookie", &member)])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let flows: Value = serde_json::from_str(&r.body).unwrap();
    assert!(
        flows
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["type"] == "http in"),
        "{flows}"
    );
    let r = t
        .request("gated", "GET", "/admin/", &[("Cookie", &member)])
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert!(r.body.contains("Node-RED"), "the editor page");
    // The platform admin with a token, too.
    let auth = format!("Bearer {}", t.token);
    let r = t
        .request(
            "gated",
            "GET",
            "/admin/settings",
            &[("Authorization", &auth)],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    // The flows themselves stay public, and never see Tandem's credentials.
    assert_eq!(t.get("gated", "/hello").await.unwrap().status, 200);
    let cookies = format!("theme=dark; {member}");
    let r = t
        .request(
            "gated",
            "GET",
            "/echo",
            &[
                ("Cookie", &cookies),
                ("Authorization", &auth),
                ("x-tandem-token", "client-sent"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let seen: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(seen["cookie"], "theme=dark", "{seen}");
    assert!(seen.get("authorization").is_none(), "{seen}");
    assert!(seen.get("x-tandem-token").is_none(), "{seen}");
}

/// Issue 11's protected instances: its editor stays readable to members, but only owners deploy
/// to it; lifting the protection gives members their deploys back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protected_instance_takes_deploys_from_owners_only() {
    let t = Tandem::start("protected").await;
    let (app, team) = t.team_and_app("Protected").await;
    let id = t.instance(&app, "guarded", hello_flows(), 1).await;
    t.wait_running(&id, 1).await;
    let member = user(&t, &team, "max", Some("member")).await;
    let owner = user(&t, &team, "olga", Some("owner")).await;
    let deploy = |who: String| {
        let (http_addr, flows) = (t.http, hello_flows().to_string());
        async move {
            http(
                http_addr,
                "POST",
                "guarded.localhost",
                "/admin/flows",
                &[
                    ("Cookie", &who),
                    ("Content-Type", "application/json"),
                    ("Node-RED-Deployment-Type", "full"),
                    ("Origin", "http://guarded.localhost"),
                ],
                &flows,
            )
            .await
            .unwrap()
        }
    };
    // Unprotected: a member deploys.
    assert_eq!(deploy(member.clone()).await.status, 204);

    let path = format!("/api/v1/instances/{id}/protection");
    let r = t.api("PUT", &path, json!({ "protected": true })).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        t.api("GET", &path, Value::Null).await.json()["protected"],
        true
    );

    // The member still reads the editor, but cannot deploy; the owner can.
    let r = t
        .request("guarded", "GET", "/admin/flows", &[("Cookie", &member)])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let r = deploy(member.clone()).await;
    assert_eq!(r.status, 403, "{r:?}");
    assert!(r.body.contains("protected"), "{}", r.body);
    assert_eq!(deploy(owner.clone()).await.status, 204);
    // The owner's deploy went through: the flows restart and serve again.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while t.get("guarded", "/hello").await.unwrap().status != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "no flows after the owner's deploy"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // Lifted: the member deploys again.
    let r = t.api("PUT", &path, json!({ "protected": false })).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(deploy(member).await.status, 204);
}
