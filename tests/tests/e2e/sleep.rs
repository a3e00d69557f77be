//! Issue 17's sleep and wake, with real Node-RED in a real `tandem serve`: an idle instance with
//! `sleep_after_s` goes to sleep (its replica's process ends), its next request wakes it and is
//! answered 200, an open WebSocket keeps it awake, and HA instances cannot sleep.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{alive, hello_flows, Tandem};

/// `GET /hello` answering `hello`, and a WebSocket endpoint at `/ws`.
fn flows() -> Value {
    let mut f = hello_flows();
    f.as_array_mut().unwrap().extend([
        json!({ "id": "wsl", "type": "websocket-listener", "path": "/ws", "wholemsg": "false" }),
        json!({ "id": "wsin", "type": "websocket in", "z": "t1", "server": "wsl", "client": "", "wires": [[]] }),
    ]);
    f
}

/// `PUT /api/v1/instances/{id}` `{"sleep_after_s": value}`.
async fn set_sleep(t: &Tandem, id: &str, value: Value) -> crate::harness::Resp {
    t.api(
        "PUT",
        &format!("/api/v1/instances/{id}"),
        json!({ "sleep_after_s": value }),
    )
    .await
}

/// Waits until the instance's state is `want`; its status then.
async fn state_is(t: &Tandem, id: &str, want: &str, secs: u64) -> Value {
    t.wait_status(id, secs, |s| s["state"] == want).await
}

/// A WebSocket opened through the proxy to `/ws` of `instance`, kept open while it lives.
async fn websocket(t: &Tandem, instance: &str) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(t.http).await.unwrap();
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: {instance}.localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    s.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).await.unwrap();
        assert!(
            n > 0,
            "closed before the upgrade: {}",
            String::from_utf8_lossy(&head)
        );
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_instance_sleeps_and_its_next_request_wakes_it_but_not_while_a_websocket_is_open() {
    let t = Tandem::start("sleep").await;
    let (app, _) = t.team_and_app("sleep").await;
    let id = t.instance(&app, "napper", flows(), 1).await;
    let running = t.wait_running(&id, 1).await;
    let pid = running["replicas"][0]["pid"].as_u64().unwrap();
    let r = set_sleep(&t, &id, json!(2)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["sleep_after_s"], 2);

    // Idle for 2 s: asleep, its process gone.
    let s = state_is(&t, &id, "sleeping", 30).await;
    assert_eq!(s["summary"], "sleeping", "{s}");
    let deadline = Instant::now() + Duration::from_secs(15);
    while alive(pid) {
        assert!(
            Instant::now() < deadline,
            "the sleeping replica's process still runs"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let view = t
        .api("GET", &format!("/api/v1/instances/{id}"), Value::Null)
        .await;
    assert!(view.json()["asleep_since"].is_i64(), "{}", view.body);

    // The next request wakes it, and is answered.
    let start = Instant::now();
    let r = t.get("napper", "/hello").await.unwrap();
    eprintln!("wake to first 200: {:?}", start.elapsed());
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "hello"),
        "{}",
        t.tail_log()
    );
    let s = t.wait_running(&id, 1).await;
    assert!(s["replicas"][0]["pid"].as_u64() != Some(pid), "{s}");

    // An open WebSocket keeps it awake past its idle time; closed, it sleeps again.
    let ws = websocket(&t, "napper").await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let s = t.status(&id).await;
    assert_eq!(s["state"], "running", "asleep with a WebSocket open: {s}");
    drop(ws);
    state_is(&t, &id, "sleeping", 30).await;
    let r = t.get("napper", "/hello").await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "hello"));

    // Off: it stays awake.
    let r = set_sleep(&t, &id, json!(null)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    t.wait_running(&id, 1).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(t.status(&id).await["state"], "running");

    // HA instances stay awake.
    let ha = t.instance(&app, "pair", hello_flows(), 2).await;
    let r = set_sleep(&t, &ha, json!(60)).await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(r.body.contains("sleep_after_s"), "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_proxy_keeps_an_instance_awake_with_its_requests_and_wakes_it() {
    use crate::harness::free_port;
    use crate::standalone::{proxy_token, Standalone};

    let t = Tandem::start("sleep-edge").await;
    let (app, _) = t.team_and_app("sleep").await;
    let id = t.instance(&app, "napper", hello_flows(), 1).await;
    t.wait_running(&id, 1).await;
    let token = proxy_token(&t).await;
    let edge = Standalone::start_with(
        &t,
        "edge",
        &token,
        &t.dir.join("edge-routes.json"),
        free_port(),
        &[],
    );
    edge.connected().await;
    let r = set_sleep(&t, &id, json!(2)).await;
    assert_eq!(r.status, 200, "{}", r.body);

    // Requests through the standalone proxy only: reported, they keep it awake.
    for _ in 0..8 {
        assert_eq!(
            edge.get("napper", "/hello").await,
            Some((200, "hello".to_string()))
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(t.status(&id).await["state"], "running");
    }
    // Left alone, it sleeps; the standalone proxy's next request wakes it through the API.
    state_is(&t, &id, "sleeping", 30).await;
    let start = Instant::now();
    assert_eq!(
        edge.get("napper", "/hello").await,
        Some((200, "hello".to_string())),
        "{}",
        t.tail_log()
    );
    eprintln!(
        "wake through a standalone proxy to first 200: {:?}",
        start.elapsed()
    );
    t.wait_running(&id, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt_connection_through_tandem_keeps_an_instance_awake() {
    let broker = crate::mqtt::Mosquitto::start();
    let upstream = broker.addr.to_string();
    let t = Tandem::start_with("sleep-mqtt", &["--mqtt-upstream", &upstream]).await;
    let (app, _) = t.team_and_app("sleep").await;
    let mut f = hello_flows();
    f.as_array_mut().unwrap().extend([
        json!({ "id": "mb", "type": "mqtt-broker", "name": "broker", "broker": "${TANDEM_MQTT_URL}", "clientid": "listener", "protocolVersion": "4", "keepalive": "60", "cleansession": true }),
        json!({ "id": "min", "type": "mqtt in", "z": "t1", "topic": "orders/#", "qos": "1", "datatype": "utf8", "broker": "mb", "wires": [[]] }),
    ]);
    let id = t.instance(&app, "listener", f, 1).await;
    t.wait_running(&id, 1).await;
    let r = set_sleep(&t, &id, json!(1)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // Its subscription is a connection through Tandem's MQTT proxy: it must not miss messages.
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let s = t.status(&id).await;
        assert_eq!(
            s["state"], "running",
            "asleep with an MQTT connection open: {s}"
        );
    }
}
