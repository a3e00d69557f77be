//! Standalone proxies (issue 13): their tokens, and the routes only they call.
//!
//! - `POST,GET /api/v1/proxy-tokens`, `DELETE /api/v1/proxy-tokens/{id}` (platform admins): a
//!   proxy token's value is shown once, at creation; the store keeps its SHA-256.
//! - `GET /api/v1/routes`: the route feed, server-sent events, one `table` event with the whole
//!   table on connect and one more per change ([`tandem_proxy::routes::feed::FeedTable`]). A
//!   revoked token's feed ends within [`RECHECK`].
//! - `POST /api/v1/routes/report`: a proxy's presence and requests in flight to replicas out of
//!   rotation, which drains wait for.
//! - `POST /api/v1/routes/editor-check`: the editor gate's question, answered as the in-process
//!   proxy's gate answers it.
//! - `POST /api/v1/routes/editor-ticket`: an editor ticket a browser brought to an instance's
//!   host, exchanged for a session as the in-process proxy's gate exchanges it
//!   ([`crate::api::editor_tickets`]).
//!
//! The proxy routes take a proxy token (`tdp_...`) and nothing else; a proxy token opens no
//! other route (it is not a user's token).

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::Row;
use tandem_proxy::control::{EditorAnswer, Report};
use tandem_proxy::{EditorGate as _, TicketDecision};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{require_admin, Page, PageQuery};
use crate::audit::{self, Subject};
use crate::auth::{self, Caller};
use crate::error::{ApiError, ApiResult, Json, Query};
use crate::state::AppState;
use crate::store::{new_id, now_ms};

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_proxy_tokens, create_proxy_token))
        .routes(routes!(delete_proxy_token))
        .routes(routes!(route_feed))
        .routes(routes!(report))
        .routes(routes!(editor_check))
        .routes(routes!(editor_ticket))
        .routes(routes!(wake))
}

/// The prefix of proxy tokens, apart from users' `tdm_`.
pub const PROXY_TOKEN_PREFIX: &str = "tdp_";

/// The prefix of the token control planes follow each other's feed with.
const CONTROL_PLANE_TOKEN_PREFIX: &str = "tdc_";

/// The token a follower's in-process proxy follows the leader's feed with: derived from the
/// platform key every control plane on the database shares, stored nowhere, and accepted where
/// a proxy token is.
pub fn control_plane_token(key: &crate::secrets::PlatformKey) -> String {
    format!(
        "{CONTROL_PLANE_TOKEN_PREFIX}{}",
        key.derive("route-feed", "control-planes")
    )
}

/// The token id of a control plane's own feed.
const CONTROL_PLANE: &str = "control-plane";

/// How often an open feed checks that its token is still valid.
pub const RECHECK: Duration = Duration::from_secs(5);

/// A request with a valid proxy token; 401 otherwise.
#[derive(Debug, Clone)]
pub struct ProxyCaller {
    /// The token's id.
    pub token_id: String,
}

impl axum::extract::FromRequestParts<AppState> for ProxyCaller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let refused = || {
            ApiError::Unauthorized(
                "this route takes a proxy token only (POST /api/v1/proxy-tokens)".into(),
            )
        };
        let given = tandem_proxy::credentials::bearer(&parts.headers).unwrap_or_default();
        if given.starts_with(CONTROL_PLANE_TOKEN_PREFIX) {
            // Digests are compared: the time taken says nothing about the token.
            let expected = control_plane_token(&state.key);
            if auth::hash_secret(given) == auth::hash_secret(&expected) {
                return Ok(Self {
                    token_id: CONTROL_PLANE.into(),
                });
            }
            return Err(refused());
        }
        let token = Some(given)
            .filter(|t| t.starts_with(PROXY_TOKEN_PREFIX))
            .ok_or_else(refused)?;
        let id: Option<String> = sqlx::query("SELECT id FROM proxy_tokens WHERE token_hash = $1")
            .bind(auth::hash_secret(token))
            .fetch_optional(&state.store.pool)
            .await?
            .map(|r| r.get(0));
        Ok(Self {
            token_id: id.ok_or_else(refused)?,
        })
    }
}

/// A proxy token.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ProxyToken {
    /// Id.
    pub id: String,
    /// What it is for.
    pub name: String,
    /// Creation time, epoch ms.
    pub created_at: i64,
}

/// A proxy token just created: its value, shown this once.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CreatedProxyToken {
    /// Id.
    pub id: String,
    /// What it is for.
    pub name: String,
    /// The token, for the proxy's `--token-file`; not shown again.
    pub token_value: String,
    /// Creation time, epoch ms.
    pub created_at: i64,
}

/// A new proxy token.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewProxyToken {
    /// What it is for, 1 to 100 characters.
    pub name: String,
}

/// Creates a proxy token (platform admins).
#[utoipa::path(post, path = "/api/v1/proxy-tokens", tag = "proxies", request_body = NewProxyToken,
    responses((status = 201, body = CreatedProxyToken), (status = 403, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
async fn create_proxy_token(
    State(state): State<AppState>,
    caller: Caller,
    Json(body): Json<NewProxyToken>,
) -> ApiResult<(StatusCode, Json<CreatedProxyToken>)> {
    require_admin(&caller)?;
    super::check_display_name("name", &body.name)?;
    let value = format!("{PROXY_TOKEN_PREFIX}{}", auth::random_secret()?);
    let t = CreatedProxyToken {
        id: new_id(),
        name: body.name,
        token_value: value,
        created_at: now_ms(),
    };
    let mut tx = state.store.write().await?;
    sqlx::query(
        "INSERT INTO proxy_tokens (id, name, token_hash, created_at) VALUES ($1, $2, $3, $4)",
    )
    .bind(&t.id)
    .bind(&t.name)
    .bind(auth::hash_secret(&t.token_value))
    .bind(t.created_at)
    .execute(&mut *tx)
    .await?;
    audit::record(
        &mut tx,
        Some(&caller),
        "proxy-token.created",
        Subject::object("proxy-token", &t.id),
        json!({ "name": t.name }),
    )
    .await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(t)))
}

/// Every proxy token, without values (platform admins).
#[utoipa::path(get, path = "/api/v1/proxy-tokens", tag = "proxies", params(PageQuery),
    responses((status = 200, body = Page<ProxyToken>), (status = 403, body = crate::error::ErrorBody)))]
async fn list_proxy_tokens(
    State(state): State<AppState>,
    caller: Caller,
    Query(q): Query<PageQuery>,
) -> ApiResult<Json<Page<ProxyToken>>> {
    require_admin(&caller)?;
    let limit = q.limit()?;
    let rows = sqlx::query(
        "SELECT id, name, created_at FROM proxy_tokens WHERE id > $1 ORDER BY id LIMIT $2",
    )
    .bind(q.after())
    .bind(limit + 1)
    .fetch_all(&state.store.pool)
    .await?;
    let items = rows
        .iter()
        .map(|r| ProxyToken {
            id: r.get(0),
            name: r.get(1),
            created_at: r.get(2),
        })
        .collect();
    Ok(Json(Page::from_overfetch(items, limit, |t| t.id.clone())))
}

/// Revokes a proxy token (platform admins): its proxy's calls fail at once and its feed ends
/// within seconds; the proxy keeps serving its last table.
#[utoipa::path(delete, path = "/api/v1/proxy-tokens/{id}", tag = "proxies", params(("id" = String, Path, description = "Proxy token id")),
    responses((status = 204), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
async fn delete_proxy_token(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    require_admin(&caller)?;
    let mut tx = state.store.write().await?;
    let name: Option<String> = sqlx::query("SELECT name FROM proxy_tokens WHERE id = $1")
        .bind(&id)
        .fetch_optional(&mut *tx)
        .await?
        .map(|r| r.get(0));
    let Some(name) = name else {
        return Err(ApiError::NotFound(format!("no proxy token {id}")));
    };
    sqlx::query("DELETE FROM proxy_tokens WHERE id = $1")
        .bind(&id)
        .execute(&mut *tx)
        .await?;
    audit::record(
        &mut tx,
        Some(&caller),
        "proxy-token.revoked",
        Subject::object("proxy-token", &id),
        json!({ "name": name }),
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn still_valid(state: &AppState, token_id: &str) -> bool {
    if token_id == CONTROL_PLANE {
        return true;
    }
    sqlx::query("SELECT id FROM proxy_tokens WHERE id = $1")
        .bind(token_id)
        .fetch_optional(&state.store.pool)
        .await
        .is_ok_and(|r| r.is_some())
}

/// The route feed (proxy tokens): server-sent events, `event: table` with `id:` the generation
/// and `data:` the whole table as JSON; one on connect, one per change. The table holds the
/// instances' admin secrets: follow it over a private network.
#[utoipa::path(get, path = "/api/v1/routes", tag = "proxies",
    responses((status = 200, description = "Server-sent events, one `table` per change", content_type = "text/event-stream", body = String), (status = 401, body = crate::error::ErrorBody)))]
async fn route_feed(
    State(state): State<AppState>,
    caller: ProxyCaller,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let mut tables = state.feed.subscribe();
    tables.mark_changed();
    let closed = Box::pin(state.feed.closed());
    let stream = futures_util::stream::unfold(
        (tables, state, caller.token_id, closed),
        |(mut tables, state, token, mut closed)| async move {
            loop {
                tokio::select! {
                    _ = &mut closed => return None,
                    changed = tables.changed() => {
                        changed.ok()?;
                        let table = tables.borrow_and_update().clone();
                        let event = Event::default()
                            .event("table")
                            .id(table.generation.to_string())
                            .json_data(&*table)
                            .ok()?;
                        return Some((Ok(event), (tables, state, token, closed)));
                    }
                    _ = tokio::time::sleep(RECHECK) => {
                        if !still_valid(&state, &token).await {
                            return None;
                        }
                    }
                }
            }
        },
    );
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

/// A proxy's report.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReportBody {
    /// The proxy's id, 1 to 200 characters.
    pub id: String,
    /// Where it takes requests.
    pub address: String,
    /// The generation of the table it serves.
    pub generation: u64,
    /// Requests in flight to replicas out of rotation: replica id → count.
    #[serde(default)]
    pub in_flight: HashMap<String, u64>,
    /// When each instance was last used through the proxy, epoch ms (for instances that sleep
    /// when idle).
    #[serde(default)]
    pub active: HashMap<String, u64>,
}

/// Records a proxy's presence, the table it serves and its requests in flight to replicas out
/// of rotation (proxy tokens).
#[utoipa::path(post, path = "/api/v1/routes/report", tag = "proxies", request_body = ReportBody,
    responses((status = 200, body = Object), (status = 401, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
async fn report(
    State(state): State<AppState>,
    _caller: ProxyCaller,
    Json(body): Json<ReportBody>,
) -> ApiResult<Json<serde_json::Value>> {
    if body.id.is_empty() || body.id.chars().count() > 200 {
        return Err(ApiError::invalid("id", "must be 1 to 200 characters"));
    }
    if body.address.chars().count() > 200 || body.in_flight.len() > 10_000 {
        return Err(ApiError::invalid("in_flight", "too large a report"));
    }
    // Only names of instances can be there: anything else is ignored by the sleeper, but is
    // not kept either.
    if body.active.len() > 100_000 || body.active.keys().any(|k| k.len() > 63) {
        return Err(ApiError::invalid("active", "too large a report"));
    }
    state.feed.report(Report {
        id: body.id,
        address: body.address,
        generation: body.generation,
        in_flight: body.in_flight,
        active: body.active,
    });
    Ok(Json(json!({ "generation": state.feed.generation() })))
}

/// The editor gate's question.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EditorCheckBody {
    /// The instance's name.
    pub instance: String,
    /// The request's method.
    pub method: String,
    /// The request's `Authorization` header.
    pub authorization: Option<String>,
    /// Its `Cookie` header.
    pub cookie: Option<String>,
    /// Its `Origin` header.
    pub origin: Option<String>,
    /// Its `Sec-Fetch-Site` header.
    pub sec_fetch_site: Option<String>,
    /// A request to the instance's own endpoints under this mode (`tokens`, `members`), not to
    /// its editor.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub flows: Option<tandem_proxy::HttpAuth>,
}

/// The gate's answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EditorCheckAnswer {
    /// `allow`, `sign_in` (the proxy answers 401) or `deny` (403).
    pub decision: String,
    /// Why, for 401 and 403.
    pub message: String,
}

/// Whether a request may open a non-HA instance's editor (proxy tokens): the answer the
/// in-process proxy's gate gives, from the request's credentials and origin.
#[utoipa::path(post, path = "/api/v1/routes/editor-check", tag = "proxies", request_body = EditorCheckBody,
    responses((status = 200, body = EditorCheckAnswer), (status = 401, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
async fn editor_check(
    State(state): State<AppState>,
    _caller: ProxyCaller,
    Json(body): Json<EditorCheckBody>,
) -> ApiResult<Json<EditorCheckAnswer>> {
    let method = http::Method::from_bytes(body.method.as_bytes())
        .map_err(|_| ApiError::invalid("method", "not an HTTP method"))?;
    let mut headers = http::HeaderMap::new();
    for (name, value) in [
        (http::header::AUTHORIZATION, &body.authorization),
        (http::header::COOKIE, &body.cookie),
        (http::header::ORIGIN, &body.origin),
        (
            http::header::HeaderName::from_static("sec-fetch-site"),
            &body.sec_fetch_site,
        ),
    ] {
        if let Some(v) = value {
            let v = http::HeaderValue::from_str(v)
                .map_err(|_| ApiError::invalid(name.as_str(), "not a header value"))?;
            headers.insert(name, v);
        }
    }
    let access = match body.flows {
        Some(mode) => tandem_proxy::Access::Flows(mode),
        None => tandem_proxy::Access::Editor,
    };
    let decision = crate::editor_gate::TeamEditorGate(state)
        .check(&body.instance, access, &method, &headers)
        .await;
    let answer = EditorAnswer::from(decision);
    Ok(Json(EditorCheckAnswer {
        decision: serde_json::to_value(answer.decision)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
        message: answer.message,
    }))
}

/// An editor ticket a browser brought to an instance's host.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EditorTicketBody {
    /// The instance's name (whose host the ticket was brought to).
    pub instance: String,
    /// The ticket, from the query of `/_tandem/editor-ticket`.
    pub ticket: String,
}

/// The exchange's answer.
#[derive(Serialize, utoipa::ToSchema)]
pub struct EditorTicketAnswer {
    /// `session` (the ticket is spent; the proxy sets `session` as the host-only session cookie)
    /// or `refused` (the proxy answers 403 with `message`).
    pub decision: String,
    /// The new session's secret, with `session` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// Where the ticket leads: `editor` (`/admin/`) or `flows` (`/`).
    pub home: String,
    /// Why, with `refused`.
    pub message: String,
}

/// Exchanges an editor ticket for a session of its user (proxy tokens): as the in-process
/// proxy's gate does, spending the ticket whatever the answer. Never cache the answer.
#[utoipa::path(post, path = "/api/v1/routes/editor-ticket", tag = "proxies", request_body = EditorTicketBody,
    responses((status = 200, body = EditorTicketAnswer), (status = 401, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
async fn editor_ticket(
    State(state): State<AppState>,
    _caller: ProxyCaller,
    Json(body): Json<EditorTicketBody>,
) -> ApiResult<Json<EditorTicketAnswer>> {
    let answer =
        match crate::api::editor_tickets::exchange(&state, &body.instance, &body.ticket).await {
            TicketDecision::Session { secret, home } => EditorTicketAnswer {
                decision: "session".into(),
                session: Some(secret),
                home: match home {
                    tandem_proxy::TicketHome::Editor => "editor".into(),
                    tandem_proxy::TicketHome::Flows => "flows".into(),
                },
                message: String::new(),
            },
            TicketDecision::Refused(message) => EditorTicketAnswer {
                decision: "refused".into(),
                session: None,
                home: "editor".into(),
                message,
            },
        };
    Ok(Json(answer))
}

/// A sleeping instance a request came for.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WakeBody {
    /// The instance's name.
    pub instance: String,
}

/// Wakes a sleeping instance a request came for at a standalone proxy (proxy tokens): 204
/// whether it slept or not; 404 for an unknown instance.
#[utoipa::path(post, path = "/api/v1/routes/wake", tag = "proxies", request_body = WakeBody,
    responses((status = 204), (status = 401, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
async fn wake(
    State(state): State<AppState>,
    _caller: ProxyCaller,
    Json(body): Json<WakeBody>,
) -> ApiResult<StatusCode> {
    let known: Option<(String,)> = sqlx::query_as("SELECT id FROM instances WHERE name = $1")
        .bind(&body.instance)
        .fetch_optional(&state.store.pool)
        .await?;
    if known.is_none() {
        return Err(ApiError::NotFound(format!("no instance {}", body.instance)));
    }
    crate::sleep::wake(&state, &body.instance).await?;
    Ok(StatusCode::NO_CONTENT)
}
