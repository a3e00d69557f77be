//! Access control for an instance's flows' HTTP endpoints (issue 16): its mode and its bearer
//! tokens. The proxy enforces them ([`crate::http_auth`]); every change here republishes the
//! routes (`state.coordinator.changed()`), so a mode or a revocation reaches every proxy.
//!
//! - `GET,PUT /api/v1/instances/{id}/http-auth` (`{mode}`): viewers read, owners set.
//! - `GET,POST /api/v1/instances/{id}/http-tokens`, `DELETE .../http-tokens/{token_id}`:
//!   viewers list, owners create and revoke. A token's value (`tdh_…`) is shown once, at
//!   creation; the store keeps its SHA-256.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::Row;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::instances::load_for;
use super::{check_display_name, Page, PageQuery};
use crate::audit::{self, Subject};
use crate::auth::{self, Caller};
use crate::error::{ApiError, ApiResult, Json, Query};
use crate::http_auth::{HttpAuthMode, HTTP_TOKEN_PREFIX};
use crate::roles::Action;
use crate::state::AppState;
use crate::store::{new_id, now_ms};

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(get_http_auth, put_http_auth))
        .routes(routes!(list_http_tokens, create_http_token))
        .routes(routes!(delete_http_token))
}

/// Who may call an instance's HTTP endpoints.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpAuth {
    /// `none` (open), `tokens` (`Authorization: Bearer <an HTTP token of the instance>`) or
    /// `members` (signed-in members of the instance's team, viewers included).
    #[schema(value_type = String, example = "tokens")]
    pub mode: HttpAuthMode,
}

/// An instance's HTTP token, without its value.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct HttpToken {
    /// Id (used to revoke it).
    pub id: String,
    /// Name given at creation.
    pub name: String,
    /// Expiry, epoch ms; none for no expiry.
    pub expires_at: Option<i64>,
    /// Creation time, epoch ms.
    pub created_at: i64,
    /// Last use, epoch ms (recorded at most once a minute).
    pub last_used_at: Option<i64>,
}

/// An HTTP token just created: the only time its value is shown.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CreatedHttpToken {
    /// Id (used to revoke it).
    pub id: String,
    /// Name given at creation.
    pub name: String,
    /// The value, `tdh_…`: send it as `Authorization: Bearer <token>` to the instance's host.
    /// Not shown again.
    pub token_value: String,
    /// Expiry, epoch ms; none for no expiry.
    pub expires_at: Option<i64>,
    /// Creation time, epoch ms.
    pub created_at: i64,
}

/// A new HTTP token.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewHttpToken {
    /// What it is for, 1 to 100 characters.
    pub name: String,
    /// Expiry, epoch ms, in the future; none for no expiry.
    pub expires_at: Option<i64>,
}

/// Who may call the instance's HTTP endpoints (viewers).
#[utoipa::path(get, path = "/api/v1/instances/{id}/http-auth", tag = "instances", params(("id" = String, Path, description = "Instance id")),
    responses((status = 200, body = HttpAuth), (status = 404, body = crate::error::ErrorBody)))]
async fn get_http_auth(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<HttpAuth>> {
    let i = load_for(&state, &caller, &id, Action::Read).await?;
    Ok(Json(HttpAuth { mode: i.http_auth }))
}

/// Sets who may call the instance's HTTP endpoints (owners). `/admin` keeps its own rules.
#[utoipa::path(put, path = "/api/v1/instances/{id}/http-auth", tag = "instances", params(("id" = String, Path, description = "Instance id")), request_body = HttpAuth,
    responses((status = 200, body = HttpAuth), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
async fn put_http_auth(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<HttpAuth>,
) -> ApiResult<Json<HttpAuth>> {
    let before = load_for(&state, &caller, &id, Action::ManageHttpAuth).await?;
    if before.http_auth != body.mode {
        let mut tx = state.store.write().await?;
        sqlx::query("UPDATE instances SET http_auth = $1, updated_at = $2 WHERE id = $3")
            .bind(body.mode.as_str())
            .bind(now_ms())
            .bind(&id)
            .execute(&mut *tx)
            .await?;
        audit::record(
            &mut tx,
            Some(&caller),
            "instance.http-auth",
            Subject::instance(&before.team_id, &id),
            json!({ "before": before.http_auth, "after": body.mode }),
        )
        .await?;
        tx.commit().await?;
        state.coordinator.changed();
    }
    Ok(Json(body))
}

/// The instance's HTTP tokens, without their values (viewers).
#[utoipa::path(get, path = "/api/v1/instances/{id}/http-tokens", tag = "instances", params(("id" = String, Path, description = "Instance id"), PageQuery),
    responses((status = 200, body = Page<HttpToken>), (status = 404, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
async fn list_http_tokens(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<PageQuery>,
) -> ApiResult<Json<Page<HttpToken>>> {
    load_for(&state, &caller, &id, Action::Read).await?;
    let limit = q.limit()?;
    let rows = sqlx::query(
        "SELECT id, name, expires_at, created_at, last_used_at FROM http_tokens WHERE instance_id = $1 AND id > $2 ORDER BY id LIMIT $3",
    )
    .bind(&id)
    .bind(q.after())
    .bind(limit + 1)
    .fetch_all(&state.store.pool)
    .await?;
    let items = rows
        .iter()
        .map(|r| HttpToken {
            id: r.get(0),
            name: r.get(1),
            expires_at: r.get(2),
            created_at: r.get(3),
            last_used_at: r.get(4),
        })
        .collect();
    Ok(Json(Page::from_overfetch(items, limit, |t| t.id.clone())))
}

/// Creates an HTTP token for the instance (owners); the answer holds its value, once.
#[utoipa::path(post, path = "/api/v1/instances/{id}/http-tokens", tag = "instances", params(("id" = String, Path, description = "Instance id")), request_body = NewHttpToken,
    responses((status = 201, body = CreatedHttpToken), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
async fn create_http_token(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<NewHttpToken>,
) -> ApiResult<(StatusCode, Json<CreatedHttpToken>)> {
    let instance = load_for(&state, &caller, &id, Action::ManageHttpAuth).await?;
    check_display_name("name", &body.name)?;
    let now = now_ms();
    if body.expires_at.is_some_and(|e| e <= now) {
        return Err(ApiError::invalid(
            "expires_at",
            "must be in the future (epoch milliseconds), or left out for no expiry",
        ));
    }
    let t = CreatedHttpToken {
        id: new_id(),
        name: body.name,
        token_value: format!("{HTTP_TOKEN_PREFIX}{}", auth::random_secret()?),
        expires_at: body.expires_at,
        created_at: now,
    };
    let mut tx = state.store.write().await?;
    sqlx::query(
        "INSERT INTO http_tokens (id, instance_id, name, hash, created_at, expires_at, created_by) VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&t.id)
    .bind(&id)
    .bind(&t.name)
    .bind(auth::hash_secret(&t.token_value))
    .bind(t.created_at)
    .bind(t.expires_at)
    .bind(&caller.id)
    .execute(&mut *tx)
    .await?;
    audit::record(
        &mut tx,
        Some(&caller),
        "http-token.created",
        Subject::of_instance(&instance.team_id, &id, "http-token", &t.id),
        json!({ "name": t.name, "expires_at": t.expires_at }),
    )
    .await?;
    tx.commit().await?;
    state.coordinator.changed();
    Ok((StatusCode::CREATED, Json(t)))
}

/// Revokes one of the instance's HTTP tokens (owners).
#[utoipa::path(delete, path = "/api/v1/instances/{id}/http-tokens/{token_id}", tag = "instances",
    params(("id" = String, Path, description = "Instance id"), ("token_id" = String, Path, description = "HTTP token id")),
    responses((status = 204), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
async fn delete_http_token(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, token_id)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let instance = load_for(&state, &caller, &id, Action::ManageHttpAuth).await?;
    let mut tx = state.store.write().await?;
    let done = sqlx::query("DELETE FROM http_tokens WHERE id = $1 AND instance_id = $2")
        .bind(&token_id)
        .bind(&id)
        .execute(&mut *tx)
        .await?;
    if done.rows_affected() == 0 {
        return Err(ApiError::NotFound(format!(
            "instance {} has no HTTP token {token_id}",
            instance.name
        )));
    }
    audit::record(
        &mut tx,
        Some(&caller),
        "http-token.revoked",
        Subject::of_instance(&instance.team_id, &id, "http-token", &token_id),
        json!({}),
    )
    .await?;
    tx.commit().await?;
    state.coordinator.changed();
    Ok(StatusCode::NO_CONTENT)
}
