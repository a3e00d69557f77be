//! Who may open a non-HA instance's editor through the proxy: members and owners of its team
//! (and platform admins), signed in with a session cookie or a `tdm_` bearer token. Viewers and
//! other users get 403; requests without valid credentials get 401 with where to sign in. The
//! proxy then adds the instance's admin secret; users never see it.

use std::future::Future;
use std::pin::Pin;

use sqlx::Row;
use tandem_proxy::{EditorDecision, EditorGate};

use crate::api::authorize;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::roles::Action;
use crate::state::AppState;

/// The control plane's [`EditorGate`].
#[derive(Clone)]
pub struct TeamEditorGate(pub AppState);

impl EditorGate for TeamEditorGate {
    fn check<'a>(
        &'a self,
        instance: &'a str,
        headers: &'a http::HeaderMap,
    ) -> Pin<Box<dyn Future<Output = EditorDecision> + Send + 'a>> {
        Box::pin(async move {
            let state = &self.0;
            let caller = match Caller::from_headers(headers, state).await {
                Ok(c) => c,
                Err(ApiError::Unauthorized(why)) => {
                    return EditorDecision::SignIn(format!(
                        "Sign in to open the editor of {instance}: {why}. Sign in through Tandem's API (POST /api/v1/auth/login; the session cookie is valid on every instance host under {}) or send Authorization: Bearer <token>.\n",
                        state.config.base_domain
                    ))
                }
                Err(e) => return EditorDecision::Deny(format!("{e}\n")),
            };
            let team: Option<String> =
                match sqlx::query("SELECT team_id FROM instances WHERE name = $1")
                    .bind(instance)
                    .fetch_optional(&state.store.pool)
                    .await
                {
                    Ok(row) => row.map(|r| r.get(0)),
                    Err(e) => return EditorDecision::Deny(format!("cannot check access: {e}\n")),
                };
            let Some(team) = team else {
                return EditorDecision::Deny(format!("no instance {instance}\n"));
            };
            match authorize(state, &caller, &team, Action::OpenEditor).await {
                Ok(()) => EditorDecision::Allow,
                Err(ApiError::NotFound(_)) => EditorDecision::Deny(format!(
                    "{} is not a member of the team that owns {instance}\n",
                    caller.username
                )),
                Err(e) => EditorDecision::Deny(format!("{e}\n")),
            }
        })
    }
}
