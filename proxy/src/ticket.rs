//! The editor ticket handoff: how a browser signed in to Tandem's console gets a session on an
//! instance's host.
//!
//! The console and the instances live on different hosts (`127.0.0.1:3000` and
//! `<name>.localhost:8080` by default) that share no cookie, so the console's session cannot
//! open an editor. Instead the console asks the control plane for a ticket (short-lived, single
//! use, bound to the user and the instance) and sends the browser to
//! `GET /_tandem/editor-ticket?ticket=<value>` on the instance's host. The proxy answers that
//! path itself, on every instance with an admin secret, and never forwards it: the query holds
//! the ticket, which no flow may see. It asks the [`EditorGate`] to exchange the ticket and, on
//! success, answers `303 See Other` to where the ticket leads ([`TicketHome`]: the editor, or
//! the instance's own endpoints when they are for its team's members) with the new session as a
//! host-only cookie (no `Domain`), which the gate then accepts on that host like any other
//! session. The proxy strips that cookie from every request before a replica sees it.

use http::header::{self, HeaderValue};
use http::{Method, Response, StatusCode};

use crate::body::ResponseBody;
use crate::credentials::SESSION_COOKIE;
use crate::policy::{self, EditorGate, TicketDecision, TicketHome};
use crate::proxy::local;
use crate::routes::Instance;

/// The path, on an instance's host, where the proxy takes an editor ticket.
pub const TICKET_PATH: &str = "/_tandem/editor-ticket";

/// The query parameter that holds the ticket.
pub const TICKET_PARAM: &str = "ticket";

/// Longest ticket the proxy passes on to its gate (tickets are 64 hex digits).
const MAX_TICKET_LEN: usize = 256;

/// True when `path` (without query) is [`TICKET_PATH`] in any spelling a replica's router would
/// take for it (case, repeated slashes, escapes, dot segments): such a request must not reach a
/// flow, as its query may hold a ticket.
pub fn is_ticket_path(path: &str) -> bool {
    // Fast path, as in `policy::is_editor_path`: nothing to decode, so the segments decide.
    if !path.bytes().any(|b| b == b'%' || b == b'.' || b == b'\\') {
        let mut segments = path.split('/').filter(|s| !s.is_empty());
        return segments
            .next()
            .is_some_and(|s| s.eq_ignore_ascii_case("_tandem"))
            && segments
                .next()
                .is_some_and(|s| s.eq_ignore_ascii_case("editor-ticket"))
            && segments.next().is_none();
    }
    policy::canonical_path(path.as_bytes()) == TICKET_PATH.as_bytes()
}

/// The ticket of a query string: the first `ticket=` parameter, when it looks like one
/// (ASCII letters and digits, at most 256 of them). Tickets need no percent-decoding.
pub fn ticket_param(query: Option<&str>) -> Option<&str> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == TICKET_PARAM)
        .map(|(_, v)| v)
        .filter(|v| {
            !v.is_empty()
                && v.len() <= MAX_TICKET_LEN
                && v.bytes().all(|b| b.is_ascii_alphanumeric())
        })
}

/// The proxy's answer to a request for [`TICKET_PATH`] on `instance`'s host: 303 with the
/// session cookie, or why not (405 for a method other than GET, 400 without a ticket, 403
/// refused). Every answer is `Cache-Control: no-store` and `Referrer-Policy: no-referrer`, as
/// the URL that led to it holds a ticket. Over TLS the cookie is `Secure`.
pub(crate) async fn answer(
    gate: Option<&dyn EditorGate>,
    instance: &Instance,
    method: &Method,
    query: Option<&str>,
    tls: bool,
) -> Response<ResponseBody> {
    let mut resp = decide(gate, instance, method, query, tls).await;
    if resp.status() == StatusCode::FORBIDDEN {
        instance.stats.editor_blocked();
    }
    let headers = resp.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

async fn decide(
    gate: Option<&dyn EditorGate>,
    instance: &Instance,
    method: &Method,
    query: Option<&str>,
    tls: bool,
) -> Response<ResponseBody> {
    // GET only: HEAD and other methods would spend a ticket without a page to show (link
    // checkers and prefetchers send HEAD).
    if method != Method::GET {
        let mut resp = local(
            StatusCode::METHOD_NOT_ALLOWED,
            "An editor ticket is opened with GET, by following the console's link.\n",
        );
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET"));
        return resp;
    }
    let Some(gate) = gate else {
        return local(
            StatusCode::FORBIDDEN,
            "The editor of this instance is not open here.\n",
        );
    };
    let Some(ticket) = ticket_param(query) else {
        return local(
            StatusCode::BAD_REQUEST,
            "This link holds no editor ticket; open the editor from Tandem's console again.\n",
        );
    };
    match gate.exchange(&instance.name, ticket).await {
        TicketDecision::Refused(msg) => local(StatusCode::FORBIDDEN, msg),
        // An HA instance's editor is blocked: only a ticket to its endpoints leads anywhere.
        TicketDecision::Session {
            home: TicketHome::Editor,
            ..
        } if instance.ha => local(StatusCode::FORBIDDEN, policy::EDITOR_BLOCKED),
        TicketDecision::Session { secret, home } => {
            session_redirect(&instance.name, &secret, home, tls)
        }
    }
}

/// 303 to the editor with `secret` as the host-only session cookie: no `Domain`, so it stays
/// on this instance's host; `HttpOnly`, so the editor's pages cannot read it; `SameSite=Lax`,
/// so other sites cannot make the browser send it with their writes; no `Max-Age`, so it ends
/// with the browser session (the control plane ends the session itself at its expiry); `Secure`
/// when it came over TLS, so the browser never sends it in clear.
fn session_redirect(
    instance: &str,
    secret: &str,
    home: TicketHome,
    tls: bool,
) -> Response<ResponseBody> {
    let secure = if tls { "; Secure" } else { "" };
    // The gate's secret goes into a header: a control plane that sent anything but a plain
    // token gets no cookie made of it.
    let cookie = secret
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        .then(|| format!("{SESSION_COOKIE}={secret}; Path=/; HttpOnly; SameSite=Lax{secure}"))
        .and_then(|c| HeaderValue::from_str(&c).ok());
    let Some(cookie) = cookie.filter(|_| !secret.is_empty()) else {
        tracing::warn!(%instance, "the editor gate answered a session that is not a cookie value");
        return local(
            StatusCode::BAD_GATEWAY,
            "Tandem answered the editor ticket with an unusable session; open the editor from the console again.\n",
        );
    };
    let mut resp = local(StatusCode::SEE_OTHER, "Opening the editor.\n");
    let headers = resp.headers_mut();
    headers.insert(header::LOCATION, HeaderValue::from_static(home.path()));
    headers.insert(header::SET_COOKIE, cookie);
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ticket_path_in_every_spelling() {
        for p in [
            "/_tandem/editor-ticket",
            "/_tandem/editor-ticket/",
            "//_TANDEM//Editor-Ticket",
            "/_tandem/%65ditor-ticket",
            "/x/../_tandem/editor-ticket",
            "/_tandem/./editor-ticket",
        ] {
            assert!(is_ticket_path(p), "{p}");
        }
        for p in [
            "/",
            "/_tandem",
            "/_tandem/editor-ticket/x",
            "/_tandem/editor-tickets",
            "/admin/_tandem/editor-ticket",
            "/_tandem/editor-ticket.html",
        ] {
            assert!(!is_ticket_path(p), "{p}");
        }
    }

    #[test]
    fn the_ticket_is_the_first_ticket_parameter_when_it_looks_like_one() {
        assert_eq!(ticket_param(Some("ticket=ab12")), Some("ab12"));
        assert_eq!(
            ticket_param(Some("x=1&ticket=ab12&ticket=cd")),
            Some("ab12")
        );
        for q in [
            None,
            Some(""),
            Some("ticket="),
            Some("tickets=ab"),
            Some("ticket=a%20b"),
            Some("ticket=a;b"),
        ] {
            assert_eq!(ticket_param(q), None, "{q:?}");
        }
        let long = format!("ticket={}", "a".repeat(MAX_TICKET_LEN + 1));
        assert_eq!(ticket_param(Some(&long)), None);
    }

    #[test]
    fn a_session_becomes_a_host_only_cookie_and_a_redirect_to_the_editor() {
        let r = session_redirect("orders", "abc123", TicketHome::Editor, false);
        assert_eq!(r.status(), StatusCode::SEE_OTHER);
        assert_eq!(r.headers()[header::LOCATION], "/admin/");
        let r = session_redirect("orders", "abc123", TicketHome::Flows, false);
        assert_eq!(r.headers()[header::LOCATION], "/");
        assert_eq!(
            r.headers()[header::SET_COOKIE],
            "tandem_session=abc123; Path=/; HttpOnly; SameSite=Lax"
        );
        let r = session_redirect("orders", "abc123", TicketHome::Flows, true);
        assert_eq!(
            r.headers()[header::SET_COOKIE],
            "tandem_session=abc123; Path=/; HttpOnly; SameSite=Lax; Secure"
        );
        for bad in ["", "a;b", "a b", "a\r\nSet-Cookie: x=y"] {
            assert_eq!(
                session_redirect("orders", bad, TicketHome::Editor, false).status(),
                StatusCode::BAD_GATEWAY,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_decision_shows_no_session_in_debug() {
        let d = format!(
            "{:?}",
            TicketDecision::Session {
                secret: "secret".into(),
                home: TicketHome::Flows
            }
        );
        assert!(!d.contains("secret"), "{d}");
    }
}
