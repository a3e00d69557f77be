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
//!   replica hands over its own `flows.json`, `flows_cred.json` and library (`POST
//!   .../flows/import`), once: the first import wins and every replica then reads the store.
//! - The editor's palette manager (non-HA instances) records what it installs and removes in
//!   the instance's module list (`POST .../modules`), under the template's module policy.
//! - The editor's library (saved flows, functions, templates) lives here too (`GET,PUT
//!   .../library`), with the answers Node-RED's own file library gives: an entry's body, or a
//!   folder's listing (its folders' names, then its entries' metadata with `fn`).

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
        .routes(routes!(get_library, put_library))
        .routes(routes!(palette_change))
        .layer(axum::extract::DefaultBodyLimit::max(max_document_bytes))
}

fn empty_object() -> Value {
    Value::Object(serde_json::Map::new())
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
    team_id: String,
    flows: String,
    credentials: String,
    in_store: bool,
    ha: bool,
}

async fn row(state: &AppState, id: &str) -> ApiResult<Row_> {
    let r = sqlx::query(
        "SELECT flows, credentials, flows_in_store, ha_replicas, team_id FROM instances WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(&state.store.pool)
    .await?
    .ok_or_else(|| ApiError::NotFound(format!("no instance {id}")))?;
    Ok(Row_ {
        team_id: r.get(4),
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
    /// Its `flows.json`; absent when it has none (it never saved flows): the store's stay.
    #[schema(value_type = Option<Vec<Object>>)]
    pub flows: Option<Value>,
    /// Its `flows_cred.json`, as Node-RED wrote it.
    #[serde(default = "empty_object")]
    #[schema(value_type = Object)]
    pub credentials: Value,
    /// Its library (`<userDir>/lib`).
    #[serde(default)]
    pub library: Vec<LibraryEntry>,
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
    let now = row(&state, &id).await?;
    // Credentials inline in the flows (as Tandem 0.1 kept the flows given at creation) are
    // encrypted for the instance: the store never holds them in clear.
    let (mut flows, given) = match body.flows {
        Some(flows) => {
            super::snapshots::check_flows(&flows, "flows")?;
            (flows, body.credentials.clone())
        }
        None => (
            crate::api::json_text(&now.flows),
            crate::api::json_text(&now.credentials),
        ),
    };
    let credentials = crate::snapshots::take_inline_credentials(
        &mut flows,
        &given,
        &state.key.derive("credentials", &id),
    )
    .map_err(|e| ApiError::invalid("credentials", e.to_string()))?;
    let mut tx = state.store.write().await?;
    let done = sqlx::query(
        "UPDATE instances SET flows = $1, credentials = $2, flows_in_store = 1 WHERE id = $3 AND flows_in_store = 0",
    )
    .bind(flows.to_string())
    .bind(credentials.to_string())
    .bind(&id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if done == 1 {
        for entry in &body.library {
            let (kind, path) = entry.checked()?;
            upsert_library(&mut tx, &id, &kind, &path, entry).await?;
        }
        crate::audit::record(
            &mut tx,
            None,
            "instance.flows-imported",
            crate::audit::Subject::instance(&now.team_id, &id),
            serde_json::json!({ "replica": token.replica, "flow_entries": flows.as_array().map_or(0, Vec::len), "library_entries": body.library.len() }),
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
            crate::audit::record(
                &mut tx,
                None,
                "instance.flows-deployed",
                crate::audit::Subject::instance(&now.team_id, id),
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

/// What the editor's palette manager did: installed `module` at `version`, or removed it
/// (`version` null).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PaletteChange {
    /// The package name.
    pub module: String,
    /// The exact version installed; null for a removal.
    pub version: Option<String>,
}

/// Records a module the editor's palette installed or removed in the instance's module list
/// (its storage token): the replica runs it already, so it is not replaced for it, and the next
/// start, a snapshot and a deploy see it. Refused (and the install fails in the editor) on an
/// HA instance, whose palette is off, while a deploy is under way, or when the instance's
/// template does not allow the module.
#[utoipa::path(post, path = "/api/v1/storage/{id}/modules", tag = "storage", params(("id" = String, Path, description = "Instance id")), request_body = PaletteChange,
    responses((status = 204), (status = 401, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
async fn palette_change(
    State(state): State<AppState>,
    token: StorageToken,
    Json(change): Json<PaletteChange>,
) -> ApiResult<StatusCode> {
    let id = token.instance_id.as_str();
    super::modules::check_name("module", &change.module)?;
    if let Some(v) = &change.version {
        super::modules::check_version("version", v)?;
    }
    let i = super::instances::load_any(&state, id).await?;
    if i.ha.is_some() {
        return Err(ApiError::Conflict(
            "the palette is off on HA instances: set their modules through the API".into(),
        ));
    }
    crate::deployments::ensure_idle(&state, &i).await?;
    let mut tx = state.store.write().await?;
    let text: String = sqlx::query("SELECT modules FROM instances WHERE id = $1")
        .bind(id)
        .fetch_one(&mut *tx)
        .await?
        .get(0);
    let before: std::collections::BTreeMap<String, String> =
        serde_json::from_str(&text).unwrap_or_default();
    let mut after = before.clone();
    match &change.version {
        Some(v) => {
            after.insert(change.module.clone(), v.clone());
        }
        None => {
            after.remove(&change.module);
        }
    }
    super::modules::check("modules", &after)?;
    super::modules::check_policy(&state, &i, after.keys()).await?;
    if after != before {
        sqlx::query("UPDATE instances SET modules = $1, updated_at = $2 WHERE id = $3")
            .bind(serde_json::json!(after).to_string())
            .bind(crate::store::now_ms())
            .bind(id)
            .execute(&mut *tx)
            .await?;
        crate::audit::record(
            &mut tx,
            None,
            "instance.modules-set",
            crate::audit::Subject::instance(&i.team_id, id),
            serde_json::json!({ "before": before, "after": after, "replica": token.replica, "from": "editor" }),
        )
        .await?;
    }
    tx.commit().await?;
    if after != before {
        if let Some(r) = token.replica.as_deref().and_then(ReplicaId::parse) {
            state.coordinator.modules_saved(id, r.slot, &after);
        }
        state.coordinator.changed();
    }
    Ok(StatusCode::NO_CONTENT)
}

/// One entry of the editor's library, as a replica saves it.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LibraryEntry {
    /// `flows`, `functions`, a node's type...: letters, digits, `-`, `_`, `.`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `/`-separated, relative, without `..`.
    pub path: String,
    /// Its metadata (name, description...), shown in folder listings.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub meta: serde_json::Map<String, Value>,
    /// Its content.
    pub body: String,
}

impl LibraryEntry {
    /// The type and path, checked; a `flows` entry's path ends in `.json`, as Node-RED's file
    /// library stores it.
    fn checked(&self) -> ApiResult<(String, String)> {
        let kind = check_type(&self.kind)?;
        let mut path = check_path(&self.path)?;
        if path.is_empty() || path.ends_with('/') {
            return Err(ApiError::invalid(
                "path",
                "must name an entry, not a folder",
            ));
        }
        if kind == "flows" && !path.ends_with(".json") {
            path.push_str(".json");
        }
        Ok((kind, path))
    }
}

fn check_type(kind: &str) -> ApiResult<String> {
    let ok = !kind.is_empty()
        && kind.len() <= 64
        && kind
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !kind.starts_with('.');
    if !ok {
        return Err(ApiError::invalid(
            "type",
            "must be 1 to 64 letters, digits, '-', '_' or '.', not starting with '.'",
        ));
    }
    Ok(kind.to_owned())
}

fn check_path(path: &str) -> ApiResult<String> {
    let ok = path.len() <= 1024
        && !path.starts_with('/')
        && !path.chars().any(|c| c.is_control() || c == '\\')
        && path.split('/').all(|seg| seg != ".." && seg != ".");
    if !ok {
        return Err(ApiError::invalid(
            "path",
            "must be a relative '/'-separated path of at most 1024 characters, without '..'",
        ));
    }
    Ok(path.to_owned())
}

async fn upsert_library(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    id: &str,
    kind: &str,
    path: &str,
    entry: &LibraryEntry,
) -> ApiResult<()> {
    sqlx::query(
        "INSERT INTO library_entries (instance_id, type, path, meta, body, updated_at) VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (instance_id, type, path) DO UPDATE SET meta = excluded.meta, body = excluded.body, updated_at = excluded.updated_at",
    )
    .bind(id)
    .bind(kind)
    .bind(path)
    .bind(Value::Object(entry.meta.clone()).to_string())
    .bind(&entry.body)
    .bind(crate::store::now_ms())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Which library entry or folder.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct LibraryQuery {
    /// `flows`, `functions`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// An entry, or a folder (empty for the top, or ending in `/`).
    #[serde(default)]
    pub path: String,
}

/// An entry's body, or a folder's listing.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LibraryAnswer {
    /// The entry's content.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// The folder's folders (names), then its entries (their metadata and `fn`, their name).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub listing: Option<Vec<Value>>,
}

/// A library entry or folder of the instance (its storage token).
#[utoipa::path(get, path = "/api/v1/storage/{id}/library", tag = "storage", params(("id" = String, Path, description = "Instance id"), LibraryQuery),
    responses((status = 200, body = LibraryAnswer), (status = 401, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
async fn get_library(
    State(state): State<AppState>,
    token: StorageToken,
    crate::error::Query(q): crate::error::Query<LibraryQuery>,
) -> ApiResult<Json<LibraryAnswer>> {
    let kind = check_type(&q.kind)?;
    let path = check_path(&q.path)?;
    let rows = sqlx::query(
        "SELECT path, meta, body FROM library_entries WHERE instance_id = $1 AND type = $2",
    )
    .bind(&token.instance_id)
    .bind(&kind)
    .fetch_all(&state.store.pool)
    .await?;
    let entries: Vec<(String, String, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let folder = path.is_empty() || path.ends_with('/');
    if !folder {
        let json = format!("{path}.json");
        let exact = entries.iter().find(|e| e.0 == path).or_else(|| {
            (kind == "flows" && !path.ends_with(".json"))
                .then(|| entries.iter().find(|e| e.0 == json))
                .flatten()
        });
        if let Some(e) = exact {
            return Ok(Json(LibraryAnswer {
                body: Some(e.2.clone()),
                listing: None,
            }));
        }
    }
    let prefix = if path.is_empty() || path.ends_with('/') {
        path.clone()
    } else {
        format!("{path}/")
    };
    let mut folders = std::collections::BTreeSet::new();
    let mut files = Vec::new();
    for (p, meta, _) in &entries {
        let Some(rest) = p.strip_prefix(prefix.as_str()) else {
            continue;
        };
        match rest.split_once('/') {
            Some((dir, _)) => {
                folders.insert(dir.to_owned());
            }
            None => {
                let mut m = match serde_json::from_str::<Value>(meta) {
                    Ok(Value::Object(m)) => m,
                    _ => serde_json::Map::new(),
                };
                m.insert("fn".into(), Value::String(rest.to_owned()));
                files.push((rest.to_owned(), Value::Object(m)));
            }
        }
    }
    if folders.is_empty() && files.is_empty() && !folder {
        return Err(ApiError::NotFound(format!(
            "no library entry {kind}/{path}"
        )));
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    let listing = folders
        .into_iter()
        .map(Value::String)
        .chain(files.into_iter().map(|(_, m)| m))
        .collect();
    Ok(Json(LibraryAnswer {
        body: None,
        listing: Some(listing),
    }))
}

/// Saves a library entry from the instance's editor (its storage token).
#[utoipa::path(put, path = "/api/v1/storage/{id}/library", tag = "storage", params(("id" = String, Path, description = "Instance id")), request_body = LibraryEntry,
    responses((status = 204), (status = 401, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 413, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
async fn put_library(
    State(state): State<AppState>,
    token: StorageToken,
    Document(entry): Document<LibraryEntry>,
) -> ApiResult<StatusCode> {
    let (kind, path) = entry.checked()?;
    row(&state, &token.instance_id).await?;
    let mut tx = state.store.write().await?;
    upsert_library(&mut tx, &token.instance_id, &kind, &path, &entry).await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}
