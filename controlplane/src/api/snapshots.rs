//! Snapshots, an instance's flows, rollbacks and deploys.
//!
//! Roles, as FlowFuse has them: viewers read snapshots' metadata and deploys; members take,
//! import and export snapshots, read flows, `PUT` flows and roll back; owners delete snapshots.
//! On a protected instance only owners deploy, by any route.

use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::instances::{load_for, Instance};
use super::{check_display_name, Page, PageQuery};
use crate::auth::Caller;
use crate::deployments::{self, Deployment, ProbeBody, Scope};
use crate::error::{ApiError, ApiResult, Document, Json, Query};
use crate::roles::Action;
use crate::snapshots::{self, Content, ExportDocument, Snapshot, SnapshotFull};
use crate::state::AppState;

pub(super) fn router(max_document_bytes: usize) -> OpenApiRouter<AppState> {
    let documents = OpenApiRouter::new()
        .routes(routes!(get_flows, put_flows))
        .routes(routes!(import_snapshot))
        .layer(DefaultBodyLimit::max(max_document_bytes));
    OpenApiRouter::new()
        .routes(routes!(create_snapshot, list_snapshots))
        .routes(routes!(get_snapshot, delete_snapshot))
        .routes(routes!(get_snapshot_full))
        .routes(routes!(export_snapshot))
        .routes(routes!(rollback))
        .routes(routes!(get_deployment))
        .routes(routes!(list_deployments))
        .merge(documents)
}

/// Checks a Node-RED flows array: every entry an object with a string `id` and `type`.
pub(crate) fn check_flows(flows: &Value, field: &str) -> ApiResult<()> {
    let Some(nodes) = flows.as_array() else {
        return Err(ApiError::invalid(field, "must be a Node-RED flows array"));
    };
    let mut ids = std::collections::HashSet::new();
    for (i, n) in nodes.iter().enumerate() {
        let id = n.get("id").and_then(Value::as_str);
        let ok = id.is_some() && n.get("type").is_some_and(Value::is_string);
        if !ok {
            return Err(ApiError::invalid(
                format!("{field}[{i}]"),
                "every node needs a string id and type",
            ));
        }
        if !ids.insert(id) {
            return Err(ApiError::invalid(
                format!("{field}[{i}].id"),
                format!("{:?} is the id of an earlier node too", id.unwrap_or("")),
            ));
        }
    }
    Ok(())
}

/// Loads an instance for a deploy: members may deploy, owners only when it is protected.
pub(crate) async fn load_for_deploy(
    state: &AppState,
    caller: &Caller,
    id: &str,
) -> ApiResult<Instance> {
    let i = load_for(state, caller, id, Action::Deploy).await?;
    if i.protected {
        super::authorize(state, caller, &i.team_id, Action::DeployProtected)
            .await
            .map_err(|e| match e {
                ApiError::Forbidden(_) => ApiError::Forbidden(format!(
                    "instance {} is protected: only the team's owners deploy to it",
                    i.name
                )),
                other => other,
            })?;
    }
    Ok(i)
}

/// A snapshot to take.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSnapshot {
    /// 1 to 100 printable characters.
    pub name: String,
    /// Up to 10000 characters.
    #[serde(default)]
    pub description: String,
}

fn check_description(d: &str) -> ApiResult<()> {
    if d.chars().count() > 10_000 {
        return Err(ApiError::invalid(
            "description",
            "must be at most 10000 characters",
        ));
    }
    Ok(())
}

/// Takes a snapshot of the instance's current state (members).
#[utoipa::path(post, path = "/api/v1/instances/{id}/snapshots", tag = "snapshots", params(("id" = String, Path, description = "Instance id")), request_body = NewSnapshot,
    responses((status = 201, body = Snapshot), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
async fn create_snapshot(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<NewSnapshot>,
) -> ApiResult<(StatusCode, Json<Snapshot>)> {
    let i = load_for(&state, &caller, &id, Action::TakeSnapshot).await?;
    check_display_name("name", &body.name)?;
    check_description(&body.description)?;
    let content = snapshots::current(&state, &i.id).await?;
    let mut tx = state.store.write().await?;
    let s = snapshots::insert(
        &mut tx,
        Some(&caller),
        &i,
        &body.name,
        &body.description,
        &content,
    )
    .await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(s)))
}

/// The instance's snapshots, oldest first (viewers).
#[utoipa::path(get, path = "/api/v1/instances/{id}/snapshots", tag = "snapshots", params(("id" = String, Path, description = "Instance id"), PageQuery),
    responses((status = 200, body = Page<Snapshot>), (status = 404, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
async fn list_snapshots(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<PageQuery>,
) -> ApiResult<Json<Page<Snapshot>>> {
    let i = load_for(&state, &caller, &id, Action::Read).await?;
    let limit = q.limit()?;
    let items = snapshots::list(&state, &i.id, q.after(), limit + 1).await?;
    Ok(Json(Page::from_overfetch(items, limit, |s| s.id.clone())))
}

/// A snapshot and the instance it belongs to, for `action`.
async fn snapshot_for(
    state: &AppState,
    caller: &Caller,
    id: &str,
    action: Action,
) -> ApiResult<(Instance, Snapshot, Content)> {
    let (s, content) = snapshots::load(state, id).await?;
    let i = load_for(state, caller, &s.instance_id, action)
        .await
        .map_err(|e| match e {
            ApiError::NotFound(_) => ApiError::NotFound(format!("no snapshot {id}")),
            other => other,
        })?;
    Ok((i, s, content))
}

/// A snapshot's metadata (viewers).
#[utoipa::path(get, path = "/api/v1/snapshots/{id}", tag = "snapshots", params(("id" = String, Path, description = "Snapshot id")),
    responses((status = 200, body = Snapshot), (status = 404, body = crate::error::ErrorBody)))]
async fn get_snapshot(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Snapshot>> {
    let (_, s, _) = snapshot_for(&state, &caller, &id, Action::Read).await?;
    Ok(Json(s))
}

/// A snapshot with its flows, settings and environment, secrets masked (members).
#[utoipa::path(get, path = "/api/v1/snapshots/{id}/full", tag = "snapshots", params(("id" = String, Path, description = "Snapshot id")),
    responses((status = 200, body = SnapshotFull), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
async fn get_snapshot_full(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<SnapshotFull>> {
    let (_, s, content) = snapshot_for(&state, &caller, &id, Action::ReadFlows).await?;
    Ok(Json(SnapshotFull::new(s, &content)))
}

/// Deletes a snapshot (owners). One a deploy under way may still restore is kept: 409.
#[utoipa::path(delete, path = "/api/v1/snapshots/{id}", tag = "snapshots", params(("id" = String, Path, description = "Snapshot id")),
    responses((status = 204), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)))]
async fn delete_snapshot(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let (i, s, _) = snapshot_for(&state, &caller, &id, Action::DeleteSnapshot).await?;
    let mut tx = state.store.write().await?;
    let in_use: i64 = sqlx::Row::get(
        &sqlx::query("SELECT COUNT(*) FROM deployments WHERE status = 'running' AND (snapshot_id = $1 OR previous_snapshot_id = $1)")
            .bind(&id)
            .fetch_one(&mut *tx)
            .await?,
        0,
    );
    if in_use > 0 {
        return Err(ApiError::Conflict(format!(
            "snapshot {id} belongs to a deploy under way"
        )));
    }
    sqlx::query("DELETE FROM snapshots WHERE id = $1")
        .bind(&id)
        .execute(&mut *tx)
        .await?;
    crate::audit::record(
        &mut tx,
        Some(&caller),
        "snapshot.deleted",
        crate::audit::Subject::of_instance(&i.team_id, &i.id, "snapshot", &id),
        json!({ "name": s.name }),
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The secret an export's credentials are encrypted with.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExportRequest {
    /// 1 to 1024 characters: whoever imports the document needs it.
    pub credential_secret: String,
}

fn check_secret(secret: &str) -> ApiResult<()> {
    if secret.is_empty() || secret.chars().count() > 1024 {
        return Err(ApiError::invalid(
            "credential_secret",
            "must be 1 to 1024 characters",
        ));
    }
    Ok(())
}

/// A self-contained document of the snapshot, its credentials and secret variables encrypted
/// with `credential_secret` (members).
#[utoipa::path(post, path = "/api/v1/snapshots/{id}/export", tag = "snapshots", params(("id" = String, Path, description = "Snapshot id")), request_body = ExportRequest,
    responses((status = 200, body = ExportDocument), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
async fn export_snapshot(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<ExportRequest>,
) -> ApiResult<Json<ExportDocument>> {
    check_secret(&body.credential_secret)?;
    let (i, s, content) = snapshot_for(&state, &caller, &id, Action::ReadFlows).await?;
    let doc = snapshots::export(&state, &s, &content, &body.credential_secret)?;
    let mut tx = state.store.write().await?;
    crate::audit::record(
        &mut tx,
        Some(&caller),
        "snapshot.exported",
        crate::audit::Subject::of_instance(&i.team_id, &i.id, "snapshot", &id),
        json!({ "name": s.name }),
    )
    .await?;
    tx.commit().await?;
    Ok(Json(doc))
}

/// An exported snapshot to import.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImportRequest {
    /// The document `POST /snapshots/{id}/export` returned (from this Tandem or another).
    pub snapshot: ExportDocument,
    /// The secret it was exported with.
    pub credential_secret: String,
}

/// Imports an exported snapshot into the instance (members): its credentials and secret
/// variables are encrypted again for this instance. Deploying it is a rollback to it.
#[utoipa::path(post, path = "/api/v1/instances/{id}/snapshots/import", tag = "snapshots", params(("id" = String, Path, description = "Instance id")), request_body = ImportRequest,
    responses((status = 201, body = Snapshot), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 413, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
async fn import_snapshot(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Document(body): Document<ImportRequest>,
) -> ApiResult<(StatusCode, Json<Snapshot>)> {
    let i = load_for(&state, &caller, &id, Action::TakeSnapshot).await?;
    check_secret(&body.credential_secret)?;
    check_display_name("snapshot.name", &body.snapshot.name)?;
    check_description(&body.snapshot.description)?;
    let content = snapshots::import(&state, &body.snapshot, &body.credential_secret, &i.id)?;
    let mut tx = state.store.write().await?;
    let s = snapshots::insert(
        &mut tx,
        Some(&caller),
        &i,
        &body.snapshot.name,
        &body.snapshot.description,
        &content,
    )
    .await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(s)))
}

/// A rollback.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    /// A snapshot of this instance.
    pub snapshot_id: String,
    /// An HTTP check of each changed replica, besides the default gate.
    pub probe: Option<ProbeBody>,
}

/// Deploys a snapshot of the instance: its flows, credentials, settings and environment
/// (members; owners on a protected instance). Answers 202 with the deploy.
#[utoipa::path(post, path = "/api/v1/instances/{id}/actions/rollback", tag = "snapshots", params(("id" = String, Path, description = "Instance id")), request_body = RollbackRequest,
    responses((status = 202, body = Deployment), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
async fn rollback(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<RollbackRequest>,
) -> ApiResult<(StatusCode, Json<Deployment>)> {
    let i = load_for_deploy(&state, &caller, &id).await?;
    if let Some(p) = &body.probe {
        p.check("probe")?;
    }
    let none = || {
        ApiError::invalid(
            "snapshot_id",
            format!("no snapshot {} of this instance", body.snapshot_id),
        )
    };
    let (s, content) = match snapshots::load(&state, &body.snapshot_id).await {
        Ok(found) if found.0.instance_id == i.id => found,
        Ok(_) | Err(ApiError::NotFound(_)) => return Err(none()),
        Err(e) => return Err(e),
    };
    let d = deployments::begin(
        &state,
        &caller,
        &i,
        &s.id,
        &content,
        Scope::Everything,
        body.probe,
    )
    .await?;
    Ok((StatusCode::ACCEPTED, Json(d)))
}

/// An instance's flows as the store holds them.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FlowsBody {
    /// The flows array (without credentials).
    #[schema(value_type = Vec<Object>)]
    pub flows: Value,
    /// The revision of the flows and credentials: what each replica reports it runs.
    pub rev: String,
    /// Whether credentials are stored with them (encrypted; never shown).
    pub has_credentials: bool,
}

/// The instance's flows (members).
#[utoipa::path(get, path = "/api/v1/instances/{id}/flows", tag = "snapshots", params(("id" = String, Path, description = "Instance id")),
    responses((status = 200, body = FlowsBody), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
async fn get_flows(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<FlowsBody>> {
    let i = load_for(&state, &caller, &id, Action::ReadFlows).await?;
    let flows = snapshots::stored_flows(&state, &i.id).await?;
    Ok(Json(FlowsBody {
        has_credentials: flows.credentials.as_object().is_some_and(|c| !c.is_empty()),
        rev: flows.rev,
        flows: (*flows.value).clone(),
    }))
}

/// New flows for an instance.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum PutFlows {
    /// A Node-RED flows array, as `flows.json` holds it.
    #[schema(value_type = Vec<Object>)]
    Array(Vec<Value>),
    /// The flows with options.
    Object(PutFlowsObject),
}

/// New flows for an instance, with options.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutFlowsObject {
    /// The flows array. A node may carry its credentials inline (`"credentials": {...}`); they
    /// are encrypted for the instance and never stored in clear.
    #[schema(value_type = Vec<Object>)]
    pub flows: Value,
    /// Name of the snapshot taken of them; default `Flows deployed by <user>`.
    pub snapshot_name: Option<String>,
    /// An HTTP check of each changed replica, besides the default gate.
    pub probe: Option<ProbeBody>,
}

/// Deploys new flows: a snapshot of them, then a deploy of that snapshot, replica by replica
/// (members; owners on a protected instance). Answers 202 with the deploy.
#[utoipa::path(put, path = "/api/v1/instances/{id}/flows", tag = "snapshots", params(("id" = String, Path, description = "Instance id")), request_body = PutFlows,
    responses((status = 202, body = Deployment), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody), (status = 413, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
async fn put_flows(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Document(body): Document<PutFlows>,
) -> ApiResult<(StatusCode, Json<Deployment>)> {
    let i = load_for_deploy(&state, &caller, &id).await?;
    let (mut flows, name, probe) = match body {
        PutFlows::Array(a) => (Value::Array(a), None, None),
        PutFlows::Object(o) => (o.flows, o.snapshot_name, o.probe),
    };
    check_flows(&flows, "flows")?;
    if let Some(p) = &probe {
        p.check("probe")?;
    }
    let name = name.unwrap_or_else(|| format!("Flows deployed by {}", caller.username));
    check_display_name("snapshot_name", &name)?;
    // Before the snapshot: a 409 leaves nothing behind.
    deployments::ensure_idle(&state, &i).await?;
    let mut content = snapshots::current(&state, &i.id).await?;
    content.credentials = snapshots::take_inline_credentials(
        &mut flows,
        &content.credentials,
        &state.key.derive("credentials", &i.id),
    )
    .map_err(|e| ApiError::Internal(anyhow::anyhow!("the instance's credentials: {e}")))?;
    content.flows = flows;
    let mut tx = state.store.write().await?;
    let s = snapshots::insert(&mut tx, Some(&caller), &i, &name, "", &content).await?;
    tx.commit().await?;
    let d = deployments::begin(&state, &caller, &i, &s.id, &content, Scope::Flows, probe).await?;
    Ok((StatusCode::ACCEPTED, Json(d)))
}

/// A deploy (viewers).
#[utoipa::path(get, path = "/api/v1/deployments/{id}", tag = "snapshots", params(("id" = String, Path, description = "Deployment id")),
    responses((status = 200, body = Deployment), (status = 404, body = crate::error::ErrorBody)))]
async fn get_deployment(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Deployment>> {
    let d = deployments::load(&state, &id).await?;
    load_for(&state, &caller, &d.instance_id, Action::Read)
        .await
        .map_err(|e| match e {
            ApiError::NotFound(_) => ApiError::NotFound(format!("no deployment {id}")),
            other => other,
        })?;
    Ok(Json(d))
}

/// The instance's deploys, newest first (viewers). `cursor` is the `next_cursor` of the page
/// before.
#[utoipa::path(get, path = "/api/v1/instances/{id}/deployments", tag = "snapshots", params(("id" = String, Path, description = "Instance id"), PageQuery),
    responses((status = 200, body = Page<Deployment>), (status = 404, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
async fn list_deployments(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<PageQuery>,
) -> ApiResult<Json<Page<Deployment>>> {
    let i = load_for(&state, &caller, &id, Action::Read).await?;
    let limit = q.limit()?;
    let items = deployments::list(&state, &i.id, q.after(), limit + 1).await?;
    Ok(Json(Page::from_overfetch(items, limit, |d| d.id.clone())))
}
