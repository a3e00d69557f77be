//! Applications: groups of instances inside a team.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::Row;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{authorize, check_display_name, Page, PageQuery};
use crate::audit::{self, Subject};
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult, Json, Query};
use crate::roles::Action;
use crate::state::AppState;
use crate::store::{new_id, now_ms};

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_application))
        .routes(routes!(list_applications))
        .routes(routes!(
            get_application,
            update_application,
            delete_application
        ))
}

/// An application.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Application {
    /// Id.
    pub id: String,
    /// The team it belongs to.
    pub team_id: String,
    /// Name, unique in the team.
    pub name: String,
    /// Free text.
    pub description: String,
    /// Creation time, epoch ms.
    pub created_at: i64,
}

/// A new application.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewApplication {
    /// The team.
    pub team_id: String,
    /// Name, unique in the team.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
}

/// Changes to an application.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApplicationUpdate {
    /// New name.
    pub name: Option<String>,
    /// New description.
    pub description: Option<String>,
}

fn check_description(d: &str) -> ApiResult<()> {
    if d.chars().count() > 1000 {
        return Err(ApiError::invalid(
            "description",
            "must be at most 1000 characters",
        ));
    }
    Ok(())
}

fn from_row(r: &sqlx::any::AnyRow) -> Application {
    Application {
        id: r.get(0),
        team_id: r.get(1),
        name: r.get(2),
        description: r.get(3),
        created_at: r.get(4),
    }
}

/// Loads an application; 404 when it does not exist.
pub async fn load(state: &AppState, id: &str) -> ApiResult<Application> {
    let row = sqlx::query(
        "SELECT id, team_id, name, description, created_at FROM applications WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(&state.store.pool)
    .await?
    .ok_or_else(|| ApiError::NotFound(format!("no application {id}")))?;
    Ok(from_row(&row))
}

/// Loads an application the caller may act on; an outsider gets 404.
pub(crate) async fn load_for(
    state: &AppState,
    caller: &Caller,
    id: &str,
    action: Action,
) -> ApiResult<Application> {
    let app = load(state, id).await?;
    authorize(state, caller, &app.team_id, action)
        .await
        .map_err(|e| match e {
            ApiError::NotFound(_) => ApiError::NotFound(format!("no application {id}")),
            other => other,
        })?;
    Ok(app)
}

/// Creates an application (owners).
#[utoipa::path(post, path = "/api/v1/applications", tag = "applications", request_body = NewApplication,
    responses((status = 201, body = Application), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
async fn create_application(
    State(state): State<AppState>,
    caller: Caller,
    Json(body): Json<NewApplication>,
) -> ApiResult<(StatusCode, Json<Application>)> {
    authorize(&state, &caller, &body.team_id, Action::ManageApplications).await?;
    check_display_name("name", &body.name)?;
    check_description(&body.description)?;
    let app = Application {
        id: new_id(),
        team_id: body.team_id,
        name: body.name,
        description: body.description,
        created_at: now_ms(),
    };
    let mut tx = state.store.write().await?;
    sqlx::query("INSERT INTO applications (id, team_id, name, description, created_at) VALUES ($1, $2, $3, $4, $5)")
        .bind(&app.id)
        .bind(&app.team_id)
        .bind(&app.name)
        .bind(&app.description)
        .bind(app.created_at)
        .execute(&mut *tx)
        .await
        .map_err(ApiError::conflict_as(format!("the team already has an application named {:?}", app.name)))?;
    let subject = Subject::team(&app.team_id, "application", &app.id);
    audit::record(
        &mut tx,
        Some(&caller),
        "application.created",
        subject,
        json!({ "name": app.name }),
    )
    .await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(app)))
}

/// The team's applications.
#[utoipa::path(get, path = "/api/v1/teams/{id}/applications", tag = "applications", params(("id" = String, Path, description = "Team id"), PageQuery),
    responses((status = 200, body = Page<Application>), (status = 404, body = crate::error::ErrorBody)))]
async fn list_applications(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<PageQuery>,
) -> ApiResult<Json<Page<Application>>> {
    authorize(&state, &caller, &id, Action::Read).await?;
    let limit = q.limit()?;
    let rows = sqlx::query("SELECT id, team_id, name, description, created_at FROM applications WHERE team_id = $1 AND id > $2 ORDER BY id LIMIT $3")
        .bind(&id)
        .bind(q.after())
        .bind(limit + 1)
        .fetch_all(&state.store.pool)
        .await?;
    Ok(Json(Page::from_overfetch(
        rows.iter().map(from_row).collect(),
        limit,
        |a| a.id.clone(),
    )))
}

/// One application.
#[utoipa::path(get, path = "/api/v1/applications/{id}", tag = "applications", params(("id" = String, Path, description = "Application id")),
    responses((status = 200, body = Application), (status = 404, body = crate::error::ErrorBody)))]
async fn get_application(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Application>> {
    Ok(Json(load_for(&state, &caller, &id, Action::Read).await?))
}

/// Renames or describes an application (owners).
#[utoipa::path(put, path = "/api/v1/applications/{id}", tag = "applications", params(("id" = String, Path, description = "Application id")), request_body = ApplicationUpdate,
    responses((status = 200, body = Application), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)))]
async fn update_application(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<ApplicationUpdate>,
) -> ApiResult<Json<Application>> {
    let before = load_for(&state, &caller, &id, Action::ManageApplications).await?;
    let name = body.name.unwrap_or_else(|| before.name.clone());
    let description = body
        .description
        .unwrap_or_else(|| before.description.clone());
    check_display_name("name", &name)?;
    check_description(&description)?;
    let mut tx = state.store.write().await?;
    sqlx::query("UPDATE applications SET name = $1, description = $2 WHERE id = $3")
        .bind(&name)
        .bind(&description)
        .bind(&id)
        .execute(&mut *tx)
        .await?;
    let subject = Subject::team(&before.team_id, "application", &id);
    audit::record(&mut tx, Some(&caller), "application.updated", subject,
        json!({ "before": { "name": before.name, "description": before.description }, "after": { "name": name, "description": description } })).await?;
    tx.commit().await?;
    Ok(Json(Application {
        name,
        description,
        ..before
    }))
}

/// Deletes an application without instances (owners).
#[utoipa::path(delete, path = "/api/v1/applications/{id}", tag = "applications", params(("id" = String, Path, description = "Application id")),
    responses((status = 204), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)))]
async fn delete_application(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let app = load_for(&state, &caller, &id, Action::ManageApplications).await?;
    let mut tx = state.store.write().await?;
    let n: i64 = crate::store::count_where(&mut tx, "instances", "application_id", &id).await?;
    if n > 0 {
        return Err(ApiError::Conflict(format!(
            "the application still has {n} instance(s); delete them first"
        )));
    }
    // Its pipelines go with it.
    super::pipelines::delete_of(&mut tx, super::pipelines::Owner::Application(&id)).await?;
    sqlx::query("DELETE FROM applications WHERE id = $1")
        .bind(&id)
        .execute(&mut *tx)
        .await?;
    let subject = Subject::team(&app.team_id, "application", &id);
    audit::record(
        &mut tx,
        Some(&caller),
        "application.deleted",
        subject,
        json!({ "name": app.name }),
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}
