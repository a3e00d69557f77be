//! Stacks: which Node-RED (and Node.js) version an instance runs, and its memory limit.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::Row;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{require_admin, Page, PageQuery};
use crate::audit::{self, Subject};
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult, Json, Query};
use crate::state::AppState;
use crate::store::{new_id, now_ms};

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_stacks, create_stack))
        .routes(routes!(get_stack, update_stack, delete_stack))
}

/// A stack.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Stack {
    /// Id.
    pub id: String,
    /// Unique name (a-z, 0-9, '.', '-').
    pub name: String,
    /// Node-RED version, e.g. `4.1.2`.
    pub nodered_version: String,
    /// Node.js version, when the stack needs a specific one.
    pub node_version: Option<String>,
    /// Memory limit per replica, MiB.
    pub memory_mb: i64,
    /// The stack that replaces this one, if any.
    pub replaced_by: Option<String>,
    /// Creation time, epoch ms.
    pub created_at: i64,
}

/// A new stack, or a full replacement of one.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StackBody {
    /// Unique name.
    pub name: String,
    /// Node-RED version (x.y.z).
    pub nodered_version: String,
    /// Node.js version (major, or x.y.z).
    pub node_version: Option<String>,
    /// Memory limit per replica, 128 to 65536 MiB; default 512.
    pub memory_mb: Option<i64>,
    /// Id of the stack that replaces this one.
    pub replaced_by: Option<String>,
}

fn from_row(r: &sqlx::any::AnyRow) -> Stack {
    Stack {
        id: r.get(0),
        name: r.get(1),
        nodered_version: r.get(2),
        node_version: r.get(3),
        memory_mb: r.get(4),
        replaced_by: r.get(5),
        created_at: r.get(6),
    }
}

const COLUMNS: &str = "id, name, nodered_version, node_version, memory_mb, replaced_by, created_at";

/// `1.2.3` or `1.2.3-beta.1`.
fn is_version(v: &str, parts: std::ops::RangeInclusive<usize>) -> bool {
    let (core, pre) = v.split_once('-').unwrap_or((v, ""));
    let nums: Vec<&str> = core.split('.').collect();
    parts.contains(&nums.len())
        && nums
            .iter()
            .all(|n| !n.is_empty() && n.len() <= 6 && n.bytes().all(|b| b.is_ascii_digit()))
        && pre
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        && v.len() <= 40
}

async fn validate(state: &AppState, body: &StackBody, own_id: Option<&str>) -> ApiResult<()> {
    let name_ok = (1..=63).contains(&body.name.len())
        && body
            .name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
    if !name_ok {
        return Err(ApiError::invalid(
            "name",
            "use 1 to 63 of a-z, 0-9, '.' and '-'",
        ));
    }
    if !is_version(&body.nodered_version, 3..=3) {
        return Err(ApiError::invalid(
            "nodered_version",
            "must be a version such as 4.1.2",
        ));
    }
    if let Some(v) = &body.node_version {
        if !is_version(v, 1..=3) {
            return Err(ApiError::invalid(
                "node_version",
                "must be a version such as 22 or 22.9.0",
            ));
        }
    }
    if let Some(m) = body.memory_mb {
        if !(128..=65536).contains(&m) {
            return Err(ApiError::invalid("memory_mb", "must be from 128 to 65536"));
        }
    }
    if let Some(r) = &body.replaced_by {
        if Some(r.as_str()) == own_id {
            return Err(ApiError::invalid(
                "replaced_by",
                "a stack cannot replace itself",
            ));
        }
        load(state, r)
            .await
            .map_err(|_| ApiError::invalid("replaced_by", format!("no stack {r}")))?;
    }
    Ok(())
}

/// Loads a stack; 404 when unknown.
pub async fn load(state: &AppState, id: &str) -> ApiResult<Stack> {
    let row = sqlx::query(&format!("SELECT {COLUMNS} FROM stacks WHERE id = $1"))
        .bind(id)
        .fetch_optional(&state.store.pool)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no stack {id}")))?;
    Ok(from_row(&row))
}

/// Every stack.
#[utoipa::path(get, path = "/api/v1/stacks", tag = "stacks", params(PageQuery), responses((status = 200, body = Page<Stack>)))]
async fn list_stacks(
    State(state): State<AppState>,
    _caller: Caller,
    Query(q): Query<PageQuery>,
) -> ApiResult<Json<Page<Stack>>> {
    let limit = q.limit()?;
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM stacks WHERE id > $1 ORDER BY id LIMIT $2"
    ))
    .bind(q.after())
    .bind(limit + 1)
    .fetch_all(&state.store.pool)
    .await?;
    Ok(Json(Page::from_overfetch(
        rows.iter().map(from_row).collect(),
        limit,
        |s| s.id.clone(),
    )))
}

/// Creates a stack (platform admins).
#[utoipa::path(post, path = "/api/v1/stacks", tag = "stacks", request_body = StackBody,
    responses((status = 201, body = Stack), (status = 403, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
async fn create_stack(
    State(state): State<AppState>,
    caller: Caller,
    Json(body): Json<StackBody>,
) -> ApiResult<(StatusCode, Json<Stack>)> {
    require_admin(&caller)?;
    let stack = insert(&state, Some(&caller), body).await?;
    Ok((StatusCode::CREATED, Json(stack)))
}

/// Inserts a stack (API and the default stack at first start).
pub async fn insert(
    state: &AppState,
    caller: Option<&Caller>,
    body: StackBody,
) -> ApiResult<Stack> {
    validate(state, &body, None).await?;
    let stack = Stack {
        id: new_id(),
        name: body.name,
        nodered_version: body.nodered_version,
        node_version: body.node_version,
        memory_mb: body.memory_mb.unwrap_or(512),
        replaced_by: body.replaced_by,
        created_at: now_ms(),
    };
    let mut tx = state.store.write().await?;
    sqlx::query(&format!(
        "INSERT INTO stacks ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"
    ))
    .bind(&stack.id)
    .bind(&stack.name)
    .bind(&stack.nodered_version)
    .bind(stack.node_version.clone())
    .bind(stack.memory_mb)
    .bind(stack.replaced_by.clone())
    .bind(stack.created_at)
    .execute(&mut *tx)
    .await
    .map_err(ApiError::conflict_as(format!(
        "a stack named {:?} exists",
        stack.name
    )))?;
    let subject = Subject::object("stack", &stack.id);
    audit::record(
        &mut tx,
        caller,
        "stack.created",
        subject,
        json!({ "name": stack.name, "nodered_version": stack.nodered_version }),
    )
    .await?;
    tx.commit().await?;
    Ok(stack)
}

/// One stack.
#[utoipa::path(get, path = "/api/v1/stacks/{id}", tag = "stacks", params(("id" = String, Path, description = "Stack id")),
    responses((status = 200, body = Stack), (status = 404, body = crate::error::ErrorBody)))]
async fn get_stack(
    State(state): State<AppState>,
    _caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Stack>> {
    Ok(Json(load(&state, &id).await?))
}

/// Replaces a stack's fields (platform admins).
#[utoipa::path(put, path = "/api/v1/stacks/{id}", tag = "stacks", params(("id" = String, Path, description = "Stack id")), request_body = StackBody,
    responses((status = 200, body = Stack), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
async fn update_stack(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<StackBody>,
) -> ApiResult<Json<Stack>> {
    require_admin(&caller)?;
    let before = load(&state, &id).await?;
    validate(&state, &body, Some(&id)).await?;
    let after = Stack {
        name: body.name,
        nodered_version: body.nodered_version,
        node_version: body.node_version,
        memory_mb: body.memory_mb.unwrap_or(before.memory_mb),
        replaced_by: body.replaced_by,
        ..before.clone()
    };
    let mut tx = state.store.write().await?;
    sqlx::query("UPDATE stacks SET name = $1, nodered_version = $2, node_version = $3, memory_mb = $4, replaced_by = $5 WHERE id = $6")
        .bind(&after.name)
        .bind(&after.nodered_version)
        .bind(after.node_version.clone())
        .bind(after.memory_mb)
        .bind(after.replaced_by.clone())
        .bind(&id)
        .execute(&mut *tx)
        .await?;
    let subject = Subject::object("stack", &id);
    audit::record(
        &mut tx,
        Some(&caller),
        "stack.updated",
        subject,
        json!({ "before": before, "after": after }),
    )
    .await?;
    tx.commit().await?;
    state.coordinator.changed();
    Ok(Json(after))
}

/// Deletes a stack that no instance uses and no stack names as replacement (platform admins).
#[utoipa::path(delete, path = "/api/v1/stacks/{id}", tag = "stacks", params(("id" = String, Path, description = "Stack id")),
    responses((status = 204), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)))]
async fn delete_stack(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    require_admin(&caller)?;
    let stack = load(&state, &id).await?;
    let mut tx = state.store.write().await?;
    let used: i64 = crate::store::count_where(&mut tx, "instances", "stack_id", &id).await?;
    if used > 0 {
        return Err(ApiError::Conflict(format!(
            "stack {} is used by {used} instance(s)",
            stack.name
        )));
    }
    let named: i64 = crate::store::count_where(&mut tx, "stacks", "replaced_by", &id).await?;
    if named > 0 {
        return Err(ApiError::Conflict(format!(
            "stack {} is named as the replacement of another stack",
            stack.name
        )));
    }
    sqlx::query("DELETE FROM stacks WHERE id = $1")
        .bind(&id)
        .execute(&mut *tx)
        .await?;
    let subject = Subject::object("stack", &id);
    audit::record(
        &mut tx,
        Some(&caller),
        "stack.deleted",
        subject,
        json!({ "name": stack.name }),
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}
