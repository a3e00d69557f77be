//! Templates: default Node-RED settings and environment for instances, and the policy of what an
//! instance may override. An instance's effective settings are the template's merged with its
//! own allowed overrides ([`effective`]).

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sqlx::Row;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{json_text, require_admin, Page, PageQuery};
use crate::audit::{self, Subject};
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult, Json, Query};
use crate::node_env;
use crate::node_settings::{self, Refused};
use crate::state::AppState;
use crate::store::{new_id, now_ms};

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_templates, create_template))
        .routes(routes!(get_template, update_template, delete_template))
}

/// An environment variable of a template.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TemplateEnv {
    /// Value.
    pub value: String,
    /// Instances may not change it.
    #[serde(default)]
    pub locked: bool,
}

/// What instances may override.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Setting name → whether instances may set it. Settings not listed may not be set.
    #[serde(default)]
    pub settings: BTreeMap<String, bool>,
    /// Which npm modules instances may have.
    #[serde(default)]
    pub modules: ModulePolicy,
}

/// Which npm modules the instances of a template may have: a module is allowed when `allow` is
/// empty or one of its patterns matches, and none of `deny`'s does. A pattern is a package name,
/// or a prefix followed by `*` (`@flowfuse/*`, `node-red-contrib-*`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModulePolicy {
    /// Only these (every module when empty).
    #[serde(default)]
    pub allow: Vec<String>,
    /// Never these.
    #[serde(default)]
    pub deny: Vec<String>,
}

impl ModulePolicy {
    /// Whether `name` is allowed.
    pub fn allows(&self, name: &str) -> bool {
        let matches = |p: &String| match p.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => name == p,
        };
        (self.allow.is_empty() || self.allow.iter().any(matches)) && !self.deny.iter().any(matches)
    }
}

/// Checks `modules` (name → version) against `template`'s module policy: 422 naming the first
/// module it refuses.
pub fn check_modules<'a>(
    field: &str,
    template: Option<&Template>,
    mut names: impl Iterator<Item = &'a String>,
) -> ApiResult<()> {
    let Some(t) = template else {
        return Ok(());
    };
    match names.find(|n| !t.policy.modules.allows(n)) {
        Some(name) => Err(ApiError::invalid(
            format!("{field}.{name}"),
            format!("template {} does not allow this module", t.name),
        )),
        None => Ok(()),
    }
}

/// A template.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Template {
    /// Id.
    pub id: String,
    /// Unique name.
    pub name: String,
    /// Default Node-RED settings (an object of `settings.js` keys).
    #[schema(value_type = Object)]
    pub settings: Value,
    /// Default environment variables.
    pub env: BTreeMap<String, TemplateEnv>,
    /// The npm modules instances made from it start with: name → version or range.
    pub modules: BTreeMap<String, String>,
    /// What instances may override.
    pub policy: Policy,
    /// Creation time, epoch ms.
    pub created_at: i64,
}

/// A new template, or a full replacement of one.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TemplateBody {
    /// Unique name, 1 to 100 characters.
    pub name: String,
    /// Default settings: only the Node-RED settings Tandem allows, each with its type.
    #[serde(default = "empty_object")]
    #[schema(value_type = node_settings::NodeSettings)]
    pub settings: Value,
    /// Default environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, TemplateEnv>,
    /// The npm modules instances made from it start with: name → version or range, which its
    /// own policy must allow.
    #[serde(default)]
    pub modules: BTreeMap<String, String>,
    /// What instances may override.
    #[serde(default)]
    pub policy: Policy,
}

fn empty_object() -> Value {
    Value::Object(Map::new())
}

fn validate(body: &TemplateBody) -> ApiResult<()> {
    super::check_display_name("name", &body.name)?;
    // The allowlist binds templates as it binds instances: a template's settings reach
    // `settings.js` of every instance made from it.
    node_settings::check("settings", &body.settings)?;
    node_env::check("env", body.env.iter().map(|(k, v)| (k, v.value.as_str())))?;
    for key in body.policy.settings.keys() {
        node_settings::check_name("policy.settings", key)?;
    }
    super::modules::check("modules", &body.modules)?;
    for (field, patterns) in [
        ("policy.modules.allow", &body.policy.modules.allow),
        ("policy.modules.deny", &body.policy.modules.deny),
    ] {
        if patterns.len() > 256 {
            return Err(ApiError::invalid(field, "at most 256 patterns"));
        }
        for p in patterns {
            let name = p.strip_suffix('*').unwrap_or(p);
            // `@scope/*` and `node-red-contrib-*` are prefixes of names, not names.
            let prefix_ok = p.ends_with('*')
                && name.len() <= 214
                && name.bytes().all(|b| {
                    b.is_ascii_lowercase()
                        || b.is_ascii_digit()
                        || matches!(b, b'-' | b'.' | b'_' | b'~' | b'@' | b'/')
                });
            if !prefix_ok {
                super::modules::check_name(field, p)?;
            }
        }
    }
    let probe = Template {
        id: String::new(),
        name: body.name.clone(),
        settings: Value::Null,
        env: BTreeMap::new(),
        modules: BTreeMap::new(),
        policy: body.policy.clone(),
        created_at: 0,
    };
    check_modules("modules", Some(&probe), body.modules.keys())
}

/// The effective settings and environment of an instance as a user sets them: `template` merged
/// with the instance's own `settings` and `env`. A setting or variable the allowlist refuses, a
/// setting the policy does not open, or a locked variable, is a 422 naming the field.
pub fn effective(
    template: Option<&Template>,
    settings: &Value,
    env: &BTreeMap<String, String>,
) -> ApiResult<(Value, BTreeMap<String, String>)> {
    node_settings::check("settings", settings)?;
    node_env::check("env", env.iter().map(|(k, v)| (k, v.as_str())))?;
    merge(template, settings, env)
}

/// What an instance's replicas get from what is stored: like [`effective`], but a stored
/// setting or variable the rules refuse (written before they existed) is left out and named in
/// the list, rather than failing: the instance starts without it.
pub fn effective_stored(
    template: Option<&Template>,
    settings: &Value,
    env: &BTreeMap<String, String>,
) -> (Value, BTreeMap<String, String>, Vec<Refused>) {
    let (settings, mut dropped) = node_settings::sanitize("settings", settings);
    let (env, env_dropped) = node_env::sanitize("env", env);
    dropped.extend(env_dropped);
    let clean_template = template.map(|t| {
        let (settings, s_dropped) =
            node_settings::sanitize(&format!("template {} settings", t.name), &t.settings);
        let vars: BTreeMap<String, String> = t
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.value.clone()))
            .collect();
        let (vars, e_dropped) = node_env::sanitize(&format!("template {} env", t.name), &vars);
        dropped.extend(s_dropped);
        dropped.extend(e_dropped);
        Template {
            settings,
            env: t
                .env
                .iter()
                .filter(|(k, _)| vars.contains_key(*k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            ..t.clone()
        }
    });
    match merge(clean_template.as_ref(), &settings, &env) {
        Ok((s, e)) => (s, e, dropped),
        // An override the template no longer opens: the template's values alone.
        Err(e) => {
            dropped.push(Refused {
                field: "settings".into(),
                message: format!("overrides not applied: {e}"),
            });
            let (s, e) = merge(
                clean_template.as_ref(),
                &Value::Object(Map::new()),
                &BTreeMap::new(),
            )
            .unwrap_or_default();
            (s, e, dropped)
        }
    }
}

/// `template` merged with an instance's own settings and variables, under its policy.
fn merge(
    template: Option<&Template>,
    settings: &Value,
    env: &BTreeMap<String, String>,
) -> ApiResult<(Value, BTreeMap<String, String>)> {
    let Some(t) = template else {
        return Ok((settings.clone(), env.clone()));
    };
    let mut merged = t.settings.as_object().cloned().unwrap_or_default();
    if let Some(own) = settings.as_object() {
        for (k, v) in own {
            if t.policy.settings.get(k) != Some(&true) {
                return Err(ApiError::invalid(
                    format!("settings.{k}"),
                    format!("template {} does not let instances set it", t.name),
                ));
            }
            merged.insert(k.clone(), v.clone());
        }
    }
    let mut vars: BTreeMap<String, String> = t
        .env
        .iter()
        .map(|(k, v)| (k.clone(), v.value.clone()))
        .collect();
    for (k, v) in env {
        if t.env.get(k).is_some_and(|e| e.locked) {
            return Err(ApiError::invalid(
                format!("env.{k}"),
                format!("is locked by template {}", t.name),
            ));
        }
        vars.insert(k.clone(), v.clone());
    }
    Ok((Value::Object(merged), vars))
}

fn from_row(r: &sqlx::any::AnyRow) -> Template {
    Template {
        id: r.get(0),
        name: r.get(1),
        settings: json_text(&r.get::<String, _>(2)),
        env: serde_json::from_str(&r.get::<String, _>(3)).unwrap_or_default(),
        policy: serde_json::from_str(&r.get::<String, _>(4)).unwrap_or_default(),
        created_at: r.get(5),
        modules: serde_json::from_str(&r.get::<String, _>(6)).unwrap_or_default(),
    }
}

const COLUMNS: &str = "id, name, settings, env, policy, created_at, modules";

/// Loads a template; 404 when unknown.
pub async fn load(state: &AppState, id: &str) -> ApiResult<Template> {
    let row = sqlx::query(&format!("SELECT {COLUMNS} FROM templates WHERE id = $1"))
        .bind(id)
        .fetch_optional(&state.store.pool)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no template {id}")))?;
    Ok(from_row(&row))
}

fn to_text<T: Serialize>(v: &T) -> ApiResult<String> {
    serde_json::to_string(v).map_err(|e| ApiError::Internal(e.into()))
}

/// Every template.
#[utoipa::path(get, path = "/api/v1/templates", tag = "templates", params(PageQuery), responses((status = 200, body = Page<Template>)))]
async fn list_templates(
    State(state): State<AppState>,
    _caller: Caller,
    Query(q): Query<PageQuery>,
) -> ApiResult<Json<Page<Template>>> {
    let limit = q.limit()?;
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM templates WHERE id > $1 ORDER BY id LIMIT $2"
    ))
    .bind(q.after())
    .bind(limit + 1)
    .fetch_all(&state.store.pool)
    .await?;
    Ok(Json(Page::from_overfetch(
        rows.iter().map(from_row).collect(),
        limit,
        |t| t.id.clone(),
    )))
}

/// Creates a template (platform admins).
#[utoipa::path(post, path = "/api/v1/templates", tag = "templates", request_body = TemplateBody,
    responses((status = 201, body = Template), (status = 403, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
async fn create_template(
    State(state): State<AppState>,
    caller: Caller,
    Json(body): Json<TemplateBody>,
) -> ApiResult<(StatusCode, Json<Template>)> {
    require_admin(&caller)?;
    validate(&body)?;
    let t = Template {
        id: new_id(),
        name: body.name,
        settings: body.settings,
        env: body.env,
        modules: body.modules,
        policy: body.policy,
        created_at: now_ms(),
    };
    let mut tx = state.store.write().await?;
    sqlx::query(&format!(
        "INSERT INTO templates ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"
    ))
    .bind(&t.id)
    .bind(&t.name)
    .bind(to_text(&t.settings)?)
    .bind(to_text(&t.env)?)
    .bind(to_text(&t.policy)?)
    .bind(t.created_at)
    .bind(to_text(&t.modules)?)
    .execute(&mut *tx)
    .await
    .map_err(ApiError::conflict_as(format!(
        "a template named {:?} exists",
        t.name
    )))?;
    let subject = Subject::object("template", &t.id);
    audit::record(
        &mut tx,
        Some(&caller),
        "template.created",
        subject,
        json!({ "name": t.name }),
    )
    .await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(t)))
}

/// One template.
#[utoipa::path(get, path = "/api/v1/templates/{id}", tag = "templates", params(("id" = String, Path, description = "Template id")),
    responses((status = 200, body = Template), (status = 404, body = crate::error::ErrorBody)))]
async fn get_template(
    State(state): State<AppState>,
    _caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Template>> {
    Ok(Json(load(&state, &id).await?))
}

/// Replaces a template (platform admins). Instances already using it must still be valid
/// under the new policy, or the change is refused with 409.
#[utoipa::path(put, path = "/api/v1/templates/{id}", tag = "templates", params(("id" = String, Path, description = "Template id")), request_body = TemplateBody,
    responses((status = 200, body = Template), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
async fn update_template(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<TemplateBody>,
) -> ApiResult<Json<Template>> {
    require_admin(&caller)?;
    let before = load(&state, &id).await?;
    validate(&body)?;
    let after = Template {
        name: body.name,
        settings: body.settings,
        env: body.env,
        modules: body.modules,
        policy: body.policy,
        ..before.clone()
    };
    let mut tx = state.store.write().await?;
    let users =
        sqlx::query("SELECT name, settings, env, modules FROM instances WHERE template_id = $1")
            .bind(&id)
            .fetch_all(&mut *tx)
            .await?;
    for r in &users {
        let name: String = r.get(0);
        let settings = json_text(&r.get::<String, _>(1));
        let env: BTreeMap<String, String> =
            serde_json::from_str(&r.get::<String, _>(2)).unwrap_or_default();
        // Stored values the allowlist refuses are not applied anyway; they must not hold up
        // the template.
        let (settings, _) = node_settings::sanitize("settings", &settings);
        let (env, _) = node_env::sanitize("env", &env);
        let modules: BTreeMap<String, String> =
            serde_json::from_str(&r.get::<String, _>(3)).unwrap_or_default();
        if let Err(e) = effective(Some(&after), &settings, &env)
            .and_then(|_| check_modules("modules", Some(&after), modules.keys()))
        {
            return Err(ApiError::Conflict(format!(
                "instance {name} would break the new template: {e}"
            )));
        }
    }
    sqlx::query(
        "UPDATE templates SET name = $1, settings = $2, env = $3, policy = $4, modules = $5 WHERE id = $6",
    )
    .bind(&after.name)
    .bind(to_text(&after.settings)?)
    .bind(to_text(&after.env)?)
    .bind(to_text(&after.policy)?)
    .bind(to_text(&after.modules)?)
    .bind(&id)
    .execute(&mut *tx)
    .await?;
    let subject = Subject::object("template", &id);
    audit::record(
        &mut tx,
        Some(&caller),
        "template.updated",
        subject,
        json!({ "before": before, "after": after }),
    )
    .await?;
    tx.commit().await?;
    state.coordinator.changed();
    Ok(Json(after))
}

/// Deletes a template no instance uses (platform admins).
#[utoipa::path(delete, path = "/api/v1/templates/{id}", tag = "templates", params(("id" = String, Path, description = "Template id")),
    responses((status = 204), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)))]
async fn delete_template(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    require_admin(&caller)?;
    let t = load(&state, &id).await?;
    let mut tx = state.store.write().await?;
    let used: i64 = crate::store::count_where(&mut tx, "instances", "template_id", &id).await?;
    if used > 0 {
        return Err(ApiError::Conflict(format!(
            "template {} is used by {used} instance(s)",
            t.name
        )));
    }
    sqlx::query("DELETE FROM templates WHERE id = $1")
        .bind(&id)
        .execute(&mut *tx)
        .await?;
    let subject = Subject::object("template", &id);
    audit::record(
        &mut tx,
        Some(&caller),
        "template.deleted",
        subject,
        json!({ "name": t.name }),
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}
