//! Issue 16's HTTPS and custom hostnames with real Node-RED: `tandem serve --base-domain
//! example.test --tls-cert --tls-key` serves every instance on HTTPS (HTTP/2 by ALPN), the plain
//! listener redirects, an instance's custom hostname is routed with its own certificate, in
//! `tandem serve` and in a standalone proxy fed by the route feed.

use std::time::{Duration, Instant};

use serde_json::json;
use tandem_proxy::tls::test_ca::{is_leaf_of, TestCa};

use crate::harness::{free_port, hello_flows, http, Tandem};
use crate::standalone::{proxy_token, Standalone};

/// Polls a GET of `/hello` over TLS at `addr` for `sni` until it answers `hello` with the
/// certificate of `pair`, for up to `secs`.
async fn serves_hello_with(
    ca: &TestCa,
    addr: std::net::SocketAddr,
    sni: &str,
    pair: &tandem_proxy::tls::PemKeyPair,
    secs: u64,
) -> tandem_proxy::tls::test_ca::Seen {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let seen = ca.get(addr, sni, &[b"h2", b"http/1.1"], "/hello").await;
        match seen {
            Ok(s) if s.status == 200 && s.body == "hello" && is_leaf_of(pair, &s.chain) => {
                return s
            }
            other => assert!(
                Instant::now() < deadline,
                "{sni} at {addr} never served hello with its certificate: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_and_their_custom_hostnames_are_served_on_https() {
    let ca = TestCa::new();
    let certs = tempfile::tempdir().unwrap();
    let wildcard = ca.issue(&["*.example.test"]);
    let cert = certs.path().join("wildcard.pem");
    let key = certs.path().join("wildcard.key");
    std::fs::write(&cert, &wildcard.certificate).unwrap();
    std::fs::write(&key, &wildcard.key).unwrap();
    let https = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let t = Tandem::start_with(
        "tls",
        &[
            "--base-domain",
            "example.test",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--https-listen",
            &https.to_string(),
            "--https-redirect",
        ],
    )
    .await;
    let (app, _team) = t.team_and_app("tls").await;
    let id = t.instance(&app, "orders", hello_flows(), 1).await;
    t.wait_running(&id, 1).await;

    // Its URL says https, with the HTTPS listener's port.
    let view = t
        .api("GET", &format!("/api/v1/instances/{id}"), json!(null))
        .await;
    assert_eq!(
        view.json()["url"],
        format!("https://orders.example.test:{}", https.port())
    );
    // HTTP/2 by ALPN, to the flow.
    let seen = serves_hello_with(&ca, https, "orders.example.test", &wildcard, 30).await;
    assert_eq!(seen.version, http::Version::HTTP_2);
    // The plain listener redirects to it.
    let r = http(t.http, "GET", "orders.example.test", "/hello?x=1", &[], "")
        .await
        .unwrap();
    assert_eq!(r.status, 308);
    assert_eq!(
        r.header("location"),
        Some(format!("https://orders.example.test:{}/hello?x=1", https.port()).as_str())
    );

    // A custom hostname with its own certificate: routed like the instance's own host.
    let custom = ca.issue(&["flows.customer.org"]);
    let r = t
        .api(
            "PUT",
            &format!("/api/v1/instances/{id}/custom-hostname"),
            json!({ "hostname": "flows.customer.org", "certificate": custom.certificate, "key": custom.key }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(!r.body.contains("PRIVATE KEY"), "the key is never shown");
    serves_hello_with(&ca, https, "flows.customer.org", &custom, 15).await;
    // The instance's own host keeps the default certificate.
    serves_hello_with(&ca, https, "orders.example.test", &wildcard, 5).await;

    // A standalone proxy gets the custom hostname and its certificate through the route feed.
    let token = proxy_token(&t).await;
    let edge_https = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let edge = Standalone::start_with(
        &t,
        "edge",
        &token,
        &t.dir.join("edge-routes.json"),
        free_port(),
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--https-listen",
            &edge_https.to_string(),
        ],
    );
    edge.connected().await;
    serves_hello_with(&ca, edge_https, "flows.customer.org", &custom, 15).await;
    serves_hello_with(&ca, edge_https, "orders.example.test", &wildcard, 5).await;

    // Removed: the name no longer routes (the default certificate does not cover it).
    let r = t
        .api(
            "DELETE",
            &format!("/api/v1/instances/{id}/custom-hostname"),
            json!(null),
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let deadline = Instant::now() + Duration::from_secs(15);
    while ca
        .get(https, "flows.customer.org", &[b"h2"], "/hello")
        .await
        .is_ok()
    {
        assert!(
            Instant::now() < deadline,
            "the custom hostname is still served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
