//! MQTT proxy benchmark: messages per second and latency through the MQTT proxy versus
//! straight to Mosquitto, in the same run, QoS 0 and QoS 1.
//!
//! A Mosquitto is started on a free port (no persistence, no logging). The proxy runs in this
//! process on its own thread and current-thread runtime (like `tandem proxy --threads 1`), with
//! one HA instance of two replicas. Three targets, the same clients (rumqttc, on one
//! current-thread runtime) each time:
//! - *direct*: subscriber and publisher straight to the broker;
//! - *proxy-sub*: the subscriber is replica 0 (its filter rewritten to `$share/bench/...`), the
//!   publisher goes straight to the broker: one proxy hop, as for messages from devices;
//! - *proxy-both*: the publisher is replica 1 too: two proxy hops, replica to replica.
//!
//! - Throughput: the publisher sends `MSGS` messages (default 50,000; rumqttc and Mosquitto
//!   wrap QoS 1 packet ids past 65,535 on one connection) as fast as it can; the rate is messages
//!   received divided by the time from the first publish to the last message received.
//! - Latency: `RATE` messages per second (default 1,000) for `SECONDS` (default 5), each
//!   carrying its send time; p50 and p99 of receive time minus send time.
//!
//! `ROUNDS` (default 3) rounds, each running every target once, the order rotating per
//! round; the summary shows medians and the ratios proxy / direct.
//!
//! ```sh
//! cargo run --release -p tandem-benches --bin mqtt
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tandem_proxy::mqtt::{MqttConfig, MqttInstance, MqttProxy, MqttReplica};
use tandem_proxy::ProxyStats;
use tokio::time::Instant;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Broker {
    addr: SocketAddr,
    dir: std::path::PathBuf,
    child: std::process::Child,
}

impl Broker {
    fn start() -> Self {
        let port = tandem_proxy::net::free_port().unwrap();
        let dir = std::env::temp_dir().join(format!("tandem-mqtt-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("mosquitto.conf"),
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                 log_dest none\nmax_queued_messages 1000000\n"
            ),
        )
        .unwrap();
        let bin = ["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or("mosquitto");
        let child = std::process::Command::new(bin)
            .arg("-c")
            .arg(dir.join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start mosquitto: apt-get install mosquitto");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "mosquitto did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { addr, dir, child }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts the MQTT proxy on its own thread; returns the listeners of replicas 0 and 1.
fn start_proxy(upstream: SocketAddr) -> (SocketAddr, SocketAddr) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let stats = Arc::new(ProxyStats::default());
            let mqtt = MqttProxy::new(MqttConfig::new(upstream.to_string()), stats).unwrap();
            let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
            mqtt.set_instances(&[MqttInstance {
                name: "bench".into(),
                ha: true,
                exclude: vec![],
                replicas: vec![
                    MqttReplica {
                        slot: 0,
                        listen: Some(any),
                        token_sha256: None,
                    },
                    MqttReplica {
                        slot: 1,
                        listen: Some(any),
                        token_sha256: None,
                    },
                ],
            }])
            .await
            .unwrap();
            let sub = mqtt.listener("bench", 0).await.unwrap();
            let publ = mqtt.listener("bench", 1).await.unwrap();
            tx.send((sub, publ)).unwrap();
            std::future::pending::<()>().await;
        });
    });
    rx.recv().unwrap()
}

fn options(id: &str, addr: SocketAddr) -> MqttOptions {
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(60));
    o.set_max_packet_size(1 << 20, 1 << 20);
    o
}

/// What the subscriber saw.
#[derive(Default)]
struct Received {
    count: u64,
    last: Option<Instant>,
    latencies_us: Vec<f64>,
}

/// Subscribes to `bench/#` and records every message until aborted. Returns once the
/// subscription is acknowledged.
async fn subscriber(
    addr: SocketAddr,
    qos: QoS,
    epoch: Instant,
) -> (Arc<Mutex<Received>>, tokio::task::JoinHandle<()>) {
    let (client, mut el) = AsyncClient::new(options("bench-sub", addr), 1000);
    client.subscribe("bench/#", qos).await.unwrap();
    let got = Arc::new(Mutex::new(Received::default()));
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let g = got.clone();
    let task = tokio::spawn(async move {
        let _client = client;
        let mut ready = Some(ready_tx);
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let now = Instant::now();
                    let mut g = g.lock().unwrap();
                    g.count += 1;
                    g.last = Some(now);
                    if p.payload.len() == 8 {
                        let sent = u64::from_be_bytes(p.payload[..8].try_into().unwrap());
                        let at = now.duration_since(epoch).as_nanos() as u64;
                        g.latencies_us.push(at.saturating_sub(sent) as f64 / 1000.0);
                    }
                }
                Ok(_) => {}
                Err(e) => panic!("subscriber: {e}"),
            }
        }
    });
    ready_rx.await.unwrap();
    (got, task)
}

/// A connected publisher and its event loop task.
async fn publisher(addr: SocketAddr) -> (AsyncClient, tokio::task::JoinHandle<()>) {
    let (client, mut el) = AsyncClient::new(options("bench-pub", addr), 1000);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
                Ok(_) => {}
                Err(e) => panic!("publisher: {e}"),
            }
        }
    });
    ready_rx.await.unwrap();
    (client, task)
}

/// Messages per second from first publish to last message received, and the share received.
async fn throughput(sub: SocketAddr, publ: SocketAddr, qos: QoS, n: u64) -> (f64, f64) {
    let epoch = Instant::now();
    let (got, s) = subscriber(sub, qos, epoch).await;
    let (client, p) = publisher(publ).await;
    let payload = vec![b'x'; 32];
    let start = Instant::now();
    for _ in 0..n {
        client
            .publish("bench/t", qos, false, payload.clone())
            .await
            .unwrap();
    }
    // Until everything arrived, or nothing arrived for a second (QoS 0 may drop).
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let g = got.lock().unwrap();
        if g.count >= n || g.last.is_some_and(|l| l.elapsed() > Duration::from_secs(1)) {
            break;
        }
    }
    s.abort();
    p.abort();
    let g = got.lock().unwrap();
    let secs = g
        .last
        .map_or(f64::NAN, |l| l.duration_since(start).as_secs_f64());
    (g.count as f64 / secs, g.count as f64 / n as f64)
}

/// p50 and p99 latency in µs at `rate` messages per second for `seconds`.
async fn latency(
    sub: SocketAddr,
    publ: SocketAddr,
    qos: QoS,
    rate: u64,
    seconds: u64,
) -> (f64, f64) {
    let epoch = Instant::now();
    let (got, s) = subscriber(sub, qos, epoch).await;
    let (client, p) = publisher(publ).await;
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate));
    for _ in 0..rate * seconds {
        tick.tick().await;
        let sent = Instant::now().duration_since(epoch).as_nanos() as u64;
        client
            .publish("bench/t", qos, false, sent.to_be_bytes().to_vec())
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.abort();
    p.abort();
    let mut l = std::mem::take(&mut got.lock().unwrap().latencies_us);
    l.sort_by(f64::total_cmp);
    let q = |p: f64| {
        l.get(((l.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    (q(0.50), q(0.99))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() {
    let rounds = env("ROUNDS", 3);
    let msgs = env("MSGS", 50_000);
    let rate = env("RATE", 1000);
    let seconds = env("SECONDS", 5);
    let broker = Broker::start();
    let (psub, ppub) = start_proxy(broker.addr);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // (name, subscriber connects to, publisher connects to)
    let targets = [
        ("direct", broker.addr, broker.addr),
        ("proxy-sub", psub, broker.addr),
        ("proxy-both", psub, ppub),
    ];

    println!("MQTT: {msgs} msgs per throughput run, latency at {rate} msg/s for {seconds} s, {rounds} rounds");
    println!("| round | qos | target | msg/s | delivered | p50 (us) | p99 (us) |");
    println!("|---|---|---|---:|---:|---:|---:|");
    // results[qos][target] = (rates, p50s, p99s)
    let mut results = vec![vec![(vec![], vec![], vec![]); targets.len()]; 2];
    for round in 0..rounds {
        for (qi, qos) in [QoS::AtMostOnce, QoS::AtLeastOnce].into_iter().enumerate() {
            let mut order: Vec<usize> = (0..targets.len()).collect();
            order.rotate_left(round as usize % targets.len());
            for t in order {
                let (name, sub, publ) = targets[t];
                let (mps, share) = rt.block_on(throughput(sub, publ, qos, msgs));
                let (p50, p99) = rt.block_on(latency(sub, publ, qos, rate, seconds));
                println!(
                    "| {} | {qi} | {name} | {mps:.0} | {:.1}% | {p50:.0} | {p99:.0} |",
                    round + 1,
                    share * 100.0
                );
                results[qi][t].0.push(mps);
                results[qi][t].1.push(p50);
                results[qi][t].2.push(p99);
            }
        }
    }
    println!();
    println!("Medians; ratios and added latency against direct in the same run.");
    println!("| qos | target | msg/s | msg/s vs direct | p50 (us) | added p50 (us) | p99 (us) |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    for (qi, r) in results.into_iter().enumerate() {
        let direct = (median(r[0].0.clone()), median(r[0].1.clone()));
        for (t, (rates, p50s, p99s)) in r.into_iter().enumerate() {
            let (rate, p50) = (median(rates), median(p50s));
            println!(
                "| {qi} | {} | {rate:.0} | {:.2} | {p50:.0} | {:.0} | {:.0} |",
                targets[t].0,
                rate / direct.0,
                p50 - direct.1,
                median(p99s)
            );
        }
    }
}
