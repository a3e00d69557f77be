//! Every validation rule, each with a bad input: the status, the error code and the field.

use serde_json::{json, Value};

use super::support::{both_backends, Auth, Backend, Server};

/// A server with an owner, a team and an application.
struct Setup {
    s: Server,
    owner: Auth,
    team: String,
    app: String,
}

impl Setup {
    async fn new(b: Backend) -> Self {
        let s = Server::start(b).await;
        let owner = s.user("owner").await.auth;
        let team = s.team(&owner).await;
        let app = s.application(&owner, &team).await;
        Self {
            s,
            owner,
            team,
            app,
        }
    }

    /// A valid new instance named `name`, with `extra` fields set (`null` removes one).
    fn instance_body(&self, name: &str, extra: Value) -> Value {
        let mut body =
            json!({ "name": name, "application_id": self.app, "stack_id": self.s.stack_id });
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                body.as_object_mut().unwrap().remove(k);
            } else {
                body[k] = v.clone();
            }
        }
        body
    }

    async fn create_instance(&self, name: &str, extra: Value) -> super::support::Resp {
        self.s
            .post(
                "/api/v1/instances",
                &self.owner,
                self.instance_body(name, extra),
            )
            .await
    }
}

async fn instance_names(b: Backend) {
    let t = Setup::new(b).await;
    for bad in [
        "Upper",
        "1leading-digit",
        "trailing-",
        &"a".repeat(64),
        "under_score",
        "",
    ] {
        t.create_instance(bad, json!({})).await.invalid("name");
    }
    for reserved in ["admin", "api", "www"] {
        let msg = t
            .create_instance(reserved, json!({}))
            .await
            .invalid("name")
            .to_string();
        assert!(msg.contains("reserved"), "{msg}");
    }
    // The longest name, and a name with digits and dashes inside, are fine.
    t.create_instance(&"a".repeat(63), json!({})).await.ok(201);
    t.create_instance("a1-b2", json!({})).await.ok(201);
    // Names are unique on the whole platform, not per team.
    let msg = t
        .create_instance("a1-b2", json!({}))
        .await
        .err(409)
        .to_string();
    assert!(msg.contains("a1-b2"), "{msg}");
    let other_team = t.s.team(&t.owner).await;
    let other_app = t.s.application(&t.owner, &other_team).await;
    t.s.post(
        "/api/v1/instances",
        &t.owner,
        json!({ "name": "a1-b2", "application_id": other_app, "stack_id": t.s.stack_id }),
    )
    .await
    .err(409);
    // A name cannot change.
    let id = t.create_instance("keeps-name", json!({})).await.ok(201)["id"]
        .as_str()
        .unwrap()
        .to_string();
    t.s.put(
        &format!("/api/v1/instances/{id}"),
        &t.owner,
        json!({ "name": "new-name" }),
    )
    .await
    .invalid("name");
    let got = t.s.get(&format!("/api/v1/instances/{id}"), &t.owner).await;
    assert_eq!(got.ok(200)["name"], "keeps-name");

    // The check a form makes as a name is typed says what creating would say, for any signed-in
    // user, and creates nothing.
    let asker = t.s.user("asker").await.auth;
    let check = |name: &str| {
        let path = format!("/api/v1/instance-names/{name}");
        let (s, asker) = (&t.s, &asker);
        async move { s.get(&path, asker).await }
    };
    let r = check("under_score").await;
    assert_eq!(r.ok(200)["available"], false, "{r}");
    let said = t.create_instance("under_score", json!({})).await;
    let message = said.invalid("name").to_string();
    assert_eq!(r.json["message"], message, "{r}");
    let r = check("admin").await;
    assert!(
        r.ok(200)["message"].as_str().unwrap().contains("reserved"),
        "{r}"
    );
    let r = check("a1-b2").await;
    assert_eq!(r.ok(200)["available"], false, "{r}");
    assert!(
        r.json["message"].as_str().unwrap().contains("exists"),
        "{r}"
    );
    let r = check("still-free").await;
    assert_eq!(r.ok(200)["available"], true, "{r}");
    assert!(r.json.get("message").is_none(), "{r}");
    t.create_instance("still-free", json!({})).await.ok(201);
    let r = check("still-free").await;
    assert_eq!(r.ok(200)["available"], false, "{r}");
    t.s.get("/api/v1/instance-names/x", &Auth::Anon)
        .await
        .err(401);
}

async fn json_bodies(b: Backend) {
    let t = Setup::new(b).await;
    let s = &t.s;
    // Not JSON: 400.
    let r = s
        .request(
            "POST",
            "/api/v1/instances",
            &t.owner,
            Some("application/json"),
            b"{\"name\": \"x\",".to_vec(),
        )
        .await;
    r.err(400);
    // Not declared as JSON: 400.
    let r = s
        .request(
            "POST",
            "/api/v1/teams",
            &t.owner,
            Some("text/plain"),
            br#"{"name":"x"}"#.to_vec(),
        )
        .await;
    r.err(400);
    let r = s
        .request("POST", "/api/v1/teams", &t.owner, None, Vec::new())
        .await;
    r.err(400);
    // An unknown field: 422 naming it, at the top and nested.
    let r = t.create_instance("x", json!({ "colour": "red" })).await;
    assert!(r.invalid("colour").contains("unknown field"), "{r}");
    let r = t
        .create_instance("x", json!({ "ha": { "replicas": 2, "zones": 3 } }))
        .await;
    assert!(r.invalid("ha.zones").contains("unknown field"), "{r}");
    let r = s
        .post(
            "/api/v1/teams",
            &t.owner,
            json!({ "name": "T", "owner": "me" }),
        )
        .await;
    r.invalid("owner");
    // A wrong type: 422 naming the field.
    t.create_instance("x", json!({ "name": 5 }))
        .await
        .invalid("name");
    t.create_instance("x", json!({ "ha": { "replicas": "2" } }))
        .await
        .invalid("ha.replicas");
    t.create_instance("x", json!({ "env": { "A": 1 } }))
        .await
        .invalid("env.A");
    s.post(
        &format!("/api/v1/teams/{}/members", t.team),
        &t.owner,
        json!({ "username": "owner", "role": "boss" }),
    )
    .await
    .invalid("role");
    // A missing field: 422 that names it (in the message: see `missing_field_is_named`).
    let r = t.create_instance("x", json!({ "stack_id": null })).await;
    assert!(r.err(422).contains("missing field `stack_id`"), "{r}");
    // Not an object at all.
    let r = s.post("/api/v1/teams", &t.owner, json!([1, 2])).await;
    r.err(422);
}

async fn instance_fields(b: Backend) {
    let t = Setup::new(b).await;
    // Settings: an object without managed keys.
    for settings in [json!([1]), json!("x"), json!(3)] {
        t.create_instance("x", json!({ "settings": settings }))
            .await
            .invalid("settings");
    }
    for key in ["httpAdminRoot", "adminAuth", "userDir", "credentialSecret"] {
        t.create_instance("x", json!({ "settings": { key: "/x" } }))
            .await
            .invalid(&format!("settings.{key}"));
    }
    // Flows: an array of nodes with string id and type.
    t.create_instance("x", json!({ "flows": { "id": "a" } }))
        .await
        .invalid("flows");
    t.create_instance(
        "x",
        json!({ "flows": [{ "id": "a", "type": "tab" }, { "type": "inject" }] }),
    )
    .await
    .invalid("flows[1]");
    t.create_instance("x", json!({ "flows": [{ "id": 7, "type": "tab" }] }))
        .await
        .invalid("flows[0]");
    // HA: 2 to 8 replicas.
    for replicas in [1, 0, -1, 9, 100] {
        t.create_instance("x", json!({ "ha": { "replicas": replicas } }))
            .await
            .invalid("ha.replicas");
    }
    t.create_instance("x", json!({ "ha": { "replicas": 2, "mode": "hot" } }))
        .await
        .invalid("ha.mode");
    let ha8 = t
        .create_instance(
            "ha-eight",
            json!({ "ha": { "replicas": 8, "mode": "standby" } }),
        )
        .await;
    assert_eq!(
        ha8.ok(201)["ha"],
        json!({ "replicas": 8, "mode": "standby" })
    );
    let id = ha8.json["id"].as_str().unwrap().to_string();
    let ha = format!("/api/v1/instances/{id}/ha");
    for replicas in [1, 9] {
        t.s.put(&ha, &t.owner, json!({ "replicas": replicas }))
            .await
            .invalid("replicas");
    }
    let r = t.s.put(&ha, &t.owner, json!({ "replicas": 2 })).await;
    assert_eq!(r.ok(200), &json!({ "replicas": 2, "mode": "balanced" }));
    t.s.delete(&ha, &t.owner).await.ok(204);
    t.s.get(&ha, &t.owner).await.err(404);
    // Unknown stack or template: 422 on the field.
    t.create_instance("x", json!({ "stack_id": "nope" }))
        .await
        .invalid("stack_id");
    t.create_instance("x", json!({ "template_id": "nope" }))
        .await
        .invalid("template_id");
    t.s.put(
        &format!("/api/v1/instances/{id}"),
        &t.owner,
        json!({ "stack_id": "nope" }),
    )
    .await
    .invalid("stack_id");
    // Environment variable names.
    for name in ["1BAD", "with-dash", "", "sp ace"] {
        t.create_instance("x", json!({ "env": { name: "v" } }))
            .await
            .invalid(&format!("env.{name}"));
    }
    t.create_instance("env-ok", json!({ "env": { "_OK_1": "v", "lower": "w" } }))
        .await
        .ok(201);
    // Unknown application: 404 (not a validation error: it could be hidden).
    t.create_instance("x", json!({ "application_id": "nope" }))
        .await
        .err(404);
    // Unknown lifecycle action.
    let r =
        t.s.post(
            &format!("/api/v1/instances/{id}/actions/explode"),
            &t.owner,
            json!({}),
        )
        .await;
    r.invalid("action");
    for (action, state) in [
        ("stop", "stopped"),
        ("start", "running"),
        ("suspend", "suspended"),
        ("restart", "running"),
    ] {
        let r =
            t.s.call(
                "POST",
                &format!("/api/v1/instances/{id}/actions/{action}"),
                &t.owner,
                None,
            )
            .await;
        assert_eq!(
            r.ok(200),
            &json!({ "status": "okay", "desired_state": state })
        );
        let st =
            t.s.get(&format!("/api/v1/instances/{id}/status"), &t.owner)
                .await;
        assert_eq!(st.ok(200)["desired_state"], state);
    }
    // Nothing invalid was stored.
    let list =
        t.s.get(&format!("/api/v1/teams/{}/instances", t.team), &t.owner)
            .await;
    let mut names: Vec<&str> = list.ok(200)["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["env-ok", "ha-eight"]);
}

async fn instance_sleep(b: Backend) {
    let t = Setup::new(b).await;
    let s = &t.s;
    let id = t.create_instance("sleepy", json!({})).await.ok(201)["id"]
        .as_str()
        .unwrap()
        .to_string();
    let path = format!("/api/v1/instances/{id}");
    // 1 to 30 days of seconds, 0 or null for off; anything else names the field.
    for bad in [-1, 2_592_001, 4_294_967_296_i64, i64::MAX] {
        let r = s
            .put(&path, &t.owner, json!({ "sleep_after_s": bad }))
            .await;
        let msg = r.invalid("sleep_after_s");
        assert!(msg.contains("1 to 2592000 seconds"), "{r}");
    }
    for bad in [
        json!(1.5),
        json!("900"),
        json!(true),
        json!({}),
        json!(1e20),
    ] {
        s.put(&path, &t.owner, json!({ "sleep_after_s": bad }))
            .await
            .invalid("sleep_after_s");
    }
    let r = s.put(&path, &t.owner, json!({ "sleep_after_s": 1 })).await;
    assert_eq!(r.ok(200)["sleep_after_s"], 1, "{r}");

    // Sleep blocks HA, and HA blocks sleep; off is always fine.
    let ha = format!("{path}/ha");
    let r = s.put(&ha, &t.owner, json!({ "replicas": 2 })).await;
    let msg = r.invalid("replicas");
    assert!(msg.contains("turn sleep off first"), "{r}");
    s.get(&ha, &t.owner).await.err(404);
    s.put(&path, &t.owner, json!({ "sleep_after_s": null }))
        .await
        .ok(200);
    s.put(&ha, &t.owner, json!({ "replicas": 2 })).await.ok(200);
    for on in [1, 900, 2_592_000] {
        let r = s.put(&path, &t.owner, json!({ "sleep_after_s": on })).await;
        let msg = r.invalid("sleep_after_s");
        assert!(msg.contains("HA instances stay awake"), "{r}");
    }
    for off in [json!(null), json!(0)] {
        let r = s
            .put(&path, &t.owner, json!({ "sleep_after_s": off }))
            .await;
        assert_eq!(r.ok(200)["sleep_after_s"], json!(null), "{r}");
    }
    let r = s.get(&path, &t.owner).await;
    assert_eq!(r.ok(200)["ha"]["replicas"], 2, "{r}");
    assert_eq!(r.json["sleep_after_s"], json!(null), "{r}");
    // HA off: sleep may be set again.
    s.delete(&ha, &t.owner).await.ok(204);
    let r = s
        .put(&path, &t.owner, json!({ "sleep_after_s": 600 }))
        .await;
    assert_eq!(r.ok(200)["sleep_after_s"], 600, "{r}");
}

async fn template_policy(b: Backend) {
    let t = Setup::new(b).await;
    let s = &t.s;
    let r = s
        .post(
            "/api/v1/templates",
            &s.admin,
            json!({
                "name": "Strict",
                "settings": { "flowFilePretty": true },
                "env": { "REGION": { "value": "eu", "locked": true }, "LEVEL": { "value": "info" } },
                "policy": { "settings": { "functionTimeout": true, "flowFilePretty": false } },
            }),
        )
        .await;
    let template = r.ok(201)["id"].as_str().unwrap().to_string();
    // Not listed, or listed as false: refused, naming the setting.
    for key in ["editorTheme", "flowFilePretty"] {
        t.create_instance(
            "x",
            json!({ "template_id": template, "settings": { key: 1 } }),
        )
        .await
        .invalid(&format!("settings.{key}"));
    }
    // Managed settings are refused before the policy is asked.
    t.create_instance(
        "x",
        json!({ "template_id": template, "settings": { "httpNodeRoot": "/" } }),
    )
    .await
    .invalid("settings.httpNodeRoot");
    // A locked variable.
    t.create_instance(
        "x",
        json!({ "template_id": template, "env": { "REGION": "us" } }),
    )
    .await
    .invalid("env.REGION");
    let ok = t
        .create_instance(
            "allowed",
            json!({ "template_id": template, "settings": { "functionTimeout": 3 }, "env": { "LEVEL": "debug" } }),
        )
        .await;
    let id = ok.ok(201)["id"].as_str().unwrap().to_string();
    // The same rules on change.
    let path = format!("/api/v1/instances/{id}");
    s.put(
        &path,
        &t.owner,
        json!({ "settings": { "editorTheme": {} } }),
    )
    .await
    .invalid("settings.editorTheme");
    s.put(&path, &t.owner, json!({ "env": { "REGION": "us" } }))
        .await
        .invalid("env.REGION");
    s.put(&path, &t.owner, json!({ "settings": [] }))
        .await
        .invalid("settings");
    s.put(&path, &t.owner, json!({ "settings": { "logging": {} } }))
        .await
        .invalid("settings.logging");

    // Templates themselves.
    let post = |body: Value| s.post("/api/v1/templates", &s.admin, body);
    post(json!({ "name": "" })).await.invalid("name");
    post(json!({ "name": "T", "settings": [] }))
        .await
        .invalid("settings");
    post(json!({ "name": "T", "settings": { "uiPort": 1 } }))
        .await
        .invalid("settings.uiPort");
    post(json!({ "name": "T", "env": { "BAD-NAME": { "value": "x" } } }))
        .await
        .invalid("env.BAD-NAME");
    post(json!({ "name": "T", "env": { "OK": { "value": "x", "secret": true } } }))
        .await
        .invalid("env.OK.secret");
    post(json!({ "name": "T", "policy": { "settings": { "adminAuth": true } } }))
        .await
        .invalid("policy.settings.adminAuth");
    post(json!({ "name": "Strict" })).await.err(409);
    // A change that would break an instance using it: 409; one that keeps it valid: 200.
    let tpath = format!("/api/v1/templates/{template}");
    s.put(
        &tpath,
        &s.admin,
        json!({ "name": "Strict", "policy": { "settings": {} } }),
    )
    .await
    .err(409);
    s.put(
        &tpath,
        &s.admin,
        json!({ "name": "Strict", "env": { "LEVEL": { "value": "info", "locked": true } }, "policy": { "settings": { "functionTimeout": true } } }),
    )
    .await
    .err(409);
    s.put(
        &tpath,
        &s.admin,
        json!({ "name": "Strict", "policy": { "settings": { "functionTimeout": true } } }),
    )
    .await
    .ok(200);
    // In use: cannot be deleted.
    s.delete(&tpath, &s.admin).await.err(409);
    s.delete(&path, &t.owner).await.ok(204);
    s.delete(&tpath, &s.admin).await.ok(204);
    s.get(&tpath, &s.admin).await.err(404);
}

async fn teams_and_members(b: Backend) {
    let s = Server::start(b).await;
    let owner = s.user("owner").await;
    let member = s.user("member").await;
    for slug in [
        "Upper",
        "-dash",
        "under_score",
        "",
        &"a".repeat(64),
        "sp ace",
    ] {
        s.post(
            "/api/v1/teams",
            &owner.auth,
            json!({ "name": "Team", "slug": slug }),
        )
        .await
        .invalid("slug");
    }
    for name in ["", "   ", &"n".repeat(101), "tab\tname"] {
        s.post("/api/v1/teams", &owner.auth, json!({ "name": name }))
            .await
            .invalid("name");
    }
    // A name that has no letters or digits derives no slug.
    s.post("/api/v1/teams", &owner.auth, json!({ "name": "!!!" }))
        .await
        .invalid("slug");
    let r = s
        .post("/api/v1/teams", &owner.auth, json!({ "name": "Blue Team" }))
        .await;
    assert_eq!(r.ok(201)["slug"], "blue-team");
    assert_eq!(r.json["role"], "owner");
    let team = r.json["id"].as_str().unwrap().to_string();
    s.post(
        "/api/v1/teams",
        &owner.auth,
        json!({ "name": "Other", "slug": "blue-team" }),
    )
    .await
    .err(409);
    s.put(
        &format!("/api/v1/teams/{team}"),
        &owner.auth,
        json!({ "name": " " }),
    )
    .await
    .invalid("name");

    let members = format!("/api/v1/teams/{team}/members");
    s.post(
        &members,
        &owner.auth,
        json!({ "username": "nobody", "role": "member" }),
    )
    .await
    .invalid("username");
    s.add_member(&owner.auth, &team, &member, "member").await;
    s.post(
        &members,
        &owner.auth,
        json!({ "username": "member", "role": "viewer" }),
    )
    .await
    .err(409);
    // The last owner can neither leave nor be demoted, by themselves or the admin.
    let me = format!("{members}/{}", owner.id);
    s.delete(&me, &owner.auth).await.err(409);
    s.delete(&me, &s.admin).await.err(409);
    s.put(&me, &owner.auth, json!({ "role": "member" }))
        .await
        .err(409);
    s.put(&me, &s.admin, json!({ "role": "viewer" }))
        .await
        .err(409);
    // Unknown member: 404.
    s.put(
        &format!("{members}/nobody"),
        &owner.auth,
        json!({ "role": "viewer" }),
    )
    .await
    .err(404);
    // With a second owner, the first may step down, then leave.
    let them = format!("{members}/{}", member.id);
    let r = s.put(&them, &owner.auth, json!({ "role": "owner" })).await;
    assert_eq!(r.ok(200)["role"], "owner");
    s.put(&me, &owner.auth, json!({ "role": "member" }))
        .await
        .ok(200);
    s.delete(&me, &owner.auth).await.ok(204);
    s.get(&format!("/api/v1/teams/{team}"), &owner.auth)
        .await
        .err(404);
    // The remaining owner is now the last one.
    s.delete(&them, &member.auth).await.err(409);

    // Applications: names unique in a team; one with instances cannot be deleted, nor its team.
    let apps = "/api/v1/applications";
    s.post(apps, &member.auth, json!({ "team_id": team, "name": "" }))
        .await
        .invalid("name");
    s.post(
        apps,
        &member.auth,
        json!({ "team_id": team, "name": "A", "description": "d".repeat(1001) }),
    )
    .await
    .invalid("description");
    let app = s
        .post(apps, &member.auth, json!({ "team_id": team, "name": "A" }))
        .await
        .ok(201)["id"]
        .as_str()
        .unwrap()
        .to_string();
    s.post(apps, &member.auth, json!({ "team_id": team, "name": "A" }))
        .await
        .err(409);
    let b_app = s.application(&member.auth, &team).await;
    s.put(
        &format!("{apps}/{b_app}"),
        &member.auth,
        json!({ "name": "A" }),
    )
    .await
    .err(409);
    s.put(
        &format!("{apps}/{b_app}"),
        &member.auth,
        json!({ "name": "" }),
    )
    .await
    .invalid("name");
    s.post(
        apps,
        &member.auth,
        json!({ "team_id": "nope", "name": "A" }),
    )
    .await
    .err(404);
    let inst = s.instance(&member.auth, &app, json!({})).await;
    s.delete(&format!("{apps}/{app}"), &member.auth)
        .await
        .err(409);
    s.delete(&format!("/api/v1/teams/{team}"), &member.auth)
        .await
        .err(409);
    s.delete(
        &format!("/api/v1/instances/{}", inst["id"].as_str().unwrap()),
        &member.auth,
    )
    .await
    .ok(204);
    s.delete(&format!("{apps}/{app}"), &member.auth)
        .await
        .ok(204);
    s.delete(&format!("/api/v1/teams/{team}"), &member.auth)
        .await
        .ok(204);
    s.get(&format!("{apps}/{b_app}"), &s.admin).await.err(404);
}

async fn users_and_tokens(b: Backend) {
    let s = Server::start(b).await;
    let users = "/api/v1/users";
    for name in ["has space", "", &"u".repeat(65), "ünï", "semi;colon"] {
        s.post(
            users,
            &s.admin,
            json!({ "username": name, "password": "long-enough" }),
        )
        .await
        .invalid("username");
    }
    s.post(
        users,
        &s.admin,
        json!({ "username": "shorty", "password": "1234567" }),
    )
    .await
    .invalid("password");
    s.post(
        users,
        &s.admin,
        json!({ "username": "mail", "password": "long-enough", "email": "nope" }),
    )
    .await
    .invalid("email");
    s.post(
        users,
        &s.admin,
        json!({ "username": "admin", "password": "long-enough" }),
    )
    .await
    .err(409);

    let tokens = "/api/v1/user/tokens";
    for name in ["", "  ", &"t".repeat(101)] {
        s.post(tokens, &s.admin, json!({ "name": name }))
            .await
            .invalid("name");
    }
    let now = super::support::now_ms();
    for expires in [now - 1000, 0, -5] {
        s.post(
            tokens,
            &s.admin,
            json!({ "name": "old", "expires_at": expires }),
        )
        .await
        .invalid("expires_at");
    }
    s.post(
        tokens,
        &s.admin,
        json!({ "name": "later", "expires_at": now + 3_600_000 }),
    )
    .await
    .ok(201);
    s.delete(&format!("{tokens}/nope"), &s.admin).await.err(404);
}

async fn stacks(b: Backend) {
    let s = Server::start(b).await;
    let post = |body: Value| s.post("/api/v1/stacks", &s.admin, body);
    let ok = json!({ "name": "ok", "nodered_version": "4.0.0" });
    let with = |k: &str, v: Value| {
        let mut b = ok.clone();
        b[k] = v;
        b
    };
    for v in [
        "4.1",
        "4",
        "4.1.2.3",
        "v4.1.2",
        "4.1.x",
        "",
        "4..2",
        "4.1.2-bad space",
    ] {
        post(with("nodered_version", json!(v)))
            .await
            .invalid("nodered_version");
    }
    for v in ["v22", "22.x", "", "1.2.3.4"] {
        post(with("node_version", json!(v)))
            .await
            .invalid("node_version");
    }
    for m in [0, 127, 65537, -1] {
        post(with("memory_mb", json!(m))).await.invalid("memory_mb");
    }
    for name in ["Upper", "", "under_score", &"s".repeat(64)] {
        post(with("name", json!(name))).await.invalid("name");
    }
    post(with("replaced_by", json!("nope")))
        .await
        .invalid("replaced_by");
    // The edges are fine.
    let lo = post(json!({ "name": "lo", "nodered_version": "4.1.2-beta.1", "node_version": "22.9.0", "memory_mb": 128 }))
        .await;
    lo.ok(201);
    let lo_id = lo.json["id"].as_str().unwrap().to_string();
    let hi = post(json!({ "name": "hi", "nodered_version": "4.1.2", "node_version": "22", "memory_mb": 65536, "replaced_by": lo_id }))
        .await;
    let hi_id = hi.ok(201)["id"].as_str().unwrap().to_string();
    assert_eq!(
        post(json!({ "name": "dflt", "nodered_version": "4.1.2" }))
            .await
            .ok(201)["memory_mb"],
        512
    );
    post(json!({ "name": "lo", "nodered_version": "4.1.2" }))
        .await
        .err(409);
    // Updates: the same rules; a stack cannot replace itself.
    let path = format!("/api/v1/stacks/{lo_id}");
    s.put(
        &path,
        &s.admin,
        json!({ "name": "lo", "nodered_version": "4.1.2", "replaced_by": lo_id }),
    )
    .await
    .invalid("replaced_by");
    s.put(
        &path,
        &s.admin,
        json!({ "name": "lo", "nodered_version": "4.1.2", "memory_mb": 64 }),
    )
    .await
    .invalid("memory_mb");
    s.put(
        &path,
        &s.admin,
        json!({ "name": "hi", "nodered_version": "4.1.2" }),
    )
    .await
    .err(409);
    s.put(
        "/api/v1/stacks/nope",
        &s.admin,
        json!({ "name": "x", "nodered_version": "4.1.2" }),
    )
    .await
    .err(404);
    // Named as a replacement: cannot be deleted.
    s.delete(&path, &s.admin).await.err(409);
    s.delete(&format!("/api/v1/stacks/{hi_id}"), &s.admin)
        .await
        .ok(204);
    s.delete(&path, &s.admin).await.ok(204);
    // Used by an instance: cannot be deleted.
    let owner = s.user("owner").await.auth;
    let team = s.team(&owner).await;
    let app = s.application(&owner, &team).await;
    s.instance(&owner, &app, json!({})).await;
    s.delete(&format!("/api/v1/stacks/{}", s.stack_id), &s.admin)
        .await
        .err(409);
    s.delete("/api/v1/stacks/nope", &s.admin).await.err(404);
}

async fn limits_and_sizes(b: Backend) {
    let s = Server::start(b).await;
    for list in [
        "/api/v1/teams",
        "/api/v1/users",
        "/api/v1/stacks",
        "/api/v1/templates",
        "/api/v1/user/tokens",
        "/api/v1/audit-log",
    ] {
        for limit in [0, 501, -1] {
            s.get(&format!("{list}?limit={limit}"), &s.admin)
                .await
                .invalid("limit");
        }
        s.get(&format!("{list}?limit=500"), &s.admin).await.ok(200);
        s.get(&format!("{list}?limit=1"), &s.admin).await.ok(200);
    }
    s.get("/api/v1/audit-log?event=", &s.admin)
        .await
        .invalid("event");
    // A body over 1 MiB: 413, before anything is parsed.
    let big = format!(
        "{{\"name\":\"{}\"}}",
        "a".repeat(tandem_controlplane::api::MAX_BODY_BYTES)
    );
    let r = s
        .request(
            "POST",
            "/api/v1/teams",
            &s.admin,
            Some("application/json"),
            big.into_bytes(),
        )
        .await;
    r.err(413);
    // Just under the limit is read (and then refused for its content).
    let under = format!(
        "{{\"name\":\"{}\"}}",
        "a".repeat(tandem_controlplane::api::MAX_BODY_BYTES - 20)
    );
    let r = s
        .request(
            "POST",
            "/api/v1/teams",
            &s.admin,
            Some("application/json"),
            under.into_bytes(),
        )
        .await;
    r.invalid("name");
    // Unknown routes answer in the same shape.
    s.get("/api/v1/nothing-here", &s.admin).await.err(404);
    s.get("/api/v2/teams", &Auth::Anon).await.err(404);
}

both_backends!(
    instance_names,
    json_bodies,
    instance_fields,
    instance_sleep,
    template_policy,
    teams_and_members,
    users_and_tokens,
    stacks,
    limits_and_sizes,
);

/// Bugs found by this suite, each fixed; the tests keep them fixed.
mod bugs {
    use serde_json::json;

    use super::super::support::{Backend, Server};
    use super::Setup;

    /// A missing field is a 422 on the field `body`, not on the field that is missing.
    #[tokio::test]
    async fn missing_field_is_named() {
        let t = Setup::new(Backend::Sqlite).await;
        let r = t.create_instance("x", json!({ "stack_id": null })).await;
        r.invalid("stack_id");
    }

    /// Query strings that do not parse answer axum's plain-text 400, not the API's JSON error.
    #[tokio::test]
    async fn bad_query_is_a_json_error() {
        let s = Server::start(Backend::Sqlite).await;
        let r = s.get("/api/v1/teams?limit=abc", &s.admin).await;
        r.invalid("limit");
        let r = s.get("/api/v1/audit-log?colour=red", &s.admin).await;
        r.invalid("colour");
    }

    /// A known path with another method answers 405 with an empty body.
    #[tokio::test]
    async fn wrong_method_is_a_json_error() {
        let s = Server::start(Backend::Sqlite).await;
        let r = s.call("PATCH", "/api/v1/teams", &s.admin, None).await;
        assert_eq!(r.status, 405, "{r}");
        assert_eq!(r.json["error"]["code"], "method_not_allowed", "{r}");
    }

    /// An application's description is limited to 1000 characters on create, not on change.
    #[tokio::test]
    async fn long_description_on_update() {
        let t = Setup::new(Backend::Sqlite).await;
        t.s.put(
            &format!("/api/v1/applications/{}", t.app),
            &t.owner,
            json!({ "description": "d".repeat(1001) }),
        )
        .await
        .invalid("description");
    }
}
