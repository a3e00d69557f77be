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

/// Gives the first start's admin the password `admin-password`, as the first run does.
async fn admin_password(t: &Tandem) {
    let r = t
        .api(
            "PUT",
            "/api/v1/user/password",
            json!({ "current": "", "new": "admin-password" }),
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
}

/// Signs `page` in with the console's form.
async fn sign_in(page: &Session, base: &str, username: &str, password: &str) {
    page.goto(&format!("{base}/")).await;
    until(
        page,
        "the sign-in form",
        "return !document.getElementById('signin').hidden;",
    )
    .await;
    page.execute(&format!(
        "document.getElementById('signin-username').value = {};
         document.getElementById('signin-password').value = {};
         document.getElementById('signin-form').requestSubmit(); return true;",
        json!(username),
        json!(password)
    ))
    .await;
    until(
        page,
        "signed in",
        "return !document.getElementById('teams').hidden;",
    )
    .await;
}

/// Opens the page of instance `name` from the list.
async fn open_instance(page: &Session, name: &str) {
    let button = format!(
        "document.querySelector('tr[data-instance={}] button[data-open]')",
        json!(name)
    );
    until(
        page,
        "the instance in the list",
        &format!("return !!{button};"),
    )
    .await;
    page.execute(&format!("{button}.click(); return true;"))
        .await;
    until(
        page,
        "the instance page",
        "return !document.getElementById('instance').hidden;",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_page_shows_its_replicas_and_their_merged_log_and_offers_a_viewer_no_action() {
    let t = Tandem::start("console-instance").await;
    let base = format!("http://{}", t.api);
    admin_password(&t).await;
    let (app, team) = t.team_and_app("Duo").await;
    let id = t.instance(&app, "duo", hello_flows(), 2).await;
    t.wait_running(&id, 2).await;
    let r = t
        .api(
            "POST",
            "/api/v1/users",
            json!({ "username": "vera", "password": "vera-password" }),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let r = t
        .api(
            "POST",
            &format!("/api/v1/teams/{team}/members"),
            json!({ "username": "vera", "role": "viewer" }),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);

    let driver = Chromedriver::start().await;
    let page = driver.session().await;
    sign_in(&page, &base, "admin", "admin-password").await;
    open_instance(&page, "duo").await;
    until(
        &page,
        "two running replicas",
        "return document.querySelectorAll('#replicas tr').length === 2
            && [...document.querySelectorAll('#replicas .state')].every((s) => s.textContent === 'running');",
    )
    .await;
    // The merged log has both replicas' lines; the filter shows one.
    until(
        &page,
        "lines of both replicas",
        "const srcs = new Set([...document.querySelectorAll('#log .line')].map((l) => l.dataset.src));
         return srcs.has('duo-r0') && srcs.has('duo-r1');",
    )
    .await;
    page.execute(
        "const s = document.getElementById('log-replica'); s.value = 'duo-r1';
         s.dispatchEvent(new Event('change')); return true;",
    )
    .await;
    until(
        &page,
        "only duo-r1's lines",
        "const lines = [...document.querySelectorAll('#log .line')];
         return lines.length > 0 && lines.every((l) => l.dataset.src === 'duo-r1');",
    )
    .await;
    let actions = page
        .execute("return [...document.querySelectorAll('#instance-actions [data-action]')].map((b) => b.dataset.action);")
        .await;
    assert_eq!(actions, json!(["start", "stop", "restart"]));

    // A viewer sees the same page without any action.
    let viewer = driver.session().await;
    sign_in(&viewer, &base, "vera", "vera-password").await;
    open_instance(&viewer, "duo").await;
    until(
        &viewer,
        "the replicas",
        "return document.querySelectorAll('#replicas tr').length === 2;",
    )
    .await;
    let actions = viewer
        .execute("return document.querySelectorAll('#instance-actions [data-action]').length;")
        .await;
    assert_eq!(actions, json!(0), "a viewer was offered actions");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_turned_on_in_the_console_shows_two_replicas_and_a_killed_one_coming_back_live() {
    let t = Tandem::start("console-ha").await;
    let base = format!("http://{}", t.api);
    admin_password(&t).await;
    let (app, _) = t.team_and_app("Ha").await;
    let id = t.instance(&app, "pair", hello_flows(), 1).await;
    t.wait_running(&id, 1).await;

    let driver = Chromedriver::start().await;
    let page = driver.session().await;
    sign_in(&page, &base, "admin", "admin-password").await;
    open_instance(&page, "pair").await;
    page.execute(
        "document.getElementById('ha-replicas').value = '2';
         document.getElementById('ha-mode').value = 'balanced';
         document.getElementById('ha-form').requestSubmit(); return true;",
    )
    .await;
    let two_running = "return document.querySelectorAll('#replicas tr').length === 2
        && [...document.querySelectorAll('#replicas .state')].every((s) => s.textContent === 'running');";
    until(&page, "two running replicas", two_running).await;

    // A replica killed: the page shows it restarted (its restart count and last exit), running
    // again, without a reload. (Its time out of `running` is shorter than the page's poll.)
    let s = t.wait_running(&id, 2).await;
    let pid = s["replicas"][1]["pid"].as_u64().unwrap();
    crate::harness::kill9(pid);
    until(
        &page,
        "the killed replica restarted",
        "const row = document.querySelector('#replicas tr[data-replica=\"pair-r1\"]');
         return !!row && row.children[4].textContent === '1' && row.children[5].textContent !== '';",
    )
    .await;
    until(&page, "both replicas running again", two_running).await;
}
