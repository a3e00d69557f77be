//! Issue 9, finding 4: one instance's bad `TANDEM_MQTT_EXCLUDE` (stored before the API checked
//! it) must not stop the MQTT listeners of every other instance.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::json;
use tandem_controlplane::mqtt_wiring::MqttWiring;
use tandem_coordinator::spec::{DesiredState, Flows, InstanceDesired, ProcessSpec};

fn desired(name: &str, env: &[(&str, &str)]) -> InstanceDesired {
    InstanceDesired {
        id: format!("id-{name}"),
        hosts: vec![format!("{name}.localhost")],
        state: DesiredState::Running,
        replicas: 2,
        standby: false,
        affinity: false,
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
        dir.path(),
        tandem_proxy::MqttConfig::new("127.0.0.1:1"),
        Arc::new(tandem_proxy::ProxyStats::default()),
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
