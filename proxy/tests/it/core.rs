//! The HTTP/1.1 core (`proxy/src/h1.rs`), byte for byte: a scripted raw-TCP replica that
//! records exactly what it receives and answers exactly what it is told, and a raw-TCP client
//! that reads responses by their framing.
//!
//! Which path served a response shows in its header names: the core copies the replica's head
//! as sent, hyper's path writes names in lowercase (and adds `date`). The scripted replica's
//! plain answer ([`ok`]) carries `X-Case: 1`, so [`by_core`] and [`by_hyper`] tell them apart.
//! (The reason phrase does not: hyper keeps a replica's non-canonical reason too.)

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::support::*;

/// The host of the instance every test here serves.
const HOST: &str = "orders.localhost";

/// Longest wait for anything the proxy should do at once.
const WAIT: Duration = Duration::from_secs(5);

// === Framing ===

/// A chunked body with a chunk extension and a trailer, as the replica sends it.
const CHUNKED_BODY: &[u8] = b"5;ext=\"1\"\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: done\r\n\r\n";

#[tokio::test]
async fn every_response_framing_passes_through_exactly_on_one_kept_alive_connection() {
    let up = Scripted::start(|r| match r.target.as_str() {
        // In pieces cut inside the extension's chunk, the data and the trailer, so the end is
        // found across reads.
        "/chunked" => Act::Pieces(vec![
            [
                &b"HTTP/1.1 200 Fine\r\nTransfer-Encoding: chunked\r\nTrailer: X-Trailer\r\n\r\n"[..],
                &CHUNKED_BODY[..14],
            ]
            .concat(),
            CHUNKED_BODY[14..40].to_vec(),
            CHUNKED_BODY[40..].to_vec(),
        ]),
        "/length" => Act::Answer(b"HTTP/1.1 200 Fine\r\nContent-Length: 5\r\n\r\nhello".to_vec()),
        // A HEAD answer announces a body it does not carry.
        "/head" => Act::Answer(b"HTTP/1.1 200 Fine\r\nContent-Length: 1234\r\n\r\n".to_vec()),
        "/no-content" => Act::Answer(b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n".to_vec()),
        // A 304 may carry the length of the representation; it has no body all the same.
        "/not-modified" => Act::Answer(
            b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\nContent-Length: 10\r\n\r\n".to_vec(),
        ),
        "/interim" => Act::Pieces(vec![
            b"HTTP/1.1 100 Continue\r\n\r\n".to_vec(),
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n".to_vec(),
            b"HTTP/1.1 200 Fine\r\nContent-Length: 5\r\n\r\nfinal".to_vec(),
        ]),
        // HTTP/1.0 without a length: the body ends where the connection does.
        "/http10" => Act::AnswerThenClose(
            b"HTTP/1.0 200 OK\r\nX-Old: 1\r\n\r\nto the end of the connection".to_vec(),
            Duration::ZERO,
        ),
        t => Act::Answer(ok(t)),
    })
    .await;
    let proxy = TestProxy::start(&[instance("orders", &[up.addr])], test_config()).await;
    let mut c = Wire::open(proxy.addr).await;

    c.write(&get_request("/chunked")).await;
    let r = c.response().await;
    assert_eq!(r.status_line, "HTTP/1.1 200 Fine", "{r:?}");
    assert!(
        r.headers
            .iter()
            .any(|(n, v)| n == "Transfer-Encoding" && v == "chunked"),
        "relayed by the core, as the replica wrote it: {r:?}"
    );
    assert_eq!(
        lossy(&r.body),
        lossy(CHUNKED_BODY),
        "the chunked body, extension and trailer included, is the replica's"
    );

    c.write(&get_request("/length")).await;
    let r = c.response().await;
    assert_eq!((r.status, r.text().as_str()), (200, "hello"), "{r:?}");

    c.write(format!("HEAD /head HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes())
        .await;
    let r = c.head_response().await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("content-length"), Some("1234"), "{r:?}");

    // Had the core waited for HEAD's 1234 bytes, this would time out; had it taken the next
    // response as HEAD's body, this would not be a 204.
    c.write(&get_request("/no-content")).await;
    let r = c.response().await;
    assert_eq!(r.status_line, "HTTP/1.1 204 No Content", "{r:?}");
    assert!(r.body.is_empty(), "{r:?}");

    c.write(&get_request("/not-modified")).await;
    let r = c.response().await;
    assert_eq!(r.status_line, "HTTP/1.1 304 Not Modified", "{r:?}");
    assert_eq!(r.header("etag"), Some("\"v1\""), "{r:?}");

    c.write(&get_request("/interim")).await;
    let r = c.response().await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "final"),
        "interim responses are not forwarded: {r:?}"
    );

    // Every keep-alive framing above left the replica's socket reusable.
    assert_eq!(up.connections(), 1, "one upstream socket for all of them");

    c.write(&get_request("/http10")).await;
    let r = c.response().await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.text(), "to the end of the connection");
    assert_eq!(r.header("x-old"), Some("1"), "{r:?}");
    assert_eq!(
        r.header("connection"),
        Some("close"),
        "a body that ends with the connection ends the client's too: {r:?}"
    );
    assert!(
        c.closed().await,
        "the client's connection is closed after it"
    );
}

#[tokio::test]
async fn large_bodies_are_relayed_whole_across_many_reads() {
    let up = Scripted::start(|r| match r.target.as_str() {
        "/big-length" => Act::Answer(ok(&pattern(300_000))),
        "/big-chunked" => Act::Answer(
            [
                &b"HTTP/1.1 200 Fine\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
                &big_chunked(),
            ]
            .concat(),
        ),
        t => Act::Answer(ok(t)),
    })
    .await;
    let proxy = TestProxy::start(&[instance("orders", &[up.addr])], test_config()).await;
    let mut c = Wire::open(proxy.addr).await;

    c.write(&get_request("/big-length")).await;
    let r = c.response().await;
    assert_eq!(r.status, 200);
    assert!(r.text() == pattern(300_000), "the body differs");

    c.write(&get_request("/big-chunked")).await;
    let r = c.response().await;
    assert_eq!(r.status, 200);
    assert!(r.body == big_chunked(), "the chunked body differs");

    // Both ended where their framing said: the next answer is whole, on the same sockets.
    c.write(&get_request("/after")).await;
    let r = c.response().await;
    assert_eq!((r.status, r.text().as_str()), (200, "/after"), "{r:?}");
    assert_eq!(up.connections(), 1);
}

#[tokio::test]
async fn the_response_head_loses_hop_by_hop_headers_and_keeps_the_replicas_spelling() {
    let up = Scripted::start(|r| match r.target.as_str() {
        "/hop" => Act::AnswerThenClose(
            b"HTTP/1.1 200 Fine\r\n\
              Connection: close, X-Hop\r\n\
              Keep-Alive: timeout=5, max=100\r\n\
              X-Hop: secret\r\n\
              X-Tandem-Replica: forged\r\n\
              X-Custom-Case: 1\r\n\
              Content-Length: 2\r\n\r\nok"
                .to_vec(),
            Duration::ZERO,
        ),
        t => Act::Answer(ok(t)),
    })
    .await;
    let proxy = TestProxy::start(&[instance("orders", &[up.addr])], test_config()).await;
    let mut c = Wire::open(proxy.addr).await;

    c.write(&get_request("/hop")).await;
    let r = c.response().await;
    assert_eq!(
        r.status_line, "HTTP/1.1 200 Fine",
        "the replica's reason phrase"
    );
    assert!(
        r.headers
            .iter()
            .any(|(n, v)| n == "X-Custom-Case" && v == "1"),
        "the replica's header-name case: {r:?}"
    );
    for name in ["connection", "keep-alive", "x-hop"] {
        assert_eq!(r.header(name), None, "{name} is hop-by-hop: {r:?}");
    }
    assert_eq!(
        r.all("x-tandem-replica"),
        vec!["r0"],
        "the real replica, once, never the forged one: {r:?}"
    );
    assert_eq!(r.text(), "ok");

    // The replica's close was its own connection's, not the client's.
    c.write(&get_request("/after")).await;
    let r = c.response().await;
    assert_eq!((r.status, r.text().as_str()), (200, "/after"), "{r:?}");
}

// === Requests ===

#[tokio::test]
async fn the_replica_gets_the_request_without_hop_by_hop_headers_and_on_a_reused_socket() {
    let (up, proxy) = echoing(test_config()).await;
    let mut c = Wire::open(proxy.addr).await;

    c.write(
        format!(
            "GET /headers?a=1 HTTP/1.1\r\n\
             Host: {HOST}\r\n\
             Connection: keep-alive\r\n\
             Keep-Alive: timeout=5\r\n\
             TE: trailers\r\n\
             Proxy-Authorization: Basic cHJveHk6c2VjcmV0\r\n\
             X-Tandem-Token: not-for-the-replica\r\n\
             X-Forwarded-For: 203.0.113.7\r\n\
             X-Forwarded-Host: spoofed.example\r\n\
             X-Forwarded-Proto: https\r\n\
             X-Kept: 1\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    let r = c.response().await;
    assert!(by_core(&r), "served by the core: {r:?}");
    let seen = up.requests();
    let got = &seen[0];
    assert_eq!(got.line, "GET /headers?a=1 HTTP/1.1");
    for name in [
        "connection",
        "keep-alive",
        "te",
        "proxy-authorization",
        "x-tandem-token",
    ] {
        assert!(
            got.all(name).is_empty(),
            "{name} reached the replica: {got:?}"
        );
    }
    assert_eq!(got.all("host"), vec![HOST], "{got:?}");
    assert_eq!(got.all("x-forwarded-for"), vec!["203.0.113.7, 127.0.0.1"]);
    assert_eq!(got.all("x-forwarded-host"), vec![HOST], "{got:?}");
    assert_eq!(got.all("x-forwarded-proto"), vec!["http"], "{got:?}");
    assert_eq!(got.all("x-kept"), vec!["1"], "{got:?}");

    // A small POST, head and body in one write.
    let body = "name=tandem&flows=%5B%5D";
    c.write(
        format!(
            "POST /form HTTP/1.1\r\nHost: {HOST}\r\n\
             Content-Type: application/x-www-form-urlencoded\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await;
    let r = c.response().await;
    assert_eq!((r.status, r.text().as_str()), (200, "/form"), "{r:?}");
    let seen = up.requests();
    let post = &seen[1];
    assert_eq!(post.line, "POST /form HTTP/1.1");
    assert_eq!(lossy(&post.body), body);
    assert_eq!(post.all("content-length"), vec![body.len().to_string()]);

    for i in 0..20 {
        let path = format!("/n{i}");
        c.write(&get_request(&path)).await;
        let r = c.response().await;
        assert_eq!((r.status, r.text()), (200, path), "{r:?}");
    }
    assert_eq!(up.requests().len(), 22);
    assert_eq!(
        up.connections(),
        1,
        "one upstream socket, reused for all 22 requests"
    );
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let up = Scripted::start(|r| Act::Answer(ok(&format!("{}{}", r.target, lossy(&r.body))))).await;
    let proxy = TestProxy::start(&[instance("orders", &[up.addr])], test_config()).await;
    let mut c = Wire::open(proxy.addr).await;

    let mut batch = get_request("/one");
    batch.extend_from_slice(
        format!("POST /two HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 4\r\n\r\n+two").as_bytes(),
    );
    batch.extend_from_slice(&get_request("/three"));
    c.write(&batch).await;
    for expected in ["/one", "/two+two", "/three"] {
        let r = c.response().await;
        assert_eq!((r.status, r.text().as_str()), (200, expected), "{r:?}");
    }
    assert_eq!(up.targets(), ["/one", "/two", "/three"]);

    // And the connection goes on.
    c.write(&get_request("/four")).await;
    assert_eq!(c.response().await.text(), "/four");
}

#[tokio::test]
async fn a_pipelined_batch_is_handed_to_hyper_where_the_core_stops() {
    let up = Scripted::start(|r| Act::Answer(ok(&format!("{}{}", r.target, lossy(&r.body))))).await;
    let proxy = TestProxy::start(&[instance("orders", &[up.addr])], test_config()).await;
    let mut c = Wire::open(proxy.addr).await;

    // The core answers the first; the second is not its own, so hyper gets it and what follows
    // from the bytes already read.
    let mut batch = get_request("/one");
    batch.extend_from_slice(
        format!(
            "POST /two HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n\
             4\r\n+two\r\n0\r\n\r\n"
        )
        .as_bytes(),
    );
    batch.extend_from_slice(&get_request("/three"));
    c.write(&batch).await;
    let one = c.response().await;
    assert!(by_core(&one), "{one:?}");
    assert_eq!(one.text(), "/one");
    let two = c.response().await;
    assert!(by_hyper(&two), "{two:?}");
    assert_eq!(two.text(), "/two+two");
    let three = c.response().await;
    assert_eq!((three.status, three.text().as_str()), (200, "/three"));
    assert_eq!(up.targets(), ["/one", "/two", "/three"]);
}

#[tokio::test]
async fn a_client_that_asks_to_close_gets_its_answer_then_the_close() {
    let (up, proxy) = echoing(test_config()).await;
    let mut c = Wire::open(proxy.addr).await;
    c.write(format!("GET /last HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n").as_bytes())
        .await;
    let r = c.response().await;
    assert!(by_core(&r), "{r:?}");
    assert_eq!(r.text(), "/last");
    assert_eq!(r.header("connection"), Some("close"), "{r:?}");
    assert!(c.closed().await);
    // The replica's socket is not the client's: it stays open for others.
    let mut c = Wire::open(proxy.addr).await;
    c.write(&get_request("/next")).await;
    assert_eq!(c.response().await.text(), "/next");
    assert_eq!(up.connections(), 1);
}

/// A connection idle for more than a second gives its buffers back; its next request, small or
/// with a body and a large answer, is served as before, in the core, on the same replica socket.
#[tokio::test]
async fn a_connection_idle_past_the_buffer_release_is_served_as_before() {
    let big = pattern(100_000);
    let answer = big.clone();
    let up = Scripted::start(move |r| match r.target.as_str() {
        "/big" => Act::Answer(
            format!(
                "HTTP/1.1 200 Fine\r\nX-Case: 1\r\nContent-Length: {}\r\n\r\n{answer}",
                answer.len()
            )
            .into_bytes(),
        ),
        t => Act::Answer(ok(&format!("{t}{}", lossy(&r.body)))),
    })
    .await;
    let proxy = TestProxy::start(&[instance("orders", &[up.addr])], test_config()).await;
    let mut c = Wire::open(proxy.addr).await;
    c.write(&get_request("/first")).await;
    assert_eq!(c.response().await.text(), "/first");
    // Past the core's one second: the buffers are given back.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    c.write(
        format!("POST /posted HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 5\r\n\r\nhello")
            .as_bytes(),
    )
    .await;
    let r = c.response().await;
    assert!(by_core(&r), "{r:?}");
    assert_eq!(r.text(), "/postedhello");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    c.write(&get_request("/big")).await;
    let r = c.response().await;
    assert!(by_core(&r), "{r:?}");
    assert_eq!(r.text(), big);
    assert_eq!(up.connections(), 1);
}

#[tokio::test]
async fn a_chunked_request_mid_connection_is_handed_to_hyper_and_the_connection_goes_on() {
    let up = Scripted::start(|r| Act::Answer(ok(&format!("{}{}", r.target, lossy(&r.body))))).await;
    let proxy = TestProxy::start(&[instance("orders", &[up.addr])], test_config()).await;
    let mut c = Wire::open(proxy.addr).await;

    c.write(&get_request("/first")).await;
    let r = c.response().await;
    assert!(by_core(&r), "the core: {r:?}");
    assert_eq!(r.text(), "/first");

    c.write(
        format!(
            "POST /chunked HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n\
             5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    let r = c.response().await;
    assert!(by_hyper(&r), "hyper took it: {r:?}");
    assert_eq!(r.text(), "/chunkedhello, world");

    c.write(&get_request("/third")).await;
    let r = c.response().await;
    assert_eq!((r.status, r.text().as_str()), (200, "/third"), "{r:?}");
    assert_eq!(up.targets(), ["/first", "/chunked", "/third"]);
}

#[tokio::test]
async fn an_expect_100_continue_request_mid_connection_is_handed_to_hyper() {
    let up = Scripted::start(|r| Act::Answer(ok(&format!("{}{}", r.target, lossy(&r.body))))).await;
    let proxy = TestProxy::start(&[instance("orders", &[up.addr])], test_config()).await;
    let mut c = Wire::open(proxy.addr).await;

    c.write(&get_request("/first")).await;
    let r = c.response().await;
    assert!(by_core(&r), "the core: {r:?}");

    // The client waits for the go-ahead before it sends the body.
    c.write(
        format!(
            "PUT /upload HTTP/1.1\r\nHost: {HOST}\r\nExpect: 100-continue\r\n\
             Content-Length: 7\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    let go = c.response().await;
    assert_eq!(go.status, 100, "{go:?}");
    c.write(b"payload").await;
    let r = c.response().await;
    assert!(by_hyper(&r), "hyper took it: {r:?}");
    assert_eq!(r.text(), "/uploadpayload");

    c.write(&get_request("/third")).await;
    let r = c.response().await;
    assert_eq!((r.status, r.text().as_str()), (200, "/third"), "{r:?}");
    assert_eq!(up.targets(), ["/first", "/upload", "/third"]);
}

#[tokio::test]
async fn a_body_that_comes_after_its_head_reaches_the_replica_whole() {
    let up = Scripted::start(|r| Act::Answer(ok(&format!("{}{}", r.target, lossy(&r.body))))).await;
    let proxy = TestProxy::start(&[instance("orders", &[up.addr])], test_config()).await;
    let mut c = Wire::open(proxy.addr).await;

    c.write(
        format!("POST /late HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 11\r\n\r\n").as_bytes(),
    )
    .await;
    // The scenario is the gap: a body not there with its head.
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.write(b"hello world").await;
    let r = c.response().await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "/latehello world"),
        "{r:?}"
    );
    let seen = up.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(lossy(&seen[0].body), "hello world");

    c.write(&get_request("/next")).await;
    assert_eq!(c.response().await.text(), "/next");
}

// === Retries ===

#[tokio::test]
async fn a_replica_that_closes_an_idle_socket_does_not_fail_the_next_request() {
    // Like Node.js's keep-alive timeout, much shortened: the replica closes each socket soon
    // after answering on it.
    let linger = Duration::from_millis(100);
    let up = Scripted::start(move |r| Act::AnswerThenClose(ok(&r.target), linger)).await;
    let proxy = TestProxy::start(&[instance("orders", &[up.addr])], test_config()).await;
    let mut c = Wire::open(proxy.addr).await;

    c.write(&get_request("/one")).await;
    assert_eq!(c.response().await.status, 200);
    // The scenario is time: the pooled socket is closed by the replica while idle.
    tokio::time::sleep(linger * 3).await;
    c.write(&get_request("/two")).await;
    let r = c.response().await;
    assert_eq!((r.status, r.text().as_str()), (200, "/two"), "{r:?}");

    // A POST cannot be sent twice: it must not be written into the closed socket either.
    tokio::time::sleep(linger * 3).await;
    c.write(
        format!("POST /three HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 1\r\n\r\nx").as_bytes(),
    )
    .await;
    let r = c.response().await;
    assert_eq!((r.status, r.text().as_str()), (200, "/three"), "{r:?}");
    assert_eq!(up.targets(), ["/one", "/two", "/three"]);
}

#[tokio::test]
async fn a_post_the_replica_dropped_is_a_502_and_is_not_sent_again() {
    // Two replicas that both take the request and close without answering: a retry would
    // show as a second request.
    let a = Scripted::start(|_| Act::Close).await;
    let b = Scripted::start(|_| Act::Close).await;
    let proxy = TestProxy::start(&[instance("orders", &[a.addr, b.addr])], test_config()).await;
    let mut c = Wire::open(proxy.addr).await;

    c.write(
        format!("POST /order HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 3\r\n\r\nabc").as_bytes(),
    )
    .await;
    let r = c.response().await;
    assert_eq!(r.status, 502, "{r:?}");
    assert!(r.text().contains("failed before it answered"), "{r:?}");
    let seen: Vec<_> = a.requests().into_iter().chain(b.requests()).collect();
    assert_eq!(seen.len(), 1, "the POST reached a replica once: {seen:?}");
    assert_eq!(lossy(&seen[0].body), "abc");
}

#[tokio::test]
async fn a_get_a_replica_dropped_is_retried_on_another() {
    let bad = Scripted::start(|_| Act::Close).await;
    let good = Scripted::start(|r| Act::Answer(ok(&r.target))).await;
    let proxy =
        TestProxy::start(&[instance("orders", &[bad.addr, good.addr])], test_config()).await;
    let mut c = Wire::open(proxy.addr).await;

    // The first pick is random: enough requests that the bad replica is picked first at least
    // once (all but certainly).
    for i in 0..20 {
        let path = format!("/n{i}");
        c.write(&get_request(&path)).await;
        let r = c.response().await;
        assert_eq!((r.status, r.text()), (200, path), "{r:?}");
        assert_eq!(r.header("x-tandem-replica"), Some("r1"), "{r:?}");
    }
    // The core holds a small body whole, so an idempotent request with one is sent again too,
    // body and all.
    for i in 0..10 {
        let body = format!("put-{i}");
        c.write(
            format!(
                "PUT /p{i} HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await;
        let r = c.response().await;
        assert_eq!((r.status, r.text()), (200, format!("/p{i}")), "{r:?}");
    }
    assert!(
        !bad.requests().is_empty(),
        "the failing replica was tried, so the retry was exercised"
    );
    let puts: Vec<_> = good
        .requests()
        .into_iter()
        .filter(|r| r.line.starts_with("PUT"))
        .collect();
    assert_eq!(puts.len(), 10);
    for (i, put) in puts.iter().enumerate() {
        assert_eq!(lossy(&put.body), format!("put-{i}"), "{put:?}");
    }
}

// === Bad replica answers ===

#[tokio::test]
async fn a_malformed_status_line_is_a_502() {
    bad_answer_is_a_502(b"HTTP/1.1 2x0 Broken\r\nContent-Length: 0\r\n\r\n").await;
}

#[tokio::test]
async fn a_response_with_both_transfer_encoding_and_content_length_is_a_502() {
    bad_answer_is_a_502(
        b"HTTP/1.1 200 Fine\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
    )
    .await;
}

/// The replica answers `/bad` with `answer`: the client gets a 502, and its connection goes on.
async fn bad_answer_is_a_502(answer: &'static [u8]) {
    let up = Scripted::start(move |r| match r.target.as_str() {
        "/bad" => Act::Answer(answer.to_vec()),
        t => Act::Answer(ok(t)),
    })
    .await;
    let proxy = TestProxy::start(&[instance("orders", &[up.addr])], test_config()).await;
    let mut c = Wire::open(proxy.addr).await;
    c.write(&get_request("/bad")).await;
    let r = c.response().await;
    assert_eq!(r.status, 502, "{r:?}");
    c.write(&get_request("/good")).await;
    let r = c.response().await;
    assert_eq!((r.status, r.text().as_str()), (200, "/good"), "{r:?}");
}

#[tokio::test]
async fn a_replica_slower_than_the_upstream_timeout_is_a_504() {
    let up = Scripted::start(|r| match r.target.as_str() {
        "/hang" => Act::Hang,
        t => Act::Answer(ok(t)),
    })
    .await;
    let mut config = test_config();
    config.upstream_timeout = Duration::from_millis(300);
    let proxy = TestProxy::start(&[instance("orders", &[up.addr])], config).await;
    let mut c = Wire::open(proxy.addr).await;

    let start = Instant::now();
    c.write(&get_request("/hang")).await;
    let r = c.response().await;
    let took = start.elapsed();
    assert_eq!(r.status, 504, "{r:?}");
    assert!(r.text().contains("did not answer within"), "{r:?}");
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "answered after {took:?}"
    );
    c.write(&get_request("/good")).await;
    let r = c.response().await;
    assert_eq!((r.status, r.text().as_str()), (200, "/good"), "{r:?}");
}

// === Bad input from clients ===

#[tokio::test]
async fn two_different_content_lengths_are_a_400() {
    let (up, proxy) = echoing(test_config()).await;
    let mut c = Wire::open(proxy.addr).await;
    c.write(
        format!(
            "POST /x HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"
        )
        .as_bytes(),
    )
    .await;
    let r = c.response().await;
    assert_eq!(r.status, 400, "{r:?}");
    assert!(up.requests().is_empty(), "{:?}", up.requests());
}

#[tokio::test]
async fn content_length_with_transfer_encoding_cannot_smuggle_a_request() {
    let (up, proxy) = echoing(test_config()).await;
    let mut c = Wire::open(proxy.addr).await;

    // By Content-Length the body holds a whole second request; by Transfer-Encoding it ends
    // before it. Either way the client asked to close after the first: the replica must not
    // see a second request, nor a request framed both ways.
    let body = format!("0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
    c.write(
        format!(
            "POST /front HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {}\r\n\
             Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await;
    let r = c.response().await;
    assert!(matches!(r.status, 200 | 400), "{r:?}");
    assert!(
        c.closed().await,
        "the connection closes after the one answer"
    );
    let seen = up.requests();
    assert!(seen.len() <= 1, "one request at most: {seen:?}");
    for req in &seen {
        assert_eq!(req.target, "/front", "{req:?}");
        assert!(
            req.all("content-length").is_empty() || req.all("transfer-encoding").is_empty(),
            "framed both ways: {req:?}"
        );
    }
}

#[tokio::test]
async fn odd_targets_get_an_answer() {
    let (up, proxy) = echoing(test_config()).await;
    let targets: [&[u8]; 7] = [
        b"/a#fragment",
        b"/a?q=1#fragment",
        b"/a|b",
        b"/a{b}",
        b"/a\"b",
        b"/a^b`c",
        b"/caf\xc3\xa9",
    ];
    for target in targets {
        let mut c = Wire::open(proxy.addr).await;
        let mut bytes = b"GET ".to_vec();
        bytes.extend_from_slice(target);
        bytes.extend_from_slice(format!(" HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes());
        c.write(&bytes).await;
        let r = c.response().await;
        assert!(
            matches!(r.status, 200 | 400),
            "{:?} -> {r:?}",
            lossy(target)
        );
    }
    // A fragment is the client's own: never sent on.
    let targets = up.targets();
    assert!(!targets.iter().any(|t| t.contains('#')), "{targets:?}");
    // Still serving.
    let mut c = Wire::open(proxy.addr).await;
    c.write(&get_request("/after")).await;
    assert_eq!(c.response().await.status, 200);
}

#[tokio::test]
async fn huge_request_heads_get_an_answer() {
    let (up, proxy) = echoing(test_config()).await;
    let filler = "a".repeat(1024);

    // 40 KiB of headers: past the core's head limit, within hyper's.
    let mut head = format!("GET /big HTTP/1.1\r\nHost: {HOST}\r\n");
    for i in 0..40 {
        head.push_str(&format!("X-Filler-{i}: {filler}\r\n"));
    }
    head.push_str("\r\n");
    assert!(head.len() > 40 * 1024);
    let mut c = Wire::open(proxy.addr).await;
    c.write(head.as_bytes()).await;
    let r = c.response().await;
    assert!(matches!(r.status, 200 | 431), "{r:?}");

    // More headers than either parser takes.
    let mut head = format!("GET /many HTTP/1.1\r\nHost: {HOST}\r\n");
    for i in 0..120 {
        head.push_str(&format!("X-H{i}: {i}\r\n"));
    }
    head.push_str("\r\n");
    let mut c = Wire::open(proxy.addr).await;
    c.write(head.as_bytes()).await;
    let r = c.response().await;
    assert_eq!(r.status, 431, "{r:?}");
    assert!(
        !up.targets().iter().any(|t| t == "/many"),
        "{:?}",
        up.targets()
    );
}

// === Policy ===

#[tokio::test]
async fn the_editor_of_an_ha_instance_cannot_be_reached_through_the_core() {
    let up = Scripted::start(|r| Act::Answer(ok(&r.target))).await;
    let mut spec = instance("orders", &[up.addr]);
    spec.ha = true;
    let proxy = TestProxy::start(&[spec], test_config()).await;

    for path in [
        "/admin",
        "/ADMIN/flows",
        "//admin",
        "/./admin",
        "/%61dmin",
        "/admin?x=1",
        "/x/../admin",
    ] {
        let r = one_request(proxy.addr, &get_request(path)).await;
        assert_eq!(r.status, 403, "{path}: {r:?}");
    }
    assert!(
        up.targets().is_empty(),
        "the replica saw an editor path: {:?}",
        up.targets()
    );

    for path in ["/adminx", "/flows"] {
        let r = one_request(proxy.addr, &get_request(path)).await;
        assert_eq!((r.status, r.text().as_str()), (200, path), "{r:?}");
        assert!(by_core(&r), "{path}: {r:?}");
    }
    assert_eq!(up.targets(), ["/adminx", "/flows"]);
}

/// The core forwards exactly what `handle` would: for each path, the same answer as hyper's
/// path (an HTTP/1.0 request, which the core always hands over), and the one the policy gives.
///
/// `/admin;x` is not the editor to the policy: its first segment is `admin;x`, as
/// `/admin.json`'s is `admin.json`, and Express (Node-RED's router) routes neither to the
/// editor mounted at `/admin`.
#[tokio::test]
async fn the_core_decides_editor_paths_as_hyper_does() {
    let up = Scripted::start(|r| Act::Answer(ok(&r.target))).await;
    let mut spec = instance("orders", &[up.addr]);
    spec.ha = true;
    let proxy = TestProxy::start(&[spec], test_config()).await;

    for path in [
        "/admin",
        "/ADMIN/flows",
        "//admin",
        "/./admin",
        "/%61dmin",
        "/admin?x=1",
        "/x/../admin",
        "/admin;x",
        "/admin.json",
        "/adminx",
        "/flows",
    ] {
        let core = one_request(proxy.addr, &get_request(path)).await;
        let hyper = one_request(
            proxy.addr,
            format!("GET {path} HTTP/1.0\r\nHost: {HOST}\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(core.status, hyper.status, "{path}: {core:?} / {hyper:?}");
        let editor = tandem_proxy::policy::is_editor_path(path.split('?').next().unwrap());
        assert_eq!(
            core.status,
            if editor { 403 } else { 200 },
            "{path}: {core:?}"
        );
    }
}

// === Shutdown ===

#[tokio::test]
async fn an_idle_kept_alive_connection_is_closed_on_shutdown() {
    let up = Scripted::start(|r| Act::Answer(ok(&r.target))).await;
    // A grace period far past every wait here: only the drain can close the connection.
    let mut config = test_config();
    config.shutdown_grace = Duration::from_secs(60);
    let mut proxy = TestProxy::start(&[instance("orders", &[up.addr])], config).await;
    let mut c = Wire::open(proxy.addr).await;
    c.write(&get_request("/one")).await;
    let r = c.response().await;
    assert!(by_core(&r), "the core: {r:?}");

    proxy.shutdown();
    assert!(c.closed().await, "the idle connection is closed");
    let task = proxy.task.take().unwrap();
    tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .expect("the server stops once its idle connections are closed")
        .unwrap();
}

#[tokio::test]
async fn an_idle_kept_alive_connection_is_closed_after_the_header_timeout() {
    let mut config = test_config();
    config.header_timeout = Duration::from_millis(300);
    let (_up, proxy) = echoing(config).await;
    let mut c = Wire::open(proxy.addr).await;
    c.write(&get_request("/one")).await;
    let r = c.response().await;
    assert!(by_core(&r), "{r:?}");
    let idle = Instant::now();
    assert!(c.closed().await, "the idle connection is closed");
    let after = idle.elapsed();
    assert!(
        after >= Duration::from_millis(250) && after < Duration::from_secs(3),
        "closed after {after:?} idle"
    );
}

#[tokio::test]
async fn a_request_in_flight_at_shutdown_is_answered_then_the_connection_closes() {
    let up = Scripted::start(|r| match r.target.as_str() {
        "/slow" => Act::Late(Duration::from_millis(400), ok("/slow")),
        t => Act::Answer(ok(t)),
    })
    .await;
    let mut config = test_config();
    config.shutdown_grace = Duration::from_secs(60);
    let mut proxy = TestProxy::start(&[instance("orders", &[up.addr])], config).await;
    let mut c = Wire::open(proxy.addr).await;
    c.write(&get_request("/slow")).await;
    // The replica has it: the core is waiting for its answer.
    let asked = eventually(WAIT, || async { !up.requests().is_empty() }).await;
    assert!(asked, "the request reached the replica");

    proxy.shutdown();
    let r = c.response().await;
    assert!(by_core(&r), "{r:?}");
    assert_eq!((r.status, r.text().as_str()), (200, "/slow"));
    // Its last response says so, as hyper's does when it drains.
    assert_eq!(r.header("connection"), Some("close"), "{r:?}");
    assert!(c.closed().await, "closed once its request is answered");
    let task = proxy.task.take().unwrap();
    tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .expect("the server stops once drained")
        .unwrap();
}

// === Helpers ===

/// A replica that answers every request [`ok`] with its target, and a proxy with `config` in
/// front of it.
async fn echoing(config: tandem_proxy::ProxyConfig) -> (Scripted, TestProxy) {
    let up = Scripted::start(|r| Act::Answer(ok(&r.target))).await;
    let proxy = TestProxy::start(&[instance("orders", &[up.addr])], config).await;
    (up, proxy)
}

/// A `200 Fine` with `body`, and a header whose name's case tells who served it.
fn ok(body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 Fine\r\nX-Case: 1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The answer to `request`, alone on a new connection.
async fn one_request(addr: SocketAddr, request: &[u8]) -> Answer {
    let mut c = Wire::open(addr).await;
    c.write(request).await;
    c.response().await
}

/// The core relayed [`ok`]'s head as the replica wrote it.
fn by_core(r: &Answer) -> bool {
    r.headers.iter().any(|(n, _)| n == "X-Case")
}

/// Hyper's path rewrote [`ok`]'s head.
fn by_hyper(r: &Answer) -> bool {
    r.headers.iter().any(|(n, _)| n == "x-case")
}

/// A plain GET of `target` on the test instance.
fn get_request(target: &str) -> Vec<u8> {
    format!("GET {target} HTTP/1.1\r\nHost: {HOST}\r\n\r\n").into_bytes()
}

/// `n` bytes of text that show where a piece went missing or moved.
fn pattern(n: usize) -> String {
    (0..n).map(|i| char::from(b'a' + (i % 26) as u8)).collect()
}

/// A chunked body of three 100 000-byte chunks, as the replica sends it.
fn big_chunked() -> Vec<u8> {
    let mut body = Vec::new();
    for _ in 0..3 {
        body.extend_from_slice(format!("{:x}\r\n", 100_000).as_bytes());
        body.extend_from_slice(pattern(100_000).as_bytes());
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"0\r\n\r\n");
    body
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The start line and the headers (names as sent) of a head, without its final blank line.
fn parse_head(head: &[u8]) -> (String, Vec<(String, String)>) {
    let text = lossy(head);
    let mut lines = text.split("\r\n").filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or_default().to_string();
    let headers = lines
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap_or((l, ""));
            (n.to_string(), v.trim().to_string())
        })
        .collect();
    (first, headers)
}

fn values<'a>(headers: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
        .collect()
}

fn is_chunked(headers: &[(String, String)]) -> bool {
    values(headers, "transfer-encoding")
        .iter()
        .any(|v| v.to_ascii_lowercase().contains("chunked"))
}

fn content_length(headers: &[(String, String)]) -> Option<usize> {
    values(headers, "content-length")
        .first()
        .map(|v| v.parse().expect("a numeric Content-Length"))
}

/// A chunked body at the start of `buf`, when it is all there: its length as sent (trailers
/// included) and its data. Panics on malformed chunking, which would otherwise hang a test.
fn chunked(buf: &[u8]) -> Option<(usize, Vec<u8>)> {
    let mut at = 0;
    let mut data = Vec::new();
    loop {
        let line_end = at + find(&buf[at..], b"\r\n")?;
        let line = lossy(&buf[at..line_end]);
        let size_text = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .unwrap_or_else(|_| panic!("bad chunk size line {line:?}"));
        at = line_end + 2;
        if size == 0 {
            // Trailers, up to the blank line.
            loop {
                let end = at + find(&buf[at..], b"\r\n")?;
                let blank = end == at;
                at = end + 2;
                if blank {
                    return Some((at, data));
                }
            }
        }
        if buf.len() < at + size + 2 {
            return None;
        }
        data.extend_from_slice(&buf[at..at + size]);
        assert_eq!(
            &buf[at + size..at + size + 2],
            b"\r\n",
            "chunk not ended by CRLF"
        );
        at += size + 2;
    }
}

/// What the scripted replica does with a request it has read.
enum Act {
    /// Writes the bytes and waits for the next request on the connection.
    Answer(Vec<u8>),
    /// Writes the pieces 30 ms apart, so they reach the proxy in separate reads.
    Pieces(Vec<Vec<u8>>),
    /// Waits, then writes the bytes.
    Late(Duration, Vec<u8>),
    /// Writes the bytes, then closes the connection once the pause has passed.
    AnswerThenClose(Vec<u8>, Duration),
    /// Closes the connection without answering.
    Close,
    /// Never answers; holds the connection until the proxy lets go of it.
    Hang,
}

/// A request as the scripted replica read it.
#[derive(Debug, Clone)]
struct Recorded {
    /// The request line.
    line: String,
    target: String,
    headers: Vec<(String, String)>,
    /// The body, de-chunked when it came chunked.
    body: Vec<u8>,
}

impl Recorded {
    fn all(&self, name: &str) -> Vec<&str> {
        values(&self.headers, name)
    }

    /// The request at the start of `buf`, when it is all there, and its length.
    fn take(buf: &[u8]) -> Option<(Self, usize)> {
        let head_end = find(buf, b"\r\n\r\n")? + 4;
        let (line, headers) = parse_head(&buf[..head_end]);
        let (body, end) = if is_chunked(&headers) {
            let (n, data) = chunked(&buf[head_end..])?;
            (data, head_end + n)
        } else {
            let n = content_length(&headers).unwrap_or(0);
            (buf.get(head_end..head_end + n)?.to_vec(), head_end + n)
        };
        let target = line.split(' ').nth(1).unwrap_or_default().to_string();
        Some((
            Self {
                line,
                target,
                headers,
                body,
            },
            end,
        ))
    }
}

/// What the scripted replica has seen.
#[derive(Default)]
struct Seen {
    requests: Mutex<Vec<Recorded>>,
    connections: AtomicUsize,
}

type Script = dyn Fn(&Recorded) -> Act + Send + Sync;

/// A replica on raw TCP: it reads requests (several per connection), records them, and
/// answers each as its script says, byte for byte.
struct Scripted {
    addr: SocketAddr,
    seen: Arc<Seen>,
    task: JoinHandle<()>,
}

impl Scripted {
    async fn start(script: impl Fn(&Recorded) -> Act + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let script: Arc<Script> = Arc::new(script);
        let s = seen.clone();
        let task = tokio::spawn(async move {
            // Dropping the JoinSet (when this task is aborted) drops every connection.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                s.connections.fetch_add(1, Ordering::SeqCst);
                conns.spawn(serve_scripted(stream, s.clone(), script.clone()));
                while conns.try_join_next().is_some() {}
            }
        });
        Self { addr, seen, task }
    }

    fn requests(&self) -> Vec<Recorded> {
        self.seen.requests.lock().unwrap().clone()
    }

    fn targets(&self) -> Vec<String> {
        self.requests().into_iter().map(|r| r.target).collect()
    }

    fn connections(&self) -> usize {
        self.seen.connections.load(Ordering::SeqCst)
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_scripted(mut stream: TcpStream, seen: Arc<Seen>, script: Arc<Script>) {
    let mut buf = Vec::new();
    loop {
        let req = loop {
            if let Some((req, used)) = Recorded::take(&buf) {
                buf.drain(..used);
                break req;
            }
            match stream.read_buf(&mut buf).await {
                Ok(n) if n > 0 => {}
                _ => return,
            }
        };
        let act = script(&req);
        // Recorded before it is answered: a test that has the answer sees the request.
        seen.requests.lock().unwrap().push(req);
        match act {
            Act::Answer(bytes) => {
                if stream.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            Act::Pieces(pieces) => {
                for (i, piece) in pieces.iter().enumerate() {
                    if i > 0 {
                        tokio::time::sleep(Duration::from_millis(30)).await;
                    }
                    if stream.write_all(piece).await.is_err() {
                        return;
                    }
                }
            }
            Act::Late(pause, bytes) => {
                tokio::time::sleep(pause).await;
                if stream.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            Act::AnswerThenClose(bytes, pause) => {
                let _ = stream.write_all(&bytes).await;
                tokio::time::sleep(pause).await;
                return;
            }
            Act::Close => return,
            Act::Hang => {
                let mut sink = [0u8; 1024];
                while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
                return;
            }
        }
    }
}

/// A response as the client read it.
#[derive(Debug)]
struct Answer {
    status_line: String,
    status: u16,
    /// Names as sent.
    headers: Vec<(String, String)>,
    /// As sent: still chunked when it came chunked.
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.all(name).first().copied()
    }

    fn all(&self, name: &str) -> Vec<&str> {
        values(&self.headers, name)
    }

    fn text(&self) -> String {
        lossy(&self.body)
    }
}

/// Where the response at the start of `buf` ends, when it is all there. `eof`: the server has
/// closed, which ends a body framed by the connection's end.
fn response_len(buf: &[u8], head: bool, eof: bool) -> Option<usize> {
    let head_end = find(buf, b"\r\n\r\n")? + 4;
    let (line, headers) = parse_head(&buf[..head_end]);
    let status: u16 = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    if head || (100..200).contains(&status) || status == 204 || status == 304 {
        return Some(head_end);
    }
    if is_chunked(&headers) {
        return chunked(&buf[head_end..]).map(|(n, _)| head_end + n);
    }
    match content_length(&headers) {
        Some(n) => (buf.len() >= head_end + n).then_some(head_end + n),
        None => eof.then_some(buf.len()),
    }
}

/// A raw client connection to the proxy.
struct Wire {
    stream: TcpStream,
    /// Read and not yet taken as a response.
    buf: Vec<u8>,
}

impl Wire {
    async fn open(addr: SocketAddr) -> Self {
        let stream = tokio::time::timeout(WAIT, TcpStream::connect(addr))
            .await
            .expect("connect in time")
            .unwrap();
        Self {
            stream,
            buf: Vec::new(),
        }
    }

    async fn write(&mut self, bytes: &[u8]) {
        tokio::time::timeout(WAIT, self.stream.write_all(bytes))
            .await
            .expect("write in time")
            .unwrap();
    }

    /// The next response to anything but `HEAD`.
    async fn response(&mut self) -> Answer {
        self.read_response(false).await
    }

    /// The next response, to a `HEAD`.
    async fn head_response(&mut self) -> Answer {
        self.read_response(true).await
    }

    async fn read_response(&mut self, head: bool) -> Answer {
        let deadline = Instant::now() + WAIT;
        let mut eof = false;
        loop {
            if let Some(n) = response_len(&self.buf, head, eof) {
                let raw: Vec<u8> = self.buf.drain(..n).collect();
                let head_end = find(&raw, b"\r\n\r\n").unwrap() + 4;
                let (status_line, headers) = parse_head(&raw[..head_end]);
                let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
                return Answer {
                    status_line,
                    status,
                    headers,
                    body: raw[head_end..].to_vec(),
                };
            }
            assert!(
                !eof,
                "the connection closed within a response: {:?}",
                lossy(&self.buf)
            );
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => panic!(
                    "no complete response within {WAIT:?}; got {:?}",
                    lossy(&self.buf)
                ),
                // Closed or reset.
                Ok(Ok(0) | Err(_)) => eof = true,
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Whether the proxy closes the connection within [`WAIT`]; it must send nothing more.
    async fn closed(&mut self) -> bool {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(WAIT, self.stream.read_to_end(&mut rest)).await;
        rest.splice(0..0, self.buf.drain(..));
        assert!(
            rest.is_empty(),
            "more bytes before the close: {:?}",
            lossy(&rest)
        );
        // A reset is a close too.
        read.is_ok()
    }
}
