//! Editor tickets: how the console's "Open editor" link opens a non-HA instance's editor.
//!
//! The console (`http://127.0.0.1:3000/`) and the instances (`http://<name>.localhost:8080/`)
//! share no cookie (browsers refuse `Domain=localhost`, and `127.0.0.1` is no domain at all), so
//! the console's session cannot reach an editor. The handoff:
//! 1. The console calls `POST /api/v1/instances/{id}/editor-ticket` (members, owners and
//!    platform admins; 409 on an HA instance, whose editor is blocked). The answer is a URL on
//!    the instance's host, `<instance url>/_tandem/editor-ticket?ticket=<value>`, and when the
//!    ticket expires. A ticket is 256 random bits, good for [`TICKET_TTL_MS`] and once, for the
//!    caller on this instance; the store keeps only its SHA-256, so every control plane of a
//!    cluster and every standalone proxy's control plane can exchange it.
//! 2. The browser follows the URL. The proxy answers that path itself
//!    ([`tandem_proxy::ticket`]) and asks its editor gate to [`exchange`] the ticket: in
//!    process (`editor_gate::TeamEditorGate`), or for a standalone proxy through
//!    `POST /api/v1/routes/editor-ticket` (`api::proxies`).
//! 3. On success the proxy sets the new session as a host-only `tandem_session` cookie and
//!    sends the browser to the editor, where the gate takes that cookie as any other session.
//!
//! `POST /api/v1/instances/{id}/access-ticket` does the same for an instance whose own
//! endpoints are for its team's members (HTTP auth `members`, HA or not): viewers included, and
//! the browser lands on `/`. A ticket records where it leads (`home`).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::Row;
use tandem_proxy::ticket::{TICKET_PARAM, TICKET_PATH};
use tandem_proxy::{TicketDecision, TicketHome};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{authorize, instances};
use crate::audit::{self, Subject};
use crate::auth::{self, Caller, Credential};
use crate::error::{ApiError, ApiResult, Json, Query};
use crate::http_auth::HttpAuthMode;
use crate::roles::Action;
use crate::state::AppState;
use crate::store::now_ms;

/// How long a ticket is good for, in milliseconds: long enough for a browser to follow a link,
/// short enough that one found in a history or a log is useless.
pub const TICKET_TTL_MS: i64 = 60_000;

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_editor_ticket))
        .routes(routes!(create_access_ticket))
}

/// A new editor ticket.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EditorTicket {
    /// Where to send the browser: `<instance url>/_tandem/editor-ticket?ticket=<value>`. Good
    /// once; shown this once.
    pub url: String,
    /// When the ticket stops being good, epoch ms.
    pub expires_at: i64,
}

/// `?host=`: where the ticket leads.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct TicketQuery {
    /// The instance's custom hostname, to land there (the session is host-only); default the
    /// instance's own host.
    pub host: Option<String>,
}

/// A ticket that opens the instance's editor in a browser, on the instance's own host (members;
/// not on HA instances): follow `url` within a minute. Following it gives that browser a
/// session of the caller on that host only.
#[utoipa::path(post, path = "/api/v1/instances/{id}/editor-ticket", tag = "instances",
    params(("id" = String, Path, description = "Instance id"), TicketQuery),
    responses((status = 201, body = EditorTicket), (status = 403, body = crate::error::ErrorBody),
        (status = 404, body = crate::error::ErrorBody),
        (status = 409, description = "The instance runs in HA mode: its editor is disabled", body = crate::error::ErrorBody),
        (status = 422, body = crate::error::ErrorBody)))]
async fn create_editor_ticket(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<TicketQuery>,
) -> ApiResult<(StatusCode, Json<EditorTicket>)> {
    let instance = instances::load_for(&state, &caller, &id, Action::OpenEditor).await?;
    if instance.ha.is_some() {
        return Err(ApiError::Conflict(format!(
            "{} runs in HA mode, where its editor is disabled; deploy flows through a snapshot or a pipeline instead",
            instance.name
        )));
    }
    issue(
        &state,
        &caller,
        &instance,
        TicketHome::Editor,
        q.host.as_deref(),
    )
    .await
}

/// A ticket that opens an instance's own endpoints in a browser, when they are for its team's
/// members (HTTP auth `members`; 409 otherwise): anyone in the team, viewers included, HA or
/// not. Follow `url` within a minute; it lands on the instance's `/` with a session of the
/// caller on that host only.
#[utoipa::path(post, path = "/api/v1/instances/{id}/access-ticket", tag = "instances",
    params(("id" = String, Path, description = "Instance id"), TicketQuery),
    responses((status = 201, body = EditorTicket), (status = 404, body = crate::error::ErrorBody),
        (status = 409, description = "The instance's endpoints are not for its members (its HTTP auth is not `members`)", body = crate::error::ErrorBody),
        (status = 422, body = crate::error::ErrorBody)))]
async fn create_access_ticket(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<TicketQuery>,
) -> ApiResult<(StatusCode, Json<EditorTicket>)> {
    let instance = instances::load_for(&state, &caller, &id, Action::Read).await?;
    if instance.http_auth != HttpAuthMode::Members {
        return Err(ApiError::Conflict(format!(
            "{}'s endpoints are not for its team's members (its HTTP auth is {}): an access ticket opens nothing there",
            instance.name,
            instance.http_auth.as_str()
        )));
    }
    issue(
        &state,
        &caller,
        &instance,
        TicketHome::Flows,
        q.host.as_deref(),
    )
    .await
}

/// Records a new ticket of `caller` for `instance`, leading to `home` on `host` (its custom
/// hostname; its own host when `None`), and answers it.
async fn issue(
    state: &AppState,
    caller: &Caller,
    instance: &instances::Instance,
    home: TicketHome,
    host: Option<&str>,
) -> ApiResult<(StatusCode, Json<EditorTicket>)> {
    let base = match host {
        None => instance.url.clone(),
        Some(h) => {
            let h = h.trim_end_matches('.').to_ascii_lowercase();
            if instance.custom_hostname.as_deref() != Some(h.as_str()) {
                return Err(ApiError::invalid(
                    "host",
                    format!("{h:?} is not a host of {}: give its custom hostname, or leave host out for its own host", instance.name),
                ));
            }
            instances::host_url(&state.config, &h)
        }
    };
    let ticket = auth::random_secret()?;
    let now = now_ms();
    let expires_at = now + TICKET_TTL_MS;
    let mut tx = state.store.write().await?;
    // Tickets never followed are swept here rather than by a timer.
    sqlx::query("DELETE FROM editor_tickets WHERE expires_at <= $1")
        .bind(now)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO editor_tickets (hash, user_id, instance_id, expires_at, home) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(auth::hash_secret(&ticket))
    .bind(&caller.id)
    .bind(&instance.id)
    .bind(expires_at)
    .bind(home_name(home))
    .execute(&mut *tx)
    .await?;
    audit::record(
        &mut tx,
        Some(caller),
        "instance.editor-ticket",
        Subject::instance(&instance.team_id, &instance.id),
        json!({ "expires_at": expires_at, "home": home_name(home) }),
    )
    .await?;
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        Json(EditorTicket {
            url: format!("{base}{TICKET_PATH}?{TICKET_PARAM}={ticket}"),
            expires_at,
        }),
    ))
}

/// A ticket's `home` as stored.
fn home_name(home: TicketHome) -> &'static str {
    match home {
        TicketHome::Editor => "editor",
        TicketHome::Flows => "flows",
    }
}

/// Spends `ticket`, brought to `instance`'s host (the instance's name): a new session of the
/// ticket's user, or why not, in words for the browser. The ticket is spent whatever the answer.
pub async fn exchange(state: &AppState, instance: &str, ticket: &str) -> TicketDecision {
    match try_exchange(state, instance, ticket).await {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(%instance, error = %e, "cannot exchange an editor ticket");
            TicketDecision::Refused(format!(
                "Tandem could not open the editor of {instance} just now; open it from the console again.\n"
            ))
        }
    }
}

async fn try_exchange(state: &AppState, instance: &str, ticket: &str) -> ApiResult<TicketDecision> {
    let refused = |why: String| -> ApiResult<TicketDecision> {
        Ok(TicketDecision::Refused(format!(
            "{why}; open the editor from Tandem's console again.\n"
        )))
    };
    // Read and deleted in one statement: of two proxies racing with one ticket, one gets the
    // row and the other nothing, on SQLite and on PostgreSQL alike.
    let row = sqlx::query(
        "DELETE FROM editor_tickets WHERE hash = $1 RETURNING user_id, instance_id, expires_at, home",
    )
    .bind(auth::hash_secret(ticket))
    .fetch_optional(&state.store.pool)
    .await?;
    let Some(row) = row else {
        return refused(
            "This editor ticket is not valid: it was used already, or never issued".into(),
        );
    };
    let (user_id, instance_id, expires_at): (String, String, i64) =
        (row.get(0), row.get(1), row.get(2));
    let home = match row.get::<String, _>(3).as_str() {
        "flows" => TicketHome::Flows,
        _ => TicketHome::Editor,
    };
    if expires_at <= now_ms() {
        return refused(format!(
            "This editor ticket has expired (tickets are good for {} s)",
            TICKET_TTL_MS / 1000
        ));
    }
    let found: Option<(String, String, Option<i64>, String)> =
        sqlx::query("SELECT id, team_id, ha_replicas, http_auth FROM instances WHERE name = $1")
            .bind(instance)
            .fetch_optional(&state.store.pool)
            .await?
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)));
    let Some((_, team, ha, http_auth)) = found.filter(|(id, ..)| *id == instance_id) else {
        return refused(format!("This editor ticket is not for {instance}"));
    };
    // A ticket to the endpoints needs them to be for members still; one to the editor needs
    // an editor.
    let action = match home {
        TicketHome::Flows if HttpAuthMode::from_stored(&http_auth) != HttpAuthMode::Members => {
            return refused(format!(
                "{instance}'s endpoints are no longer for its team's members"
            ))
        }
        TicketHome::Flows => Action::Read,
        TicketHome::Editor => Action::OpenEditor,
    };
    if home == TicketHome::Editor && ha.is_some() {
        return refused(format!(
            "{instance} now runs in HA mode, where its editor is disabled"
        ));
    }
    // The user may have lost the right since the ticket was made: asked again, as the gate asks
    // on every request.
    let user = sqlx::query("SELECT username, admin, disabled FROM users WHERE id = $1")
        .bind(&user_id)
        .fetch_optional(&state.store.pool)
        .await?;
    let Some(user) = user else {
        return refused("The user of this editor ticket no longer exists".into());
    };
    let caller = Caller {
        id: user_id,
        username: user.get(0),
        admin: user.get::<i64, _>(1) != 0,
        via: Credential::Session,
    };
    if user.get::<i64, _>(2) != 0 {
        return refused(format!("{} is disabled", caller.username));
    }
    match authorize(state, &caller, &team, action).await {
        Ok(()) => {}
        Err(ApiError::Forbidden(_) | ApiError::NotFound(_)) => {
            let what = match home {
                TicketHome::Editor => format!("the editor of {instance}"),
                TicketHome::Flows => format!("{instance}'s endpoints"),
            };
            return refused(format!("{} may no longer open {what}", caller.username));
        }
        Err(e) => return Err(e),
    }
    let session = auth::create_session(state, &caller.id).await?;
    tracing::info!(%instance, user = %caller.username, "editor ticket exchanged for a session");
    Ok(TicketDecision::Session {
        secret: session,
        home,
    })
}
