//! Instances: create, read, change, delete, lifecycle actions, status and HA.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sqlx::Row;
use tandem_coordinator::spec::DesiredState;

use crate::env_secrets::{self, EnvInput, EnvShown, EnvStored};
use tandem_coordinator::status::ObservedStatus;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{authorize, json_text, templates, Page, PageQuery};
use crate::audit::{self, Subject};
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult, Json, Query};
use crate::node_settings::Refused;
use crate::roles::Action;
use crate::state::AppState;
use crate::store::{new_id, now_ms};

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_instance))
        .routes(routes!(get_instance, update_instance, delete_instance))
        .routes(routes!(list_team_instances))
        .routes(routes!(list_application_instances))
        .routes(routes!(instance_action))
        .routes(routes!(instance_status))
        .routes(routes!(get_ha, put_ha, delete_ha))
        .routes(routes!(get_protection, put_protection))
}

/// Names that cannot be instance names: they are, or may become, Tandem's own hosts.
pub const RESERVED_NAMES: &[&str] = &[
    "admin",
    "api",
    "app",
    "assets",
    "broker",
    "dashboard",
    "docs",
    "editor",
    "help",
    "login",
    "mail",
    "metrics",
    "mqtt",
    "static",
    "status",
    "tandem",
    "www",
    "ws",
];

/// How an HA instance runs its replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum HaMode {
    /// Requests spread over every healthy replica.
    #[default]
    Balanced,
    /// One active replica; the others wait with flows stopped.
    Standby,
}

impl HaMode {
    fn as_str(self) -> &'static str {
        match self {
            Self::Balanced => "balanced",
            Self::Standby => "standby",
        }
    }
}

/// HA settings of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Ha {
    /// Replicas, from 2 to the platform's maximum (default 8).
    pub replicas: i64,
    /// `balanced` (default) or `standby`.
    #[serde(default)]
    pub mode: HaMode,
    /// Balanced mode: keep each browser on one replica with a cookie (dashboards, socket.io and
    /// other sessions a replica holds). Omitted: the default, on. Standby mode serves from one
    /// replica and takes none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<bool>,
}

impl Ha {
    /// Whether the proxy keeps clients on their replica.
    pub fn affinity_on(&self) -> bool {
        self.mode == HaMode::Balanced && self.affinity.unwrap_or(true)
    }
}

/// An instance.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Instance {
    /// Id.
    pub id: String,
    /// Unique, DNS-safe; the host name is `<name>.<base domain>`.
    pub name: String,
    /// Where it is served: `http://<name>.<base domain>`, with the in-process proxy's port
    /// (`--http-listen`) unless that is 80.
    pub url: String,
    /// Owning team.
    pub team_id: String,
    /// Application.
    pub application_id: String,
    /// Stack (Node-RED version).
    pub stack_id: String,
    /// Template, if any.
    pub template_id: Option<String>,
    /// The instance's own settings (overrides).
    #[schema(value_type = Object)]
    pub settings: Value,
    /// The instance's own environment variables; a secret one shows as `{"secret": true}`,
    /// never with its value.
    pub env: BTreeMap<String, EnvShown>,
    /// Template and overrides merged: what the replicas get.
    #[schema(value_type = Object)]
    pub effective_settings: Value,
    /// Environment merged with the template's, secrets shown as `{"secret": true}`.
    pub effective_env: BTreeMap<String, EnvShown>,
    /// Stored settings and variables (of the instance or its template) that Tandem's rules
    /// refuse: written before the rules existed, they are left out of what the replicas get.
    pub not_applied: Vec<Refused>,
    /// HA settings; absent when HA is off.
    pub ha: Option<Ha>,
    /// `running`, `stopped` or `suspended`.
    #[schema(value_type = String)]
    pub desired_state: DesiredState,
    /// Only the team's owners deploy flows to it (its editor is read-only for members).
    pub protected: bool,
    /// Who may call its flows' HTTP endpoints: `none`, `tokens` or `members`
    /// (`/instances/{id}/http-auth`).
    #[schema(value_type = String)]
    pub http_auth: crate::http_auth::HttpAuthMode,
    /// Its custom hostname, routed like its own host (`/instances/{id}/custom-hostname`).
    #[schema(example = "flows.example.org")]
    pub custom_hostname: Option<String>,
    /// Seconds without traffic after which it sleeps, 1 to 2592000 (30 days); null when sleep
    /// is off (always on HA instances).
    #[schema(minimum = 1, maximum = 2592000, example = 900)]
    pub sleep_after_s: Option<u32>,
    /// Epoch ms; set while the instance sleeps: its replica is stopped and the first request
    /// wakes it. Null while it is awake.
    pub asleep_since: Option<i64>,
    /// What will not run while it sleeps (repeating inject nodes of its flows), in the answer
    /// of a change that turns sleep on; absent when there is nothing to say, and everywhere
    /// else.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// Creation time, epoch ms.
    pub created_at: i64,
    /// Last change, epoch ms.
    pub updated_at: i64,
    /// The variables as stored (secrets sealed): what an update keeps. Never serialized.
    #[serde(skip)]
    pub(crate) env_stored: BTreeMap<String, EnvStored>,
    /// The effective environment with secrets opened: what the replicas get. Never serialized.
    #[serde(skip)]
    pub(crate) env_revealed: BTreeMap<String, String>,
}

/// A new instance.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewInstance {
    /// `[a-z][a-z0-9-]{0,62}`, not ending with '-', not reserved; cannot be changed later.
    pub name: String,
    /// The application (and so the team).
    pub application_id: String,
    /// The stack.
    pub stack_id: String,
    /// A template.
    pub template_id: Option<String>,
    /// Node-RED settings overrides: only the settings Tandem allows, each with its type.
    #[schema(value_type = Option<crate::node_settings::NodeSettings>)]
    pub settings: Option<Value>,
    /// Environment variables: a string, or `{"value": "...", "secret": true}` for a secret
    /// (sealed in the store, never shown again).
    #[serde(default)]
    pub env: BTreeMap<String, EnvInput>,
    /// Initial flows: a Node-RED flows array.
    #[schema(value_type = Option<Vec<Object>>)]
    pub flows: Option<Value>,
    /// HA from the start.
    pub ha: Option<Ha>,
}

/// Changes to an instance. The name cannot change.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceUpdate {
    /// Refused: names are permanent.
    #[schema(value_type = Option<String>)]
    pub name: Option<serde::de::IgnoredAny>,
    /// New settings overrides (replace the old ones): only the settings Tandem allows.
    #[schema(value_type = Option<crate::node_settings::NodeSettings>)]
    pub settings: Option<Value>,
    /// New environment (replaces the old one); `{"secret": true}` without a value keeps a
    /// stored secret.
    pub env: Option<BTreeMap<String, EnvInput>>,
    /// Move to another stack.
    pub stack_id: Option<String>,
    /// Sleep after this many seconds without traffic, 1 to 2592000 (30 days); `null` or `0`
    /// turns sleep off and wakes the instance. Refused on HA instances.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<u32>, minimum = 0, maximum = 2592000, example = 900)]
    pub sleep_after_s: Option<Option<i64>>,
}

/// For a field where `null` means something: `Some(None)` for `null`, `Some(value)` for a
/// value; with `#[serde(default)]`, `None` when the field is left out.
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// Observed and desired state.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Status {
    /// Instance id.
    pub id: String,
    /// Instance name.
    pub name: String,
    /// What was asked for.
    #[schema(value_type = String)]
    pub desired_state: DesiredState,
    /// What runs: `state` (`running`, `degraded`, `starting`, `installing`, `stopped`,
    /// `suspended`, `crashed`, `unknown`), replicas ready and wanted.
    #[schema(value_type = Object)]
    pub observed: ObservedStatus,
    /// Stored settings and variables left out because Tandem's rules refuse them.
    pub not_applied: Vec<Refused>,
}

/// Result of an action.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ActionResult {
    /// Always `okay`.
    pub status: String,
    /// The desired state after the action.
    #[schema(value_type = String)]
    pub desired_state: DesiredState,
}

/// Checks an instance name.
pub fn check_name(name: &str) -> ApiResult<()> {
    if tandem_proxy::routes::validate_name(name).is_err() {
        return Err(ApiError::invalid(
            "name",
            "use 1 to 63 of a-z, 0-9 and '-', starting with a letter and not ending with '-'",
        ));
    }
    if RESERVED_NAMES.contains(&name) {
        return Err(ApiError::invalid("name", format!("{name:?} is reserved")));
    }
    Ok(())
}

/// Why a new instance cannot have a name another instance has.
pub fn name_taken(name: &str) -> String {
    format!("an instance named {name:?} exists; names are unique on the platform")
}

/// Checks HA settings; `field` names the replica count as the caller sent it.
fn check_ha(state: &AppState, ha: &Ha, field: &str) -> ApiResult<()> {
    let max = i64::from(state.config.max_ha_replicas);
    if !(2..=max).contains(&ha.replicas) {
        return Err(ApiError::invalid(field, format!("must be from 2 to {max}")));
    }
    if ha.mode == HaMode::Standby && ha.affinity == Some(true) {
        let at = field.strip_suffix("replicas").unwrap_or("");
        return Err(ApiError::invalid(
            format!("{at}affinity"),
            "standby mode serves from one replica: affinity applies to balanced mode",
        ));
    }
    Ok(())
}

/// The longest idle time before an instance sleeps: 30 days.
pub const MAX_SLEEP_AFTER_S: u32 = 2_592_000;

/// Why an HA instance cannot sleep, and sleep blocks HA.
const HA_STAYS_AWAKE: &str = "HA instances stay awake: sleep is for single-replica instances";

/// Why an instance that may sleep cannot turn HA on.
const HA_NEEDS_SLEEP_OFF: &str = "sleep is on for this instance, and HA instances stay awake: \
     turn sleep off first (\"sleep_after_s\": null in PUT /api/v1/instances/{id})";

/// Sleep as asked for: `null` or `0` is off, else 1 to [`MAX_SLEEP_AFTER_S`] seconds.
fn sleep_after(asked: Option<i64>) -> ApiResult<Option<u32>> {
    match asked {
        None | Some(0) => Ok(None),
        Some(s) => u32::try_from(s)
            .ok()
            .filter(|s| *s <= MAX_SLEEP_AFTER_S)
            .map(Some)
            .ok_or_else(|| {
                ApiError::invalid(
                    "sleep_after_s",
                    format!(
                        "{s} is not a sleep time: use 1 to {MAX_SLEEP_AFTER_S} seconds (30 days), \
                         or 0 or null to turn sleep off"
                    ),
                )
            }),
    }
}

/// What does not run while an instance with `flows` sleeps: one line per inject node that
/// repeats (`repeat`, seconds) or runs on a schedule (`crontab`), as Node-RED starts them. Nodes
/// that are disabled, or on a disabled flow, never run and are left out.
pub(crate) fn sleep_warnings(flows: &Value) -> Vec<String> {
    let Some(nodes) = flows.as_array() else {
        return Vec::new();
    };
    let text = |node: &Value, key: &str| match &node[key] {
        Value::String(s) => s.trim().to_string(),
        Value::Number(n) => n.to_string(),
        _ => String::new(),
    };
    let disabled_tabs: Vec<&str> = nodes
        .iter()
        .filter(|n| n["type"] == "tab" && n["disabled"] == true)
        .filter_map(|n| n["id"].as_str())
        .collect();
    let mut warnings = Vec::new();
    for node in nodes {
        let on_disabled_tab = node["z"]
            .as_str()
            .is_some_and(|z| disabled_tabs.contains(&z));
        if node["type"] != "inject" || node["d"] == true || on_disabled_tab {
            continue;
        }
        let name = match text(node, "name") {
            n if n.is_empty() => text(node, "id"),
            n => n,
        };
        // Node-RED repeats a positive `repeat` and ignores `crontab` then.
        let repeat = text(node, "repeat");
        let crontab = text(node, "crontab");
        let what = if repeat
            .parse::<f64>()
            .is_ok_and(|r| r.is_finite() && r > 0.0)
        {
            format!("repeats every {repeat} s")
        } else if !crontab.is_empty() {
            format!("runs on a schedule ({crontab})")
        } else {
            continue;
        };
        warnings.push(format!(
            "inject node {name:?} {what}; it does not run while the instance sleeps"
        ));
    }
    warnings
}

pub(crate) const COLUMNS: &str = "id, name, team_id, application_id, stack_id, template_id, settings, env, ha_replicas, ha_mode, desired_state, created_at, updated_at, protected, ha_affinity, http_auth, \
    (SELECT hostname FROM custom_hostnames WHERE custom_hostnames.instance_id = instances.id), \
    sleep_after_s, asleep_since";

/// Where instance `name` is served: `http(s)://<name>.<base domain>`, with the port when it is
/// not the scheme's own.
pub(crate) fn instance_url(config: &crate::state::ApiConfig, name: &str) -> String {
    host_url(config, &format!("{name}.{}", config.base_domain))
}

/// The URL of `host` on the proxies: HTTPS when they serve it, with the port when it is not
/// the scheme's own.
pub(crate) fn host_url(config: &crate::state::ApiConfig, host: &str) -> String {
    let (scheme, own) = if config.instances_https {
        ("https", 443)
    } else {
        ("http", 80)
    };
    match config.instances_port {
        Some(port) if port != own => format!("{scheme}://{host}:{port}"),
        _ => format!("{scheme}://{host}"),
    }
}

/// Templates already loaded while building a list of instances.
pub(crate) type TemplateCache = std::collections::HashMap<String, Option<templates::Template>>;

pub(crate) async fn view(
    state: &AppState,
    r: &sqlx::any::AnyRow,
    cache: &mut TemplateCache,
) -> ApiResult<Instance> {
    let name: String = r.get(1);
    let template_id: Option<String> = r.get(5);
    let settings = json_text(&r.get::<String, _>(6));
    let id: String = r.get(0);
    let env_stored = env_secrets::parse_stored(&r.get::<String, _>(7));
    let env = env_secrets::reveal(&state.key, &id, &env_stored);
    let template = match &template_id {
        Some(t) => {
            if !cache.contains_key(t) {
                cache.insert(t.clone(), templates::load(state, t).await.ok());
            }
            cache.get(t).cloned().flatten()
        }
        None => None,
    };
    // Stored values were valid when written, but may be refused by rules that came later.
    let (effective_settings, env_revealed, not_applied) =
        templates::effective_stored(template.as_ref(), &settings, &env);
    let replicas: Option<i64> = r.get(8);
    let mode: Option<String> = r.get(9);
    Ok(Instance {
        id,
        url: instance_url(&state.config, &name),
        name,
        team_id: r.get(2),
        application_id: r.get(3),
        stack_id: r.get(4),
        template_id,
        settings,
        env: env_secrets::shown_stored(&env_stored),
        effective_settings,
        effective_env: env_secrets::shown(&env_revealed, &env_stored),
        not_applied,
        ha: replicas.map(|replicas| {
            let mode = if mode.as_deref() == Some("standby") {
                HaMode::Standby
            } else {
                HaMode::Balanced
            };
            // Shown as it applies: on or off in balanced mode, absent in standby mode.
            let stored = r.get::<Option<i64>, _>(14).map(|a| a != 0);
            Ha {
                replicas,
                mode,
                affinity: (mode == HaMode::Balanced).then(|| stored.unwrap_or(true)),
            }
        }),
        desired_state: r.get::<String, _>(10).parse().map_err(
            |e: tandem_coordinator::spec::UnknownState| {
                ApiError::Internal(anyhow::anyhow!("instance {}: {e}", r.get::<String, _>(0)))
            },
        )?,
        created_at: r.get(11),
        updated_at: r.get(12),
        protected: r.get::<i64, _>(13) != 0,
        http_auth: crate::http_auth::HttpAuthMode::from_stored(&r.get::<String, _>(15)),
        custom_hostname: r.get(16),
        sleep_after_s: r
            .get::<Option<i64>, _>(17)
            .and_then(|s| u32::try_from(s).ok()),
        asleep_since: r.get(18),
        warnings: Vec::new(),
        env_stored,
        env_revealed,
    })
}

/// Loads an instance whoever asks: for callers the instance itself authenticated (its storage
/// token). 404 when unknown.
pub(crate) async fn load_any(state: &AppState, id: &str) -> ApiResult<Instance> {
    let row = row_of(state, id).await?;
    view(state, &row, &mut TemplateCache::new()).await
}

async fn row_of(state: &AppState, id: &str) -> ApiResult<sqlx::any::AnyRow> {
    sqlx::query(&format!("SELECT {COLUMNS} FROM instances WHERE id = $1"))
        .bind(id)
        .fetch_optional(&state.store.pool)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no instance {id}")))
}

/// Loads an instance the caller may act on; outsiders get 404.
pub(crate) async fn load_for(
    state: &AppState,
    caller: &Caller,
    id: &str,
    action: Action,
) -> ApiResult<Instance> {
    let row = row_of(state, id).await?;
    let team: String = row.get(2);
    authorize(state, caller, &team, action)
        .await
        .map_err(|e| match e {
            ApiError::NotFound(_) => ApiError::NotFound(format!("no instance {id}")),
            other => other,
        })?;
    view(state, &row, &mut TemplateCache::new()).await
}

/// Creates an instance (team owners). It starts in desired state `running`.
#[utoipa::path(post, path = "/api/v1/instances", tag = "instances", request_body = NewInstance,
    responses((status = 201, body = Instance), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
async fn create_instance(
    State(state): State<AppState>,
    caller: Caller,
    Json(body): Json<NewInstance>,
) -> ApiResult<(StatusCode, Json<Instance>)> {
    let app = super::applications::load(&state, &body.application_id).await?;
    authorize(&state, &caller, &app.team_id, Action::CreateInstance)
        .await
        .map_err(|e| match e {
            ApiError::NotFound(_) => {
                ApiError::NotFound(format!("no application {}", body.application_id))
            }
            other => other,
        })?;
    check_name(&body.name)?;
    super::stacks::load(&state, &body.stack_id)
        .await
        .map_err(|_| ApiError::invalid("stack_id", format!("no stack {}", body.stack_id)))?;
    let template = match &body.template_id {
        Some(t) => Some(
            templates::load(&state, t)
                .await
                .map_err(|_| ApiError::invalid("template_id", format!("no template {t}")))?,
        ),
        None => None,
    };
    let settings = body.settings.clone().unwrap_or_else(|| json!({}));
    let id = new_id();
    let env = env_secrets::resolve(&state.key, &id, &body.env, &BTreeMap::new())?;
    templates::effective(
        template.as_ref(),
        &settings,
        &env_secrets::reveal(&state.key, &id, &env),
    )?;
    let mut flows = body.flows.clone().unwrap_or_else(|| json!([]));
    super::snapshots::check_flows(&flows, "flows")?;
    // Credentials given inline are encrypted for the instance; the store never holds them in
    // clear.
    let credentials = crate::snapshots::take_inline_credentials(
        &mut flows,
        &json!({}),
        &state.key.derive("credentials", &id),
    )
    .map_err(|e| ApiError::invalid("flows", e.to_string()))?;
    if let Some(ha) = &body.ha {
        check_ha(&state, ha, "ha.replicas")?;
    }
    // A template's modules are where its instances start; the instances change them since.
    let modules = template
        .as_ref()
        .map(|t| t.modules.clone())
        .unwrap_or_default();
    let now = now_ms();
    let mut tx = state.store.write().await?;
    sqlx::query(
        "INSERT INTO instances (id, name, team_id, application_id, stack_id, template_id, settings, env, flows, credentials, flows_in_store, ha_replicas, ha_mode, ha_affinity, desired_state, created_at, updated_at, modules) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 1, $11, $12, $13, 'running', $14, $15, $16)",
    )
    .bind(&id)
    .bind(&body.name)
    .bind(&app.team_id)
    .bind(&app.id)
    .bind(&body.stack_id)
    .bind(body.template_id.clone())
    .bind(settings.to_string())
    .bind(json!(env).to_string())
    .bind(flows.to_string())
    .bind(credentials.to_string())
    .bind(body.ha.map(|h| h.replicas))
    .bind(body.ha.map(|h| h.mode.as_str()))
    .bind(body.ha.and_then(|h| h.affinity).map(i64::from))
    .bind(now)
    .bind(now)
    .bind(json!(modules).to_string())
    .execute(&mut *tx)
    .await
    .map_err(ApiError::conflict_as(name_taken(&body.name)))?;
    let subject = Subject::instance(&app.team_id, &id);
    audit::record(&mut tx, Some(&caller), "instance.created", subject,
        json!({ "name": body.name, "application_id": app.id, "stack_id": body.stack_id, "template_id": body.template_id, "ha": body.ha })).await?;
    tx.commit().await?;
    state.coordinator.changed();
    let instance = load_for(&state, &caller, &id, Action::Read).await?;
    Ok((StatusCode::CREATED, Json(instance)))
}

/// One instance.
#[utoipa::path(get, path = "/api/v1/instances/{id}", tag = "instances", params(("id" = String, Path, description = "Instance id")),
    responses((status = 200, body = Instance), (status = 404, body = crate::error::ErrorBody)))]
async fn get_instance(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Instance>> {
    Ok(Json(load_for(&state, &caller, &id, Action::Read).await?))
}

/// Changes settings, environment, stack or sleep (members). The answer of a change that turns
/// sleep on carries `warnings`: what in the flows does not run while the instance sleeps.
#[utoipa::path(put, path = "/api/v1/instances/{id}", tag = "instances", params(("id" = String, Path, description = "Instance id")), request_body = InstanceUpdate,
    responses((status = 200, body = Instance), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
async fn update_instance(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<InstanceUpdate>,
) -> ApiResult<Json<Instance>> {
    let before = load_for(&state, &caller, &id, Action::EditInstance).await?;
    if body.name.is_some() {
        return Err(ApiError::invalid(
            "name",
            "an instance's name cannot be changed",
        ));
    }
    // What the body leaves out is kept, less what the rules refuse (stored before they existed;
    // the audit entry of this update records it as removed).
    let settings = body
        .settings
        .clone()
        .unwrap_or_else(|| crate::node_settings::sanitize("settings", &before.settings).0);
    let env = match &body.env {
        Some(input) => env_secrets::resolve(&state.key, &id, input, &before.env_stored)?,
        None => {
            let revealed = env_secrets::reveal(&state.key, &id, &before.env_stored);
            let kept = crate::node_env::sanitize("env", &revealed).0;
            before
                .env_stored
                .iter()
                .filter(|(name, _)| kept.contains_key(*name))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        }
    };
    let stack_id = body
        .stack_id
        .clone()
        .unwrap_or_else(|| before.stack_id.clone());
    if body.stack_id.is_some() {
        super::stacks::load(&state, &stack_id)
            .await
            .map_err(|_| ApiError::invalid("stack_id", format!("no stack {stack_id}")))?;
    }
    let template = match &before.template_id {
        Some(t) => Some(templates::load(&state, t).await?),
        None => None,
    };
    templates::effective(
        template.as_ref(),
        &settings,
        &env_secrets::reveal(&state.key, &id, &env),
    )?;
    let sleep_after_s = match body.sleep_after_s {
        Some(asked) => sleep_after(asked)?,
        None => before.sleep_after_s,
    };
    let sleep_on_asked = body.sleep_after_s.is_some() && sleep_after_s.is_some();
    if sleep_on_asked && before.ha.is_some() {
        return Err(ApiError::invalid("sleep_after_s", HA_STAYS_AWAKE));
    }
    let mut tx = state.store.write().await?;
    // Sleep off wakes the instance. Sleep on holds only while the instance is not HA: HA turned
    // on since it was read updates nothing here.
    let updated = sqlx::query(
        "UPDATE instances SET settings = $1, env = $2, stack_id = $3, updated_at = $4, sleep_after_s = $5, \
         asleep_since = CASE WHEN $5 IS NULL THEN NULL ELSE asleep_since END \
         WHERE id = $6 AND ($7 = 0 OR ha_replicas IS NULL)",
    )
    .bind(settings.to_string())
    .bind(json!(env).to_string())
    .bind(&stack_id)
    .bind(now_ms())
    .bind(sleep_after_s.map(i64::from))
    .bind(&id)
    .bind(i64::from(sleep_on_asked))
    .execute(&mut *tx)
    .await?;
    if updated.rows_affected() == 0 {
        // Deleted, or made HA, since it was read.
        return Err(if sleep_on_asked {
            ApiError::invalid("sleep_after_s", HA_STAYS_AWAKE)
        } else {
            ApiError::NotFound(format!("no instance {id}"))
        });
    }
    let subject = Subject::instance(&before.team_id, &id);
    audit::record(&mut tx, Some(&caller), "instance.updated", subject, json!({
        "before": { "settings": before.settings, "env": before.env, "stack_id": before.stack_id, "sleep_after_s": before.sleep_after_s },
        "after": { "settings": settings, "env": env_secrets::shown_stored(&env), "stack_id": stack_id, "sleep_after_s": sleep_after_s },
    })).await?;
    tx.commit().await?;
    state.coordinator.changed();
    let mut instance = load_for(&state, &caller, &id, Action::Read).await?;
    if sleep_on_asked {
        let flows = crate::snapshots::stored_flows(&state, &id).await?;
        instance.warnings = sleep_warnings(&flows.value);
    }
    Ok(Json(instance))
}

/// Deletes an instance (owners).
#[utoipa::path(delete, path = "/api/v1/instances/{id}", tag = "instances", params(("id" = String, Path, description = "Instance id")),
    responses((status = 204), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
async fn delete_instance(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let before = load_for(&state, &caller, &id, Action::DeleteInstance).await?;
    let mut tx = state.store.write().await?;
    // Its snapshots, deploys, pipeline stages and library go with it.
    for table in [
        "snapshots",
        "deployments",
        "pipeline_stages",
        "library_entries",
    ] {
        sqlx::query(&format!("DELETE FROM {table} WHERE instance_id = $1"))
            .bind(&id)
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query("DELETE FROM instances WHERE id = $1")
        .bind(&id)
        .execute(&mut *tx)
        .await?;
    let subject = Subject::instance(&before.team_id, &id);
    audit::record(
        &mut tx,
        Some(&caller),
        "instance.deleted",
        subject,
        json!({ "name": before.name }),
    )
    .await?;
    tx.commit().await?;
    state.coordinator.changed();
    Ok(StatusCode::NO_CONTENT)
}

async fn list(
    state: &AppState,
    column: &str,
    owner: &str,
    q: &PageQuery,
) -> ApiResult<Page<Instance>> {
    let limit = q.limit()?;
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM instances WHERE {column} = $1 AND id > $2 ORDER BY id LIMIT $3"
    ))
    .bind(owner)
    .bind(q.after())
    .bind(limit + 1)
    .fetch_all(&state.store.pool)
    .await?;
    let mut cache = TemplateCache::new();
    let mut items = Vec::with_capacity(rows.len());
    for r in &rows {
        items.push(view(state, r, &mut cache).await?);
    }
    Ok(Page::from_overfetch(items, limit, |i| i.id.clone()))
}

/// The team's instances.
#[utoipa::path(get, path = "/api/v1/teams/{id}/instances", tag = "instances", params(("id" = String, Path, description = "Team id"), PageQuery),
    responses((status = 200, body = Page<Instance>), (status = 404, body = crate::error::ErrorBody)))]
async fn list_team_instances(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<PageQuery>,
) -> ApiResult<Json<Page<Instance>>> {
    authorize(&state, &caller, &id, Action::Read).await?;
    Ok(Json(list(&state, "team_id", &id, &q).await?))
}

/// The application's instances.
#[utoipa::path(get, path = "/api/v1/applications/{id}/instances", tag = "instances", params(("id" = String, Path, description = "Application id"), PageQuery),
    responses((status = 200, body = Page<Instance>), (status = 404, body = crate::error::ErrorBody)))]
async fn list_application_instances(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<PageQuery>,
) -> ApiResult<Json<Page<Instance>>> {
    let app = super::applications::load(&state, &id).await?;
    authorize(&state, &caller, &app.team_id, Action::Read)
        .await
        .map_err(|e| match e {
            ApiError::NotFound(_) => ApiError::NotFound(format!("no application {id}")),
            other => other,
        })?;
    Ok(Json(list(&state, "application_id", &id, &q).await?))
}

/// Records a lifecycle action: `start`, `stop`, `restart` or `suspend` (members).
#[utoipa::path(post, path = "/api/v1/instances/{id}/actions/{action}", tag = "instances",
    params(("id" = String, Path, description = "Instance id"), ("action" = String, Path, description = "start, stop, restart or suspend")),
    responses((status = 200, body = ActionResult), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
async fn instance_action(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, action)): Path<(String, String)>,
) -> ApiResult<Json<ActionResult>> {
    let before = load_for(&state, &caller, &id, Action::ControlInstance).await?;
    let desired = match action.as_str() {
        "start" | "restart" => DesiredState::Running,
        "stop" => DesiredState::Stopped,
        "suspend" => DesiredState::Suspended,
        other => {
            return Err(ApiError::invalid(
                "action",
                format!("unknown action {other:?}; use start, stop, restart or suspend"),
            ))
        }
    };
    let mut tx = state.store.write().await?;
    // Any action ends a sleep: start and restart wake the instance, stop and suspend leave it
    // stopped or suspended rather than asleep.
    sqlx::query(
        "UPDATE instances SET desired_state = $1, asleep_since = NULL, updated_at = $2 \
         WHERE id = $3",
    )
    .bind(desired.as_str())
    .bind(now_ms())
    .bind(&id)
    .execute(&mut *tx)
    .await?;
    let subject = Subject::instance(&before.team_id, &id);
    audit::record(
        &mut tx,
        Some(&caller),
        &format!("instance.{action}"),
        subject,
        json!({ "before": before.desired_state, "after": desired }),
    )
    .await?;
    tx.commit().await?;
    match action.as_str() {
        "restart" => state.coordinator.restart(&id),
        "start" => state.coordinator.retry(&id),
        _ => {}
    }
    state.coordinator.changed();
    Ok(Json(ActionResult {
        status: "okay".into(),
        desired_state: desired,
    }))
}

/// Desired and observed state (viewers).
#[utoipa::path(get, path = "/api/v1/instances/{id}/status", tag = "instances", params(("id" = String, Path, description = "Instance id")),
    responses((status = 200, body = Status), (status = 404, body = crate::error::ErrorBody)))]
async fn instance_status(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Status>> {
    let i = load_for(&state, &caller, &id, Action::Read).await?;
    let observed = state.coordinator.status(&i.id);
    Ok(Json(Status {
        id: i.id,
        name: i.name,
        desired_state: i.desired_state,
        observed,
        not_applied: i.not_applied,
    }))
}

/// Whether an instance is protected.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Protection {
    /// Only the team's owners deploy flows to it: members get its editor read-only.
    pub protected: bool,
}

/// Whether the instance is protected (viewers).
#[utoipa::path(get, path = "/api/v1/instances/{id}/protection", tag = "instances", params(("id" = String, Path, description = "Instance id")),
    responses((status = 200, body = Protection), (status = 404, body = crate::error::ErrorBody)))]
async fn get_protection(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Protection>> {
    let i = load_for(&state, &caller, &id, Action::Read).await?;
    Ok(Json(Protection {
        protected: i.protected,
    }))
}

/// Protects the instance, or lifts its protection (owners). While protected, only owners
/// deploy flows to it.
#[utoipa::path(put, path = "/api/v1/instances/{id}/protection", tag = "instances", params(("id" = String, Path, description = "Instance id")), request_body = Protection,
    responses((status = 200, body = Protection), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
async fn put_protection(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<Protection>,
) -> ApiResult<Json<Protection>> {
    let before = load_for(&state, &caller, &id, Action::ProtectInstance).await?;
    if before.protected != body.protected {
        let mut tx = state.store.write().await?;
        sqlx::query("UPDATE instances SET protected = $1, updated_at = $2 WHERE id = $3")
            .bind(i64::from(body.protected))
            .bind(now_ms())
            .bind(&id)
            .execute(&mut *tx)
            .await?;
        let event = if body.protected {
            "instance.protected"
        } else {
            "instance.unprotected"
        };
        audit::record(
            &mut tx,
            Some(&caller),
            event,
            Subject::instance(&before.team_id, &id),
            json!({ "before": before.protected, "after": body.protected }),
        )
        .await?;
        tx.commit().await?;
    }
    Ok(Json(body))
}

/// HA settings (viewers); 404 when HA is off.
#[utoipa::path(get, path = "/api/v1/instances/{id}/ha", tag = "instances", params(("id" = String, Path, description = "Instance id")),
    responses((status = 200, body = Ha), (status = 404, body = crate::error::ErrorBody)))]
async fn get_ha(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Ha>> {
    let i = load_for(&state, &caller, &id, Action::Read).await?;
    i.ha.map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("HA is off for instance {}", i.name)))
}

/// Turns HA on or changes it (owners).
#[utoipa::path(put, path = "/api/v1/instances/{id}/ha", tag = "instances", params(("id" = String, Path, description = "Instance id")), request_body = Ha,
    responses((status = 200, body = Ha), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
async fn put_ha(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<Ha>,
) -> ApiResult<Json<Ha>> {
    let before = load_for(&state, &caller, &id, Action::ManageHa).await?;
    check_ha(&state, &body, "replicas")?;
    if before.sleep_after_s.is_some() {
        return Err(ApiError::invalid("replicas", HA_NEEDS_SLEEP_OFF));
    }
    set_ha(&state, &caller, &before, Some(body)).await?;
    Ok(Json(body))
}

/// Turns HA off: one replica, editor enabled (owners).
#[utoipa::path(delete, path = "/api/v1/instances/{id}/ha", tag = "instances", params(("id" = String, Path, description = "Instance id")),
    responses((status = 204), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
async fn delete_ha(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let before = load_for(&state, &caller, &id, Action::ManageHa).await?;
    set_ha(&state, &caller, &before, None).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn set_ha(
    state: &AppState,
    caller: &Caller,
    before: &Instance,
    ha: Option<Ha>,
) -> ApiResult<()> {
    let mut tx = state.store.write().await?;
    // HA holds only while sleep is off: sleep turned on since the instance was read updates
    // nothing here.
    let updated = sqlx::query(
        "UPDATE instances SET ha_replicas = $1, ha_mode = $2, ha_affinity = $3, updated_at = $4 \
         WHERE id = $5 AND ($6 = 0 OR sleep_after_s IS NULL)",
    )
    .bind(ha.map(|h| h.replicas))
    .bind(ha.map(|h| h.mode.as_str()))
    .bind(ha.and_then(|h| h.affinity).map(i64::from))
    .bind(now_ms())
    .bind(&before.id)
    .bind(i64::from(ha.is_some()))
    .execute(&mut *tx)
    .await?;
    if updated.rows_affected() == 0 {
        // Deleted, or set to sleep, since it was read.
        return Err(if ha.is_some() {
            ApiError::invalid("replicas", HA_NEEDS_SLEEP_OFF)
        } else {
            ApiError::NotFound(format!("no instance {}", before.id))
        });
    }
    let subject = Subject::instance(&before.team_id, &before.id);
    let event = if ha.is_some() {
        "instance.ha-set"
    } else {
        "instance.ha-off"
    };
    audit::record(
        &mut tx,
        Some(caller),
        event,
        subject,
        json!({ "before": before.ha, "after": ha }),
    )
    .await?;
    tx.commit().await?;
    state.coordinator.changed();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleep_is_off_with_null_or_zero_and_bounded_to_30_days() {
        assert_eq!(sleep_after(None).ok(), Some(None));
        assert_eq!(sleep_after(Some(0)).ok(), Some(None));
        assert_eq!(sleep_after(Some(1)).ok(), Some(Some(1)));
        assert_eq!(
            sleep_after(Some(2_592_000)).ok(),
            Some(Some(MAX_SLEEP_AFTER_S))
        );
        for bad in [-1, 2_592_001, i64::from(u32::MAX) + 1, i64::MIN] {
            match sleep_after(Some(bad)) {
                Err(ApiError::Invalid { field, message }) => {
                    assert_eq!(field, "sleep_after_s");
                    assert!(message.contains("1 to 2592000 seconds"), "{message}");
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn repeating_injects_warn() {
        let flows = json!([
            { "id": "t1", "type": "tab", "label": "Flow 1" },
            { "id": "a", "type": "inject", "z": "t1", "name": "Poll", "repeat": "5", "crontab": "" },
            { "id": "b", "type": "inject", "z": "t1", "name": "", "repeat": "", "crontab": "00 03 * * *" },
            { "id": "c", "type": "inject", "z": "t1", "repeat": 0.5 },
        ]);
        assert_eq!(
            sleep_warnings(&flows),
            [
                "inject node \"Poll\" repeats every 5 s; it does not run while the instance sleeps",
                "inject node \"b\" runs on a schedule (00 03 * * *); it does not run while the instance sleeps",
                "inject node \"c\" repeats every 0.5 s; it does not run while the instance sleeps",
            ]
        );
    }

    #[test]
    fn injects_that_never_fire_by_themselves_do_not_warn() {
        let flows = json!([
            { "id": "t1", "type": "tab" },
            { "id": "t2", "type": "tab", "disabled": true },
            // Once at start, or by hand: nothing missed while asleep.
            { "id": "a", "type": "inject", "z": "t1", "repeat": "", "crontab": "", "once": true },
            { "id": "b", "type": "inject", "z": "t1" },
            { "id": "c", "type": "inject", "z": "t1", "repeat": "0" },
            { "id": "d", "type": "inject", "z": "t1", "repeat": "soon" },
            // Disabled, or on a disabled flow: it never runs.
            { "id": "e", "type": "inject", "z": "t1", "repeat": "5", "d": true },
            { "id": "f", "type": "inject", "z": "t2", "repeat": "5" },
            // Not an inject.
            { "id": "g", "type": "trigger", "z": "t1", "repeat": "5" },
        ]);
        assert!(sleep_warnings(&flows).is_empty());
        assert!(sleep_warnings(&json!({})).is_empty());
        assert!(sleep_warnings(&json!([])).is_empty());
    }
}
