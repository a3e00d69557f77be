//! Issue 14's web console, first part, in headless Chromium against a real `tandem serve` with
//! real Node-RED: the first run sets the admin's password with the admin token, the instances of
//! the user's teams show their state and a dot per replica and follow it live (no reload), and
//! signing out ends the session. The page is served with a policy that forbids inline scripts
//! and framing.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::{hello_flows, http, Tandem};
use crate::webdriver::{Chromedriver, Session};

/// Waits until `script` (a function body) returns true in the page.
async fn until(page: &Session, what: &str, script: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if page.execute(script).await == Value::Bool(true) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} never happened; the page shows:\n{}",
            page.text().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_sets_the_admins_password_shows_instances_live_and_signs_out() {
    let t = Tandem::start("console").await;
    let base = format!("http://{}", t.api);

    // Served with a policy that allows no inline script and no framing.
    let r = http(t.api, "GET", &t.api.to_string(), "/", &[], "")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let csp = r.header("content-security-policy").unwrap_or_default();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert_eq!(r.header("x-frame-options"), Some("DENY"));

    let driver = Chromedriver::start().await;
    let page = driver.session().await;
    page.goto(&format!("{base}/")).await;
    until(
        &page,
        "the sign-in form",
        "return !document.getElementById('signin').hidden;",
    )
    .await;

    // First run: the admin token from the data directory and a new password.
    let token = std::fs::read_to_string(t.dir.join("admin-token")).unwrap();
    page.execute(&format!(
        "document.getElementById('show-setup').click();
         document.getElementById('setup-token').value = {};
         document.getElementById('setup-password').value = 'a-console-password';
         document.getElementById('setup-form').requestSubmit(); return true;",
        json!(token.trim())
    ))
    .await;
    until(
        &page,
        "signed in as admin",
        "return !document.getElementById('teams').hidden && document.getElementById('username').textContent === 'admin';",
    )
    .await;

    // An instance made meanwhile appears, and reaches running 1/1 with a green dot, live.
    let (app, _) = t.team_and_app("Console").await;
    let id = t.instance(&app, "shown", hello_flows(), 1).await;
    until(
        &page,
        "the instance running 1/1 with a running replica",
        "const row = document.querySelector('tr[data-instance=\"shown\"]');
         return !!row && row.querySelector('.state').textContent.startsWith('running 1/1')
             && row.querySelectorAll('.dot.running').length === 1;",
    )
    .await;
    // Stopped through the API: the page follows.
    assert_eq!(t.action(&id, "stop").await.status, 200);
    until(
        &page,
        "the instance no longer running",
        "const row = document.querySelector('tr[data-instance=\"shown\"]');
         return !!row && !row.querySelector('.state').textContent.startsWith('running');",
    )
    .await;

    // Signed out: back to the sign-in form, and the session no longer opens the API.
    page.execute("document.getElementById('signout').click(); return true;")
        .await;
    until(
        &page,
        "the sign-in form again",
        "return !document.getElementById('signin').hidden;",
    )
    .await;
    let status = page
        .execute(
            "const xhr = new XMLHttpRequest(); xhr.open('GET', '/api/v1/user', false); xhr.send(); return xhr.status;",
        )
        .await;
    assert_eq!(status, json!(401));
    // The new password signs in.
    let r = t
        .api(
            "POST",
            "/api/v1/auth/login",
            json!({ "username": "admin", "password": "a-console-password" }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
}
