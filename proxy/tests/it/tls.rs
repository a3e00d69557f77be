//! HTTPS at the proxy with a test CA: certificates chosen by SNI (the files' and an instance's
//! own), HTTP/2 and HTTP/1.1 by ALPN, a certificate renewed on disk served without a restart,
//! and the plain listener's redirect to HTTPS.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::Version;
use tandem_proxy::tls::test_ca::{is_leaf_of, TestCa};
use tandem_proxy::tls::{Certificates, FilePair, HostFiles, PemKeyPair, TlsFiles};
use tandem_proxy::{Proxy, ProxyStats, Routes};
use tokio::net::TcpListener;

use crate::support::*;

fn write(dir: &std::path::Path, name: &str, pair: &PemKeyPair) -> FilePair {
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&cert, &pair.certificate).unwrap();
    std::fs::write(&key, &pair.key).unwrap();
    FilePair { cert, key }
}

/// An HTTPS proxy serving `routes` with `files`, its certificates checked every 50 ms.
async fn https_proxy(routes: Arc<Routes>, files: TlsFiles) -> SocketAddr {
    let certs = Arc::new(Certificates::new(files, Some(routes.clone())).unwrap());
    let config = certs.server_config().unwrap();
    tokio::spawn(certs.watch(Duration::from_millis(50), std::future::pending::<()>()));
    let proxy = Arc::new(Proxy::new(
        routes,
        test_config(),
        Arc::new(ProxyStats::default()),
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(tandem_proxy::server::serve_tls(
        listener,
        proxy,
        config,
        std::future::pending(),
    ));
    addr
}

#[tokio::test]
async fn sni_chooses_the_certificate_and_alpn_h2_reaches_the_instance() {
    let ca = TestCa::new();
    let dir = temp_dir("tls");
    let wildcard = ca.issue(&["*.example.com"]);
    let custom = ca.issue(&["flows.customer.org"]);
    let up = Upstream::start("orders-r0").await;
    let mut spec = instance("orders", &[up.addr]);
    spec.hosts = vec!["orders.example.com".into(), "flows.customer.org".into()];
    spec.certificate = Some(custom.clone());
    let routes = Arc::new(Routes::new());
    routes.publish(&[spec]).unwrap();
    let addr = https_proxy(
        routes,
        TlsFiles {
            default: Some(write(dir.path(), "wildcard", &wildcard)),
            hosts: vec![],
        },
    )
    .await;

    // The instance's own host: the default (wildcard) certificate, HTTP/2 by ALPN.
    let seen = ca
        .get(addr, "orders.example.com", &[b"h2", b"http/1.1"], "/")
        .await
        .unwrap();
    assert!(is_leaf_of(&wildcard, &seen.chain));
    assert_eq!(seen.version, Version::HTTP_2);
    assert_eq!((seen.status, seen.body.as_str()), (200, "orders-r0"));

    // Its custom hostname: its own certificate; the replica hears https and the host asked for.
    let seen = ca
        .get(addr, "flows.customer.org", &[b"h2"], "/headers")
        .await
        .unwrap();
    assert!(is_leaf_of(&custom, &seen.chain));
    assert_eq!(seen.version, Version::HTTP_2);
    assert!(
        seen.body.contains("host=flows.customer.org\n"),
        "{}",
        seen.body
    );
    assert!(seen.body.contains("xfp=https\n"), "{}", seen.body);

    // A client without h2 gets HTTP/1.1.
    let seen = ca
        .get(addr, "flows.customer.org", &[b"http/1.1"], "/headers")
        .await
        .unwrap();
    assert_eq!(seen.version, Version::HTTP_11);
    assert!(seen.body.contains("xfp=https\n"), "{}", seen.body);

    // An unknown host gets the default certificate, then the proxy's 404.
    let seen = ca
        .get(addr, "nobody.example.com", &[b"h2"], "/")
        .await
        .unwrap();
    assert!(is_leaf_of(&wildcard, &seen.chain));
    assert_eq!(seen.status, 404);
    // A name no certificate covers fails the client's verification, not the proxy.
    assert!(ca
        .get(addr, "other.example.net", &[b"h2"], "/")
        .await
        .is_err());
}

#[tokio::test]
async fn a_certificate_rewritten_on_disk_is_served_without_a_restart() {
    let ca = TestCa::new();
    let dir = temp_dir("tls-renew");
    let first = ca.issue(&["*.example.com"]);
    let up = Upstream::start("orders-r0").await;
    let mut spec = instance("orders", &[up.addr]);
    spec.hosts = vec!["orders.example.com".into()];
    let routes = Arc::new(Routes::new());
    routes.publish(&[spec]).unwrap();
    let files = TlsFiles {
        default: Some(write(dir.path(), "site", &first)),
        hosts: vec![],
    };
    let addr = https_proxy(routes, files).await;
    let seen = ca
        .get(addr, "orders.example.com", &[b"h2"], "/")
        .await
        .unwrap();
    assert!(is_leaf_of(&first, &seen.chain));

    let renewed = ca.issue(&["*.example.com"]);
    write(dir.path(), "site", &renewed);
    let served = eventually(Duration::from_secs(5), || async {
        ca.get(addr, "orders.example.com", &[b"h2"], "/")
            .await
            .is_ok_and(|s| is_leaf_of(&renewed, &s.chain) && s.status == 200)
    })
    .await;
    assert!(served, "the renewed certificate is served");

    // A broken rewrite: the renewed one keeps serving.
    std::fs::write(dir.path().join("site.key"), "not a key").unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let seen = ca
        .get(addr, "orders.example.com", &[b"h2"], "/")
        .await
        .unwrap();
    assert!(is_leaf_of(&renewed, &seen.chain));
}

/// Every certificate the HTTPS listener serves has its expiry in the metrics: the files' by
/// name, the instances' own by instance, and a renewal on disk moves it.
#[tokio::test]
async fn each_certificates_expiry_is_a_metric_and_follows_a_renewal() {
    let ca = TestCa::new();
    let dir = temp_dir("tls-expiry");
    let up = Upstream::start("orders-r0").await;
    let mut spec = instance("orders", &[up.addr]);
    spec.hosts = vec!["orders.example.com".into(), "flows.customer.org".into()];
    spec.certificate = Some(ca.issue_until(&["flows.customer.org"], (2033, 1, 1)));
    let routes = Arc::new(Routes::new());
    routes.publish(&[spec]).unwrap();
    let files = TlsFiles {
        default: Some(write(
            dir.path(),
            "site",
            &ca.issue_until(&["*.example.com"], (2031, 5, 17)),
        )),
        hosts: vec![HostFiles {
            hosts: vec!["api.example.net".into(), "*.example.net".into()],
            files: write(
                dir.path(),
                "api",
                &ca.issue_until(&["api.example.net", "*.example.net"], (2032, 2, 29)),
            ),
        }],
    };
    let certs = Arc::new(Certificates::new(files, Some(routes.clone())).unwrap());
    let stats = Arc::new(ProxyStats::default());
    certs.report_to(stats.clone());
    tokio::spawn(certs.watch(Duration::from_millis(50), std::future::pending::<()>()));
    let expiry = |source: &str, name: &str| {
        let metrics = tandem_proxy::metrics::render(&routes.snapshot(), &stats);
        let prefix = format!(
            "tandem_proxy_certificate_expiry_timestamp_seconds{{source=\"{source}\",name=\"{name}\"}} "
        );
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.parse::<u64>().ok())
    };
    // 2031-05-17, 2032-02-29 and 2033-01-01, midnight UTC.
    assert_eq!(expiry("file", "default"), Some(1_936_742_400));
    assert_eq!(
        expiry("file", "api.example.net,*.example.net"),
        Some(1_961_625_600)
    );
    assert_eq!(expiry("instance", "orders"), Some(1_988_150_400));

    write(
        dir.path(),
        "site",
        &ca.issue_until(&["*.example.com"], (2035, 1, 1)),
    );
    let moved = eventually(Duration::from_secs(5), || async {
        expiry("file", "default") == Some(2_051_222_400)
    })
    .await;
    assert!(
        moved,
        "the renewed certificate's expiry: {:?}",
        expiry("file", "default")
    );
}

#[tokio::test]
async fn the_plain_listener_redirects_to_https_with_host_path_and_query() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(tandem_proxy::server::serve_redirect(
        listener,
        8443,
        Duration::from_secs(5),
        std::future::pending(),
    ));
    let r = send(
        addr,
        req("POST", "Orders.Example.com:8080", "/api/x?a=1&b=2", "body"),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 308, "308 keeps the method and body");
    assert_eq!(
        r.header("location"),
        Some("https://orders.example.com:8443/api/x?a=1&b=2")
    );

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(tandem_proxy::server::serve_redirect(
        listener,
        443,
        Duration::from_secs(5),
        std::future::pending(),
    ));
    let r = get(addr, "orders.example.com", "/").await.unwrap();
    assert_eq!(r.header("location"), Some("https://orders.example.com/"));
    let r = get(addr, "bad host!", "/").await.unwrap();
    assert_eq!(r.status, 400);
    assert!(r.header("location").is_none());
}
