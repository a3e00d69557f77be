use std::time::Duration;

use crate::support::*;

#[tokio::test]
async fn unknown_host_is_a_404_that_names_it() {
    let proxy = TestProxy::start(&[], test_config()).await;
    let r = get(proxy.addr, "Nope.localhost:8080", "/").await.unwrap();
    assert_eq!(r.status, 404);
    assert!(r.body.contains("nope.localhost"), "{}", r.body);
}

#[tokio::test]
async fn malformed_requests_get_400() {
    let proxy = TestProxy::start(&[], test_config()).await;
    let wait = Duration::from_secs(2);
    let cases: [&[u8]; 5] = [
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: bad host\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a.localhost\r\nHost: b.localhost\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a.localhost:99999\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost a.localhost\r\n\r\n",
    ];
    for case in cases {
        let out = raw(proxy.addr, case, wait).await;
        assert!(
            out.starts_with("HTTP/1.1 400"),
            "{:?} -> {out:?}",
            String::from_utf8_lossy(case)
        );
    }
    let out = raw(proxy.addr, b"GET / HTTP/1.1\r\n\r\n", wait).await;
    assert!(out.contains("no Host header"), "{out}");
}

#[tokio::test]
async fn no_ready_replica_is_a_503_with_retry_after() {
    let u = Upstream::start("u0").await;
    let mut spec = instance("orders", &[u.addr]);
    spec.replicas[0].ready = false;
    let proxy = TestProxy::start(&[spec.clone(), instance("empty", &[])], test_config()).await;
    for host in ["orders.localhost", "empty.localhost"] {
        let r = get(proxy.addr, host, "/").await.unwrap();
        assert_eq!(r.status, 503, "{host}");
        assert_eq!(r.header("retry-after"), Some("1"));
        assert!(r.body.contains("No replica"), "{}", r.body);
    }
    assert_eq!(u.hits(), 0);
    // The replica becomes ready: served at once.
    spec.replicas[0].ready = true;
    proxy.routes.publish(&[spec]).unwrap();
    assert_eq!(
        get(proxy.addr, "orders.localhost", "/")
            .await
            .unwrap()
            .status,
        200
    );
}

#[tokio::test]
async fn unreachable_replicas_are_a_502_then_a_503_while_ejected() {
    let proxy = TestProxy::start(&[instance("orders", &[dead_addr()])], test_config()).await;
    let r = get(proxy.addr, "orders.localhost", "/").await.unwrap();
    assert_eq!(r.status, 502);
    assert!(r.body.contains("Could not reach replica r0"), "{}", r.body);
    // Ejected now: answered at once without trying.
    let r = get(proxy.addr, "orders.localhost", "/").await.unwrap();
    assert_eq!(r.status, 503);
}

#[tokio::test]
async fn a_replica_that_does_not_answer_in_time_is_a_504() {
    let u = Upstream::start("u0").await;
    let mut config = test_config();
    config.upstream_timeout = Duration::from_millis(200);
    let proxy = TestProxy::start(&[instance("orders", &[u.addr])], config).await;
    let r = get(proxy.addr, "orders.localhost", "/slow?ms=2000")
        .await
        .unwrap();
    assert_eq!(r.status, 504);
    assert!(r.body.contains("did not answer within"), "{}", r.body);
    // The replica is not ejected for being slow.
    assert_eq!(
        get(proxy.addr, "orders.localhost", "/")
            .await
            .unwrap()
            .status,
        200
    );
}

#[tokio::test]
async fn replica_errors_pass_through_unchanged() {
    let u = Upstream::start("u0").await;
    let proxy = TestProxy::start(&[instance("orders", &[u.addr])], test_config()).await;
    let r = get(proxy.addr, "orders.localhost", "/status/500")
        .await
        .unwrap();
    assert_eq!((r.status, r.body.as_str()), (500, "u0"));
    let r = get(proxy.addr, "orders.localhost", "/status/404")
        .await
        .unwrap();
    assert_eq!(r.status, 404);
}

#[tokio::test]
async fn oversized_bodies_are_refused() {
    let u = Upstream::start("u0").await;
    let mut config = test_config();
    config.max_body_bytes = 1024;
    let proxy = TestProxy::start(&[instance("orders", &[u.addr])], config).await;
    // Declared too large: 413 before anything reaches the replica.
    let r = send(
        proxy.addr,
        req("POST", "orders.localhost", "/echo", vec![b'x'; 2000]),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 413);
    assert!(r.body.contains("limit of 1024 bytes"), "{}", r.body);
    assert_eq!(u.hits(), 0);
    // Within the limit: through.
    let r = send(
        proxy.addr,
        req("POST", "orders.localhost", "/echo", vec![b'x'; 1000]),
    )
    .await
    .unwrap();
    assert_eq!((r.status, r.body.len()), (200, 1000));
    // Chunked and too large: the replica gets no more than the limit, then the body is cut off
    // and the client gets 413.
    let mut head =
        b"POST /sink HTTP/1.1\r\nHost: orders.localhost\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            .to_vec();
    for _ in 0..3 {
        head.extend_from_slice(b"200\r\n");
        head.extend_from_slice(&[b'y'; 512]);
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"0\r\n\r\n");
    let out = raw(proxy.addr, &head, Duration::from_secs(2)).await;
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    assert!(out.contains("limit of 1024 bytes"), "{out}");
    // The replica's handler has finished with the body (cut off, or whole if it got through).
    let ended = eventually(Duration::from_secs(3), || async { u.bodies_ended() == 1 }).await;
    assert!(ended, "the replica saw the body end");
    assert!(
        u.body_bytes() <= 1024,
        "the replica received {} body bytes, more than the limit",
        u.body_bytes()
    );
}
