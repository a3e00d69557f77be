//! Pipelines: an application's instances in order (dev → staging → prod), each stage deployed
//! to the next from a snapshot. Owners edit and run them; members and viewers read them.
//!
//! A stage deploy moves flows and credentials only: the next stage's instance keeps its own
//! settings and environment (its database URL, its broker), as each stage is configured for its
//! place. The snapshot is copied into the target instance first (credentials re-encrypted for
//! it), so the target's deploy history and rollbacks name a snapshot of its own.

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
use crate::deployments::{self, Deployment, ProbeBody, Scope};
use crate::error::{ApiError, ApiResult, Json, Query};
use crate::roles::Action;
use crate::snapshots;
use crate::state::AppState;
use crate::store::{new_id, now_ms};

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_pipeline))
        .routes(routes!(list_application_pipelines))
        .routes(routes!(get_pipeline, update_pipeline, delete_pipeline))
        .routes(routes!(create_stage))
        .routes(routes!(update_stage, delete_stage))
        .routes(routes!(deploy_stage))
}

/// What a stage deploys to the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StageAction {
    /// A snapshot of the stage's instance taken at deploy time.
    CreateSnapshot,
    /// The stage instance's newest snapshot.
    UseLatestSnapshot,
    /// The snapshot the deploy names (`snapshot_id`).
    Prompt,
}

impl StageAction {
    fn as_str(self) -> &'static str {
        match self {
            Self::CreateSnapshot => "create_snapshot",
            Self::UseLatestSnapshot => "use_latest_snapshot",
            Self::Prompt => "prompt",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "create_snapshot" => Self::CreateSnapshot,
            "use_latest_snapshot" => Self::UseLatestSnapshot,
            _ => Self::Prompt,
        }
    }
}

/// A stage.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Stage {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Its instance, of the pipeline's application.
    pub instance_id: String,
    /// What it deploys to the next stage.
    pub action: StageAction,
}

/// A pipeline.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Pipeline {
    /// Id.
    pub id: String,
    /// Its application.
    pub application_id: String,
    /// The application's team.
    pub team_id: String,
    /// Name.
    pub name: String,
    /// Stages, in order: each deploys to the next.
    pub stages: Vec<Stage>,
    /// Creation time, epoch ms.
    pub created_at: i64,
    /// Last change, epoch ms.
    pub updated_at: i64,
}

/// A new pipeline.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewPipeline {
    /// The application.
    pub application_id: String,
    /// 1 to 100 printable characters.
    pub name: String,
}

/// A pipeline's new name.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PipelineUpdate {
    /// 1 to 100 printable characters.
    pub name: String,
}

async fn load(state: &AppState, id: &str) -> ApiResult<Pipeline> {
    let r = sqlx::query(
        "SELECT id, application_id, team_id, name, created_at, updated_at FROM pipelines WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(&state.store.pool)
    .await?
    .ok_or_else(|| ApiError::NotFound(format!("no pipeline {id}")))?;
    let stages = sqlx::query(
        "SELECT id, name, instance_id, action FROM pipeline_stages WHERE pipeline_id = $1 ORDER BY position, id",
    )
    .bind(id)
    .fetch_all(&state.store.pool)
    .await?
    .iter()
    .map(|s| Stage {
        id: s.get(0),
        name: s.get(1),
        instance_id: s.get(2),
        action: StageAction::parse(&s.get::<String, _>(3)),
    })
    .collect();
    Ok(Pipeline {
        id: r.get(0),
        application_id: r.get(1),
        team_id: r.get(2),
        name: r.get(3),
        stages,
        created_at: r.get(4),
        updated_at: r.get(5),
    })
}

/// What owns pipelines: deleting it deletes them.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Owner<'a> {
    /// An application.
    Application(&'a str),
    /// A team.
    Team(&'a str),
}

/// Deletes the pipelines of `owner`, and their stages.
pub(crate) async fn delete_of(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    owner: Owner<'_>,
) -> Result<(), sqlx::Error> {
    let (column, id) = match owner {
        Owner::Application(id) => ("application_id", id),
        Owner::Team(id) => ("team_id", id),
    };
    sqlx::query(&format!(
        "DELETE FROM pipeline_stages WHERE pipeline_id IN (SELECT id FROM pipelines WHERE {column} = $1)"
    ))
    .bind(id)
    .execute(&mut **tx)
    .await?;
    sqlx::query(&format!("DELETE FROM pipelines WHERE {column} = $1"))
        .bind(id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// A pipeline the caller may act on; outsiders get 404.
async fn load_for(
    state: &AppState,
    caller: &Caller,
    id: &str,
    action: Action,
) -> ApiResult<Pipeline> {
    let p = load(state, id).await?;
    authorize(state, caller, &p.team_id, action)
        .await
        .map_err(|e| match e {
            ApiError::NotFound(_) => ApiError::NotFound(format!("no pipeline {id}")),
            other => other,
        })?;
    Ok(p)
}

async fn audit_pipeline(
    state: &AppState,
    caller: &Caller,
    p: &Pipeline,
    event: &str,
    body: serde_json::Value,
) -> ApiResult<()> {
    let mut tx = state.store.write().await?;
    audit::record(
        &mut tx,
        Some(caller),
        event,
        Subject::team(&p.team_id, "pipeline", &p.id),
        body,
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Creates a pipeline for an application (owners).
#[utoipa::path(post, path = "/api/v1/pipelines", tag = "pipelines", request_body = NewPipeline,
    responses((status = 201, body = Pipeline), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
async fn create_pipeline(
    State(state): State<AppState>,
    caller: Caller,
    Json(body): Json<NewPipeline>,
) -> ApiResult<(StatusCode, Json<Pipeline>)> {
    let app = super::applications::load_for(
        &state,
        &caller,
        &body.application_id,
        Action::ManagePipelines,
    )
    .await?;
    check_display_name("name", &body.name)?;
    let id = new_id();
    let now = now_ms();
    let mut tx = state.store.write().await?;
    sqlx::query(
        "INSERT INTO pipelines (id, application_id, team_id, name, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&id)
    .bind(&app.id)
    .bind(&app.team_id)
    .bind(&body.name)
    .bind(now)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    audit::record(
        &mut tx,
        Some(&caller),
        "pipeline.created",
        Subject::team(&app.team_id, "pipeline", &id),
        json!({ "name": body.name, "application_id": app.id }),
    )
    .await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(load(&state, &id).await?)))
}

/// An application's pipelines (viewers).
#[utoipa::path(get, path = "/api/v1/applications/{id}/pipelines", tag = "pipelines", params(("id" = String, Path, description = "Application id"), PageQuery),
    responses((status = 200, body = Page<Pipeline>), (status = 404, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
async fn list_application_pipelines(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<PageQuery>,
) -> ApiResult<Json<Page<Pipeline>>> {
    let app = super::applications::load_for(&state, &caller, &id, Action::Read).await?;
    let limit = q.limit()?;
    let ids: Vec<String> = sqlx::query(
        "SELECT id FROM pipelines WHERE application_id = $1 AND id > $2 ORDER BY id LIMIT $3",
    )
    .bind(&app.id)
    .bind(q.after())
    .bind(limit + 1)
    .fetch_all(&state.store.pool)
    .await?
    .iter()
    .map(|r| r.get(0))
    .collect();
    let mut items = Vec::with_capacity(ids.len());
    for id in ids {
        items.push(load(&state, &id).await?);
    }
    Ok(Json(Page::from_overfetch(items, limit, |p| p.id.clone())))
}

/// A pipeline with its stages (viewers).
#[utoipa::path(get, path = "/api/v1/pipelines/{id}", tag = "pipelines", params(("id" = String, Path, description = "Pipeline id")),
    responses((status = 200, body = Pipeline), (status = 404, body = crate::error::ErrorBody)))]
async fn get_pipeline(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Pipeline>> {
    Ok(Json(load_for(&state, &caller, &id, Action::Read).await?))
}

/// Renames a pipeline (owners).
#[utoipa::path(put, path = "/api/v1/pipelines/{id}", tag = "pipelines", params(("id" = String, Path, description = "Pipeline id")), request_body = PipelineUpdate,
    responses((status = 200, body = Pipeline), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
async fn update_pipeline(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<PipelineUpdate>,
) -> ApiResult<Json<Pipeline>> {
    let p = load_for(&state, &caller, &id, Action::ManagePipelines).await?;
    check_display_name("name", &body.name)?;
    sqlx::query("UPDATE pipelines SET name = $1, updated_at = $2 WHERE id = $3")
        .bind(&body.name)
        .bind(now_ms())
        .bind(&id)
        .execute(&state.store.pool)
        .await?;
    audit_pipeline(
        &state,
        &caller,
        &p,
        "pipeline.updated",
        json!({ "before": p.name, "after": body.name }),
    )
    .await?;
    Ok(Json(load(&state, &id).await?))
}

/// Deletes a pipeline and its stages (owners).
#[utoipa::path(delete, path = "/api/v1/pipelines/{id}", tag = "pipelines", params(("id" = String, Path, description = "Pipeline id")),
    responses((status = 204), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
async fn delete_pipeline(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let p = load_for(&state, &caller, &id, Action::ManagePipelines).await?;
    let mut tx = state.store.write().await?;
    sqlx::query("DELETE FROM pipeline_stages WHERE pipeline_id = $1")
        .bind(&id)
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM pipelines WHERE id = $1")
        .bind(&id)
        .execute(&mut *tx)
        .await?;
    audit::record(
        &mut tx,
        Some(&caller),
        "pipeline.deleted",
        Subject::team(&p.team_id, "pipeline", &id),
        json!({ "name": p.name }),
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A new stage, added last.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewStage {
    /// 1 to 100 printable characters.
    pub name: String,
    /// An instance of the pipeline's application, in no other stage of it.
    pub instance_id: String,
    /// What it deploys to the next stage.
    pub action: StageAction,
}

/// Changes to a stage; absent fields stay.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StageUpdate {
    /// 1 to 100 printable characters.
    pub name: Option<String>,
    /// An instance of the pipeline's application, in no other stage of it.
    pub instance_id: Option<String>,
    /// What it deploys to the next stage.
    pub action: Option<StageAction>,
}

/// Checks that `instance_id` may be a stage of `p` (other than `stage_id`).
async fn check_stage_instance(
    state: &AppState,
    p: &Pipeline,
    instance_id: &str,
    stage_id: Option<&str>,
) -> ApiResult<()> {
    let app: Option<String> = sqlx::query("SELECT application_id FROM instances WHERE id = $1")
        .bind(instance_id)
        .fetch_optional(&state.store.pool)
        .await?
        .map(|r| r.get(0));
    if app.as_deref() != Some(p.application_id.as_str()) {
        return Err(ApiError::invalid(
            "instance_id",
            format!("no instance {instance_id} in the pipeline's application"),
        ));
    }
    if p.stages
        .iter()
        .any(|s| s.instance_id == instance_id && Some(s.id.as_str()) != stage_id)
    {
        return Err(ApiError::invalid(
            "instance_id",
            "is the instance of another stage of this pipeline",
        ));
    }
    Ok(())
}

/// Adds a stage at the end (owners).
#[utoipa::path(post, path = "/api/v1/pipelines/{id}/stages", tag = "pipelines", params(("id" = String, Path, description = "Pipeline id")), request_body = NewStage,
    responses((status = 201, body = Pipeline), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
async fn create_stage(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<NewStage>,
) -> ApiResult<(StatusCode, Json<Pipeline>)> {
    let p = load_for(&state, &caller, &id, Action::ManagePipelines).await?;
    check_display_name("name", &body.name)?;
    check_stage_instance(&state, &p, &body.instance_id, None).await?;
    let stage = new_id();
    let now = now_ms();
    let mut tx = state.store.write().await?;
    let position: i64 = sqlx::query(
        "SELECT COALESCE(MAX(position), -1) + 1 FROM pipeline_stages WHERE pipeline_id = $1",
    )
    .bind(&id)
    .fetch_one(&mut *tx)
    .await?
    .get(0);
    sqlx::query(
        "INSERT INTO pipeline_stages (id, pipeline_id, position, name, instance_id, action, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(&stage)
    .bind(&id)
    .bind(position)
    .bind(&body.name)
    .bind(&body.instance_id)
    .bind(body.action.as_str())
    .bind(now)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    audit::record(
        &mut tx,
        Some(&caller),
        "pipeline.stage-added",
        Subject::team(&p.team_id, "pipeline", &id),
        json!({ "stage_id": stage, "name": body.name, "instance_id": body.instance_id, "action": body.action }),
    )
    .await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(load(&state, &id).await?)))
}

fn stage_of<'a>(p: &'a Pipeline, stage_id: &str) -> ApiResult<(usize, &'a Stage)> {
    p.stages
        .iter()
        .enumerate()
        .find(|(_, s)| s.id == stage_id)
        .ok_or_else(|| ApiError::NotFound(format!("no stage {stage_id} in pipeline {}", p.id)))
}

/// Changes a stage (owners).
#[utoipa::path(put, path = "/api/v1/pipelines/{id}/stages/{stage_id}", tag = "pipelines", params(("id" = String, Path, description = "Pipeline id"), ("stage_id" = String, Path, description = "Stage id")), request_body = StageUpdate,
    responses((status = 200, body = Pipeline), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
async fn update_stage(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, stage_id)): Path<(String, String)>,
    Json(body): Json<StageUpdate>,
) -> ApiResult<Json<Pipeline>> {
    let p = load_for(&state, &caller, &id, Action::ManagePipelines).await?;
    let (_, stage) = stage_of(&p, &stage_id)?;
    let name = body.name.clone().unwrap_or_else(|| stage.name.clone());
    check_display_name("name", &name)?;
    let instance_id = body
        .instance_id
        .clone()
        .unwrap_or_else(|| stage.instance_id.clone());
    check_stage_instance(&state, &p, &instance_id, Some(&stage_id)).await?;
    let action = body.action.unwrap_or(stage.action);
    sqlx::query(
        "UPDATE pipeline_stages SET name = $1, instance_id = $2, action = $3, updated_at = $4 WHERE id = $5",
    )
    .bind(&name)
    .bind(&instance_id)
    .bind(action.as_str())
    .bind(now_ms())
    .bind(&stage_id)
    .execute(&state.store.pool)
    .await?;
    audit_pipeline(
        &state,
        &caller,
        &p,
        "pipeline.stage-updated",
        json!({ "stage_id": stage_id, "before": { "name": stage.name, "instance_id": stage.instance_id, "action": stage.action }, "after": { "name": name, "instance_id": instance_id, "action": action } }),
    )
    .await?;
    Ok(Json(load(&state, &id).await?))
}

/// Removes a stage (owners).
#[utoipa::path(delete, path = "/api/v1/pipelines/{id}/stages/{stage_id}", tag = "pipelines", params(("id" = String, Path, description = "Pipeline id"), ("stage_id" = String, Path, description = "Stage id")),
    responses((status = 204), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
async fn delete_stage(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, stage_id)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let p = load_for(&state, &caller, &id, Action::ManagePipelines).await?;
    let (_, stage) = stage_of(&p, &stage_id)?;
    sqlx::query("DELETE FROM pipeline_stages WHERE id = $1")
        .bind(&stage_id)
        .execute(&state.store.pool)
        .await?;
    audit_pipeline(
        &state,
        &caller,
        &p,
        "pipeline.stage-removed",
        json!({ "stage_id": stage_id, "name": stage.name }),
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A stage deploy.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StageDeploy {
    /// The snapshot to deploy: required for a `prompt` stage, refused for the others.
    pub snapshot_id: Option<String>,
    /// An HTTP check of each changed replica of the next stage, besides the default gate.
    pub probe: Option<ProbeBody>,
}

/// Deploys the stage's snapshot to the next stage's instance (owners). Answers 202 with the
/// deploy.
#[utoipa::path(post, path = "/api/v1/pipelines/{id}/stages/{stage_id}/deploy", tag = "pipelines", params(("id" = String, Path, description = "Pipeline id"), ("stage_id" = String, Path, description = "Stage id")), request_body = StageDeploy,
    responses((status = 202, body = Deployment), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
async fn deploy_stage(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, stage_id)): Path<(String, String)>,
    Json(body): Json<StageDeploy>,
) -> ApiResult<(StatusCode, Json<Deployment>)> {
    let p = load_for(&state, &caller, &id, Action::RunPipeline).await?;
    let (at, stage) = stage_of(&p, &stage_id)?;
    let next = p.stages.get(at + 1).ok_or_else(|| {
        ApiError::invalid(
            "stage_id",
            "is the pipeline's last stage: it deploys to no other",
        )
    })?;
    if let Some(probe) = &body.probe {
        probe.check("probe")?;
    }
    let source =
        super::instances::load_for(&state, &caller, &stage.instance_id, Action::Read).await?;
    let target = super::snapshots::load_for_deploy(&state, &caller, &next.instance_id).await?;
    let (snapshot, content) = match (stage.action, &body.snapshot_id) {
        (StageAction::Prompt, None) => {
            return Err(ApiError::invalid(
                "snapshot_id",
                "this stage deploys the snapshot the deploy names: give one",
            ))
        }
        (StageAction::Prompt, Some(s)) => {
            let none = || {
                ApiError::invalid(
                    "snapshot_id",
                    format!("no snapshot {s} of the stage's instance"),
                )
            };
            match snapshots::load(&state, s).await {
                Ok(found) if found.0.instance_id == source.id => found,
                Ok(_) | Err(ApiError::NotFound(_)) => return Err(none()),
                Err(e) => return Err(e),
            }
        }
        (_, Some(_)) => {
            return Err(ApiError::invalid(
                "snapshot_id",
                format!(
                    "this stage's action is {}: it chooses the snapshot itself",
                    stage.action.as_str()
                ),
            ))
        }
        (StageAction::UseLatestSnapshot, None) => {
            let latest: Option<String> = sqlx::query(
                "SELECT id FROM snapshots WHERE instance_id = $1 ORDER BY id DESC LIMIT 1",
            )
            .bind(&source.id)
            .fetch_optional(&state.store.pool)
            .await?
            .map(|r| r.get(0));
            let latest = latest.ok_or_else(|| {
                ApiError::invalid(
                    "stage_id",
                    format!(
                        "the stage's instance {} has no snapshot to deploy yet",
                        source.name
                    ),
                )
            })?;
            snapshots::load(&state, &latest).await?
        }
        (StageAction::CreateSnapshot, None) => {
            let content = snapshots::current(&state, &source.id).await?;
            let mut tx = state.store.write().await?;
            let s = snapshots::insert(
                &mut tx,
                Some(&caller),
                &source,
                &format!("Pipeline {}: stage {}", p.name, stage.name),
                "Taken by a pipeline deploy.",
                &content,
            )
            .await?;
            tx.commit().await?;
            (s, content)
        }
    };
    // The target gets a copy of its own: the snapshot's flows, credentials encrypted for it, and
    // its own settings and environment (a stage keeps its own configuration).
    crate::deployments::ensure_idle(&state, &target).await?;
    let own = snapshots::current(&state, &target.id).await?;
    let moved = snapshots::Content {
        settings: own.settings,
        env: own.env,
        ..snapshots::rebind_credentials(&state, &content, &source.id, &target.id)?
    };
    let mut tx = state.store.write().await?;
    let copy = snapshots::insert(
        &mut tx,
        Some(&caller),
        &target,
        &snapshot.name,
        &format!(
            "Deployed by pipeline {} from instance {} (snapshot {}).",
            p.name, source.name, snapshot.id
        ),
        &moved,
    )
    .await?;
    audit::record(
        &mut tx,
        Some(&caller),
        "pipeline.deployed",
        Subject::team(&p.team_id, "pipeline", &p.id),
        json!({ "stage_id": stage.id, "snapshot_id": snapshot.id, "target_instance_id": target.id, "target_snapshot_id": copy.id }),
    )
    .await?;
    tx.commit().await?;
    let d = deployments::begin(
        &state,
        &caller,
        &target,
        &copy.id,
        &moved,
        Scope::Flows,
        body.probe,
    )
    .await?;
    Ok((StatusCode::ACCEPTED, Json(d)))
}
