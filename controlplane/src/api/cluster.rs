//! `GET /api/v1/cluster` (platform admins): the control planes on the database, which one
//! leads, and the standalone proxies following the leader's route feed. A follower forwards it
//! to the leader like every API call, so `self` is the leader unless none leads.

use axum::extract::State;
use serde::Serialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::require_admin;
use crate::auth::Caller;
use crate::error::{ApiResult, Json};
use crate::leader::ControlPlaneRow;
use crate::state::AppState;

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(get_cluster))
}

/// The control plane that answered.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SelfView {
    /// Its id.
    pub id: String,
    /// Whether it leads.
    pub leader: bool,
}

/// A proxy following the route feed.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ProxyView {
    /// Its id (`--proxy-id`).
    pub id: String,
    /// Where it takes requests.
    pub address: String,
    /// The generation of the table it serves.
    pub generation: u64,
    /// Its last report, epoch ms.
    pub last_seen: i64,
}

/// The cluster.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Cluster {
    /// The control plane that answered.
    #[serde(rename = "self")]
    pub this: SelfView,
    /// Every control plane seen in the last minute.
    pub control_planes: Vec<ControlPlaneRow>,
    /// The proxies that reported in the last 3 s.
    pub proxies: Vec<ProxyView>,
}

/// The control planes and proxies (platform admins).
#[utoipa::path(get, path = "/api/v1/cluster", tag = "cluster",
    responses((status = 200, body = Cluster), (status = 403, body = crate::error::ErrorBody)))]
async fn get_cluster(State(state): State<AppState>, caller: Caller) -> ApiResult<Json<Cluster>> {
    require_admin(&caller)?;
    let leader = match state.leadership.role() {
        _ if state.leadership.may_act() => Some(state.leadership.id.clone()),
        crate::leader::Role::Follower { leader, .. } => Some(leader),
        _ => None,
    };
    let control_planes = crate::leader::control_planes(&state.store, leader.as_deref()).await?;
    Ok(Json(Cluster {
        this: SelfView {
            id: state.leadership.id.clone(),
            leader: state.leadership.may_act(),
        },
        control_planes,
        proxies: state
            .feed
            .proxies()
            .into_iter()
            .map(|(id, p)| ProxyView {
                id,
                address: p.address,
                generation: p.generation,
                last_seen: p.last_seen_ms,
            })
            .collect(),
    }))
}
