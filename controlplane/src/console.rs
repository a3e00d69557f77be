//! The web console, served by `tandem serve` on the API listener at `/`: one page, its scripts
//! (ES modules, one per part of the console) and its stylesheet, embedded in the binary (no
//! Node.js build step). The page talks to the API itself with the session cookie and the
//! session's form token; what the console shows and does is what the API allows the user.
//!
//! Every answer forbids framing and inline scripts and sends no referrer: the page holds no
//! secret, and nothing from the API is put into it as HTML (the script uses `textContent`).

use axum::extract::Path;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

const INDEX: &str = include_str!("../console/index.html");

/// The files under `/console/`: name, content.
const FILES: &[(&str, &str)] = &[
    ("app.js", include_str!("../console/app.js")),
    ("lib.js", include_str!("../console/lib.js")),
    ("instance.js", include_str!("../console/instance.js")),
    ("teams.js", include_str!("../console/teams.js")),
    ("create.js", include_str!("../console/create.js")),
    ("account.js", include_str!("../console/account.js")),
    ("style.css", include_str!("../console/style.css")),
];

/// The console's routes: `/` and `/console/{file}`.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            "/",
            get(|| async { page(INDEX, "text/html; charset=utf-8") }),
        )
        .route("/console/{file}", get(file))
}

async fn file(Path(name): Path<String>) -> Response {
    let Some((_, body)) = FILES.iter().find(|(n, _)| *n == name) else {
        return (StatusCode::NOT_FOUND, "no such file of the console\n").into_response();
    };
    let content_type = if name.ends_with(".css") {
        "text/css; charset=utf-8"
    } else {
        "text/javascript; charset=utf-8"
    };
    page(body, content_type)
}

/// The Content-Security-Policy of the console: its own script and stylesheet, calls to its own
/// API, no inline script, no framing, no forms posted elsewhere.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

fn page(body: &'static str, content_type: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}
