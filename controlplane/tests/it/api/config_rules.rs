//! Issue 9's attacks through settings and the environment, made through the real API by a team
//! member: settings that name paths, modules or code; variables that change how Node.js starts;
//! a bad `TANDEM_MQTT_EXCLUDE`. And the upgrade: values stored before the rules are left out,
//! named in the instance and its status, logged and audited once.

use std::sync::Arc;

use serde_json::{json, Value};
use tandem_controlplane::desired::{desired_instances, NotAppliedReporter};
use tandem_controlplane::state::ApiConfig;
use tandem_coordinator::logs::{Cursor, LogBook};

use super::support::{both_backends, Backend, LogsOnly, Server};

async fn member_cannot_reach_the_machine_through_settings_or_env(b: Backend) {
    let s = Server::start(b).await;
    let owner = s.user("owner").await;
    let member = s.user("member").await;
    let team = s.team(&owner.auth).await;
    s.add_member(&owner.auth, &team, &member, "member").await;
    let app = s.application(&owner.auth, &team).await;
    let inst = s.instance(&owner.auth, &app, json!({})).await;
    let path = format!("/api/v1/instances/{}", inst["id"].as_str().unwrap());
    let data_dir = s.dir.path().display().to_string();

    // The reported attack, and the rest of its class: each refused with the key named.
    for (settings, field) in [
        (json!({ "httpStatic": data_dir }), "settings.httpStatic"),
        (
            json!({ "httpStatic": [{ "path": data_dir, "root": "/x" }] }),
            "settings.httpStatic",
        ),
        (json!({ "userDir": data_dir }), "settings.userDir"),
        (json!({ "nodesDir": data_dir }), "settings.nodesDir"),
        (
            json!({ "contextStorage": { "default": { "module": "localfilesystem", "config": { "dir": data_dir } } } }),
            "settings.contextStorage",
        ),
        (json!({ "storageModule": "fs" }), "settings.storageModule"),
        (
            json!({ "editorTheme": { "page": { "scripts": [format!("{data_dir}/secret-key")] } } }),
            "settings.editorTheme.page.scripts",
        ),
        (
            json!({ "editorTheme": { "page": { "css": format!("{data_dir}/admin-token") } } }),
            "settings.editorTheme.page.css",
        ),
        (
            json!({ "httpNodeMiddleware": "x" }),
            "settings.httpNodeMiddleware",
        ),
        (
            json!({ "ui": { "middleware": "x" } }),
            "settings.ui.middleware",
        ),
        (
            json!({ "functionExternalModules": true }),
            "settings.functionExternalModules",
        ),
        (
            json!({ "__proto__": { "httpStatic": data_dir } }),
            "settings.__proto__",
        ),
        (
            json!({ "functionTimeout": "1" }),
            "settings.functionTimeout",
        ),
    ] {
        let r = s
            .put(&path, &member.auth, json!({ "settings": settings }))
            .await;
        let message = r.invalid(field);
        assert!(!message.is_empty(), "{settings}: {r}");
    }
    // An allowed one, for contrast.
    s.put(
        &path,
        &member.auth,
        json!({ "settings": { "functionTimeout": 5, "httpNodeCors": { "origin": "*" } } }),
    )
    .await
    .ok(200);

    for (name, value) in [
        (
            "NODE_OPTIONS",
            "--import=data:text/javascript,console.log(1)",
        ),
        ("NODE_PATH", "/tmp"),
        ("LD_PRELOAD", "/tmp/x.so"),
        ("PATH", "/tmp"),
        ("HOME", "/tmp"),
        ("BASH_ENV", "/tmp/x"),
        ("npm_config_script_shell", "/tmp/x"),
        ("TANDEM_ADMIN_SECRET", "x"),
        ("TANDEM_MQTT_URL", "mqtt://evil:1883"),
        ("TANDEM_MQTT_EXCLUDE", "a#"),
    ] {
        let r = s
            .put(&path, &member.auth, json!({ "env": { name: value } }))
            .await;
        r.invalid(&format!("env.{name}"));
    }
    let r = s
        .put(
            &path,
            &member.auth,
            json!({ "env": { "TANDEM_MQTT_EXCLUDE": "replies/#, a/+/b", "API_URL": "http://x" } }),
        )
        .await;
    assert_eq!(
        r.ok(200)["effective_env"]["TANDEM_MQTT_EXCLUDE"],
        "replies/#, a/+/b"
    );

    // The OpenAPI document carries the allowlist, with types, and nothing else.
    let doc = s.get("/api/v1/openapi.json", &s.admin).await;
    let allowed = &doc.ok(200)["components"]["schemas"]["NodeSettings"];
    assert_eq!(allowed["additionalProperties"], json!(false), "{allowed}");
    let props = allowed["properties"].as_object().unwrap();
    for key in ["httpNodeCors", "functionTimeout", "editorTheme", "logging"] {
        assert!(props.contains_key(key), "{key} missing: {allowed}");
    }
    for key in [
        "httpStatic",
        "userDir",
        "storageModule",
        "httpNodeMiddleware",
    ] {
        assert!(!props.contains_key(key), "{key} listed: {allowed}");
    }

    // Templates are bound by the same list; so is what their policy opens.
    for (body, field) in [
        (
            json!({ "name": "t1", "settings": { "httpStatic": "/" } }),
            "settings.httpStatic",
        ),
        (
            json!({ "name": "t2", "env": { "NODE_OPTIONS": { "value": "x" } } }),
            "env.NODE_OPTIONS",
        ),
        (
            json!({ "name": "t3", "policy": { "settings": { "httpStatic": true } } }),
            "policy.settings.httpStatic",
        ),
    ] {
        let r = s.post("/api/v1/templates", &s.admin, body.clone()).await;
        r.invalid(field);
    }
}

async fn stored_values_the_rules_refuse_are_left_out_named_logged_and_audited_once(b: Backend) {
    let book = Arc::new(LogBook::default());
    let s = Server::start_with(b, ApiConfig::default(), |state| {
        state.coordinator = Arc::new(LogsOnly(book.clone()));
    })
    .await;
    let owner = s.user("owner").await;
    let team = s.team(&owner.auth).await;
    let app = s.application(&owner.auth, &team).await;
    let inst = s
        .instance(
            &owner.auth,
            &app,
            json!({ "settings": { "functionTimeout": 5 }, "env": { "SITE": "b" } }),
        )
        .await;
    let id = inst["id"].as_str().unwrap().to_string();
    // What a store written by an older Tandem can hold.
    let db = s.db().await;
    sqlx::query("UPDATE instances SET settings = $1, env = $2 WHERE id = $3")
        .bind(json!({ "functionTimeout": 5, "httpStatic": "/" }).to_string())
        .bind(json!({ "SITE": "b", "NODE_OPTIONS": "--import=x" }).to_string())
        .bind(&id)
        .execute(&db)
        .await
        .unwrap();

    let path = format!("/api/v1/instances/{id}");
    let i = s.get(&path, &owner.auth).await.ok(200).clone();
    assert_eq!(
        i["effective_settings"],
        json!({ "functionTimeout": 5 }),
        "{i}"
    );
    assert_eq!(i["effective_env"], json!({ "SITE": "b" }), "{i}");
    let fields = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| r["field"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        fields(&i["not_applied"]),
        ["settings.httpStatic", "env.NODE_OPTIONS"]
    );
    let status = s.get(&format!("{path}/status"), &owner.auth).await;
    assert_eq!(
        fields(&status.ok(200)["not_applied"]),
        ["settings.httpStatic", "env.NODE_OPTIONS"]
    );

    // The replicas get the allowed part only.
    let (desired, not_applied) = desired_instances(&s.state).await.unwrap();
    let d = desired.iter().find(|d| d.id == id).unwrap();
    assert_eq!(d.process.settings, json!({ "functionTimeout": 5 }));
    assert!(!d.process.env.contains_key("NODE_OPTIONS"));
    assert_eq!(not_applied.len(), 1);

    // Reported once per change: a log line per item, one audit entry, also across restarts (a
    // new reporter finds the entry already written).
    for _ in 0..2 {
        let mut reporter = NotAppliedReporter::default();
        for _ in 0..2 {
            let (_, not_applied) = desired_instances(&s.state).await.unwrap();
            reporter.report(&s.state, not_applied).await;
        }
    }
    let audit = s
        .get(
            &format!("{path}/audit-log?event=instance.config-not-applied"),
            &owner.auth,
        )
        .await;
    let items = audit.ok(200)["items"].as_array().unwrap().clone();
    assert_eq!(items.len(), 1, "{items:?}");
    let logged: Vec<String> = book
        .instance(&id)
        .read(Cursor::Latest, 100, None)
        .entries
        .iter()
        .map(|e| e.msg.clone())
        .collect();
    assert!(
        logged.iter().any(|m| m.contains("settings.httpStatic"))
            && logged.iter().any(|m| m.contains("env.NODE_OPTIONS")),
        "{logged:?}"
    );

    // The instance can still be changed: what the body leaves out keeps its allowed part.
    let r = s
        .put(&path, &owner.auth, json!({ "env": { "SITE": "c" } }))
        .await;
    let i = r.ok(200);
    assert_eq!(i["settings"], json!({ "functionTimeout": 5 }), "{i}");
    assert_eq!(i["not_applied"], json!([]), "{i}");
}

both_backends!(
    member_cannot_reach_the_machine_through_settings_or_env,
    stored_values_the_rules_refuse_are_left_out_named_logged_and_audited_once,
);
