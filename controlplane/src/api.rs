//! The REST API under `/api/v1`: one router per resource, assembled with its OpenAPI document
//! so the document cannot drift from the routes.

use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use axum::Router;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::roles::{required, Action, Role};
use crate::state::AppState;

pub mod applications;
pub mod audit_log;
pub mod cluster;
pub mod custom_hostname;
pub mod editor_tickets;
pub mod http_auth;
pub mod instance_names;
pub mod instances;
pub mod logs;
pub mod modules;
pub mod pipelines;
pub mod proxies;
pub mod snapshots;
pub mod stacks;
pub mod storage;
pub mod teams;
pub mod templates;
pub mod users;

/// Largest request body the API accepts, in bytes.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Largest page a list returns.
pub const MAX_LIMIT: i64 = 500;

#[derive(OpenApi)]
#[openapi(
    info(title = "Tandem API", description = "Run Node-RED instances for teams, with HA."),
    components(schemas(crate::error::ErrorBody)),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{
            HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
        };
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        openapi.security = Some(vec![SecurityRequirement::new(
            "bearer",
            Vec::<String>::new(),
        )]);
    }
}

/// The API router with its OpenAPI document served at `/api/v1/openapi.json`.
pub fn router(state: AppState) -> Router {
    let (api, doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(users::router())
        .merge(teams::router())
        .merge(applications::router())
        .merge(instances::router())
        .merge(editor_tickets::router())
        .merge(http_auth::router())
        .merge(custom_hostname::router())
        .merge(instance_names::router())
        .merge(logs::router())
        .merge(stacks::router())
        .merge(templates::router())
        .merge(audit_log::router())
        .merge(snapshots::router(state.config.max_document_bytes))
        .merge(pipelines::router())
        .merge(modules::router())
        .merge(storage::router(state.config.max_document_bytes))
        .merge(proxies::router())
        .merge(cluster::router())
        .split_for_parts();
    let doc = std::sync::Arc::new(doc);
    api.route(
        "/api/v1/openapi.json",
        get(move || {
            let doc = doc.clone();
            async move { axum::Json(doc.as_ref().clone()) }
        }),
    )
    .method_not_allowed_fallback(|| async {
        ApiError::MethodNotAllowed(
            "this route does not take that method; see /api/v1/openapi.json".into(),
        )
    })
    .fallback(|| async { ApiError::NotFound("no such API route; see /api/v1/openapi.json".into()) })
    .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
    .with_state(state)
}

/// `?cursor=&limit=` on every list.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Items per page, 1 to 500; default 50.
    pub limit: Option<i64>,
}

impl PageQuery {
    /// The limit, checked.
    pub fn limit(&self) -> ApiResult<i64> {
        match self.limit {
            None => Ok(50),
            Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            Some(n) => Err(ApiError::invalid(
                "limit",
                format!("must be from 1 to {MAX_LIMIT}, not {n}"),
            )),
        }
    }

    /// The cursor, or the empty string (before every id).
    pub fn after(&self) -> &str {
        self.cursor.as_deref().unwrap_or("")
    }
}

/// One page of a list.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Page<T> {
    /// The items, oldest first.
    pub items: Vec<T>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

impl<T> Page<T> {
    /// A page from `limit + 1` fetched items, `id` giving each item's cursor.
    pub fn from_overfetch(mut items: Vec<T>, limit: i64, id: impl Fn(&T) -> String) -> Self {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let next_cursor = if items.len() > limit {
            items.truncate(limit);
            items.last().map(&id)
        } else {
            None
        };
        Self { items, next_cursor }
    }
}

/// The caller's role in `team_id`; `None` for platform admins outside the team.
/// An outsider gets 404 so that team ids and names do not leak.
pub async fn team_role(
    state: &AppState,
    caller: &Caller,
    team_id: &str,
) -> ApiResult<Option<Role>> {
    let row = sqlx::query("SELECT m.role FROM teams t LEFT JOIN members m ON m.team_id = t.id AND m.user_id = $1 WHERE t.id = $2")
        .bind(&caller.id)
        .bind(team_id)
        .fetch_optional(&state.store.pool)
        .await?;
    let role = match &row {
        None => None,
        Some(r) => r
            .get::<Option<String>, _>(0)
            .as_deref()
            .and_then(Role::parse),
    };
    if row.is_none() || (role.is_none() && !caller.admin) {
        return Err(ApiError::NotFound(format!("no team {team_id}")));
    }
    Ok(role)
}

/// Checks that the caller may do `action` in `team_id`.
pub async fn authorize(
    state: &AppState,
    caller: &Caller,
    team_id: &str,
    action: Action,
) -> ApiResult<()> {
    let role = team_role(state, caller, team_id).await?;
    if caller.admin {
        return Ok(());
    }
    let need = required(action);
    match role {
        Some(r) if r >= need => Ok(()),
        Some(r) => Err(ApiError::Forbidden(format!(
            "this needs the {} role in the team; you are {}",
            need.as_str(),
            r.as_str()
        ))),
        None => Err(ApiError::NotFound(format!("no team {team_id}"))),
    }
}

/// Only platform admins.
pub fn require_admin(caller: &Caller) -> ApiResult<()> {
    if caller.admin {
        Ok(())
    } else {
        Err(ApiError::Forbidden(
            "only platform admins may do this".into(),
        ))
    }
}

/// Checks a display name: 1 to 100 characters, not blank.
pub fn check_display_name(field: &str, name: &str) -> ApiResult<()> {
    if name.trim().is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            field,
            "must be 1 to 100 printable characters",
        ));
    }
    Ok(())
}

/// Parses stored JSON text.
pub fn json_text(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or(serde_json::Value::Null)
}
