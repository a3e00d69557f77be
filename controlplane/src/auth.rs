//! Who is calling: passwords, personal access tokens, sessions, and the [`Caller`] extractor.
//!
//! Secrets are stored only as hashes: passwords with argon2id, tokens and session ids (which are
//! 256 random bits, so a fast hash is enough) with SHA-256.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use axum::extract::FromRequestParts;
use http::request::Parts;
use sha2::{Digest, Sha256};
use sqlx::Row;

use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use crate::store::{hex, now_ms};

/// Prefix of personal access tokens, so they are easy to spot in logs and secret scanners.
pub const TOKEN_PREFIX: &str = "tdm_";

/// Name of the session cookie.
pub const SESSION_COOKIE: &str = "tandem_session";

/// The authenticated user of a request.
#[derive(Debug, Clone)]
pub struct Caller {
    /// User id.
    pub id: String,
    /// Username.
    pub username: String,
    /// Platform admin.
    pub admin: bool,
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

/// [`hash_password`] off the async workers: argon2 takes tens of milliseconds of CPU.
pub async fn hash_password_blocking(password: String) -> anyhow::Result<String> {
    tokio::task::spawn_blocking(move || hash_password(&password)).await?
}

/// Checks `password` against `hash` off the async workers; with no hash (a user that only uses
/// tokens, or no such user) it checks against a dummy hash, so every miss costs the same time.
pub async fn verify_password_blocking(password: String, hash: Option<String>) -> bool {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    tokio::task::spawn_blocking(move || {
        let dummy = DUMMY.get_or_init(|| hash_password("no password").unwrap_or_default());
        let ok = verify_password(&password, hash.as_deref().unwrap_or(dummy));
        ok && hash.is_some()
    })
    .await
    .unwrap_or(false)
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

fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    let v = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The session cookie's value, if the request has one.
pub fn session_cookie(headers: &http::HeaderMap) -> Option<&str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|p| p.trim().split_once('='))
        .find(|(k, _)| *k == SESSION_COOKIE)
        .map(|(_, v)| v)
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        Self::from_headers(&parts.headers, state).await
    }
}

impl Caller {
    /// The user a request's bearer token or session cookie names.
    pub async fn from_headers(headers: &http::HeaderMap, state: &AppState) -> ApiResult<Self> {
        let now = now_ms();
        if let Some(token) = bearer(headers) {
            let row = sqlx::query(
                "SELECT u.id, u.username, u.admin, t.expires_at, t.id, t.last_used_at FROM tokens t JOIN users u ON u.id = t.user_id WHERE t.hash = $1",
            )
            .bind(hash_secret(token))
            .fetch_optional(&state.store.pool)
            .await?;
            let Some(row) = row else {
                return Err(ApiError::Unauthorized(
                    "the bearer token is not valid (revoked, or never issued)".into(),
                ));
            };
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
            });
        }
        if let Some(session) = session_cookie(headers) {
            let row = sqlx::query(
                "SELECT u.id, u.username, u.admin FROM sessions s JOIN users u ON u.id = s.user_id WHERE s.hash = $1 AND s.expires_at > $2",
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
