//! Modules of issue 12 beyond the API's own list: what the editor's palette installs and
//! removes lands in the instance's list (through the storage API, with the storage token), and
//! a template gives instances their first modules and bounds which modules they may have.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use tandem_controlplane::secrets::PlatformKey;
use tandem_coordinator::status::{Coordination, ObservedStatus};

use super::support::{both_backends, http_with, Auth, Backend, Server};

both_backends!(
    the_palette_records_installs_and_removals_under_the_templates_policy,
    a_templates_modules_and_policy_bind_every_way_an_instances_modules_change,
);

/// What the coordinator heard: instance, slot, the set the replica runs.
type Saved = (String, u32, BTreeMap<String, String>);

/// Records what the storage API tells the coordinator about palette changes.
#[derive(Default)]
struct Recorder(Mutex<Vec<Saved>>);

impl Coordination for Recorder {
    fn status(&self, _instance_id: &str) -> ObservedStatus {
        ObservedStatus::unknown()
    }
    fn modules_saved(&self, instance_id: &str, slot: u32, modules: &BTreeMap<String, String>) {
        self.0
            .lock()
            .unwrap()
            .push((instance_id.to_owned(), slot, modules.clone()));
    }
}

fn id(v: &Value) -> String {
    v["id"].as_str().unwrap().to_string()
}

async fn template(s: &Server, body: Value) -> String {
    let r = s.post("/api/v1/templates", &s.admin, body).await;
    id(r.ok(201))
}

async fn modules(s: &Server, auth: &Auth, inst: &str) -> Value {
    s.get(&format!("/api/v1/instances/{inst}/modules"), auth)
        .await
        .ok(200)["modules"]
        .clone()
}

async fn the_palette_records_installs_and_removals_under_the_templates_policy(b: Backend) {
    let recorder = Arc::new(Recorder::default());
    let r = recorder.clone();
    let s = Server::start_with(b, Default::default(), move |state| state.coordinator = r).await;
    let owner = s.user("owner").await;
    let team = s.team(&owner.auth).await;
    let app = s.application(&owner.auth, &team).await;
    let t = template(
        &s,
        json!({
            "name": "palette",
            "modules": { "node-red-node-random": "~0.4.0" },
            "policy": { "modules": { "deny": ["node-red-contrib-evil*"] } },
        }),
    )
    .await;
    let inst = s
        .instance(&owner.auth, &app, json!({ "template_id": t }))
        .await;
    let (inst, name) = (id(&inst), inst["name"].as_str().unwrap().to_string());
    let ha = id(&s
        .instance(&owner.auth, &app, json!({ "ha": { "replicas": 2 } }))
        .await);
    let key = PlatformKey::load_or_create(s.dir.path()).unwrap();
    let token = |i: &str| Auth::Bearer(key.derive("storage", i));
    let path = |i: &str| format!("/api/v1/storage/{i}/modules");
    // As the storage module calls it: naming its replica.
    let palette = |i: &str, auth: Auth, body: Value| {
        let (addr, path) = (s.addr, path(i));
        let replica = format!("{name}-r0");
        async move {
            http_with(
                addr,
                "POST",
                &path,
                &auth,
                &[("x-tandem-replica", replica)],
                Some("application/json"),
                body.to_string().into_bytes(),
            )
            .await
        }
    };
    assert_eq!(
        modules(&s, &owner.auth, &inst).await,
        json!({ "node-red-node-random": { "requested": "~0.4.0", "installed": null } }),
        "the template's modules"
    );

    let install = json!({ "module": "@flowfuse/node-red-dashboard", "version": "1.31.0" });
    // Nobody but the instance's own replicas.
    for auth in [owner.auth.clone(), s.admin.clone(), token(&ha)] {
        let r = palette(&inst, auth, install.clone()).await;
        assert_eq!(r.status, 401, "{r}");
    }
    let r = palette(&inst, token(&inst), install.clone()).await;
    assert_eq!(r.status, 204, "{r}");
    let both = BTreeMap::from([
        (
            "@flowfuse/node-red-dashboard".to_string(),
            "1.31.0".to_string(),
        ),
        ("node-red-node-random".to_string(), "~0.4.0".to_string()),
    ]);
    assert_eq!(
        recorder.0.lock().unwrap().as_slice(),
        [(inst.clone(), 0, both.clone())],
        "the coordinator hears that replica 0 runs the new set"
    );
    assert_eq!(
        modules(&s, &owner.auth, &inst).await["@flowfuse/node-red-dashboard"]["requested"],
        "1.31.0"
    );
    // The same again changes nothing and tells nobody.
    let r = palette(&inst, token(&inst), install.clone()).await;
    assert_eq!(r.status, 204, "{r}");
    assert_eq!(recorder.0.lock().unwrap().len(), 1);

    // What the template denies, names npm refuses, versions that are not the registry's.
    for (body, field) in [
        (
            json!({ "module": "node-red-contrib-evil-twin", "version": "1.0.0" }),
            "modules.node-red-contrib-evil-twin",
        ),
        (
            json!({ "module": "--global", "version": "1.0.0" }),
            "module",
        ),
        (
            json!({ "module": "x", "version": "file:../../secret" }),
            "version",
        ),
    ] {
        let r = palette(&inst, token(&inst), body).await;
        assert_eq!(r.status, 422, "{r}");
        assert_eq!(r.json["error"]["field"], field, "{r}");
    }
    let r = palette(&inst, token(&inst), json!({ "module": "x" , "extra": 1 })).await;
    assert_eq!(r.status, 422, "{r}");

    // A removal.
    let r = palette(
        &inst,
        token(&inst),
        json!({ "module": "node-red-node-random", "version": null }),
    )
    .await;
    assert_eq!(r.status, 204, "{r}");
    assert_eq!(
        modules(&s, &owner.auth, &inst).await,
        json!({ "@flowfuse/node-red-dashboard": { "requested": "1.31.0", "installed": null } })
    );
    assert_eq!(
        recorder.0.lock().unwrap().last().unwrap().2,
        BTreeMap::from([(
            "@flowfuse/node-red-dashboard".to_string(),
            "1.31.0".to_string()
        )])
    );
    let audit = s
        .get(&format!("/api/v1/instances/{inst}/audit-log"), &owner.auth)
        .await;
    let editor_changes = audit.ok(200)["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == "instance.modules-set" && e["body"]["from"] == "editor")
        .count();
    assert_eq!(editor_changes, 2, "{audit}");

    // HA instances have no palette.
    let r = palette(&ha, token(&ha), install).await;
    assert_eq!(r.status, 409, "{r}");
    assert_eq!(modules(&s, &owner.auth, &ha).await, json!({}));
}

async fn a_templates_modules_and_policy_bind_every_way_an_instances_modules_change(b: Backend) {
    let s = Server::start(b).await;
    let owner = s.user("owner").await;
    let team = s.team(&owner.auth).await;
    let app = s.application(&owner.auth, &team).await;
    let policy = json!({ "modules": { "allow": ["@flowfuse/*", "node-red-node-random"] } });
    // A template's own modules pass its policy; its patterns are names or prefixes.
    for (body, field) in [
        (
            json!({ "name": "t1", "modules": { "node-red-contrib-x": "1.0.0" }, "policy": policy }),
            "modules.node-red-contrib-x",
        ),
        (
            json!({ "name": "t2", "policy": { "modules": { "deny": ["Not A Name"] } } }),
            "policy.modules.deny",
        ),
        (
            json!({ "name": "t3", "modules": { "x": "git+https://example.com/x.git" } }),
            "modules.x",
        ),
    ] {
        let r = s.post("/api/v1/templates", &s.admin, body).await;
        r.invalid(field);
    }
    // Only platform admins write templates, policies included.
    let r = s
        .post(
            "/api/v1/templates",
            &owner.auth,
            json!({ "name": "mine", "policy": { "modules": { "allow": [] } } }),
        )
        .await;
    assert_eq!(r.status, 403, "{r}");

    let t = template(
        &s,
        json!({ "name": "dash", "modules": { "@flowfuse/node-red-dashboard": "^1.31" }, "policy": policy }),
    )
    .await;
    let inst = id(&s
        .instance(&owner.auth, &app, json!({ "template_id": t }))
        .await);
    assert_eq!(
        modules(&s, &owner.auth, &inst).await["@flowfuse/node-red-dashboard"]["requested"],
        "^1.31"
    );
    let put = |modules: Value| {
        let path = format!("/api/v1/instances/{inst}/modules");
        let auth = owner.auth.clone();
        let s = &s;
        async move { s.put(&path, &auth, json!({ "modules": modules })).await }
    };
    let r = put(json!({ "node-red-contrib-x": "1.0.0" })).await;
    r.invalid("modules.node-red-contrib-x");
    assert_eq!(
        modules(&s, &owner.auth, &inst).await["@flowfuse/node-red-dashboard"]["requested"],
        "^1.31",
        "nothing changed"
    );
    let r =
        put(json!({ "node-red-node-random": "0.4.1", "@flowfuse/node-red-dashboard": "1.31.0" }))
            .await;
    assert_eq!(r.status, 202, "{r}");
    let snapshot = r.json["snapshot_id"].as_str().unwrap().to_string();

    // A template change that would refuse an instance's modules is refused.
    let narrower = json!({ "name": "dash", "policy": { "modules": { "allow": ["@flowfuse/*"] } } });
    let r = s
        .put(&format!("/api/v1/templates/{t}"), &s.admin, narrower)
        .await;
    assert_eq!(r.status, 409, "{r}");
    assert!(r.err(409).contains("node-red-node-random"), "{r}");

    // A snapshot's modules pass the policy as a list set by hand: another instance, on a
    // template that denies one of them, cannot be rolled onto it.
    let strict = template(
        &s,
        json!({ "name": "strict", "policy": { "modules": { "deny": ["node-red-node-*"] } } }),
    )
    .await;
    let other = id(&s
        .instance(&owner.auth, &app, json!({ "template_id": strict }))
        .await);
    let secret = "a secret of sixteen+";
    let r = s
        .post(
            &format!("/api/v1/snapshots/{snapshot}/export"),
            &owner.auth,
            json!({ "credential_secret": secret }),
        )
        .await;
    let doc = r.ok(200).clone();
    let r = s
        .post(
            &format!("/api/v1/instances/{other}/snapshots/import"),
            &owner.auth,
            json!({ "snapshot": doc, "credential_secret": secret }),
        )
        .await;
    let imported = id(r.ok(201));
    let r = s
        .post(
            &format!("/api/v1/instances/{other}/actions/rollback"),
            &owner.auth,
            json!({ "snapshot_id": imported }),
        )
        .await;
    r.invalid("modules.node-red-node-random");
    assert_eq!(modules(&s, &owner.auth, &other).await, json!({}));
}
