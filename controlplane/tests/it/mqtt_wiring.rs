//! How replicas reach the MQTT proxy. Issue 9, finding 4: one instance's bad
//! `TANDEM_MQTT_EXCLUDE` (stored before the API checked it) must not stop the MQTT listeners of
//! every other instance. Issue 15: with the standalone proxies' shared listener, each replica
//! gets a URL with its own token, and the feed carries only the tokens' hashes.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::json;
use tandem_controlplane::mqtt_wiring::{MqttMode, MqttWiring};
use tandem_controlplane::route_feed::RouteFeed;
use tandem_controlplane::secrets::PlatformKey;
use tandem_coordinator::spec::{DesiredState, Flows, InstanceDesired, ProcessSpec};

fn desired(name: &str, env: &[(&str, &str)]) -> InstanceDesired {
    InstanceDesired {
        id: format!("id-{name}"),
        hosts: vec![format!("{name}.localhost")],
        state: DesiredState::Running,
        replicas: 2,
        standby: false,
        affinity: false,
        http_auth: Default::default(),
        certificate: None,
        asleep: false,
        process: ProcessSpec {
            instance: name.into(),
            nodered_version: "4.1.2".into(),
            node_version: None,
            memory_mb: 256,
            ha: true,
            admin_secret: "a".into(),
            credential_secret: "c".into(),
            settings: json!({}),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            start_stopped: false,
            storage: None,
            modules: BTreeMap::new(),
        },
        flows: Flows::new(json!([])),
        mqtt_urls: BTreeMap::new(),
        probe: None,
    }
}

#[tokio::test]
async fn a_bad_exclusion_of_one_instance_leaves_every_other_listener_working() {
    let dir = tempfile::Builder::new()
        .prefix("tandem-it-mqtt-wiring-")
        .tempdir()
        .unwrap();
    let mut wiring = MqttWiring::new(
        MqttMode::Listeners,
        Some(tandem_proxy::MqttConfig::new("127.0.0.1:1")),
        Arc::new(tandem_proxy::ProxyStats::default()),
        PlatformKey::from_bytes([7; 32]),
        dir.path(),
    )
    .unwrap();
    let mut list = vec![
        desired("broken", &[("TANDEM_MQTT_EXCLUDE", "a#")]),
        desired("healthy", &[("TANDEM_MQTT_EXCLUDE", "replies/#")]),
    ];
    wiring.apply(&mut list).await;
    // Then another team's new instance arrives: its listeners are bound too.
    list.push(desired("newcomer", &[]));
    wiring.apply(&mut list).await;
    // Each replica's URL is the listener kept for its own slot (`<name>/<slot>` in the ports
    // file), whatever other slots got.
    let ports: BTreeMap<String, u16> =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("mqtt-ports.json")).unwrap())
            .unwrap();
    for d in &list {
        let name = &d.process.instance;
        assert_eq!(
            d.mqtt_urls.keys().copied().collect::<Vec<_>>(),
            [0, 1],
            "{name}"
        );
        for (slot, url) in &d.mqtt_urls {
            assert_eq!(
                *url,
                format!("mqtt://127.0.0.1:{}", ports[&format!("{name}/{slot}")])
            );
            assert_eq!(
                d.process_for(*slot).env.get("TANDEM_MQTT_URL"),
                Some(url),
                "{name} r{slot}"
            );
            let addr = url.strip_prefix("mqtt://").unwrap();
            tokio::net::TcpStream::connect(addr)
                .await
                .unwrap_or_else(|e| panic!("{name} {url}: {e}"));
        }
    }
    wiring.shutdown().await;
}

#[tokio::test]
async fn through_the_proxies_each_replica_logs_in_with_its_own_token_and_the_feed_has_only_hashes()
{
    let dir = tempfile::tempdir().unwrap();
    let feed = Arc::new(RouteFeed::new());
    let wiring = |key: u8| {
        MqttWiring::new(
            MqttMode::Feed {
                address: "tandem-proxy:1883".into(),
                feed: feed.clone(),
            },
            None,
            Arc::new(tandem_proxy::ProxyStats::default()),
            PlatformKey::from_bytes([key; 32]),
            dir.path(),
        )
        .unwrap()
    };
    let mut stopped = desired("resting", &[]);
    stopped.state = DesiredState::Stopped;
    let mut list = vec![
        desired("orders", &[("TANDEM_MQTT_EXCLUDE", "replies/#")]),
        stopped,
    ];
    let before = feed.generation();
    wiring(7).apply(&mut list).await;
    let table = feed.subscribe().borrow().clone();
    assert!(table.generation > before, "no new table for the proxies");
    // The running instance only, with each replica's hash and its exclusions.
    assert_eq!(table.mqtt.len(), 1, "{:?}", table.mqtt);
    let m = &table.mqtt[0];
    assert_eq!((m.name.as_str(), m.ha), ("orders", true));
    assert_eq!(m.exclude, ["replies/#"]);
    let text = serde_json::to_string(&*table).unwrap();
    let mut tokens = Vec::new();
    for slot in 0..2u32 {
        let url = &list[0].mqtt_urls[&slot];
        let rest = url.strip_prefix("mqtt://orders-r").unwrap();
        let (user_slot, rest) = rest.split_once(':').unwrap();
        assert_eq!(user_slot, slot.to_string());
        let (token, address) = rest.split_once('@').unwrap();
        assert_eq!(address, "tandem-proxy:1883");
        assert_eq!(token.len(), 64);
        assert_eq!(
            m.replicas[slot as usize].token_sha256,
            tandem_proxy::mqtt::token_sha256(token.as_bytes())
        );
        assert!(!text.contains(token), "a token in the route feed");
        tokens.push(token.to_string());
    }
    assert_ne!(tokens[0], tokens[1], "two replicas share a token");
    // A restarted Tandem (same key) gives the same URLs: adopted replicas keep theirs. Another
    // platform key gives others.
    let mut again = vec![desired("orders", &[("TANDEM_MQTT_EXCLUDE", "replies/#")])];
    wiring(7).apply(&mut again).await;
    assert_eq!(again[0].mqtt_urls, list[0].mqtt_urls);
    let mut other = vec![desired("orders", &[])];
    wiring(8).apply(&mut other).await;
    assert_ne!(other[0].mqtt_urls, list[0].mqtt_urls);
}
