//! An instance's npm modules (issue 12): the contributed nodes its flows use, name → version or
//! range. Members change them, as they change what runs (owners only on a protected instance): a
//! change is a deploy, which installs the new set first and then replaces the replicas one at a
//! time; a set npm cannot install rolls back, the replicas serving the old set throughout.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::Row;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::instances::load_for;
use crate::audit::{self, Subject};
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult, Json};
use crate::roles::Action;
use crate::state::AppState;

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(get_modules, put_modules))
}

/// Most modules an instance may list.
const MAX_MODULES: usize = 64;

/// Checks a package name against npm's rules for names: at most 214 characters, lower case,
/// URL-safe characters, not starting with `.`, `_` or `-`, optionally scoped (`@scope/name`).
pub fn check_name(field: &str, name: &str) -> ApiResult<()> {
    let part_ok = |p: &str| {
        !p.is_empty()
            && !p.starts_with('.')
            && !p.starts_with('_')
            // Not an npm option, whatever npm itself allows.
            && !p.starts_with('-')
            && p.bytes().all(|b| {
                b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || matches!(b, b'-' | b'.' | b'_' | b'~')
            })
    };
    let ok = name.len() <= 214
        && match name.strip_prefix('@') {
            Some(scoped) => scoped
                .split_once('/')
                .is_some_and(|(scope, rest)| part_ok(scope) && part_ok(rest)),
            None => part_ok(name) && name != "node_modules" && name != "favicon.ico",
        };
    if !ok {
        return Err(ApiError::invalid(
            field,
            format!("{name:?} is not an npm package name: lower case letters, digits, '-', '.', '_', '~', at most 214 characters, not starting with '.', '_' or '-', optionally @scope/name"),
        ));
    }
    Ok(())
}

/// Checks a version or range (`1.31.0`, `^1.31`, `~2.0.1`, `>=1 <2`, `latest`): versions from
/// the registry only, never a URL, a git repository or a path, whose installs run or read what
/// they point at.
pub fn check_version(field: &str, version: &str) -> ApiResult<()> {
    let ok = !version.is_empty()
        && version.len() <= 64
        && version.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'.' | b'^' | b'~' | b'<' | b'>' | b'=' | b'|' | b' ' | b'*' | b'-' | b'+'
                )
        });
    if !ok {
        return Err(ApiError::invalid(
            field,
            format!("{version:?} is not a version or range of the registry (such as 1.31.0, ^1.31 or latest)"),
        ));
    }
    Ok(())
}

/// Checks a whole module list.
pub fn check(field: &str, modules: &BTreeMap<String, String>) -> ApiResult<()> {
    if modules.len() > MAX_MODULES {
        return Err(ApiError::invalid(
            field,
            format!("at most {MAX_MODULES} modules"),
        ));
    }
    for (name, version) in modules {
        check_name(&format!("{field}.{name}"), name)?;
        check_version(&format!("{field}.{name}"), version)?;
    }
    Ok(())
}

/// Checks `modules` against the module policy of `instance`'s template (422 naming the first
/// module it refuses).
pub async fn check_policy<'a>(
    state: &AppState,
    instance: &super::instances::Instance,
    names: impl Iterator<Item = &'a String>,
) -> ApiResult<()> {
    let template = match &instance.template_id {
        Some(t) => Some(super::templates::load(state, t).await?),
        None => None,
    };
    super::templates::check_modules("modules", template.as_ref(), names)
}

/// One module: what was asked for, and what is installed.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ModuleState {
    /// The version or range asked for.
    pub requested: String,
    /// The version installed, once the replicas' runtime has been prepared with it.
    pub installed: Option<String>,
}

/// An instance's modules.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Modules {
    /// Name → requested and installed version.
    pub modules: BTreeMap<String, ModuleState>,
}

/// A new module list.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ModulesBody {
    /// Name → version or range, e.g. `{"@flowfuse/node-red-dashboard": "1.31.0"}`.
    pub modules: BTreeMap<String, String>,
}

async fn view(state: &AppState, id: &str) -> ApiResult<Modules> {
    let text: String = sqlx::query("SELECT modules FROM instances WHERE id = $1")
        .bind(id)
        .fetch_one(&state.store.pool)
        .await?
        .get(0);
    let requested: BTreeMap<String, String> = serde_json::from_str(&text).unwrap_or_default();
    let installed = state.coordinator.status(id).modules;
    Ok(Modules {
        modules: requested
            .into_iter()
            .map(|(name, requested)| {
                let installed = installed.get(&name).cloned();
                (
                    name,
                    ModuleState {
                        requested,
                        installed,
                    },
                )
            })
            .collect(),
    })
}

/// The instance's modules (viewers).
#[utoipa::path(get, path = "/api/v1/instances/{id}/modules", tag = "instances", params(("id" = String, Path, description = "Instance id")),
    responses((status = 200, body = Modules), (status = 404, body = crate::error::ErrorBody)))]
async fn get_modules(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Modules>> {
    let i = load_for(&state, &caller, &id, Action::Read).await?;
    Ok(Json(view(&state, &i.id).await?))
}

/// Sets the instance's modules (members; owners on a protected instance): a deploy, answered
/// 202. The new set is installed first; then the replicas are replaced one at a time; a set npm
/// cannot install rolls the deploy back, the replicas serving the old set throughout.
#[utoipa::path(put, path = "/api/v1/instances/{id}/modules", tag = "instances", params(("id" = String, Path, description = "Instance id")), request_body = ModulesBody,
    responses((status = 202, body = crate::deployments::Deployment), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
async fn put_modules(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<ModulesBody>,
) -> ApiResult<(axum::http::StatusCode, Json<crate::deployments::Deployment>)> {
    let i = super::snapshots::load_for_deploy(&state, &caller, &id).await?;
    check("modules", &body.modules)?;
    check_policy(&state, &i, body.modules.keys()).await?;
    crate::deployments::ensure_idle(&state, &i).await?;
    let mut content = crate::snapshots::current(&state, &i.id).await?;
    let before = content.modules.clone();
    content.modules = json!(body.modules);
    let mut tx = state.store.write().await?;
    let s = crate::snapshots::insert(
        &mut tx,
        Some(&caller),
        &i,
        &format!("Modules set by {}", caller.username),
        "",
        &content,
    )
    .await?;
    audit::record(
        &mut tx,
        Some(&caller),
        "instance.modules-set",
        Subject::instance(&i.team_id, &i.id),
        json!({ "before": before, "after": body.modules }),
    )
    .await?;
    tx.commit().await?;
    let d = crate::deployments::begin(
        &state,
        &caller,
        &i,
        &s.id,
        &content,
        crate::deployments::Scope::Flows,
        None,
    )
    .await?;
    Ok((axum::http::StatusCode::ACCEPTED, Json(d)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_versions_follow_npms_rules_and_the_registry_only() {
        for ok in [
            "node-red-node-random",
            "@flowfuse/node-red-dashboard",
            "a",
            "x.y_z~1",
        ] {
            assert!(check_name("m", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Upper",
            ".hidden",
            "_under",
            "has space",
            "@scope",
            "@/x",
            "a/b",
            "../x",
            "-g",
            "--registry",
            "node_modules",
            &"x".repeat(215),
        ] {
            assert!(check_name("m", bad).is_err(), "{bad}");
        }
        for ok in [
            "1.31.0",
            "^1.31",
            "~2.0.1",
            ">=1 <2",
            "latest",
            "1.x",
            "1.0.0-beta.2",
        ] {
            assert!(check_version("m", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "git+https://example.com/x.git",
            "file:../x",
            "github:user/repo",
            "http://x/y.tgz",
            "../x",
        ] {
            assert!(check_version("m", bad).is_err(), "{bad}");
        }
    }
}
