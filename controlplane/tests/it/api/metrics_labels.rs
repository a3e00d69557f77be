//! Metric labels a client controls stay bounded: random extension methods and random paths do
//! not make new series (security issue 9, item 5).
//!
//! The series are read from the server's own `ApiMetrics`, not through `GET /metrics`, which is
//! moving to a listener of its own.

use std::collections::BTreeSet;

use super::support::{random_hex, Auth, Backend, Server};

const KNOWN: [&str; 10] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE", "other",
];

/// The label values of `name` in every `tandem_api_requests_total` series.
fn labels(text: &str, name: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("tandem_api_requests_total{"))
        .map(|l| {
            let start = l.find(&format!("{name}=\"")).unwrap() + name.len() + 2;
            let len = l[start..].find('"').unwrap();
            l[start..start + len].to_string()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_methods_and_paths_make_no_new_series() {
    let s = Server::start(Backend::Sqlite).await;
    let paths = ["/api/v1/user", "/api/v1/teams", "/healthz"];
    for i in 0..150 {
        // A 1 KB method no one defined, on known routes and on random paths.
        let method = format!("X{}", random_hex(512)).to_uppercase();
        let path = match i % 4 {
            3 => format!("/{}", random_hex(64)),
            n => paths[n].to_string(),
        };
        let r = s.request(&method, &path, &s.admin, None, Vec::new()).await;
        assert!(matches!(r.status, 404 | 405), "{r}");
    }
    s.get("/api/v1/user", &s.admin).await.ok(200);
    s.get("/api/v1/user", &Auth::Anon).await.err(401);

    let text = s.state.metrics.render();
    let methods = labels(&text, "method");
    let routes: BTreeSet<String> = labels(&text, "route").into_iter().collect();
    let unknown: BTreeSet<&String> = methods
        .iter()
        .filter(|m| !KNOWN.contains(&m.as_str()))
        .collect();
    assert!(unknown.is_empty(), "methods as labels: {}", unknown.len());
    assert!(methods.iter().any(|m| m == "other"), "{text}");
    // Every route label is a template of the router, or `unmatched`: no random path is one.
    let templates = [
        "/api/v1/stacks",
        "/api/v1/user",
        "/api/v1/teams",
        "/healthz",
        "unmatched",
    ];
    assert!(
        routes.iter().all(|r| templates.contains(&r.as_str())),
        "{routes:?}"
    );
    // 150 random requests, a handful of series: one per (method, route, status) that exists.
    assert!(methods.len() <= 10, "{} series:\n{text}", methods.len());
}
