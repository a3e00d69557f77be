//! Instances: the same name asked for twice at once, and effective settings and environment.

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

both_backends!(same_name_at_once, effective_settings);
