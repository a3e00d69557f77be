//! The console's pages beyond the first run and the instance list, in headless Chromium against
//! a real `tandem serve` with real Node-RED, each checked against the API:
//! - settings and environment: a template's locked values shown locked; a member's variable and
//!   secret saved through the page, the secret never shown and kept when saved again, as the
//!   replica's own `env.get` shows; a settings document that is not JSON, or one the template
//!   refuses, changes nothing and says why;
//! - a team's owner adds a member, changes the role and removes them; a member is offered none;
//! - an account's password change and a personal token, shown once, working, then revoked;
//! - the admin area: a user created, disabled (its sign-in refused in the API's words) and
//!   enabled; a non-admin gets no admin content;
//! - an instance's module refused in the API's words, suspend, and delete through the typed
//!   confirmation;
//! - the live log: pause, follow, and older entries on scrolling to the top;
//! - HTTP access: an owner puts the flows' endpoints behind tokens, creates a token (shown
//!   once) that opens them through the proxy and revokes it; a viewer reads the mode and the
//!   tokens and is offered nothing;
//! - a custom hostname: a name the API refuses is refused in its words and nothing stored; one
//!   saved with its certificate and key is shown with its certificate, the key never shown
//!   again, then removed; a viewer reads it and is offered no form.
//!
//! No test installs an npm module: the module test checks a refusal, which the API gives before
//! any install.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::console::{admin_password, fill, open_instance, sign_in, submit, until};
use crate::harness::{hello_flows, http, Resp, Tandem};
use crate::webdriver::{Chromedriver, Session};

/// Clicks the element `selector` once it is on the page.
async fn click(page: &Session, selector: &str) {
    let e = format!("document.querySelector({})", json!(selector));
    until(page, selector, &format!("return !!{e};")).await;
    page.execute(&format!("{e}.click(); return true;")).await;
}

/// Waits until the page's error line shows and says `words`.
async fn error_says(page: &Session, words: &str) {
    until(
        page,
        &format!("the error {words:?}"),
        &format!(
            "const e = document.getElementById('error'); return !e.hidden && e.textContent.includes({});",
            json!(words)
        ),
    )
    .await;
}

/// Whether the page's error line is hidden.
async fn no_error(page: &Session) -> bool {
    page.execute("return document.getElementById('error').hidden;")
        .await
        == json!(true)
}

/// Creates user `name` with `password`; its id.
async fn user(t: &Tandem, name: &str, password: &str) -> String {
    let r = t
        .api(
            "POST",
            "/api/v1/users",
            json!({ "username": name, "password": password }),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    r.json()["id"].as_str().unwrap().to_string()
}

/// Adds user `name` to `team` with `role`.
async fn join(t: &Tandem, team: &str, name: &str, role: &str) {
    let r = t
        .api(
            "POST",
            &format!("/api/v1/teams/{team}/members"),
            json!({ "username": name, "role": role }),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
}

/// A sign-in through the API, with no other credential: its status and error message.
async fn login(t: &Tandem, name: &str, password: &str) -> (u16, String) {
    let body = json!({ "username": name, "password": password }).to_string();
    let r = http(
        t.api,
        "POST",
        &t.api.to_string(),
        "/api/v1/auth/login",
        &[],
        &body,
    )
    .await
    .unwrap();
    let message = r.json()["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    (r.status, message)
}

/// `GET path` as the admin, once it answers 200 with a body `ok` accepts; that body.
async fn api_until(t: &Tandem, path: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = t.api("GET", path, Value::Null).await;
        if r.status == 200 && ok(&r.json()) {
            return r.json();
        }
        assert!(
            Instant::now() < deadline,
            "{what} never happened: {} {}",
            r.status,
            r.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until instance `name` answers `GET path` with `want` through the proxy.
async fn serves(t: &Tandem, name: &str, path: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let r = t.get(name, path).await.ok();
        if r.as_ref()
            .is_some_and(|r| r.status == 200 && r.body == want)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name}{path} answers {r:?}, not {want:?}\n{}",
            t.tail_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `GET /env` answers the variables `PLAIN`, `API_KEY` and `REGION` as the flows read them
/// (`-` for one not set), joined with `|`.
fn env_flows() -> Value {
    json!([
        { "id": "t1", "type": "tab", "label": "Env" },
        { "id": "in", "type": "http in", "z": "t1", "url": "/env", "method": "get", "wires": [["fn"]] },
        { "id": "fn", "type": "function", "z": "t1", "wires": [["out"]],
          "func": "msg.payload = ['PLAIN', 'API_KEY', 'REGION'].map((n) => env.get(n) || '-').join('|'); return msg;" },
        { "id": "out", "type": "http response", "z": "t1", "statusCode": "", "headers": {}, "wires": [] }
    ])
}

/// The secret a member types; no page may ever hold it.
const SECRET: &str = "k3y-5ecret-77";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_saves_variables_and_a_secret_kept_sealed_and_bad_settings_change_nothing() {
    let t = Tandem::start("console-env").await;
    let base = format!("http://{}", t.api);
    let (app, team) = t.team_and_app("Env").await;
    user(&t, "mia", "mia-password").await;
    join(&t, &team, "mia", "member").await;
    // A locked variable, and a setting instances may not override (only functionTimeout).
    let r = t
        .api(
            "POST",
            "/api/v1/templates",
            json!({
                "name": "regional",
                "settings": { "debugMaxLength": 2000 },
                "env": { "REGION": { "value": "eu-west", "locked": true }, "GREETING": { "value": "hi" } },
                "policy": { "settings": { "functionTimeout": true } },
            }),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let template = r.json()["id"].as_str().unwrap().to_string();
    let r = t
        .api(
            "POST",
            "/api/v1/instances",
            json!({
                "name": "envy",
                "application_id": app,
                "stack_id": t.stack().await,
                "template_id": template,
                "flows": env_flows(),
            }),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.json()["id"].as_str().unwrap().to_string();
    let path = format!("/api/v1/instances/{id}");
    serves(&t, "envy", "/env", "-|-|eu-west").await;

    let driver = Chromedriver::start().await;
    let page = driver.session().await;
    sign_in(&page, &base, "mia", "mia-password").await;
    open_instance(&page, "envy").await;
    // Who set each value: the template's locked ones say so.
    until(
        &page,
        "the template's values, the locked ones shown locked",
        "const by = (sel) => { const r = document.querySelector(sel); return r ? r.lastElementChild.textContent : null; };
         return by('tr[data-env=\"REGION\"]') === 'locked by template' && by('tr[data-env=\"GREETING\"]') === 'template'
             && by('tr[data-setting=\"debugMaxLength\"]') === 'locked by template';",
    )
    .await;

    // Two new variables through the form, one of them secret. (A button is disabled while
    // its action runs: one click per script.)
    for n in 1..=2 {
        page.execute(
            "[...document.querySelectorAll('#env-form button')].find((b) => b.textContent === 'Add a variable').click();
             return true;",
        )
        .await;
        until(
            &page,
            &format!("{n} rows in the variables' form"),
            &format!("return document.querySelectorAll('#env-form .env-row').length === {n};"),
        )
        .await;
    }
    let typed = page
        .execute(&format!(
            "const rows = [...document.querySelectorAll('#env-form .env-row')];
             const set = (row, name, value) => {{
               for (const [label, v] of [['Variable name', name], ['Value', value]]) {{
                 const e = row.querySelector('[aria-label=\"' + label + '\"]');
                 e.value = v; e.dispatchEvent(new Event('input'));
               }}
             }};
             set(rows[0], 'PLAIN', 'one');
             rows[1].querySelector('[aria-label=\"Secret\"]').click();
             set(rows[1], 'API_KEY', {});
             return [rows.length, rows[1].querySelector('[aria-label=\"Value\"]').type];",
            json!(SECRET)
        ))
        .await;
    assert_eq!(
        typed,
        json!([2, "password"]),
        "a secret being typed must not show"
    );
    submit(&page, "#env-form").await;
    until(
        &page,
        "the saved variables, the secret never shown",
        "const value = (name) => { const r = document.querySelector('tr[data-env=\"' + name + '\"]'); return r ? r.children[1].textContent : null; };
         return value('PLAIN') === 'one' && value('API_KEY') === 'secret (never shown)';",
    )
    .await;
    let i = t.api("GET", &path, Value::Null).await.json();
    assert_eq!(
        i["env"],
        json!({ "PLAIN": "one", "API_KEY": { "secret": true } }),
        "{i}"
    );
    assert_eq!(
        i["effective_env"],
        json!({ "API_KEY": { "secret": true }, "GREETING": "hi", "PLAIN": "one", "REGION": "eu-west" }),
        "{i}"
    );
    let held = page
        .execute(&format!(
            "return document.documentElement.outerHTML.includes({0})
                 || [...document.querySelectorAll('input, textarea')].some((e) => e.value.includes({0}));",
            json!(SECRET)
        ))
        .await;
    assert_eq!(held, json!(false), "the page holds the secret");
    serves(&t, "envy", "/env", &format!("one|{SECRET}|eu-west")).await;

    // Saved again with another value, the secret not typed: kept, as the restarted replica
    // (with the new value) shows.
    let kept = page
        .execute(
            "const row = (name) => [...document.querySelectorAll('#env-form .env-row')]
                 .find((r) => r.querySelector('[aria-label=\"Variable name\"]').value === name);
             const secret = row('API_KEY').querySelector('[aria-label=\"Value\"]');
             const plain = row('PLAIN').querySelector('[aria-label=\"Value\"]');
             plain.value = 'two'; plain.dispatchEvent(new Event('input'));
             document.getElementById('env-form').requestSubmit();
             return [secret.value, secret.type, secret.placeholder];",
        )
        .await;
    assert_eq!(kept, json!(["", "password", "unchanged (secret)"]));
    until(
        &page,
        "PLAIN saved as two",
        "const r = document.querySelector('tr[data-env=\"PLAIN\"]'); return !!r && r.children[1].textContent === 'two';",
    )
    .await;
    let i = t.api("GET", &path, Value::Null).await.json();
    assert_eq!(
        i["env"],
        json!({ "PLAIN": "two", "API_KEY": { "secret": true } }),
        "{i}"
    );
    serves(&t, "envy", "/env", &format!("two|{SECRET}|eu-west")).await;
    assert!(no_error(&page).await, "{}", page.text().await);

    // Settings that are not JSON, or that the template does not open: refused in words, and
    // the instance is not changed.
    let before = t.api("GET", &path, Value::Null).await.json();
    fill(&page, "#settings-json", "{\"functionTimeout\": ").await;
    submit(&page, "#settings-form").await;
    error_says(&page, "The settings are not JSON").await;
    fill(&page, "#settings-json", "{\"debugMaxLength\": 10}").await;
    submit(&page, "#settings-form").await;
    error_says(
        &page,
        "settings.debugMaxLength: template regional does not let instances set it",
    )
    .await;
    let after = t.api("GET", &path, Value::Null).await.json();
    for field in ["settings", "effective_settings", "updated_at"] {
        assert_eq!(before[field], after[field], "{field} changed");
    }
    assert_eq!(after["settings"], json!({}));
    // One the template opens is saved, and shown as this instance's.
    fill(&page, "#settings-json", "{\"functionTimeout\": 30}").await;
    submit(&page, "#settings-form").await;
    until(
        &page,
        "functionTimeout set by this instance",
        "const r = document.querySelector('tr[data-setting=\"functionTimeout\"]');
         return !!r && r.children[1].textContent === '30' && r.lastElementChild.textContent === 'this instance';",
    )
    .await;
    assert!(no_error(&page).await, "{}", page.text().await);
    let i = t.api("GET", &path, Value::Null).await.json();
    assert_eq!(i["settings"], json!({ "functionTimeout": 30 }), "{i}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_adds_a_member_changes_the_role_and_removes_them_and_a_member_is_offered_none() {
    let t = Tandem::start("console-team").await;
    let base = format!("http://{}", t.api);
    let (_, team) = t.team_and_app("Crew").await;
    // The owner is no platform admin: what it is offered comes from its role in the team.
    user(&t, "olga", "olga-password").await;
    join(&t, &team, "olga", "owner").await;
    user(&t, "max", "max-password").await;
    join(&t, &team, "max", "member").await;
    user(&t, "vic", "vic-password").await;
    let members = format!("/api/v1/teams/{team}/members");
    let role_of = |v: &Value, name: &str| -> Option<String> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["username"] == name)
            .map(|m| m["role"].as_str().unwrap().to_string())
    };

    let driver = Chromedriver::start().await;
    let page = driver.session().await;
    sign_in(&page, &base, "olga", "olga-password").await;
    page.execute(&format!("location.hash = '#/teams/{team}'; return true;"))
        .await;
    fill(&page, "#member-username", "vic").await;
    fill(&page, "#member-role", "viewer").await;
    submit(&page, "#member-form").await;
    until(
        &page,
        "vic listed as a viewer",
        "const s = document.querySelector('select[data-role-of=\"vic\"]'); return !!s && s.value === 'viewer';",
    )
    .await;
    let m = t.api("GET", &members, Value::Null).await.json();
    assert_eq!(role_of(&m, "vic").as_deref(), Some("viewer"), "{m}");

    fill(&page, "select[data-role-of=\"vic\"]", "member").await;
    api_until(&t, &members, "vic a member", |m| {
        role_of(m, "vic").as_deref() == Some("member")
    })
    .await;
    assert!(no_error(&page).await, "{}", page.text().await);

    click(&page, "tr[data-member=\"vic\"] button").await;
    until(
        &page,
        "vic no longer listed",
        "return !!document.querySelector('tr[data-member=\"olga\"]') && !document.querySelector('tr[data-member=\"vic\"]');",
    )
    .await;
    let m = t.api("GET", &members, Value::Null).await.json();
    assert_eq!(role_of(&m, "vic"), None, "{m}");

    // A member sees the members and their roles, and no control to change them.
    let other = driver.session().await;
    sign_in(&other, &base, "max", "max-password").await;
    other
        .execute(&format!("location.hash = '#/teams/{team}'; return true;"))
        .await;
    until(
        &other,
        "the members with their roles",
        "const r = document.querySelector('tr[data-member=\"olga\"]'); return !!r && r.children[1].textContent === 'owner';",
    )
    .await;
    let offered = other
        .execute(
            "return [...document.querySelectorAll('#members select, #members button, #members form, #member-form')]
                 .map((e) => e.outerHTML);",
        )
        .await;
    assert_eq!(offered, json!([]), "a member was offered to change members");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_changes_the_password_and_creates_uses_and_revokes_a_token() {
    let t = Tandem::start("console-account").await;
    let base = format!("http://{}", t.api);
    user(&t, "ana", "ana-password-1").await;

    let driver = Chromedriver::start().await;
    let page = driver.session().await;
    sign_in(&page, &base, "ana", "ana-password-1").await;
    page.execute("location.hash = '#/account'; return true;")
        .await;
    // A wrong current password is refused in the API's words.
    fill(&page, "#password-current", "not-my-password").await;
    fill(&page, "#password-new", "ana-password-2").await;
    submit(&page, "#password-form").await;
    error_says(&page, "current: is not your password").await;
    assert_eq!(login(&t, "ana", "ana-password-1").await.0, 200);

    // Changed: the session ends, the page asks to sign in (and shows nothing else), the old
    // password no longer signs in and the new one does.
    fill(&page, "#password-current", "ana-password-1").await;
    fill(&page, "#password-new", "ana-password-2").await;
    submit(&page, "#password-form").await;
    until(
        &page,
        "the sign-in form, and nothing of the signed-in pages",
        "const shown = (id) => getComputedStyle(document.getElementById(id)).display !== 'none';
         return shown('signin') && !shown('who') && !document.getElementById('page-account');",
    )
    .await;
    assert_eq!(
        login(&t, "ana", "ana-password-1").await,
        (401, "wrong username or password".to_string())
    );
    assert_eq!(login(&t, "ana", "ana-password-2").await.0, 200);

    // A token: shown once, it opens the API as ana; revoked, it opens nothing.
    sign_in(&page, &base, "ana", "ana-password-2").await;
    page.execute("location.hash = '#/account'; return true;")
        .await;
    fill(&page, "#token-name", "script").await;
    submit(&page, "#token-form").await;
    until(
        &page,
        "the new token shown and listed",
        "const v = document.getElementById('token-value');
         return !!v && v.textContent.startsWith('tdm_') && !!document.querySelector('tr[data-token=\"script\"]');",
    )
    .await;
    let token = page
        .execute("return document.getElementById('token-value').textContent;")
        .await
        .as_str()
        .unwrap()
        .to_string();
    let r = t.api_as(&token, "GET", "/api/v1/user", Value::Null).await;
    assert_eq!(
        (r.status, r.json()["username"].clone()),
        (200, json!("ana"))
    );
    page.execute("location.hash = '#/'; return true;").await;
    until(
        &page,
        "the instances page",
        "return !!document.getElementById('page-home');",
    )
    .await;
    page.execute("location.hash = '#/account'; return true;")
        .await;
    until(
        &page,
        "the token listed again",
        "return !!document.querySelector('tr[data-token=\"script\"]');",
    )
    .await;
    let again = page
        .execute(&format!(
            "return !!document.getElementById('token-value') || document.documentElement.outerHTML.includes({});",
            json!(token)
        ))
        .await;
    assert_eq!(again, json!(false), "the token's value was shown twice");

    click(&page, "tr[data-token=\"script\"] button").await;
    until(
        &page,
        "the token gone from the list",
        "return !!document.getElementById('token-form') && !document.querySelector('tr[data-token=\"script\"]');",
    )
    .await;
    let r = t.api_as(&token, "GET", "/api/v1/user", Value::Null).await;
    assert_eq!(r.status, 401, "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_creates_disables_and_enables_a_user_and_a_non_admin_gets_no_admin_area() {
    let t = Tandem::start("console-admin").await;
    let base = format!("http://{}", t.api);
    admin_password(&t).await;

    let driver = Chromedriver::start().await;
    let page = driver.session().await;
    sign_in(&page, &base, "admin", "admin-password").await;
    page.execute("location.hash = '#/admin'; return true;")
        .await;
    fill(&page, "#user-username", "dora").await;
    fill(&page, "#user-password", "dora-password").await;
    submit(&page, "#user-form").await;
    let state = |s: &str| {
        format!(
            "const r = document.querySelector('tr[data-user=\"dora\"]');
             return !!r && r.querySelector('.state').textContent === '{s}';"
        )
    };
    until(&page, "dora listed, enabled", &state("enabled")).await;
    let dora = |v: &Value| -> Value {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["username"] == "dora")
            .cloned()
            .unwrap_or(Value::Null)
    };
    let users = t.api("GET", "/api/v1/users", Value::Null).await.json();
    assert_eq!(
        (
            dora(&users)["admin"].clone(),
            dora(&users)["disabled"].clone()
        ),
        (json!(false), json!(false)),
        "{users}"
    );
    assert_eq!(login(&t, "dora", "dora-password").await.0, 200);

    // Disabled: its sign-in fails with the API's words, through the API and the console.
    click(&page, "[data-toggle=\"dora\"]").await;
    until(&page, "dora disabled", &state("disabled")).await;
    let disabled = "this user is disabled; a platform admin can enable it again";
    assert_eq!(
        login(&t, "dora", "dora-password").await,
        (401, disabled.to_string())
    );
    let other = driver.session().await;
    other.goto(&format!("{base}/")).await;
    until(
        &other,
        "the sign-in form",
        "return !document.getElementById('signin').hidden;",
    )
    .await;
    fill(&other, "#signin-username", "dora").await;
    fill(&other, "#signin-password", "dora-password").await;
    submit(&other, "#signin-form").await;
    error_says(&other, disabled).await;

    // Enabled again: it signs in, and the admin area shows it nothing of the admin's.
    click(&page, "[data-toggle=\"dora\"]").await;
    until(&page, "dora enabled again", &state("enabled")).await;
    let users = t.api("GET", "/api/v1/users", Value::Null).await.json();
    assert_eq!(dora(&users)["disabled"], json!(false), "{users}");
    sign_in(&other, &base, "dora", "dora-password").await;
    other
        .execute("location.hash = '#/admin'; return true;")
        .await;
    until(
        &other,
        "the admin address answered",
        "return !!document.getElementById('page-error');",
    )
    .await;
    let shown = other
        .execute(
            "const found = [...document.querySelectorAll('#page-admin, #users, #user-form, #stacks, #templates, [data-user]')]
                 .map((e) => e.id || e.dataset.user);
             if (getComputedStyle(document.getElementById('nav-admin')).display !== 'none') found.push('the Admin link');
             return found;",
        )
        .await;
    assert_eq!(shown, json!([]), "{}", other.text().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_refuses_a_bad_module_suspends_and_is_deleted_only_by_its_typed_name() {
    let t = Tandem::start("console-actions").await;
    let base = format!("http://{}", t.api);
    admin_password(&t).await;
    let (app, _) = t.team_and_app("Acts").await;
    let id = t.instance(&app, "acts", hello_flows(), 1).await;
    let path = format!("/api/v1/instances/{id}");
    t.wait_running(&id, 1).await;

    let driver = Chromedriver::start().await;
    let page = driver.session().await;
    sign_in(&page, &base, "admin", "admin-password").await;
    open_instance(&page, "acts").await;

    // A module name npm would refuse: the API's words, and no module asked for.
    fill(&page, "#module-name", "Bad Name").await;
    submit(&page, "#module-form").await;
    error_says(&page, "\"Bad Name\" is not an npm package name").await;
    let m = t
        .api("GET", &format!("{path}/modules"), Value::Null)
        .await
        .json();
    assert_eq!(m, json!({ "modules": {} }));

    // Suspended: the page follows.
    click(&page, "#instance-actions [data-action=\"suspend\"]").await;
    until(
        &page,
        "the instance suspended",
        "return document.getElementById('instance-state').dataset.state === 'suspended'
             && !document.querySelector('#replicas .dot.running');",
    )
    .await;
    let i = t.api("GET", &path, Value::Null).await.json();
    assert_eq!(i["desired_state"], "suspended", "{i}");
    assert_eq!(t.status(&id).await["state"], "suspended");

    // Deleted only when its name is typed.
    click(&page, "#instance-actions [data-action=\"delete\"]").await;
    until(
        &page,
        "the confirmation",
        "return !document.getElementById('delete-confirm').hidden;",
    )
    .await;
    fill(&page, "#delete-confirm input", "act").await;
    submit(&page, "#delete-form").await;
    error_says(&page, "Type the instance's name, acts, to delete it.").await;
    assert_eq!(t.api("GET", &path, Value::Null).await.status, 200);
    assert_eq!(
        page.execute("return !!document.getElementById('page-instance');")
            .await,
        json!(true)
    );
    fill(&page, "#delete-confirm input", "acts").await;
    submit(&page, "#delete-form").await;
    until(
        &page,
        "the list, without the instance",
        "return !!document.getElementById('page-home') && !document.querySelector('tr[data-instance=\"acts\"]')
             && document.getElementById('team-list').textContent.includes('No instance yet.');",
    )
    .await;
    let r = t.api("GET", &path, Value::Null).await;
    assert_eq!(r.status, 404, "{}", r.body);
    // The instance page, left, says nothing on the list (its last refresh found no instance).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(no_error(&page).await, "{}", page.text().await);
}

/// Five numbered `node.warn` lines every 50 ms: a hundred log entries a second.
fn chatty_flows() -> Value {
    json!([
        { "id": "t1", "type": "tab", "label": "Chatty" },
        { "id": "tick", "type": "inject", "z": "t1", "once": true, "onceDelay": 0.1, "repeat": "0.05", "wires": [["say"]] },
        { "id": "say", "type": "function", "z": "t1", "wires": [[]],
          "func": "for (let i = 0; i < 5; i++) { const n = (context.get('n') || 0) + 1; context.set('n', n); node.warn('line ' + n); } return null;" }
    ])
}

/// The newest entry's `seq` in the instance's log.
async fn newest_seq(t: &Tandem, id: &str) -> u64 {
    t.logs(id, "limit=1")
        .await
        .first()
        .and_then(|e| e["seq"].as_u64())
        .unwrap_or(0)
}

/// The `seq`s of the log lines the page shows, in order.
async fn shown_seqs(page: &Session) -> Vec<u64> {
    let v = page
        .execute("return [...document.querySelectorAll('#log .line')].map((l) => Number(l.dataset.seq));")
        .await;
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_u64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_pauses_follows_and_loads_older_entries_at_the_top() {
    let t = Tandem::start("console-log").await;
    let base = format!("http://{}", t.api);
    admin_password(&t).await;
    let (app, _) = t.team_and_app("Log").await;
    let id = t.instance(&app, "chatty", chatty_flows(), 1).await;
    // More than two pages of entries.
    let deadline = Instant::now() + Duration::from_secs(90);
    while newest_seq(&t, &id).await < 600 {
        assert!(
            Instant::now() < deadline,
            "the instance never logged 600 entries\n{}",
            t.tail_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let driver = Chromedriver::start().await;
    let page = driver.session().await;
    sign_in(&page, &base, "admin", "admin-password").await;
    open_instance(&page, "chatty").await;
    until(
        &page,
        "a page of log lines",
        "return document.querySelectorAll('#log .line').length >= 200;",
    )
    .await;

    // Following, the view keeps to the newest lines.
    let at_end = "const l = document.getElementById('log');
         return l.scrollHeight > l.clientHeight && l.scrollTop + l.clientHeight >= l.scrollHeight - 4;";
    until(&page, "the log scrolled to its newest line", at_end).await;
    let shown = shown_seqs(&page).await.len();
    until(
        &page,
        "new lines, the log still at its newest",
        &format!("return document.querySelectorAll('#log .line').length > {shown} && (() => {{ {at_end} }})();"),
    )
    .await;

    // Scrolled to the top: the page of entries before the oldest shown comes above it.
    let first = shown_seqs(&page).await[0];
    page.execute("document.getElementById('log').scrollTop = 0; return true;")
        .await;
    until(
        &page,
        "older entries",
        &format!("const l = document.querySelector('#log .line'); return !!l && Number(l.dataset.seq) < {first};"),
    )
    .await;
    let seqs = shown_seqs(&page).await;
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "the lines are not in order: {seqs:?}"
    );
    assert_eq!(
        seqs.iter().filter(|s| **s < first).count(),
        200,
        "not one page of older entries: {seqs:?}"
    );

    // Paused: no new line while the replica logs; followed: they come.
    let paused = page
        .execute(
            "document.getElementById('log-follow').click();
             const seqs = [...document.querySelectorAll('#log .line')].map((l) => Number(l.dataset.seq));
             return [document.getElementById('log-follow').textContent, seqs.length, Math.max(...seqs)];",
        )
        .await;
    assert_eq!(paused[0], "Follow");
    let (count, last) = (paused[1].as_u64().unwrap(), paused[2].as_u64().unwrap());
    tokio::time::sleep(Duration::from_secs(5)).await;
    let seqs = shown_seqs(&page).await;
    assert_eq!(
        (seqs.len() as u64, seqs.last().copied()),
        (count, Some(last)),
        "lines appeared while paused"
    );
    let logged = newest_seq(&t, &id).await;
    assert!(
        logged > last + 100,
        "the replica did not log meanwhile: {logged}"
    );
    click(&page, "#log-follow").await;
    until(
        &page,
        "the lines logged while paused",
        &format!(
            "const l = document.querySelector('#log .line:last-child');
             return document.getElementById('log-follow').textContent === 'Pause' && !!l && Number(l.dataset.seq) >= {logged};"
        ),
    )
    .await;
    let seqs = shown_seqs(&page).await;
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "the lines are not in order after following: {seqs:?}"
    );
}

/// `GET /hello` of `instance` through the proxy with `token` (none: no credential), until it
/// answers `want`; a change of mode or of tokens reaches the proxy with the next route table.
async fn hello_answers(t: &Tandem, instance: &str, token: Option<&str>, want: u16) -> Resp {
    let auth = token.map(|v| format!("Bearer {v}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| ("Authorization", a))
        .into_iter()
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = t.request(instance, "GET", "/hello", &headers).await.ok();
        if let Some(r) = r.as_ref().filter(|r| r.status == want) {
            return r.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{instance}/hello with {token:?} answers {r:?}, not {want}\n{}",
            t.tail_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_guards_the_flows_with_a_token_made_and_revoked_in_the_page_and_a_viewer_only_reads(
) {
    let t = Tandem::start("console-http-access").await;
    let base = format!("http://{}", t.api);
    admin_password(&t).await;
    let (app, team) = t.team_and_app("Gate").await;
    user(&t, "vera", "vera-password").await;
    join(&t, &team, "vera", "viewer").await;
    let id = t.instance(&app, "gated", hello_flows(), 1).await;
    let path = format!("/api/v1/instances/{id}");
    serves(&t, "gated", "/hello", "hello").await;

    // The admin, who owns every team, puts the endpoints behind tokens.
    let driver = Chromedriver::start().await;
    let page = driver.session().await;
    sign_in(&page, &base, "admin", "admin-password").await;
    open_instance(&page, "gated").await;
    let mode_shown = |mode: &str| {
        format!(
            "const m = document.getElementById('http-auth-current'); return !!m && m.dataset.mode === '{mode}';"
        )
    };
    until(&page, "the mode none", &mode_shown("none")).await;
    fill(&page, "#http-auth-mode", "tokens").await;
    submit(&page, "#http-auth-form").await;
    until(&page, "the mode tokens", &mode_shown("tokens")).await;
    let r = t
        .api("GET", &format!("{path}/http-auth"), Value::Null)
        .await;
    assert_eq!((r.status, r.json()), (200, json!({ "mode": "tokens" })));
    let r = hello_answers(&t, "gated", None, 401).await;
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer realm=\"gated\""),
        "{r:?}"
    );

    // A token made in the page, shown once, opens the endpoints.
    fill(&page, "#http-token-name", "probe").await;
    fill(&page, "#http-token-days", "7").await;
    submit(&page, "#http-token-form").await;
    until(
        &page,
        "the new token shown and listed",
        "const v = document.getElementById('http-token-value');
         return !!v && v.textContent.startsWith('tdh_') && !!document.querySelector('tr[data-http-token=\"probe\"]');",
    )
    .await;
    let token = page
        .execute("return document.getElementById('http-token-value').textContent;")
        .await
        .as_str()
        .unwrap()
        .to_string();
    let tokens = t
        .api("GET", &format!("{path}/http-tokens"), Value::Null)
        .await
        .json();
    let items = tokens["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{tokens}");
    assert_eq!(items[0]["name"], "probe", "{tokens}");
    let week = items[0]["expires_at"].as_i64().unwrap() - items[0]["created_at"].as_i64().unwrap();
    assert!(
        (7 * 86_400_000 - 60_000..=7 * 86_400_000 + 60_000).contains(&week),
        "not 7 days: {tokens}"
    );
    let r = hello_answers(&t, "gated", Some(&token), 200).await;
    assert_eq!(r.body, "hello");
    assert_eq!(
        hello_answers(&t, "gated", Some("tdh_wrong"), 401)
            .await
            .status,
        401
    );

    // Revoked in the page: gone from the list and from the screen, and it opens nothing.
    click(&page, "tr[data-http-token=\"probe\"] button").await;
    until(
        &page,
        "the token gone from the list and its value from the page",
        "return !!document.getElementById('http-token-form') && !document.querySelector('tr[data-http-token=\"probe\"]')
             && !document.getElementById('http-token-value');",
    )
    .await;
    hello_answers(&t, "gated", Some(&token), 401).await;
    assert!(no_error(&page).await, "{}", page.text().await);

    // A viewer reads the mode and the tokens (one left), and is offered nothing to change.
    let r = t
        .api(
            "POST",
            &format!("{path}/http-tokens"),
            json!({ "name": "kept" }),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let kept = r.json()["token_value"].as_str().unwrap().to_string();
    let viewer = driver.session().await;
    sign_in(&viewer, &base, "vera", "vera-password").await;
    open_instance(&viewer, "gated").await;
    until(&viewer, "the mode tokens", &mode_shown("tokens")).await;
    until(
        &viewer,
        "the token kept listed, never used",
        "const r = document.querySelector('tr[data-http-token=\"kept\"]');
         return !!r && [...r.children].map((c) => c.textContent).join('|').endsWith('|never|never');",
    )
    .await;
    let offered = viewer
        .execute(&format!(
            "const s = document.getElementById('http-access');
             return [...s.querySelectorAll('form, button, select, input, textarea')].map((e) => e.outerHTML)
                 .concat(s.outerHTML.includes({}) ? ['the token value'] : []);",
            json!(kept)
        ))
        .await;
    assert_eq!(
        offered,
        json!([]),
        "a viewer was offered to change HTTP access"
    );
    assert!(no_error(&viewer).await, "{}", viewer.text().await);
}

/// Sleep when idle, from the instance's page: a member turns it on in minutes, sees which of
/// the flows' schedules will not run while it sleeps, and turns it off; a viewer only reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_turns_sleep_on_and_off_from_the_page_and_a_viewer_only_reads() {
    let t = Tandem::start("console-sleep").await;
    let base = format!("http://{}", t.api);
    admin_password(&t).await;
    let (app, team) = t.team_and_app("Naps").await;
    user(&t, "vera", "vera-password").await;
    join(&t, &team, "vera", "viewer").await;
    let mut flows = hello_flows();
    flows.as_array_mut().unwrap().push(json!({
        "id": "tick", "type": "inject", "z": "t1", "name": "tick", "repeat": "30", "crontab": "",
        "wires": [[]]
    }));
    let id = t.instance(&app, "napper", flows, 1).await;
    let path = format!("/api/v1/instances/{id}");
    let stored =
        || async { t.api("GET", &path, Value::Null).await.json()["sleep_after_s"].clone() };
    let shown = |after: &str| {
        format!(
            "const p = document.getElementById('sleep-current'); return !!p && p.dataset.sleepAfter === '{after}';"
        )
    };

    let driver = Chromedriver::start().await;
    let page = driver.session().await;
    sign_in(&page, &base, "admin", "admin-password").await;
    open_instance(&page, "napper").await;
    until(&page, "sleep off", &shown("off")).await;
    fill(&page, "#sleep-minutes", "2").await;
    submit(&page, "#sleep-form").await;
    until(&page, "sleep after 2 minutes", &shown("120")).await;
    assert_eq!(stored().await, json!(120));
    until(
        &page,
        "the schedule that will not run, named",
        "const w = document.getElementById('sleep-warnings');
         return !!w && w.textContent.includes('inject node \"tick\" repeats every 30 s');",
    )
    .await;
    let said = page
        .execute("return document.getElementById('sleep-current').textContent;")
        .await;
    assert!(
        said.as_str()
            .unwrap()
            .starts_with("After 2 minutes with no request"),
        "{said}"
    );

    // A viewer reads it and is offered nothing to change.
    let viewer = driver.session().await;
    sign_in(&viewer, &base, "vera", "vera-password").await;
    open_instance(&viewer, "napper").await;
    until(&viewer, "sleep after 2 minutes", &shown("120")).await;
    let offered = viewer
        .execute("return [...document.getElementById('sleep').querySelectorAll('form, button, input')].length;")
        .await;
    assert_eq!(offered, json!(0), "a viewer was offered to change sleep");

    // Off again, and the warnings go with it.
    click(&page, "#sleep-off").await;
    until(
        &page,
        "sleep off, no warnings",
        &format!(
            "{} && !document.getElementById('sleep-warnings')",
            shown("off").trim_end_matches(';')
        ),
    )
    .await;
    assert_eq!(stored().await, Value::Null);
    assert!(no_error(&page).await, "{}", page.text().await);
}

/// A `members` instance's endpoints are for its team, signed in on the instance's own host,
/// which the console's cookie does not reach: its page's "Open signed in" opens them there
/// through an access ticket, for a viewer too, and goes once the mode is another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_opens_a_members_instance_signed_in_from_its_page() {
    let t = Tandem::start("console-open-signed-in").await;
    let base = format!("http://{}", t.api);
    admin_password(&t).await;
    let (app, team) = t.team_and_app("Inner").await;
    user(&t, "vera", "vera-password").await;
    join(&t, &team, "vera", "viewer").await;
    let id = t.instance(&app, "inner", hello_flows(), 1).await;
    let auth = format!("/api/v1/instances/{id}/http-auth");
    serves(&t, "inner", "/hello", "hello").await;
    let r = t.api("PUT", &auth, json!({ "mode": "members" })).await;
    assert_eq!(r.status, 200, "{}", r.body);
    hello_answers(&t, "inner", None, 401).await;

    let driver = Chromedriver::start().await;
    let page = driver.session().await;
    sign_in(&page, &base, "vera", "vera-password").await;
    open_instance(&page, "inner").await;
    let console = page.windows().await[0].clone();
    click(&page, "#open-signed-in").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let opened = loop {
        if let Some(w) = page.windows().await.into_iter().find(|w| *w != console) {
            break w;
        }
        assert!(Instant::now() < deadline, "no tab opened");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    page.switch_to(&opened).await;
    // The ticket lands on `/`; the flow's endpoint then answers this browser, signed in there.
    until(
        &page,
        "the instance's host, after the ticket",
        "return location.host.startsWith('inner.localhost:') && location.pathname === '/';",
    )
    .await;
    page.execute("location.href = '/hello'; return true;").await;
    until(
        &page,
        "the flow's answer to the signed-in browser",
        "return location.pathname === '/hello' && document.body.innerText.trim() === 'hello';",
    )
    .await;
    page.switch_to(&console).await;

    // Another mode: the button goes, live.
    let r = t.api("PUT", &auth, json!({ "mode": "none" })).await;
    assert_eq!(r.status, 200, "{}", r.body);
    until(
        &page,
        "the button gone with the members mode",
        "return !!document.getElementById('instance-url') && !document.getElementById('open-signed-in');",
    )
    .await;
    assert!(no_error(&page).await, "{}", page.text().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_sets_a_custom_hostname_with_its_certificate_and_removes_it_and_a_viewer_only_reads(
) {
    let t = Tandem::start("console-custom-hostname").await;
    let base = format!("http://{}", t.api);
    admin_password(&t).await;
    let (app, team) = t.team_and_app("Own").await;
    user(&t, "vera", "vera-password").await;
    join(&t, &team, "vera", "viewer").await;
    let id = t.instance(&app, "owned", hello_flows(), 1).await;
    let api_path = format!("/api/v1/instances/{id}/custom-hostname");
    // The hostname the section shows; none: it says "None".
    let shown = |host: Option<&str>| {
        format!(
            "const c = document.getElementById('custom-hostname-current');
             return !!c && (c.dataset.hostname || null) === {} && (!!c.dataset.hostname || c.textContent.startsWith('None'));",
            json!(host)
        )
    };

    // The admin, who owns every team: none yet.
    let driver = Chromedriver::start().await;
    let page = driver.session().await;
    sign_in(&page, &base, "admin", "admin-password").await;
    open_instance(&page, "owned").await;
    until(&page, "no custom hostname", &shown(None)).await;

    // A name the API refuses: its words, and nothing stored.
    fill(&page, "#custom-hostname-input", "orders.localhost").await;
    submit(&page, "#custom-hostname-form").await;
    error_says(&page, "hostname: is localhost or under it").await;
    assert_eq!(t.api("GET", &api_path, Value::Null).await.status, 404);
    assert_eq!(page.execute(&shown(None)).await, json!(true));

    // One of the customer's domain, with its certificate and key: shown with the certificate,
    // the key gone from the form and shown nowhere.
    let ca = tandem_proxy::tls::test_ca::TestCa::new();
    let pair = ca.issue(&["flows.customer.org"]);
    let key_line = pair.key.lines().nth(1).unwrap();
    fill(&page, "#custom-hostname-input", "flows.customer.org").await;
    fill(&page, "#custom-hostname-certificate", &pair.certificate).await;
    fill(&page, "#custom-hostname-key", &pair.key).await;
    submit(&page, "#custom-hostname-form").await;
    until(
        &page,
        "the hostname saved",
        &shown(Some("flows.customer.org")),
    )
    .await;
    let r = t.api("GET", &api_path, Value::Null).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let saved = r.json();
    assert_eq!(
        (saved["hostname"].clone(), saved["has_certificate"].clone()),
        (json!("flows.customer.org"), json!(true)),
        "{saved}"
    );
    let on_page = page
        .execute(&format!(
            "const c = document.getElementById('custom-hostname-current');
             const value = (id) => document.getElementById(id).value;
             return [c.dataset.certificate, document.getElementById('custom-hostname-url').getAttribute('href'),
                 value('custom-hostname-key'), value('custom-hostname-certificate'),
                 document.body.innerText.includes('PRIVATE KEY') || document.getElementById('custom-hostname').innerText.includes('PRIVATE KEY'),
                 document.documentElement.outerHTML.includes({0})
                     || [...document.querySelectorAll('input, textarea')].some((e) => e.value.includes({0}))];",
            json!(key_line)
        ))
        .await;
    assert_eq!(
        on_page,
        json!(["true", saved["url"], "", "", false, false]),
        "[certificate, url, key, certificate field, PRIVATE KEY shown, key held]"
    );
    // Valid for ages (rcgen's default runs to 4096): its end shown, no warning.
    let far = page
        .execute("return [document.getElementById('custom-hostname-current').innerText.includes('valid until'),
                          !!document.getElementById('custom-hostname-expiry')];")
        .await;
    assert_eq!(
        far,
        json!([true, false]),
        "[valid until shown, expiry warning]"
    );
    assert!(no_error(&page).await, "{}", page.text().await);

    // A certificate past its end (the API takes it: it fits the name and its key) is flagged.
    let expired = ca.issue_until(&["flows.customer.org"], (2020, 1, 1));
    fill(&page, "#custom-hostname-certificate", &expired.certificate).await;
    fill(&page, "#custom-hostname-key", &expired.key).await;
    submit(&page, "#custom-hostname-form").await;
    until(
        &page,
        "the expired certificate flagged",
        "const w = document.getElementById('custom-hostname-expiry');
         return !!w && w.textContent.includes('has expired');",
    )
    .await;
    let r = t.api("GET", &api_path, Value::Null).await;
    assert_eq!(
        r.json()["certificate_expires_at"],
        json!(1_577_836_800_000i64)
    );

    // Removed: none again.
    click(&page, "#custom-hostname-remove").await;
    until(&page, "the hostname removed", &shown(None)).await;
    assert_eq!(t.api("GET", &api_path, Value::Null).await.status, 404);
    assert!(no_error(&page).await, "{}", page.text().await);

    // A viewer reads the hostname and is offered nothing to change.
    let r = t
        .api(
            "PUT",
            &api_path,
            json!({ "hostname": "flows.customer.org" }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let viewer = driver.session().await;
    sign_in(&viewer, &base, "vera", "vera-password").await;
    open_instance(&viewer, "owned").await;
    until(&viewer, "the hostname", &shown(Some("flows.customer.org"))).await;
    let offered = viewer
        .execute(
            "return [...document.querySelectorAll('#custom-hostname-form, #custom-hostname form, #custom-hostname button, #custom-hostname input, #custom-hostname textarea')]
                 .map((e) => e.outerHTML);",
        )
        .await;
    assert_eq!(
        offered,
        json!([]),
        "a viewer was offered to change the hostname"
    );
    assert!(no_error(&viewer).await, "{}", viewer.text().await);
}
