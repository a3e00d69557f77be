//! Snapshots, flows, deploys, pipelines and the replicas' storage API (issue 11), through the
//! API on both stores. No replica runs here (the coordinator observes nothing): a deploy ends
//! as soon as the store holds its flows. Rollouts on real replicas are in the e2e tests.

use serde_json::{json, Value};
use tandem_controlplane::secrets::PlatformKey;

use super::support::{both_backends, Auth, Backend, Server};

both_backends!(
    document_routes_take_16_mib_and_the_others_1_mib,
    bad_flows_and_probes_are_refused_naming_the_field,
    a_protected_instance_takes_deploys_from_owners_only,
    a_snapshot_carries_secret_variables_sealed_to_another_instance,
    pipeline_stages_follow_their_rules,
    the_storage_api_takes_the_instance_token_imports_once_and_ignores_ha_echoes,
    the_library_answers_as_node_reds_file_library_does,
    a_deploy_follows_the_replicas_and_rolls_back_on_a_refusal,
);

/// A team with an application; returns (owner, app).
async fn world(s: &Server) -> (super::support::User, String) {
    let owner = s.user("owner").await;
    let team = s.team(&owner.auth).await;
    let app = s.application(&owner.auth, &team).await;
    (owner, app)
}

fn id(v: &Value) -> String {
    v["id"].as_str().unwrap().to_string()
}

/// Waits for the deploy to end (at once here: no replica runs).
async fn ended(s: &Server, auth: &Auth, deployment: &str) -> Value {
    for _ in 0..100 {
        let d = s
            .get(&format!("/api/v1/deployments/{deployment}"), auth)
            .await
            .json;
        if d["status"] != "running" {
            return d;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("deployment {deployment} did not end");
}

fn big_flows(bytes: usize) -> Value {
    json!([
        { "id": "t1", "type": "tab", "label": "Big" },
        { "id": "c1", "type": "comment", "z": "t1", "info": "x".repeat(bytes) }
    ])
}

async fn document_routes_take_16_mib_and_the_others_1_mib(b: Backend) {
    let s = Server::start(b).await;
    let (owner, app) = world(&s).await;
    let inst = id(&s.instance(&owner.auth, &app, json!({})).await);
    let flows = format!("/api/v1/instances/{inst}/flows");
    // 3 MiB of flows: an image or two in a real flow.
    let r = s.put(&flows, &owner.auth, big_flows(3 << 20)).await;
    assert_eq!(r.status, 202, "{r}");
    let d = ended(&s, &owner.auth, &id(&r.json)).await;
    assert_eq!(d["status"], "succeeded", "{d}");
    let got = s.get(&flows, &owner.auth).await;
    assert_eq!(
        got.json["flows"][1]["info"].as_str().unwrap().len(),
        3 << 20
    );
    // Over 16 MiB: refused, naming the limit.
    let r = s.put(&flows, &owner.auth, big_flows(17 << 20)).await;
    assert_eq!(r.status, 413, "{}", r.status);
    assert!(r.text.contains(&(16usize << 20).to_string()), "{}", r.text);
    // Another route keeps 1 MiB.
    let r = s
        .post(
            &format!("/api/v1/instances/{inst}/snapshots"),
            &owner.auth,
            json!({ "name": "n", "description": "x".repeat(2 << 20) }),
        )
        .await;
    assert_eq!(r.status, 413);
    assert!(r.text.contains(&(1usize << 20).to_string()), "{}", r.text);
}

async fn bad_flows_and_probes_are_refused_naming_the_field(b: Backend) {
    let s = Server::start(b).await;
    let (owner, app) = world(&s).await;
    let inst = id(&s.instance(&owner.auth, &app, json!({})).await);
    let flows = format!("/api/v1/instances/{inst}/flows");
    for (body, field) in [
        (json!({ "flows": { "not": "an array" } }), "flows"),
        (
            json!([{ "id": "a", "type": "tab" }, { "type": "inject" }]),
            "flows[1]",
        ),
        (
            json!([{ "id": "a", "type": "tab" }, { "id": "a", "type": "inject" }]),
            "flows[1].id",
        ),
        (
            json!({ "flows": [], "probe": { "path": "health", "expect_status": 200 } }),
            "probe.path",
        ),
        (
            json!({ "flows": [], "probe": { "path": "/health", "expect_status": 42 } }),
            "probe.expect_status",
        ),
        (json!({ "flows": [], "snapshot_name": "" }), "snapshot_name"),
    ] {
        let r = s.put(&flows, &owner.auth, body.clone()).await;
        assert_eq!(r.status, 422, "{body}: {r}");
        assert_eq!(r.json["error"]["field"], field, "{body}: {r}");
    }
    // Nothing was deployed or recorded.
    let list = s
        .get(
            &format!("/api/v1/instances/{inst}/deployments"),
            &owner.auth,
        )
        .await;
    assert_eq!(list.json["items"], json!([]));
    // A rollback names a snapshot of this instance only.
    let other = id(&s.instance(&owner.auth, &app, json!({})).await);
    let theirs = s
        .post(
            &format!("/api/v1/instances/{other}/snapshots"),
            &owner.auth,
            json!({ "name": "theirs" }),
        )
        .await;
    let r = s
        .post(
            &format!("/api/v1/instances/{inst}/actions/rollback"),
            &owner.auth,
            json!({ "snapshot_id": id(&theirs.json) }),
        )
        .await;
    assert_eq!(r.status, 422, "{r}");
    assert_eq!(r.json["error"]["field"], "snapshot_id");
}

async fn a_protected_instance_takes_deploys_from_owners_only(b: Backend) {
    let s = Server::start(b).await;
    let (owner, app) = world(&s).await;
    let team = s
        .get(&format!("/api/v1/applications/{app}"), &owner.auth)
        .await
        .json["team_id"]
        .as_str()
        .unwrap()
        .to_string();
    let member = s.user("member").await;
    s.add_member(&owner.auth, &team, &member, "member").await;
    let inst = id(&s.instance(&owner.auth, &app, json!({})).await);
    let snap = id(&s
        .post(
            &format!("/api/v1/instances/{inst}/snapshots"),
            &member.auth,
            json!({ "name": "members take snapshots" }),
        )
        .await
        .json);
    let r = s
        .put(
            &format!("/api/v1/instances/{inst}/protection"),
            &owner.auth,
            json!({ "protected": true }),
        )
        .await;
    assert_eq!(r.status, 200, "{r}");
    let flows = format!("/api/v1/instances/{inst}/flows");
    let rollback = format!("/api/v1/instances/{inst}/actions/rollback");
    let r = s.put(&flows, &member.auth, json!([])).await;
    assert_eq!(r.status, 403, "{r}");
    assert!(r.text.contains("protected"), "{r}");
    let r = s
        .post(&rollback, &member.auth, json!({ "snapshot_id": snap }))
        .await;
    assert_eq!(r.status, 403, "{r}");
    let r = s.put(&flows, &owner.auth, json!([])).await;
    assert_eq!(r.status, 202, "{r}");
    ended(&s, &owner.auth, &id(&r.json)).await;
    let r = s
        .post(&rollback, &owner.auth, json!({ "snapshot_id": snap }))
        .await;
    assert_eq!(r.status, 202, "{r}");
}

async fn a_snapshot_carries_secret_variables_sealed_to_another_instance(b: Backend) {
    let s = Server::start(b).await;
    let (owner, app) = world(&s).await;
    let source = id(&s
        .instance(
            &owner.auth,
            &app,
            json!({ "env": { "PLAIN": "p", "API_KEY": { "value": "k-123-secret", "secret": true } } }),
        )
        .await);
    let target = id(&s.instance(&owner.auth, &app, json!({})).await);
    let snap = id(&s
        .post(
            &format!("/api/v1/instances/{source}/snapshots"),
            &owner.auth,
            json!({ "name": "with a secret" }),
        )
        .await
        .json);
    let full = s
        .get(&format!("/api/v1/snapshots/{snap}/full"), &owner.auth)
        .await;
    assert_eq!(
        full.json["env"],
        json!({ "PLAIN": "p", "API_KEY": { "secret": true } })
    );
    assert!(!full.text.contains("k-123-secret"));
    let doc = s
        .post(
            &format!("/api/v1/snapshots/{snap}/export"),
            &owner.auth,
            json!({ "credential_secret": "moving" }),
        )
        .await;
    assert_eq!(doc.status, 200, "{doc}");
    assert!(!doc.text.contains("k-123-secret"), "{doc}");
    assert!(doc.json["env_secrets"]["$"].is_string(), "{doc}");
    let imported = s
        .post(
            &format!("/api/v1/instances/{target}/snapshots/import"),
            &owner.auth,
            json!({ "snapshot": doc.json, "credential_secret": "moving" }),
        )
        .await;
    assert_eq!(imported.status, 201, "{imported}");
    let r = s
        .post(
            &format!("/api/v1/instances/{target}/actions/rollback"),
            &owner.auth,
            json!({ "snapshot_id": id(&imported.json) }),
        )
        .await;
    assert_eq!(r.status, 202, "{r}");
    let d = ended(&s, &owner.auth, &id(&r.json)).await;
    assert_eq!(d["status"], "succeeded", "{d}");
    // The target has the variables, the secret still masked, and its replicas would get the
    // value: sealed for the target, it opens there.
    let t = s
        .get(&format!("/api/v1/instances/{target}"), &owner.auth)
        .await;
    assert_eq!(
        t.json["env"],
        json!({ "PLAIN": "p", "API_KEY": { "secret": true } })
    );
    let (desired, _) = tandem_controlplane::desired::desired_instances(&s.state)
        .await
        .unwrap();
    let env = &desired.iter().find(|d| d.id == target).unwrap().process.env;
    assert_eq!(env.get("API_KEY").map(String::as_str), Some("k-123-secret"));
    // A document that says a variable is secret must carry its value.
    let mut broken = doc.json.clone();
    broken["env"]["OTHER"] = json!({ "secret": true });
    let r = s
        .post(
            &format!("/api/v1/instances/{target}/snapshots/import"),
            &owner.auth,
            json!({ "snapshot": broken, "credential_secret": "moving" }),
        )
        .await;
    assert_eq!(r.status, 422, "{r}");
    assert_eq!(r.json["error"]["field"], "snapshot.env.OTHER");
}

async fn pipeline_stages_follow_their_rules(b: Backend) {
    let s = Server::start(b).await;
    let (owner, app) = world(&s).await;
    let team = s
        .get(&format!("/api/v1/applications/{app}"), &owner.auth)
        .await
        .json["team_id"]
        .as_str()
        .unwrap()
        .to_string();
    let other_app = s.application(&owner.auth, &team).await;
    let dev = id(&s.instance(&owner.auth, &app, json!({})).await);
    let prod = id(&s.instance(&owner.auth, &app, json!({})).await);
    let elsewhere = id(&s.instance(&owner.auth, &other_app, json!({})).await);
    let p = id(&s
        .post(
            "/api/v1/pipelines",
            &owner.auth,
            json!({ "application_id": app, "name": "release" }),
        )
        .await
        .json);
    let stages = format!("/api/v1/pipelines/{p}/stages");
    let stage = |instance: &str, action: &str| json!({ "name": "s", "instance_id": instance, "action": action });
    // An instance of another application, or one already in the pipeline: refused.
    let r = s
        .post(&stages, &owner.auth, stage(&elsewhere, "prompt"))
        .await;
    assert_eq!(
        (r.status, r.json["error"]["field"].clone()),
        (422, json!("instance_id"))
    );
    let first = s.post(&stages, &owner.auth, stage(&dev, "prompt")).await;
    assert_eq!(first.status, 201, "{first}");
    let r = s.post(&stages, &owner.auth, stage(&dev, "prompt")).await;
    assert_eq!(r.status, 422, "{r}");
    let second = s
        .post(&stages, &owner.auth, stage(&prod, "use_latest_snapshot"))
        .await;
    let ids: Vec<String> = second.json["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(id)
        .collect();
    assert_eq!(ids.len(), 2);
    let deploy = |stage: &str| format!("{stages}/{stage}/deploy");
    // The last stage deploys nowhere; a prompt stage needs a snapshot of its own instance.
    let r = s.post(&deploy(&ids[1]), &owner.auth, json!({})).await;
    assert_eq!(
        (r.status, r.json["error"]["field"].clone()),
        (422, json!("stage_id"))
    );
    let r = s.post(&deploy(&ids[0]), &owner.auth, json!({})).await;
    assert_eq!(
        (r.status, r.json["error"]["field"].clone()),
        (422, json!("snapshot_id"))
    );
    let prod_snap = id(&s
        .post(
            &format!("/api/v1/instances/{prod}/snapshots"),
            &owner.auth,
            json!({ "name": "prod's" }),
        )
        .await
        .json);
    let r = s
        .post(
            &deploy(&ids[0]),
            &owner.auth,
            json!({ "snapshot_id": prod_snap }),
        )
        .await;
    assert_eq!(r.status, 422, "{r}");
    // dev's snapshot goes to prod: a copy of it is prod's, and prod's flows are dev's.
    let r = s
        .put(
            &format!("/api/v1/instances/{dev}/flows"),
            &owner.auth,
            json!([{ "id": "dev-tab", "type": "tab" }]),
        )
        .await;
    ended(&s, &owner.auth, &id(&r.json)).await;
    let dev_snap = id(&s
        .post(
            &format!("/api/v1/instances/{dev}/snapshots"),
            &owner.auth,
            json!({ "name": "dev's" }),
        )
        .await
        .json);
    let r = s
        .post(
            &deploy(&ids[0]),
            &owner.auth,
            json!({ "snapshot_id": dev_snap }),
        )
        .await;
    assert_eq!(r.status, 202, "{r}");
    let d = ended(&s, &owner.auth, &id(&r.json)).await;
    assert_eq!(d["status"], "succeeded", "{d}");
    assert_eq!(d["instance_id"], prod.as_str());
    let copy = s
        .get(
            &format!("/api/v1/snapshots/{}", d["snapshot_id"].as_str().unwrap()),
            &owner.auth,
        )
        .await;
    assert_eq!(copy.json["instance_id"], prod.as_str(), "{copy}");
    let flows = s
        .get(&format!("/api/v1/instances/{prod}/flows"), &owner.auth)
        .await;
    assert_eq!(
        flows.json["flows"],
        json!([{ "id": "dev-tab", "type": "tab" }])
    );
    // Deleting prod takes its stage, its snapshots and its deploys with it.
    assert_eq!(
        s.delete(&format!("/api/v1/instances/{prod}"), &owner.auth)
            .await
            .status,
        204
    );
    let p = s.get(&format!("/api/v1/pipelines/{p}"), &owner.auth).await;
    assert_eq!(p.json["stages"].as_array().unwrap().len(), 1, "{p}");
    let gone = s
        .get(&format!("/api/v1/deployments/{}", id(&d)), &owner.auth)
        .await;
    assert_eq!(gone.status, 404);
    // Deleting an application takes its pipelines with it.
    let doomed = s.application(&owner.auth, &team).await;
    let q = id(&s
        .post(
            "/api/v1/pipelines",
            &owner.auth,
            json!({ "application_id": doomed, "name": "doomed" }),
        )
        .await
        .json);
    let r = s
        .delete(&format!("/api/v1/applications/{doomed}"), &owner.auth)
        .await;
    assert_eq!(r.status, 204, "{r}");
    let r = s.get(&format!("/api/v1/pipelines/{q}"), &owner.auth).await;
    assert_eq!(r.status, 404, "{r}");
}

async fn the_storage_api_takes_the_instance_token_imports_once_and_ignores_ha_echoes(b: Backend) {
    let s = Server::start(b).await;
    let (owner, app) = world(&s).await;
    let inst = id(&s
        .instance(
            &owner.auth,
            &app,
            json!({ "flows": [{ "id": "created", "type": "tab" }] }),
        )
        .await);
    let ha = id(&s
        .instance(&owner.auth, &app, json!({ "ha": { "replicas": 2 } }))
        .await);
    let key = PlatformKey::load_or_create(s.dir.path()).unwrap();
    let token = |i: &str| Auth::Bearer(key.derive("storage", i));
    let base = |i: &str| format!("/api/v1/storage/{i}");
    // Another instance's token, or a user's, opens nothing.
    let r = s.get(&format!("{}/flows", base(&inst)), &token(&ha)).await;
    assert_eq!(r.status, 401);
    let r = s.get(&format!("{}/flows", base(&inst)), &owner.auth).await;
    assert_eq!(r.status, 401);
    let r = s
        .get(&format!("{}/flows", base(&inst)), &token(&inst))
        .await;
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(r.json["flows"], json!([{ "id": "created", "type": "tab" }]));
    assert_eq!(r.json["in_store"], true);
    // An instance made before flows lived in the store imports its replica's files, once.
    sqlx::query("UPDATE instances SET flows_in_store = 0 WHERE id = $1")
        .bind(&inst)
        .execute(&s.state.store.pool)
        .await
        .unwrap();
    let r = s
        .get(&format!("{}/flows", base(&inst)), &token(&inst))
        .await;
    assert_eq!(r.json["in_store"], false);
    let import = format!("{}/flows/import", base(&inst));
    let mine = json!({ "flows": [{ "id": "mine", "type": "tab" }], "credentials": {} });
    let r = s.post(&import, &token(&inst), mine).await;
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(r.json["flows"], json!([{ "id": "mine", "type": "tab" }]));
    let late = json!({ "flows": [{ "id": "late", "type": "tab" }], "credentials": {} });
    let r = s.post(&import, &token(&inst), late).await;
    assert_eq!(
        r.json["flows"],
        json!([{ "id": "mine", "type": "tab" }]),
        "first wins"
    );
    // A non-HA replica's editor deploy is stored; an HA replica's save is an echo and is not.
    let saved = json!([{ "id": "edited", "type": "tab" }]);
    let r = s
        .put(
            &format!("{}/flows", base(&inst)),
            &token(&inst),
            saved.clone(),
        )
        .await;
    assert_eq!(r.status, 204, "{r}");
    let got = s
        .get(&format!("/api/v1/instances/{inst}/flows"), &owner.auth)
        .await;
    assert_eq!(got.json["flows"], saved);
    let before = s
        .get(&format!("/api/v1/instances/{ha}/flows"), &owner.auth)
        .await;
    let r = s
        .put(&format!("{}/flows", base(&ha)), &token(&ha), saved.clone())
        .await;
    assert_eq!(r.status, 204);
    let after = s
        .get(&format!("/api/v1/instances/{ha}/flows"), &owner.auth)
        .await;
    assert_eq!(after.json, before.json);
}

async fn the_library_answers_as_node_reds_file_library_does(b: Backend) {
    let s = Server::start(b).await;
    let (owner, app) = world(&s).await;
    let inst = id(&s.instance(&owner.auth, &app, json!({})).await);
    let other = id(&s.instance(&owner.auth, &app, json!({})).await);
    let key = PlatformKey::load_or_create(s.dir.path()).unwrap();
    let token = Auth::Bearer(key.derive("storage", &inst));
    let lib = format!("/api/v1/storage/{inst}/library");
    let get = |q: &str| format!("{lib}?{q}");
    // Empty: the top and any folder list nothing; an entry is not found.
    let r = s.get(&get("type=functions&path="), &token).await;
    assert_eq!(r.json, json!({ "listing": [] }), "{r}");
    let r = s.get(&get("type=functions&path=a.js"), &token).await;
    assert_eq!(r.status, 404, "{r}");
    for (kind, path, meta, body) in [
        (
            "functions",
            "tools/greet.js",
            json!({ "name": "greet" }),
            "return msg;",
        ),
        ("functions", "top.js", json!({}), "// top"),
        ("flows", "tools/saved", json!({}), "[]"),
    ] {
        let r = s
            .put(
                &lib,
                &token,
                json!({ "type": kind, "path": path, "meta": meta, "body": body }),
            )
            .await;
        assert_eq!(r.status, 204, "{r}");
    }
    let r = s.get(&get("type=functions&path="), &token).await;
    assert_eq!(r.json, json!({ "listing": ["tools", { "fn": "top.js" }] }));
    let r = s.get(&get("type=functions&path=tools/"), &token).await;
    assert_eq!(
        r.json,
        json!({ "listing": [{ "fn": "greet.js", "name": "greet" }] })
    );
    let r = s
        .get(&get("type=functions&path=tools/greet.js"), &token)
        .await;
    assert_eq!(r.json, json!({ "body": "return msg;" }));
    // Flows are stored with `.json`, and found without it.
    let r = s.get(&get("type=flows&path=tools/saved"), &token).await;
    assert_eq!(r.json, json!({ "body": "[]" }));
    let r = s.get(&get("type=flows&path=tools"), &token).await;
    assert_eq!(r.json, json!({ "listing": [{ "fn": "saved.json" }] }));
    // Paths out of the library are refused; another instance sees none of it.
    for bad in ["../x.js", "/etc/passwd", "a/../../b"] {
        let r = s
            .put(
                &lib,
                &token,
                json!({ "type": "functions", "path": bad, "body": "" }),
            )
            .await;
        assert_eq!(
            (r.status, r.json["error"]["field"].clone()),
            (422, json!("path")),
            "{bad}"
        );
    }
    let r = s
        .put(
            &lib,
            &token,
            json!({ "type": "../x", "path": "a.js", "body": "" }),
        )
        .await;
    assert_eq!(r.status, 422);
    let theirs = Auth::Bearer(key.derive("storage", &other));
    let r = s
        .get(
            &format!("/api/v1/storage/{other}/library?type=functions&path="),
            &theirs,
        )
        .await;
    assert_eq!(r.json, json!({ "listing": [] }));
}

/// A coordinator whose observed state the test writes: the deploy watch reads it.
struct Scripted(std::sync::Mutex<tandem_coordinator::status::ObservedStatus>);

impl Default for Scripted {
    fn default() -> Self {
        Self(std::sync::Mutex::new(
            tandem_coordinator::status::ObservedStatus::unknown(),
        ))
    }
}

impl tandem_coordinator::status::Coordination for Scripted {
    fn status(&self, _instance_id: &str) -> tandem_coordinator::status::ObservedStatus {
        self.0.lock().unwrap().clone()
    }
}

impl Scripted {
    /// Two running replicas on flows `revs`, `refused` by the gate when given.
    fn set(&self, revs: [&str; 2], refused: Option<(&str, &str)>) {
        use tandem_coordinator::replica::ReplicaPhase;
        use tandem_coordinator::status::{DeployRefusal, InstanceState, ReplicaStatus};
        let replicas = revs
            .iter()
            .enumerate()
            .map(|(slot, rev)| ReplicaStatus {
                id: format!("w-r{slot}"),
                slot: slot as u32,
                state: ReplicaPhase::Running,
                port: None,
                pid: None,
                restarts: 0,
                last_exit: None,
                since: 0,
                active: true,
                isolation: None,
                start: None,
                flows_rev: Some(rev.to_string()),
                deploy_error: refused
                    .filter(|(r, _)| r == rev && slot == 0)
                    .map(|(_, why)| why.to_string()),
                current: true,
            })
            .collect();
        *self.0.lock().unwrap() = tandem_coordinator::status::ObservedStatus {
            state: InstanceState::Running,
            ready: 2,
            desired: 2,
            summary: "running 2/2".into(),
            reason: None,
            replicas,
            isolation: None,
            deploy_refused: refused.map(|(rev, reason)| DeployRefusal {
                rev: rev.into(),
                reason: reason.into(),
            }),
            modules: Default::default(),
        };
    }
}

/// The deploy watch on a scripted coordinator: it ends `succeeded` only once every replica runs
/// the new flows; on a refusal it puts the old flows back into the store, waits for every
/// replica to run them, and ends `rolled_back` with the reason kept on the replica.
async fn a_deploy_follows_the_replicas_and_rolls_back_on_a_refusal(b: Backend) {
    let coordinator = std::sync::Arc::new(Scripted::default());
    let c = coordinator.clone();
    let s = Server::start_with(b, Default::default(), move |state| state.coordinator = c).await;
    let (owner, app) = world(&s).await;
    let inst = id(&s
        .instance(&owner.auth, &app, json!({ "ha": { "replicas": 2 } }))
        .await);
    let flows = format!("/api/v1/instances/{inst}/flows");
    let old = s.get(&flows, &owner.auth).await.json["rev"]
        .as_str()
        .unwrap()
        .to_string();
    coordinator.set([&old, &old], None);

    // Good flows: running until both replicas have them.
    let r = s
        .put(&flows, &owner.auth, json!([{ "id": "v2", "type": "tab" }]))
        .await;
    assert_eq!(r.status, 202, "{r}");
    let d = id(&r.json);
    let new = s.get(&flows, &owner.auth).await.json["rev"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(new, old);
    let status = |d: String| {
        let (s, auth) = (&s, owner.auth.clone());
        async move { s.get(&format!("/api/v1/deployments/{d}"), &auth).await.json }
    };
    coordinator.set([&new, &old], None);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(status(d.clone()).await["status"], "running");
    coordinator.set([&new, &new], None);
    let done = ended(&s, &owner.auth, &d).await;
    assert_eq!(done["status"], "succeeded", "{done}");

    // Bad flows: r0 refuses them; the store gets the previous flows back.
    let r = s
        .put(&flows, &owner.auth, json!([{ "id": "v3", "type": "tab" }]))
        .await;
    let d = id(&r.json);
    let bad = s.get(&flows, &owner.auth).await.json["rev"]
        .as_str()
        .unwrap()
        .to_string();
    coordinator.set([&bad, &new], Some((&bad, "unknown node type: foo-bar")));
    for _ in 0..100 {
        if s.get(&flows, &owner.auth).await.json["rev"] == new.as_str() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        s.get(&flows, &owner.auth).await.json["rev"],
        new.as_str(),
        "restored"
    );
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(status(d.clone()).await["status"], "running");
    // The coordinator converges on the old flows.
    coordinator.set([&new, &new], None);
    let done = ended(&s, &owner.auth, &d).await;
    assert_eq!(done["status"], "rolled_back", "{done}");
    assert_eq!(done["error"], "unknown node type: foo-bar");
    // Counted for the alert on failed deploys.
    let metrics = s.state.metrics.render();
    assert!(
        metrics.contains("tandem_deployments_total{status=\"rolled_back\"} 1\n"),
        "{metrics}"
    );
    assert_eq!(done["replicas"][0]["status"], "restored", "{done}");
    assert_eq!(
        done["replicas"][0]["error"], "unknown node type: foo-bar",
        "{done}"
    );
    assert_eq!(done["replicas"][1]["status"], "restored", "{done}");
}
