//! Snapshots: immutable records of an instance's state (flows, credentials still encrypted,
//! settings overrides, environment with secrets sealed, modules, Node-RED version), what a
//! deploy, a rollback or a pipeline moves; and the instance's flows as the store keeps them.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use sqlx::Row;
use tandem_coordinator::spec::Flows;

use crate::api::instances::Instance;
use crate::api::json_text;
use crate::auth::Caller;
use crate::env_secrets::{self, EnvShown, EnvStored};
use crate::error::{ApiError, ApiResult};
use crate::node_credentials;
use crate::state::AppState;
use crate::store::{new_id, now_ms};

/// What a snapshot holds of an instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Content {
    /// The flows array.
    pub flows: Value,
    /// `{"$": ...}` encrypted with the instance's credential secret, or `{}`.
    pub credentials: Value,
    /// The instance's own settings (overrides).
    pub settings: Value,
    /// The instance's own variables, secrets sealed for the instance.
    pub env: BTreeMap<String, EnvStored>,
    /// npm modules the flows use, name → version or range.
    pub modules: Value,
    /// The stack's Node-RED version when it was taken.
    pub nodered_version: String,
}

impl Content {
    /// SHA-256 of the content, hex.
    pub fn sha256(&self) -> String {
        let doc = json!({
            "flows": self.flows,
            "credentials": self.credentials,
            "settings": self.settings,
            "env": self.env,
            "modules": self.modules,
            "nodered_version": self.nodered_version,
        });
        crate::store::hex(&Sha256::digest(doc.to_string().as_bytes()))
    }

    /// The flows and credentials as the coordinator deploys them.
    pub fn flows(&self) -> Flows {
        Flows::with_credentials(self.flows.clone(), self.credentials.clone())
    }
}

/// The instance's flows and credentials as the store holds them now, with their revision.
pub async fn stored_flows(state: &AppState, instance_id: &str) -> ApiResult<Flows> {
    let row = sqlx::query("SELECT flows, credentials FROM instances WHERE id = $1")
        .bind(instance_id)
        .fetch_optional(&state.store.pool)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no instance {instance_id}")))?;
    Ok(flows_of(&row.get::<String, _>(0), &row.get::<String, _>(1)))
}

/// Flows and credentials from their stored text: what the coordinator is given and what
/// revisions are computed from, so both agree.
pub fn flows_of(flows: &str, credentials: &str) -> Flows {
    let flows = serde_json::from_str(flows).unwrap_or_else(|_| json!([]));
    let credentials = serde_json::from_str(credentials).unwrap_or_else(|_| json!({}));
    Flows::with_credentials(flows, credentials)
}

/// The instance's state now.
pub async fn current(state: &AppState, instance_id: &str) -> ApiResult<Content> {
    let row = sqlx::query(
        "SELECT i.flows, i.credentials, i.settings, i.env, s.nodered_version, i.modules FROM instances i JOIN stacks s ON s.id = i.stack_id WHERE i.id = $1",
    )
    .bind(instance_id)
    .fetch_optional(&state.store.pool)
    .await?
    .ok_or_else(|| ApiError::NotFound(format!("no instance {instance_id}")))?;
    Ok(Content {
        flows: json_text(&row.get::<String, _>(0)),
        credentials: json_text(&row.get::<String, _>(1)),
        settings: json_text(&row.get::<String, _>(2)),
        env: env_secrets::parse_stored(&row.get::<String, _>(3)),
        modules: json_text(&row.get::<String, _>(5)),
        nodered_version: row.get(4),
    })
}

/// A snapshot's metadata, as every reader sees it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Snapshot {
    /// Id.
    pub id: String,
    /// The instance it was taken of (or imported into).
    pub instance_id: String,
    /// The instance's team.
    pub team_id: String,
    /// Name.
    pub name: String,
    /// Description.
    pub description: String,
    /// Who took it (`system` for the ones a deploy takes).
    pub author: String,
    /// When, epoch ms.
    pub created_at: i64,
    /// The stack's Node-RED version then.
    pub nodered_version: String,
    /// SHA-256 of its content, hex.
    pub sha256: String,
    /// Entries of its flows array (nodes, tabs, groups...).
    pub flow_entries: usize,
}

/// A snapshot with its content (members): flows, settings, environment (secrets masked),
/// modules. Credentials are not shown; export them re-encrypted.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SnapshotFull {
    /// The metadata.
    #[serde(flatten)]
    pub snapshot: Snapshot,
    /// The flows array.
    #[schema(value_type = Vec<Object>)]
    pub flows: Value,
    /// Whether it holds credentials (encrypted).
    pub has_credentials: bool,
    /// The instance's own settings then.
    #[schema(value_type = Object)]
    pub settings: Value,
    /// The instance's own variables then; secrets as `{"secret": true}`.
    pub env: BTreeMap<String, EnvShown>,
    /// npm modules.
    #[schema(value_type = Object)]
    pub modules: Value,
}

const SNAPSHOT_COLUMNS: &str = "id, instance_id, team_id, name, description, author, created_at, nodered_version, sha256, flows, credentials, settings, env, modules";

fn from_row(r: &sqlx::any::AnyRow) -> (Snapshot, Content) {
    let content = Content {
        flows: json_text(&r.get::<String, _>(9)),
        credentials: json_text(&r.get::<String, _>(10)),
        settings: json_text(&r.get::<String, _>(11)),
        env: env_secrets::parse_stored(&r.get::<String, _>(12)),
        modules: json_text(&r.get::<String, _>(13)),
        nodered_version: r.get(7),
    };
    let snapshot = Snapshot {
        id: r.get(0),
        instance_id: r.get(1),
        team_id: r.get(2),
        name: r.get(3),
        description: r.get(4),
        author: r.get(5),
        created_at: r.get(6),
        nodered_version: r.get(7),
        sha256: r.get(8),
        flow_entries: content.flows.as_array().map_or(0, Vec::len),
    };
    (snapshot, content)
}

impl SnapshotFull {
    /// The full view of a snapshot.
    pub fn new(snapshot: Snapshot, content: &Content) -> Self {
        Self {
            snapshot,
            flows: content.flows.clone(),
            has_credentials: content
                .credentials
                .as_object()
                .is_some_and(|c| !c.is_empty()),
            settings: content.settings.clone(),
            env: env_secrets::shown_stored(&content.env),
            modules: content.modules.clone(),
        }
    }
}

/// A snapshot and its content.
pub async fn load(state: &AppState, id: &str) -> ApiResult<(Snapshot, Content)> {
    let row = sqlx::query(&format!(
        "SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(&state.store.pool)
    .await?
    .ok_or_else(|| ApiError::NotFound(format!("no snapshot {id}")))?;
    Ok(from_row(&row))
}

/// Snapshots of an instance, oldest first, a page after `after`.
pub async fn list(
    state: &AppState,
    instance_id: &str,
    after: &str,
    limit: i64,
) -> ApiResult<Vec<Snapshot>> {
    let rows = sqlx::query(&format!(
        "SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE instance_id = $1 AND id > $2 ORDER BY id LIMIT $3"
    ))
    .bind(instance_id)
    .bind(after)
    .bind(limit)
    .fetch_all(&state.store.pool)
    .await?;
    Ok(rows.iter().map(|r| from_row(r).0).collect())
}

/// Records a snapshot of `instance` holding `content`, with its audit entry.
pub async fn insert(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    caller: Option<&Caller>,
    instance: &Instance,
    name: &str,
    description: &str,
    content: &Content,
) -> ApiResult<Snapshot> {
    let snapshot = Snapshot {
        id: new_id(),
        instance_id: instance.id.clone(),
        team_id: instance.team_id.clone(),
        name: name.to_owned(),
        description: description.to_owned(),
        author: caller.map_or_else(|| "system".to_owned(), |c| c.username.clone()),
        created_at: now_ms(),
        nodered_version: content.nodered_version.clone(),
        sha256: content.sha256(),
        flow_entries: content.flows.as_array().map_or(0, Vec::len),
    };
    sqlx::query(
        "INSERT INTO snapshots (id, instance_id, team_id, name, description, author_id, author, created_at, nodered_version, flows, credentials, settings, env, modules, sha256) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
    )
    .bind(&snapshot.id)
    .bind(&snapshot.instance_id)
    .bind(&snapshot.team_id)
    .bind(&snapshot.name)
    .bind(&snapshot.description)
    .bind(caller.map(|c| c.id.clone()))
    .bind(&snapshot.author)
    .bind(snapshot.created_at)
    .bind(&snapshot.nodered_version)
    .bind(content.flows.to_string())
    .bind(content.credentials.to_string())
    .bind(content.settings.to_string())
    .bind(json!(content.env).to_string())
    .bind(content.modules.to_string())
    .bind(&snapshot.sha256)
    .execute(&mut **tx)
    .await?;
    crate::audit::record(
        tx,
        caller,
        "snapshot.created",
        crate::audit::Subject::of_instance(
            &instance.team_id,
            &instance.id,
            "snapshot",
            &snapshot.id,
        ),
        json!({ "name": name, "sha256": snapshot.sha256 }),
    )
    .await?;
    Ok(snapshot)
}

/// `content` of instance `from` with its credentials re-encrypted with `to`'s credential secret.
pub fn rebind_credentials(
    state: &AppState,
    content: &Content,
    from: &str,
    to: &str,
) -> ApiResult<Content> {
    if from == to {
        return Ok(content.clone());
    }
    let credentials = node_credentials::reencrypt(
        &content.credentials,
        &state.key.derive("credentials", from),
        &state.key.derive("credentials", to),
    )
    .map_err(|e| ApiError::Internal(anyhow::anyhow!("snapshot credentials: {e}")))?;
    Ok(Content {
        credentials,
        ..content.clone()
    })
}

/// Takes the credentials a flows array carries inline (`"credentials"` on a node, as the flows a
/// script sends may) out of it, and merges them over `stored` (encrypted with `secret`): the
/// credentials of nodes no longer in the flows go, as in a deploy from Node-RED's editor.
pub fn take_inline_credentials(
    flows: &mut Value,
    stored: &Value,
    secret: &str,
) -> Result<Value, node_credentials::CredentialsError> {
    let mut inline = Map::new();
    let mut ids = std::collections::HashSet::new();
    for node in flows.as_array_mut().into_iter().flatten() {
        let Some(obj) = node.as_object_mut() else {
            continue;
        };
        let id = obj.get("id").and_then(Value::as_str).map(str::to_owned);
        if let Some(id) = id {
            if let Some(c) = obj.remove("credentials") {
                inline.insert(id.clone(), c);
            }
            ids.insert(id);
        }
    }
    let mut creds = node_credentials::decrypt(stored, secret)?;
    if inline.is_empty() && creds.keys().all(|k| ids.contains(k)) {
        return Ok(stored.clone());
    }
    creds.retain(|k, _| ids.contains(k));
    for (id, c) in inline {
        creds.insert(id, c);
    }
    node_credentials::encrypt(&creds, secret)
}

/// The document `POST /snapshots/{id}/export` returns and `.../snapshots/import` takes: the
/// snapshot, self-contained, its credentials and secret variables encrypted with the secret the
/// caller chose.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExportDocument {
    /// Format version: 1.
    pub tandem_snapshot: u32,
    /// Name.
    pub name: String,
    /// Description.
    #[serde(default)]
    pub description: String,
    /// Who took it.
    #[serde(default)]
    pub author: String,
    /// When, epoch ms.
    #[serde(default)]
    pub created_at: i64,
    /// Node-RED version.
    pub nodered_version: String,
    /// The flows array.
    #[schema(value_type = Vec<Object>)]
    pub flows: Value,
    /// `{"$": ...}` encrypted with the export's credential secret (Node-RED's format), or `{}`.
    #[schema(value_type = Object)]
    pub credentials: Value,
    /// Settings overrides.
    #[schema(value_type = Object)]
    pub settings: Value,
    /// Plain variables, and `{"secret": true}` for the secret ones, whose values are in
    /// `env_secrets`.
    pub env: BTreeMap<String, EnvShown>,
    /// The secret variables' values, name → value, encrypted like `credentials`.
    #[schema(value_type = Object)]
    pub env_secrets: Value,
    /// npm modules.
    #[schema(value_type = Object)]
    pub modules: Value,
}

/// Exports `content` of instance `instance_id`, its secrets encrypted with `secret`.
pub fn export(
    state: &AppState,
    snapshot: &Snapshot,
    content: &Content,
    secret: &str,
) -> ApiResult<ExportDocument> {
    let instance_secret = state.key.derive("credentials", &snapshot.instance_id);
    let credentials =
        node_credentials::reencrypt(&content.credentials, &instance_secret, secret)
            .map_err(|e| ApiError::Internal(anyhow::anyhow!("snapshot credentials: {e}")))?;
    let mut secrets = Map::new();
    for (name, v) in &content.env {
        if let EnvStored::Secret { sealed, .. } = v {
            let value = env_secrets::open(&state.key, &snapshot.instance_id, name, sealed)
                .ok_or_else(|| {
                    ApiError::Internal(anyhow::anyhow!(
                        "the secret variable {name} of the snapshot does not open"
                    ))
                })?;
            secrets.insert(name.clone(), Value::String(value));
        }
    }
    Ok(ExportDocument {
        tandem_snapshot: 1,
        name: snapshot.name.clone(),
        description: snapshot.description.clone(),
        author: snapshot.author.clone(),
        created_at: snapshot.created_at,
        nodered_version: content.nodered_version.clone(),
        flows: content.flows.clone(),
        credentials,
        settings: content.settings.clone(),
        env: env_secrets::shown_stored(&content.env),
        env_secrets: node_credentials::encrypt(&secrets, secret)
            .map_err(|e| ApiError::Internal(anyhow::anyhow!("{e}")))?,
        modules: content.modules.clone(),
    })
}

/// The content of an exported document for instance `instance_id`: credentials decrypted with
/// `secret` and encrypted with the instance's; secret variables sealed for it.
pub fn import(
    state: &AppState,
    doc: &ExportDocument,
    secret: &str,
    instance_id: &str,
) -> ApiResult<Content> {
    if doc.tandem_snapshot != 1 {
        return Err(ApiError::invalid(
            "snapshot.tandem_snapshot",
            format!(
                "format {} is not known; this Tandem reads 1",
                doc.tandem_snapshot
            ),
        ));
    }
    crate::api::snapshots::check_flows(&doc.flows, "snapshot.flows")?;
    crate::node_settings::check("snapshot.settings", &doc.settings)?;
    let modules: std::collections::BTreeMap<String, String> =
        serde_json::from_value(doc.modules.clone()).map_err(|_| {
            ApiError::invalid(
                "snapshot.modules",
                "must be an object of module names and versions",
            )
        })?;
    crate::api::modules::check("snapshot.modules", &modules)?;
    fn bad_secret(field: &'static str) -> impl Fn(node_credentials::CredentialsError) -> ApiError {
        move |e| ApiError::invalid(field, format!("{e} (credential_secret)"))
    }
    let credentials = node_credentials::reencrypt(
        &doc.credentials,
        secret,
        &state.key.derive("credentials", instance_id),
    )
    .map_err(bad_secret("snapshot.credentials"))?;
    let secrets = node_credentials::decrypt(&doc.env_secrets, secret)
        .map_err(bad_secret("snapshot.env_secrets"))?;
    let mut env = BTreeMap::new();
    let mut values = BTreeMap::new();
    for (name, v) in &doc.env {
        let stored = match v {
            EnvShown::Plain(p) => {
                values.insert(name.clone(), p.clone());
                EnvStored::Plain(p.clone())
            }
            EnvShown::Secret { .. } => {
                let value = secrets.get(name).and_then(Value::as_str).ok_or_else(|| {
                    ApiError::invalid(
                        format!("snapshot.env.{name}"),
                        "is secret, and env_secrets holds no value for it",
                    )
                })?;
                values.insert(name.clone(), value.to_owned());
                EnvStored::Secret {
                    secret: true,
                    sealed: env_secrets::seal(&state.key, instance_id, name, value)?,
                }
            }
        };
        env.insert(name.clone(), stored);
    }
    crate::node_env::check("snapshot.env", values.iter().map(|(k, v)| (k, v.as_str())))?;
    Ok(Content {
        flows: doc.flows.clone(),
        credentials,
        settings: doc.settings.clone(),
        env,
        modules: doc.modules.clone(),
        nodered_version: doc.nodered_version.clone(),
    })
}
