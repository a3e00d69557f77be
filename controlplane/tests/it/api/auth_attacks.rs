//! The authentication attacks of security issue 9, each performed through the real API: a storm
//! of wrong sign-ins, password guessing per user and per address, a short-lived token minting a
//! permanent one, another site writing with the session cookie, and a removed member keeping a
//! log stream open.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tandem_controlplane::auth::password_work;
use tandem_controlplane::auth::throttle::LoginLimits;
use tandem_controlplane::state::ApiConfig;
use tandem_coordinator::logs::LogBook;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::support::{
    both_backends, http_with, now_ms, unique, Auth, Backend, LogsOnly, Resp, Server,
};

/// One request with extra headers (`Origin`, `Sec-Fetch-Site`), on a new connection.
async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    auth: &Auth,
    extra: &[(&str, String)],
    body: Option<Value>,
) -> Resp {
    let content_type = body.as_ref().map(|_| "application/json");
    let bytes = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
    http_with(addr, method, path, auth, extra, content_type, bytes).await
}

async fn connect(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    tokio::task::JoinHandle<()>,
) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    (sender, task)
}

fn login_body(username: &str, password: &str) -> Value {
    json!({ "username": username, "password": password })
}

/// Asserts a 429 in the API's error shape with a `Retry-After` in seconds; returns it.
#[track_caller]
fn too_many(r: &Resp) -> u64 {
    let message = r.err(429);
    assert!(message.contains("try again"), "{r}");
    let secs: u64 = r
        .header("retry-after")
        .unwrap_or_else(|| panic!("no Retry-After: {r}"))
        .parse()
        .unwrap_or_else(|e| panic!("Retry-After is not seconds ({e}): {r}"));
    assert!(secs >= 1, "{r}");
    secs
}

// ---------------------------------------------------------------------------------------------
// Sign-in.

/// 100 concurrent wrong sign-ins from one address: no more argon2 jobs run at once than there
/// are cores, and past the limits (5 for the user, 50 for the address) the rest are refused
/// without one.
async fn a_storm_of_wrong_sign_ins_runs_one_password_check_per_core(b: Backend) {
    let s = Server::start(b).await;
    s.user("stormed").await;
    let work = password_work();
    let limit = LoginLimits::default().address_failures as usize;
    let storm = 100;
    let mut tasks = Vec::new();
    for i in 0..storm {
        let addr = s.addr;
        // A real user's wrong password and unknown users: both cost a check.
        let name = if i % 3 == 0 {
            "stormed".to_string()
        } else {
            format!("ghost{i}")
        };
        tasks.push(tokio::spawn(async move {
            send(
                addr,
                "POST",
                "/api/v1/auth/login",
                &Auth::Anon,
                &[],
                Some(login_body(&name, "wrong-password")),
            )
            .await
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        let r = t.await.unwrap();
        if r.status == 429 {
            too_many(&r);
        } else {
            r.err(401);
        }
        statuses.push(r.status);
    }
    // Attempts count when they start, so exactly the address's limit got through.
    let checked = statuses.iter().filter(|s| **s == 401).count();
    assert_eq!(checked, limit, "{checked} reached the password check");
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        storm - checked
    );
    // The bound itself: never more password jobs at once than cores, in the whole process.
    assert!(work.peak() >= 1, "no password check ran");
    assert!(
        work.peak() <= work.limit(),
        "{} password checks ran at once; the bound is {}",
        work.peak(),
        work.limit()
    );
    assert_eq!(
        work.limit(),
        std::thread::available_parallelism().unwrap().get()
    );
}

/// Limits small enough for a test: 3 failures per user, 10 per address, lockouts of 1 s.
fn short_limits() -> ApiConfig {
    ApiConfig {
        login_limits: LoginLimits {
            user_failures: 3,
            address_failures: 10,
            window: Duration::from_secs(60),
            lockout: Duration::from_secs(1),
            max_lockout: Duration::from_secs(4),
            max_keys: 1000,
        },
        ..ApiConfig::default()
    }
}

async fn guessing_one_users_password_gets_429_until_the_lockout_ends(b: Backend) {
    let s = Server::start_with(b, short_limits(), |_| {}).await;
    let u = s.user("guessed").await;
    let other = s.user("bystander").await;
    let login = |name: &str, password: &str| {
        s.post(
            "/api/v1/auth/login",
            &Auth::Anon,
            login_body(name, password),
        )
    };
    for _ in 0..3 {
        login("guessed", "guess").await.err(401);
    }
    let r = login("guessed", "guess").await;
    assert_eq!(too_many(&r), 1, "{r}");
    assert!(r.header("set-cookie").is_none(), "{r}");
    // During the lockout the right password is refused too, or guessing would go on.
    let r = login("guessed", &u.password).await;
    let wait = too_many(&r);
    // Another user from the same address is not locked out.
    login("bystander", "guess").await.err(401);
    login("bystander", &other.password).await.ok(200);
    // After Retry-After, the right password works, and clears the user's failures.
    tokio::time::sleep(Duration::from_secs(wait)).await;
    login("guessed", &u.password).await.ok(200);
    for _ in 0..3 {
        login("guessed", "guess").await.err(401);
    }
    // Counted afresh after the success: locked out again after 3, for the first lockout's time.
    assert_eq!(too_many(&login("guessed", "guess").await), 1);
}

async fn guessing_from_one_address_across_many_users_gets_429(b: Backend) {
    let s = Server::start_with(b, short_limits(), |_| {}).await;
    let u = s.user("victim").await;
    for i in 0..10 {
        let r = s
            .post(
                "/api/v1/auth/login",
                &Auth::Anon,
                login_body(&format!("user{i}"), "guess"),
            )
            .await;
        r.err(401);
    }
    // An eleventh user, and even a right password, from this address: refused.
    let r = s
        .post(
            "/api/v1/auth/login",
            &Auth::Anon,
            login_body("user10", "guess"),
        )
        .await;
    assert_eq!(too_many(&r), 1, "{r}");
    let r = s
        .post(
            "/api/v1/auth/login",
            &Auth::Anon,
            login_body("victim", &u.password),
        )
        .await;
    too_many(&r);
    // The throttle's memory: one record per name tried, one address.
    let (users, addresses) = s.state.login_throttle.tracked();
    assert!(users <= 12, "{users}");
    assert_eq!(addresses, 1);
    // Once the lockout is over, the right password works.
    tokio::time::sleep(Duration::from_secs(too_many(&r))).await;
    s.post(
        "/api/v1/auth/login",
        &Auth::Anon,
        login_body("victim", &u.password),
    )
    .await
    .ok(200);
}

// ---------------------------------------------------------------------------------------------
// Tokens.

async fn a_token_may_not_outlive_the_token_that_creates_it(b: Backend) {
    let s = Server::start(b).await;
    let u = s.user("minter").await;
    let expiry = now_ms() + 3_600_000;
    let r = s
        .post(
            "/api/v1/user/tokens",
            &u.auth,
            json!({ "name": "short", "expires_at": expiry }),
        )
        .await;
    let short = Auth::Bearer(r.ok(201)["token_value"].as_str().unwrap().to_string());

    // Without an expiry, the new token gets the short one's.
    let r = s
        .post("/api/v1/user/tokens", &short, json!({ "name": "forever" }))
        .await;
    assert_eq!(r.ok(201)["expires_at"], expiry, "{r}");
    let child = Auth::Bearer(r.json["token_value"].as_str().unwrap().to_string());
    // A later expiry is refused, saying why; an earlier one is kept.
    let r = s
        .post(
            "/api/v1/user/tokens",
            &short,
            json!({ "name": "later", "expires_at": expiry + 1 }),
        )
        .await;
    assert!(r.invalid("expires_at").contains("outlive"), "{r}");
    let r = s
        .post(
            "/api/v1/user/tokens",
            &short,
            json!({ "name": "earlier", "expires_at": expiry - 60_000 }),
        )
        .await;
    assert_eq!(r.ok(201)["expires_at"], expiry - 60_000, "{r}");
    // The rule carries down a chain of tokens.
    let r = s
        .post(
            "/api/v1/user/tokens",
            &child,
            json!({ "name": "grandchild" }),
        )
        .await;
    assert_eq!(r.ok(201)["expires_at"], expiry, "{r}");
    // Nothing made with the short token outlives it.
    let list = s.all_pages("/api/v1/user/tokens", &u.auth, 50, "id").await;
    let unlimited: Vec<&str> = list
        .iter()
        .filter(|t| t["expires_at"].is_null())
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(unlimited, ["tests"], "{list:?}");

    // A token without expiry, and a session signed in with the password, are not limited.
    let r = s
        .post(
            "/api/v1/user/tokens",
            &u.auth,
            json!({ "name": "by-token" }),
        )
        .await;
    assert_eq!(r.ok(201)["expires_at"], Value::Null, "{r}");
    let cookie = s.login("minter", &u.password).await;
    let r = s
        .post(
            "/api/v1/user/tokens",
            &cookie,
            json!({ "name": "by-session" }),
        )
        .await;
    assert_eq!(r.ok(201)["expires_at"], Value::Null, "{r}");
}

// ---------------------------------------------------------------------------------------------
// Cross-site writes with the session cookie.

async fn team_count(s: &Server, auth: &Auth) -> usize {
    let r = s.get("/api/v1/teams", auth).await;
    r.ok(200)["items"].as_array().unwrap().len()
}

async fn cookie_writes_must_come_from_the_apis_own_origin(b: Backend) {
    let s = Server::start(b).await;
    let u = s.user("browser").await;
    let cookie = s.login("browser", &u.password).await;
    let evil = [("origin", "http://evil.example".to_string())];
    let own = [("origin", format!("http://{}", s.addr))];
    let new_team = || Some(json!({ "name": unique("Team") }));

    // Another site's page posting with the user's cookie: 403, saying why, and nothing made.
    let r = send(s.addr, "POST", "/api/v1/teams", &cookie, &evil, new_team()).await;
    let message = r.err(403);
    assert!(message.contains("http://evil.example"), "{r}");
    assert!(message.contains("own origin"), "{r}");
    let cross = [("sec-fetch-site", "cross-site".to_string())];
    let r = send(s.addr, "POST", "/api/v1/teams", &cookie, &cross, new_team()).await;
    assert!(r.err(403).contains("cross-site"), "{r}");
    assert_eq!(team_count(&s, &cookie).await, 0);
    // Other writes too: revoking a token, signing out.
    let tokens = s.all_pages("/api/v1/user/tokens", &u.auth, 50, "id").await;
    let token_id = tokens[0]["id"].as_str().unwrap();
    let path = format!("/api/v1/user/tokens/{token_id}");
    send(s.addr, "DELETE", &path, &cookie, &evil, None)
        .await
        .err(403);
    s.get("/api/v1/user", &u.auth).await.ok(200);
    send(s.addr, "POST", "/api/v1/auth/logout", &cookie, &evil, None)
        .await
        .err(403);
    s.get("/api/v1/user", &cookie).await.ok(200);

    // The API's own origin, a same-origin fetch, and clients that send neither: allowed.
    send(s.addr, "POST", "/api/v1/teams", &cookie, &own, new_team())
        .await
        .ok(201);
    let same = [("sec-fetch-site", "same-origin".to_string())];
    send(s.addr, "POST", "/api/v1/teams", &cookie, &same, new_team())
        .await
        .ok(201);
    send(s.addr, "POST", "/api/v1/teams", &cookie, &[], new_team())
        .await
        .ok(201);
    // Reads from anywhere, and bearer tokens from anywhere (browsers do not attach those).
    send(s.addr, "GET", "/api/v1/teams", &cookie, &evil, None)
        .await
        .ok(200);
    send(s.addr, "POST", "/api/v1/teams", &u.auth, &evil, new_team())
        .await
        .ok(201);
    assert_eq!(team_count(&s, &cookie).await, 4);
    send(s.addr, "POST", "/api/v1/auth/logout", &cookie, &own, None)
        .await
        .ok(204);
    s.get("/api/v1/user", &cookie).await.err(401);
}

// ---------------------------------------------------------------------------------------------
// Log streams.

/// An open `GET /instances/{id}/logs/stream`.
struct Stream {
    body: hyper::body::Incoming,
    seen: String,
    _conn: tokio::task::JoinHandle<()>,
}

impl Stream {
    async fn open(s: &Server, instance: &str, auth: &Auth) -> Self {
        let (mut sender, conn) = connect(s.addr).await;
        let mut req = hyper::Request::builder()
            // From the first entry on, so nothing logged before the stream follows is missed.
            .uri(format!(
                "/api/v1/instances/{instance}/logs/stream?cursor=a0"
            ))
            .header("host", s.addr.to_string())
            .header("accept", "text/event-stream");
        match auth {
            Auth::Bearer(t) => req = req.header("authorization", format!("Bearer {t}")),
            Auth::Session { cookie, .. } => req = req.header("cookie", cookie.as_str()),
            other => panic!("no stream for {other:?}"),
        }
        let resp = sender
            .send_request(req.body(Full::new(Bytes::new())).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        Self {
            body: resp.into_body(),
            seen: String::new(),
            _conn: conn,
        }
    }

    /// Reads until an event holds `needle`.
    async fn expect(&mut self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.seen.contains(needle) {
            match tokio::time::timeout_at(deadline, self.body.frame()).await {
                Err(_) => panic!("no {needle:?} within 10 s; got {:?}", self.seen),
                Ok(None) => panic!("the stream ended before {needle:?}: {:?}", self.seen),
                Ok(Some(frame)) => {
                    if let Ok(data) = frame.unwrap().into_data() {
                        self.seen.push_str(&String::from_utf8_lossy(&data));
                    }
                }
            }
        }
    }

    /// Reads until the server ends the stream; panics if it is still open at the deadline.
    async fn expect_end(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.body.frame()).await {
                Err(_) => panic!("the stream is still open after {within:?}"),
                Ok(None) => return,
                Ok(Some(Err(e))) => panic!("the stream broke instead of ending: {e}"),
                Ok(Some(Ok(_))) => {}
            }
        }
    }
}

async fn a_log_stream_ends_when_its_callers_access_goes(b: Backend) {
    let book = Arc::new(LogBook::default());
    let config = ApiConfig {
        stream_recheck: Duration::from_millis(200),
        ..ApiConfig::default()
    };
    let s = Server::start_with(b, config, |state| {
        state.coordinator = Arc::new(LogsOnly(book.clone()));
    })
    .await;
    let owner = s.user("streamowner").await;
    let viewer = s.user("streamviewer").await;
    let team = s.team(&owner.auth).await;
    s.add_member(&owner.auth, &team, &viewer, "viewer").await;
    let app = s.application(&owner.auth, &team).await;
    let inst = s.instance(&owner.auth, &app, json!({})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let log = book.instance(&inst);
    let within = Duration::from_secs(10);

    // A viewer follows the log; removed from the team while lines keep coming, the stream ends.
    let mut viewing = Stream::open(&s, &inst, &viewer.auth).await;
    log.note("info", "line for the viewer");
    viewing.expect("line for the viewer").await;
    let busy = tokio::spawn({
        let log = log.clone();
        async move {
            loop {
                log.note("info", "still logging");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    s.delete(
        &format!("/api/v1/teams/{team}/members/{}", viewer.id),
        &owner.auth,
    )
    .await
    .ok(204);
    viewing.expect_end(within).await;
    busy.abort();

    // A member whose token is revoked, on a quiet log: the stream ends.
    let member = s.user("streammember").await;
    s.add_member(&owner.auth, &team, &member, "member").await;
    let t = s
        .post(
            "/api/v1/user/tokens",
            &member.auth,
            json!({ "name": "stream" }),
        )
        .await;
    let token = Auth::Bearer(t.ok(201)["token_value"].as_str().unwrap().to_string());
    let token_id = t.json["id"].as_str().unwrap().to_string();
    let mut revoked = Stream::open(&s, &inst, &token).await;
    log.note("info", "line for the member");
    revoked.expect("line for the member").await;
    s.delete(&format!("/api/v1/user/tokens/{token_id}"), &member.auth)
        .await
        .ok(204);
    revoked.expect_end(within).await;

    // A session that signs out, and an instance that is deleted, end theirs.
    let session = s.login("streammember", &member.password).await;
    let mut signed_out = Stream::open(&s, &inst, &session).await;
    let mut owners = Stream::open(&s, &inst, &owner.auth).await;
    log.note("info", "line for both");
    signed_out.expect("line for both").await;
    owners.expect("line for both").await;
    s.call("POST", "/api/v1/auth/logout", &session, None)
        .await
        .ok(204);
    signed_out.expect_end(within).await;
    s.delete(&format!("/api/v1/instances/{inst}"), &owner.auth)
        .await
        .ok(204);
    owners.expect_end(within).await;
}

both_backends!(
    a_storm_of_wrong_sign_ins_runs_one_password_check_per_core,
    guessing_one_users_password_gets_429_until_the_lockout_ends,
    guessing_from_one_address_across_many_users_gets_429,
    a_token_may_not_outlive_the_token_that_creates_it,
    cookie_writes_must_come_from_the_apis_own_origin,
    a_log_stream_ends_when_its_callers_access_goes,
);
