//! Secret environment variables (issue 11): written as `{"value", "secret": true}`, sealed in
//! the store, shown to no role, kept when sent back without a value, given to the replicas.

use serde_json::{json, Value};
use sqlx::Row;
use tandem_controlplane::desired::desired_instances;

use super::support::{both_backends, Backend, Server};

async fn secret_variables_are_sealed_never_shown_and_reach_the_replicas(b: Backend) {
    let s = Server::start(b).await;
    let owner = s.user("owner").await;
    let viewer = s.user("viewer").await;
    let team = s.team(&owner.auth).await;
    s.add_member(&owner.auth, &team, &viewer, "viewer").await;
    let app = s.application(&owner.auth, &team).await;
    let inst = s
        .instance(
            &owner.auth,
            &app,
            json!({ "env": {
                "PLAIN": "visible",
                "API_TOKEN": { "value": "s3cr3t-value-1", "secret": true },
                "ALSO_PLAIN": { "value": "shown", "secret": false },
            } }),
        )
        .await;
    let id = inst["id"].as_str().unwrap().to_string();
    let path = format!("/api/v1/instances/{id}");
    let masked = json!({
        "PLAIN": "visible",
        "API_TOKEN": { "secret": true },
        "ALSO_PLAIN": "shown",
    });
    assert_eq!(inst["env"], masked);
    assert_eq!(inst["effective_env"], masked);

    // No role reads it: not the owner who wrote it, not a viewer, not in a list.
    for auth in [&owner.auth, &viewer.auth, &s.admin] {
        let r = s.get(&path, auth).await;
        assert_eq!(r.ok(200)["env"], masked);
        assert!(!r.text.contains("s3cr3t"), "{}", r.text);
        let list = s
            .get(&format!("/api/v1/teams/{team}/instances"), auth)
            .await;
        assert_eq!(list.ok(200)["items"][0]["env"], masked);
        assert!(!list.text.contains("s3cr3t"), "{}", list.text);
    }
    // Sealed in the store.
    let row = sqlx::query("SELECT env FROM instances WHERE id = $1")
        .bind(&id)
        .fetch_one(&s.db().await)
        .await
        .unwrap();
    let stored: String = row.get(0);
    assert!(!stored.contains("s3cr3t"), "{stored}");
    assert_eq!(
        serde_json::from_str::<Value>(&stored).unwrap()["API_TOKEN"]["secret"],
        true
    );
    // The replicas get the value.
    let (desired, _) = desired_instances(&s.state).await.unwrap();
    let d = desired.iter().find(|d| d.id == id).unwrap();
    assert_eq!(d.process.env["API_TOKEN"], "s3cr3t-value-1");
    assert_eq!(d.process.env["PLAIN"], "visible");

    // What a GET returns can be sent back: the secret is kept.
    let r = s.put(&path, &owner.auth, json!({ "env": masked })).await;
    assert_eq!(r.ok(200)["env"], masked);
    let (desired, _) = desired_instances(&s.state).await.unwrap();
    let d = desired.iter().find(|d| d.id == id).unwrap();
    assert_eq!(d.process.env["API_TOKEN"], "s3cr3t-value-1");
    // An update without `env` keeps it too; a new value replaces it.
    s.put(&path, &owner.auth, json!({ "settings": {} }))
        .await
        .ok(200);
    let r = s
        .put(
            &path,
            &owner.auth,
            json!({ "env": { "API_TOKEN": { "value": "s3cr3t-value-2", "secret": true } } }),
        )
        .await;
    assert_eq!(r.ok(200)["env"], json!({ "API_TOKEN": { "secret": true } }));
    let (desired, _) = desired_instances(&s.state).await.unwrap();
    let d = desired.iter().find(|d| d.id == id).unwrap();
    assert_eq!(d.process.env["API_TOKEN"], "s3cr3t-value-2");
    assert!(!d.process.env.contains_key("PLAIN"));

    // Bad shapes, each refused with the variable named; nothing changes.
    for (env, field) in [
        (json!({ "NEW": { "secret": true } }), "env.NEW"),
        (json!({ "B": {} }), "env.B"),
        (
            json!({ "TANDEM_MQTT_EXCLUDE": { "value": "a/#", "secret": true } }),
            "env.TANDEM_MQTT_EXCLUDE",
        ),
        (
            json!({ "NODE_OPTIONS": { "value": "--require /x", "secret": true } }),
            "env.NODE_OPTIONS",
        ),
    ] {
        let r = s.put(&path, &owner.auth, json!({ "env": env })).await;
        let message = r.invalid(field).to_string();
        assert!(!message.contains("--require"), "{message}");
    }
    let r = s
        .put(
            &path,
            &owner.auth,
            json!({ "env": { "X": { "value": "v", "hidden": true } } }),
        )
        .await;
    assert_eq!(r.status, 422, "{}", r.text);
    assert_eq!(
        s.get(&path, &viewer.auth).await.ok(200)["env"],
        json!({ "API_TOKEN": { "secret": true } })
    );

    // The audit trail names the change, never the value.
    let audit = s.get("/api/v1/audit-log?limit=100", &s.admin).await;
    assert!(!audit.text.contains("s3cr3t"), "{}", audit.text);
    assert!(audit.text.contains("API_TOKEN"), "{}", audit.text);
}

both_backends!(secret_variables_are_sealed_never_shown_and_reach_the_replicas);
