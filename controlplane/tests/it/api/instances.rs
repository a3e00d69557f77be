//! Instances: the same name asked for twice at once, effective settings and environment, and
//! sleep as the API sets and shows it.

use serde_json::{json, Value};

use super::support::{both_backends, Backend, Server};

async fn same_name_at_once(b: Backend) {
    let s = Server::start(b).await;
    let owner = s.user("owner").await.auth;
    let team = s.team(&owner).await;
    let app = s.application(&owner, &team).await;
    let mut names = Vec::new();
    for round in 0..5 {
        let name = format!("race-{round}");
        let body = json!({ "name": name, "application_id": app, "stack_id": s.stack_id });
        let (a, b) = tokio::join!(
            s.post("/api/v1/instances", &owner, body.clone()),
            s.post("/api/v1/instances", &owner, body),
        );
        let (won, lost) = if a.status == 201 { (a, b) } else { (b, a) };
        assert_eq!(won.ok(201)["name"], name.as_str(), "{lost}");
        lost.err(409);
        names.push(name);
    }
    let r = s
        .get(&format!("/api/v1/teams/{team}/instances"), &owner)
        .await;
    let mut got: Vec<&str> = r.ok(200)["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    got.sort_unstable();
    assert_eq!(got, names);
    // The losers left no trace.
    let r = s
        .get("/api/v1/audit-log?event=instance.created", &s.admin)
        .await;
    assert_eq!(r.ok(200)["items"].as_array().unwrap().len(), 5, "{r}");
}

async fn effective_settings(b: Backend) {
    let s = Server::start(b).await;
    let owner = s.user("owner").await.auth;
    let team = s.team(&owner).await;
    let app = s.application(&owner, &team).await;
    let r = s
        .post(
            "/api/v1/templates",
            &s.admin,
            json!({
                "name": "Base",
                "settings": {
                    "flowFilePretty": true,
                    "functionTimeout": 5,
                    "editorTheme": { "userMenu": false },
                },
                "env": {
                    "REGION": { "value": "eu", "locked": true },
                    "LOG_LEVEL": { "value": "info" },
                },
                "policy": { "settings": { "functionTimeout": true, "editorTheme": true, "flowFilePretty": false } },
            }),
        )
        .await;
    let template = r.ok(201)["id"].as_str().unwrap().to_string();
    assert_eq!(
        r.json["env"]["LOG_LEVEL"],
        json!({ "value": "info", "locked": false })
    );

    let created = s
        .instance(
            &owner,
            &app,
            json!({
                "template_id": template,
                "settings": { "functionTimeout": 10 },
                "env": { "LOG_LEVEL": "debug", "EXTRA": "1" },
            }),
        )
        .await;
    let id = created["id"].as_str().unwrap().to_string();
    let path = format!("/api/v1/instances/{id}");
    let check = |i: &Value, settings: Value, env: Value, eff_settings: Value, eff_env: Value| {
        assert_eq!(i["settings"], settings, "{i}");
        assert_eq!(i["env"], env, "{i}");
        assert_eq!(i["effective_settings"], eff_settings, "{i}");
        assert_eq!(i["effective_env"], eff_env, "{i}");
    };
    let own = json!({ "functionTimeout": 10 });
    let own_env = json!({ "LOG_LEVEL": "debug", "EXTRA": "1" });
    let merged = json!({
        "flowFilePretty": true,
        "functionTimeout": 10,
        "editorTheme": { "userMenu": false },
    });
    let merged_env = json!({ "REGION": "eu", "LOG_LEVEL": "debug", "EXTRA": "1" });
    check(
        &created,
        own.clone(),
        own_env.clone(),
        merged.clone(),
        merged_env.clone(),
    );
    assert_eq!(created["template_id"], template.as_str());
    assert_eq!(
        created["url"],
        format!("http://{}.localhost", created["name"].as_str().unwrap())
    );
    assert_eq!(created["desired_state"], "running");
    let got = s.get(&path, &owner).await;
    check(
        got.ok(200),
        own,
        own_env,
        merged.clone(),
        merged_env.clone(),
    );
    // The lists show the same.
    let listed = s
        .get(&format!("/api/v1/applications/{app}/instances"), &owner)
        .await;
    assert_eq!(listed.ok(200)["items"][0]["effective_settings"], merged);

    // A change replaces the overrides; top-level keys replace the template's whole value.
    let r = s
        .put(
            &path,
            &owner,
            json!({ "settings": { "editorTheme": { "header": { "title": "Mine" } } }, "env": {} }),
        )
        .await;
    check(
        r.ok(200),
        json!({ "editorTheme": { "header": { "title": "Mine" } } }),
        json!({}),
        json!({
            "flowFilePretty": true,
            "functionTimeout": 5,
            "editorTheme": { "header": { "title": "Mine" } },
        }),
        json!({ "REGION": "eu", "LOG_LEVEL": "info" }),
    );
    // Leaving fields out keeps them.
    let r = s.put(&path, &owner, json!({})).await;
    assert_eq!(
        r.ok(200)["settings"],
        json!({ "editorTheme": { "header": { "title": "Mine" } } })
    );

    // The template's values are read live: a template change shows at once.
    s.put(
        &format!("/api/v1/templates/{template}"),
        &s.admin,
        json!({
            "name": "Base",
            "settings": { "flowFilePretty": false, "functionTimeout": 7 },
            "env": { "REGION": { "value": "us", "locked": true } },
            "policy": { "settings": { "functionTimeout": true, "editorTheme": true } },
        }),
    )
    .await
    .ok(200);
    let got = s.get(&path, &owner).await;
    check(
        got.ok(200),
        json!({ "editorTheme": { "header": { "title": "Mine" } } }),
        json!({}),
        json!({
            "flowFilePretty": false,
            "functionTimeout": 7,
            "editorTheme": { "header": { "title": "Mine" } },
        }),
        json!({ "REGION": "us" }),
    );

    // Without a template, the effective values are the instance's own.
    let plain = s
        .instance(
            &owner,
            &app,
            json!({ "settings": { "functionGlobalContext": { "anything": [1, 2] } }, "env": { "A": "b" } }),
        )
        .await;
    check(
        &plain,
        json!({ "functionGlobalContext": { "anything": [1, 2] } }),
        json!({ "A": "b" }),
        json!({ "functionGlobalContext": { "anything": [1, 2] } }),
        json!({ "A": "b" }),
    );
    let bare = s.instance(&owner, &app, json!({})).await;
    check(&bare, json!({}), json!({}), json!({}), json!({}));
    assert_eq!(bare["ha"], json!(null));
    assert_eq!(bare["template_id"], json!(null));

    // Moving to another stack.
    let r = s
        .post(
            "/api/v1/stacks",
            &s.admin,
            json!({ "name": "next", "nodered_version": "4.1.3" }),
        )
        .await;
    let next = r.ok(201)["id"].as_str().unwrap().to_string();
    let r = s.put(&path, &owner, json!({ "stack_id": next })).await;
    assert_eq!(r.ok(200)["stack_id"], next.as_str());
}

/// The instance's `asleep_since`, written as the sleeper writes it.
async fn set_asleep(s: &Server, id: &str, since: Option<i64>) {
    sqlx::query("UPDATE instances SET asleep_since = $1 WHERE id = $2")
        .bind(since)
        .bind(id)
        .execute(&s.db().await)
        .await
        .unwrap();
}

async fn sleep_settings(b: Backend) {
    let s = Server::start(b).await;
    let owner = s.user("owner").await.auth;
    let team = s.team(&owner).await;
    let app = s.application(&owner, &team).await;
    let member = s.user("member").await;
    s.add_member(&owner, &team, &member, "member").await;
    let viewer = s.user("viewer").await;
    s.add_member(&owner, &team, &viewer, "viewer").await;
    let created = s.instance(&owner, &app, json!({})).await;
    // Off and awake by default; no warnings outside the answer that turns sleep on.
    assert_eq!(created["sleep_after_s"], json!(null), "{created}");
    assert_eq!(created["asleep_since"], json!(null), "{created}");
    assert!(created.get("warnings").is_none(), "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    let path = format!("/api/v1/instances/{id}");

    // A member sets it; it reads back, and a change without it keeps it.
    let r = s
        .put(&path, &member.auth, json!({ "sleep_after_s": 900 }))
        .await;
    assert_eq!(r.ok(200)["sleep_after_s"], 900, "{r}");
    assert!(
        r.json.get("warnings").is_none(),
        "no flows, no warning: {r}"
    );
    let r = s.get(&path, &owner).await;
    assert_eq!(r.ok(200)["sleep_after_s"], 900, "{r}");
    let r = s.put(&path, &owner, json!({ "env": { "A": "1" } })).await;
    assert_eq!(r.ok(200)["sleep_after_s"], 900, "{r}");
    let listed = s
        .get(&format!("/api/v1/applications/{app}/instances"), &owner)
        .await;
    assert_eq!(listed.ok(200)["items"][0]["sleep_after_s"], 900);
    // Audited like the rest of the change.
    let r = s
        .put(&path, &owner, json!({ "sleep_after_s": 2_592_000 }))
        .await;
    assert_eq!(r.ok(200)["sleep_after_s"], 2_592_000, "{r}");
    let log = s
        .get(
            &format!("{path}/audit-log?event=instance.updated&limit=1"),
            &owner,
        )
        .await;
    let body = &log.ok(200)["items"][0]["body"];
    assert_eq!(body["before"]["sleep_after_s"], 900, "{log}");
    assert_eq!(body["after"]["sleep_after_s"], 2_592_000, "{log}");

    // A viewer may not.
    s.put(&path, &viewer.auth, json!({ "sleep_after_s": 60 }))
        .await
        .err(403);
    s.put(&path, &viewer.auth, json!({ "sleep_after_s": null }))
        .await
        .err(403);

    // Asleep (as the sleeper marks it): shown; other changes, and a new time, leave it asleep.
    let since = 1_735_000_000_000_i64;
    set_asleep(&s, &id, Some(since)).await;
    let r = s.get(&path, &owner).await;
    assert_eq!(r.ok(200)["asleep_since"], since, "{r}");
    let r = s.put(&path, &owner, json!({ "env": {} })).await;
    assert_eq!(r.ok(200)["asleep_since"], since, "{r}");
    let r = s.put(&path, &owner, json!({ "sleep_after_s": 60 })).await;
    assert_eq!(r.ok(200)["asleep_since"], since, "{r}");
    // Off with null, and with 0: off, and awake.
    for off in [json!(null), json!(0)] {
        let r = s.put(&path, &owner, json!({ "sleep_after_s": 60 })).await;
        r.ok(200);
        set_asleep(&s, &id, Some(since)).await;
        let r = s.put(&path, &owner, json!({ "sleep_after_s": off })).await;
        assert_eq!(r.ok(200)["sleep_after_s"], json!(null), "{r}");
        assert_eq!(r.json["asleep_since"], json!(null), "{r}");
        let r = s.get(&path, &owner).await;
        assert_eq!(r.ok(200)["asleep_since"], json!(null), "{r}");
    }

    // Every action ends a sleep and keeps the setting: start and restart wake the instance,
    // stop and suspend leave it stopped rather than asleep.
    s.put(&path, &owner, json!({ "sleep_after_s": 60 }))
        .await
        .ok(200);
    for action in ["start", "restart", "stop", "suspend"] {
        set_asleep(&s, &id, Some(since)).await;
        s.call("POST", &format!("{path}/actions/{action}"), &owner, None)
            .await
            .ok(200);
        let r = s.get(&path, &owner).await;
        assert_eq!(r.ok(200)["asleep_since"], json!(null), "{action}: {r}");
        assert_eq!(r.json["sleep_after_s"], 60, "{action}: {r}");
    }
}

async fn sleep_warns_of_repeating_injects(b: Backend) {
    let s = Server::start(b).await;
    let owner = s.user("owner").await.auth;
    let team = s.team(&owner).await;
    let app = s.application(&owner, &team).await;
    let flows = json!([
        { "id": "t1", "type": "tab", "label": "Flow 1" },
        { "id": "n1", "type": "inject", "z": "t1", "name": "Poll", "repeat": "5", "crontab": "", "wires": [[]] },
        { "id": "n2", "type": "inject", "z": "t1", "name": "", "repeat": "", "crontab": "00 03 * * *", "wires": [[]] },
        { "id": "n3", "type": "inject", "z": "t1", "name": "By hand", "repeat": "", "crontab": "", "wires": [[]] },
    ]);
    let created = s.instance(&owner, &app, json!({ "flows": flows })).await;
    let path = format!("/api/v1/instances/{}", created["id"].as_str().unwrap());
    let expected = json!([
        "inject node \"Poll\" repeats every 5 s; it does not run while the instance sleeps",
        "inject node \"n2\" runs on a schedule (00 03 * * *); it does not run while the instance sleeps",
    ]);
    let r = s.put(&path, &owner, json!({ "sleep_after_s": 900 })).await;
    assert_eq!(r.ok(200)["warnings"], expected, "{r}");
    assert_eq!(r.json["sleep_after_s"], 900, "{r}");
    // Changed while on: said again. Read, or changed without sleep, or turned off: not.
    let r = s.put(&path, &owner, json!({ "sleep_after_s": 1800 })).await;
    assert_eq!(r.ok(200)["warnings"], expected, "{r}");
    let r = s.get(&path, &owner).await;
    assert!(r.ok(200).get("warnings").is_none(), "{r}");
    let r = s.put(&path, &owner, json!({ "env": {} })).await;
    assert!(r.ok(200).get("warnings").is_none(), "{r}");
    let r = s.put(&path, &owner, json!({ "sleep_after_s": null })).await;
    assert!(r.ok(200).get("warnings").is_none(), "{r}");

    // An inject without repeat or schedule: no warning.
    let quiet = s
        .instance(
            &owner,
            &app,
            json!({ "flows": [
                { "id": "t1", "type": "tab" },
                { "id": "n1", "type": "inject", "z": "t1", "name": "Once", "repeat": "", "crontab": "", "once": true, "wires": [[]] },
            ] }),
        )
        .await;
    let r = s
        .put(
            &format!("/api/v1/instances/{}", quiet["id"].as_str().unwrap()),
            &owner,
            json!({ "sleep_after_s": 900 }),
        )
        .await;
    assert_eq!(r.ok(200)["sleep_after_s"], 900, "{r}");
    assert!(r.json.get("warnings").is_none(), "{r}");
}

both_backends!(
    same_name_at_once,
    effective_settings,
    sleep_settings,
    sleep_warns_of_repeating_injects,
);
