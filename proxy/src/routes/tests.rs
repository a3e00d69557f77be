use super::*;

fn spec(name: &str, hosts: &[&str], replicas: &[(&str, u16)]) -> InstanceSpec {
    InstanceSpec {
        certificate: None,
        asleep: false,
        editor_secret: None,
        http_auth: Default::default(),
        name: name.into(),
        hosts: hosts.iter().map(|h| h.to_string()).collect(),
        ha: false,
        affinity: false,
        hold: false,
        replicas: replicas
            .iter()
            .map(|(id, port)| ReplicaSpec {
                id: id.to_string(),
                addr: SocketAddr::from(([127, 0, 0, 1], *port)),
                ready: true,
            })
            .collect(),
        health: None,
    }
}

#[test]
fn hosts_are_normalized() {
    let cases = [
        ("orders.localhost", Some("orders.localhost")),
        ("Orders.LocalHost", Some("orders.localhost")),
        ("orders.localhost:8080", Some("orders.localhost")),
        ("orders.localhost.", Some("orders.localhost")),
        ("ORDERS.localhost.:80", Some("orders.localhost")),
        ("[::1]:8080", Some("[::1]")),
        ("127.0.0.1:80", Some("127.0.0.1")),
        ("", None),
        (":80", None),
        ("orders..localhost", None),
        ("orders.localhost:", None),
        ("orders.localhost:99999", None),
        ("orders.localhost:80:80", None),
        ("ord ers", None),
        ("orders/x", None),
        ("[::1", None),
        ("[zz]", None),
    ];
    for (raw, want) in cases {
        assert_eq!(normalize_host(raw).as_deref(), want, "{raw:?}");
    }
}

#[test]
fn names_are_dns_safe() {
    for ok in ["a", "orders", "orders-2", "a1"] {
        assert!(validate_name(ok).is_ok(), "{ok}");
    }
    let long = "a".repeat(64);
    for bad in [
        "",
        "1orders",
        "Orders",
        "orders-",
        "ord_ers",
        "ord.ers",
        long.as_str(),
    ] {
        assert!(validate_name(bad).is_err(), "{bad}");
    }
}

#[test]
fn lookup_by_any_host() {
    let routes = Routes::new();
    let table = routes
        .publish(&[
            spec(
                "orders",
                &["orders.localhost", "Shop.Example.com"],
                &[("r0", 1)],
            ),
            spec("billing", &["billing.localhost"], &[("r0", 2)]),
        ])
        .unwrap();
    assert_eq!(&*table.lookup("orders.localhost").unwrap().name, "orders");
    assert_eq!(&*table.lookup("shop.example.com").unwrap().name, "orders");
    assert_eq!(&*table.lookup("billing.localhost").unwrap().name, "billing");
    assert!(table.lookup("nope.localhost").is_none());
    assert_eq!(table.host_count(), 3);
}

#[test]
fn invalid_specs_are_refused_and_the_table_stays() {
    let routes = Routes::new();
    routes
        .publish(&[spec("orders", &["orders.localhost"], &[("r0", 1)])])
        .unwrap();
    let generation = routes.load().generation();
    let bad = [
        (vec![spec("Orders", &["a.localhost"], &[])], "invalid"),
        (
            vec![
                spec("a", &["x.localhost"], &[]),
                spec("b", &["X.localhost"], &[]),
            ],
            "claimed by both",
        ),
        (
            vec![
                spec("a", &["x.localhost"], &[]),
                spec("a", &["y.localhost"], &[]),
            ],
            "used twice",
        ),
        (vec![spec("a", &[], &[])], "no host"),
        (vec![spec("a", &["bad host"], &[])], "not a valid host"),
        (
            vec![spec("a", &["a.localhost"], &[("r0", 1), ("r0", 2)])],
            "used twice",
        ),
        (
            vec![spec("a", &["a.localhost"], &[("r 0", 1)])],
            "replica id",
        ),
    ];
    for (specs, needle) in bad {
        let err = routes.publish(&specs).unwrap_err().to_string();
        assert!(err.contains(needle), "{err:?} should mention {needle:?}");
    }
    assert_eq!(routes.load().generation(), generation);
    assert!(routes.load().lookup("orders.localhost").is_some());
}

#[test]
fn replica_state_survives_a_swap_when_id_and_address_stay() {
    let routes = Routes::new();
    let t1 = routes
        .publish(&[spec(
            "orders",
            &["orders.localhost"],
            &[("r0", 1), ("r1", 2)],
        )])
        .unwrap();
    let _busy = t1.instances()[0].replicas[0].state.begin_request();
    let t2 = routes
        .publish(&[spec(
            "orders",
            &["orders.localhost"],
            &[("r0", 1), ("r1", 3), ("r2", 4)],
        )])
        .unwrap();
    let (a, b) = (&t1.instances()[0], &t2.instances()[0]);
    assert!(Arc::ptr_eq(&a.replicas[0].state, &b.replicas[0].state));
    assert_eq!(b.replicas[0].state.in_flight(), 1);
    assert!(
        !Arc::ptr_eq(&a.replicas[1].state, &b.replicas[1].state),
        "new address, new state"
    );
    assert!(
        Arc::ptr_eq(&a.stats, &b.stats),
        "instance counters carry over"
    );
    // The old table still routes the requests that hold it.
    assert_eq!(
        t1.lookup("orders.localhost").unwrap().replicas[1]
            .addr
            .port(),
        2
    );
    assert!(t2.generation() > t1.generation());
}

#[test]
fn readiness_follows_the_spec() {
    let routes = Routes::new();
    let mut s = spec("orders", &["orders.localhost"], &[("r0", 1)]);
    s.replicas[0].ready = false;
    let t = routes.publish(&[s.clone()]).unwrap();
    assert!(!t.instances()[0].replicas[0].state.is_ready());
    s.replicas[0].ready = true;
    let t = routes.publish(&[s]).unwrap();
    assert!(t.instances()[0].replicas[0].state.is_ready());
}

#[test]
fn a_refused_publish_leaves_live_replicas_alone() {
    let routes = Routes::new();
    let probes = HealthConfig {
        path: "/healthz".into(),
        ..HealthConfig::default()
    };
    let mut live = spec("orders", &["orders.localhost"], &[("r0", 1)]);
    live.health = Some(probes.clone());
    let t = routes.publish(&[live.clone()]).unwrap();
    let state = t.instances()[0].replicas[0].state.clone();
    // The probes have found the replica unhealthy.
    state.health.set_probed_healthy(false);

    // The same replica, not ready and with probes off, in a table refused for a duplicate host.
    let mut changed = live.clone();
    changed.replicas[0].ready = false;
    changed.health = None;
    let err = routes
        .publish(&[
            changed,
            spec("billing", &["orders.localhost"], &[("r0", 2)]),
        ])
        .unwrap_err();
    assert!(matches!(err, RouteError::DuplicateHost { .. }), "{err}");

    assert!(state.is_ready(), "readiness unchanged");
    assert_eq!(state.probe_config().as_deref(), Some(&probes));
    assert!(!state.health.probed_healthy(), "probe verdict unchanged");
}

#[test]
fn a_refused_routes_file_leaves_live_probe_settings_alone() {
    let routes_file = tempfile::Builder::new()
        .prefix("tandem-refused-routes-")
        .suffix(".toml")
        .tempfile()
        .unwrap();
    let path = routes_file.path();
    let instance = |name: &str, extra: &str| {
        format!(
            "[[instance]]\nname = \"{name}\"\nhosts = [\"orders.localhost\"]\n\
             replicas = [\"127.0.0.1:1\"]\n{extra}\n"
        )
    };
    std::fs::write(
        path,
        format!(
            "[health]\ninterval_ms = 500\n{}",
            instance("orders", "health_path = \"/healthz\"")
        ),
    )
    .unwrap();
    let routes = Routes::new();
    file::load(path, &routes).unwrap();
    let state = routes.load().instances()[0].replicas[0].state.clone();
    let before = state.probe_config();
    assert_eq!(before.as_ref().map(|c| c.path.as_str()), Some("/healthz"));
    state.health.set_probed_healthy(false);

    // New probe settings for the live replica, in a file refused for a duplicate host.
    std::fs::write(
        path,
        format!(
            "[health]\ninterval_ms = 9000\n{}{}",
            instance("orders", "health_path = \"/other\""),
            instance("billing", "")
        ),
    )
    .unwrap();
    let err = file::load(path, &routes).unwrap_err().to_string();
    assert!(err.contains("claimed by both"), "{err}");
    assert_eq!(state.probe_config(), before, "probe settings unchanged");
    assert!(!state.health.probed_healthy(), "probe verdict unchanged");

    // With probes switched off by a refused file, the verdict stays too.
    std::fs::write(
        path,
        format!(
            "{}{}",
            instance("orders", "health_check = false"),
            instance("billing", "")
        ),
    )
    .unwrap();
    assert!(file::load(path, &routes).is_err());
    assert_eq!(state.probe_config(), before);
    assert!(!state.health.probed_healthy());
    assert!(state.is_ready());
}

#[test]
fn routes_file_parses_and_explains_errors() {
    let text = r#"
        [health]
        interval_ms = 500

        [[instance]]
        name = "orders"
        hosts = ["orders.localhost"]
        ha = true
        replicas = ["127.0.0.1:12080", "127.0.0.1:12081"]
        health_path = "/ping"

        [[instance]]
        name = "billing"
        hosts = ["billing.localhost"]
        replicas = ["127.0.0.1:13080"]
        health_check = false
        affinity = true
    "#;
    let specs = file::parse(text).unwrap();
    assert_eq!(specs.len(), 2);
    assert!(specs[0].ha);
    assert_eq!(specs[0].replicas[1].id, "r1");
    let h = specs[0].health.as_ref().unwrap();
    assert_eq!((h.path.as_str(), h.interval.as_millis()), ("/ping", 500));
    assert!(specs[1].health.is_none() && specs[1].affinity);

    let err = file::parse("[[instance]]\nname = \"a\"\nhosts = [\"a\"]\nreplicas = [\"nope\"]\n")
        .unwrap_err();
    assert!(err.contains("line 4"), "{err}");
    let err =
        file::parse("[[instance]]\nname = \"a\"\nhost = [\"a\"]\nreplicas = []\n").unwrap_err();
    assert!(err.contains("unknown field `host`"), "{err}");
}

#[test]
fn routes_file_mqtt_section_and_listeners() {
    let base = |extra: &str, listeners: &str| {
        format!(
            "{extra}\n[[instance]]\nname = \"orders\"\nhosts = [\"orders.localhost\"]\nha = true\n\
             replicas = [\"127.0.0.1:12080\", \"127.0.0.1:12081\"]\n{listeners}\n"
        )
    };
    let text = base(
        "[mqtt]\nupstream = \"broker.internal:1883\"\nmax_packet_bytes = 1048576",
        "mqtt_listeners = [\"127.0.0.1:11883\", \"127.0.0.1:11884\"]\nmqtt_exclude = [\"replies/#\"]",
    );
    let f = file::parse_file(&text).unwrap();
    f.validate_mqtt().unwrap();
    let c = f.mqtt.as_ref().unwrap();
    assert_eq!(
        (c.upstream.as_str(), c.max_packet_bytes),
        ("broker.internal:1883", 1 << 20)
    );
    let m = &f.mqtt_instances[0];
    assert_eq!((m.name.as_str(), m.ha), ("orders", true));
    assert_eq!(m.exclude, ["replies/#"]);
    assert_eq!(m.replicas[1].slot, 1);
    assert_eq!(
        m.replicas[1].listen,
        Some("127.0.0.1:11884".parse().unwrap())
    );

    let invalid = |text: &str| {
        file::parse_file(text)
            .unwrap()
            .validate_mqtt()
            .unwrap_err()
            .to_string()
    };
    let err = invalid(&base(
        "[mqtt]\nupstream = \"127.0.0.1:1883\"",
        "mqtt_listeners = [\"127.0.0.1:11883\"]",
    ));
    assert!(err.contains("2 replicas but 1 mqtt_listeners"), "{err}");
    let err = invalid(&base(
        "",
        "mqtt_listeners = [\"127.0.0.1:11883\", \"127.0.0.1:11884\"]",
    ));
    assert!(err.contains("no [mqtt] section"), "{err}");
    let err = invalid(&base(
        "[mqtt]\nupstream = \"1883\"",
        "mqtt_listeners = [\"127.0.0.1:11883\", \"127.0.0.1:11884\"]",
    ));
    assert!(err.contains("write host:port"), "{err}");
    let err = invalid(&base(
        "[mqtt]\nupstream = \"127.0.0.1:1883\"",
        "mqtt_listeners = [\"127.0.0.1:11883\", \"127.0.0.1:11883\"]",
    ));
    assert!(
        err.contains("given to both orders/r0 and orders/r1"),
        "{err}"
    );
    let err = invalid(&base(
        "[mqtt]\nupstream = \"127.0.0.1:1883\"",
        "mqtt_listeners = [\"127.0.0.1:11883\", \"127.0.0.1:11884\"]\nmqtt_exclude = [\"a/#/b\"]",
    ));
    assert!(err.contains("not a valid topic filter"), "{err}");
    let err = file::parse_file(&base("", "mqtt_listeners = [\"localhost\"]")).unwrap_err();
    assert!(err.contains("invalid socket address"), "{err}");
}

// === Properties of host normalization ===

mod normalize_props {
    use proptest::prelude::*;

    use super::normalize_host;

    /// Host headers built from the pieces real and hostile ones are made of.
    fn host_like() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("a"),
            Just("Orders"),
            Just("LOCALHOST"),
            Just("-"),
            Just("_"),
            Just("."),
            Just(":"),
            Just("80"),
            Just("65535"),
            Just("65536"),
            Just("["),
            Just("]"),
            Just("::1"),
            Just("Ab:CD"),
            Just(" "),
            Just("é"),
            Just("%2e"),
            Just("/"),
        ];
        proptest::collection::vec(piece, 0..12).prop_map(|v| v.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// No panic on any input; a normalized host normalizes to itself and is a lookup key
        /// (lower case, no port, no trailing dot).
        #[test]
        fn normalize_host_is_idempotent(raw in prop_oneof![host_like(), any::<String>()]) {
            if let Some(once) = normalize_host(&raw) {
                let again = normalize_host(&once);
                prop_assert_eq!(again.as_deref(), Some(&*once));
                prop_assert!(!once.bytes().any(|b| b.is_ascii_uppercase()));
                prop_assert!(!once.ends_with('.'));
                prop_assert!(once.starts_with('[') || !once.contains(':'));
            }
        }
    }
}
