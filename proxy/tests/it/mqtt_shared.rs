//! The MQTT proxy's shared listener with a real Mosquitto and real MQTT clients: replicas name
//! themselves with `<instance>-r<slot>` and their token, on one port. Raw sockets check the
//! refusals byte for byte, and a recording upstream what reaches the broker.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tandem_proxy::metrics::render;
use tandem_proxy::mqtt::frame::put_remaining_length;
use tandem_proxy::mqtt::{
    token_sha256, MqttConfig, MqttError, MqttInstance, MqttProxy, MqttReplica,
};
use tandem_proxy::{ProxyStats, Routes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

use crate::mqtt::{
    closed, metric, payloads, publish, recorder, seq, through, v5_replies, Broker, Client,
    ClientOpts, V, WAIT,
};

/// One replica as the tests list it: slot, token, and whether it has its own listener too.
type R<'a> = (usize, Option<&'a str>, bool);

struct Shared {
    mqtt: MqttProxy,
    stats: Arc<ProxyStats>,
    addr: SocketAddr,
}

fn replicas(list: &[R]) -> Vec<MqttReplica> {
    list.iter()
        .map(|(slot, token, own)| MqttReplica {
            slot: *slot,
            listen: own.then(|| "127.0.0.1:0".parse().unwrap()),
            token_sha256: token.map(|t| token_sha256(t.as_bytes())),
        })
        .collect()
}

impl Shared {
    /// A proxy with a shared listener on a free port and one instance per (name, ha, replicas).
    async fn new(upstream: SocketAddr, instances: &[(&str, bool, &[R<'_>])]) -> Self {
        let stats = Arc::new(ProxyStats::default());
        let mut config = MqttConfig::new(upstream.to_string());
        config.shared_listen = Some("127.0.0.1:0".parse().unwrap());
        config.login_timeout = Duration::from_millis(300);
        let mqtt = MqttProxy::new(config, stats.clone()).unwrap();
        let list: Vec<_> = instances
            .iter()
            .map(|(name, ha, list)| MqttInstance {
                name: name.to_string(),
                ha: *ha,
                exclude: vec![],
                replicas: replicas(list),
            })
            .collect();
        mqtt.set_instances(&list).await.unwrap();
        let addr = mqtt.shared_listener().await.unwrap();
        Self { mqtt, stats, addr }
    }

    fn metric(&self, series: &str) -> u64 {
        let text = render(&Routes::new().snapshot(), &self.stats);
        metric(&text, series).unwrap_or_else(|| panic!("no series {series} in\n{text}")) as u64
    }

    fn errors(&self, instance: &str, replica: &str, kind: &str) -> u64 {
        self.metric(&format!(
            "tandem_proxy_mqtt_errors_total{{instance=\"{instance}\",replica=\"{replica}\",kind=\"{kind}\"}}"
        ))
    }
}

/// A real client (rumqttc) logging in as `user` with `pass`, subscribing to `filters`.
fn logged_in(v: V, addr: SocketAddr, id: &str, filters: &[&str], user: &str, pass: &str) -> Client {
    Client::start(
        addr,
        id,
        filters,
        ClientOpts {
            v,
            reconnect: false,
            stop_after: None,
            login: Some((user.into(), pass.into())),
        },
    )
}

/// A packet with a right fixed header around `body`.
fn packet(byte1: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![byte1];
    put_remaining_length(&mut out, body.len());
    out.extend_from_slice(body);
    out
}

fn string(s: &[u8]) -> Vec<u8> {
    [&u16::try_from(s.len()).unwrap().to_be_bytes()[..], s].concat()
}

/// A CONNECT of MQTT 3.1.1 (`v5` false) or 5, client id `id`, with the given credentials.
fn connect(v5: bool, id: &str, user: Option<&str>, pass: Option<&str>) -> Vec<u8> {
    let mut flags = 0x02;
    let mut body = [&string(b"MQTT")[..], &[if v5 { 5 } else { 4 }]].concat();
    let mut tail = Vec::new();
    if let Some(u) = user {
        flags |= 0x80;
        tail.extend(string(u.as_bytes()));
    }
    if let Some(p) = pass {
        flags |= 0x40;
        tail.extend(string(p.as_bytes()));
    }
    body.extend([flags, 0, 30]);
    if v5 {
        body.push(0);
    }
    body.extend(string(id.as_bytes()));
    body.extend(tail);
    packet(0x10, &body)
}

/// Sends `bytes` and returns everything the proxy answers until it closes the connection.
async fn answer(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(bytes).await.unwrap();
    let mut got = Vec::new();
    timeout(WAIT, c.read_to_end(&mut got))
        .await
        .expect("the proxy closes a refused connection")
        .unwrap();
    got
}

// === Sharing through one port ===

#[tokio::test]
async fn mqtt_shared_listener_replicas_log_in_with_their_tokens_and_share() {
    let broker = Broker::start().await;
    let s = Shared::new(
        broker.addr,
        &[(
            "orders",
            true,
            &[(0, Some("tok-0"), false), (1, Some("tok-1"), false)],
        )],
    )
    .await;
    assert!(
        s.mqtt.listeners().await.is_empty(),
        "no listener of their own"
    );
    // Both replicas run the same flows: same client id, same filter; each its own token.
    let r0 = logged_in(
        V::V311,
        s.addr,
        "nodered",
        &["jobs/#"],
        "orders-r0",
        "tok-0",
    );
    let r1 = logged_in(V::V5, s.addr, "nodered", &["jobs/#"], "orders-r1", "tok-1");
    r0.until("r0 SUBACK", |s| s.subacks == 1).await;
    r1.until("r1 SUBACK", |s| s.subacks == 1).await;

    const N: usize = 200;
    publish(broker.addr, "jobs/new", seq("", N), false).await;
    let deadline = Instant::now() + WAIT;
    while r0.count("jobs/") + r1.count("jobs/") < N && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (a, b) = (payloads(&r0, "jobs/"), payloads(&r1, "jobs/"));
    println!("r0 got {}, r1 got {} of {N}", a.len(), b.len());
    let all: HashSet<_> = a.iter().chain(&b).collect();
    assert_eq!(
        all.len(),
        a.len() + b.len(),
        "a message reached both replicas"
    );
    assert_eq!(all.len(), N, "lost {}", N - all.len());
    // Mosquitto deals a shared group strictly round-robin.
    assert!(a.len().abs_diff(b.len()) <= 1, "{} / {}", a.len(), b.len());
    for r in [&r0, &r1] {
        assert_eq!(r.seen().errors, Vec::<String>::new());
    }

    let log = broker.log();
    assert!(
        log.contains(" as nodered-r0 ") && log.contains(" as nodered-r1 "),
        "{log}"
    );
    assert!(!log.contains("already connected"), "{log}");
    assert!(log.contains("$share/orders/jobs/#"), "{log}");
    // Mosquitto logs a username as u'<name>': the broker got none.
    assert!(!log.contains("u'") && !log.contains("orders-r0"), "{log}");

    // Counted as the replicas' own connections.
    for r in ["r0", "r1"] {
        let l = format!("instance=\"orders\",replica=\"{r}\"");
        assert_eq!(
            s.metric(&format!("tandem_proxy_mqtt_connections{{{l}}}")),
            1
        );
        assert_eq!(
            s.metric(&format!(
                "tandem_proxy_mqtt_rewrites_total{{{l},kind=\"client_id\"}}"
            )),
            1
        );
        assert_eq!(s.errors("orders", r, "protocol"), 0);
    }
    assert_eq!(s.mqtt.shared_rejected(), 0);
}

// === Refusals ===

#[tokio::test]
async fn mqtt_shared_listener_refuses_bad_credentials_before_the_broker() {
    let broker = Broker::start().await;
    let s = Shared::new(
        broker.addr,
        &[
            (
                "orders",
                true,
                &[(0, Some("tok-0"), false), (1, None, true)],
            ),
            ("plain", false, &[(0, Some("tok-p"), false)]),
        ],
    )
    .await;
    // Broker::start's readiness probe connects and closes: once the broker has logged that,
    // count from there.
    let deadline = Instant::now() + WAIT;
    while !broker.log().contains("closed its connection") {
        assert!(Instant::now() < deadline, "{}", broker.log());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let connections = || broker.log().matches("New connection").count();
    let before = connections();
    const V311: [u8; 4] = [0x20, 2, 0, 5];
    const V5: [u8; 5] = [0x20, 3, 0, 0x87, 0];
    let cases: [(&str, Vec<u8>, &[u8]); 6] = [
        (
            "wrong password",
            connect(false, "intruder-1", Some("orders-r0"), Some("nope")),
            &V311,
        ),
        (
            "wrong password, MQTT 5",
            connect(true, "intruder-2", Some("orders-r0"), Some("tok-p")),
            &V5,
        ),
        (
            "no username",
            connect(false, "intruder-3", None, None),
            &V311,
        ),
        (
            "unknown replica",
            connect(true, "intruder-4", Some("orders-r9"), Some("tok-0")),
            &V5,
        ),
        (
            "replica without a token",
            connect(false, "intruder-5", Some("orders-r1"), Some("tok-0")),
            &V311,
        ),
        (
            "username without a password",
            connect(false, "intruder-6", Some("plain-r0"), None),
            &V311,
        ),
    ];
    for (what, bytes, expected) in &cases {
        assert_eq!(&answer(s.addr, bytes).await[..], *expected, "{what}");
    }
    // A real client sees "not authorized".
    let c = logged_in(V::V311, s.addr, "intruder-7", &["t"], "orders-r0", "guess");
    c.until("refused", |s| !s.errors.is_empty()).await;
    assert!(
        c.seen().errors[0].contains("NotAuthorized"),
        "{:?}",
        c.seen().errors
    );
    assert_eq!(c.seen().connects, 0);
    // A client that says nothing is closed at the login timeout, unanswered.
    let silent = TcpStream::connect(s.addr).await.unwrap();
    closed(silent).await;

    // None of them reached the broker: not even a TCP connection.
    let log = broker.log();
    assert_eq!(connections(), before, "{log}");
    assert!(!log.contains("intruder"), "{log}");
    // Counted: every one in the shared listener's count; those that name a listed replica
    // also in that replica's errors.
    assert_eq!(s.mqtt.shared_rejected(), 8);
    assert_eq!(s.metric("tandem_proxy_mqtt_shared_rejected_total"), 8);
    assert_eq!(s.errors("orders", "r0", "protocol"), 3);
    assert_eq!(s.errors("orders", "r1", "protocol"), 1);
    assert_eq!(s.errors("plain", "r0", "protocol"), 1);
    assert_eq!(
        s.metric("tandem_proxy_mqtt_connections_total{instance=\"orders\",replica=\"r0\"}"),
        0
    );

    // The listener is unharmed: the right token gets in.
    let good = logged_in(V::V311, s.addr, "nodered", &["t"], "orders-r0", "tok-0");
    good.until("SUBACK", |s| s.subacks == 1).await;
    // And r1, which has no token, still has its own listener.
    let own = s.mqtt.listener("orders", 1).await.unwrap();
    let r1 = Client::plain(V::V311, own, "nodered", &["t"]);
    r1.until("r1 SUBACK on its own listener", |s| s.subacks == 1)
        .await;
}

// === What the broker gets ===

#[tokio::test]
async fn mqtt_shared_listener_removes_only_the_credentials() {
    // Non-HA: every byte as sent but username and password. A v5 CONNECT with properties and
    // a will with properties: flags ce (username, password, will QoS 1, will, clean start).
    let head = |flags: u8| {
        [
            &string(b"MQTT")[..],
            &[5, flags, 0, 30],
            &[5, 0x11, 0, 0, 0, 120], // session expiry 120 s
            &string(b"nodered"),
            &[5, 0x18, 0, 0, 0, 5], // will delay 5 s
            &string(b"status/plain"),
            &string(b"bye"),
        ]
        .concat()
    };
    let creds = [&string(b"plain-r0")[..], &string(b"tok-p")].concat();
    let connect_sent = packet(0x10, &[&head(0xce)[..], &creds].concat());
    let connect_upstream = packet(0x10, &head(0x0e));
    let rest: Vec<u8> = [
        &[0x82, 9, 0, 1, 0, 0, 3, b'a', b'/', b'#', 0x05][..],
        &[0x30, 5, 0, 1, b'a', 0, b'x'],
        &[0xc0, 0],
        &[0xf0, 0],
        &[0xe0, 0],
    ]
    .concat();
    let sent = [&connect_sent[..], &rest].concat();
    let expected = [&connect_upstream[..], &rest].concat();
    let (up, rec) = recorder(expected.len(), v5_replies()).await;
    let s = Shared::new(up, &[("plain", false, &[(0, Some("tok-p"), false)])]).await;
    let back = through(s.addr, &sent).await;
    assert_eq!(rec.await.unwrap(), expected);
    assert_eq!(back, v5_replies(), "the broker's answers pass as sent");
    assert_eq!(
        s.metric("tandem_proxy_mqtt_packets_total{instance=\"plain\",replica=\"r0\",direction=\"to_broker\"}"),
        6
    );

    // HA: the same, plus the client-id suffix and the shared filter, as on r1's own listener.
    let sent = [
        &connect(true, "nodered", Some("orders-r1"), Some("tok-1"))[..],
        &[0x82, 9, 0, 1, 0, 0, 3, b'a', b'/', b'#', 0x05],
    ]
    .concat();
    let expected: Vec<u8> = [
        &connect(true, "nodered-r1", None, None)[..],
        &[0x82, 23, 0, 1, 0, 0, 17],
        b"$share/orders/a/#",
        &[0x01],
    ]
    .concat();
    let (up, rec) = recorder(expected.len(), v5_replies()).await;
    let s = Shared::new(up, &[("orders", true, &[(1, Some("tok-1"), false)])]).await;
    through(s.addr, &sent).await;
    assert_eq!(rec.await.unwrap(), expected);
}

// === Changes ===

#[tokio::test]
async fn mqtt_shared_listener_follows_tokens_and_settings() {
    let broker = Broker::start().await;
    let s = Shared::new(
        broker.addr,
        &[(
            "orders",
            true,
            &[(0, Some("tok-0"), false), (1, Some("tok-1"), true)],
        )],
    )
    .await;
    let r0 = logged_in(V::V311, s.addr, "nodered", &["t"], "orders-r0", "tok-0");
    let r1 = logged_in(V::V5, s.addr, "nodered", &["t"], "orders-r1", "tok-1");
    let r1_own = Client::plain(
        V::V311,
        s.mqtt.listener("orders", 1).await.unwrap(),
        "other",
        &["t"],
    );
    for c in [&r0, &r1, &r1_own] {
        c.until("SUBACK", |s| s.subacks == 1).await;
    }
    assert_eq!(
        s.metric("tandem_proxy_mqtt_connections{instance=\"orders\",replica=\"r1\"}"),
        2
    );

    // r0's token changes: its connection made with the old one closes; r1's stay.
    let list = |t0: &str| {
        [MqttInstance {
            name: "orders".into(),
            ha: true,
            exclude: vec![],
            replicas: replicas(&[(0, Some(t0), false), (1, Some("tok-1"), true)]),
        }]
    };
    s.mqtt.set_instances(&list("tok-0b")).await.unwrap();
    r0.until("r0 closed", |s| !s.errors.is_empty()).await;
    assert_eq!(
        answer(
            s.addr,
            &connect(false, "x", Some("orders-r0"), Some("tok-0"))
        )
        .await,
        [0x20, 2, 0, 5],
        "the old token is refused"
    );
    let r0 = logged_in(V::V311, s.addr, "nodered", &["t"], "orders-r0", "tok-0b");
    r0.until("r0 SUBACK with the new token", |s| s.subacks == 1)
        .await;
    assert!(r1.seen().errors.is_empty(), "{:?}", r1.seen().errors);
    assert!(
        r1_own.seen().errors.is_empty(),
        "{:?}",
        r1_own.seen().errors
    );
    assert_eq!(
        s.metric("tandem_proxy_mqtt_connections{instance=\"orders\",replica=\"r1\"}"),
        2
    );

    // The shared listener closes when the settings drop it, at the next set_instances, with
    // its connections; r1's own listener stays.
    let mut config = s.mqtt.config().as_ref().clone();
    config.shared_listen = None;
    s.mqtt.set_config(config).unwrap();
    s.mqtt.set_instances(&list("tok-0b")).await.unwrap();
    assert_eq!(s.mqtt.shared_listener().await, None);
    r1.until("r1 closed with the shared listener", |s| {
        !s.errors.is_empty()
    })
    .await;
    assert!(TcpStream::connect(s.addr).await.is_err());
    assert!(r1_own.seen().errors.is_empty());

    // shutdown closes everything.
    s.mqtt.shutdown().await;
    r1_own
        .until("r1's own connection closed", |s| !s.errors.is_empty())
        .await;
}

#[tokio::test]
async fn mqtt_shared_listener_settings_are_checked() {
    let stats = Arc::new(ProxyStats::default());
    let port = tandem_proxy::net::free_port().unwrap();
    let shared: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut config = MqttConfig::new("127.0.0.1:1883");
    config.shared_listen = Some(shared);
    let mqtt = MqttProxy::new(config, stats).unwrap();
    let one = |r: MqttReplica| {
        [MqttInstance {
            name: "orders".into(),
            ha: true,
            exclude: vec![],
            replicas: vec![r],
        }]
    };
    let err = mqtt
        .set_instances(&one(MqttReplica {
            slot: 0,
            listen: Some(shared),
            token_sha256: None,
        }))
        .await
        .unwrap_err();
    assert!(matches!(err, MqttError::DuplicateListener { .. }), "{err}");
    let err = mqtt
        .set_instances(&one(MqttReplica {
            slot: 0,
            listen: None,
            token_sha256: Some("not a hash".into()),
        }))
        .await
        .unwrap_err();
    assert!(matches!(err, MqttError::InvalidTokenHash { .. }), "{err}");
    let err = mqtt
        .set_instances(&one(MqttReplica {
            slot: 0,
            listen: None,
            token_sha256: None,
        }))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("neither a listener nor a token"),
        "{err}"
    );
    // Refused whole: nothing bound.
    assert_eq!(mqtt.shared_listener().await, None);
    mqtt.set_instances(&one(MqttReplica {
        slot: 0,
        listen: None,
        token_sha256: Some(token_sha256(b"t").to_uppercase()),
    }))
    .await
    .unwrap();
    assert_eq!(mqtt.shared_listener().await, Some(shared));
    let mut zero = MqttConfig::new("127.0.0.1:1883");
    zero.login_timeout = Duration::ZERO;
    assert!(matches!(
        mqtt.set_config(zero),
        Err(MqttError::InvalidLoginTimeout)
    ));
}
