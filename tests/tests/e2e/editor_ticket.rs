//! Issue 14's "Open editor" handoff through the real proxy of a real `tandem serve`: a member
//! signed in to the console gets a ticket, the instance's host turns it into a host-only session
//! cookie that opens the editor there (and never reaches a flow), and a ticket is good once and
//! on its own instance only.

use serde_json::{json, Value};

use crate::harness::{hello_flows, http, Resp, Tandem};

/// Flows with `GET /hello` and `GET /echo`, which answers with the request's headers.
fn echo_flows() -> Value {
    let mut flows = hello_flows();
    for node in [
        json!({ "id": "ein", "type": "http in", "z": "t1", "url": "/echo", "method": "get", "wires": [["efn"]] }),
        json!({ "id": "efn", "type": "function", "z": "t1", "func": "msg.payload = msg.req.headers; return msg;", "wires": [["eout"]] }),
        json!({ "id": "eout", "type": "http response", "z": "t1", "statusCode": "", "headers": {}, "wires": [] }),
    ] {
        flows.as_array_mut().unwrap().push(node);
    }
    flows
}

/// A console session of a new member of `team`: the session cookie (`tandem_session=...`) and
/// the session's form token, as the console holds them after signing in.
async fn console_member(t: &Tandem, team: &str, name: &str) -> (String, String) {
    let body = json!({ "username": name, "password": "correct horse battery" });
    let r = t.api("POST", "/api/v1/users", body.clone()).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let r = t
        .api(
            "POST",
            &format!("/api/v1/teams/{team}/members"),
            json!({ "username": name, "role": "member" }),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let r = http(
        t.api,
        "POST",
        "api",
        "/api/v1/auth/login",
        &[],
        &body.to_string(),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let cookie = r.header("set-cookie").unwrap().split(';').next().unwrap();
    let form = r.header("x-tandem-form-token").unwrap();
    (cookie.to_string(), form.to_string())
}

/// A ticket URL for `instance`, asked for as the console asks: the session cookie and the form
/// token.
async fn ticket_url(t: &Tandem, (cookie, form): &(String, String), instance: &str) -> String {
    let r = http(
        t.api,
        "POST",
        "api",
        &format!("/api/v1/instances/{instance}/editor-ticket"),
        &[("Cookie", cookie), ("X-Tandem-Form-Token", form)],
        "",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    r.json()["url"].as_str().unwrap().to_string()
}

/// The path and query of a URL on an instance's host (`http://<host>/<path>`).
fn path_of(url: &str) -> &str {
    let rest = url.strip_prefix("http://").unwrap();
    &rest[rest.find('/').unwrap()..]
}

/// A GET of `path` on `instance`'s host through the proxy, as a browser sends it (the `Host`
/// with the port).
async fn browse(t: &Tandem, instance: &str, path: &str, cookie: Option<&str>) -> Resp {
    let host = format!("{instance}.localhost:{}", t.http.port());
    let headers: Vec<(&str, &str)> = cookie.map(|c| ("Cookie", c)).into_iter().collect();
    http(t.http, "GET", &host, path, &headers, "")
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_console_ticket_opens_the_editor_once_on_its_own_host() {
    let t = Tandem::start("ticket").await;
    let (app, team) = t.team_and_app("Tickets").await;
    let a = t.instance(&app, "ticketed", echo_flows(), 1).await;
    let b = t.instance(&app, "elsewhere", hello_flows(), 1).await;
    t.wait_running(&a, 1).await;
    t.wait_running(&b, 1).await;
    let member = console_member(&t, &team, "meg").await;

    // The console's link: on the instance's host, at the proxy's port.
    let url = ticket_url(&t, &member, &a).await;
    let prefix = format!(
        "http://ticketed.localhost:{}/_tandem/editor-ticket?ticket=",
        t.http.port()
    );
    assert!(url.starts_with(&prefix), "{url}");

    // Followed: 303 to the editor, with a host-only session cookie, nothing cached or referred.
    let r = browse(&t, "ticketed", path_of(&url), None).await;
    assert_eq!(r.status, 303, "{r:?}");
    assert_eq!(r.header("location"), Some("/admin/"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert_eq!(r.header("referrer-policy"), Some("no-referrer"));
    let set = r.header("set-cookie").unwrap();
    let (cookie, attributes) = set.split_once(';').unwrap();
    assert!(cookie.starts_with("tandem_session="), "{set}");
    assert_eq!(
        attributes, " Path=/; HttpOnly; SameSite=Lax",
        "no Domain: {set}"
    );

    // The cookie opens the editor and its admin API on this host.
    let r = browse(&t, "ticketed", "/admin/", Some(cookie)).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.contains("Node-RED"), "the editor page");
    let r = browse(&t, "ticketed", "/admin/settings", Some(cookie)).await;
    assert_eq!(r.status, 200, "{r:?}");
    // Without it, the editor asks for a sign-in.
    assert_eq!(
        browse(&t, "ticketed", "/admin/settings", None).await.status,
        401
    );
    // A flow never sees it.
    let both = format!("theme=dark; {cookie}");
    let r = browse(&t, "ticketed", "/echo", Some(&both)).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["cookie"], "theme=dark", "{}", r.body);

    // The same link again: refused.
    let r = browse(&t, "ticketed", path_of(&url), None).await;
    assert_eq!(r.status, 403, "{r:?}");
    assert!(r.body.contains("used already"), "{}", r.body);
    assert!(r.header("set-cookie").is_none(), "{r:?}");

    // A ticket for one instance brought to another's host: refused, and spent.
    let url = ticket_url(&t, &member, &a).await;
    let r = browse(&t, "elsewhere", path_of(&url), None).await;
    assert_eq!(r.status, 403, "{r:?}");
    assert!(r.body.contains("not for elsewhere"), "{}", r.body);
    let r = browse(&t, "ticketed", path_of(&url), None).await;
    assert_eq!(r.status, 403, "{r:?}");

    // Only GET takes a ticket; the proxy answers the path itself.
    let url = ticket_url(&t, &member, &a).await;
    let host = format!("ticketed.localhost:{}", t.http.port());
    let r = http(t.http, "POST", &host, path_of(&url), &[], "")
        .await
        .unwrap();
    assert_eq!(r.status, 405, "{r:?}");
    assert_eq!(r.header("allow"), Some("GET"));
    // The POST spent nothing.
    assert_eq!(
        browse(&t, "ticketed", path_of(&url), None).await.status,
        303
    );
}
