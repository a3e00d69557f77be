//! The editor policy: on HA instances, `/admin` and everything under it is refused; on others,
//! when the instance has an admin secret, an [`EditorGate`] decides who may open the editor.
//!
//! Node-RED's editor and admin API live under `httpAdminRoot: "/admin"`. Express matches that
//! prefix case-insensitively and tolerates repeated slashes, so the check works on a canonical
//! form of the path ([`canonical_path`]): percent-escapes decoded until none is left,
//! lower-cased, empty and `.` segments dropped, `..` applied. A path is blocked when its first
//! canonical segment is `admin`. This is stricter than Express (which does not decode
//! `%61dmin`), never looser.

/// True when `path` (the URI path, without query) reaches the editor or admin API.
pub fn is_editor_path(path: &str) -> bool {
    // Fast path: nothing to decode and no dot segments, so the first non-empty segment decides.
    // It agrees with the canonical form (a property test holds them to it).
    if !path.bytes().any(|b| b == b'%' || b == b'.' || b == b'\\') {
        return path
            .split('/')
            .find(|s| !s.is_empty())
            .is_some_and(|s| s.eq_ignore_ascii_case("admin"));
    }
    first_segment(&canonical_path(path.as_bytes())) == b"admin"
}

/// The canonical form of a URI path, as the editor policy reads it: percent-escapes decoded
/// until none is left (so `%2561` is `a`), `/` and `\` both separators, empty and `.` segments
/// dropped, `..` applied (never above the root), ASCII lower-cased, and the segments joined
/// with `/` after a leading `/`. Bytes, not text: an escape may decode to anything.
///
/// Canonical forms are fixed points: `canonical_path(&canonical_path(p)) == canonical_path(p)`.
pub fn canonical_path(path: &[u8]) -> Vec<u8> {
    let decoded = percent_decode(path);
    let mut stack: Vec<&[u8]> = Vec::new();
    for segment in decoded.split(|b| *b == b'/' || *b == b'\\') {
        match segment {
            b"" | b"." => {}
            b".." => {
                stack.pop();
            }
            s => stack.push(s),
        }
    }
    let mut out = Vec::with_capacity(decoded.len() + 1);
    for s in &stack {
        out.push(b'/');
        out.extend(s.iter().map(u8::to_ascii_lowercase));
    }
    if out.is_empty() {
        out.push(b'/');
    }
    out
}

/// The first segment of a canonical path (empty for `/`).
fn first_segment(canonical: &[u8]) -> &[u8] {
    canonical
        .split(|b| *b == b'/')
        .find(|s| !s.is_empty())
        .unwrap_or_default()
}

/// Who may call an instance's own HTTP endpoints (its flows' routes and dashboards; `/admin`
/// keeps its own rules): checked at the proxy, before Node-RED sees the request.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum HttpAuth {
    /// Anyone.
    #[default]
    None,
    /// Requests with `Authorization: Bearer tdh_…`, a token of the instance's.
    Tokens,
    /// Anyone in the instance's team, viewers included, signed in (session cookie) or with a
    /// user token.
    Members,
}

impl HttpAuth {
    /// Its name in the API, the store and the route feed.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Tokens => "tokens",
            Self::Members => "members",
        }
    }

    /// The mode [`HttpAuth::as_str`] names.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "none" => Some(Self::None),
            "tokens" => Some(Self::Tokens),
            "members" => Some(Self::Members),
            _ => None,
        }
    }

    /// A stored mode; one this version does not know is `members`, the strictest that still
    /// lets the team in: a value written by a newer Tandem must not open the endpoints.
    pub fn from_stored(s: &str) -> Self {
        Self::parse(s).unwrap_or(Self::Members)
    }
}

/// What a request to an instance asks the gate for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// The editor and its admin API (`/admin`) of a non-HA instance.
    Editor,
    /// The instance's own endpoints, protected by this mode (never [`HttpAuth::None`]).
    Flows(HttpAuth),
}

/// What the gate says about a request for an instance's editor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EditorDecision {
    /// Let it through (the proxy adds the instance's admin secret).
    Allow,
    /// No credentials, or not valid ones: 401 with this message (where to sign in).
    SignIn(String),
    /// Valid credentials without the right to edit this instance: 403 with this message.
    Deny(String),
}

/// What a ticket opens, and so where the proxy sends the browser with its new session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TicketHome {
    /// The editor, `/admin/` (the console's "Open editor").
    #[default]
    Editor,
    /// The instance's own endpoints, `/`, protected by [`HttpAuth::Members`].
    Flows,
}

impl TicketHome {
    /// The path the browser is sent to.
    pub fn path(self) -> &'static str {
        match self {
            Self::Editor => "/admin/",
            Self::Flows => "/",
        }
    }
}

/// What the gate says about a ticket (see [`crate::ticket`]).
#[derive(Clone, PartialEq, Eq)]
pub enum TicketDecision {
    /// The ticket was good and is now spent: a new session of its user (`secret`), which the
    /// proxy sets as the host-only session cookie of the instance's host, sending the browser
    /// to `home`.
    Session {
        /// The session's secret.
        secret: String,
        /// Where the ticket leads.
        home: TicketHome,
    },
    /// 403 with this message (expired, already used, for another instance, the user may no
    /// longer open the editor, or the gate could not ask).
    Refused(String),
}

// By hand: a session secret must not reach a log through `{:?}`.
impl std::fmt::Debug for TicketDecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Session { home, .. } => write!(f, "Session {{ home: {home:?}, .. }}"),
            Self::Refused(m) => f.debug_tuple("Refused").field(m).finish(),
        }
    }
}

/// Decides who may open the editor of a non-HA instance, from the request's headers (session
/// cookie, bearer token), and exchanges editor tickets for sessions. `tandem serve` implements
/// it with the control plane's users and teams; a standalone proxy asks its control plane.
pub trait EditorGate: Send + Sync + 'static {
    /// The decision for a request to `instance`'s editor, or to its own endpoints (`access`).
    fn check<'a>(
        &'a self,
        instance: &'a str,
        access: Access,
        method: &'a http::Method,
        headers: &'a http::HeaderMap,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = EditorDecision> + Send + 'a>>;

    /// Spends `ticket`, presented on `instance`'s host: a new session when the ticket is
    /// unexpired, unused and for this instance, and its user may still open the editor.
    /// Never cached: a ticket is good once.
    fn exchange<'a>(
        &'a self,
        instance: &'a str,
        ticket: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = TicketDecision> + Send + 'a>>;
}

/// The message sent with the 403.
pub const EDITOR_BLOCKED: &str = "The Node-RED editor is disabled on this instance because it runs in HA mode; deploy flows through a snapshot or a pipeline instead.\n";

/// Decodes `%XX` escapes until none is left, in one pass: a decoded byte can complete an escape
/// with the two bytes before it (`%25` then `61`), so after each byte the end of the output is
/// decoded again. The output never holds an escape, so `%2561` cannot smuggle `%61` past the
/// check however deep the nesting, and the work stays linear in the input (each decode removes
/// two bytes).
fn percent_decode(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len());
    for &b in input {
        out.push(b);
        while let [.., b'%', h, l] = out[..] {
            let (Some(h), Some(l)) = (hex(h), hex(l)) else {
                break;
            };
            out.truncate(out.len() - 3);
            out.push(h << 4 | l);
        }
    }
    out
}

/// The value of one hexadecimal digit.
pub(crate) fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
