//! Teams and their members.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::Row;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{authorize, check_display_name, Page, PageQuery};
use crate::audit::{self, Subject};
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult, Json, Query};
use crate::roles::{Action, Role};
use crate::state::AppState;
use crate::store::{new_id, now_ms};

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_teams, create_team))
        .routes(routes!(get_team, update_team, delete_team))
        .routes(routes!(list_members, add_member))
        .routes(routes!(change_member, remove_member))
}

/// A team.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Team {
    /// Id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Unique, URL-safe.
    pub slug: String,
    /// The caller's role (absent for platform admins outside the team).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// Creation time, epoch ms.
    pub created_at: i64,
}

/// A new team.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTeam {
    /// Display name.
    pub name: String,
    /// 1 to 63 of a-z, 0-9 and '-'; derived from the name when absent.
    pub slug: Option<String>,
}

/// Changes to a team.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TeamUpdate {
    /// New display name.
    pub name: String,
}

fn check_slug(slug: &str) -> ApiResult<()> {
    let b = slug.as_bytes();
    let ok = (1..=63).contains(&b.len())
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-');
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "slug",
            "use 1 to 63 of a-z, 0-9 and '-', starting with a letter or digit",
        ))
    }
}

fn slug_of(name: &str) -> String {
    let mut s = String::new();
    for c in name.chars().flat_map(char::to_lowercase) {
        if c.is_ascii_alphanumeric() {
            s.push(c);
        } else if !s.ends_with('-') && !s.is_empty() {
            s.push('-');
        }
    }
    s.trim_end_matches('-').chars().take(63).collect()
}

fn team_from(row: &sqlx::any::AnyRow) -> Team {
    Team {
        id: row.get(0),
        name: row.get(1),
        slug: row.get(2),
        created_at: row.get(3),
        role: row
            .get::<Option<String>, _>(4)
            .as_deref()
            .and_then(Role::parse),
    }
}

/// The caller's teams (every team for platform admins).
#[utoipa::path(get, path = "/api/v1/teams", tag = "teams", params(PageQuery), responses((status = 200, body = Page<Team>)))]
async fn list_teams(
    State(state): State<AppState>,
    caller: Caller,
    Query(q): Query<PageQuery>,
) -> ApiResult<Json<Page<Team>>> {
    let limit = q.limit()?;
    let rows = sqlx::query(
        "SELECT t.id, t.name, t.slug, t.created_at, m.role FROM teams t LEFT JOIN members m ON m.team_id = t.id AND m.user_id = $1 \
         WHERE ($2 = 1 OR m.role IS NOT NULL) AND t.id > $3 ORDER BY t.id LIMIT $4",
    )
    .bind(&caller.id)
    .bind(i64::from(caller.admin))
    .bind(q.after())
    .bind(limit + 1)
    .fetch_all(&state.store.pool)
    .await?;
    Ok(Json(Page::from_overfetch(
        rows.iter().map(team_from).collect(),
        limit,
        |t| t.id.clone(),
    )))
}

/// Creates a team; the caller becomes its owner.
#[utoipa::path(post, path = "/api/v1/teams", tag = "teams", request_body = NewTeam,
    responses((status = 201, body = Team), (status = 409, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
async fn create_team(
    State(state): State<AppState>,
    caller: Caller,
    Json(body): Json<NewTeam>,
) -> ApiResult<(StatusCode, Json<Team>)> {
    check_display_name("name", &body.name)?;
    let slug = body.slug.clone().unwrap_or_else(|| slug_of(&body.name));
    check_slug(&slug)?;
    let team = Team {
        id: new_id(),
        name: body.name,
        slug,
        role: Some(Role::Owner),
        created_at: now_ms(),
    };
    let mut tx = state.store.write().await?;
    sqlx::query("INSERT INTO teams (id, name, slug, created_at) VALUES ($1, $2, $3, $4)")
        .bind(&team.id)
        .bind(&team.name)
        .bind(&team.slug)
        .bind(team.created_at)
        .execute(&mut *tx)
        .await
        .map_err(ApiError::conflict_as(format!(
            "a team with slug {:?} exists",
            team.slug
        )))?;
    sqlx::query("INSERT INTO members (team_id, user_id, role) VALUES ($1, $2, 'owner')")
        .bind(&team.id)
        .bind(&caller.id)
        .execute(&mut *tx)
        .await?;
    let subject = Subject::team(&team.id, "team", &team.id);
    audit::record(
        &mut tx,
        Some(&caller),
        "team.created",
        subject,
        json!({ "name": team.name, "slug": team.slug }),
    )
    .await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(team)))
}

async fn load_team(state: &AppState, caller: &Caller, id: &str) -> ApiResult<Team> {
    let row = sqlx::query("SELECT t.id, t.name, t.slug, t.created_at, m.role FROM teams t LEFT JOIN members m ON m.team_id = t.id AND m.user_id = $1 WHERE t.id = $2")
        .bind(&caller.id)
        .bind(id)
        .fetch_optional(&state.store.pool)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no team {id}")))?;
    Ok(team_from(&row))
}

/// One team.
#[utoipa::path(get, path = "/api/v1/teams/{id}", tag = "teams", params(("id" = String, Path, description = "Team id")),
    responses((status = 200, body = Team), (status = 404, body = crate::error::ErrorBody)))]
async fn get_team(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Team>> {
    authorize(&state, &caller, &id, Action::Read).await?;
    Ok(Json(load_team(&state, &caller, &id).await?))
}

/// Renames a team (owners).
#[utoipa::path(put, path = "/api/v1/teams/{id}", tag = "teams", params(("id" = String, Path, description = "Team id")), request_body = TeamUpdate,
    responses((status = 200, body = Team), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
async fn update_team(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<TeamUpdate>,
) -> ApiResult<Json<Team>> {
    authorize(&state, &caller, &id, Action::EditTeam).await?;
    check_display_name("name", &body.name)?;
    let before = load_team(&state, &caller, &id).await?;
    let mut tx = state.store.write().await?;
    sqlx::query("UPDATE teams SET name = $1 WHERE id = $2")
        .bind(&body.name)
        .bind(&id)
        .execute(&mut *tx)
        .await?;
    let subject = Subject::team(&id, "team", &id);
    audit::record(
        &mut tx,
        Some(&caller),
        "team.updated",
        subject,
        json!({ "before": { "name": before.name }, "after": { "name": body.name } }),
    )
    .await?;
    tx.commit().await?;
    Ok(Json(load_team(&state, &caller, &id).await?))
}

/// Deletes a team with no instances (owners).
#[utoipa::path(delete, path = "/api/v1/teams/{id}", tag = "teams", params(("id" = String, Path, description = "Team id")),
    responses((status = 204), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)))]
async fn delete_team(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    authorize(&state, &caller, &id, Action::DeleteTeam).await?;
    let mut tx = state.store.write().await?;
    let n: i64 = crate::store::count_where(&mut tx, "instances", "team_id", &id).await?;
    if n > 0 {
        return Err(ApiError::Conflict(format!(
            "the team still has {n} instance(s); delete them first"
        )));
    }
    // Its pipelines go with it.
    super::pipelines::delete_of(&mut tx, super::pipelines::Owner::Team(&id)).await?;
    sqlx::query("DELETE FROM applications WHERE team_id = $1")
        .bind(&id)
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM members WHERE team_id = $1")
        .bind(&id)
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM teams WHERE id = $1")
        .bind(&id)
        .execute(&mut *tx)
        .await?;
    let subject = Subject::team(&id, "team", &id);
    audit::record(&mut tx, Some(&caller), "team.deleted", subject, json!({})).await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A team member.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Member {
    /// User id.
    pub user_id: String,
    /// Username.
    pub username: String,
    /// Role in the team.
    pub role: Role,
}

/// Adds a member.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewMember {
    /// The user to add.
    pub username: String,
    /// Their role.
    pub role: Role,
}

/// Changes a member's role.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RoleChange {
    /// The new role.
    pub role: Role,
}

/// The team's members.
#[utoipa::path(get, path = "/api/v1/teams/{id}/members", tag = "teams", params(("id" = String, Path, description = "Team id"), PageQuery),
    responses((status = 200, body = Page<Member>), (status = 404, body = crate::error::ErrorBody)))]
async fn list_members(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<PageQuery>,
) -> ApiResult<Json<Page<Member>>> {
    authorize(&state, &caller, &id, Action::Read).await?;
    let limit = q.limit()?;
    let rows = sqlx::query("SELECT u.id, u.username, m.role FROM members m JOIN users u ON u.id = m.user_id WHERE m.team_id = $1 AND u.id > $2 ORDER BY u.id LIMIT $3")
        .bind(&id)
        .bind(q.after())
        .bind(limit + 1)
        .fetch_all(&state.store.pool)
        .await?;
    let items = rows
        .iter()
        .map(|r| Member {
            user_id: r.get(0),
            username: r.get(1),
            role: Role::parse(&r.get::<String, _>(2)).unwrap_or(Role::Viewer),
        })
        .collect();
    Ok(Json(Page::from_overfetch(items, limit, |m| {
        m.user_id.clone()
    })))
}

/// Adds a user to the team (owners).
#[utoipa::path(post, path = "/api/v1/teams/{id}/members", tag = "teams", params(("id" = String, Path, description = "Team id")), request_body = NewMember,
    responses((status = 201, body = Member), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
async fn add_member(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<NewMember>,
) -> ApiResult<(StatusCode, Json<Member>)> {
    authorize(&state, &caller, &id, Action::ManageMembers).await?;
    let user_id: String = sqlx::query("SELECT id FROM users WHERE username = $1")
        .bind(&body.username)
        .fetch_optional(&state.store.pool)
        .await?
        .ok_or_else(|| ApiError::invalid("username", format!("no user {:?}", body.username)))?
        .get(0);
    let mut tx = state.store.write().await?;
    sqlx::query("INSERT INTO members (team_id, user_id, role) VALUES ($1, $2, $3)")
        .bind(&id)
        .bind(&user_id)
        .bind(body.role.as_str())
        .execute(&mut *tx)
        .await
        .map_err(ApiError::conflict_as(format!(
            "{} is already a member",
            body.username
        )))?;
    let subject = Subject::team(&id, "member", &user_id);
    audit::record(
        &mut tx,
        Some(&caller),
        "member.added",
        subject,
        json!({ "username": body.username, "role": body.role }),
    )
    .await?;
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        Json(Member {
            user_id,
            username: body.username,
            role: body.role,
        }),
    ))
}

/// Locks the team's row until the transaction ends, so that membership changes of one team run
/// one after another: two owners demoting each other at once must not both see the other as
/// the remaining owner (PostgreSQL's READ COMMITTED would let them).
async fn lock_team(tx: &mut sqlx::Transaction<'_, sqlx::Any>, team_id: &str) -> ApiResult<()> {
    sqlx::query("UPDATE teams SET id = id WHERE id = $1")
        .bind(team_id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Fails when removing or demoting `user_id` would leave the team without an owner.
async fn keep_an_owner(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    team_id: &str,
    user_id: &str,
) -> ApiResult<()> {
    let others: i64 = sqlx::query(
        "SELECT COUNT(*) FROM members WHERE team_id = $1 AND role = 'owner' AND user_id <> $2",
    )
    .bind(team_id)
    .bind(user_id)
    .fetch_one(&mut **tx)
    .await?
    .get(0);
    if others == 0 {
        return Err(ApiError::Conflict(
            "a team must keep at least one owner; make someone else owner first".into(),
        ));
    }
    Ok(())
}

async fn current_role(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    team_id: &str,
    user_id: &str,
) -> ApiResult<Role> {
    let row = sqlx::query("SELECT role FROM members WHERE team_id = $1 AND user_id = $2")
        .bind(team_id)
        .bind(user_id)
        .fetch_optional(&mut **tx)
        .await?
        .ok_or_else(|| {
            ApiError::NotFound(format!("user {user_id} is not a member of team {team_id}"))
        })?;
    Ok(Role::parse(&row.get::<String, _>(0)).unwrap_or(Role::Viewer))
}

/// Changes a member's role (owners).
#[utoipa::path(put, path = "/api/v1/teams/{id}/members/{user_id}", tag = "teams",
    params(("id" = String, Path, description = "Team id"), ("user_id" = String, Path, description = "User id")), request_body = RoleChange,
    responses((status = 200, body = Member), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)))]
async fn change_member(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, user_id)): Path<(String, String)>,
    Json(body): Json<RoleChange>,
) -> ApiResult<Json<Member>> {
    authorize(&state, &caller, &id, Action::ManageMembers).await?;
    let mut tx = state.store.write().await?;
    lock_team(&mut tx, &id).await?;
    let before = current_role(&mut tx, &id, &user_id).await?;
    if before == Role::Owner && body.role != Role::Owner {
        keep_an_owner(&mut tx, &id, &user_id).await?;
    }
    sqlx::query("UPDATE members SET role = $1 WHERE team_id = $2 AND user_id = $3")
        .bind(body.role.as_str())
        .bind(&id)
        .bind(&user_id)
        .execute(&mut *tx)
        .await?;
    let username: String = sqlx::query("SELECT username FROM users WHERE id = $1")
        .bind(&user_id)
        .fetch_one(&mut *tx)
        .await?
        .get(0);
    let subject = Subject::team(&id, "member", &user_id);
    audit::record(
        &mut tx,
        Some(&caller),
        "member.role-changed",
        subject,
        json!({ "username": username, "before": before, "after": body.role }),
    )
    .await?;
    tx.commit().await?;
    Ok(Json(Member {
        user_id,
        username,
        role: body.role,
    }))
}

/// Removes a member (owners; anyone may remove themselves).
#[utoipa::path(delete, path = "/api/v1/teams/{id}/members/{user_id}", tag = "teams",
    params(("id" = String, Path, description = "Team id"), ("user_id" = String, Path, description = "User id")),
    responses((status = 204), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)))]
async fn remove_member(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, user_id)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    if user_id == caller.id {
        authorize(&state, &caller, &id, Action::Read).await?;
    } else {
        authorize(&state, &caller, &id, Action::ManageMembers).await?;
    }
    let mut tx = state.store.write().await?;
    lock_team(&mut tx, &id).await?;
    if current_role(&mut tx, &id, &user_id).await? == Role::Owner {
        keep_an_owner(&mut tx, &id, &user_id).await?;
    }
    sqlx::query("DELETE FROM members WHERE team_id = $1 AND user_id = $2")
        .bind(&id)
        .bind(&user_id)
        .execute(&mut *tx)
        .await?;
    let subject = Subject::team(&id, "member", &user_id);
    audit::record(&mut tx, Some(&caller), "member.removed", subject, json!({})).await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}
