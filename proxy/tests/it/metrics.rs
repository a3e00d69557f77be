//! The bound on the proxy's metric series: nothing a client sends (method, host, path, headers,
//! MQTT client ids, topics, malformed packets) becomes a label. Labels come from the route
//! table, the MQTT listeners and fixed sets only, so many distinct client values leave the set
//! of series exactly as it was.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tandem_proxy::metrics::render;
use tandem_proxy::mqtt::{MqttConfig, MqttInstance, MqttProxy, MqttReplica};
use tandem_proxy::{ProxyStats, Routes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;

/// The series of a Prometheus text page: name and labels, without the values.
fn series(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' ').map(|(s, _)| s.to_string()))
        .collect()
}

#[tokio::test]
async fn client_controlled_http_values_add_no_series() {
    let u = Upstream::start("u0").await;
    let mut ha = instance("ha", &[u.addr]);
    ha.ha = true;
    let proxy = TestProxy::start(&[instance("orders", &[u.addr]), ha], test_config()).await;
    let before = series(&proxy.metrics().await);
    assert!(before.len() > 20, "{before:?}");

    let mut client = Client::connect(proxy.addr).await.unwrap();
    for i in 0..300 {
        // A distinct method (up to 1 KB), path, query, header and cookie every time.
        let method = format!("M{i}{}", "X".repeat(i * 3));
        let path = format!("/p{i}/{}?q={i}", "y".repeat(i));
        let host = match i % 4 {
            0 => format!("unknown{i}.localhost"),
            1 => format!("ORDERS.localhost:{}", 1000 + i),
            2 => "ha.localhost".to_string(),
            _ => "orders.localhost.".to_string(),
        };
        let path = if i % 8 == 2 {
            format!("/admin/{i}")
        } else {
            path
        };
        let mut r = req(&method, &host, &path, "");
        r.headers_mut()
            .insert("x-client", format!("v{i}").parse().unwrap());
        r.headers_mut()
            .insert("cookie", format!("tandem_affinity=a{i}").parse().unwrap());
        let reply = client.send(r).await.unwrap();
        assert!(matches!(reply.status, 200 | 403 | 404), "{}", reply.status);
    }
    // Malformed requests too, each on its own connection.
    for i in 0..20 {
        let bad = format!("GET /x HTTP/1.1\r\nHost: bad host {i}\r\n\r\n");
        raw(proxy.addr, bad.as_bytes(), Duration::from_millis(200)).await;
    }
    let after = series(&proxy.metrics().await);
    assert_eq!(
        after.symmetric_difference(&before).collect::<Vec<_>>(),
        Vec::<&String>::new()
    );
    assert!(
        proxy
            .metric("tandem_proxy_unknown_host_total")
            .await
            .unwrap()
            >= 75.0
    );
}

/// An upstream "broker" that accepts every connection and reads it to the end.
async fn sink() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
    addr
}

fn mqtt_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&u16::try_from(s.len()).unwrap().to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn packet(byte1: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![byte1];
    tandem_proxy::mqtt::frame::put_remaining_length(&mut out, body.len());
    out.extend_from_slice(body);
    out
}

/// CONNECT (MQTT 3.1.1) with `id`, SUBSCRIBE and UNSUBSCRIBE of `filter`, PUBLISH to `topic`.
fn session(id: &str, filter: &str, topic: &str) -> Vec<u8> {
    let mut connect = Vec::new();
    mqtt_string(&mut connect, "MQTT");
    connect.extend_from_slice(&[4, 2, 0, 30]);
    mqtt_string(&mut connect, id);
    let mut sub = vec![0, 1];
    mqtt_string(&mut sub, filter);
    sub.push(1);
    let mut unsub = vec![0, 2];
    mqtt_string(&mut unsub, filter);
    let mut publish = Vec::new();
    mqtt_string(&mut publish, topic);
    publish.extend_from_slice(b"payload");
    [
        packet(0x10, &connect),
        packet(0x82, &sub),
        packet(0xa2, &unsub),
        packet(0x30, &publish),
    ]
    .concat()
}

#[tokio::test]
async fn client_controlled_mqtt_values_add_no_series() {
    let upstream = sink().await;
    let stats = Arc::new(ProxyStats::default());
    let mqtt =
        Arc::new(MqttProxy::new(MqttConfig::new(upstream.to_string()), stats.clone()).unwrap());
    let list: Vec<_> = [("orders", true), ("billing", false)]
        .iter()
        .map(|(name, ha)| MqttInstance {
            name: name.to_string(),
            ha: *ha,
            exclude: Vec::new(),
            replicas: (0..2)
                .map(|slot| MqttReplica {
                    slot,
                    listen: Some("127.0.0.1:0".parse().unwrap()),
                    token_sha256: None,
                })
                .collect(),
        })
        .collect();
    mqtt.set_instances(&list).await.unwrap();
    let text = || render(&Routes::new().snapshot(), &stats);
    let before = series(&text());
    assert!(before.len() > 20, "{before:?}");

    for i in 0..200 {
        let (name, slot) = [("orders", 0), ("orders", 1), ("billing", 0), ("billing", 1)][i % 4];
        let addr = mqtt.listener(name, slot).await.unwrap();
        let mut c = TcpStream::connect(addr).await.unwrap();
        let bytes = if i % 10 == 9 {
            // Garbage and protocol errors: counted by fixed kinds only.
            vec![0x10, 4, 0, 9, b'M', b'Q', (i % 256) as u8]
        } else {
            session(
                &format!("client-{i}-{}", "c".repeat(i)),
                &format!("t/{i}/+/#"),
                &format!("t/{i}/{}", "z".repeat(i)),
            )
        };
        c.write_all(&bytes).await.unwrap();
        drop(c);
    }
    // Every connection counted: all of them went through the proxy.
    let connections = |t: &str| {
        t.lines()
            .filter(|l| l.starts_with("tandem_proxy_mqtt_connections_total{"))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
            .sum::<u64>()
    };
    assert!(
        eventually(Duration::from_secs(10), || async {
            connections(&text()) == 200
        })
        .await,
        "{}",
        text()
    );
    let after = series(&text());
    assert_eq!(
        after.symmetric_difference(&before).collect::<Vec<_>>(),
        Vec::<&String>::new()
    );
    mqtt.shutdown().await;
}
