//! Tandem's credentials on the wire, read by one parser: the control plane authenticates with
//! [`bearer`], and the proxy removes with [`strip`] everything that `bearer` (or the session
//! cookie) would accept before a request reaches a flow. Both sides call the same functions,
//! so what the API accepts and what the proxy strips cannot drift apart.
//!
//! What a flow must never see:
//! - personal access tokens (`tdm_…`) and instances' HTTP tokens (`tdh_…`, see
//!   [`crate::HttpAuth`]), in any `Authorization` header, whatever the whitespace
//!   after the `Bearer` scheme and however the scheme is spelt, and also where the API would
//!   not take them (a list, another scheme): a flow that reads the header can replay the token;
//! - the session cookie `tandem_session`, in any `Cookie` header;
//! - the replica's admin secret [`ADMIN_TOKEN`], which only the proxy may add (see
//!   [`crate::proxy`]).

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Prefix of Tandem's personal access tokens.
pub const TOKEN_PREFIX: &str = "tdm_";

/// Prefix of the HTTP tokens of an instance's own endpoints ([`crate::HttpAuth::Tokens`]).
pub const HTTP_TOKEN_PREFIX: &str = "tdh_";

/// Name of Tandem's session cookie (the control plane's sign-in).
pub const SESSION_COOKIE: &str = "tandem_session";

/// The header a replica's admin API takes the instance's admin secret from. Only the proxy
/// sets it; whatever a client sends under this name is removed on every instance.
pub const ADMIN_TOKEN: HeaderName = HeaderName::from_static("x-tandem-token");

/// The token of one `Authorization` value of the `Bearer` scheme: the scheme in any case, then
/// at least one whitespace character (space or tab, several allowed), then the token.
/// Whitespace around the value and the token is ignored. `None` for another scheme or an empty
/// token.
pub fn bearer_token(value: &str) -> Option<&str> {
    let value = value.trim_ascii();
    let (scheme, rest) = value.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    // `Bearertdm_x` is not the Bearer scheme: the scheme ends at whitespace.
    if !rest.starts_with(|c: char| c.is_ascii_whitespace()) {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// The bearer token a request authenticates with: that of its first `Authorization` header,
/// parsed by [`bearer_token`]. This is what the control plane's API accepts.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    bearer_token(headers.get(header::AUTHORIZATION)?.to_str().ok()?)
}

/// The session id a request carries in the [`SESSION_COOKIE`] cookie, if any: the first
/// `tandem_session=<value>` pair of its `Cookie` headers.
pub fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|p| p.trim().split_once('='))
        .find(|(k, _)| *k == SESSION_COOKIE)
        .map(|(_, v)| v)
}

/// Whether an `Authorization` value carries a Tandem token anywhere a flow could take it
/// from: a word (after the start, whitespace, or one of `,;="'`) that starts with `tdm_` or
/// `tdh_`. Every token [`bearer_token`] returns with such a prefix is such a word. Works on
/// bytes: a value that is not text still carries the token.
pub fn carries_tandem_token(value: &[u8]) -> bool {
    [TOKEN_PREFIX, HTTP_TOKEN_PREFIX].iter().any(|prefix| {
        let prefix = prefix.as_bytes();
        value
            .windows(prefix.len())
            .enumerate()
            .any(|(i, w)| w == prefix && (i == 0 || is_word_break(value[i - 1])))
    })
}

fn is_word_break(b: u8) -> bool {
    b.is_ascii_whitespace() || matches!(b, b',' | b';' | b'=' | b'"' | b'\'' | b':')
}

/// Removes Tandem's own credentials from headers bound for a replica: every `Authorization`
/// header that [`carries_tandem_token`], the [`SESSION_COOKIE`] from every `Cookie` header
/// (the other cookies are kept, joined into one header), and any [`ADMIN_TOKEN`].
pub fn strip(headers: &mut HeaderMap) {
    headers.remove(ADMIN_TOKEN);
    strip_authorization(headers);
    strip_session_cookie(headers);
}

fn strip_authorization(headers: &mut HeaderMap) {
    let values = headers.get_all(header::AUTHORIZATION);
    if !values.iter().any(|v| carries_tandem_token(v.as_bytes())) {
        return;
    }
    // Several headers: keep the flow's own ones, in order.
    let kept: Vec<HeaderValue> = values
        .iter()
        .filter(|v| !carries_tandem_token(v.as_bytes()))
        .cloned()
        .collect();
    headers.remove(header::AUTHORIZATION);
    for v in kept {
        headers.append(header::AUTHORIZATION, v);
    }
}

fn strip_session_cookie(headers: &mut HeaderMap) {
    if !headers.contains_key(header::COOKIE) {
        return;
    }
    // On bytes, not strings: one non-ASCII cookie must not cost a flow the others.
    let mut kept: Vec<u8> = Vec::new();
    for value in headers.get_all(header::COOKIE) {
        for c in value.as_bytes().split(|b| *b == b';') {
            let c = c.trim_ascii();
            let name = c
                .split(|b| *b == b'=')
                .next()
                .unwrap_or_default()
                .trim_ascii();
            // The API compares the name exactly; trimmed here, so stripping is never narrower.
            if c.is_empty() || name == SESSION_COOKIE.as_bytes() {
                continue;
            }
            if !kept.is_empty() {
                kept.extend_from_slice(b"; ");
            }
            kept.extend_from_slice(c);
        }
    }
    headers.remove(header::COOKIE);
    if kept.is_empty() {
        return;
    }
    // Parts of valid header values joined by "; " are a valid header value.
    if let Ok(v) = HeaderValue::from_bytes(&kept) {
        headers.insert(header::COOKIE, v);
    }
}

#[cfg(test)]
mod tests;
