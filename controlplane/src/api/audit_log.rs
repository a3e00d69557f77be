//! Reading the audit log: per team (owners), per instance (members), platform-wide (admins).
//! Newest first, cursor-paginated, filterable by event.

use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{authorize, json_text, require_admin, Page};
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult, Json, Query};
use crate::roles::Action;
use crate::state::AppState;

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(team_audit))
        .routes(routes!(instance_audit))
        .routes(routes!(platform_audit))
}

/// One audit entry.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Entry {
    /// Id (time-ordered; the cursor).
    pub id: String,
    /// When, epoch ms.
    pub ts: i64,
    /// Who: username, or `system`.
    pub actor: String,
    /// The actor's user id.
    pub actor_id: Option<String>,
    /// What happened, e.g. `instance.created`.
    pub event: String,
    /// Team concerned.
    pub team_id: Option<String>,
    /// Instance concerned.
    pub instance_id: Option<String>,
    /// Kind of object.
    pub object_type: String,
    /// The object's id.
    pub object_id: String,
    /// Details: the new object, or before and after.
    #[schema(value_type = Object)]
    pub body: serde_json::Value,
}

/// `?cursor=&limit=&event=`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Entries per page, 1 to 500; default 50.
    pub limit: Option<i64>,
    /// Only this event (`instance.created`), or events under a prefix ending in `.` (`instance.`).
    pub event: Option<String>,
}

async fn read(
    state: &AppState,
    column: Option<&str>,
    owner: &str,
    q: &AuditQuery,
) -> ApiResult<Page<Entry>> {
    let limit = super::PageQuery {
        cursor: None,
        limit: q.limit,
    }
    .limit()?;
    let mut sql = String::from("SELECT id, ts, actor, actor_id, event, team_id, instance_id, object_type, object_id, body FROM audit WHERE 1 = 1");
    let mut binds: Vec<String> = Vec::new();
    if let Some(c) = column {
        binds.push(owner.to_string());
        sql.push_str(&format!(" AND {c} = ${}", binds.len()));
    }
    if let Some(cursor) = &q.cursor {
        binds.push(cursor.clone());
        sql.push_str(&format!(" AND id < ${}", binds.len()));
    }
    if let Some(event) = &q.event {
        if event.is_empty() || event.len() > 100 {
            return Err(ApiError::invalid("event", "must be 1 to 100 characters"));
        }
        if let Some(prefix) = event.strip_suffix('.') {
            let literal = prefix
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_");
            binds.push(format!("{literal}.%"));
            sql.push_str(&format!(" AND event LIKE ${} ESCAPE '\\'", binds.len()));
        } else {
            binds.push(event.clone());
            sql.push_str(&format!(" AND event = ${}", binds.len()));
        }
    }
    sql.push_str(&format!(" ORDER BY id DESC LIMIT {}", limit + 1));
    let mut query = sqlx::query(&sql);
    for b in binds {
        query = query.bind(b);
    }
    let rows = query.fetch_all(&state.store.pool).await?;
    let items = rows
        .iter()
        .map(|r| Entry {
            id: r.get(0),
            ts: r.get(1),
            actor: r.get(2),
            actor_id: r.get(3),
            event: r.get(4),
            team_id: r.get(5),
            instance_id: r.get(6),
            object_type: r.get(7),
            object_id: r.get(8),
            body: json_text(&r.get::<String, _>(9)),
        })
        .collect();
    Ok(Page::from_overfetch(items, limit, |e| e.id.clone()))
}

/// The team's audit log (owners).
#[utoipa::path(get, path = "/api/v1/teams/{id}/audit-log", tag = "audit", params(("id" = String, Path, description = "Team id"), AuditQuery),
    responses((status = 200, body = Page<Entry>), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
async fn team_audit(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<AuditQuery>,
) -> ApiResult<Json<Page<Entry>>> {
    authorize(&state, &caller, &id, Action::ReadTeamAudit).await?;
    Ok(Json(read(&state, Some("team_id"), &id, &q).await?))
}

/// The instance's audit log (members).
#[utoipa::path(get, path = "/api/v1/instances/{id}/audit-log", tag = "audit", params(("id" = String, Path, description = "Instance id"), AuditQuery),
    responses((status = 200, body = Page<Entry>), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
async fn instance_audit(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<AuditQuery>,
) -> ApiResult<Json<Page<Entry>>> {
    let row = sqlx::query("SELECT team_id FROM instances WHERE id = $1")
        .bind(&id)
        .fetch_optional(&state.store.pool)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no instance {id}")))?;
    let team: String = row.get(0);
    authorize(&state, &caller, &team, Action::ReadInstanceAudit)
        .await
        .map_err(|e| match e {
            ApiError::NotFound(_) => ApiError::NotFound(format!("no instance {id}")),
            other => other,
        })?;
    Ok(Json(read(&state, Some("instance_id"), &id, &q).await?))
}

/// The whole platform's audit log (platform admins).
#[utoipa::path(get, path = "/api/v1/audit-log", tag = "audit", params(AuditQuery),
    responses((status = 200, body = Page<Entry>), (status = 403, body = crate::error::ErrorBody)))]
async fn platform_audit(
    State(state): State<AppState>,
    caller: Caller,
    Query(q): Query<AuditQuery>,
) -> ApiResult<Json<Page<Entry>>> {
    require_admin(&caller)?;
    Ok(Json(read(&state, None, "", &q).await?))
}
