//! Cursor pagination on every list: all items, once each, in creation order.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use super::support::{both_backends, keys, unique, Auth, Backend, Server};

/// Pages through `path` with several limits and checks it lists exactly `want` (by `key`), in
/// that order, with no duplicates.
async fn check_list(s: &Server, path: &str, auth: &Auth, key: &str, want: &[String]) {
    for limit in [3, 1, want.len() - 1, want.len(), want.len() + 1] {
        let items = s.all_pages(path, auth, limit, key).await;
        let got = keys(&items, key);
        let unique: BTreeSet<&String> = got.iter().collect();
        assert_eq!(
            unique.len(),
            got.len(),
            "{path} limit {limit}: duplicates in {got:?}"
        );
        assert_eq!(got, want, "{path} limit {limit}");
    }
    // The default page holds them all.
    let r = s.get(path, auth).await;
    assert_eq!(keys(r.ok(200)["items"].as_array().unwrap(), key), want);
    assert!(r.json.get("next_cursor").is_none(), "{r}");
    // A cursor past the end gives an empty last page.
    let r = s
        .get(&format!("{path}?cursor=ffffffffffffffffffffffff"), auth)
        .await;
    assert_eq!(r.ok(200), &json!({ "items": [] }));
}

fn id_of(v: &Value) -> String {
    v["id"].as_str().unwrap().to_string()
}

async fn pagination(b: Backend) {
    let s = Server::start(b).await;
    let owner = s.user("owner").await;
    let o = &owner.auth;

    // Teams (7 of the owner's; the admin sees them too).
    let mut teams = Vec::new();
    for _ in 0..7 {
        teams.push(s.team(o).await);
    }
    check_list(&s, "/api/v1/teams", o, "id", &teams).await;
    check_list(&s, "/api/v1/teams", &s.admin, "id", &teams).await;
    let team = &teams[0];

    // Applications of a team.
    let mut apps = Vec::new();
    for _ in 0..7 {
        apps.push(s.application(o, team).await);
    }
    // One in another team must not show.
    s.application(o, &teams[1]).await;
    check_list(
        &s,
        &format!("/api/v1/teams/{team}/applications"),
        o,
        "id",
        &apps,
    )
    .await;

    // Instances of an application and of a team.
    let mut instances = Vec::new();
    for _ in 0..7 {
        instances.push(id_of(&s.instance(o, &apps[0], json!({})).await));
    }
    let elsewhere = s.application(o, &teams[1]).await;
    s.instance(o, &elsewhere, json!({})).await;
    check_list(
        &s,
        &format!("/api/v1/applications/{}/instances", apps[0]),
        o,
        "id",
        &instances,
    )
    .await;
    // In the team, spread over two applications.
    instances.push(id_of(&s.instance(o, &apps[1], json!({})).await));
    check_list(
        &s,
        &format!("/api/v1/teams/{team}/instances"),
        o,
        "id",
        &instances,
    )
    .await;

    // Stacks: the default one and 6 more.
    let mut stacks = vec![s.stack_id.clone()];
    for _ in 0..6 {
        let r = s
            .post(
                "/api/v1/stacks",
                &s.admin,
                json!({ "name": unique("stack"), "nodered_version": "4.0.0" }),
            )
            .await;
        stacks.push(id_of(r.ok(201)));
    }
    check_list(&s, "/api/v1/stacks", o, "id", &stacks).await;

    // Templates.
    let mut templates = Vec::new();
    for _ in 0..7 {
        let r = s
            .post(
                "/api/v1/templates",
                &s.admin,
                json!({ "name": unique("template") }),
            )
            .await;
        templates.push(id_of(r.ok(201)));
    }
    check_list(&s, "/api/v1/templates", o, "id", &templates).await;

    // Tokens: the owner's own (the first made by `user`), never the admin's.
    let listed = s.get("/api/v1/user/tokens", o).await;
    let mut tokens = keys(listed.ok(200)["items"].as_array().unwrap(), "id");
    assert_eq!(tokens.len(), 1);
    for _ in 0..6 {
        let r = s
            .post("/api/v1/user/tokens", o, json!({ "name": unique("t") }))
            .await;
        tokens.push(id_of(r.ok(201)));
    }
    check_list(&s, "/api/v1/user/tokens", o, "id", &tokens).await;

    // Users: the admin, the owner and 5 more; members of a team, by user id.
    let admin_id = id_of(s.get("/api/v1/user", &s.admin).await.ok(200));
    let mut users = vec![admin_id, owner.id.clone()];
    let mut members = vec![owner.id.clone()];
    for i in 0..5 {
        let r = s
            .post(
                "/api/v1/users",
                &s.admin,
                json!({ "username": format!("u{i}"), "password": "long-enough" }),
            )
            .await;
        let uid = id_of(r.ok(201));
        users.push(uid.clone());
        s.post(
            &format!("/api/v1/teams/{team}/members"),
            o,
            json!({ "username": format!("u{i}"), "role": "viewer" }),
        )
        .await
        .ok(201);
        members.push(uid);
    }
    check_list(&s, "/api/v1/users", &s.admin, "id", &users).await;
    // Members are ordered by user id: the owner was created first.
    check_list(
        &s,
        &format!("/api/v1/teams/{team}/members"),
        o,
        "user_id",
        &members,
    )
    .await;
}

both_backends!(pagination);
