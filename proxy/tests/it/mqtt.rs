//! The MQTT proxy with a real Mosquitto (started here, on a free port, with its own config) and
//! real MQTT clients (rumqttc's, v3.1.1 and v5), plus raw sockets for malformed input and a
//! recording upstream for byte-exact checks.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_proxy::metrics::render;
use tandem_proxy::mqtt::{MqttConfig, MqttInstance, MqttProxy, MqttReplica};
use tandem_proxy::{ProxyStats, Routes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};

/// The value of one series, named with its labels as rendered.
pub(crate) fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

pub(crate) const WAIT: Duration = Duration::from_secs(20);

// === Mosquitto ===

/// A Mosquitto process with its own config and log, killed on drop.
pub struct Broker {
    pub addr: SocketAddr,
    /// The config and the log; removed on drop, after the kill.
    dir: tempfile::TempDir,
    child: Option<Child>,
}

fn mosquitto_bin() -> &'static str {
    ["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or("mosquitto")
}

impl Broker {
    pub async fn start() -> Self {
        let port = tandem_proxy::net::free_port().unwrap();
        let dir = tempfile::Builder::new()
            .prefix("tandem-mqtt-")
            .tempdir()
            .unwrap();
        // max_queued_messages: the default 1000 drops messages of a surviving group member
        // during failover (see shared/notes/mqtt-shared-subscriptions.md).
        std::fs::write(
            dir.path().join("mosquitto.conf"),
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                 log_dest stderr\nlog_type all\nmax_queued_messages 100000\nsys_interval 1\n"
            ),
        )
        .unwrap();
        let mut b = Self {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
            child: None,
        };
        b.spawn().await;
        b
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("mosquitto.log"))
            .unwrap();
        let child = Command::new(mosquitto_bin())
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start mosquitto ({e}): apt-get install mosquitto (.ci/run does)")
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(self.addr).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not start:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }

    pub async fn restart(&mut self) {
        self.kill().await;
        self.spawn().await;
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.start_kill();
        }
    }
}

// === The proxy ===

struct Setup {
    mqtt: Arc<MqttProxy>,
    stats: Arc<ProxyStats>,
}

impl Setup {
    /// One instance per entry: (name, ha, exclusions, replicas), listeners on free ports.
    async fn new(upstream: SocketAddr, instances: &[(&str, bool, &[&str], usize)]) -> Self {
        let stats = Arc::new(ProxyStats::default());
        let mqtt =
            Arc::new(MqttProxy::new(MqttConfig::new(upstream.to_string()), stats.clone()).unwrap());
        let list: Vec<_> = instances
            .iter()
            .map(|(name, ha, exclude, n)| MqttInstance {
                name: name.to_string(),
                ha: *ha,
                exclude: exclude.iter().map(|s| s.to_string()).collect(),
                replicas: (0..*n)
                    .map(|slot| MqttReplica {
                        slot,
                        listen: Some("127.0.0.1:0".parse().unwrap()),
                        token_sha256: None,
                    })
                    .collect(),
            })
            .collect();
        mqtt.set_instances(&list).await.unwrap();
        Self { mqtt, stats }
    }

    async fn addr(&self, instance: &str, slot: usize) -> SocketAddr {
        self.mqtt.listener(instance, slot).await.unwrap()
    }

    fn metric(&self, series: &str) -> u64 {
        let text = render(&Routes::new().snapshot(), &self.stats);
        metric(&text, series).unwrap_or_else(|| panic!("no series {series} in\n{text}")) as u64
    }
}

// === Clients ===

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum V {
    V311,
    V5,
}

#[derive(Debug, Clone)]
pub(crate) struct Msg {
    pub(crate) topic: String,
    pub(crate) payload: String,
    pub(crate) retain: bool,
}

#[derive(Debug, Default)]
pub(crate) struct Seen {
    pub(crate) connects: usize,
    pub(crate) subacks: usize,
    pub(crate) msgs: Vec<Msg>,
    pub(crate) errors: Vec<String>,
}

/// A real MQTT client (rumqttc) that subscribes to `filters` (QoS 1) on every CONNACK and
/// records what it gets. Stops on the first error unless `reconnect`; after `stop_after`
/// messages it drops its connection without DISCONNECT, like a killed process.
pub(crate) struct Client {
    seen: Arc<Mutex<Seen>>,
    task: JoinHandle<()>,
}

pub(crate) struct ClientOpts {
    pub(crate) v: V,
    pub(crate) reconnect: bool,
    pub(crate) stop_after: Option<usize>,
    /// Username and password of the CONNECT (the shared listener's replica and token).
    pub(crate) login: Option<(String, String)>,
}

impl Client {
    pub(crate) fn start(addr: SocketAddr, id: &str, filters: &[&str], o: ClientOpts) -> Self {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let s = seen.clone();
        let filters: Vec<String> = filters.iter().map(|f| f.to_string()).collect();
        let id = id.to_string();
        let task = tokio::spawn(async move {
            let stop = o.stop_after.unwrap_or(usize::MAX);
            match o.v {
                V::V311 => {
                    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
                    let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
                    opts.set_keep_alive(Duration::from_secs(30));
                    if let Some((user, pass)) = &o.login {
                        opts.set_credentials(user, pass);
                    }
                    let (client, mut el) = AsyncClient::new(opts, 100);
                    loop {
                        match el.poll().await {
                            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                                s.lock().unwrap().connects += 1;
                                for f in &filters {
                                    client.try_subscribe(f, QoS::AtLeastOnce).unwrap();
                                }
                            }
                            Ok(Event::Incoming(Packet::SubAck(_))) => {
                                s.lock().unwrap().subacks += 1
                            }
                            Ok(Event::Incoming(Packet::Publish(p))) => {
                                let mut s = s.lock().unwrap();
                                s.msgs.push(Msg {
                                    topic: p.topic.clone(),
                                    payload: String::from_utf8_lossy(&p.payload).into(),
                                    retain: p.retain,
                                });
                                if s.msgs.len() >= stop {
                                    return;
                                }
                            }
                            Ok(_) => {}
                            Err(e) => {
                                s.lock().unwrap().errors.push(e.to_string());
                                if !o.reconnect {
                                    return;
                                }
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                    }
                }
                V::V5 => {
                    use rumqttc::v5::mqttbytes::v5::Packet;
                    use rumqttc::v5::mqttbytes::QoS;
                    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
                    let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
                    opts.set_keep_alive(Duration::from_secs(30));
                    if let Some((user, pass)) = &o.login {
                        opts.set_credentials(user, pass);
                    }
                    let (client, mut el) = AsyncClient::new(opts, 100);
                    loop {
                        match el.poll().await {
                            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                                s.lock().unwrap().connects += 1;
                                for f in &filters {
                                    client.try_subscribe(f, QoS::AtLeastOnce).unwrap();
                                }
                            }
                            Ok(Event::Incoming(Packet::SubAck(_))) => {
                                s.lock().unwrap().subacks += 1
                            }
                            Ok(Event::Incoming(Packet::Publish(p))) => {
                                let mut s = s.lock().unwrap();
                                s.msgs.push(Msg {
                                    topic: String::from_utf8_lossy(&p.topic).into(),
                                    payload: String::from_utf8_lossy(&p.payload).into(),
                                    retain: p.retain,
                                });
                                if s.msgs.len() >= stop {
                                    return;
                                }
                            }
                            Ok(_) => {}
                            Err(e) => {
                                s.lock().unwrap().errors.push(e.to_string());
                                if !o.reconnect {
                                    return;
                                }
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                    }
                }
            }
        });
        Self { seen, task }
    }

    pub(crate) fn plain(v: V, addr: SocketAddr, id: &str, filters: &[&str]) -> Self {
        Self::start(
            addr,
            id,
            filters,
            ClientOpts {
                v,
                reconnect: false,
                stop_after: None,
                login: None,
            },
        )
    }

    pub(crate) fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap()
    }

    /// Waits (bounded) until `f` holds for what this client has seen.
    pub(crate) async fn until(&self, what: &str, f: impl Fn(&Seen) -> bool) {
        let deadline = Instant::now() + WAIT;
        loop {
            if f(&self.seen()) {
                return;
            }
            if Instant::now() >= deadline {
                let s = self.seen();
                panic!(
                    "timed out waiting for {what}; seen: connects {}, subacks {}, {} messages, errors {:?}",
                    s.connects,
                    s.subacks,
                    s.msgs.len(),
                    s.errors
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub(crate) fn count(&self, topic_prefix: &str) -> usize {
        self.seen()
            .msgs
            .iter()
            .filter(|m| m.topic.starts_with(topic_prefix))
            .count()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Publishes `payloads` to `topic` straight to the broker and waits for every PUBACK (QoS 1).
pub(crate) async fn publish(broker: SocketAddr, topic: &str, payloads: Vec<String>, retain: bool) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let opts = MqttOptions::new(
        format!("pub-{}", fastrand::u32(..)),
        broker.ip().to_string(),
        broker.port(),
    );
    let (client, mut el) = AsyncClient::new(opts, 100);
    let n = payloads.len();
    let topic = topic.to_string();
    let sender = tokio::spawn(async move {
        for p in payloads {
            client
                .publish(&topic, QoS::AtLeastOnce, retain, p)
                .await
                .unwrap();
        }
        client
    });
    let mut acked = 0;
    timeout(WAIT, async {
        while acked < n {
            if let Event::Incoming(Packet::PubAck(_)) = el.poll().await.unwrap() {
                acked += 1;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("only {acked} of {n} publishes acknowledged"));
    let client = sender.await.unwrap();
    let _ = client.disconnect().await;
    let _ = timeout(Duration::from_secs(1), el.poll()).await;
}

pub(crate) fn seq(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

pub(crate) fn payloads(c: &Client, topic_prefix: &str) -> Vec<String> {
    c.seen()
        .msgs
        .iter()
        .filter(|m| m.topic.starts_with(topic_prefix))
        .map(|m| m.payload.clone())
        .collect()
}

// === Balance, client ids ===

async fn two_replicas_share(v: V) {
    let broker = Broker::start().await;
    let s = Setup::new(broker.addr, &[("orders", true, &["replies/#"], 2)]).await;
    // Both replicas run the same flows: same client id, same filter.
    let r0 = Client::plain(v, s.addr("orders", 0).await, "nodered", &["jobs/#"]);
    let r1 = Client::plain(v, s.addr("orders", 1).await, "nodered", &["jobs/#"]);
    r0.until("r0 SUBACK", |s| s.subacks == 1).await;
    r1.until("r1 SUBACK", |s| s.subacks == 1).await;

    const N: usize = 1000;
    publish(broker.addr, "jobs/new", seq("", N), false).await;
    let deadline = Instant::now() + WAIT;
    while r0.count("jobs/") + r1.count("jobs/") < N && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (a, b) = (payloads(&r0, "jobs/"), payloads(&r1, "jobs/"));
    println!("{v:?}: r0 got {}, r1 got {} of {N}", a.len(), b.len());
    let all: HashSet<_> = a.iter().chain(&b).collect();
    assert_eq!(all.len(), a.len() + b.len(), "duplicates");
    assert_eq!(all.len(), N, "lost {}", N - all.len());
    for got in [a.len(), b.len()] {
        assert!(
            (N * 40 / 100..=N * 60 / 100).contains(&got),
            "unbalanced: {got} of {N}"
        );
    }
    // Both stayed connected the whole run: one CONNACK each, no error.
    for r in [&r0, &r1] {
        let seen = r.seen();
        assert_eq!((seen.connects, seen.errors.len()), (1, 0));
    }
    let log = broker.log();
    assert!(
        log.contains(" as nodered-r0 ") && log.contains(" as nodered-r1 "),
        "{log}"
    );
    assert!(!log.contains("already connected"), "{log}");
    assert!(log.contains("$share/orders/jobs/#"), "{log}");
    assert_eq!(s.metric("tandem_proxy_mqtt_rewrites_total{instance=\"orders\",replica=\"r0\",kind=\"client_id\"}"), 1);
    assert_eq!(
        s.metric(
            "tandem_proxy_mqtt_rewrites_total{instance=\"orders\",replica=\"r1\",kind=\"filter\"}"
        ),
        1
    );
    assert_eq!(
        s.metric("tandem_proxy_mqtt_connections{instance=\"orders\",replica=\"r1\"}"),
        1
    );
    assert!(
        s.metric("tandem_proxy_mqtt_packets_total{instance=\"orders\",replica=\"r0\",direction=\"to_client\"}")
            >= a.len() as u64
    );
}

#[tokio::test]
async fn mqtt_two_replicas_share_messages_v311() {
    two_replicas_share(V::V311).await;
}

#[tokio::test]
async fn mqtt_two_replicas_share_messages_v5() {
    two_replicas_share(V::V5).await;
}

// === Unshared filters ===

#[tokio::test]
async fn mqtt_dollar_and_excluded_filters_are_not_shared() {
    let broker = Broker::start().await;
    let s = Setup::new(broker.addr, &[("orders", true, &["replies/#"], 2)]).await;
    let filters = ["replies/+", "$SYS/broker/uptime"];
    let r0 = Client::plain(V::V5, s.addr("orders", 0).await, "nodered", &filters);
    let r1 = Client::plain(V::V311, s.addr("orders", 1).await, "nodered", &filters);
    r0.until("r0 SUBACKs", |s| s.subacks == 2).await;
    r1.until("r1 SUBACKs", |s| s.subacks == 2).await;

    publish(broker.addr, "replies/abc", seq("", 100), false).await;
    for r in [&r0, &r1] {
        r.until("every reply", |s| {
            s.msgs.iter().filter(|m| m.topic == "replies/abc").count() == 100
        })
        .await;
    }
    // $SYS/broker/uptime is published every second ("N seconds"): shared, each value would go
    // to one replica only; unshared, both see the same values.
    let common = || {
        let a: HashSet<_> = payloads(&r0, "$SYS/").into_iter().collect();
        let b: HashSet<_> = payloads(&r1, "$SYS/").into_iter().collect();
        a.intersection(&b).count()
    };
    let deadline = Instant::now() + WAIT;
    while common() < 2 {
        assert!(
            Instant::now() < deadline,
            "replicas do not see the same $SYS messages"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        s.metric(
            "tandem_proxy_mqtt_rewrites_total{instance=\"orders\",replica=\"r0\",kind=\"filter\"}"
        ),
        0
    );
    assert!(!broker.log().contains("$share/"));
}

// === Retained messages ===

#[tokio::test]
async fn mqtt_retained_message_is_processed_once_per_instance() {
    let broker = Broker::start().await;
    let s = Setup::new(
        broker.addr,
        &[("orders", true, &["sync/#"], 2), ("plain", false, &[], 1)],
    )
    .await;
    publish(broker.addr, "state/orders", vec!["retained-1".into()], true).await;

    // "sync/<name>" is unshared: a message there is a marker that every earlier delivery on
    // that connection, retained replays included, has arrived.
    let r0 = Client::plain(
        V::V311,
        s.addr("orders", 0).await,
        "nodered",
        &["sync/r0", "state/#"],
    );
    r0.until("r0 SUBACKs", |s| s.subacks == 2).await;
    let r1 = Client::plain(
        V::V5,
        s.addr("orders", 1).await,
        "nodered",
        &["sync/r1", "state/#"],
    );
    r1.until("r1 SUBACKs", |s| s.subacks == 2).await;
    let other = Client::plain(V::V311, s.addr("plain", 0).await, "other", &["state/#"]);
    other.until("non-HA SUBACK", |s| s.subacks == 1).await;
    let sync = |r: &'static str| async move {
        publish(broker.addr, &format!("sync/{r}"), vec!["x".into()], false).await;
    };
    sync("r0").await;
    sync("r1").await;
    r0.until("r0 marker", |s| s.msgs.iter().any(|m| m.topic == "sync/r0"))
        .await;
    r1.until("r1 marker", |s| s.msgs.iter().any(|m| m.topic == "sync/r1"))
        .await;

    let retained = |c: &Client| {
        c.seen()
            .msgs
            .iter()
            .filter(|m| m.topic == "state/orders" && m.retain)
            .count()
    };
    println!(
        "retained replays: r0 {}, r1 {}",
        retained(&r0),
        retained(&r1)
    );
    assert_eq!(
        retained(&r0) + retained(&r1),
        1,
        "the instance processed it once"
    );
    assert_eq!(
        retained(&r0),
        1,
        "r0 connected first: it holds the instance's retained messages"
    );
    other
        .until("non-HA replay", |s| s.msgs.iter().any(|m| m.retain))
        .await;
    assert_eq!(
        s.metric("tandem_proxy_mqtt_retained_dropped_total{instance=\"orders\",replica=\"r1\"}"),
        1
    );

    // A live retained publication reaches one replica (RETAIN = 0 on shared subscriptions).
    publish(broker.addr, "state/orders", vec!["retained-2".into()], true).await;
    let live = |c: &Client| {
        payloads(c, "state/")
            .iter()
            .filter(|p| *p == "retained-2")
            .count()
    };
    let deadline = Instant::now() + WAIT;
    while live(&r0) + live(&r1) < 1 {
        assert!(Instant::now() < deadline, "live retained publication lost");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // r0 (the holder) restarts: r1 is now the longest connected and holds; r0's new session
    // gets the replay from the broker, and its proxy drops it.
    drop(r0);
    let r0 = Client::plain(
        V::V311,
        s.addr("orders", 0).await,
        "nodered",
        &["sync/r0", "state/#"],
    );
    r0.until("r0 SUBACKs again", |s| s.subacks == 2).await;
    sync("r0").await;
    r0.until("r0 marker again", |s| {
        s.msgs.iter().any(|m| m.topic == "sync/r0")
    })
    .await;
    assert_eq!(
        retained(&r0),
        0,
        "a restarted replica does not process it again"
    );
    assert!(payloads(&r0, "state/").is_empty(), "{:?}", r0.seen().msgs);
    assert_eq!(
        s.metric("tandem_proxy_mqtt_retained_dropped_total{instance=\"orders\",replica=\"r0\"}"),
        1
    );
}

// === Failures ===

#[tokio::test]
async fn mqtt_killed_replica_the_other_keeps_receiving() {
    let broker = Broker::start().await;
    let s = Setup::new(broker.addr, &[("orders", true, &["sync/#"], 2)]).await;
    let r0 = Client::start(
        s.addr("orders", 0).await,
        "nodered",
        &["jobs/#"],
        ClientOpts {
            v: V::V311,
            reconnect: false,
            stop_after: Some(200),
            login: None,
        },
    );
    let r1 = Client::plain(
        V::V311,
        s.addr("orders", 1).await,
        "nodered",
        &["sync/r1", "jobs/#"],
    );
    r0.until("r0 SUBACK", |s| s.subacks == 1).await;
    r1.until("r1 SUBACKs", |s| s.subacks == 2).await;

    const N: usize = 2000;
    publish(broker.addr, "jobs/new", seq("", N), false).await;
    publish(broker.addr, "sync/r1", vec!["x".into()], false).await;
    r1.until("r1 marker", |s| s.msgs.iter().any(|m| m.topic == "sync/r1"))
        .await;
    let (a, b) = (payloads(&r0, "jobs/"), payloads(&r1, "jobs/"));
    let all: HashSet<_> = a.iter().chain(&b).collect();
    assert_eq!(all.len(), a.len() + b.len(), "duplicates");
    let lost = N - all.len();
    println!(
        "r0 killed after {} messages; r1 got {}; lost {lost} of {N}",
        a.len(),
        b.len()
    );
    assert_eq!(a.len(), 200);
    assert!(b.len() > N / 2, "the survivor took over the stream");
    // Lost: what the broker had dealt to the dead replica and not yet had acknowledged (its
    // in-flight window of 20, plus its queue there: Mosquitto deals round-robin whatever a
    // member's queue, and a dead session's queue dies with it), plus what the client had
    // acknowledged but not handed on (rumqttc acknowledges a read batch of up to 10 at once).
    // Measured 17-70 here; the bound is 10 % of the stream.
    assert!(lost <= N / 10, "lost {lost}");
    assert_eq!(r1.seen().errors.len(), 0);
}

/// Reads until the proxy closes the connection (EOF or reset), within a bounded wait.
pub(crate) async fn closed(mut c: TcpStream) {
    let mut buf = [0u8; 1024];
    let r = timeout(WAIT, async {
        loop {
            match c.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(r.is_ok(), "connection not closed");
}

const CONNECT_V311: [u8; 16] = [
    0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 30, 0, 2, b'i', b'd',
];

#[tokio::test]
async fn mqtt_malformed_packets_close_only_that_connection() {
    let broker = Broker::start().await;
    let s = Setup::new(broker.addr, &[("orders", true, &[], 2)]).await;
    let good = Client::plain(V::V311, s.addr("orders", 0).await, "good", &["t/#"]);
    good.until("SUBACK", |s| s.subacks == 1).await;

    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", vec![0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 0x02]),
        ("reserved type 0", vec![0x00, 0x00]),
        ("oversized", vec![0x30, 0xff, 0xff, 0xff, 0x7f, 0, 1, b't']),
        (
            "bad protocol name",
            [&[0x10, 12, 0, 4][..], b"MQTX", &[4, 2, 0, 30, 0, 0]].concat(),
        ),
        ("truncated CONNECT", vec![0x10, 4, 0, 9, b'M', b'Q']),
        ("PINGREQ first", vec![0xc0, 0x00]),
        ("second CONNECT", [CONNECT_V311, CONNECT_V311].concat()),
        (
            "bad SUBSCRIBE",
            [&CONNECT_V311[..], &[0x82, 4, 0, 1, 0, 9]].concat(),
        ),
    ];
    for (what, bytes) in &bad {
        let mut c = TcpStream::connect(s.addr("orders", 1).await).await.unwrap();
        c.write_all(bytes).await.unwrap();
        if *what == "truncated CONNECT" {
            c.shutdown().await.unwrap();
        }
        println!("{what}");
        closed(c).await;
    }
    // The well-behaved connection was not touched.
    publish(broker.addr, "t/x", seq("", 10), false).await;
    good.until("10 messages", |s| s.msgs.len() == 10).await;
    assert!(good.seen().errors.is_empty());
    let m = |kind: &str| {
        s.metric(&format!(
            "tandem_proxy_mqtt_errors_total{{instance=\"orders\",replica=\"r1\",kind=\"{kind}\"}}"
        ))
    };
    assert_eq!(m("too_large"), 1);
    assert_eq!(m("protocol"), 2);
    assert_eq!(m("malformed"), 5);
}

#[tokio::test]
async fn mqtt_packet_limit_is_configurable() {
    let broker = Broker::start().await;
    let s = Setup::new(broker.addr, &[("orders", false, &[], 1)]).await;
    let mut c = MqttConfig::new(broker.addr.to_string());
    c.max_packet_bytes = 1024;
    s.mqtt.set_config(c).unwrap();
    let small = Client::plain(V::V311, s.addr("orders", 0).await, "small", &["big/#"]);
    small.until("SUBACK", |s| s.subacks == 1).await;
    publish(broker.addr, "big/ok", vec!["x".repeat(900)], false).await;
    small
        .until("the 900-byte message", |s| s.msgs.len() == 1)
        .await;
    publish(broker.addr, "big/no", vec!["x".repeat(2000)], false).await;
    small
        .until("the connection closed", |s| !s.errors.is_empty())
        .await;
    assert_eq!(
        s.metric(
            "tandem_proxy_mqtt_errors_total{instance=\"orders\",replica=\"r0\",kind=\"too_large\"}"
        ),
        1
    );
}

#[tokio::test]
async fn mqtt_broker_restart_closes_connections_and_reconnects_work() {
    let mut broker = Broker::start().await;
    let s = Setup::new(broker.addr, &[("orders", true, &[], 1)]).await;
    let addr = s.addr("orders", 0).await;
    let c = Client::start(
        addr,
        "nodered",
        &["t/#"],
        ClientOpts {
            v: V::V311,
            reconnect: true,
            stop_after: None,
            login: None,
        },
    );
    c.until("SUBACK", |s| s.subacks == 1).await;

    broker.kill().await;
    c.until("the connection closed", |s| !s.errors.is_empty())
        .await;
    // While the broker is down, a new connection is closed at once.
    let raw = TcpStream::connect(addr).await.unwrap();
    closed(raw).await;
    assert!(s.metric("tandem_proxy_mqtt_errors_total{instance=\"orders\",replica=\"r0\",kind=\"upstream_connect\"}") >= 1);

    broker.restart().await;
    c.until("reconnected and subscribed", |s| {
        s.connects >= 2 && s.subacks >= 2
    })
    .await;
    publish(broker.addr, "t/after", vec!["hello".into()], false).await;
    c.until("a message after the restart", |s| {
        s.msgs.iter().any(|m| m.payload == "hello")
    })
    .await;
}

// === Byte-exactness, with a recording upstream ===

/// A TCP upstream that records what it receives and answers with `reply` once it has
/// received `expect` bytes.
pub(crate) async fn recorder(expect: usize, reply: Vec<u8>) -> (SocketAddr, JoinHandle<Vec<u8>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut got = vec![0u8; expect];
        s.read_exact(&mut got).await.unwrap();
        s.write_all(&reply).await.unwrap();
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        let _ = timeout(Duration::from_secs(2), s.read_to_end(&mut rest)).await;
        got.extend(rest);
        got
    });
    (addr, task)
}

/// An MQTT 5 session as bytes: CONNECT (id "nodered"), SUBSCRIBE "a/#" with No Local, a
/// PUBLISH, PINGREQ, AUTH, DISCONNECT.
fn v5_session() -> Vec<u8> {
    [
        &[0x10, 20, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 30, 0][..],
        &[0, 7, b'n', b'o', b'd', b'e', b'r', b'e', b'd'],
        &[0x82, 9, 0, 1, 0, 0, 3, b'a', b'/', b'#', 0x05],
        &[0x30, 5, 0, 1, b'a', 0, b'x'],
        &[0xc0, 0],
        &[0xf0, 0],
        &[0xe0, 0],
    ]
    .concat()
}

/// What the broker sends back: CONNACK, SUBACK, a retained PUBLISH, DISCONNECT 0x8e.
pub(crate) fn v5_replies() -> Vec<u8> {
    [
        &[0x20, 3, 0, 0, 0][..],
        &[0x90, 4, 0, 1, 0, 1],
        &[0x31, 5, 0, 1, b'a', 0, b'r'],
        &[0xe0, 1, 0x8e],
    ]
    .concat()
}

pub(crate) async fn through(proxy_addr: SocketAddr, session: &[u8]) -> Vec<u8> {
    let mut c = TcpStream::connect(proxy_addr).await.unwrap();
    c.write_all(session).await.unwrap();
    let mut got = Vec::new();
    timeout(WAIT, c.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    got
}

#[tokio::test]
async fn mqtt_non_ha_instance_passes_every_byte_through() {
    let session = v5_session();
    let (up, rec) = recorder(session.len(), v5_replies()).await;
    let s = Setup::new(up, &[("plain", false, &["a/#"], 1)]).await;
    let back = through(s.addr("plain", 0).await, &session).await;
    assert_eq!(rec.await.unwrap(), session);
    assert_eq!(back, v5_replies());
    assert_eq!(s.metric("tandem_proxy_mqtt_packets_total{instance=\"plain\",replica=\"r0\",direction=\"to_broker\"}"), 6);
    assert_eq!(s.metric("tandem_proxy_mqtt_bytes_total{instance=\"plain\",replica=\"r0\",direction=\"to_client\"}"), v5_replies().len() as u64);
}

#[tokio::test]
async fn mqtt_ha_instance_rewrites_connect_and_subscribe_only() {
    let session = v5_session();
    let expected: Vec<u8> = [
        &[0x10, 23, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 30, 0][..],
        &[0, 10],
        b"nodered-r1",
        // $share/orders/a/# with No Local cleared
        &[0x82, 23, 0, 1, 0, 0, 17],
        b"$share/orders/a/#",
        &[0x01],
        // the rest as sent: DISCONNECT and AUTH never re-encoded
        &[0x30, 5, 0, 1, b'a', 0, b'x'],
        &[0xc0, 0],
        &[0xf0, 0],
        &[0xe0, 0],
    ]
    .concat();
    let (up, rec) = recorder(expected.len(), v5_replies()).await;
    let s = Setup::new(up, &[("orders", true, &[], 2)]).await;
    let back = through(s.addr("orders", 1).await, &session).await;
    assert_eq!(rec.await.unwrap(), expected);
    // r1 is the only connection of the instance, so the holder: the retained PUBLISH passes.
    assert_eq!(back, v5_replies());
}

// === The routes file ===

#[tokio::test]
async fn mqtt_listeners_follow_the_routes_file() {
    let broker = Broker::start().await;
    let dir = tempfile::Builder::new()
        .prefix("tandem-mqtt-routes-")
        .tempdir()
        .unwrap();
    let path = dir.path().join("routes.toml");
    let free =
        || std::net::SocketAddr::from(([127, 0, 0, 1], tandem_proxy::net::free_port().unwrap()));
    let (l0, l1) = (free(), free());
    let file = |listeners: &str| {
        format!(
            "[mqtt]\nupstream = \"{}\"\n\n[[instance]]\nname = \"orders\"\nhosts = [\"orders.localhost\"]\n\
             ha = true\nreplicas = [\"127.0.0.1:1\", \"127.0.0.1:2\"]\nmqtt_listeners = [{listeners}]\n",
            broker.addr
        )
    };
    std::fs::write(&path, file(&format!("\"{l0}\", \"{l1}\""))).unwrap();
    let routes = Routes::new();
    let stats = Arc::new(ProxyStats::default());
    let mqtt = MqttProxy::new(MqttConfig::new("127.0.0.1:1883"), stats).unwrap();
    tandem_proxy::routes::file::load_with_mqtt(&path, &routes, &mqtt, None)
        .await
        .unwrap();
    assert_eq!(
        mqtt.listeners().await,
        [("orders".to_string(), 0, l0), ("orders".to_string(), 1, l1)]
    );
    let c = Client::plain(V::V311, l0, "nodered", &["t"]);
    c.until("SUBACK through the file's listener", |s| s.subacks == 1)
        .await;

    // One listener for two replicas: refused whole, the listeners stay.
    std::fs::write(&path, file(&format!("\"{l0}\""))).unwrap();
    let err = tandem_proxy::routes::file::load_with_mqtt(&path, &routes, &mqtt, None)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("2 replicas but 1 mqtt_listeners"), "{err}");
    assert_eq!(mqtt.listeners().await.len(), 2);

    // Without mqtt_listeners the listeners close, and their connections with them.
    std::fs::write(
        &path,
        "[[instance]]\nname = \"orders\"\nhosts = [\"orders.localhost\"]\nreplicas = [\"127.0.0.1:1\"]\n",
    )
    .unwrap();
    tandem_proxy::routes::file::load_with_mqtt(&path, &routes, &mqtt, None)
        .await
        .unwrap();
    assert!(mqtt.listeners().await.is_empty());
    c.until("the connection closed", |s| !s.errors.is_empty())
        .await;
    assert!(TcpStream::connect(l0).await.is_err());
}

// === TLS to the broker ===

/// A CA and a broker certificate for 127.0.0.1, made with the openssl command.
fn certificates(dir: &std::path::Path) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=tandem test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "broker.key",
        "-out",
        "broker.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "broker.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "broker.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    // Mosquitto may read them as its own user.
    for f in ["ca.pem", "broker.pem", "broker.key"] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
}

#[tokio::test]
async fn mqtt_tls_to_the_broker_checks_its_certificate() {
    use tandem_proxy::mqtt::tls::UpstreamTls;
    let temp = tempfile::Builder::new()
        .prefix("tandem-mqtt-tls-")
        .tempdir()
        .unwrap();
    let dir = temp.path();
    // Mosquitto may read the certificates as its own user: open the directory (0700 as made).
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    certificates(dir);
    let port = tandem_proxy::net::free_port().unwrap();
    std::fs::write(
        dir.join("mosquitto.conf"),
        format!(
            "listener {port} 127.0.0.1\ncafile {d}/ca.pem\ncertfile {d}/broker.pem\nkeyfile {d}/broker.key\nallow_anonymous true\npersistence false\nlog_dest stderr\n",
            d = dir.display()
        ),
    )
    .unwrap();
    let _broker = Command::new(mosquitto_bin())
        .arg("-c")
        .arg(dir.join("mosquitto.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let upstream = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + WAIT;
    while TcpStream::connect(upstream).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "mosquitto with TLS did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let proxy_with = |tls: UpstreamTls| async move {
        let stats = Arc::new(ProxyStats::default());
        let mut config = MqttConfig::new(upstream.to_string());
        config.tls = Some(tls);
        let mqtt = MqttProxy::new(config, stats.clone()).unwrap();
        let replicas = (0..2)
            .map(|slot| MqttReplica {
                slot,
                listen: Some("127.0.0.1:0".parse().unwrap()),
                token_sha256: None,
            })
            .collect();
        mqtt.set_instances(&[MqttInstance {
            name: "orders".into(),
            ha: true,
            exclude: vec![],
            replicas,
        }])
        .await
        .unwrap();
        (mqtt, stats)
    };

    // Trusting the CA that signed the broker's certificate: replicas speak plain MQTT to the
    // proxy, the proxy TLS to the broker.
    let (mqtt, _) = proxy_with(UpstreamTls::new(Some(dir.join("ca.pem"))).unwrap()).await;
    let r0 = Client::plain(
        V::V311,
        mqtt.listener("orders", 0).await.unwrap(),
        "nodered",
        &["jobs/#"],
    );
    r0.until("r0 SUBACK over TLS", |s| s.subacks == 1).await;
    publish(
        mqtt.listener("orders", 1).await.unwrap(),
        "jobs/new",
        seq("", 20),
        false,
    )
    .await;
    r0.until("20 messages over TLS", |s| s.msgs.len() == 20)
        .await;

    // Trusting only Mozilla's roots: the broker's certificate is refused and the replica's
    // connection closed; nothing goes to the broker in plain text.
    let (strict, stats) = proxy_with(UpstreamTls::new(None).unwrap()).await;
    let c = TcpStream::connect(strict.listener("orders", 0).await.unwrap())
        .await
        .unwrap();
    closed(c).await;
    let text = render(&Routes::new().snapshot(), &stats);
    assert!(
        metric(&text, "tandem_proxy_mqtt_errors_total{instance=\"orders\",replica=\"r0\",kind=\"upstream_connect\"}") == Some(1.0),
        "{text}"
    );

    // A CA file that is not PEM is a clear error.
    std::fs::write(dir.join("bad.pem"), "not a certificate").unwrap();
    let err = UpstreamTls::new(Some(dir.join("bad.pem"))).unwrap_err();
    assert!(err.contains("bad.pem"), "{err}");
}
