//! Cookie affinity of HA instances (issue 12): on by default in balanced mode, settable, not for
//! standby mode, and handed to the coordinator.

use serde_json::json;
use tandem_controlplane::desired::desired_instances;

use super::support::{both_backends, Backend, Server};

both_backends!(affinity_is_on_by_default_in_balanced_mode_and_can_be_turned_off);

async fn affinity_is_on_by_default_in_balanced_mode_and_can_be_turned_off(b: Backend) {
    let s = Server::start(b).await;
    let owner = s.user("owner").await;
    let team = s.team(&owner.auth).await;
    let app = s.application(&owner.auth, &team).await;
    let inst = s
        .instance(&owner.auth, &app, json!({ "ha": { "replicas": 2 } }))
        .await;
    let id = inst["id"].as_str().unwrap().to_string();
    assert_eq!(
        inst["ha"],
        json!({ "replicas": 2, "mode": "balanced", "affinity": true })
    );
    let ha = format!("/api/v1/instances/{id}/ha");
    let affinity = |s: &Server| {
        let s = s.state.clone();
        let id = id.clone();
        async move {
            let (desired, _) = desired_instances(&s).await.unwrap();
            desired.iter().find(|d| d.id == id).unwrap().affinity
        }
    };
    assert!(affinity(&s).await);

    let r = s
        .put(
            &ha,
            &owner.auth,
            json!({ "replicas": 3, "affinity": false }),
        )
        .await;
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(s.get(&ha, &owner.auth).await.json["affinity"], false);
    assert!(!affinity(&s).await);
    // Omitted again: the default.
    s.put(&ha, &owner.auth, json!({ "replicas": 3 })).await;
    assert_eq!(s.get(&ha, &owner.auth).await.json["affinity"], true);

    // Standby mode serves from one replica: no affinity to turn on, none shown.
    let r = s
        .put(
            &ha,
            &owner.auth,
            json!({ "replicas": 2, "mode": "standby", "affinity": true }),
        )
        .await;
    assert_eq!(r.status, 422, "{r}");
    assert_eq!(r.json["error"]["field"], "affinity");
    let r = s
        .put(
            &ha,
            &owner.auth,
            json!({ "replicas": 2, "mode": "standby" }),
        )
        .await;
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(
        s.get(&ha, &owner.auth).await.json,
        json!({ "replicas": 2, "mode": "standby" })
    );
    assert!(!affinity(&s).await);
}
