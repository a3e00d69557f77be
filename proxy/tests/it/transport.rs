use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

#[tokio::test]
async fn websockets_work_end_to_end_across_idle_gaps() {
    let ws = WsEcho::start().await;
    let proxy = TestProxy::start(&[instance("orders", &[ws.addr])], test_config()).await;
    let mut request = format!("ws://{}/admin/comms", proxy.addr)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("host", "orders.localhost".parse().unwrap());
    let (mut socket, resp) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(resp.status(), 101);
    assert_eq!(resp.headers().get("x-tandem-replica").unwrap(), "r0");
    for i in 0..3 {
        socket.send(Message::text(format!("m{i}"))).await.unwrap();
        assert_eq!(
            socket.next().await.unwrap().unwrap(),
            Message::text(format!("m{i}"))
        );
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    socket.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    assert_eq!(
        socket.next().await.unwrap().unwrap(),
        Message::binary(vec![1u8, 2, 3])
    );
    let m = proxy.metrics().await;
    assert!(m.contains("tandem_proxy_websocket_tunnels 1"), "{m}");
    socket.close(None).await.unwrap();
}

#[tokio::test]
async fn idle_websocket_tunnels_are_closed() {
    let ws = WsEcho::start().await;
    let mut config = test_config();
    config.idle_timeout = Duration::from_millis(300);
    let proxy = TestProxy::start(&[instance("orders", &[ws.addr])], config).await;
    let mut request = format!("ws://{}/comms", proxy.addr)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("host", "orders.localhost".parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(3), socket.next()).await;
    assert!(
        matches!(
            ended,
            Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(Message::Close(_))))
        ),
        "the idle tunnel is closed: {ended:?}"
    );
}

#[tokio::test]
async fn busy_websockets_outlive_the_idle_timeout() {
    let ws = WsEcho::start().await;
    let idle = Duration::from_millis(400);
    let mut config = test_config();
    config.idle_timeout = idle;
    let proxy = TestProxy::start(&[instance("orders", &[ws.addr])], config).await;
    let mut request = format!("ws://{}/comms", proxy.addr)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("host", "orders.localhost".parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    // A message each way every 50 ms, for four idle timeouts.
    let start = tokio::time::Instant::now();
    let mut i = 0;
    while start.elapsed() < idle * 4 {
        let msg = Message::text(format!("m{i}"));
        socket.send(msg.clone()).await.unwrap();
        let echo = tokio::time::timeout(Duration::from_secs(5), socket.next()).await;
        assert!(
            matches!(&echo, Ok(Some(Ok(m))) if *m == msg),
            "message {i}, after {:?}: {echo:?}",
            start.elapsed()
        );
        i += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = proxy.metrics().await;
    assert!(m.contains("tandem_proxy_websocket_tunnels 1"), "{m}");
    // The same tunnel, once quiet, is closed: the idle timeout was in force all along.
    let ended = tokio::time::timeout(idle * 10, socket.next()).await;
    assert!(
        matches!(
            ended,
            Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(Message::Close(_))))
        ),
        "the tunnel is closed once idle: {ended:?}"
    );
}

#[tokio::test]
async fn request_bodies_stream_to_the_replica() {
    let u = Upstream::start("u0").await;
    let proxy = TestProxy::start(&[instance("orders", &[u.addr])], test_config()).await;
    // A body of unknown length (chunked), sent chunk by chunk as the test decides.
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    let body = StreamBody::new(futures_util::stream::unfold(rx, |mut rx| async move {
        let chunk = rx.recv().await?;
        Some((Ok::<_, Infallible>(Frame::data(chunk)), rx))
    }));
    let stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let request = http::Request::post("/sink")
        .header("host", "orders.localhost")
        .body(body)
        .unwrap();
    let response = tokio::spawn(async move { sender.send_request(request).await });

    tx.send(Bytes::from_static(b"first;")).await.unwrap();
    // The rest waits until the replica has the first chunk: through a proxy that buffered the
    // body, the first chunk would never arrive alone.
    let first = eventually(Duration::from_secs(5), || async { u.body_bytes() == 6 }).await;
    assert!(
        first,
        "the replica got {} bytes before the rest was sent",
        u.body_bytes()
    );
    assert_eq!(u.bodies_ended(), 0, "the body is still open");
    tx.send(Bytes::from_static(b"second;")).await.unwrap();
    drop(tx);

    let resp = response.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    let total = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&total[..], b"13");
}

#[tokio::test]
async fn bodies_stream_both_ways() {
    let u = Upstream::start("u0").await;
    let proxy = TestProxy::start(&[instance("orders", &[u.addr])], test_config()).await;
    // Response: the first chunk arrives long before the last one is produced.
    let mut client = Client::connect(proxy.addr).await.unwrap();
    let _ = &mut client;
    let stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let start = tokio::time::Instant::now();
    let resp = sender
        .send_request(req("GET", "orders.localhost", "/chunks", ""))
        .await
        .unwrap();
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    let first_at = start.elapsed();
    assert_eq!(&first[..], b"chunk0;");
    let mut rest = Vec::new();
    while let Some(f) = body.frame().await {
        if let Ok(d) = f.unwrap().into_data() {
            rest.extend_from_slice(&d);
        }
    }
    assert_eq!(rest, b"chunk1;chunk2;");
    assert!(start.elapsed() >= Duration::from_millis(550));
    assert!(
        first_at < Duration::from_millis(400),
        "first chunk after {first_at:?}: buffered?"
    );

    // Request: a 4 MiB body goes up and comes back intact.
    let big: Vec<u8> = (0..4 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let r = client_echo(proxy.addr, big.clone()).await;
    assert_eq!(r.len(), big.len());
    assert!(r == big);
}

async fn client_echo(addr: std::net::SocketAddr, body: Vec<u8>) -> Vec<u8> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let resp = sender
        .send_request(req("POST", "orders.localhost", "/echo", body))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec()
}

#[tokio::test]
async fn forwarded_headers_are_set_and_hop_by_hop_headers_dropped() {
    let u = Upstream::start("u0").await;
    let proxy = TestProxy::start(&[instance("orders", &[u.addr])], test_config()).await;
    let mut r = req("GET", "Orders.localhost:8080", "/headers", "");
    r.headers_mut()
        .insert("connection", "keep-alive, x-secret".parse().unwrap());
    r.headers_mut().insert("x-secret", "1".parse().unwrap());
    r.headers_mut()
        .insert("x-forwarded-for", "203.0.113.7".parse().unwrap());
    let reply = send(proxy.addr, r).await.unwrap();
    let body = reply.body;
    assert!(body.contains("host=Orders.localhost:8080\n"), "{body}");
    assert!(body.contains("xff=203.0.113.7, 127.0.0.1\n"), "{body}");
    assert!(body.contains("xfp=http\n"), "{body}");
    assert!(body.contains("xfh=Orders.localhost:8080\n"), "{body}");
    assert!(
        body.contains("secret=-\n"),
        "headers named in Connection are dropped: {body}"
    );
}

#[tokio::test]
async fn upstream_connections_are_reused() {
    let u = Upstream::start("u0").await;
    let proxy = TestProxy::start(&[instance("orders", &[u.addr])], test_config()).await;
    let mut client = Client::connect(proxy.addr).await.unwrap();
    for _ in 0..50 {
        assert_eq!(
            client.get("orders.localhost", "/").await.unwrap().status,
            200
        );
    }
    let m = proxy.metrics().await;
    assert!(
        m.contains("tandem_proxy_replica_idle_connections{instance=\"orders\",replica=\"r0\"} 1"),
        "{m}"
    );
    assert!(
        m.contains(
            "tandem_proxy_requests_total{instance=\"orders\",replica=\"r0\",class=\"2xx\"} 50"
        ),
        "{m}"
    );
    assert!(
        m.contains("tandem_proxy_request_duration_seconds_count{instance=\"orders\"} 50"),
        "{m}"
    );
    assert!(m.contains("tandem_proxy_open_connections 1"), "{m}");
}

#[tokio::test]
async fn slowloris_clients_are_cut_off_while_others_are_served() {
    let u = Upstream::start("u0").await;
    let mut config = test_config();
    config.header_timeout = Duration::from_millis(400);
    let proxy = TestProxy::start(&[instance("orders", &[u.addr])], config).await;
    let mut slow = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let start = tokio::time::Instant::now();
    let writer = async {
        for b in b"GET / HTTP/1.1\r\nHost: orders.localhost\r\nX-Slow: " {
            if slow.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            if start.elapsed() > Duration::from_secs(3) {
                break;
            }
        }
    };
    let other = async {
        for _ in 0..5 {
            assert_eq!(
                get(proxy.addr, "orders.localhost", "/")
                    .await
                    .unwrap()
                    .status,
                200
            );
        }
    };
    tokio::join!(writer, other);
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(2), slow.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the slow connection was closed");
    assert!(start.elapsed() < Duration::from_secs(4));
    let text = String::from_utf8_lossy(&buf);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
}

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish_and_refuses_new_ones() {
    let u = Upstream::start("u0").await;
    let mut proxy = TestProxy::start(&[instance("orders", &[u.addr])], test_config()).await;
    let addr = proxy.addr;
    let in_flight =
        tokio::spawn(async move { get(addr, "orders.localhost", "/slow?ms=600").await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    proxy.shutdown();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no new connections after shutdown"
    );
    let r = in_flight.await.unwrap().unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "u0"));
    let task = proxy.task.take().unwrap();
    tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .expect("the server stops once drained")
        .unwrap();
}
