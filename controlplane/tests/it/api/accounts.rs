//! Accounts (issue 14): every user changes their own password; platform admins disable and
//! re-enable users, reset passwords and grant admin. A password change or a disable ends the
//! user's sessions; a disabled user's tokens open nothing; the platform keeps an enabled admin.

use serde_json::json;

use super::support::{both_backends, session_of, Auth, Backend, Server};

both_backends!(
    the_first_start_admin_sets_its_first_password_with_its_token,
    a_password_change_ends_every_session_and_needs_the_current_password,
    admins_disable_enable_and_reset_users_and_keep_an_enabled_admin,
);

async fn login(s: &Server, username: &str, password: &str) -> (u16, Option<Auth>) {
    let r = s
        .post(
            "/api/v1/auth/login",
            &Auth::Anon,
            json!({ "username": username, "password": password }),
        )
        .await;
    let session = r.header("set-cookie").is_some().then(|| session_of(&r));
    (r.status, session)
}

async fn a_password_change_ends_every_session_and_needs_the_current_password(b: Backend) {
    let s = Server::start(b).await;
    let u = s.user("alice").await;
    let (status, cookie) = login(&s, &u.username, &u.password).await;
    assert_eq!(status, 200);
    let cookie = cookie.unwrap();
    let (_, other) = login(&s, &u.username, &u.password).await;
    let other = other.unwrap();

    let r = s
        .put(
            "/api/v1/user/password",
            &cookie,
            json!({ "current": "wrong-password", "new": "a-new-long-password" }),
        )
        .await;
    r.invalid("current");
    let r = s
        .put(
            "/api/v1/user/password",
            &cookie,
            json!({ "current": u.password, "new": "short" }),
        )
        .await;
    r.invalid("new");
    let r = s
        .put(
            "/api/v1/user/password",
            &cookie,
            json!({ "current": u.password, "new": "a-new-long-password" }),
        )
        .await;
    assert_eq!(r.status, 204, "{r}");
    // Both sessions ended; the token stays; the old password no longer signs in.
    for auth in [&cookie, &other] {
        assert_eq!(s.get("/api/v1/user", auth).await.status, 401);
    }
    s.get("/api/v1/user", &u.auth).await.ok(200);
    assert_eq!(login(&s, &u.username, &u.password).await.0, 401);
    assert_eq!(login(&s, &u.username, "a-new-long-password").await.0, 200);
}

async fn admins_disable_enable_and_reset_users_and_keep_an_enabled_admin(b: Backend) {
    let s = Server::start(b).await;
    let u = s.user("bob").await;
    let (_, cookie) = login(&s, &u.username, &u.password).await;
    let cookie = cookie.unwrap();
    let path = format!("/api/v1/users/{}", u.id);

    // Only admins.
    let r = s.put(&path, &u.auth, json!({ "disabled": true })).await;
    assert_eq!(r.status, 403, "{r}");

    // Disabled: sessions end, tokens open nothing, the password no longer signs in.
    let r = s.put(&path, &s.admin, json!({ "disabled": true })).await;
    assert_eq!(r.ok(200)["disabled"], true, "{r}");
    assert_eq!(s.get("/api/v1/user", &cookie).await.status, 401);
    let r = s.get("/api/v1/user", &u.auth).await;
    assert_eq!(r.status, 401, "{r}");
    assert!(r.err(401).contains("disabled"), "{r}");
    let r = s
        .post(
            "/api/v1/auth/login",
            &Auth::Anon,
            json!({ "username": u.username, "password": u.password }),
        )
        .await;
    assert!(r.err(401).contains("disabled"), "{r}");
    let listed = s.get("/api/v1/users", &s.admin).await;
    assert!(
        listed.ok(200)["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["id"] == u.id.as_str() && x["disabled"] == true),
        "{listed}"
    );

    // Enabled again, with a new password: the token works again, the new password signs in.
    let r = s
        .put(
            &path,
            &s.admin,
            json!({ "disabled": false, "password": "reset-by-the-admin" }),
        )
        .await;
    assert_eq!(r.ok(200)["disabled"], false, "{r}");
    s.get("/api/v1/user", &u.auth).await.ok(200);
    assert_eq!(login(&s, &u.username, "reset-by-the-admin").await.0, 200);
    assert_eq!(login(&s, &u.username, &u.password).await.0, 401);
    let r = s.put(&path, &s.admin, json!({ "password": "short" })).await;
    r.invalid("password");

    // Made an admin, and back.
    let r = s.put(&path, &s.admin, json!({ "admin": true })).await;
    assert_eq!(r.ok(200)["admin"], true);
    s.get("/api/v1/users", &u.auth).await.ok(200);
    let r = s.put(&path, &s.admin, json!({ "admin": false })).await;
    assert_eq!(r.ok(200)["admin"], false);

    // The last enabled admin stays one.
    let me = s.get("/api/v1/user", &s.admin).await;
    let admin_id = me.ok(200)["id"].as_str().unwrap().to_string();
    let admin_path = format!("/api/v1/users/{admin_id}");
    for change in [json!({ "admin": false }), json!({ "disabled": true })] {
        let r = s.put(&admin_path, &s.admin, change).await;
        assert_eq!(r.status, 409, "{r}");
    }
    let r = s
        .put("/api/v1/users/no-such-user", &s.admin, json!({}))
        .await;
    assert_eq!(r.status, 404, "{r}");
}

async fn the_first_start_admin_sets_its_first_password_with_its_token(b: Backend) {
    let s = Server::start(b).await;
    let me = s.get("/api/v1/user", &s.admin).await;
    let name = me.ok(200)["username"].as_str().unwrap().to_string();
    assert_eq!(login(&s, &name, "the-first-password").await.0, 401);
    let r = s
        .put(
            "/api/v1/user/password",
            &s.admin,
            json!({ "current": "", "new": "the-first-password" }),
        )
        .await;
    assert_eq!(r.status, 204, "{r}");
    assert_eq!(login(&s, &name, "the-first-password").await.0, 200);
    // From now on the current password is asked for.
    let r = s
        .put(
            "/api/v1/user/password",
            &s.admin,
            json!({ "current": "", "new": "another-password" }),
        )
        .await;
    r.invalid("current");
}
