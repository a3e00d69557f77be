//! Personal access tokens, sign-in sessions, and what the store keeps of their secrets.

use std::time::{Duration, Instant};

use serde_json::json;
use sha2::{Digest, Sha256};
use sqlx::Row;

use super::support::{both_backends, now_ms, session_of, Auth, Backend, Server};

fn sha256_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Everything the store holds, as text: for SQLite the database file and its WAL, for
/// PostgreSQL every row of every table.
async fn stored_text(s: &Server) -> String {
    match s.backend {
        Backend::Sqlite => {
            let mut all = String::new();
            for suffix in ["", "-wal", "-shm"] {
                let path = s.dir.path().join(format!("tandem.db{suffix}"));
                if let Ok(bytes) = std::fs::read(&path) {
                    all.push_str(&String::from_utf8_lossy(&bytes));
                }
            }
            assert!(
                all.contains("CREATE TABLE"),
                "the database file is where we think"
            );
            all
        }
        Backend::Postgres => {
            let pool = s.db().await;
            let tables: Vec<String> =
                sqlx::query("SELECT tablename::text FROM pg_tables WHERE schemaname = 'public'")
                    .fetch_all(&pool)
                    .await
                    .unwrap()
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
            assert!(tables.contains(&"tokens".to_string()), "{tables:?}");
            let mut all = String::new();
            for t in tables {
                let rows = sqlx::query(&format!("SELECT row_to_json(x)::text FROM {t} x"))
                    .fetch_all(&pool)
                    .await
                    .unwrap();
                for r in rows {
                    all.push_str(&r.get::<String, _>(0));
                    all.push('\n');
                }
            }
            pool.close().await;
            all
        }
    }
}

async fn tokens(b: Backend) {
    let s = Server::start(b).await;
    let u = s.user("tokener").await;

    // Created: the secret is shown once, with the prefix.
    let r = s
        .post("/api/v1/user/tokens", &u.auth, json!({ "name": "ci" }))
        .await;
    let created = r.ok(201).clone();
    let secret = created["token_value"].as_str().unwrap().to_string();
    let hex = secret.strip_prefix("tdm_").unwrap_or_else(|| panic!("{r}"));
    assert_eq!(hex.len(), 64, "{secret}");
    assert!(hex.bytes().all(|c| c.is_ascii_hexdigit()), "{secret}");
    assert_eq!(created["name"], "ci");
    assert_eq!(created["expires_at"], json!(null));
    assert_eq!(created["last_used_at"], json!(null));
    let id = created["id"].as_str().unwrap().to_string();
    let bearer = Auth::Bearer(secret.clone());

    // Used.
    let me = s.get("/api/v1/user", &bearer).await;
    assert_eq!(me.ok(200)["username"], "tokener");
    assert_eq!(me.json["admin"], false);
    s.post("/api/v1/teams", &bearer, json!({ "name": "By Token" }))
        .await
        .ok(201);
    // The scheme is case-insensitive; other schemes are no credentials.
    s.get(
        "/api/v1/user",
        &Auth::Authorization(format!("bearer {secret}")),
    )
    .await
    .ok(200);
    s.get(
        "/api/v1/user",
        &Auth::Authorization(format!("Basic {secret}")),
    )
    .await
    .err(401);

    // Listed without the secret, with its last use.
    let list = s.get("/api/v1/user/tokens", &bearer).await;
    assert!(!list.text.contains(&secret), "{list}");
    assert!(!list.text.contains("token_value"), "{list}");
    let items = list.ok(200)["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{list}");
    let mine = items.iter().find(|t| t["id"] == id.as_str()).unwrap();
    assert!(mine["last_used_at"].as_i64().is_some(), "{list}");
    assert_eq!(
        mine.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["created_at", "expires_at", "id", "last_used_at", "name"]
    );

    // Expiry: valid until expires_at, 401 after.
    let expires_at = now_ms() + 1500;
    let short = s
        .post(
            "/api/v1/user/tokens",
            &u.auth,
            json!({ "name": "short", "expires_at": expires_at }),
        )
        .await;
    assert_eq!(short.ok(201)["expires_at"], expires_at);
    let short_auth = Auth::Bearer(short.json["token_value"].as_str().unwrap().to_string());
    s.get("/api/v1/user", &short_auth).await.ok(200);
    let deadline = Instant::now() + Duration::from_secs(10);
    while now_ms() <= expires_at {
        assert!(Instant::now() < deadline, "the clock does not move");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = s.get("/api/v1/user", &short_auth).await;
    assert!(r.err(401).contains("expired"), "{r}");

    // Revoked (with itself): 401 after; a second revoke finds nothing.
    s.delete(&format!("/api/v1/user/tokens/{id}"), &bearer)
        .await
        .ok(204);
    let r = s.get("/api/v1/user", &bearer).await;
    assert!(r.err(401).contains("not valid"), "{r}");
    s.delete(&format!("/api/v1/user/tokens/{id}"), &u.auth)
        .await
        .err(404);
    let list = s.get("/api/v1/user/tokens", &u.auth).await;
    assert!(
        !list.ok(200)["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["id"] == id.as_str()),
        "{list}"
    );

    // Made-up and malformed credentials.
    for auth in [
        Auth::Bearer("tdm_0000".into()),
        Auth::Bearer(String::new()),
        Auth::Bearer(secret[4..].to_string()),
    ] {
        s.get("/api/v1/user", &auth).await.err(401);
    }
    s.get("/api/v1/user", &Auth::Authorization("Bearer".into()))
        .await
        .err(401);
    s.get("/api/v1/user", &Auth::Cookie("other=1".into()))
        .await
        .err(401);

    // The store has the SHA-256 of each token, never the token.
    let pool = s.db().await;
    let hashes: Vec<String> = sqlx::query("SELECT hash FROM tokens")
        .fetch_all(&pool)
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let short_secret = short.json["token_value"].as_str().unwrap();
    assert!(hashes.contains(&sha256_hex(short_secret)), "{hashes:?}");
    assert!(!hashes.contains(&sha256_hex(&secret)), "revoked: gone");
    for h in &hashes {
        assert_eq!(h.len(), 64, "{h}");
        assert!(!h.contains("tdm_"), "{h}");
    }
    // Passwords: argon2id hashes; the token-only admin has none.
    let users = sqlx::query("SELECT username, password_hash FROM users ORDER BY username")
        .fetch_all(&pool)
        .await
        .unwrap();
    for r in &users {
        let name: String = r.get(0);
        let hash: Option<String> = r.get(1);
        match name.as_str() {
            "admin" => assert_eq!(hash, None),
            _ => {
                let hash = hash.unwrap();
                assert!(hash.starts_with("$argon2id$"), "{name}: {hash}");
                assert!(!hash.contains(&u.password), "{hash}");
            }
        }
    }
    assert_eq!(users.len(), 2);
    pool.close().await;
    // No secret anywhere in the store: not the tokens, not the admin's, not the password.
    let admin_token = match &s.admin {
        Auth::Bearer(t) => t.clone(),
        _ => unreachable!(),
    };
    let all = stored_text(&s).await;
    for needle in [
        secret.as_str(),
        &secret[4..],
        short_secret,
        &admin_token,
        &u.password,
    ] {
        assert!(!all.contains(needle), "{needle} is stored");
    }
}

async fn sessions(b: Backend) {
    let s = Server::start(b).await;
    let u = s.user("alice").await;
    let login = |username: &str, password: &str| {
        s.post(
            "/api/v1/auth/login",
            &Auth::Anon,
            json!({ "username": username, "password": password }),
        )
    };

    // Wrong password, unknown user: the same 401, no cookie.
    let wrong = login("alice", "not-the-password").await;
    let unknown = login("bob", "not-the-password").await;
    assert_eq!(wrong.err(401), unknown.err(401));
    assert_eq!(wrong.header("set-cookie"), None);
    login("alice", "").await.err(401);
    // The admin has no password: it cannot sign in with one.
    login("admin", "").await.err(401);
    s.post(
        "/api/v1/auth/login",
        &Auth::Anon,
        json!({ "username": "alice" }),
    )
    .await
    .err(422);

    // The right one: the user, and an HttpOnly SameSite=Lax session cookie.
    let ok = login("alice", &u.password).await;
    assert_eq!(ok.ok(200)["username"], "alice");
    assert_eq!(ok.json["id"], u.id.as_str());
    assert!(ok.json.get("password_hash").is_none(), "{ok}");
    let set = ok.header("set-cookie").unwrap().to_string();
    let attrs: Vec<&str> = set.split(';').map(str::trim).collect();
    let (name, value) = attrs[0].split_once('=').unwrap();
    assert_eq!(name, "tandem_session");
    assert_eq!(value.len(), 64, "{set}");
    for want in ["HttpOnly", "SameSite=Lax", "Path=/", "Max-Age=604800"] {
        assert!(attrs.contains(&want), "{want} missing from {set}");
    }
    let cookie = session_of(&ok);
    let Auth::Session { form_token, .. } = &cookie else {
        unreachable!()
    };
    assert_eq!(form_token.len(), 64, "{ok}");

    // It works on /user, which gives the same form token back, on changes, and among other
    // cookies.
    let me = s.get("/api/v1/user", &cookie).await;
    assert_eq!(me.ok(200)["username"], "alice");
    assert_eq!(me.header("x-tandem-form-token"), Some(form_token.as_str()));
    s.post("/api/v1/teams", &cookie, json!({ "name": "By Cookie" }))
        .await
        .ok(201);
    // A write with the cookie alone, or with another session's form token, is refused and
    // makes nothing; a token signed in elsewhere gets no form token.
    let bare = Auth::Cookie(attrs[0].to_string());
    let r = s
        .post("/api/v1/teams", &bare, json!({ "name": "No Token" }))
        .await;
    assert!(r.err(403).contains("x-tandem-form-token"), "{r}");
    let wrong = Auth::Session {
        cookie: attrs[0].to_string(),
        form_token: "0".repeat(64),
    };
    let r = s
        .post("/api/v1/teams", &wrong, json!({ "name": "No Token" }))
        .await;
    assert!(r.err(403).contains("not this session's form token"), "{r}");
    let r = s.call("POST", "/api/v1/auth/logout", &bare, None).await;
    r.err(403);
    let teams = s.get("/api/v1/teams", &cookie).await;
    assert_eq!(
        teams.ok(200)["items"].as_array().unwrap().len(),
        1,
        "{teams}"
    );
    let by_token = s.get("/api/v1/user", &u.auth).await;
    assert_eq!(by_token.header("x-tandem-form-token"), None);
    let among = Auth::Cookie(format!("theme=dark; {}; lang=en", attrs[0]));
    s.get("/api/v1/user", &among).await.ok(200);
    s.get("/api/v1/user", &Auth::Cookie("tandem_session=0000".into()))
        .await
        .err(401);

    // The store keeps the hash of the session id only.
    let pool = s.db().await;
    let stored: Vec<String> = sqlx::query("SELECT hash FROM sessions")
        .fetch_all(&pool)
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    pool.close().await;
    assert!(stored.contains(&sha256_hex(value)), "{stored:?}");
    assert!(
        !stored_text(&s).await.contains(value),
        "the session id is stored"
    );

    // A second session, then logout of the first: it ends, the second lives on.
    let other = s.login("alice", &u.password).await;
    let out = s.call("POST", "/api/v1/auth/logout", &cookie, None).await;
    out.ok(204);
    let clear = out.header("set-cookie").unwrap();
    assert!(clear.starts_with("tandem_session=;"), "{clear}");
    assert!(clear.contains("Max-Age=0"), "{clear}");
    let r = s.get("/api/v1/user", &cookie).await;
    assert!(r.err(401).contains("session"), "{r}");
    s.get("/api/v1/user", &other).await.ok(200);
    // Logging out again, or without a session, is fine.
    s.call("POST", "/api/v1/auth/logout", &cookie, None)
        .await
        .ok(204);
    s.call("POST", "/api/v1/auth/logout", &Auth::Anon, None)
        .await
        .ok(204);
    // Anonymous callers get 401 with the Bearer challenge.
    let r = s.get("/api/v1/user", &Auth::Anon).await;
    assert!(r.err(401).contains("sign in"), "{r}");
}

both_backends!(tokens, sessions);
