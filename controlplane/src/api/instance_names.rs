//! `GET /api/v1/instance-names/{name}`: whether a name can be given to a new instance, with the
//! API's own rules and words, so that a form can check a name as it is typed and say exactly
//! what creating the instance would say.
//!
//! Instance names are unique on the platform (they are host names), so the answer says whether
//! any instance has the name. That is no more than the proxy already tells anyone who asks for
//! `<name>.<base domain>`.

use axum::extract::{Path, State};
use serde::Serialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::instances::{check_name, name_taken};
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult, Json};
use crate::state::AppState;

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(check_instance_name))
}

/// Whether a name is free for a new instance.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct NameCheck {
    /// The name asked about.
    pub name: String,
    /// Creating an instance with this name would not be refused for its name.
    pub available: bool,
    /// Why not, in the words of `POST /api/v1/instances`; absent when available.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Checks a name for a new instance: the naming rules, then whether an instance has it. Any
/// signed-in user.
#[utoipa::path(get, path = "/api/v1/instance-names/{name}", tag = "instances",
    params(("name" = String, Path, description = "The name to check")),
    responses((status = 200, body = NameCheck), (status = 401, body = crate::error::ErrorBody)))]
async fn check_instance_name(
    State(state): State<AppState>,
    _caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<NameCheck>> {
    let refused = match check_name(&name) {
        Err(ApiError::Invalid { field, message }) => Some(format!("{field}: {message}")),
        Err(other) => return Err(other),
        Ok(()) => sqlx::query("SELECT 1 FROM instances WHERE name = $1")
            .bind(&name)
            .fetch_optional(&state.store.pool)
            .await?
            .map(|_| name_taken(&name)),
    };
    Ok(Json(NameCheck {
        available: refused.is_none(),
        message: refused,
        name,
    }))
}
