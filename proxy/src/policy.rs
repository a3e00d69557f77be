//! The editor policy: on HA instances, `/admin` and everything under it is refused; on others,
//! when the instance has an admin secret, an [`EditorGate`] decides who may open the editor.
//!
//! Node-RED's editor and admin API live under `httpAdminRoot: "/admin"`. Express matches that
//! prefix case-insensitively and tolerates repeated slashes, so the check works on a canonical
//! form of the path: percent-escapes decoded, lower-cased, empty and `.` segments dropped, `..`
//! applied. A path is blocked when its first canonical segment is `admin`. This is stricter
//! than Express (which does not decode `%61dmin`), never looser.

/// True when `path` (the URI path, without query) reaches the editor or admin API.
pub fn is_editor_path(path: &str) -> bool {
    // Fast path: nothing to decode and no dot segments, so the first non-empty segment decides.
    if !path.bytes().any(|b| b == b'%' || b == b'.' || b == b'\\') {
        return path
            .split('/')
            .find(|s| !s.is_empty())
            .is_some_and(|s| s.eq_ignore_ascii_case("admin"));
    }
    let decoded = percent_decode(path.as_bytes());
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
    stack
        .first()
        .is_some_and(|s| s.eq_ignore_ascii_case(b"admin"))
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

/// Decides who may open the editor of a non-HA instance, from the request's headers (session
/// cookie, bearer token). `tandem serve` implements it with the control plane's users and teams.
pub trait EditorGate: Send + Sync + 'static {
    /// The decision for a request to `instance`'s editor.
    fn check<'a>(
        &'a self,
        instance: &'a str,
        method: &'a http::Method,
        headers: &'a http::HeaderMap,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = EditorDecision> + Send + 'a>>;
}

/// The message sent with the 403.
pub const EDITOR_BLOCKED: &str = "The Node-RED editor is disabled on this instance because it runs in HA mode; deploy flows through a snapshot or a pipeline instead.\n";

/// Decodes `%XX` escapes, repeatedly, so that `%2561` cannot smuggle `%61` past the check.
fn percent_decode(input: &[u8]) -> Vec<u8> {
    let mut current = input.to_vec();
    for _ in 0..4 {
        let mut out = Vec::with_capacity(current.len());
        let mut i = 0;
        let mut changed = false;
        while i < current.len() {
            if current[i] == b'%' && i + 2 < current.len() {
                if let (Some(h), Some(l)) = (hex(current[i + 1]), hex(current[i + 2])) {
                    out.push(h << 4 | l);
                    i += 3;
                    changed = true;
                    continue;
                }
            }
            out.push(current[i]);
            i += 1;
        }
        current = out;
        if !changed {
            break;
        }
    }
    current
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::is_editor_path;

    #[test]
    fn blocks_admin_and_its_disguises() {
        for p in [
            "/admin",
            "/admin/",
            "/admin/flows",
            "/ADMIN/flows",
            "/Admin/",
            "/admin//flows",
            "//admin/flows",
            "///Admin",
            "/admin/comms",
            "/./admin/flows",
            "/x/../admin/flows",
            "/%61dmin/flows",
            "/%2561dmin",
            "/%2Fadmin",
            "/\\admin",
        ] {
            assert!(is_editor_path(p), "{p} must be blocked");
        }
    }

    #[test]
    fn leaves_flows_alone() {
        for p in [
            "/",
            "/api/orders",
            "/administrator",
            "/admin.json",
            "/adminx/flows",
            "/orders/admin",
            "/ui/",
            "/../x",
            "/%zz",
            "/a%",
        ] {
            assert!(!is_editor_path(p), "{p} must reach the flows");
        }
    }
}
