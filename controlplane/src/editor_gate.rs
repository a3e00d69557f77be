//! Who may pass the proxy to an instance: to the editor of a non-HA instance, and to the
//! instance's own endpoints when they are protected ([`HttpAuth`]: one of its HTTP tokens, or
//! anyone in its team, viewers included, by the same credentials as below).
//!
//! The editor: members and owners of its team
//! (and platform admins), signed in with a session cookie or a `tdm_` bearer token. Viewers and
//! other users get 403; requests without valid credentials get 401 with where to sign in. The
//! proxy then adds the instance's admin secret; users never see it. A protected instance's
//! editor is read-only for members: only owners send it anything but reads.
//!
//! The session cookie reaches every instance host under the base domain, including other teams'
//! instances, whose flows can serve pages. So a request authenticated by the cookie alone that
//! changes something (not GET, HEAD or OPTIONS) or opens a WebSocket must come from the
//! instance's own origin (`Origin`, or `Sec-Fetch-Site: same-origin`); browsers send one of them
//! with every such request. Bearer tokens are not sent by browsers on their own and are not
//! checked this way.
//!
//! The gate also exchanges the console's editor tickets for sessions
//! ([`crate::api::editor_tickets`]): on the default base domain `localhost` no cookie reaches
//! an instance's host from the console's, so the console hands the browser a ticket and the
//! proxy turns it into a host-only session cookie, which this gate then takes.

use std::future::Future;
use std::pin::Pin;

use sqlx::Row;
use tandem_proxy::{Access, EditorDecision, EditorGate, HttpAuth, TicketDecision};

use crate::api::authorize;
use crate::auth::{self, Caller, CrossSite};
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
        access: Access,
        method: &'a http::Method,
        headers: &'a http::HeaderMap,
    ) -> Pin<Box<dyn Future<Output = EditorDecision> + Send + 'a>> {
        Box::pin(async move {
            match access {
                Access::Editor => self.editor(instance, method, headers).await,
                Access::Flows(mode) => self.flows(instance, mode, method, headers).await,
            }
        })
    }

    fn exchange<'a>(
        &'a self,
        instance: &'a str,
        ticket: &'a str,
    ) -> Pin<Box<dyn Future<Output = TicketDecision> + Send + 'a>> {
        Box::pin(crate::api::editor_tickets::exchange(
            &self.0, instance, ticket,
        ))
    }
}

impl TeamEditorGate {
    async fn editor(
        &self,
        instance: &str,
        method: &http::Method,
        headers: &http::HeaderMap,
    ) -> EditorDecision {
        let state = &self.0;
        if let Some(why) = cross_site(method, headers, "editor") {
            return EditorDecision::Deny(why);
        }
        let caller = match Caller::from_headers(headers, state).await {
            Ok(c) => c,
            Err(ApiError::Unauthorized(why)) => {
                return EditorDecision::SignIn(format!(
                    "Sign in to open the editor of {instance}: {why}. Open it from Tandem's console (its \"Open editor\" link signs this browser in here), sign in through Tandem's API (POST /api/v1/auth/login; the session cookie is valid on every instance host under {} when that name has a dot) or send Authorization: Bearer <token>.\n",
                    state.config.base_domain
                ))
            }
            Err(e) => return EditorDecision::Deny(format!("{e}\n")),
        };
        let found: Option<(String, i64)> =
            match sqlx::query("SELECT team_id, protected FROM instances WHERE name = $1")
                .bind(instance)
                .fetch_optional(&state.store.pool)
                .await
            {
                Ok(row) => row.map(|r| (r.get(0), r.get(1))),
                Err(e) => return EditorDecision::Deny(format!("cannot check access: {e}\n")),
            };
        let Some((team, protected)) = found else {
            return EditorDecision::Deny(format!("no instance {instance}\n"));
        };
        // A protected instance's editor is read-only but for owners: anything that is
        // not a read (a deploy, a flow state change, a context write) needs the owner role.
        let reads = matches!(
            *method,
            http::Method::GET | http::Method::HEAD | http::Method::OPTIONS
        );
        let action = if protected != 0 && !reads {
            Action::DeployProtected
        } else {
            Action::OpenEditor
        };
        match authorize(state, &caller, &team, action).await {
            Ok(()) => EditorDecision::Allow,
            Err(ApiError::Forbidden(_)) if action == Action::DeployProtected => {
                EditorDecision::Deny(format!(
                    "{instance} is protected: only its team's owners deploy to it; its editor is read-only for {}\n",
                    caller.username
                ))
            }
            Err(ApiError::NotFound(_)) => EditorDecision::Deny(format!(
                "{} is not a member of the team that owns {instance}\n",
                caller.username
            )),
            Err(e) => EditorDecision::Deny(format!("{e}\n")),
        }
    }

    /// A request to a protected instance's own endpoints: with one of its HTTP tokens
    /// ([`HttpAuth::Tokens`]), or from someone in its team, viewers included
    /// ([`HttpAuth::Members`]).
    async fn flows(
        &self,
        instance: &str,
        mode: HttpAuth,
        method: &http::Method,
        headers: &http::HeaderMap,
    ) -> EditorDecision {
        let state = &self.0;
        match mode {
            HttpAuth::None => EditorDecision::Allow,
            HttpAuth::Tokens => {
                let Some(token) = tandem_proxy::credentials::bearer(headers)
                    .filter(|t| t.starts_with(tandem_proxy::credentials::HTTP_TOKEN_PREFIX))
                else {
                    return EditorDecision::SignIn(format!(
                        "{instance}'s endpoints need Authorization: Bearer <token>, with one of its HTTP tokens (its owners make them: POST /api/v1/instances/{{id}}/http-tokens).\n"
                    ));
                };
                match crate::http_auth::token_allows(state, instance, token).await {
                    Ok(true) => EditorDecision::Allow,
                    Ok(false) => EditorDecision::SignIn(format!(
                        "the token is not one of {instance}'s HTTP tokens, or it expired or was revoked.\n"
                    )),
                    Err(e) => EditorDecision::Deny(format!("cannot check the token: {e}\n")),
                }
            }
            HttpAuth::Members => {
                // The session cookie goes with requests other sites make the browser send.
                if let Some(why) = cross_site(method, headers, "endpoints") {
                    return EditorDecision::Deny(why);
                }
                let caller = match Caller::from_headers(headers, state).await {
                    Ok(c) => c,
                    Err(ApiError::Unauthorized(why)) => {
                        return EditorDecision::SignIn(format!(
                            "{instance}'s endpoints are for its team: {why}. Sign in through Tandem (the session cookie, on a base domain with a dot) or send Authorization: Bearer <your token>.\n"
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
                        Err(e) => {
                            return EditorDecision::Deny(format!("cannot check access: {e}\n"))
                        }
                    };
                let Some(team) = team else {
                    return EditorDecision::Deny(format!("no instance {instance}\n"));
                };
                match authorize(state, &caller, &team, Action::Read).await {
                    Ok(()) => EditorDecision::Allow,
                    Err(_) => EditorDecision::Deny(format!(
                        "{} is not in the team of {instance}, whose endpoints are for its members\n",
                        caller.username
                    )),
                }
            }
        }
    }
}

/// Why a cookie-authenticated request looks cross-site, if it does, in the editor's words (the
/// rule is [`auth::cross_site`], shared with the API).
/// `what` names what the request was for: `editor` or `endpoints`.
fn cross_site(method: &http::Method, headers: &http::HeaderMap, what: &str) -> Option<String> {
    match auth::cross_site(method, headers)? {
        CrossSite::Origin(origin) => Some(format!(
            "refused: a request from {origin} cannot change this instance's {what} with your session; use the {what} at its own address\n"
        )),
        CrossSite::FetchSite(site) => Some(format!(
            "refused: a {site} request cannot change this instance's {what} with your session\n"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> http::HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    http::HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn cookie_requests_that_change_things_must_come_from_the_instance_itself() {
        let host = ("host", "orders.example.com:8080");
        let post = http::Method::POST;
        // Another instance's page posting to this editor: refused.
        let evil = headers(&[host, ("origin", "http://evil.example.com:8080")]);
        assert!(cross_site(&post, &evil, "editor").is_some());
        assert!(cross_site(
            &post,
            &headers(&[host, ("sec-fetch-site", "same-site")]),
            "editor"
        )
        .is_some());
        // A WebSocket from elsewhere, even with GET.
        let ws = headers(&[
            host,
            ("upgrade", "websocket"),
            ("origin", "http://evil.example.com"),
        ]);
        assert!(cross_site(&http::Method::GET, &ws, "editor").is_some());
        // The editor itself, reads, tokens, and clients that are not browsers: allowed.
        let own = headers(&[host, ("origin", "http://orders.example.com:8080")]);
        assert!(cross_site(&post, &own, "editor").is_none());
        assert!(cross_site(&http::Method::GET, &evil, "editor").is_none());
        let token = headers(&[
            host,
            ("origin", "http://evil.example.com"),
            ("authorization", "Bearer tdm_x"),
        ]);
        assert!(cross_site(&post, &token, "editor").is_none());
        assert!(cross_site(&post, &headers(&[host]), "editor").is_none());
    }
}
