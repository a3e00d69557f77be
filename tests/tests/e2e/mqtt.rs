//! MQTT through `tandem serve`: an HA instance's replicas reach a real Mosquitto through their
//! own listeners of Tandem's MQTT proxy (`TANDEM_MQTT_URL`), with the same client id and the
//! same subscription in their flows, and share the messages instead of each processing all.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{free_port, Tandem};

/// A Mosquitto of its own on a free port (the dashboard tests use it too).
pub(crate) struct Mosquitto {
    pub(crate) addr: SocketAddr,
    child: Child,
    /// Its config; removed on drop, after the kill.
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    pub(crate) fn start() -> Self {
        let port = free_port();
        let dir = tempfile::Builder::new()
            .prefix("tandem-e2e-mosquitto-")
            .tempdir()
            .unwrap();
        std::fs::write(
            dir.path().join("mosquitto.conf"),
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 100000\n"),
        )
        .unwrap();
        let bin = ["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or("mosquitto");
        let child = Command::new(bin)
            .arg("-c")
            .arg(dir.path().join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto (apt-get install mosquitto; .ci/run does)");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "mosquitto did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            addr,
            child,
            _dir: dir,
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_replicas_share_mqtt_messages_through_tandem() {
    let broker = Mosquitto::start();
    let upstream = broker.addr.to_string();
    let t = Tandem::start_with("mqtt", &["--mqtt-upstream", &upstream]).await;
    let id = replicas_share_jobs(&t, &broker).await;
    // Each replica reaches its own listener: a loopback port, no credentials.
    let logs = t.logs(&id, "limit=1000").await;
    let url = connected_to(&logs, "mq-r1");
    assert!(url.starts_with("mqtt://127.0.0.1:"), "{url}");
    // The proxy's counters name the instance.
    let m = t.metrics().await;
    assert!(
        m.contains("tandem_proxy_mqtt_connections{instance=\"mq\""),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_replicas_log_in_to_the_shared_listener_and_their_tokens_stay_out_of_the_log() {
    let broker = Mosquitto::start();
    let upstream = broker.addr.to_string();
    let listen = format!("127.0.0.1:{}", free_port());
    let t = Tandem::start_with(
        "mqtt-shared",
        &["--mqtt-upstream", &upstream, "--mqtt-listen", &listen],
    )
    .await;
    let id = replicas_share_jobs(&t, &broker).await;
    // Each replica logged in on the one listener as itself; Node-RED logged the broker's URL
    // with the token masked.
    let logs = t.logs(&id, "limit=1000").await;
    for src in ["mq-r0", "mq-r1"] {
        assert_eq!(
            connected_to(&logs, src),
            format!("mqtt://{src}:***@{listen}")
        );
    }
    let m = t.metrics().await;
    assert!(
        m.contains("tandem_proxy_mqtt_connections{instance=\"mq\",replica=\"r1\"}"),
        "{m}"
    );
}

/// The broker URL `src` logged when it connected (`Connected to broker: <client id>@<url>`).
pub(crate) fn connected_to(logs: &[serde_json::Value], src: &str) -> String {
    let line = logs
        .iter()
        .filter(|e| e["src"] == src)
        .filter_map(|e| e["msg"].as_str())
        .find_map(|m| m.split_once("Connected to broker: ").map(|(_, rest)| rest))
        .unwrap_or_else(|| panic!("{src} never connected: {logs:?}"));
    line.split_once('@')
        .map_or(line, |(_client_id, url)| url)
        .trim()
        .to_string()
}

/// An HA instance `mq` of 2 replicas whose unmodified flows (one broker config from the
/// environment, one client id, one subscription) reach `broker` through Tandem: 200 jobs
/// published to its topic are processed once each, shared between the replicas. Its id.
pub(crate) async fn replicas_share_jobs(t: &Tandem, broker: &Mosquitto) -> String {
    let (app, _) = t.team_and_app("Mqtt").await;
    // Unmodified flows: one broker config (from the environment), one client id, one
    // subscription, the same on every replica.
    let flows = json!([
        { "id": "t1", "type": "tab", "label": "Jobs" },
        { "id": "b", "type": "mqtt-broker", "name": "broker", "broker": "${TANDEM_MQTT_URL}", "clientid": "jobs-worker", "protocolVersion": "4", "keepalive": "60", "cleansession": true },
        { "id": "in", "type": "mqtt in", "z": "t1", "topic": "jobs/#", "qos": "1", "datatype": "utf8", "broker": "b", "wires": [["work"]] },
        { "id": "work", "type": "function", "z": "t1", "func": "node.warn('job ' + msg.payload); return null;", "wires": [[]] }
    ]);
    let r = t
        .api(
            "POST",
            "/api/v1/instances",
            json!({ "name": "mq", "application_id": app, "stack_id": t.stack().await, "flows": flows, "ha": { "replicas": 2 } }),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.json()["id"].as_str().unwrap().to_string();
    t.wait_running(&id, 2).await;
    // Both replicas connected (through their own listeners) before anything is published.
    let connected = |logs: &[serde_json::Value], src: &str| {
        logs.iter()
            .filter(|e| {
                e["src"] == src
                    && e["msg"]
                        .as_str()
                        .unwrap_or("")
                        .contains("Connected to broker")
            })
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let logs = t.logs(&id, "limit=1000").await;
        if connected(&logs, "mq-r0") == 1 && connected(&logs, "mq-r1") == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replicas did not connect: {logs:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let n = 200;
    let mut publisher = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &broker.addr.port().to_string()])
        .args(["-q", "1", "-t", "jobs/new", "-l"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("mosquitto_pub (apt-get install mosquitto-clients; .ci/run does)");
    {
        use std::io::Write;
        let mut stdin = publisher.stdin.take().unwrap();
        for i in 0..n {
            writeln!(stdin, "{i}").unwrap();
        }
    }
    assert!(publisher.wait().unwrap().success());

    let deadline = Instant::now() + Duration::from_secs(30);
    let (by_replica, seen) = loop {
        let logs = t.logs(&id, "limit=1000").await;
        let mut by_replica: BTreeMap<String, u32> = BTreeMap::new();
        let mut seen: Vec<u32> = Vec::new();
        for e in &logs {
            if let Some(job) = e["msg"].as_str().and_then(|m| m.strip_prefix("job ")) {
                *by_replica
                    .entry(e["src"].as_str().unwrap_or("?").to_string())
                    .or_default() += 1;
                seen.push(job.parse().unwrap());
            }
        }
        if seen.len() >= n as usize || Instant::now() > deadline {
            break (by_replica, seen);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!("jobs per replica: {by_replica:?}");
    let unique: BTreeSet<u32> = seen.iter().copied().collect();
    assert_eq!(
        seen.len(),
        n as usize,
        "each job processed once in all: {by_replica:?}"
    );
    assert_eq!(unique.len(), n as usize, "no job processed twice");
    for src in ["mq-r0", "mq-r1"] {
        let got = by_replica.get(src).copied().unwrap_or(0);
        assert!(
            (60..=140).contains(&got),
            "{src} got {got} of {n}: {by_replica:?}"
        );
    }
    // Same configured client id on both replicas, and neither was kicked off the broker.
    let logs = t.logs(&id, "limit=1000").await;
    assert_eq!(
        (connected(&logs, "mq-r0"), connected(&logs, "mq-r1")),
        (1, 1)
    );
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tandem_proxy_serves_the_mqtt_listeners_of_its_routes_file() {
    let broker = Mosquitto::start();
    let temp = tempfile::Builder::new()
        .prefix("tandem-e2e-mqtt-proxy-")
        .tempdir()
        .unwrap();
    let dir = temp.path();
    let (l0, l1) = (free_port(), free_port());
    let metrics = free_port();
    std::fs::write(
        dir.join("routes.toml"),
        format!(
            "[mqtt]\nupstream = \"{}\"\n\n[[instance]]\nname = \"orders\"\nhosts = [\"orders.localhost\"]\nha = true\nreplicas = [\"127.0.0.1:9\", \"127.0.0.1:10\"]\nmqtt_listeners = [\"127.0.0.1:{l0}\", \"127.0.0.1:{l1}\"]\n",
            broker.addr
        ),
    )
    .unwrap();
    let mut proxy = Command::new(env!("CARGO_BIN_EXE_tandem-under-test"))
        .arg("proxy")
        .arg("--routes")
        .arg(dir.join("routes.toml"))
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    for port in [l0, l1] {
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "MQTT listener {port} not up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // Two "replicas" with the same client id and the same subscription, one per listener.
    let subscriber = |port: u16, out: &str| {
        Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(["-i", "worker", "-q", "1", "-t", "orders/#"])
            .stdout(std::fs::File::create(dir.join(out)).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut subs = [subscriber(l0, "r0.txt"), subscriber(l1, "r1.txt")];
    std::thread::sleep(Duration::from_millis(700));
    let n = 100;
    let mut publisher = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &broker.addr.port().to_string()])
        .args(["-q", "1", "-t", "orders/new", "-l"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = publisher.stdin.take().unwrap();
        for i in 0..n {
            writeln!(stdin, "{i}").unwrap();
        }
    }
    assert!(publisher.wait().unwrap().success());
    let read = |f: &str| -> Vec<u32> {
        std::fs::read_to_string(dir.join(f))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while read("r0.txt").len() + read("r1.txt").len() < n as usize && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let (r0, r1) = (read("r0.txt"), read("r1.txt"));
    println!("through tandem proxy: r0 {} r1 {}", r0.len(), r1.len());
    let all: BTreeSet<u32> = r0.iter().chain(&r1).copied().collect();
    assert_eq!(r0.len() + r1.len(), n as usize, "each message once");
    assert_eq!(all.len(), n as usize);
    assert!(
        r0.len() >= 30 && r1.len() >= 30,
        "{} / {}",
        r0.len(),
        r1.len()
    );
    // Same client id, and neither subscriber was kicked off.
    for s in &mut subs {
        assert!(
            s.try_wait().unwrap().is_none(),
            "a subscriber lost its connection"
        );
    }
    let m = crate::harness::http(
        SocketAddr::from(([127, 0, 0, 1], metrics)),
        "GET",
        "metrics",
        "/metrics",
        &[],
        "",
    )
    .await
    .unwrap()
    .body;
    assert!(
        m.contains("tandem_proxy_mqtt_rewrites_total{instance=\"orders\""),
        "{m}"
    );
    for mut s in subs {
        let _ = s.kill();
        let _ = s.wait();
    }
    let _ = proxy.kill();
    let _ = proxy.wait();
}
