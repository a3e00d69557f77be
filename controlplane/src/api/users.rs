//! Sign-in, users and personal access tokens.

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{require_admin, Page, PageQuery};
use crate::audit::{self, Subject};
use crate::auth::throttle::ClientAddr;
use crate::auth::{self, Caller, Credential, TOKEN_PREFIX};
use crate::error::{ApiError, ApiResult, Json, Query};
use crate::state::AppState;
use crate::store::{new_id, now_ms};

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(login))
        .routes(routes!(logout))
        .routes(routes!(me))
        .routes(routes!(list_users, create_user))
        .routes(routes!(update_user))
        .routes(routes!(change_password))
        .routes(routes!(list_tokens, create_token))
        .routes(routes!(revoke_token))
}

/// A user as the API shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct User {
    /// Id.
    pub id: String,
    /// Unique sign-in name.
    pub username: String,
    /// Email, if given.
    pub email: Option<String>,
    /// Platform admin.
    pub admin: bool,
    /// Disabled by a platform admin: cannot sign in; its sessions and tokens open nothing.
    pub disabled: bool,
    /// Creation time, epoch ms.
    pub created_at: i64,
}

/// The columns [`user_from`] reads.
const USER_COLUMNS: &str = "id, username, email, admin, created_at, disabled";

fn user_from(row: &sqlx::any::AnyRow) -> User {
    User {
        id: row.get(0),
        username: row.get(1),
        email: row.get(2),
        admin: row.get::<i64, _>(3) != 0,
        created_at: row.get(4),
        disabled: row.get::<i64, _>(5) != 0,
    }
}

/// Sign-in request.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Login {
    /// Username.
    pub username: String,
    /// Password.
    pub password: String,
}

/// Signs in with a password; the answer sets the session cookie (HttpOnly, SameSite=Lax) and
/// carries the session's form token (`X-Tandem-Form-Token`), which every write made with the
/// cookie must send back.
/// Failed sign-ins are limited: 5 a minute per username and 50 a minute per client address,
/// then 429 with `Retry-After` (seconds) for a lockout that doubles each time, up to 15 minutes.
#[utoipa::path(post, path = "/api/v1/auth/login", tag = "auth", request_body = Login,
    responses((status = 200, body = User, headers(("X-Tandem-Form-Token" = String, description = "The new session's form token: every write made with the session cookie sends it back"))), (status = 401, body = crate::error::ErrorBody),
        (status = 429, description = "Too many failed sign-ins for this username or from this address",
            body = crate::error::ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until a sign-in may be tried again")))))]
async fn login(
    State(state): State<AppState>,
    ClientAddr(addr): ClientAddr,
    headers: HeaderMap,
    Json(body): Json<Login>,
) -> ApiResult<Response> {
    // Before anything costs a query or a hash: a refused attempt is cheap, whatever its number.
    if let Err(refused) =
        state
            .login_throttle
            .begin(&body.username, addr, tokio::time::Instant::now())
    {
        let retry_after_secs = refused.retry_after_secs();
        tracing::warn!(
            username = ?body.username.chars().take(64).collect::<String>(),
            address = ?addr,
            retry_after_secs,
            "sign-in refused: too many failures"
        );
        return Err(ApiError::TooManyRequests {
            message: format!(
                "too many failed sign-ins for this username or from this address; try again in {retry_after_secs} s"
            ),
            retry_after_secs,
        });
    }
    let row = sqlx::query(&format!(
        "SELECT {USER_COLUMNS}, password_hash FROM users WHERE username = $1"
    ))
    .bind(&body.username)
    .fetch_optional(&state.store.pool)
    .await?;
    let wrong = || ApiError::Unauthorized("wrong username or password".into());
    let hash: Option<String> = row.as_ref().and_then(|r| r.get(6));
    // Unknown users and users without a password are checked against a dummy hash, so a miss
    // takes as long as a wrong password and usernames cannot be probed by timing.
    if !auth::verify_password_blocking(body.password.clone(), hash).await {
        return Err(wrong());
    }
    let Some(row) = row else {
        return Err(wrong());
    };
    state.login_throttle.succeeded(&body.username, addr);
    let user = user_from(&row);
    // Said only to whoever knows the password.
    if user.disabled {
        return Err(ApiError::Unauthorized(
            "this user is disabled; a platform admin can enable it again".into(),
        ));
    }
    let secret = auth::create_session(&state, &user.id).await?;
    let cookie = format!(
        "{}={secret}; Path=/; HttpOnly; SameSite=Lax; Max-Age={}{}",
        auth::SESSION_COOKIE,
        state.config.session_ttl_ms / 1000,
        cookie_domain(&state, &headers)
    );
    let mut resp = Json(user).into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&cookie).map_err(|e| ApiError::Internal(e.into()))?,
    );
    resp.headers_mut().insert(
        auth::FORM_TOKEN_HEADER,
        HeaderValue::from_str(&auth::form_token(&secret))
            .map_err(|e| ApiError::Internal(e.into()))?,
    );
    Ok(resp)
}

/// `; Domain=<base domain>`, so the session also reaches the instances' editors at
/// `<name>.<base domain>`: only when the API itself is reached under the base domain (browsers
/// drop a cookie for a domain the answering host is not in) and the base domain has a dot
/// (browsers refuse `Domain=localhost`; there the editor takes a bearer token).
fn cookie_domain(state: &AppState, headers: &HeaderMap) -> String {
    let domain = state.config.base_domain.to_ascii_lowercase();
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(|h| {
            h.rsplit_once(':')
                .map_or(h, |(name, _)| name)
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    let under = host == domain || host.ends_with(&format!(".{domain}"));
    if domain.contains('.') && under {
        format!("; Domain={domain}")
    } else {
        String::new()
    }
}

/// Ends the session of the cookie sent (if any) and clears the cookie. From another site's page
/// (a foreign `Origin`) it is refused, as every change made with the cookie is.
#[utoipa::path(post, path = "/api/v1/auth/logout", tag = "auth", responses((status = 204), (status = 403, body = crate::error::ErrorBody)))]
async fn logout(
    State(state): State<AppState>,
    method: Method,
    headers: HeaderMap,
) -> ApiResult<Response> {
    if let Some(session) = auth::session_cookie(&headers) {
        // Logout takes no `Caller`, so it makes the cross-site checks itself.
        auth::refuse_cross_site(&method, &headers)?;
        auth::check_form_token(&method, &headers, session)?;
        sqlx::query("DELETE FROM sessions WHERE hash = $1")
            .bind(auth::hash_secret(session))
            .execute(&state.store.pool)
            .await?;
    }
    let mut resp = StatusCode::NO_CONTENT.into_response();
    let clear = format!(
        "{}=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0{}",
        auth::SESSION_COOKIE,
        cookie_domain(&state, &headers)
    );
    resp.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&clear).map_err(|e| ApiError::Internal(e.into()))?,
    );
    Ok(resp)
}

/// The signed-in user. Signed in with the session cookie, the answer also carries the session's
/// form token in `X-Tandem-Form-Token`, which every write made with the cookie must send back.
#[utoipa::path(get, path = "/api/v1/user", tag = "users", responses((status = 200, body = User,
    headers(("X-Tandem-Form-Token" = String, description = "The session's form token (session cookie only)"))),
    (status = 401, body = crate::error::ErrorBody)))]
async fn me(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let row = sqlx::query(&format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1"))
        .bind(&caller.id)
        .fetch_one(&state.store.pool)
        .await?;
    let mut resp = Json(user_from(&row)).into_response();
    if let (Credential::Session, Some(session)) = (&caller.via, auth::session_cookie(&headers)) {
        resp.headers_mut().insert(
            auth::FORM_TOKEN_HEADER,
            HeaderValue::from_str(&auth::form_token(session))
                .map_err(|e| ApiError::Internal(e.into()))?,
        );
    }
    Ok(resp)
}

/// Every user (platform admins only).
#[utoipa::path(get, path = "/api/v1/users", tag = "users", params(PageQuery),
    responses((status = 200, body = Page<User>), (status = 403, body = crate::error::ErrorBody)))]
async fn list_users(
    State(state): State<AppState>,
    caller: Caller,
    Query(q): Query<PageQuery>,
) -> ApiResult<Json<Page<User>>> {
    require_admin(&caller)?;
    let limit = q.limit()?;
    let rows = sqlx::query(&format!(
        "SELECT {USER_COLUMNS} FROM users WHERE id > $1 ORDER BY id LIMIT $2"
    ))
    .bind(q.after())
    .bind(limit + 1)
    .fetch_all(&state.store.pool)
    .await?;
    Ok(Json(Page::from_overfetch(
        rows.iter().map(user_from).collect(),
        limit,
        |u| u.id.clone(),
    )))
}

/// A new user.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    /// 1 to 64 characters: letters, digits, `.`, `_`, `-`.
    pub username: String,
    /// At least 8 characters.
    pub password: String,
    /// Optional email.
    pub email: Option<String>,
    /// Platform admin; default false.
    #[serde(default)]
    pub admin: bool,
}

/// Checks a username.
pub fn check_username(name: &str) -> ApiResult<()> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "username",
            "use 1 to 64 letters, digits, '.', '_' or '-'",
        ))
    }
}

/// Creates a user (platform admins only).
#[utoipa::path(post, path = "/api/v1/users", tag = "users", request_body = NewUser,
    responses((status = 201, body = User), (status = 403, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
async fn create_user(
    State(state): State<AppState>,
    caller: Caller,
    Json(body): Json<NewUser>,
) -> ApiResult<(StatusCode, Json<User>)> {
    require_admin(&caller)?;
    let user = insert_user(
        &state,
        Some(&caller),
        &body.username,
        Some(&body.password),
        body.email.as_deref(),
        body.admin,
    )
    .await?;
    Ok((StatusCode::CREATED, Json(user)))
}

/// Inserts a user (API and `tandem user create`). `password: None` makes a user that can only
/// use tokens.
pub async fn insert_user(
    state: &AppState,
    caller: Option<&Caller>,
    username: &str,
    password: Option<&str>,
    email: Option<&str>,
    admin: bool,
) -> ApiResult<User> {
    check_username(username)?;
    if let Some(p) = password {
        if p.chars().count() < 8 {
            return Err(ApiError::invalid(
                "password",
                "must be at least 8 characters",
            ));
        }
    }
    if let Some(e) = email {
        if !e.contains('@') || e.len() > 254 {
            return Err(ApiError::invalid("email", "is not an email address"));
        }
    }
    let hash = match password {
        Some(p) => Some(auth::hash_password_blocking(p.to_string()).await?),
        None => None,
    };
    let user = User {
        id: new_id(),
        username: username.to_string(),
        email: email.map(str::to_owned),
        admin,
        disabled: false,
        created_at: now_ms(),
    };
    let mut tx = state.store.write().await?;
    sqlx::query("INSERT INTO users (id, username, email, password_hash, admin, created_at) VALUES ($1, $2, $3, $4, $5, $6)")
        .bind(&user.id)
        .bind(&user.username)
        .bind(user.email.clone())
        .bind(hash)
        .bind(i64::from(admin))
        .bind(user.created_at)
        .execute(&mut *tx)
        .await
        .map_err(ApiError::conflict_as(format!("username {username:?} is taken")))?;
    let subject = Subject::object("user", &user.id);
    audit::record(
        &mut tx,
        caller,
        "user.created",
        subject,
        serde_json::json!({ "username": username, "admin": admin }),
    )
    .await?;
    tx.commit().await?;
    Ok(user)
}

/// Checks a new password: at least 8 characters, at most 1024.
fn check_password(field: &str, password: &str) -> ApiResult<()> {
    let n = password.chars().count();
    if !(8..=1024).contains(&n) {
        return Err(ApiError::invalid(field, "must be 8 to 1024 characters"));
    }
    Ok(())
}

/// Ends every session of `user`.
async fn end_sessions(tx: &mut sqlx::Transaction<'static, sqlx::Any>, user: &str) -> ApiResult<()> {
    sqlx::query("DELETE FROM sessions WHERE user_id = $1")
        .bind(user)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// A password change.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PasswordChange {
    /// The password now.
    pub current: String,
    /// The new one: 8 to 1024 characters.
    pub new: String,
}

/// Changes the caller's own password. Every session of the caller ends (sign in again with the
/// new one); tokens stay. A wrong `current` counts as a failed sign-in. A user without a password
/// yet (the first start's admin, with the token in `<data-dir>/admin-token`) sets its first one:
/// `current` is not checked then.
#[utoipa::path(put, path = "/api/v1/user/password", tag = "users", request_body = PasswordChange,
    responses((status = 204), (status = 401, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody), (status = 429, body = crate::error::ErrorBody)))]
async fn change_password(
    State(state): State<AppState>,
    ClientAddr(addr): ClientAddr,
    caller: Caller,
    Json(body): Json<PasswordChange>,
) -> ApiResult<StatusCode> {
    check_password("new", &body.new)?;
    if let Err(refused) =
        state
            .login_throttle
            .begin(&caller.username, addr, tokio::time::Instant::now())
    {
        let retry_after_secs = refused.retry_after_secs();
        return Err(ApiError::TooManyRequests {
            message: format!("too many wrong passwords; try again in {retry_after_secs} s"),
            retry_after_secs,
        });
    }
    let hash: Option<String> = sqlx::query("SELECT password_hash FROM users WHERE id = $1")
        .bind(&caller.id)
        .fetch_one(&state.store.pool)
        .await?
        .get(0);
    // A user without a password yet (the first start's admin, a user made for tokens) sets its
    // first one with the credential it has: there is no current one to give.
    let first = hash.is_none();
    if !first && !auth::verify_password_blocking(body.current.clone(), hash).await {
        return Err(ApiError::invalid("current", "is not your password"));
    }
    state.login_throttle.succeeded(&caller.username, addr);
    let hash = auth::hash_password_blocking(body.new).await?;
    let mut tx = state.store.write().await?;
    sqlx::query("UPDATE users SET password_hash = $1 WHERE id = $2")
        .bind(hash)
        .bind(&caller.id)
        .execute(&mut *tx)
        .await?;
    end_sessions(&mut tx, &caller.id).await?;
    audit::record(
        &mut tx,
        Some(&caller),
        "user.password-changed",
        Subject::object("user", &caller.id),
        serde_json::json!({ "by": "self", "first": first }),
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A platform admin's change to a user: any of the three.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserChange {
    /// Make or unmake a platform admin.
    pub admin: Option<bool>,
    /// Disable (cannot sign in; sessions end; tokens open nothing) or enable again.
    pub disabled: Option<bool>,
    /// A new password (8 to 1024 characters); the user's sessions end.
    pub password: Option<String>,
}

/// Changes a user (platform admins). The platform keeps at least one enabled admin: a change
/// that would leave none is refused with 409.
#[utoipa::path(put, path = "/api/v1/users/{id}", tag = "users", params(("id" = String, Path, description = "User id")), request_body = UserChange,
    responses((status = 200, body = User), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
async fn update_user(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<UserChange>,
) -> ApiResult<Json<User>> {
    require_admin(&caller)?;
    if let Some(p) = &body.password {
        check_password("password", p)?;
    }
    let hash = match &body.password {
        Some(p) => Some(auth::hash_password_blocking(p.clone()).await?),
        None => None,
    };
    let mut tx = state.store.write().await?;
    let before = sqlx::query(&format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1"))
        .bind(&id)
        .fetch_optional(&mut *tx)
        .await?
        .map(|r| user_from(&r))
        .ok_or_else(|| ApiError::NotFound(format!("no user {id}")))?;
    let admin = body.admin.unwrap_or(before.admin);
    let disabled = body.disabled.unwrap_or(before.disabled);
    if before.admin && !before.disabled && (!admin || disabled) {
        let others: i64 =
            sqlx::query("SELECT COUNT(*) FROM users WHERE admin = 1 AND disabled = 0 AND id <> $1")
                .bind(&id)
                .fetch_one(&mut *tx)
                .await?
                .get(0);
        if others == 0 {
            return Err(ApiError::Conflict(format!(
                "{} is the last enabled platform admin",
                before.username
            )));
        }
    }
    sqlx::query("UPDATE users SET admin = $1, disabled = $2 WHERE id = $3")
        .bind(i64::from(admin))
        .bind(i64::from(disabled))
        .bind(&id)
        .execute(&mut *tx)
        .await?;
    if let Some(hash) = &hash {
        sqlx::query("UPDATE users SET password_hash = $1 WHERE id = $2")
            .bind(hash)
            .bind(&id)
            .execute(&mut *tx)
            .await?;
    }
    if hash.is_some() || (disabled && !before.disabled) {
        end_sessions(&mut tx, &id).await?;
    }
    audit::record(
        &mut tx,
        Some(&caller),
        "user.updated",
        Subject::object("user", &id),
        serde_json::json!({
            "username": before.username,
            "admin": admin,
            "disabled": disabled,
            "password_reset": hash.is_some(),
        }),
    )
    .await?;
    tx.commit().await?;
    Ok(Json(User {
        admin,
        disabled,
        ..before
    }))
}

/// A personal access token, without its secret.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Token {
    /// Id (used to revoke it).
    pub id: String,
    /// Name given at creation.
    pub name: String,
    /// Expiry, epoch ms; none for no expiry.
    pub expires_at: Option<i64>,
    /// Creation time, epoch ms.
    pub created_at: i64,
    /// Last use, epoch ms (updated at most once a minute).
    pub last_used_at: Option<i64>,
}

/// A token just created: the only time its secret is shown.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CreatedToken {
    /// The token.
    #[serde(flatten)]
    pub token: Token,
    /// The secret, `tdm_…`: send it as `Authorization: Bearer <token>`. Not shown again.
    pub token_value: String,
}

/// A new token.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    /// 1 to 100 characters.
    pub name: String,
    /// Expiry, epoch ms, in the future; none for no expiry. A request made with a token that
    /// expires may not outlive it: no expiry then means that token's expiry, and a later one is
    /// refused.
    pub expires_at: Option<i64>,
}

/// The caller's tokens.
#[utoipa::path(get, path = "/api/v1/user/tokens", tag = "users", params(PageQuery), responses((status = 200, body = Page<Token>)))]
async fn list_tokens(
    State(state): State<AppState>,
    caller: Caller,
    Query(q): Query<PageQuery>,
) -> ApiResult<Json<Page<Token>>> {
    let limit = q.limit()?;
    let rows = sqlx::query("SELECT id, name, expires_at, created_at, last_used_at FROM tokens WHERE user_id = $1 AND id > $2 ORDER BY id LIMIT $3")
        .bind(&caller.id)
        .bind(q.after())
        .bind(limit + 1)
        .fetch_all(&state.store.pool)
        .await?;
    let items = rows
        .iter()
        .map(|r| Token {
            id: r.get(0),
            name: r.get(1),
            expires_at: r.get(2),
            created_at: r.get(3),
            last_used_at: r.get(4),
        })
        .collect();
    Ok(Json(Page::from_overfetch(items, limit, |t| t.id.clone())))
}

/// Creates a token for the caller; the answer holds its secret, once.
#[utoipa::path(post, path = "/api/v1/user/tokens", tag = "users", request_body = NewToken,
    responses((status = 201, body = CreatedToken), (status = 422, body = crate::error::ErrorBody)))]
async fn create_token(
    State(state): State<AppState>,
    caller: Caller,
    Json(body): Json<NewToken>,
) -> ApiResult<(StatusCode, Json<CreatedToken>)> {
    super::check_display_name("name", &body.name)?;
    if body.expires_at.is_some_and(|e| e <= now_ms()) {
        return Err(ApiError::invalid(
            "expires_at",
            "must be in the future (epoch milliseconds)",
        ));
    }
    let expires_at = capped_expiry(&caller, body.expires_at)?;
    let created = issue_token(&state, &caller, &body.name, expires_at).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

/// The expiry a new token gets: a token may not outlive the token it is made with, or a leaked
/// short-lived token could mint itself a permanent one. A caller signed in with the password
/// (the session cookie) is not limited: whoever has the password can sign in again anyway.
fn capped_expiry(caller: &Caller, asked: Option<i64>) -> ApiResult<Option<i64>> {
    let Credential::Token {
        expires_at: Some(limit),
        ..
    } = caller.via
    else {
        return Ok(asked);
    };
    match asked {
        None => Ok(Some(limit)),
        Some(e) if e <= limit => Ok(Some(e)),
        Some(e) => Err(ApiError::invalid(
            "expires_at",
            format!(
                "{e} is later than {limit}, when the token this request is made with expires; a token may not outlive the token that creates it. Ask for {limit} or earlier, leave expires_at out to get {limit}, or sign in with the password to create a longer-lived token"
            ),
        )),
    }
}

/// Issues a token for `caller` (API and first-start bootstrap).
pub async fn issue_token(
    state: &AppState,
    caller: &Caller,
    name: &str,
    expires_at: Option<i64>,
) -> ApiResult<CreatedToken> {
    let value = format!("{TOKEN_PREFIX}{}", auth::random_secret()?);
    let token = Token {
        id: new_id(),
        name: name.to_string(),
        expires_at,
        created_at: now_ms(),
        last_used_at: None,
    };
    let mut tx = state.store.write().await?;
    sqlx::query("INSERT INTO tokens (id, user_id, name, hash, expires_at, created_at) VALUES ($1, $2, $3, $4, $5, $6)")
        .bind(&token.id)
        .bind(&caller.id)
        .bind(&token.name)
        .bind(auth::hash_secret(&value))
        .bind(token.expires_at)
        .bind(token.created_at)
        .execute(&mut *tx)
        .await?;
    let subject = Subject::object("token", &token.id);
    audit::record(
        &mut tx,
        Some(caller),
        "token.created",
        subject,
        serde_json::json!({ "name": name, "expires_at": expires_at }),
    )
    .await?;
    tx.commit().await?;
    Ok(CreatedToken {
        token,
        token_value: value,
    })
}

/// Revokes one of the caller's tokens.
#[utoipa::path(delete, path = "/api/v1/user/tokens/{id}", tag = "users", params(("id" = String, Path, description = "Token id")),
    responses((status = 204), (status = 404, body = crate::error::ErrorBody)))]
async fn revoke_token(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let mut tx = state.store.write().await?;
    let done = sqlx::query("DELETE FROM tokens WHERE id = $1 AND user_id = $2")
        .bind(&id)
        .bind(&caller.id)
        .execute(&mut *tx)
        .await?;
    if done.rows_affected() == 0 {
        return Err(ApiError::NotFound(format!("you have no token {id}")));
    }
    let subject = Subject::object("token", &id);
    audit::record(
        &mut tx,
        Some(&caller),
        "token.revoked",
        subject,
        serde_json::json!({}),
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}
