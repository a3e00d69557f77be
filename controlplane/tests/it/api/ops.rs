//! `/healthz`, `/readyz`, `/metrics` (on the metrics listener) and the OpenAPI document.

use std::net::SocketAddr;

use serde_json::json;

use super::support::{both_backends, http, Auth, Backend, Resp, Server};

/// The metrics listener of `s`, as `tandem serve` runs it beside the API, on a free port.
async fn metrics_listener(s: &Server) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = tandem_controlplane::metrics_app(s.state.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

async fn scrape(addr: SocketAddr, path: &str) -> Resp {
    http(addr, "GET", path, &Auth::Anon, None, Vec::new()).await
}

async fn health_and_readiness(b: Backend) {
    let s = Server::start(b).await;
    let r = s.get("/healthz", &Auth::Anon).await;
    assert_eq!((r.status, r.text.as_str()), (200, "ok\n"));
    let r = s.get("/readyz", &Auth::Anon).await;
    assert_eq!((r.status, r.text.as_str()), (200, "ready\n"));
}

async fn metrics(b: Backend) {
    let s = Server::start(b).await;
    for name in ["One", "Two", "Three"] {
        s.post("/api/v1/teams", &s.admin, json!({ "name": name }))
            .await
            .ok(201);
    }
    s.post("/api/v1/teams", &s.admin, json!({ "name": "One" }))
        .await
        .err(409);
    s.post("/api/v1/teams", &Auth::Anon, json!({ "name": "Anon" }))
        .await
        .err(401);
    let team = s.team(&s.admin).await;
    s.get(&format!("/api/v1/teams/{team}"), &s.admin)
        .await
        .ok(200);
    s.get("/api/v1/no-such-thing", &s.admin).await.err(404);

    let metrics = metrics_listener(&s).await;
    let r = scrape(metrics, "/metrics").await;
    assert_eq!(r.status, 200, "{r}");
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("text/plain")),
        "{r}"
    );
    let lines: Vec<&str> = r.text.lines().collect();
    for want in [
        r#"tandem_api_requests_total{method="POST",route="/api/v1/teams",status="201"} 4"#,
        r#"tandem_api_requests_total{method="POST",route="/api/v1/teams",status="409"} 1"#,
        r#"tandem_api_requests_total{method="POST",route="/api/v1/teams",status="401"} 1"#,
        r#"tandem_api_requests_total{method="GET",route="/api/v1/teams/{id}",status="200"} 1"#,
        r#"tandem_api_requests_total{method="GET",route="unmatched",status="404"} 1"#,
        r#"tandem_api_request_duration_seconds_count{method="POST",route="/api/v1/teams"} 6"#,
        r#"tandem_api_request_duration_seconds_bucket{method="POST",route="/api/v1/teams",le="+Inf"} 6"#,
        "# TYPE tandem_api_requests_total counter",
        "# TYPE tandem_api_request_duration_seconds histogram",
    ] {
        assert!(lines.contains(&want), "no line {want} in:\n{}", r.text);
    }
    // Routes are labelled by template, never by id.
    assert!(!r.text.contains(&team), "{}", r.text);
    // Buckets are cumulative.
    let buckets: Vec<u64> = lines
        .iter()
        .filter(|l| {
            l.starts_with(
                r#"tandem_api_request_duration_seconds_bucket{method="POST",route="/api/v1/teams","#,
            )
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(buckets.len(), 11, "{}", r.text);
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
    // A scrape is not an API request: it is not counted.
    let r = scrape(metrics, "/metrics").await;
    assert!(!r.text.contains(r#"route="/metrics""#), "{}", r.text);
}

/// `/metrics` names every team's instances: the API listener does not serve it, to anyone; the
/// metrics listener does, with `/healthz`, and nothing else.
async fn metrics_only_on_the_metrics_listener(b: Backend) {
    let s = Server::start(b).await;
    for auth in [&Auth::Anon, &s.admin] {
        let r = s.get("/metrics", auth).await;
        assert_eq!(r.status, 404, "{r}");
        assert!(!r.text.contains("tandem_api_requests_total"), "{r}");
    }
    let metrics = metrics_listener(&s).await;
    let r = scrape(metrics, "/metrics").await;
    assert_eq!(r.status, 200, "{r}");
    assert!(
        r.text.contains("# TYPE tandem_api_requests_total counter"),
        "{r}"
    );
    let r = scrape(metrics, "/healthz").await;
    assert_eq!((r.status, r.text.as_str()), (200, "ok\n"));
    assert_eq!(scrape(metrics, "/api/v1/teams").await.status, 404);
}

async fn openapi_document(b: Backend) {
    let s = Server::start(b).await;
    // Public, like the health checks.
    let r = s.get("/api/v1/openapi.json", &Auth::Anon).await;
    let doc = r.ok(200);
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "{r}"
    );
    let version = doc["openapi"].as_str().unwrap();
    assert!(version.starts_with("3.1"), "{version}");
    assert_eq!(doc["info"]["title"], "Tandem API");
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"],
        json!({ "type": "http", "scheme": "bearer" })
    );
    assert!(doc["components"]["schemas"]["ErrorBody"].is_object());
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 20, "{}", paths.len());
    for (path, ops) in paths {
        assert!(path.starts_with("/api/v1/"), "{path}");
        for (method, op) in ops.as_object().unwrap() {
            assert!(
                op["responses"].as_object().is_some_and(|r| !r.is_empty()),
                "{method} {path} documents no response"
            );
        }
    }
    // Every schema a path refers to exists.
    let text = r.text.clone();
    for part in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = &part[..part.find('"').unwrap()];
        assert!(
            doc["components"]["schemas"][name].is_object(),
            "dangling $ref to {name}"
        );
    }
}

both_backends!(
    health_and_readiness,
    metrics,
    metrics_only_on_the_metrics_listener,
    openapi_document
);

/// With the database gone, `/readyz` says so while `/healthz` still answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_without_the_database() {
    let s = Server::start(Backend::Postgres).await;
    s.get("/readyz", &Auth::Anon).await.ok(200);
    let url = s.database_url.clone().unwrap();
    let (server, name) = url.rsplit_once('/').unwrap();
    let mut c = <sqlx::PgConnection as sqlx::Connection>::connect(&format!("{server}/postgres"))
        .await
        .unwrap();
    sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .execute(&mut c)
        .await
        .unwrap();
    let r = s.get("/readyz", &Auth::Anon).await;
    assert_eq!(r.status, 503, "{r}");
    assert_eq!(s.get("/healthz", &Auth::Anon).await.status, 200);
}
