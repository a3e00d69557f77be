//! Issue 9, finding 4: one instance's bad `TANDEM_MQTT_EXCLUDE` (stored before the API checked
//! it) must not stop the MQTT listeners of every other instance.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::json;
use tandem_controlplane::reconcile::MqttWiring;
use tandem_coordinator::driver::ReplicaSpec;
use tandem_coordinator::reconcile::{DesiredState, InstanceDesired};

fn desired(name: &str, env: &[(&str, &str)]) -> InstanceDesired {
    InstanceDesired {
        id: format!("id-{name}"),
        hosts: vec![format!("{name}.localhost")],
        state: DesiredState::Running,
        replicas: 2,
        standby: false,
        replica: ReplicaSpec {
            instance: name.into(),
            slot: 0,
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
            flows: json!([]),
            start_stopped: false,
        },
        mqtt_urls: Vec::new(),
    }
}

#[tokio::test]
async fn a_bad_exclusion_of_one_instance_leaves_every_other_listener_working() {
    let dir = std::env::temp_dir().join(format!("tandem-it-mqtt-wiring-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut wiring = MqttWiring::new(
        &dir,
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
    for d in &list {
        assert_eq!(d.mqtt_urls.len(), 2, "{}", d.replica.instance);
        for url in &d.mqtt_urls {
            let addr = url.strip_prefix("mqtt://").unwrap();
            tokio::net::TcpStream::connect(addr)
                .await
                .unwrap_or_else(|e| panic!("{} {url}: {e}", d.replica.instance));
        }
    }
    wiring.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
