//! The storage API replicas read and save their flows through (Node-RED's `storageModule`, as
//! `settings.js` sets it up): `/api/v1/storage/{instance id}/...`, authenticated with the
//! instance's storage token (`Authorization: Bearer <token>`), which Tandem derives from its
//! platform key and hands each replica on standard input. No user credential opens it, and the
//! token opens nothing else.
//!
//! - A deploy from the editor of a non-HA instance is in the store at once (`PUT .../flows`,
//!   `PUT .../credentials`), and the coordinator is told that the replica runs it, so it does
//!   not deploy it back.
//! - HA replicas have no editor: what they save is the echo of a deploy Tandem made from the
//!   store, and is not written back (a late echo must not undo a newer deploy).
//! - An instance made before flows lived in the store has `in_store: false` until its first
//!   replica hands over its own `flows.json` and `flows_cred.json` (`POST .../flows/import`),
//!   once: the first import wins and every replica then reads the store.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::Row;
use tandem_coordinator::replica::ReplicaId;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, ApiResult, Document, Json};
use crate::snapshots;
use crate::state::AppState;

pub(super) fn router(max_document_bytes: usize) -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(get_flows, put_flows))
        .routes(routes!(import_flows))
        .routes(routes!(put_credentials))
        .layer(axum::extract::DefaultBodyLimit::max(max_document_bytes))
}

/// The header a replica names itself with: `<instance>-r<slot>`.
const REPLICA_HEADER: &str = "x-tandem-replica";

/// A request with the storage token of the instance in its path (`/storage/{id}/...`); 401
/// otherwise, before the body is read. Digests are compared, so the time taken says nothing
/// about the token.
pub struct StorageToken {
    /// The instance.
    pub instance_id: String,
    /// The replica that called, as it names itself.
    pub replica: Option<String>,
}

impl axum::extract::FromRequestParts<AppState> for StorageToken {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let Path(id) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::NotFound("no such storage route".into()))?;
        let given = parts
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        let expected = state.key.derive("storage", &id);
        if Sha256::digest(given.as_bytes()) != Sha256::digest(expected.as_bytes()) {
            return Err(ApiError::Unauthorized(
                "the storage API takes the instance's storage token only".into(),
            ));
        }
        Ok(Self {
            instance_id: id,
            replica: parts
                .headers
                .get(REPLICA_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        })
    }
}

/// What a replica reads.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct StoredFlows {
    /// The flows array.
    #[schema(value_type = Vec<Object>)]
    pub flows: Value,
    /// The credentials, encrypted with the instance's credential secret (`{"$": ...}`), or `{}`.
    #[schema(value_type = Object)]
    pub credentials: Value,
    /// Their revision.
    pub rev: String,
    /// False for an instance whose flows are still in its replicas' files (made before flows
    /// lived in the store): the replica imports its own.
    pub in_store: bool,
}

struct Row_ {
    flows: String,
    credentials: String,
    in_store: bool,
    ha: bool,
}

async fn row(state: &AppState, id: &str) -> ApiResult<Row_> {
    let r = sqlx::query(
        "SELECT flows, credentials, flows_in_store, ha_replicas FROM instances WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(&state.store.pool)
    .await?
    .ok_or_else(|| ApiError::NotFound(format!("no instance {id}")))?;
    Ok(Row_ {
        flows: r.get(0),
        credentials: r.get(1),
        in_store: r.get::<i64, _>(2) != 0,
        ha: r.get::<Option<i64>, _>(3).is_some(),
    })
}

fn stored(r: &Row_) -> StoredFlows {
    let f = snapshots::flows_of(&r.flows, &r.credentials);
    StoredFlows {
        flows: (*f.value).clone(),
        credentials: (*f.credentials).clone(),
        rev: f.rev,
        in_store: r.in_store,
    }
}

/// The instance's flows and credentials (its storage token).
#[utoipa::path(get, path = "/api/v1/storage/{id}/flows", tag = "storage", params(("id" = String, Path, description = "Instance id")),
    responses((status = 200, body = StoredFlows), (status = 401, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
async fn get_flows(
    State(state): State<AppState>,
    token: StorageToken,
) -> ApiResult<Json<StoredFlows>> {
    Ok(Json(stored(&row(&state, &token.instance_id).await?)))
}

/// A replica's own flows files, handed to the store.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Import {
    /// Its `flows.json`.
    #[schema(value_type = Vec<Object>)]
    pub flows: Value,
    /// Its `flows_cred.json`, as Node-RED wrote it.
    #[schema(value_type = Object)]
    pub credentials: Value,
}

/// Hands a replica's own flows to the store, once (its storage token): the first import wins;
/// the answer is what the store holds.
#[utoipa::path(post, path = "/api/v1/storage/{id}/flows/import", tag = "storage", params(("id" = String, Path, description = "Instance id")), request_body = Import,
    responses((status = 200, body = StoredFlows), (status = 401, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 413, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
async fn import_flows(
    State(state): State<AppState>,
    token: StorageToken,
    Document(body): Document<Import>,
) -> ApiResult<Json<StoredFlows>> {
    let id = token.instance_id.clone();
    super::snapshots::check_flows(&body.flows, "flows")?;
    if !body.credentials.is_object() {
        return Err(ApiError::invalid("credentials", "must be an object"));
    }
    let mut tx = state.store.write().await?;
    let done = sqlx::query(
        "UPDATE instances SET flows = $1, credentials = $2, flows_in_store = 1 WHERE id = $3 AND flows_in_store = 0",
    )
    .bind(body.flows.to_string())
    .bind(body.credentials.to_string())
    .bind(&id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if done == 1 {
        let team: String = sqlx::query("SELECT team_id FROM instances WHERE id = $1")
            .bind(&id)
            .fetch_one(&mut *tx)
            .await?
            .get(0);
        crate::audit::record(
            &mut tx,
            None,
            "instance.flows-imported",
            crate::audit::Subject::instance(&team, &id),
            serde_json::json!({ "replica": token.replica, "flow_entries": body.flows.as_array().map_or(0, Vec::len) }),
        )
        .await?;
    }
    tx.commit().await?;
    if done == 1 {
        state.coordinator.changed();
    }
    Ok(Json(stored(&row(&state, &id).await?)))
}

/// Saves flows a replica's editor deployed (its storage token). 204 whether written or not: an
/// HA replica's save is the echo of Tandem's own deploy and is not written back.
#[utoipa::path(put, path = "/api/v1/storage/{id}/flows", tag = "storage", params(("id" = String, Path, description = "Instance id")), request_body = Vec<Object>,
    responses((status = 204), (status = 401, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 413, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
async fn put_flows(
    State(state): State<AppState>,
    token: StorageToken,
    Document(flows): Document<Value>,
) -> ApiResult<StatusCode> {
    super::snapshots::check_flows(&flows, "flows")?;
    save(&state, &token, Some(flows), None).await
}

/// Saves credentials a replica's editor deployed, encrypted (its storage token).
#[utoipa::path(put, path = "/api/v1/storage/{id}/credentials", tag = "storage", params(("id" = String, Path, description = "Instance id")), request_body = Object,
    responses((status = 204), (status = 401, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 413, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
async fn put_credentials(
    State(state): State<AppState>,
    token: StorageToken,
    Document(credentials): Document<Value>,
) -> ApiResult<StatusCode> {
    if !credentials.is_object() {
        return Err(ApiError::invalid("body", "credentials must be an object"));
    }
    save(&state, &token, None, Some(credentials)).await
}

/// Writes what a non-HA replica saved, when it differs from the store, and tells the
/// coordinator that the replica runs it. Node-RED saves credentials first, then the flows (every
/// deploy saves the flows), so the revision is told with the flows.
async fn save(
    state: &AppState,
    token: &StorageToken,
    flows: Option<Value>,
    credentials: Option<Value>,
) -> ApiResult<StatusCode> {
    let id = token.instance_id.as_str();
    let now = row(state, id).await?;
    if now.ha {
        return Ok(StatusCode::NO_CONTENT);
    }
    let flows_text = flows.as_ref().map_or(now.flows.clone(), Value::to_string);
    let creds_text = credentials
        .as_ref()
        .map_or(now.credentials.clone(), Value::to_string);
    let rev = snapshots::flows_of(&flows_text, &creds_text).rev;
    // Compared by revision, not text: Node-RED writes the JSON its own way, and the echo of a
    // deploy Tandem made is the same flows.
    let changed = rev != snapshots::flows_of(&now.flows, &now.credentials).rev || !now.in_store;
    if changed {
        let mut tx = state.store.write().await?;
        sqlx::query(
            "UPDATE instances SET flows = $1, credentials = $2, flows_in_store = 1, updated_at = $3 WHERE id = $4",
        )
        .bind(&flows_text)
        .bind(&creds_text)
        .bind(crate::store::now_ms())
        .bind(id)
        .execute(&mut *tx)
        .await?;
        if flows.is_some() {
            let team: String = sqlx::query("SELECT team_id FROM instances WHERE id = $1")
                .bind(id)
                .fetch_one(&mut *tx)
                .await?
                .get(0);
            crate::audit::record(
                &mut tx,
                None,
                "instance.flows-deployed",
                crate::audit::Subject::instance(&team, id),
                serde_json::json!({ "replica": token.replica, "rev": rev, "from": "editor" }),
            )
            .await?;
        }
        tx.commit().await?;
    }
    if flows.is_some() {
        if let Some(r) = token.replica.as_deref().and_then(ReplicaId::parse) {
            state.coordinator.flows_saved(id, r.slot, &rev);
        }
        if changed {
            state.coordinator.changed();
        }
    }
    Ok(StatusCode::NO_CONTENT)
}
