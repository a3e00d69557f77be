use std::net::SocketAddr;

use super::test_ca::TestCa;
use super::*;
use crate::routes::{InstanceSpec, ReplicaSpec};

fn write(dir: &Path, name: &str, pair: &PemKeyPair) -> FilePair {
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&cert, &pair.certificate).unwrap();
    std::fs::write(&key, &pair.key).unwrap();
    FilePair { cert, key }
}

fn same(a: &Option<Arc<CertifiedKey>>, pair: &PemKeyPair) -> bool {
    a.as_ref()
        .is_some_and(|k| test_ca::is_leaf_of(pair, &k.cert))
}

fn instance(name: &str, hosts: &[&str], certificate: Option<PemKeyPair>) -> InstanceSpec {
    InstanceSpec {
        name: name.into(),
        hosts: hosts.iter().map(|h| h.to_string()).collect(),
        ha: false,
        editor_secret: None,
        http_auth: Default::default(),
        affinity: false,
        hold: false,
        replicas: vec![ReplicaSpec {
            id: "r0".into(),
            addr: SocketAddr::from(([127, 0, 0, 1], 9)),
            ready: true,
        }],
        health: None,
        certificate,
        asleep: false,
    }
}

#[test]
fn a_pair_must_parse_fit_together_and_cover_the_host() {
    let ca = TestCa::new();
    let a = ca.issue(&["flows.example.org"]);
    let b = ca.issue(&["flows.example.org"]);
    check(&a, "flows.example.org").unwrap();
    assert!(matches!(
        check(&a, "other.example.org"),
        Err(TlsError::NotCovered(h)) if h == "other.example.org"
    ));
    let mixed = PemKeyPair {
        certificate: a.certificate.clone(),
        key: b.key.clone(),
    };
    assert!(matches!(
        check(&mixed, "flows.example.org"),
        Err(TlsError::Mismatch(_))
    ));
    let no_cert = PemKeyPair {
        certificate: "hello".into(),
        key: a.key.clone(),
    };
    assert!(matches!(
        check(&no_cert, "flows.example.org"),
        Err(TlsError::NoCertificate)
    ));
    let no_key = PemKeyPair {
        certificate: a.certificate.clone(),
        key: a.certificate.clone(),
    };
    assert!(matches!(
        check(&no_key, "flows.example.org"),
        Err(TlsError::BadKey(_))
    ));
    assert!(
        !format!("{a:?}").contains(&a.key),
        "Debug never shows the key"
    );
}

#[test]
fn a_wildcard_covers_one_label_only() {
    let ca = TestCa::new();
    let pair = ca.issue(&["*.example.com"]);
    let key = key_pair(pair.certificate.as_bytes(), pair.key.as_bytes()).unwrap();
    assert!(covers(&key, "orders.example.com"));
    assert!(!covers(&key, "a.orders.example.com"));
    assert!(!covers(&key, "example.com"));
    assert!(!covers(&key, "not a host"));
}

#[test]
fn sni_picks_the_instance_then_the_exact_host_then_the_wildcard_then_the_default() {
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let default = ca.issue(&["*.example.com"]);
    let exact = ca.issue(&["api.example.net"]);
    let wildcard = ca.issue(&["*.example.net"]);
    let custom = ca.issue(&["flows.customer.org"]);
    let files = TlsFiles {
        default: Some(write(dir.path(), "default", &default)),
        hosts: vec![
            HostFiles {
                hosts: vec!["API.example.net".into()],
                files: write(dir.path(), "exact", &exact),
            },
            HostFiles {
                hosts: vec!["*.example.net".into()],
                files: write(dir.path(), "wildcard", &wildcard),
            },
        ],
    };
    let routes = Arc::new(Routes::new());
    routes
        .publish(&[instance(
            "orders",
            &["orders.example.com", "flows.customer.org"],
            Some(custom.clone()),
        )])
        .unwrap();
    let certs = Certificates::new(files, Some(routes)).unwrap();
    assert!(same(&certs.pick(Some("flows.customer.org")), &custom));
    // The instance's own host is not covered by its custom certificate: the default serves it.
    assert!(same(&certs.pick(Some("orders.example.com")), &default));
    assert!(same(&certs.pick(Some("api.example.net")), &exact));
    assert!(same(&certs.pick(Some("www.example.net")), &wildcard));
    assert!(same(&certs.pick(Some("a.www.example.net")), &default));
    assert!(same(&certs.pick(None), &default));
}

#[test]
fn an_unusable_instance_certificate_leaves_the_table_published_on_the_default() {
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let default = ca.issue(&["*.example.com"]);
    let a = ca.issue(&["flows.customer.org"]);
    let b = ca.issue(&["flows.customer.org"]);
    let routes = Arc::new(Routes::new());
    let broken = PemKeyPair {
        certificate: a.certificate,
        key: b.key,
    };
    routes
        .publish(&[instance("orders", &["flows.customer.org"], Some(broken))])
        .unwrap();
    let certs = Certificates::new(
        TlsFiles {
            default: Some(write(dir.path(), "default", &default)),
            hosts: vec![],
        },
        Some(routes.clone()),
    )
    .unwrap();
    assert!(routes.load().lookup("flows.customer.org").is_some());
    assert!(same(&certs.pick(Some("flows.customer.org")), &default));
}

#[test]
fn a_rewritten_file_is_served_and_a_broken_one_keeps_the_last_good() {
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let first = ca.issue(&["*.example.com"]);
    let files = TlsFiles {
        default: Some(write(dir.path(), "default", &first)),
        hosts: vec![],
    };
    let certs = Certificates::new(files, None).unwrap();
    assert!(!certs.reload().unwrap(), "nothing changed");

    // A renewal: both files rewritten (a different key, so a different length).
    let second = ca.issue(&["*.example.com"]);
    write(dir.path(), "default", &second);
    // Stamps have a coarse clock on some file systems; the length differs or time moved.
    std::thread::sleep(Duration::from_millis(20));
    write(dir.path(), "default", &second);
    assert!(certs.reload().unwrap());
    assert!(same(&certs.pick(None), &second));

    std::fs::write(dir.path().join("default.key"), "half a key").unwrap();
    assert!(certs.reload().is_err());
    assert!(same(&certs.pick(None), &second), "the last good one serves");
}

#[test]
fn a_missing_file_fails_the_start_and_says_which() {
    let dir = tempfile::tempdir().unwrap();
    let files = TlsFiles {
        default: Some(FilePair {
            cert: dir.path().join("nope.pem"),
            key: dir.path().join("nope.key"),
        }),
        hosts: vec![],
    };
    let e = Certificates::new(files, None).unwrap_err().to_string();
    assert!(e.contains("nope.pem"), "{e}");
}
