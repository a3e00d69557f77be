//! Who is calling: passwords, personal access tokens, sessions, and the [`Caller`] extractor.
//!
//! Secrets are stored only as hashes: passwords with argon2id, tokens and session ids (which are
//! 256 random bits, so a fast hash is enough) with SHA-256.
//!
//! Password hashes and checks run on blocking threads, at most one per core at a time
//! ([`password_work`]): each takes argon2's memory (19 MiB) and tens of milliseconds of CPU, and
//! unbounded, 100 concurrent wrong sign-ins took the process to 2 GB. Failed sign-ins are limited
//! per username and per address by [`throttle`].
//!
//! The session cookie goes with every request a browser makes to the API, whichever site asked
//! for it, so a request that changes something with the cookie alone must come from the API's own
//! origin ([`cross_site`]); the proxy applies the same rule to instances' editors. It must also
//! carry the session's form token ([`FORM_TOKEN_HEADER`], [`form_token`]), which only a page of
//! the API's own origin can learn: the console reads it from the sign-in answer or `GET /user`.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use argon2::Argon2;
use axum::extract::FromRequestParts;
use http::request::Parts;
use sha2::{Digest, Sha256};
use sqlx::Row;
use tokio::sync::Semaphore;

use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use crate::store::{hex, now_ms};

pub mod throttle;

/// The token prefix (`tdm_`, easy to spot in logs and secret scanners) and the session
/// cookie's name have one owner, the proxy's credential parser, which strips what the API
/// accepts.
pub use tandem_proxy::credentials::{SESSION_COOKIE, TOKEN_PREFIX};

/// The authenticated user of a request.
#[derive(Debug, Clone)]
pub struct Caller {
    /// User id.
    pub id: String,
    /// Username.
    pub username: String,
    /// Platform admin.
    pub admin: bool,
    /// How the caller proved who they are.
    pub via: Credential,
}

/// The credential a [`Caller`] authenticated with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// A personal access token.
    Token {
        /// The token's id.
        id: String,
        /// Its expiry, epoch ms; `None` for none.
        expires_at: Option<i64>,
    },
    /// The session cookie of a sign-in with the password.
    Session,
    /// Tandem itself, outside any request (the first-start bootstrap).
    Internal,
}

/// Hashes a password with argon2id and a random salt.
pub fn hash_password(password: &str) -> anyhow::Result<String> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| anyhow::anyhow!("{e}"))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| anyhow::anyhow!("cannot hash password: {e}"))
}

/// Checks `password` against a stored argon2 hash.
pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

/// [`hash_password`] off the async workers, within the [`password_work`] bound.
pub async fn hash_password_blocking(password: String) -> anyhow::Result<String> {
    run_password_work(move || hash_password(&password)).await?
}

/// Checks `password` against `hash` off the async workers, within the [`password_work`] bound;
/// with no hash (a user that only uses tokens, or no such user) it checks against a dummy hash,
/// so every miss costs the same time.
pub async fn verify_password_blocking(password: String, hash: Option<String>) -> bool {
    static DUMMY: OnceLock<String> = OnceLock::new();
    run_password_work(move || {
        let dummy = DUMMY.get_or_init(|| hash_password("no password").unwrap_or_default());
        let ok = verify_password(&password, hash.as_deref().unwrap_or(dummy));
        ok && hash.is_some()
    })
    .await
    .unwrap_or(false)
}

/// The password hashes and checks of the process: how many may run at once, how many do, and
/// the most that ever did.
#[derive(Debug)]
pub struct PasswordWork {
    permits: Semaphore,
    limit: usize,
    running: AtomicUsize,
    peak: AtomicUsize,
}

impl PasswordWork {
    /// How many may run at once: the number of cores.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// How many run now.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

    /// The most that ever ran at once in this process.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }
}

/// The process's [`PasswordWork`]. One for the process, not per server: the cores and the memory
/// it shares out are the process's.
pub fn password_work() -> &'static PasswordWork {
    static WORK: OnceLock<PasswordWork> = OnceLock::new();
    WORK.get_or_init(|| {
        let limit = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
        PasswordWork {
            permits: Semaphore::new(limit),
            limit,
            running: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
        }
    })
}

/// Runs `f` on a blocking thread once a [`password_work`] permit is free.
async fn run_password_work<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    let work = password_work();
    let permit = work.permits.acquire().await?;
    let out = tokio::task::spawn_blocking(move || {
        // The permit moves into the thread: if the request that asked goes away, argon2 still
        // runs to the end, and its permit must stay taken until then.
        let _permit = permit;
        let _running = Running::start(work);
        f()
    })
    .await?;
    Ok(out)
}

/// Counts one running password job for [`PasswordWork::running`] and `peak`, until dropped.
struct Running(&'static PasswordWork);

impl Running {
    fn start(work: &'static PasswordWork) -> Self {
        let now = work.running.fetch_add(1, Ordering::SeqCst) + 1;
        work.peak.fetch_max(now, Ordering::SeqCst);
        Self(work)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Opens a session of `user_id` for the API's session lifetime (`session_ttl_ms`): stores the
/// hash of a new random secret and returns the secret, the session cookie's value. The one
/// place sessions are made: a sign-in with the password, and an editor ticket exchanged on an
/// instance's host (`api::editor_tickets`).
pub async fn create_session(state: &AppState, user_id: &str) -> ApiResult<String> {
    let secret = random_secret()?;
    let now = now_ms();
    // Sessions that ended are swept here rather than by a timer: sessions are opened rarely.
    sqlx::query("DELETE FROM sessions WHERE expires_at <= $1")
        .bind(now)
        .execute(&state.store.pool)
        .await?;
    sqlx::query("INSERT INTO sessions (hash, user_id, expires_at) VALUES ($1, $2, $3)")
        .bind(hash_secret(&secret))
        .bind(user_id)
        .bind(now + state.config.session_ttl_ms)
        .execute(&state.store.pool)
        .await?;
    Ok(secret)
}

/// A new random secret: 32 bytes as hex.
pub fn random_secret() -> anyhow::Result<String> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    Ok(hex(&b))
}

/// SHA-256 of a token or session id, as hex: what the store keeps.
pub fn hash_secret(secret: &str) -> String {
    hex(&Sha256::digest(secret.as_bytes()))
}

/// The header that carries a session's form token on every write made with the session cookie.
pub const FORM_TOKEN_HEADER: &str = "x-tandem-form-token";

/// The form token of a session: derived from the session's secret, so it needs no storage and
/// ends with the session. Another site can make a browser send the cookie but cannot read an
/// answer of the API (no CORS), so it cannot learn this. The store keeps `hash_secret` of the
/// session id, from which this cannot be derived.
pub fn form_token(session_secret: &str) -> String {
    hex(&Sha256::digest(
        format!("tandem form token\0{session_secret}").as_bytes(),
    ))
}

/// 403 for a write made with the session cookie without the session's form token.
pub fn check_form_token(
    method: &http::Method,
    headers: &http::HeaderMap,
    session_secret: &str,
) -> ApiResult<()> {
    if matches!(
        *method,
        http::Method::GET | http::Method::HEAD | http::Method::OPTIONS
    ) {
        return Ok(());
    }
    let given = headers.get(FORM_TOKEN_HEADER).and_then(|v| v.to_str().ok());
    // Compared as hashes, so the time taken says nothing about how much of a guess was right.
    match given {
        Some(given) if hash_secret(given) == hash_secret(&form_token(session_secret)) => Ok(()),
        Some(_) => Err(ApiError::Forbidden(format!(
            "refused: {FORM_TOKEN_HEADER} is not this session's form token; reload the console"
        ))),
        None => Err(ApiError::Forbidden(format!(
            "refused: a change made with the session cookie needs the session's form token in \
             {FORM_TOKEN_HEADER} (the console sends it; it comes with the sign-in answer and \
             GET /api/v1/user). Tools send Authorization: Bearer <token> instead"
        ))),
    }
}

/// The request's bearer token. The proxy's parser, so that every form the API accepts is one the
/// proxy strips before a flow sees it.
fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    tandem_proxy::credentials::bearer(headers)
}

/// The session cookie's value, if the request has one.
pub fn session_cookie(headers: &http::HeaderMap) -> Option<&str> {
    // The proxy's parser: what the API accepts is what the proxy strips.
    tandem_proxy::credentials::session_cookie(headers)
}

/// Why a request looks cross-site, by [`cross_site`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CrossSite {
    /// `Origin` names another origin than the `Host` the request went to.
    Origin(String),
    /// No `Origin`, and `Sec-Fetch-Site` is not `same-origin` (its value).
    FetchSite(String),
}

/// Whether a request authenticated by the session cookie alone looks cross-site: it changes
/// something (not GET, HEAD or OPTIONS, or it opens a WebSocket) and it does not come from the
/// origin it is sent to. Same origin means an `Origin` whose host and port equal `Host`, or,
/// without `Origin`, `Sec-Fetch-Site: same-origin` or no `Sec-Fetch-Site` at all: browsers send
/// one of the two with every such request, and clients that are not browsers send neither (and
/// cannot be made to send a user's cookie by another site). Requests with a bearer token are
/// never cross-site: browsers do not attach one on their own.
///
/// The one rule for both the API ([`Caller`]) and instances' editors (`editor_gate`).
pub fn cross_site(method: &http::Method, headers: &http::HeaderMap) -> Option<CrossSite> {
    // Exactly when `Caller::from_headers` uses the token rather than the cookie.
    let bearer = bearer(headers).is_some();
    let changes = !matches!(
        *method,
        http::Method::GET | http::Method::HEAD | http::Method::OPTIONS
    ) || headers.contains_key(http::header::UPGRADE);
    if bearer || !changes {
        return None;
    }
    let host = headers
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if let Some(origin) = headers
        .get(http::header::ORIGIN)
        .and_then(|v| v.to_str().ok())
    {
        let same = origin
            .split_once("://")
            .is_some_and(|(_, o)| o.eq_ignore_ascii_case(host));
        return (!same).then(|| CrossSite::Origin(origin.to_owned()));
    }
    match headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        Some("same-origin") | None => None,
        Some(other) => Some(CrossSite::FetchSite(other.to_owned())),
    }
}

/// 403 for an API request that changes something with the session cookie from another site.
pub fn refuse_cross_site(method: &http::Method, headers: &http::HeaderMap) -> ApiResult<()> {
    let from = match cross_site(method, headers) {
        None => return Ok(()),
        Some(CrossSite::Origin(origin)) => format!("a request from {origin}"),
        Some(CrossSite::FetchSite(site)) => format!("a {site} request (Sec-Fetch-Site)"),
    };
    Err(ApiError::Forbidden(format!(
        "refused: {from} cannot change anything through the API with your session cookie; \
         such requests must come from the API's own origin. Other sites and tools send \
         Authorization: Bearer <token> instead"
    )))
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let caller = Self::from_headers(&parts.headers, state).await?;
        // Only the cookie comes along on its own when another site makes the browser call us;
        // every route takes its caller from here, so every write gets the check.
        if caller.via == Credential::Session {
            refuse_cross_site(&parts.method, &parts.headers)?;
            if let Some(session) = session_cookie(&parts.headers) {
                check_form_token(&parts.method, &parts.headers, session)?;
            }
        }
        Ok(caller)
    }
}

impl Caller {
    /// The user a request's bearer token or session cookie names.
    pub async fn from_headers(headers: &http::HeaderMap, state: &AppState) -> ApiResult<Self> {
        let now = now_ms();
        if let Some(token) = bearer(headers) {
            let row = sqlx::query(
                "SELECT u.id, u.username, u.admin, t.expires_at, t.id, t.last_used_at, u.disabled FROM tokens t JOIN users u ON u.id = t.user_id WHERE t.hash = $1",
            )
            .bind(hash_secret(token))
            .fetch_optional(&state.store.pool)
            .await?;
            let Some(row) = row else {
                return Err(ApiError::Unauthorized(
                    "the bearer token is not valid (revoked, or never issued)".into(),
                ));
            };
            if row.get::<i64, _>(6) != 0 {
                return Err(ApiError::Unauthorized(
                    "the token's user is disabled".into(),
                ));
            }
            let expires: Option<i64> = row.get(3);
            if expires.is_some_and(|e| e <= now) {
                return Err(ApiError::Unauthorized(
                    "the bearer token has expired".into(),
                ));
            }
            // Record use at most once a minute: a write per request would cost more than the call.
            let last: Option<i64> = row.get(5);
            if last.is_none_or(|l| now - l > 60_000) {
                let id: String = row.get(4);
                sqlx::query("UPDATE tokens SET last_used_at = $1 WHERE id = $2")
                    .bind(now)
                    .bind(id)
                    .execute(&state.store.pool)
                    .await?;
            }
            return Ok(Caller {
                id: row.get(0),
                username: row.get(1),
                admin: row.get::<i64, _>(2) != 0,
                via: Credential::Token {
                    id: row.get(4),
                    expires_at: expires,
                },
            });
        }
        if let Some(session) = session_cookie(headers) {
            let row = sqlx::query(
                "SELECT u.id, u.username, u.admin FROM sessions s JOIN users u ON u.id = s.user_id WHERE s.hash = $1 AND s.expires_at > $2 AND u.disabled = 0",
            )
            .bind(hash_secret(session))
            .bind(now)
            .fetch_optional(&state.store.pool)
            .await?;
            return match row {
                Some(row) => Ok(Caller {
                    id: row.get(0),
                    username: row.get(1),
                    admin: row.get::<i64, _>(2) != 0,
                    via: Credential::Session,
                }),
                None => Err(ApiError::Unauthorized(
                    "the session has ended; sign in again".into(),
                )),
            };
        }
        Err(ApiError::Unauthorized(
            "sign in (POST /api/v1/auth/login) or send Authorization: Bearer <token>".into(),
        ))
    }
}
