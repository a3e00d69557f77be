//! Who may call what: every route of the OpenAPI document against every kind of caller.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use super::support::{both_backends, unique, Auth, Backend, Server, User};

/// The callers, in the order of [`Row::expect`].
const CALLERS: [&str; 6] = [
    "admin",
    "owner",
    "member",
    "viewer",
    "outsider",
    "anonymous",
];

/// One route and the status each caller gets: admin, owner, member, viewer, outsider, anonymous.
struct Row {
    method: &'static str,
    path: &'static str,
    expect: [u16; 6],
}

const fn row(method: &'static str, path: &'static str, expect: [u16; 6]) -> Row {
    Row {
        method,
        path,
        expect,
    }
}

// Shorthands for the common columns.
/// Any signed-in user.
const SIGNED_IN: [u16; 6] = [200, 200, 200, 200, 200, 401];
/// Platform admins only.
const ADMIN_ONLY: [u16; 6] = [200, 403, 403, 403, 403, 401];
/// Viewers and up; outsiders do not see the object.
const TEAM_READ: [u16; 6] = [200, 200, 200, 200, 404, 401];
/// Members and up.
const TEAM_MEMBER: [u16; 6] = [200, 200, 200, 403, 404, 401];
/// Owners.
const TEAM_OWNER: [u16; 6] = [200, 200, 403, 403, 404, 401];

/// With 2xx replaced by `ok`.
const fn with_ok(mut e: [u16; 6], ok: u16) -> [u16; 6] {
    let mut i = 0;
    while i < 6 {
        if e[i] == 200 {
            e[i] = ok;
        }
        i += 1;
    }
    e
}

const MATRIX: &[Row] = &[
    // Auth and users.
    row("POST", "/api/v1/auth/login", [200; 6]),
    row("POST", "/api/v1/auth/logout", [204; 6]),
    row("GET", "/api/v1/user", SIGNED_IN),
    row("GET", "/api/v1/instance-names/{name}", SIGNED_IN),
    row("GET", "/api/v1/users", ADMIN_ONLY),
    row("POST", "/api/v1/users", with_ok(ADMIN_ONLY, 201)),
    // A change that changes nothing: admins only.
    row("PUT", "/api/v1/users/{id}", ADMIN_ONLY),
    // Everyone's own, and only with the current password (the body's is wrong for all); the
    // first start's admin has none yet, and sets its first.
    row(
        "PUT",
        "/api/v1/user/password",
        [204, 422, 422, 422, 422, 401],
    ),
    row("GET", "/api/v1/user/tokens", SIGNED_IN),
    row("POST", "/api/v1/user/tokens", with_ok(SIGNED_IN, 201)),
    // Each caller revokes a token of their own.
    row(
        "DELETE",
        "/api/v1/user/tokens/{id}",
        with_ok(SIGNED_IN, 204),
    ),
    // Teams and members.
    row("GET", "/api/v1/teams", SIGNED_IN),
    row("POST", "/api/v1/teams", with_ok(SIGNED_IN, 201)),
    row("GET", "/api/v1/teams/{id}", TEAM_READ),
    row("PUT", "/api/v1/teams/{id}", TEAM_OWNER),
    row("DELETE", "/api/v1/teams/{id}", with_ok(TEAM_OWNER, 204)),
    row("GET", "/api/v1/teams/{id}/members", TEAM_READ),
    row(
        "POST",
        "/api/v1/teams/{id}/members",
        with_ok(TEAM_OWNER, 201),
    ),
    row("PUT", "/api/v1/teams/{id}/members/{user_id}", TEAM_OWNER),
    // The target is the member: the member removes themselves, which anyone may.
    row(
        "DELETE",
        "/api/v1/teams/{id}/members/{user_id}",
        [204, 204, 204, 403, 404, 401],
    ),
    // Applications.
    row("POST", "/api/v1/applications", with_ok(TEAM_OWNER, 201)),
    row("GET", "/api/v1/teams/{id}/applications", TEAM_READ),
    row("GET", "/api/v1/applications/{id}", TEAM_READ),
    row("PUT", "/api/v1/applications/{id}", TEAM_OWNER),
    row(
        "DELETE",
        "/api/v1/applications/{id}",
        with_ok(TEAM_OWNER, 204),
    ),
    // Instances.
    row("POST", "/api/v1/instances", with_ok(TEAM_OWNER, 201)),
    row("GET", "/api/v1/instances/{id}", TEAM_READ),
    row("PUT", "/api/v1/instances/{id}", TEAM_MEMBER),
    row("DELETE", "/api/v1/instances/{id}", with_ok(TEAM_OWNER, 204)),
    row("GET", "/api/v1/teams/{id}/instances", TEAM_READ),
    row("GET", "/api/v1/applications/{id}/instances", TEAM_READ),
    row(
        "POST",
        "/api/v1/instances/{id}/actions/{action}",
        TEAM_MEMBER,
    ),
    row("GET", "/api/v1/instances/{id}/status", TEAM_READ),
    row("GET", "/api/v1/instances/{id}/logs", TEAM_READ),
    row("GET", "/api/v1/instances/{id}/logs/stream", TEAM_READ),
    row("GET", "/api/v1/instances/{id}/ha", TEAM_READ),
    row("PUT", "/api/v1/instances/{id}/ha", TEAM_OWNER),
    row(
        "DELETE",
        "/api/v1/instances/{id}/ha",
        with_ok(TEAM_OWNER, 204),
    ),
    row("GET", "/api/v1/instances/{id}/protection", TEAM_READ),
    // Those who may open the editor get a ticket for it.
    row(
        "POST",
        "/api/v1/instances/{id}/editor-ticket",
        with_ok(TEAM_MEMBER, 201),
    ),
    // The whole team gets one for endpoints that are for its members.
    row(
        "POST",
        "/api/v1/instances/{id}/access-ticket",
        with_ok(TEAM_READ, 201),
    ),
    row("GET", "/api/v1/instances/{id}/modules", TEAM_READ),
    row(
        "PUT",
        "/api/v1/instances/{id}/modules",
        with_ok(TEAM_MEMBER, 202),
    ),
    row("PUT", "/api/v1/instances/{id}/protection", TEAM_OWNER),
    // Flows' HTTP endpoints: viewers read the mode and the tokens (never their values); owners
    // set the mode, create and revoke tokens.
    row("GET", "/api/v1/instances/{id}/http-auth", TEAM_READ),
    row("PUT", "/api/v1/instances/{id}/http-auth", TEAM_OWNER),
    row("GET", "/api/v1/instances/{id}/http-tokens", TEAM_READ),
    row(
        "POST",
        "/api/v1/instances/{id}/http-tokens",
        with_ok(TEAM_OWNER, 201),
    ),
    row(
        "DELETE",
        "/api/v1/instances/{id}/http-tokens/{token_id}",
        with_ok(TEAM_OWNER, 204),
    ),
    // Custom hostnames: viewers read, owners set and remove.
    row("GET", "/api/v1/instances/{id}/custom-hostname", TEAM_READ),
    row("PUT", "/api/v1/instances/{id}/custom-hostname", TEAM_OWNER),
    row(
        "DELETE",
        "/api/v1/instances/{id}/custom-hostname",
        with_ok(TEAM_OWNER, 204),
    ),
    // Snapshots, flows and deploys: viewers read metadata; members take, read flows, export,
    // import, deploy and roll back; owners delete.
    row(
        "POST",
        "/api/v1/instances/{id}/snapshots",
        with_ok(TEAM_MEMBER, 201),
    ),
    row("GET", "/api/v1/instances/{id}/snapshots", TEAM_READ),
    row("GET", "/api/v1/snapshots/{id}", TEAM_READ),
    row("DELETE", "/api/v1/snapshots/{id}", with_ok(TEAM_OWNER, 204)),
    row("GET", "/api/v1/snapshots/{id}/full", TEAM_MEMBER),
    row("POST", "/api/v1/snapshots/{id}/export", TEAM_MEMBER),
    row(
        "POST",
        "/api/v1/instances/{id}/snapshots/import",
        with_ok(TEAM_MEMBER, 201),
    ),
    row(
        "POST",
        "/api/v1/instances/{id}/actions/rollback",
        with_ok(TEAM_MEMBER, 202),
    ),
    row("GET", "/api/v1/instances/{id}/flows", TEAM_MEMBER),
    row(
        "PUT",
        "/api/v1/instances/{id}/flows",
        with_ok(TEAM_MEMBER, 202),
    ),
    row("GET", "/api/v1/deployments/{id}", TEAM_READ),
    row("GET", "/api/v1/instances/{id}/deployments", TEAM_READ),
    // Pipelines: owners edit and run them, members and viewers read them.
    row("POST", "/api/v1/pipelines", with_ok(TEAM_OWNER, 201)),
    row("GET", "/api/v1/applications/{id}/pipelines", TEAM_READ),
    row("GET", "/api/v1/pipelines/{id}", TEAM_READ),
    row("PUT", "/api/v1/pipelines/{id}", TEAM_OWNER),
    row("DELETE", "/api/v1/pipelines/{id}", with_ok(TEAM_OWNER, 204)),
    row(
        "POST",
        "/api/v1/pipelines/{id}/stages",
        with_ok(TEAM_OWNER, 201),
    ),
    row(
        "PUT",
        "/api/v1/pipelines/{id}/stages/{stage_id}",
        TEAM_OWNER,
    ),
    row(
        "DELETE",
        "/api/v1/pipelines/{id}/stages/{stage_id}",
        with_ok(TEAM_OWNER, 204),
    ),
    row(
        "POST",
        "/api/v1/pipelines/{id}/stages/{stage_id}/deploy",
        with_ok(TEAM_OWNER, 202),
    ),
    // The replicas' storage API takes the instance's storage token, never a user's.
    row("GET", "/api/v1/storage/{id}/flows", [401; 6]),
    row("PUT", "/api/v1/storage/{id}/flows", [401; 6]),
    row("POST", "/api/v1/storage/{id}/flows/import", [401; 6]),
    row("PUT", "/api/v1/storage/{id}/credentials", [401; 6]),
    row("GET", "/api/v1/storage/{id}/library", [401; 6]),
    row("PUT", "/api/v1/storage/{id}/library", [401; 6]),
    row("POST", "/api/v1/storage/{id}/modules", [401; 6]),
    // Standalone proxies: admins manage their tokens; the proxy routes take a proxy token only.
    row("GET", "/api/v1/proxy-tokens", ADMIN_ONLY),
    row("POST", "/api/v1/proxy-tokens", with_ok(ADMIN_ONLY, 201)),
    row(
        "DELETE",
        "/api/v1/proxy-tokens/{id}",
        with_ok(ADMIN_ONLY, 204),
    ),
    row("GET", "/api/v1/routes", [401; 6]),
    row("GET", "/api/v1/cluster", ADMIN_ONLY),
    row("POST", "/api/v1/routes/report", [401; 6]),
    row("POST", "/api/v1/routes/editor-check", [401; 6]),
    row("POST", "/api/v1/routes/editor-ticket", [401; 6]),
    row("POST", "/api/v1/routes/wake", [401; 6]),
    // Stacks and templates: everyone signed in reads, admins write.
    row("GET", "/api/v1/stacks", SIGNED_IN),
    row("POST", "/api/v1/stacks", with_ok(ADMIN_ONLY, 201)),
    row("GET", "/api/v1/stacks/{id}", SIGNED_IN),
    row("PUT", "/api/v1/stacks/{id}", ADMIN_ONLY),
    row("DELETE", "/api/v1/stacks/{id}", with_ok(ADMIN_ONLY, 204)),
    row("GET", "/api/v1/templates", SIGNED_IN),
    row("POST", "/api/v1/templates", with_ok(ADMIN_ONLY, 201)),
    row("GET", "/api/v1/templates/{id}", SIGNED_IN),
    row("PUT", "/api/v1/templates/{id}", ADMIN_ONLY),
    row("DELETE", "/api/v1/templates/{id}", with_ok(ADMIN_ONLY, 204)),
    // Audit logs.
    row("GET", "/api/v1/teams/{id}/audit-log", TEAM_OWNER),
    row("GET", "/api/v1/instances/{id}/audit-log", TEAM_MEMBER),
    row("GET", "/api/v1/audit-log", ADMIN_ONLY),
];

/// The custom hostname of the world's instance.
const MATRIX_HOSTNAME: &str = "flows.matrix.example.org";

/// Everything the rows need: the callers and a team (created by `owner`, so the admin is no
/// member of it and passes as admin) with an application, an HA instance, a stack and a template.
struct World {
    s: Server,
    owner: User,
    member: User,
    viewer: User,
    outsider: User,
    team: String,
    app: String,
    instance: String,
    stack: String,
    template: String,
    snapshot: String,
    deployment: String,
    pipeline: String,
    stage: String,
}

impl World {
    async fn new(b: Backend) -> Self {
        let s = Server::start(b).await;
        let owner = s.user("owner").await;
        let member = s.user("member").await;
        let viewer = s.user("viewer").await;
        let outsider = s.user("outsider").await;
        let team = s.team(&owner.auth).await;
        s.add_member(&owner.auth, &team, &member, "member").await;
        s.add_member(&owner.auth, &team, &viewer, "viewer").await;
        let app = s.application(&owner.auth, &team).await;
        let instance = s
            .instance(&owner.auth, &app, json!({ "ha": { "replicas": 2 } }))
            .await["id"]
            .as_str()
            .unwrap()
            .to_string();
        let stack = new_stack(&s).await;
        let template = new_template(&s).await;
        let snapshot = s
            .post(
                &format!("/api/v1/instances/{instance}/snapshots"),
                &owner.auth,
                json!({ "name": "first" }),
            )
            .await
            .ok(201)["id"]
            .as_str()
            .unwrap()
            .to_string();
        let deployment = s
            .put(
                &format!("/api/v1/instances/{instance}/flows"),
                &owner.auth,
                json!([{ "id": "t1", "type": "tab" }]),
            )
            .await
            .ok(202)["id"]
            .as_str()
            .unwrap()
            .to_string();
        s.put(
            &format!("/api/v1/instances/{instance}/custom-hostname"),
            &owner.auth,
            json!({ "hostname": MATRIX_HOSTNAME }),
        )
        .await
        .ok(200);
        let pipeline = new_pipeline(&s, &owner.auth, &app).await;
        let stage = s
            .post(
                &format!("/api/v1/pipelines/{pipeline}/stages"),
                &owner.auth,
                json!({ "name": "dev", "instance_id": instance, "action": "create_snapshot" }),
            )
            .await
            .ok(201)["stages"][0]["id"]
            .as_str()
            .unwrap()
            .to_string();
        Self {
            s,
            owner,
            member,
            viewer,
            outsider,
            team,
            app,
            instance,
            stack,
            template,
            snapshot,
            deployment,
            pipeline,
            stage,
        }
    }

    /// A fresh instance of the application, its id.
    async fn fresh_instance(&self) -> String {
        self.s
            .instance(&self.owner.auth, &self.app, json!({}))
            .await["id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    fn auth(&self, caller: usize) -> Auth {
        match caller {
            0 => self.s.admin.clone(),
            1 => self.owner.auth.clone(),
            2 => self.member.auth.clone(),
            3 => self.viewer.auth.clone(),
            4 => self.outsider.auth.clone(),
            _ => Auth::Anon,
        }
    }

    /// A fresh team with the owner, member and viewer in their roles.
    async fn fresh_team(&self) -> String {
        let team = self.s.team(&self.owner.auth).await;
        self.s
            .add_member(&self.owner.auth, &team, &self.member, "member")
            .await;
        self.s
            .add_member(&self.owner.auth, &team, &self.viewer, "viewer")
            .await;
        team
    }

    /// The concrete path and body of `row` for `caller`. Rows that destroy their object get a
    /// fresh one per call.
    async fn call_for(&self, row: &Row, caller: usize) -> (String, Option<Value>) {
        let s = &self.s;
        let (team, app, inst) = (&self.team, &self.app, &self.instance);
        match (row.method, row.path) {
            ("POST", "/api/v1/auth/login") => (
                row.path.into(),
                Some(json!({ "username": self.viewer.username, "password": self.viewer.password })),
            ),
            ("POST", "/api/v1/users") => (
                row.path.into(),
                Some(json!({ "username": unique("made"), "password": "a-long-password" })),
            ),
            ("PUT", "/api/v1/users/{id}") => {
                (format!("/api/v1/users/{}", self.member.id), Some(json!({})))
            }
            ("PUT", "/api/v1/user/password") => (
                row.path.into(),
                Some(json!({ "current": "not-the-password", "new": "a-new-long-password" })),
            ),
            ("POST", "/api/v1/user/tokens") => {
                (row.path.into(), Some(json!({ "name": unique("token") })))
            }
            ("DELETE", "/api/v1/user/tokens/{id}") => {
                // Anonymous gets the owner's token: it must not matter.
                let own = if caller == 5 {
                    self.owner.auth.clone()
                } else {
                    self.auth(caller)
                };
                let t = s
                    .post("/api/v1/user/tokens", &own, json!({ "name": "doomed" }))
                    .await;
                let id = t.ok(201)["id"].as_str().unwrap().to_string();
                (format!("/api/v1/user/tokens/{id}"), None)
            }
            ("POST", "/api/v1/teams") => (row.path.into(), Some(json!({ "name": unique("New") }))),
            ("PUT", "/api/v1/teams/{id}") => (
                format!("/api/v1/teams/{team}"),
                Some(json!({ "name": unique("Renamed") })),
            ),
            ("DELETE", "/api/v1/teams/{id}") => {
                (format!("/api/v1/teams/{}", self.fresh_team().await), None)
            }
            ("POST", "/api/v1/teams/{id}/members") => (
                format!("/api/v1/teams/{}/members", self.fresh_team().await),
                Some(json!({ "username": self.outsider.username, "role": "viewer" })),
            ),
            ("PUT", "/api/v1/teams/{id}/members/{user_id}") => (
                format!("/api/v1/teams/{team}/members/{}", self.viewer.id),
                Some(json!({ "role": "viewer" })),
            ),
            ("DELETE", "/api/v1/teams/{id}/members/{user_id}") => (
                format!(
                    "/api/v1/teams/{}/members/{}",
                    self.fresh_team().await,
                    self.member.id
                ),
                None,
            ),
            ("POST", "/api/v1/applications") => (
                row.path.into(),
                Some(json!({ "team_id": team, "name": unique("App") })),
            ),
            ("PUT", "/api/v1/applications/{id}") => (
                format!("/api/v1/applications/{app}"),
                Some(json!({ "description": unique("described") })),
            ),
            ("DELETE", "/api/v1/applications/{id}") => {
                let doomed = s.application(&self.owner.auth, team).await;
                (format!("/api/v1/applications/{doomed}"), None)
            }
            ("POST", "/api/v1/instances") => (
                row.path.into(),
                Some(
                    json!({ "name": unique("made"), "application_id": app, "stack_id": s.stack_id }),
                ),
            ),
            ("PUT", "/api/v1/instances/{id}") => (
                format!("/api/v1/instances/{inst}"),
                Some(json!({ "env": { "CHANGED_BY": CALLERS[caller] } })),
            ),
            ("DELETE", "/api/v1/instances/{id}") => {
                let doomed = s.instance(&self.owner.auth, app, json!({})).await;
                (
                    format!("/api/v1/instances/{}", doomed["id"].as_str().unwrap()),
                    None,
                )
            }
            ("POST", "/api/v1/instances/{id}/actions/{action}") => {
                (format!("/api/v1/instances/{inst}/actions/restart"), None)
            }
            ("PUT", "/api/v1/instances/{id}/ha") => (
                format!("/api/v1/instances/{inst}/ha"),
                Some(json!({ "replicas": 3, "mode": "standby" })),
            ),
            // A deploy: an instance of its own per call.
            ("PUT", "/api/v1/instances/{id}/modules") => (
                format!("/api/v1/instances/{}/modules", self.fresh_instance().await),
                Some(json!({ "modules": { "node-red-node-random": "0.4.1" } })),
            ),
            // This world's instance is HA (409): a non-HA one has an editor to open.
            ("POST", "/api/v1/instances/{id}/editor-ticket") => (
                format!(
                    "/api/v1/instances/{}/editor-ticket",
                    self.fresh_instance().await
                ),
                None,
            ),
            // An instance whose endpoints are for its members.
            ("POST", "/api/v1/instances/{id}/access-ticket") => {
                let id = self.fresh_instance().await;
                self.s
                    .put(
                        &format!("/api/v1/instances/{id}/http-auth"),
                        &self.owner.auth,
                        json!({ "mode": "members" }),
                    )
                    .await
                    .ok(200);
                (format!("/api/v1/instances/{id}/access-ticket"), None)
            }
            ("PUT", "/api/v1/instances/{id}/protection") => (
                format!("/api/v1/instances/{inst}/protection"),
                Some(json!({ "protected": true })),
            ),
            ("PUT", "/api/v1/instances/{id}/http-auth") => (
                format!("/api/v1/instances/{inst}/http-auth"),
                Some(json!({ "mode": "tokens" })),
            ),
            ("POST", "/api/v1/instances/{id}/http-tokens") => (
                format!("/api/v1/instances/{inst}/http-tokens"),
                Some(json!({ "name": unique("http-token") })),
            ),
            ("DELETE", "/api/v1/instances/{id}/http-tokens/{token_id}") => {
                let t = s
                    .post(
                        &format!("/api/v1/instances/{inst}/http-tokens"),
                        &self.owner.auth,
                        json!({ "name": "doomed" }),
                    )
                    .await;
                let id = t.ok(201)["id"].as_str().unwrap().to_string();
                (format!("/api/v1/instances/{inst}/http-tokens/{id}"), None)
            }
            // The hostname this world's instance has: a PUT of it changes nothing.
            ("PUT", "/api/v1/instances/{id}/custom-hostname") => (
                format!("/api/v1/instances/{inst}/custom-hostname"),
                Some(json!({ "hostname": MATRIX_HOSTNAME })),
            ),
            ("DELETE", "/api/v1/instances/{id}/custom-hostname") => {
                let doomed = self.fresh_instance().await;
                let path = format!("/api/v1/instances/{doomed}/custom-hostname");
                s.put(
                    &path,
                    &self.owner.auth,
                    json!({ "hostname": format!("{}.example.org", unique("gone")) }),
                )
                .await
                .ok(200);
                (path, None)
            }
            ("DELETE", "/api/v1/instances/{id}/ha") => {
                let doomed = s
                    .instance(&self.owner.auth, app, json!({ "ha": { "replicas": 2 } }))
                    .await;
                (
                    format!("/api/v1/instances/{}/ha", doomed["id"].as_str().unwrap()),
                    None,
                )
            }
            ("POST", "/api/v1/stacks") => (row.path.into(), Some(stack_body())),
            ("PUT", "/api/v1/stacks/{id}") => {
                (format!("/api/v1/stacks/{}", self.stack), Some(stack_body()))
            }
            ("DELETE", "/api/v1/stacks/{id}") => {
                (format!("/api/v1/stacks/{}", new_stack(s).await), None)
            }
            ("POST", "/api/v1/templates") => (row.path.into(), Some(template_body())),
            ("POST", "/api/v1/proxy-tokens") => (row.path.into(), Some(json!({ "name": "edge" }))),
            ("DELETE", "/api/v1/proxy-tokens/{id}") => {
                let t = s
                    .post(
                        "/api/v1/proxy-tokens",
                        &s.admin,
                        json!({ "name": "doomed" }),
                    )
                    .await;
                let id = t.ok(201)["id"].as_str().unwrap().to_string();
                (format!("/api/v1/proxy-tokens/{id}"), None)
            }
            ("PUT", "/api/v1/templates/{id}") => (
                format!("/api/v1/templates/{}", self.template),
                Some(template_body()),
            ),
            ("DELETE", "/api/v1/templates/{id}") => {
                (format!("/api/v1/templates/{}", new_template(s).await), None)
            }
            ("DELETE", "/api/v1/snapshots/{id}") => {
                let doomed = s
                    .post(
                        &format!("/api/v1/instances/{inst}/snapshots"),
                        &self.owner.auth,
                        json!({ "name": "doomed" }),
                    )
                    .await;
                let id = doomed.ok(201)["id"].as_str().unwrap().to_string();
                (format!("/api/v1/snapshots/{id}"), None)
            }
            ("POST", "/api/v1/instances/{id}/snapshots") => (
                format!("/api/v1/instances/{inst}/snapshots"),
                Some(json!({ "name": unique("snap") })),
            ),
            ("POST", "/api/v1/snapshots/{id}/export") => (
                format!("/api/v1/snapshots/{}/export", self.snapshot),
                Some(json!({ "credential_secret": "exported" })),
            ),
            ("POST", "/api/v1/instances/{id}/snapshots/import") => {
                let doc = s
                    .post(
                        &format!("/api/v1/snapshots/{}/export", self.snapshot),
                        &self.owner.auth,
                        json!({ "credential_secret": "exported" }),
                    )
                    .await;
                (
                    format!("/api/v1/instances/{inst}/snapshots/import"),
                    Some(json!({ "snapshot": doc.ok(200), "credential_secret": "exported" })),
                )
            }
            // Deploys: one per instance at a time, so each call gets an instance of its own.
            ("POST", "/api/v1/instances/{id}/actions/rollback") => {
                let fresh = self.fresh_instance().await;
                let snap = s
                    .post(
                        &format!("/api/v1/instances/{fresh}/snapshots"),
                        &self.owner.auth,
                        json!({ "name": "back" }),
                    )
                    .await;
                let id = snap.ok(201)["id"].as_str().unwrap().to_string();
                (
                    format!("/api/v1/instances/{fresh}/actions/rollback"),
                    Some(json!({ "snapshot_id": id })),
                )
            }
            ("PUT", "/api/v1/instances/{id}/flows") => (
                format!("/api/v1/instances/{}/flows", self.fresh_instance().await),
                Some(json!([{ "id": "t1", "type": "tab" }])),
            ),
            ("POST", "/api/v1/pipelines") => (
                row.path.into(),
                Some(json!({ "application_id": app, "name": unique("Pipeline") })),
            ),
            ("PUT", "/api/v1/pipelines/{id}") => (
                format!("/api/v1/pipelines/{}", self.pipeline),
                Some(json!({ "name": unique("Renamed") })),
            ),
            ("DELETE", "/api/v1/pipelines/{id}") => (
                format!(
                    "/api/v1/pipelines/{}",
                    new_pipeline(s, &self.owner.auth, app).await
                ),
                None,
            ),
            ("POST", "/api/v1/pipelines/{id}/stages") => (
                format!("/api/v1/pipelines/{}/stages", self.pipeline),
                Some(
                    json!({ "name": unique("stage"), "instance_id": self.fresh_instance().await, "action": "prompt" }),
                ),
            ),
            ("PUT", "/api/v1/pipelines/{id}/stages/{stage_id}") => (
                format!("/api/v1/pipelines/{}/stages/{}", self.pipeline, self.stage),
                Some(json!({ "name": unique("renamed") })),
            ),
            ("DELETE", "/api/v1/pipelines/{id}/stages/{stage_id}") => {
                let p = s
                    .post(
                        &format!("/api/v1/pipelines/{}/stages", self.pipeline),
                        &self.owner.auth,
                        json!({ "name": "doomed", "instance_id": self.fresh_instance().await, "action": "prompt" }),
                    )
                    .await;
                let stages = p.ok(201)["stages"].as_array().unwrap().clone();
                let id = stages.last().unwrap()["id"].as_str().unwrap().to_string();
                (
                    format!("/api/v1/pipelines/{}/stages/{id}", self.pipeline),
                    None,
                )
            }
            ("POST", "/api/v1/pipelines/{id}/stages/{stage_id}/deploy") => {
                // dev (this world's instance) → a fresh target.
                let p = new_pipeline(s, &self.owner.auth, app).await;
                let stage = |instance: String| json!({ "name": "stage", "instance_id": instance, "action": "create_snapshot" });
                let path = format!("/api/v1/pipelines/{p}/stages");
                let first = s
                    .post(&path, &self.owner.auth, stage(self.fresh_instance().await))
                    .await;
                let dev = first.ok(201)["stages"][0]["id"]
                    .as_str()
                    .unwrap()
                    .to_string();
                s.post(&path, &self.owner.auth, stage(self.fresh_instance().await))
                    .await
                    .ok(201);
                (
                    format!("/api/v1/pipelines/{p}/stages/{dev}/deploy"),
                    Some(json!({})),
                )
            }
            ("PUT", "/api/v1/storage/{id}/flows") => {
                (format!("/api/v1/storage/{inst}/flows"), Some(json!([])))
            }
            ("GET", "/api/v1/storage/{id}/library") => (
                format!("/api/v1/storage/{inst}/library?type=functions&path="),
                None,
            ),
            ("PUT", "/api/v1/storage/{id}/library") => (
                format!("/api/v1/storage/{inst}/library"),
                Some(json!({ "type": "functions", "path": "a.js", "body": "" })),
            ),
            ("PUT", "/api/v1/storage/{id}/credentials") => (
                format!("/api/v1/storage/{inst}/credentials"),
                Some(json!({})),
            ),
            (method, path) if method == "GET" || method == "POST" => {
                // Everything else addresses the fixed objects by their placeholders.
                let p = path
                    .replace("/teams/{id}", &format!("/teams/{team}"))
                    .replace("/applications/{id}", &format!("/applications/{app}"))
                    .replace("/instances/{id}", &format!("/instances/{inst}"))
                    .replace("/stacks/{id}", &format!("/stacks/{}", self.stack))
                    .replace("/templates/{id}", &format!("/templates/{}", self.template))
                    .replace("/snapshots/{id}", &format!("/snapshots/{}", self.snapshot))
                    .replace(
                        "/deployments/{id}",
                        &format!("/deployments/{}", self.deployment),
                    )
                    .replace("/pipelines/{id}", &format!("/pipelines/{}", self.pipeline))
                    .replace("/storage/{id}", &format!("/storage/{inst}"))
                    .replace("/instance-names/{name}", "/instance-names/free-name");
                assert!(!p.contains('{'), "no placeholder value for {method} {path}");
                let body = (method == "POST").then(|| json!({}));
                (p, body)
            }
            (method, path) => panic!("the matrix has no way to call {method} {path}"),
        }
    }
}

async fn new_pipeline(s: &Server, owner: &Auth, app: &str) -> String {
    let r = s
        .post(
            "/api/v1/pipelines",
            owner,
            json!({ "application_id": app, "name": unique("Pipeline") }),
        )
        .await;
    r.ok(201)["id"].as_str().unwrap().to_string()
}

fn stack_body() -> Value {
    json!({ "name": unique("stack"), "nodered_version": "4.0.9", "node_version": "22", "memory_mb": 256 })
}

async fn new_stack(s: &Server) -> String {
    let r = s.post("/api/v1/stacks", &s.admin, stack_body()).await;
    r.ok(201)["id"].as_str().unwrap().to_string()
}

fn template_body() -> Value {
    json!({
        "name": unique("Template"),
        "settings": { "flowFilePretty": true },
        "env": { "REGION": { "value": "eu", "locked": true } },
        "policy": { "settings": { "functionTimeout": true } },
    })
}

async fn new_template(s: &Server) -> String {
    let r = s.post("/api/v1/templates", &s.admin, template_body()).await;
    r.ok(201)["id"].as_str().unwrap().to_string()
}

/// Every documented (method, path).
async fn documented(s: &Server) -> BTreeSet<(String, String)> {
    let doc = s.get("/api/v1/openapi.json", &Auth::Anon).await;
    let mut routes = BTreeSet::new();
    for (path, ops) in doc.ok(200)["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            if [
                "get", "put", "post", "delete", "patch", "head", "options", "trace",
            ]
            .contains(&method.as_str())
            {
                routes.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    routes
}

async fn role_matrix(b: Backend) {
    let w = World::new(b).await;

    // The matrix covers exactly the documented routes: a new route needs a row.
    let documented = documented(&w.s).await;
    let rows: BTreeSet<(String, String)> = MATRIX
        .iter()
        .map(|r| (r.method.to_string(), r.path.to_string()))
        .collect();
    assert_eq!(
        rows.len(),
        MATRIX.len(),
        "a route appears twice in the matrix"
    );
    let missing: Vec<_> = documented.difference(&rows).collect();
    let extra: Vec<_> = rows.difference(&documented).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "routes without a matrix row: {missing:?}; rows for undocumented routes: {extra:?}"
    );

    let mut failures = Vec::new();
    for r in MATRIX {
        for (caller, &want) in r.expect.iter().enumerate() {
            let (path, body) = w.call_for(r, caller).await;
            let resp = w.s.call(r.method, &path, &w.auth(caller), body).await;
            if resp.status != want {
                failures.push(format!(
                    "{} {} as {}: want {want}, got {}: {}",
                    r.method, r.path, CALLERS[caller], resp.status, resp.text
                ));
                continue;
            }
            if want >= 400 {
                // Panics with the response when the shape is wrong.
                resp.err(want);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} wrong answers:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The objects a caller sees in lists, and that an outsider's 404 does not tell a hidden team
/// from one that does not exist.
async fn visibility(b: Backend) {
    let w = World::new(b).await;
    let s = &w.s;
    let teams_of = |auth: Auth| async move {
        let r = s.get("/api/v1/teams", &auth).await;
        r.ok(200)["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                (
                    t["id"].as_str().unwrap().to_string(),
                    t.get("role").cloned(),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        teams_of(w.owner.auth.clone()).await,
        vec![(w.team.clone(), Some(json!("owner")))]
    );
    assert_eq!(
        teams_of(w.viewer.auth.clone()).await,
        vec![(w.team.clone(), Some(json!("viewer")))]
    );
    assert_eq!(teams_of(w.outsider.auth.clone()).await, vec![]);
    // The admin sees every team; outside the team it has no role.
    assert_eq!(
        teams_of(s.admin.clone()).await,
        vec![(w.team.clone(), None)]
    );

    let hidden = s
        .get(&format!("/api/v1/teams/{}", w.team), &w.outsider.auth)
        .await;
    let missing = s
        .get("/api/v1/teams/000000000000000000000000", &w.outsider.auth)
        .await;
    assert_eq!(
        hidden.err(404).replace(&w.team, "ID"),
        missing.err(404).replace("000000000000000000000000", "ID")
    );
    for path in [
        format!("/api/v1/instances/{}", w.instance),
        format!("/api/v1/applications/{}", w.app),
        format!("/api/v1/instances/{}/audit-log", w.instance),
        format!("/api/v1/applications/{}/instances", w.app),
    ] {
        let r = s.get(&path, &w.outsider.auth).await;
        r.err(404);
        assert!(!r.text.contains(&w.team), "{r}");
    }
    // An outsider cannot create in a team it cannot see, nor find the application.
    let r = s
        .post(
            "/api/v1/instances",
            &w.outsider.auth,
            json!({ "name": "sneaky", "application_id": w.app, "stack_id": s.stack_id }),
        )
        .await;
    r.err(404);
    // A member may not remove someone else; anyone may leave.
    let r = s
        .delete(
            &format!("/api/v1/teams/{}/members/{}", w.team, w.viewer.id),
            &w.member.auth,
        )
        .await;
    r.err(403);
    // Tokens are personal: not even the admin revokes someone else's.
    let t = s
        .post(
            "/api/v1/user/tokens",
            &w.owner.auth,
            json!({ "name": "mine" }),
        )
        .await;
    let id = t.ok(201)["id"].as_str().unwrap().to_string();
    for auth in [&w.member.auth, &s.admin] {
        s.delete(&format!("/api/v1/user/tokens/{id}"), auth)
            .await
            .err(404);
    }
    s.delete(&format!("/api/v1/user/tokens/{id}"), &w.owner.auth)
        .await
        .ok(204);
}

both_backends!(role_matrix, visibility);
