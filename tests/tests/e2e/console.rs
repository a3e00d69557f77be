//! The web console in headless Chromium against a real `tandem serve` with real Node-RED: the
//! first run sets the admin's password with the admin token; a user creates a team, an
//! application and an instance, sees it reach `running 1/1` live and opens its editor through
//! the proxy's ticket handoff; an instance's page shows its replicas and their merged log, live;
//! a viewer is offered no action; a write without the session's form token is refused; signing
//! out ends the session. The page is served with a policy that forbids inline scripts and
//! framing. A failed test leaves a screenshot (see `webdriver`); the creation test saves
//! screenshots of the main pages under `screenshots/pages/`.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::{hello_flows, http, Tandem};
use crate::webdriver::{screenshot_dir, Chromedriver, Session};

/// Waits until `script` (a function body) returns true in the page.
pub(crate) async fn until(page: &Session, what: &str, script: &str) {
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
        "return !!document.getElementById('page-home') && document.getElementById('username').textContent === 'admin';",
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
pub(crate) async fn admin_password(t: &Tandem) {
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
pub(crate) async fn sign_in(page: &Session, base: &str, username: &str, password: &str) {
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
        "return !!document.getElementById('page-home');",
    )
    .await;
}

/// Sets the value of the control `selector` as typing would (an `input` event follows).
pub(crate) async fn fill(page: &Session, selector: &str, value: &str) {
    let found = format!("return !!document.querySelector({});", json!(selector));
    until(page, selector, &found).await;
    page.execute(&format!(
        "const e = document.querySelector({}); e.value = {}; e.dispatchEvent(new Event('input'));
         e.dispatchEvent(new Event('change')); return true;",
        json!(selector),
        json!(value)
    ))
    .await;
}

/// Submits the form `selector` once it is on the page.
pub(crate) async fn submit(page: &Session, selector: &str) {
    let form = format!("document.querySelector({})", json!(selector));
    until(page, selector, &format!("return !!{form};")).await;
    page.execute(&format!("{form}.requestSubmit(); return true;"))
        .await;
}

/// Opens the page of instance `name` from the list.
pub(crate) async fn open_instance(page: &Session, name: &str) {
    let button = format!(
        "document.querySelector('tr[data-instance={}] a[data-open]')",
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
        "return !!document.getElementById('page-instance');",
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
    assert_eq!(
        actions,
        json!(["start", "stop", "restart", "suspend", "delete"])
    );

    // A write from the console's own origin without the session's form token is refused, and
    // the same write with it (as the console sends it) goes through.
    let path = format!("/api/v1/instances/{id}/snapshots");
    let bare = page
        .execute(&format!(
            "const xhr = new XMLHttpRequest(); xhr.open('POST', {}, false);
             xhr.setRequestHeader('content-type', 'application/json');
             xhr.send(JSON.stringify({{ name: 'no token' }})); return [xhr.status, xhr.responseText];",
            json!(path)
        ))
        .await;
    assert_eq!(bare[0], json!(403), "{bare}");
    assert!(bare[1].as_str().unwrap().contains("form token"), "{bare}");
    fill(&page, "#snapshot-name", "with the token").await;
    submit(&page, "#snapshot-form").await;
    until(
        &page,
        "the snapshot taken through the form",
        "return [...document.querySelectorAll('#snapshots-table td')].some((c) => c.textContent === 'with the token');",
    )
    .await;
    let r = t.api("GET", &path, Value::Null).await;
    let listed = r.json();
    let names: Vec<&str> = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(names, ["with the token"], "{}", r.body);

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
    let offered = viewer
        .execute(
            "return [...document.querySelectorAll('#page-instance button, #page-instance form')]
                 .filter((e) => e.id !== 'log-follow').map((e) => e.id || e.textContent);",
        )
        .await;
    assert_eq!(offered, json!([]), "a viewer was offered actions or forms");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_creates_a_team_an_application_and_an_instance_and_opens_its_editor() {
    let t = Tandem::start("console-create").await;
    let base = format!("http://{}", t.api);
    admin_password(&t).await;
    // A name another team's instance has.
    let (other, _) = t.team_and_app("Other").await;
    t.instance(&other, "taken", hello_flows(), 1).await;

    let driver = Chromedriver::start().await;
    let page = driver.session().await;
    sign_in(&page, &base, "admin", "admin-password").await;
    // Marks this document: a reload would lose the mark.
    page.execute("window.sameDocument = true; return true;")
        .await;

    // A team, then an application in it.
    page.execute("location.hash = '#/teams'; return true;")
        .await;
    fill(&page, "#team-name", "Web").await;
    submit(&page, "#team-form").await;
    until(
        &page,
        "the new team's page",
        "const p = document.getElementById('page-team'); return !!p && p.dataset.team === 'Web';",
    )
    .await;
    fill(&page, "#application-name", "Site").await;
    submit(&page, "#application-form").await;
    until(
        &page,
        "the new application",
        "return !!document.querySelector('[data-application=\"Site\"]');",
    )
    .await;

    // The name is checked as it is typed, in the API's words.
    page.execute("location.hash = '#/new'; return true;").await;
    let check = "document.getElementById('new-name-check').textContent";
    for (typed, said) in [
        ("Bad_Name", "use 1 to 63 of a-z"),
        ("taken", "an instance named \"taken\" exists"),
        ("webapp", "webapp is free."),
    ] {
        fill(&page, "#new-name", typed).await;
        until(
            &page,
            &format!("{said:?} said of {typed:?}"),
            &format!("return {check}.includes({});", json!(said)),
        )
        .await;
    }
    page.execute(
        "const s = document.getElementById('new-application');
         s.value = [...s.options].find((o) => o.textContent === 'Web / Site').value; return true;",
    )
    .await;
    submit(&page, "#create-form").await;
    until(
        &page,
        "webapp running 1/1 on its page",
        "const p = document.getElementById('page-instance');
         return !!p && p.dataset.instance === 'webapp'
             && document.getElementById('instance-state').textContent.startsWith('running 1/1')
             && document.querySelectorAll('#replicas .dot.running').length === 1;",
    )
    .await;
    assert_eq!(
        page.execute("return window.sameDocument === true;").await,
        json!(true),
        "the page was reloaded"
    );
    let url = page
        .execute("return document.getElementById('instance-url').href;")
        .await;
    let url = url.as_str().unwrap().trim_end_matches('/').to_string();
    assert!(url.starts_with("http://webapp.localhost:"), "{url}");

    // Screenshots of the main pages, for a reviewer, at a desktop's width and a phone's.
    let shots = screenshot_dir().join("pages");
    let console = page.windows().await[0].clone();
    for (name, hash, ready) in [
        (
            "instance",
            "",
            "return !!document.getElementById('page-instance');",
        ),
        (
            "home",
            "#/",
            "return !!document.querySelector('tr[data-instance=\"webapp\"]');",
        ),
        ("team", "", "return true;"),
        (
            "new-instance",
            "#/new",
            "return !!document.getElementById('create-form');",
        ),
        (
            "account",
            "#/account",
            "return !!document.getElementById('token-form');",
        ),
        (
            "admin",
            "#/admin",
            "return !!document.querySelector('tr[data-user=\"admin\"]');",
        ),
    ] {
        if name == "team" {
            page.execute("location.hash = '#/teams'; return true;")
                .await;
            until(
                &page,
                "the teams",
                "return !!document.querySelector('tr[data-team=\"Web\"] a');",
            )
            .await;
            page.execute("document.querySelector('tr[data-team=\"Web\"] a').click(); return true;")
                .await;
            until(
                &page,
                "the team page",
                "return !!document.querySelector('[data-application=\"Site\"]');",
            )
            .await;
        } else if !hash.is_empty() {
            page.execute(&format!("location.hash = {}; return true;", json!(hash)))
                .await;
        }
        until(&page, name, ready).await;
        page.screenshot(&shots.join(format!("{name}.png")))
            .await
            .unwrap();
    }
    page.resize(390, 844).await;
    page.execute("location.hash = '#/'; return true;").await;
    until(
        &page,
        "home",
        "return !!document.querySelector('tr[data-instance=\"webapp\"]');",
    )
    .await;
    page.screenshot(&shots.join("home-phone.png"))
        .await
        .unwrap();
    page.resize(1280, 900).await;

    // "Open editor": a new tab on the instance's host, signed in there through the ticket.
    page.execute("location.hash = '#/'; return true;").await;
    open_instance(&page, "webapp").await;
    until(
        &page,
        "the editor button",
        "return !!document.getElementById('open-editor');",
    )
    .await;
    page.execute("document.getElementById('open-editor').click(); return true;")
        .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let editor = loop {
        let windows = page.windows().await;
        if let Some(w) = windows.into_iter().find(|w| *w != console) {
            break w;
        }
        assert!(Instant::now() < deadline, "no editor tab opened");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    page.switch_to(&editor).await;
    until(
        &page,
        // The palette comes from the editor's admin API, called with the host's own cookie.
        "Node-RED's editor on the instance's host, its palette loaded",
        "return location.host.startsWith('webapp.localhost:') && document.title.includes('Node-RED')
             && document.querySelectorAll('.red-ui-palette-node').length > 0;",
    )
    .await;
    page.screenshot(&shots.join("editor.png")).await.unwrap();
    page.switch_to(&console).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_deploys_from_the_console_with_its_progress_per_replica_live() {
    let t = Tandem::start("console-pipeline").await;
    let base = format!("http://{}", t.api);
    admin_password(&t).await;
    let (app, team) = t.team_and_app("Flow").await;
    let dev = t.instance(&app, "stage-dev", hello_flows(), 1).await;
    let prod = t.instance(&app, "stage-prod", json!([]), 2).await;
    t.wait_running(&dev, 1).await;
    t.wait_running(&prod, 2).await;
    let r = t
        .api(
            "POST",
            "/api/v1/pipelines",
            json!({ "application_id": app, "name": "release" }),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let pipeline = r.json()["id"].as_str().unwrap().to_string();
    for (name, instance) in [("dev", &dev), ("prod", &prod)] {
        let r = t
            .api(
                "POST",
                &format!("/api/v1/pipelines/{pipeline}/stages"),
                json!({ "name": name, "instance_id": instance, "action": "create_snapshot" }),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
    }

    let driver = Chromedriver::start().await;
    let page = driver.session().await;
    sign_in(&page, &base, "admin", "admin-password").await;
    page.execute(&format!("location.hash = '#/teams/{team}'; return true;"))
        .await;
    // Stages left to right, dev then prod; a deploy button on dev only.
    until(
        &page,
        "the pipeline's stages",
        "const s = [...document.querySelectorAll('[data-pipeline=\"release\"] .stage')].map((e) => e.dataset.stage);
         return s.join() === 'dev,prod';",
    )
    .await;
    let buttons = page
        .execute("return [...document.querySelectorAll('[data-pipeline=\"release\"] [data-deploy]')].map((b) => b.dataset.deploy);")
        .await;
    assert_eq!(buttons, json!(["dev"]));
    page.execute("document.querySelector('[data-deploy=\"dev\"]').click(); return true;")
        .await;
    // The deploy's progress: both of prod's replicas deployed, then the deploy succeeded.
    until(
        &page,
        "the deploy succeeded on both replicas",
        "const box = document.querySelector('[data-stage=\"dev\"] .progress-box');
         const done = box && box.querySelector('[data-status=\"succeeded\"]');
         return !!done && box.querySelectorAll('.step.deployed').length === 2;",
    )
    .await;
    // Prod serves dev's flow.
    let r = t.get("stage-prod", "/hello").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
}
