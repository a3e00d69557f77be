//! What the API tests share: a control plane on a free port over SQLite or PostgreSQL, the
//! PostgreSQL server they start once per test binary, an HTTP client, and fixtures.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tandem_controlplane::scratch_pg::ScratchPostgres;
use tandem_controlplane::serve_cmd;
use tandem_controlplane::state::{ApiConfig, AppState};
use tokio::net::{TcpListener, TcpStream};

/// The store behind a test's server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `<temp dir>/tandem.db`.
    Sqlite,
    /// A fresh database on the PostgreSQL server of this test binary.
    Postgres,
}

/// Turns `async fn scenario(b: Backend)` functions into one `#[tokio::test]` per backend:
/// `<module>::sqlite::<scenario>` and `<module>::postgres::<scenario>`.
macro_rules! both_backends {
    ($($name:ident),+ $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::api::support::Backend::Sqlite).await;
                }
            )+
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::api::support::Backend::Postgres).await;
                }
            )+
        }
    };
}
pub(crate) use both_backends;

/// Random lower-case hex, `bytes` bytes of it.
pub fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    getrandom::fill(&mut b).unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A name no other call in this process got: `<prefix>-<n>` (lower case, DNS-safe).
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{prefix}-{}", N.fetch_add(1, Ordering::Relaxed))
}

/// Now, epoch milliseconds (the server's clock too: same machine).
pub fn now_ms() -> i64 {
    tandem_controlplane::store::now_ms()
}

/// A directory removed on drop (`tempfile`'s), named `<prefix>-<random>`.
#[derive(Debug)]
pub struct TempDir(tempfile::TempDir);

impl TempDir {
    pub fn new(prefix: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("{prefix}-"))
            .tempdir()
            .unwrap();
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL: one server per test binary, one database per test.

static PG: tokio::sync::OnceCell<Result<ScratchPostgres, String>> =
    tokio::sync::OnceCell::const_new();

/// A new empty database on this binary's PostgreSQL server; its URL.
pub async fn pg_database() -> String {
    let pg = match PG.get_or_init(tandem_controlplane::scratch_pg::start).await {
        Ok(pg) => pg,
        Err(e) => panic!("cannot start PostgreSQL for the tests: {e}"),
    };
    pg.create_database().await.unwrap()
}

// ---------------------------------------------------------------------------------------------
// HTTP.

/// One request on a new connection to `addr`.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    auth: &Auth,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> Resp {
    http_with(addr, method, path, auth, &[], content_type, body).await
}

/// [`http`] with `extra` headers (`Origin`, `Sec-Fetch-Site`, ...).
pub async fn http_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    auth: &Auth,
    extra: &[(&str, String)],
    content_type: Option<&str>,
    body: Vec<u8>,
) -> Resp {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    match auth {
        Auth::Anon => {}
        Auth::Bearer(t) => req = req.header("authorization", format!("Bearer {t}")),
        Auth::Cookie(c) => req = req.header("cookie", c.as_str()),
        Auth::Session { cookie, form_token } => {
            req = req
                .header("cookie", cookie.as_str())
                .header("x-tandem-form-token", form_token.as_str())
        }
        Auth::Authorization(v) => req = req.header("authorization", v.as_str()),
    }
    for (k, v) in extra {
        req = req.header(*k, v.as_str());
    }
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    let req = req.body(Full::new(Bytes::from(body))).unwrap();
    let resp = send
        .send_request(req)
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Resp {
        method: method.to_string(),
        path: path.to_string(),
        status,
        headers,
        text,
        json,
    }
}

/// The session a sign-in answer opened: its cookie and its form token.
pub fn session_of(r: &Resp) -> Auth {
    let cookie = r
        .header("set-cookie")
        .unwrap_or_else(|| panic!("no cookie: {r}"));
    Auth::Session {
        cookie: cookie.split(';').next().unwrap().to_string(),
        form_token: r
            .header("x-tandem-form-token")
            .unwrap_or_else(|| panic!("no form token: {r}"))
            .to_string(),
    }
}

/// Who calls.
#[derive(Debug, Clone)]
pub enum Auth {
    /// No credentials.
    Anon,
    /// `Authorization: Bearer <token>`.
    Bearer(String),
    /// `Cookie: <name=value>` alone.
    Cookie(String),
    /// A signed-in browser: the session cookie and the session's form token, as the console
    /// sends them.
    Session {
        /// `<name=value>`.
        cookie: String,
        /// `X-Tandem-Form-Token`.
        form_token: String,
    },
    /// `Authorization: <value>`, as given.
    Authorization(String),
}

/// A response, its body parsed as JSON when it is JSON (else `Null`).
#[derive(Debug)]
pub struct Resp {
    pub method: String,
    pub path: String,
    pub status: u16,
    pub headers: http::HeaderMap,
    pub text: String,
    pub json: Value,
}

impl std::fmt::Display for Resp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} answered {}: {}",
            self.method, self.path, self.status, self.text
        )
    }
}

/// The `code` of every error status.
pub fn code_of(status: u16) -> &'static str {
    match status {
        400 => "bad_request",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        409 => "conflict",
        422 => "invalid",
        413 => "too_large",
        429 => "too_many_requests",
        500 => "internal",
        _ => panic!("no error code for status {status}"),
    }
}

impl Resp {
    /// Asserts the status; the JSON body.
    #[track_caller]
    pub fn ok(&self, status: u16) -> &Value {
        assert_eq!(self.status, status, "{self}");
        &self.json
    }

    /// Asserts the status and the error shape `{"error":{"code","message"[,"field"]}}` with the
    /// code of the status; `field` only on 422. Returns the message.
    #[track_caller]
    pub fn err(&self, status: u16) -> &str {
        assert_eq!(self.status, status, "{self}");
        let top = self
            .json
            .as_object()
            .unwrap_or_else(|| panic!("not a JSON object: {self}"));
        assert_eq!(top.len(), 1, "{self}");
        let e = top["error"]
            .as_object()
            .unwrap_or_else(|| panic!("no error object: {self}"));
        assert_eq!(e["code"], code_of(status), "{self}");
        let message = e["message"].as_str().unwrap_or_else(|| panic!("{self}"));
        assert!(!message.is_empty(), "{self}");
        let allowed = if status == 422 { 3 } else { 2 };
        assert_eq!(e.len(), allowed, "unexpected keys in {self}");
        if status == 401 {
            assert_eq!(
                self.headers.get("www-authenticate").map(|v| v.as_bytes()),
                Some(&b"Bearer"[..]),
                "{self}"
            );
        }
        message
    }

    /// Asserts a 422 naming `field`; returns the message.
    #[track_caller]
    pub fn invalid(&self, field: &str) -> &str {
        let message = self.err(422);
        assert_eq!(self.json["error"]["field"], field, "{self}");
        message
    }

    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A running control plane.
pub struct Server {
    pub addr: SocketAddr,
    pub backend: Backend,
    /// The bootstrap admin's token, from `<data dir>/admin-token`.
    pub admin: Auth,
    /// The PostgreSQL database's URL.
    pub database_url: Option<String>,
    /// The default stack created at first start.
    pub stack_id: String,
    /// The server's state (its metrics, its throttles), to look at from the test.
    pub state: AppState,
    pub dir: TempDir,
}

/// A user created through the API, signed in with a token.
#[derive(Debug, Clone)]
pub struct User {
    pub id: String,
    pub username: String,
    pub password: String,
    pub auth: Auth,
}

impl Server {
    /// `tandem serve`'s API on a free port, bootstrapped: admin user, admin token, default stack.
    pub async fn start(backend: Backend) -> Self {
        Self::start_with(backend, ApiConfig::default(), |_| {}).await
    }

    /// [`Self::start`] with `config`, and `setup` to change the state before the server starts
    /// (a coordinator with logs, say).
    pub async fn start_with(
        backend: Backend,
        config: ApiConfig,
        setup: impl FnOnce(&mut AppState),
    ) -> Self {
        let dir = TempDir::new("tandem-it-api");
        let database_url = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(pg_database().await),
        };
        let mut state = serve_cmd::state(dir.path(), database_url.as_deref(), config)
            .await
            .unwrap();
        setup(&mut state);
        let token_path = serve_cmd::bootstrap(&state, dir.path())
            .await
            .unwrap()
            .expect("a fresh store bootstraps");
        assert_eq!(token_path, dir.path().join("admin-token"));
        let token = std::fs::read_to_string(&token_path)
            .unwrap()
            .trim()
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = tandem_controlplane::app(state.clone())
            .into_make_service_with_connect_info::<SocketAddr>();
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        let mut server = Self {
            addr,
            backend,
            admin: Auth::Bearer(token),
            database_url,
            stack_id: String::new(),
            state,
            dir,
        };
        let stacks = server.get("/api/v1/stacks", &server.admin).await;
        let items = stacks.ok(200)["items"].as_array().unwrap();
        assert_eq!(items.len(), 1, "{stacks}");
        server.stack_id = items[0]["id"].as_str().unwrap().to_string();
        server
    }

    /// One request on a new connection.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        auth: &Auth,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Resp {
        http(self.addr, method, path, auth, content_type, body).await
    }

    /// A request with an optional JSON body.
    pub async fn call(&self, method: &str, path: &str, auth: &Auth, body: Option<Value>) -> Resp {
        match body {
            Some(b) => {
                self.request(
                    method,
                    path,
                    auth,
                    Some("application/json"),
                    b.to_string().into_bytes(),
                )
                .await
            }
            None => self.request(method, path, auth, None, Vec::new()).await,
        }
    }

    pub async fn get(&self, path: &str, auth: &Auth) -> Resp {
        self.call("GET", path, auth, None).await
    }

    pub async fn post(&self, path: &str, auth: &Auth, body: Value) -> Resp {
        self.call("POST", path, auth, Some(body)).await
    }

    pub async fn put(&self, path: &str, auth: &Auth, body: Value) -> Resp {
        self.call("PUT", path, auth, Some(body)).await
    }

    pub async fn delete(&self, path: &str, auth: &Auth) -> Resp {
        self.call("DELETE", path, auth, None).await
    }

    /// A second pool on the server's database, to look at what it stores.
    pub async fn db(&self) -> sqlx::AnyPool {
        sqlx::any::install_default_drivers();
        let url = match &self.database_url {
            Some(u) => u.clone(),
            None => format!("sqlite://{}", self.dir.path().join("tandem.db").display()),
        };
        sqlx::any::AnyPoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await
            .unwrap()
    }

    /// Signs in; the `tandem_session=…` cookie pair and the session's form token.
    pub async fn login(&self, username: &str, password: &str) -> Auth {
        let r = self
            .post(
                "/api/v1/auth/login",
                &Auth::Anon,
                json!({ "username": username, "password": password }),
            )
            .await;
        r.ok(200);
        session_of(&r)
    }

    /// A user created by the admin, signed in, with a personal access token.
    pub async fn user(&self, username: &str) -> User {
        let password = format!("pw-{username}-long-enough");
        let r = self
            .post(
                "/api/v1/users",
                &self.admin,
                json!({ "username": username, "password": password }),
            )
            .await;
        let id = r.ok(201)["id"].as_str().unwrap().to_string();
        let session = self.login(username, &password).await;
        let t = self
            .post("/api/v1/user/tokens", &session, json!({ "name": "tests" }))
            .await;
        let token = t.ok(201)["token_value"].as_str().unwrap().to_string();
        User {
            id,
            username: username.to_string(),
            password,
            auth: Auth::Bearer(token),
        }
    }

    /// A team created by `owner` (who becomes its owner); the id.
    pub async fn team(&self, owner: &Auth) -> String {
        let name = unique("Team");
        let r = self
            .post("/api/v1/teams", owner, json!({ "name": name }))
            .await;
        r.ok(201)["id"].as_str().unwrap().to_string()
    }

    /// Adds `user` to `team` as `role`, by `by`.
    pub async fn add_member(&self, by: &Auth, team: &str, user: &User, role: &str) {
        self.post(
            &format!("/api/v1/teams/{team}/members"),
            by,
            json!({ "username": user.username, "role": role }),
        )
        .await
        .ok(201);
    }

    /// An application in `team`; the id.
    pub async fn application(&self, by: &Auth, team: &str) -> String {
        let r = self
            .post(
                "/api/v1/applications",
                by,
                json!({ "team_id": team, "name": unique("App") }),
            )
            .await;
        r.ok(201)["id"].as_str().unwrap().to_string()
    }

    /// An instance on the default stack with `extra` fields; the full answer.
    pub async fn instance(&self, by: &Auth, app: &str, extra: Value) -> Value {
        let mut body = json!({
            "name": unique("inst"),
            "application_id": app,
            "stack_id": self.stack_id,
        });
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let r = self.post("/api/v1/instances", by, body).await;
        r.ok(201).clone()
    }

    /// Follows `next_cursor` from the first page of `path` with `limit`: checks that every page
    /// but the last is full and has the last item's `key` as cursor, and that the last has none.
    /// Returns every item in order.
    pub async fn all_pages(&self, path: &str, auth: &Auth, limit: usize, key: &str) -> Vec<Value> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..1000 {
            let url = match &cursor {
                Some(c) => format!("{path}{sep}limit={limit}&cursor={c}"),
                None => format!("{path}{sep}limit={limit}"),
            };
            let r = self.get(&url, auth).await;
            let page = r.ok(200);
            let got = page["items"].as_array().unwrap();
            assert!(got.len() <= limit, "{r}");
            items.extend(got.iter().cloned());
            match page.get("next_cursor") {
                Some(c) => {
                    assert_eq!(got.len(), limit, "a page with a cursor is full: {r}");
                    assert_eq!(
                        c,
                        &got[limit - 1][key],
                        "the cursor is the last item's {key}: {r}"
                    );
                    cursor = Some(c.as_str().unwrap().to_string());
                }
                None => return items,
            }
        }
        panic!("{path}: more than 1000 pages");
    }
}

/// The `key` of every item.
pub fn keys(items: &[Value], key: &str) -> Vec<String> {
    items
        .iter()
        .map(|i| i[key].as_str().unwrap().to_string())
        .collect()
}

/// The `id` of every item.
pub fn ids(items: &[Value]) -> Vec<String> {
    keys(items, "id")
}

/// A coordinator that runs nothing but keeps logs: log streams have something to follow, and
/// what the control plane notes in an instance's log can be read back.
pub struct LogsOnly(pub std::sync::Arc<tandem_coordinator::logs::LogBook>);

impl tandem_coordinator::status::Coordination for LogsOnly {
    fn status(&self, _instance_id: &str) -> tandem_coordinator::status::ObservedStatus {
        tandem_coordinator::status::ObservedStatus::unknown()
    }

    fn logs(&self) -> Option<std::sync::Arc<tandem_coordinator::logs::LogBook>> {
        Some(self.0.clone())
    }
}
