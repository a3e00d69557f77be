//! The objects the driver builds, validated against the Kubernetes schemas of the oldest release
//! the validator carries (1.34; the driver's types are those of 1.33) and of the current one
//! (1.37), strictly (an unknown field fails), by `kubernetes-validate` from PyPI (`.ci/run`
//! installs it), offline.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeMap;
use std::process::Command;

use serde_json::json;
use tandem_coordinator::local::NpmOptions;
use tandem_coordinator::replica::ReplicaId;
use tandem_coordinator::spec::{ProcessSpec, Storage};
use tandem_kube::objects;

#[test]
fn the_drivers_objects_are_valid_kubernetes_objects() {
    let spec = ProcessSpec {
        instance: "orders".into(),
        nodered_version: "4.1.2".into(),
        node_version: None,
        memory_mb: 256,
        ha: true,
        start_stopped: true,
        admin_secret: "a".into(),
        credential_secret: "c".into(),
        settings: json!({ "httpNodeCors": { "origin": "*" } }),
        env: BTreeMap::from([("GREETING".into(), "hello".into())]),
        modules: BTreeMap::from([("node-red-contrib-random".into(), "1.0.0".into())]),
        storage: Some(Storage {
            url: "http://tandem-api.tandem.svc:3000/api/v1/storage/i1".into(),
            token: "t".into(),
        }),
    };
    let id = ReplicaId::new("orders", 1);
    let npm = NpmOptions {
        registry: Some("https://registry.npmjs.org/".into()),
        ..NpmOptions::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let files = [
        (
            "pod.json",
            serde_json::to_string(&objects::pod(
                &spec,
                &id,
                "nodered/node-red",
                &npm,
                "h",
                "r",
            ))
            .unwrap(),
        ),
        (
            "configmap.json",
            serde_json::to_string(&objects::config_map(&spec, &id, &npm)).unwrap(),
        ),
        (
            "secret.json",
            serde_json::to_string(&objects::secret(&spec, &id)).unwrap(),
        ),
    ];
    let mut paths = Vec::new();
    for (name, text) in files {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        paths.push(path);
    }
    for version in ["1.34.0", "1.37.0"] {
        let out = Command::new("python3")
            .args(["-m", "kubernetes_validate", "--strict", "-k", version])
            .args(&paths)
            .output()
            .expect("python3 runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !text.contains("No module named kubernetes_validate"),
            "kubernetes-validate is missing: python3 -m pip install kubernetes-validate (.ci/run does)"
        );
        assert!(out.status.success(), "Kubernetes {version}:\n{text}");
        // Every object was checked against a schema: a kind it has none for is only a warning.
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("INFO") && l.contains("passed"))
                .count(),
            3,
            "Kubernetes {version}:\n{text}"
        );
    }
}
