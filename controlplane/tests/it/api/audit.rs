//! The audit log: one entry per change with event, actor and object; the team, instance and
//! platform views; the event filter; cursor pagination, newest first.

use serde_json::{json, Value};

use super::support::{both_backends, ids, Backend, Resp, Server};

/// Tracks the newest entry of the platform log, to check that each change adds exactly one.
struct Log<'a> {
    s: &'a Server,
    newest: String,
}

impl<'a> Log<'a> {
    async fn new(s: &'a Server) -> Log<'a> {
        let r = s.get("/api/v1/audit-log?limit=1", &s.admin).await;
        let newest = r.ok(200)["items"][0]["id"].as_str().unwrap().to_string();
        Log { s, newest }
    }

    /// Asserts that exactly one entry was added since the last check, `event` by `actor` about
    /// `object_type` `object_id`; returns it.
    async fn one(&mut self, event: &str, actor: &str, object_type: &str, object_id: &str) -> Value {
        let r = self.s.get("/api/v1/audit-log?limit=2", &self.s.admin).await;
        let items = r.ok(200)["items"].as_array().unwrap();
        assert_eq!(
            items[1]["id"],
            self.newest.as_str(),
            "not exactly one new entry for {event}: {r}"
        );
        let e = items[0].clone();
        assert_eq!(e["event"], event, "{r}");
        assert_eq!(e["actor"], actor, "{r}");
        assert_eq!(e["object_type"], object_type, "{r}");
        assert_eq!(e["object_id"], object_id, "{r}");
        assert!(e["ts"].as_i64().unwrap() > 0, "{r}");
        self.newest = e["id"].as_str().unwrap().to_string();
        e
    }

    /// Asserts nothing was added.
    async fn none(&self) {
        let r = self.s.get("/api/v1/audit-log?limit=1", &self.s.admin).await;
        assert_eq!(r.ok(200)["items"][0]["id"], self.newest.as_str(), "{r}");
    }
}

fn id(r: &Resp) -> String {
    r.json["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{r}"))
        .to_string()
}

async fn every_change_is_recorded(b: Backend) {
    let s = Server::start(b).await;
    let owner = s.user("owner").await;
    let member = s.user("member").await;
    let admin_id = s.get("/api/v1/user", &s.admin).await.ok(200)["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut log = Log::new(&s).await;
    let o = &owner.auth;

    // Users and tokens.
    let r = s
        .post(
            "/api/v1/users",
            &s.admin,
            json!({ "username": "carol", "password": "long-enough" }),
        )
        .await;
    r.ok(201);
    let e = log.one("user.created", "admin", "user", &id(&r)).await;
    assert_eq!(e["actor_id"], admin_id.as_str());
    assert_eq!(e["body"], json!({ "username": "carol", "admin": false }));
    let r = s
        .post("/api/v1/user/tokens", o, json!({ "name": "audited" }))
        .await;
    r.ok(201);
    let token = id(&r);
    let e = log.one("token.created", "owner", "token", &token).await;
    assert_eq!(e["actor_id"], owner.id.as_str());
    assert!(!e
        .to_string()
        .contains(r.json["token_value"].as_str().unwrap()));
    let r = s.delete(&format!("/api/v1/user/tokens/{token}"), o).await;
    r.ok(204);
    log.one("token.revoked", "owner", "token", &token).await;

    // Teams and members.
    let r = s
        .post("/api/v1/teams", o, json!({ "name": "Audited" }))
        .await;
    r.ok(201);
    let team = id(&r);
    let e = log.one("team.created", "owner", "team", &team).await;
    assert_eq!(e["team_id"], team.as_str());
    assert_eq!(e["body"], json!({ "name": "Audited", "slug": "audited" }));
    // Failures record nothing.
    s.post("/api/v1/teams", o, json!({ "name": "Audited" }))
        .await
        .err(409);
    s.put(
        &format!("/api/v1/teams/{team}"),
        &member.auth,
        json!({ "name": "Nope" }),
    )
    .await
    .err(404);
    log.none().await;
    let r = s
        .put(
            &format!("/api/v1/teams/{team}"),
            o,
            json!({ "name": "Audited 2" }),
        )
        .await;
    r.ok(200);
    let e = log.one("team.updated", "owner", "team", &team).await;
    assert_eq!(
        e["body"],
        json!({ "before": { "name": "Audited" }, "after": { "name": "Audited 2" } })
    );
    let members = format!("/api/v1/teams/{team}/members");
    let r = s
        .post(
            &members,
            o,
            json!({ "username": "member", "role": "member" }),
        )
        .await;
    r.ok(201);
    let e = log.one("member.added", "owner", "member", &member.id).await;
    assert_eq!(e["team_id"], team.as_str());
    assert_eq!(e["body"], json!({ "username": "member", "role": "member" }));
    let r = s
        .put(
            &format!("{members}/{}", member.id),
            &s.admin,
            json!({ "role": "viewer" }),
        )
        .await;
    r.ok(200);
    let e = log
        .one("member.role-changed", "admin", "member", &member.id)
        .await;
    assert_eq!(e["body"]["before"], "member");
    assert_eq!(e["body"]["after"], "viewer");
    let r = s.delete(&format!("{members}/{}", member.id), o).await;
    r.ok(204);
    log.one("member.removed", "owner", "member", &member.id)
        .await;

    // Applications.
    let r = s
        .post(
            "/api/v1/applications",
            o,
            json!({ "team_id": team, "name": "Main" }),
        )
        .await;
    r.ok(201);
    let app = id(&r);
    log.one("application.created", "owner", "application", &app)
        .await;
    let r = s
        .put(
            &format!("/api/v1/applications/{app}"),
            o,
            json!({ "description": "the main one" }),
        )
        .await;
    r.ok(200);
    let e = log
        .one("application.updated", "owner", "application", &app)
        .await;
    assert_eq!(e["body"]["before"]["description"], "");
    assert_eq!(e["body"]["after"]["description"], "the main one");
    let r = s
        .post(
            "/api/v1/applications",
            o,
            json!({ "team_id": team, "name": "Spare" }),
        )
        .await;
    r.ok(201);
    let spare = id(&r);
    log.one("application.created", "owner", "application", &spare)
        .await;
    let r = s.delete(&format!("/api/v1/applications/{spare}"), o).await;
    r.ok(204);
    log.one("application.deleted", "owner", "application", &spare)
        .await;

    // Instances.
    let r = s
        .post(
            "/api/v1/instances",
            o,
            json!({ "name": "audited", "application_id": app, "stack_id": s.stack_id }),
        )
        .await;
    r.ok(201);
    let inst = id(&r);
    let e = log
        .one("instance.created", "owner", "instance", &inst)
        .await;
    assert_eq!(e["team_id"], team.as_str());
    assert_eq!(e["instance_id"], inst.as_str());
    assert_eq!(e["body"]["name"], "audited");
    let ipath = format!("/api/v1/instances/{inst}");
    let r = s.put(&ipath, o, json!({ "env": { "A": "1" } })).await;
    r.ok(200);
    let e = log
        .one("instance.updated", "owner", "instance", &inst)
        .await;
    assert_eq!(e["body"]["before"]["env"], json!({}));
    assert_eq!(e["body"]["after"]["env"], json!({ "A": "1" }));
    let r = s
        .call("POST", &format!("{ipath}/actions/stop"), o, None)
        .await;
    r.ok(200);
    let e = log.one("instance.stop", "owner", "instance", &inst).await;
    assert_eq!(
        e["body"],
        json!({ "before": "running", "after": "stopped" })
    );
    // An unknown action records nothing.
    s.call("POST", &format!("{ipath}/actions/explode"), o, None)
        .await
        .err(422);
    log.none().await;
    let r = s
        .put(&format!("{ipath}/ha"), o, json!({ "replicas": 3 }))
        .await;
    r.ok(200);
    let e = log.one("instance.ha-set", "owner", "instance", &inst).await;
    assert_eq!(e["body"]["before"], json!(null));
    assert_eq!(
        e["body"]["after"],
        json!({ "replicas": 3, "mode": "balanced" })
    );
    let r = s.delete(&format!("{ipath}/ha"), &s.admin).await;
    r.ok(204);
    log.one("instance.ha-off", "admin", "instance", &inst).await;

    // The instance's own log, for members and up: its entries only, newest first.
    let r = s.get(&format!("{ipath}/audit-log"), o).await;
    let events: Vec<&str> = r.ok(200)["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        events,
        [
            "instance.ha-off",
            "instance.ha-set",
            "instance.stop",
            "instance.updated",
            "instance.created"
        ]
    );

    let r = s.delete(&ipath, o).await;
    r.ok(204);
    let e = log
        .one("instance.deleted", "owner", "instance", &inst)
        .await;
    assert_eq!(e["instance_id"], inst.as_str());

    // Stacks and templates, by the admin.
    let r = s
        .post(
            "/api/v1/stacks",
            &s.admin,
            json!({ "name": "audited", "nodered_version": "4.0.0" }),
        )
        .await;
    r.ok(201);
    let stack = id(&r);
    let e = log.one("stack.created", "admin", "stack", &stack).await;
    assert_eq!(e["team_id"], json!(null));
    let r = s
        .put(
            &format!("/api/v1/stacks/{stack}"),
            &s.admin,
            json!({ "name": "audited", "nodered_version": "4.0.1" }),
        )
        .await;
    r.ok(200);
    let e = log.one("stack.updated", "admin", "stack", &stack).await;
    assert_eq!(e["body"]["before"]["nodered_version"], "4.0.0");
    assert_eq!(e["body"]["after"]["nodered_version"], "4.0.1");
    let r = s.delete(&format!("/api/v1/stacks/{stack}"), &s.admin).await;
    r.ok(204);
    log.one("stack.deleted", "admin", "stack", &stack).await;
    let r = s
        .post("/api/v1/templates", &s.admin, json!({ "name": "audited" }))
        .await;
    r.ok(201);
    let template = id(&r);
    log.one("template.created", "admin", "template", &template)
        .await;
    let r = s
        .put(
            &format!("/api/v1/templates/{template}"),
            &s.admin,
            json!({ "name": "audited", "settings": { "flowFilePretty": true } }),
        )
        .await;
    r.ok(200);
    let e = log
        .one("template.updated", "admin", "template", &template)
        .await;
    assert_eq!(
        e["body"]["after"]["settings"],
        json!({ "flowFilePretty": true })
    );
    let r = s
        .delete(&format!("/api/v1/templates/{template}"), &s.admin)
        .await;
    r.ok(204);
    log.one("template.deleted", "admin", "template", &template)
        .await;

    // The team's log: the team's entries only, and all of them.
    let team_log = s
        .all_pages(&format!("/api/v1/teams/{team}/audit-log"), o, 4, "id")
        .await;
    let platform = s.all_pages("/api/v1/audit-log", &s.admin, 500, "id").await;
    let of_team: Vec<&Value> = platform
        .iter()
        .filter(|e| e["team_id"] == team.as_str())
        .collect();
    assert_eq!(team_log.iter().collect::<Vec<_>>(), of_team);
    let team_events: Vec<&str> = team_log
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        team_events,
        [
            "instance.deleted",
            "instance.ha-off",
            "instance.ha-set",
            "instance.stop",
            "instance.updated",
            "instance.created",
            "application.deleted",
            "application.created",
            "application.updated",
            "application.created",
            "member.removed",
            "member.role-changed",
            "member.added",
            "team.updated",
            "team.created",
        ]
    );

    // Deleting the team is the last entry of its log.
    let r = s.delete(&format!("/api/v1/teams/{team}"), o).await;
    r.ok(204);
    log.one("team.deleted", "owner", "team", &team).await;
}

async fn filters_and_pages(b: Backend) {
    let s = Server::start(b).await;
    let owner = s.user("owner").await.auth;
    let team = s.team(&owner).await;
    let app = s.application(&owner, &team).await;
    let mut instances = Vec::new();
    for _ in 0..3 {
        let i = s.instance(&owner, &app, json!({})).await;
        let iid = i["id"].as_str().unwrap().to_string();
        for action in ["stop", "start"] {
            s.call(
                "POST",
                &format!("/api/v1/instances/{iid}/actions/{action}"),
                &owner,
                None,
            )
            .await
            .ok(200);
        }
        instances.push(iid);
    }
    let all = s.all_pages("/api/v1/audit-log", &s.admin, 500, "id").await;
    // Newest first: ids and times never go up.
    let all_ids = ids(&all);
    assert!(all_ids.windows(2).all(|w| w[0] > w[1]), "{all_ids:?}");
    assert!(all
        .windows(2)
        .all(|w| w[0]["ts"].as_i64() >= w[1]["ts"].as_i64()));
    // Pages of 3 give the same entries in the same order, for every view.
    for limit in [1, 3, 4] {
        let paged = s
            .all_pages("/api/v1/audit-log", &s.admin, limit, "id")
            .await;
        assert_eq!(ids(&paged), all_ids, "limit {limit}");
    }

    // Exact event.
    let created = s
        .all_pages(
            "/api/v1/audit-log?event=instance.created",
            &s.admin,
            2,
            "id",
        )
        .await;
    assert_eq!(created.len(), 3);
    assert!(created.iter().all(|e| e["event"] == "instance.created"));
    let mut created_ids: Vec<String> = created
        .iter()
        .map(|e| e["object_id"].as_str().unwrap().to_string())
        .collect();
    created_ids.reverse();
    assert_eq!(created_ids, instances);
    // A prefix ends with '.'; without it the event must match exactly.
    let prefixed = s
        .all_pages("/api/v1/audit-log?event=instance.", &s.admin, 4, "id")
        .await;
    let expected: Vec<&Value> = all
        .iter()
        .filter(|e| e["event"].as_str().unwrap().starts_with("instance."))
        .collect();
    assert_eq!(prefixed.iter().collect::<Vec<_>>(), expected);
    assert_eq!(prefixed.len(), 9);
    let r = s.get("/api/v1/audit-log?event=instance", &s.admin).await;
    assert_eq!(r.ok(200)["items"], json!([]));
    let r = s
        .get("/api/v1/audit-log?event=instance.sto", &s.admin)
        .await;
    assert_eq!(r.ok(200)["items"], json!([]));
    // Users: the owner by the admin, and the admin itself by the first start.
    let r = s.get("/api/v1/audit-log?event=user.", &s.admin).await;
    let users: Vec<(&str, &str, &Value)> = r.ok(200)["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["event"].as_str().unwrap(),
                e["actor"].as_str().unwrap(),
                &e["body"]["username"],
            )
        })
        .collect();
    assert_eq!(
        users,
        [
            ("user.created", "admin", &json!("owner")),
            ("user.created", "system", &json!("admin")),
        ]
    );
    let first = all.last().unwrap();
    assert_eq!(first["actor_id"], json!(null), "{first}");

    // The same filters on the team and instance views.
    let team_stops = s
        .all_pages(
            &format!("/api/v1/teams/{team}/audit-log?event=instance.stop"),
            &owner,
            2,
            "id",
        )
        .await;
    assert_eq!(team_stops.len(), 3);
    let one = &instances[1];
    let inst_log = s
        .all_pages(
            &format!("/api/v1/instances/{one}/audit-log?event=instance."),
            &owner,
            1,
            "id",
        )
        .await;
    let events: Vec<&str> = inst_log
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        events,
        ["instance.start", "instance.stop", "instance.created"]
    );
    assert!(inst_log.iter().all(|e| e["instance_id"] == one.as_str()));
    // A cursor from the middle continues after it.
    let from = &all_ids[2];
    let r = s
        .get(
            &format!("/api/v1/audit-log?limit=2&cursor={from}"),
            &s.admin,
        )
        .await;
    assert_eq!(ids(r.ok(200)["items"].as_array().unwrap()), all_ids[3..5]);
}

both_backends!(every_change_is_recorded, filters_and_pages);

mod bugs {
    use serde_json::json;

    use super::super::support::{Backend, Server};

    /// `event=<prefix>.` is matched with LIKE without escaping, so `%` and `_` in it are
    /// wildcards: `event=%.` lists every event with a dot.
    #[tokio::test]
    async fn prefix_filter_is_literal() {
        let s = Server::start(Backend::Sqlite).await;
        s.post("/api/v1/teams", &s.admin, json!({ "name": "T" }))
            .await
            .ok(201);
        for event in ["%25.", "tea_."] {
            let r = s
                .get(&format!("/api/v1/audit-log?event={event}"), &s.admin)
                .await;
            assert_eq!(r.ok(200)["items"], json!([]), "{r}");
        }
    }
}
