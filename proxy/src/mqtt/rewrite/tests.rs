//! Unit tests of the rewrites. Input packets are built with rumqttc's encoders; results are
//! decoded again with rumqttc, so both ends are checked against an independent codec.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::BytesMut;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use rumqttc::v5::mqttbytes::QoS as Q5;
use rumqttc::QoS as Q4;

use super::*;
use crate::mqtt::frame::parse_header;

fn header(b: &[u8]) -> Header {
    parse_header(b, usize::MAX).unwrap().unwrap()
}

fn v4_bytes(p: v4::Packet) -> Vec<u8> {
    let mut b = BytesMut::new();
    p.write(&mut b, usize::MAX).unwrap();
    b.to_vec()
}

fn v5_bytes(p: v5::Packet) -> Vec<u8> {
    let mut b = BytesMut::new();
    p.write(&mut b, None).unwrap();
    b.to_vec()
}

fn v4_read(b: &[u8]) -> v4::Packet {
    v4::Packet::read(&mut BytesMut::from(b), usize::MAX).unwrap()
}

fn v5_read(b: &[u8]) -> v5::Packet {
    v5::Packet::read(&mut BytesMut::from(b), None).unwrap()
}

fn rules(exclude: &[&str]) -> ShareRules {
    ShareRules {
        group: "orders".into(),
        exclude: exclude.iter().map(|s| s.to_string()).collect(),
    }
}

// === CONNECT ===

#[test]
fn v4_connect_gets_the_slot_suffix_and_keeps_everything_else() {
    let mut c = v4::Connect::new("nodered");
    c.keep_alive = 60;
    c.clean_session = false;
    c.set_login("user", "secret");
    c.last_will = Some(v4::LastWill::new(
        "status/orders",
        "offline",
        Q4::AtLeastOnce,
        true,
    ));
    let input = v4_bytes(v4::Packet::Connect(c.clone()));
    let out = connect(&input, &header(&input), Some("-r1")).unwrap();
    assert_eq!(out.protocol, Protocol::V311);
    assert_eq!(out.client_id, "nodered");
    let mut expected = c;
    expected.client_id = "nodered-r1".into();
    assert_eq!(
        v4_read(&out.rewritten.unwrap()),
        v4::Packet::Connect(expected)
    );
}

#[test]
fn v5_connect_keeps_properties_will_and_credentials() {
    let c = v5::Connect {
        keep_alive: 45,
        client_id: "nodered".into(),
        clean_start: false,
        properties: Some(v5::ConnectProperties {
            session_expiry_interval: Some(120),
            receive_maximum: Some(20),
            user_properties: vec![("k".into(), "v".into())],
            ..Default::default()
        }),
    };
    let will = v5::LastWill {
        topic: "status/orders".into(),
        message: "bye".into(),
        qos: Q5::AtLeastOnce,
        retain: false,
        properties: Some(v5::LastWillProperties {
            delay_interval: Some(5),
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: Some("text/plain".into()),
            response_topic: None,
            correlation_data: None,
            user_properties: vec![],
        }),
    };
    let login = v5::Login {
        username: "u".into(),
        password: "p".into(),
    };
    let input = v5_bytes(v5::Packet::Connect(
        c.clone(),
        Some(will.clone()),
        Some(login.clone()),
    ));
    let out = connect(&input, &header(&input), Some("-r0")).unwrap();
    assert_eq!(out.protocol, Protocol::V5);
    let mut expected = c;
    expected.client_id = "nodered-r0".into();
    assert_eq!(
        v5_read(&out.rewritten.unwrap()),
        v5::Packet::Connect(expected, Some(will), Some(login))
    );
}

#[test]
fn connect_splice_is_exact_for_what_rumqttc_would_get_wrong() {
    // MQTT 3.1.1, username "u" with an empty password (flags c2): rumqttc's encoder would drop
    // the password flag. The splice changes the id and the length byte only.
    let input: Vec<u8> = [
        &[0x10, 19, 0, 4, b'M', b'Q', b'T', b'T', 4, 0xc2, 0, 60][..],
        &[0, 2, b'i', b'd'],
        &[0, 1, b'u'],
        &[0, 0],
    ]
    .concat();
    assert_eq!(input.len(), 21);
    let out = connect(&input, &header(&input), Some("-r1")).unwrap();
    let expected: Vec<u8> = [
        &[0x10, 22, 0, 4, b'M', b'Q', b'T', b'T', 4, 0xc2, 0, 60][..],
        &[0, 5, b'i', b'd', b'-', b'r', b'1'],
        &[0, 1, b'u'],
        &[0, 0],
    ]
    .concat();
    assert_eq!(out.rewritten.unwrap().as_ref(), &expected[..]);

    // MQTT 3.1 (MQIsdp, level 3), which rumqttc refuses.
    let input: Vec<u8> = [
        &[0x10, 16, 0, 6][..],
        b"MQIsdp",
        &[3, 0x02, 0, 30, 0, 2, b'n', b'r'],
    ]
    .concat();
    let out = connect(&input, &header(&input), Some("-r2")).unwrap();
    assert_eq!(out.protocol, Protocol::V31);
    let expected: Vec<u8> = [
        &[0x10, 19, 0, 6][..],
        b"MQIsdp",
        &[3, 0x02, 0, 30, 0, 5, b'n', b'r', b'-', b'r', b'2'],
    ]
    .concat();
    assert_eq!(out.rewritten.unwrap().as_ref(), &expected[..]);
}

#[test]
fn connect_leaves_empty_ids_and_non_ha_alone() {
    let input = v4_bytes(v4::Packet::Connect(v4::Connect::new("")));
    let out = connect(&input, &header(&input), Some("-r1")).unwrap();
    assert_eq!((out.client_id.as_str(), out.rewritten), ("", None));
    let input = v4_bytes(v4::Packet::Connect(v4::Connect::new("nodered")));
    let out = connect(&input, &header(&input), None).unwrap();
    assert_eq!(out.rewritten, None);
}

#[test]
fn connect_grows_its_remaining_length_field_when_needed() {
    // 121 bytes of remaining length + 3 = 124 fits one length byte; + 10 does not.
    let id = "x".repeat(109);
    let input = v4_bytes(v4::Packet::Connect(v4::Connect::new(id.clone())));
    assert_eq!(input[1], 121);
    let out = connect(&input, &header(&input), Some("-r12345678")).unwrap();
    let out = out.rewritten.unwrap();
    assert_eq!(header(&out).header_len, 3);
    let v4::Packet::Connect(c) = v4_read(&out) else {
        panic!("not a CONNECT")
    };
    assert_eq!(c.client_id, format!("{id}-r12345678"));
}

#[test]
fn bad_connects_are_refused_with_a_reason() {
    let good = v4_bytes(v4::Packet::Connect(v4::Connect::new("nodered")));
    let cases: Vec<(Vec<u8>, PacketError)> = vec![
        (
            // wrong protocol name
            [&[0x10, 12, 0, 4][..], b"MQTX", &[4, 2, 0, 60, 0, 0]].concat(),
            PacketError::UnsupportedProtocol {
                name: "MQTX".into(),
                level: 4,
            },
        ),
        (
            // level 6
            [&[0x10, 12, 0, 4][..], b"MQTT", &[6, 2, 0, 60, 0, 0]].concat(),
            PacketError::UnsupportedProtocol {
                name: "MQTT".into(),
                level: 6,
            },
        ),
        (
            [&[0x10, 12, 0, 4][..], b"MQTT", &[4, 3, 0, 60, 0, 0]].concat(),
            PacketError::ReservedConnectFlag,
        ),
        (
            // client id longer than the packet
            [&[0x10, 12, 0, 4][..], b"MQTT", &[4, 2, 0, 60, 0, 9]].concat(),
            PacketError::Truncated("CONNECT"),
        ),
        (
            // protocol name longer than the packet
            vec![0x10, 2, 0xff, 0xff],
            PacketError::Truncated("CONNECT"),
        ),
        (
            [
                &[0x10, 14, 0, 4][..],
                b"MQTT",
                &[4, 2, 0, 60, 0, 2, 0xff, 0xfe],
            ]
            .concat(),
            PacketError::ClientIdNotUtf8,
        ),
        (
            [&[0x11], &good[1..]].concat(),
            PacketError::BadFlags {
                packet: "CONNECT",
                byte1: 0x11,
            },
        ),
    ];
    for (input, err) in cases {
        assert_eq!(
            connect(&input, &header(&input), Some("-r0")),
            Err(err),
            "{input:02x?}"
        );
    }
    // v5 properties running past the end
    let input = [&[0x10, 11, 0, 4][..], b"MQTT", &[5, 2, 0, 60, 9]].concat();
    assert_eq!(
        connect(&input, &header(&input), Some("-r0")),
        Err(PacketError::Truncated("CONNECT"))
    );
}

// === Credentials ===

#[test]
fn v311_credentials_are_cut_and_the_rest_is_what_rumqttc_writes_without_them() {
    let mut c = v4::Connect::new("nodered");
    c.keep_alive = 45;
    c.clean_session = false;
    c.last_will = Some(v4::LastWill::new(
        "status/orders",
        "offline",
        Q4::ExactlyOnce,
        true,
    ));
    let mut with = c.clone();
    with.set_login("orders-r1", "token-1");
    let input = v4_bytes(v4::Packet::Connect(with));
    let out = strip_credentials(&input, &header(&input)).unwrap();
    assert_eq!(out.protocol, Protocol::V311);
    assert_eq!(out.username, Some(&b"orders-r1"[..]));
    assert_eq!(out.password, Some(&b"token-1"[..]));
    // Byte for byte the CONNECT rumqttc writes without a login: flags 0x80 and 0x40 cleared,
    // both fields gone, the length fixed; keep alive, clean session and will as sent.
    assert_eq!(
        out.stripped.as_ref(),
        &v4_bytes(v4::Packet::Connect(c.clone()))[..]
    );
    assert_eq!(v4_read(&out.stripped), v4::Packet::Connect(c));
    // And the client id still reads, for the suffix that follows on HA instances.
    let again = connect(&out.stripped, &header(&out.stripped), Some("-r1")).unwrap();
    assert_eq!(again.client_id, "nodered");
}

#[test]
fn v5_credentials_are_cut_with_properties_and_will_properties_kept() {
    let c = v5::Connect {
        keep_alive: 45,
        client_id: "nodered".into(),
        clean_start: false,
        properties: Some(v5::ConnectProperties {
            session_expiry_interval: Some(120),
            receive_maximum: Some(20),
            max_packet_size: Some(1 << 20),
            topic_alias_max: Some(10),
            request_response_info: Some(1),
            request_problem_info: Some(0),
            user_properties: vec![("k".into(), "v".into())],
            authentication_method: Some("none".into()),
            authentication_data: Some(bytes::Bytes::from_static(b"\x00\x01")),
        }),
    };
    let will = v5::LastWill {
        topic: "status/orders".into(),
        message: "bye".into(),
        qos: Q5::AtLeastOnce,
        retain: true,
        properties: Some(v5::LastWillProperties {
            delay_interval: Some(5),
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(60),
            content_type: Some("text/plain".into()),
            response_topic: Some("r".into()),
            correlation_data: Some(bytes::Bytes::from_static(b"c")),
            user_properties: vec![("w".into(), "x".into())],
        }),
    };
    let login = v5::Login {
        username: "orders-r0".into(),
        password: "token-0".into(),
    };
    let input = v5_bytes(v5::Packet::Connect(
        c.clone(),
        Some(will.clone()),
        Some(login),
    ));
    let out = strip_credentials(&input, &header(&input)).unwrap();
    assert_eq!(out.protocol, Protocol::V5);
    assert_eq!(out.username, Some(&b"orders-r0"[..]));
    assert_eq!(out.password, Some(&b"token-0"[..]));
    let expected = v5_bytes(v5::Packet::Connect(c.clone(), Some(will.clone()), None));
    assert_eq!(out.stripped.as_ref(), &expected[..]);
    assert_eq!(
        v5_read(&out.stripped),
        v5::Packet::Connect(c, Some(will), None)
    );
}

#[test]
fn v31_and_odd_credentials_are_cut_by_hand_checked_bytes() {
    // MQTT 3.1 (MQIsdp, level 3; rumqttc cannot read it): flags c2 (username, password, clean
    // session), client id "nr", username "orders-r2", password "t".
    let input: Vec<u8> = [
        &[0x10, 30, 0, 6][..],
        b"MQIsdp",
        &[3, 0xc2, 0, 30, 0, 2, b'n', b'r'],
        &[0, 9],
        b"orders-r2",
        &[0, 1, b't'],
    ]
    .concat();
    let out = strip_credentials(&input, &header(&input)).unwrap();
    assert_eq!(out.protocol, Protocol::V31);
    assert_eq!(
        (out.username, out.password),
        (Some(&b"orders-r2"[..]), Some(&b"t"[..]))
    );
    let expected: Vec<u8> = [
        &[0x10, 16, 0, 6][..],
        b"MQIsdp",
        &[3, 0x02, 0, 30, 0, 2, b'n', b'r'],
    ]
    .concat();
    assert_eq!(out.stripped.as_ref(), &expected[..]);

    // MQTT 3.1.1 with a will and a username with an empty password (flags e6: username,
    // password, will retain, will QoS 0, will, clean session), which rumqttc re-encodes wrong.
    let input: Vec<u8> = [
        &[0x10, 27, 0, 4][..],
        b"MQTT",
        &[4, 0xe6, 0, 60, 0, 2, b'i', b'd'],
        &[0, 1, b'w', 0, 3, b'b', b'y', b'e'],
        &[0, 1, b'u'],
        &[0, 0],
    ]
    .concat();
    let out = strip_credentials(&input, &header(&input)).unwrap();
    assert_eq!(
        (out.username, out.password),
        (Some(&b"u"[..]), Some(&b""[..]))
    );
    let expected: Vec<u8> = [
        &[0x10, 22, 0, 4][..],
        b"MQTT",
        &[4, 0x26, 0, 60, 0, 2, b'i', b'd'],
        &[0, 1, b'w', 0, 3, b'b', b'y', b'e'],
    ]
    .concat();
    assert_eq!(out.stripped.as_ref(), &expected[..]);

    // MQTT 5 with a password and no username (allowed in 5): the password is cut too.
    let input: Vec<u8> = [
        &[0x10, 20, 0, 4][..],
        b"MQTT",
        &[5, 0x42, 0, 60, 0, 0, 2, b'i', b'd'],
        &[0, 3, b'p', b'w', b'd'],
    ]
    .concat();
    let out = strip_credentials(&input, &header(&input)).unwrap();
    assert_eq!((out.username, out.password), (None, Some(&b"pwd"[..])));
    let expected: Vec<u8> = [
        &[0x10, 15, 0, 4][..],
        b"MQTT",
        &[5, 0x02, 0, 60, 0, 0, 2, b'i', b'd'],
    ]
    .concat();
    assert_eq!(out.stripped.as_ref(), &expected[..]);
}

#[test]
fn a_connect_without_credentials_is_kept_as_sent() {
    for input in [
        v4_bytes(v4::Packet::Connect(v4::Connect::new("nodered"))),
        v5_bytes(v5::Packet::Connect(
            v5::Connect {
                keep_alive: 10,
                client_id: "".into(),
                clean_start: true,
                properties: None,
            },
            None,
            None,
        )),
    ] {
        let out = strip_credentials(&input, &header(&input)).unwrap();
        assert_eq!((out.username, out.password), (None, None));
        assert_eq!(out.stripped.as_ref(), &input[..]);
    }
}

#[test]
fn connects_whose_credentials_cannot_be_cut_are_refused() {
    let mut with = v4::Connect::new("nodered");
    with.set_login("orders-r1", "token-1");
    let good = v4_bytes(v4::Packet::Connect(with));
    let cases: Vec<(Vec<u8>, PacketError)> = vec![
        (
            // a byte after the password
            {
                let mut b = good.clone();
                b[1] += 1;
                b.push(0);
                b
            },
            PacketError::TrailingBytes("CONNECT"),
        ),
        (
            // the password runs past the packet
            {
                let mut b = good.clone();
                b[1] -= 1;
                b.pop();
                b
            },
            PacketError::Truncated("CONNECT"),
        ),
        (
            // will flag set, no will fields
            [
                &[0x10, 14, 0, 4][..],
                b"MQTT",
                &[4, 0x06, 0, 60, 0, 2, b'i', b'd'],
            ]
            .concat(),
            PacketError::Truncated("CONNECT"),
        ),
        (
            [&[0x11], &good[1..]].concat(),
            PacketError::BadFlags {
                packet: "CONNECT",
                byte1: 0x11,
            },
        ),
        (
            [&[0x10, 12, 0, 4][..], b"MQTT", &[6, 2, 0, 60, 0, 0]].concat(),
            PacketError::UnsupportedProtocol {
                name: "MQTT".into(),
                level: 6,
            },
        ),
    ];
    for (input, err) in cases {
        assert_eq!(
            strip_credentials(&input, &header(&input)),
            Err(err),
            "{input:02x?}"
        );
    }
}

// === SUBSCRIBE / UNSUBSCRIBE ===

#[test]
fn v4_subscribe_shares_all_but_dollar_and_excluded_filters() {
    let input = v4_bytes(v4::Packet::Subscribe(v4::Subscribe::new_many([
        v4::SubscribeFilter::new("sensors/+/temp".into(), Q4::AtLeastOnce),
        v4::SubscribeFilter::new("$SYS/broker/uptime".into(), Q4::AtMostOnce),
        v4::SubscribeFilter::new("replies/abc".into(), Q4::ExactlyOnce),
        v4::SubscribeFilter::new("$share/mine/t".into(), Q4::AtLeastOnce),
        v4::SubscribeFilter::new("#".into(), Q4::AtMostOnce),
    ])));
    let out = subscribe(
        &input,
        &header(&input),
        Protocol::V311,
        &rules(&["replies/#"]),
    )
    .unwrap();
    assert_eq!(out.rewrites, 2);
    let v4::Packet::Subscribe(sub) = v4_read(&out.packet.unwrap()) else {
        panic!("not a SUBSCRIBE")
    };
    let got: Vec<_> = sub
        .filters
        .iter()
        .map(|f| (f.path.as_str(), f.qos))
        .collect();
    assert_eq!(
        got,
        [
            ("$share/orders/sensors/+/temp", Q4::AtLeastOnce),
            ("$SYS/broker/uptime", Q4::AtMostOnce),
            ("replies/abc", Q4::ExactlyOnce),
            ("$share/mine/t", Q4::AtLeastOnce),
            ("$share/orders/#", Q4::AtMostOnce),
        ]
    );
    let shared: Vec<_> = out
        .filters
        .iter()
        .map(|s| (s.filter.as_str(), s.shared))
        .collect();
    assert_eq!(
        shared,
        [
            ("sensors/+/temp", true),
            ("$SYS/broker/uptime", false),
            ("replies/abc", false),
            ("$share/mine/t", false),
            ("#", true)
        ]
    );
}

#[test]
fn subscribe_with_nothing_to_share_is_forwarded_as_sent() {
    let input = v4_bytes(v4::Packet::Subscribe(v4::Subscribe::new(
        "$SYS/#",
        Q4::AtMostOnce,
    )));
    let out = subscribe(&input, &header(&input), Protocol::V311, &rules(&[])).unwrap();
    assert_eq!((out.packet, out.rewrites), (None, 0));
}

#[test]
fn v5_subscribe_keeps_options_and_properties_and_clears_no_local() {
    let filter = |path: &str, nolocal, rap, rh| v5::Filter {
        path: path.into(),
        qos: Q5::AtLeastOnce,
        nolocal,
        preserve_retain: rap,
        retain_forward_rule: rh,
    };
    let props = Some(v5::SubscribeProperties {
        id: Some(7),
        user_properties: vec![("a".into(), "b".into())],
    });
    let mut sub = v5::Subscribe::new_many(
        [
            filter("p/#", true, true, v5::RetainForwardRule::OnNewSubscribe),
            filter("$SYS/#", true, false, v5::RetainForwardRule::Never),
            filter(
                "cfg/x",
                true,
                false,
                v5::RetainForwardRule::OnEverySubscribe,
            ),
        ],
        props.clone(),
    );
    sub.pkid = 42;
    let input = v5_bytes(v5::Packet::Subscribe(sub));
    let out = subscribe(&input, &header(&input), Protocol::V5, &rules(&["cfg/+"])).unwrap();
    assert_eq!(out.rewrites, 1);
    let mut expected = v5::Subscribe::new_many(
        [
            filter(
                "$share/orders/p/#",
                false,
                true,
                v5::RetainForwardRule::OnNewSubscribe,
            ),
            filter("$SYS/#", true, false, v5::RetainForwardRule::Never),
            filter(
                "cfg/x",
                true,
                false,
                v5::RetainForwardRule::OnEverySubscribe,
            ),
        ],
        props,
    );
    expected.pkid = 42;
    // Byte-identical to the packet built directly.
    assert_eq!(
        out.packet.unwrap().as_ref(),
        &v5_bytes(v5::Packet::Subscribe(expected))[..]
    );
    assert_eq!(
        out.filters[0],
        Subscription {
            filter: "p/#".into(),
            shared: true,
            retain_as_published: true
        }
    );
}

#[test]
fn unsubscribe_is_rewritten_like_subscribe() {
    let mut u = v4::Unsubscribe::new("a/b");
    u.topics.push("$SYS/x".into());
    u.topics.push("replies/1".into());
    u.pkid = 9;
    let input = v4_bytes(v4::Packet::Unsubscribe(u));
    let out = unsubscribe(
        &input,
        &header(&input),
        Protocol::V311,
        &rules(&["replies/#"]),
    )
    .unwrap();
    assert_eq!(out.filters, ["a/b", "$SYS/x", "replies/1"]);
    let v4::Packet::Unsubscribe(u) = v4_read(&out.packet.unwrap()) else {
        panic!("not an UNSUBSCRIBE")
    };
    assert_eq!(
        (u.pkid, u.topics),
        (
            9,
            vec![
                "$share/orders/a/b".into(),
                "$SYS/x".into(),
                "replies/1".into()
            ]
        )
    );

    let mut u = v5::Unsubscribe::new(
        "a/b",
        Some(v5::UnsubscribeProperties {
            user_properties: vec![("k".into(), "v".into())],
        }),
    );
    u.pkid = 3;
    let input = v5_bytes(v5::Packet::Unsubscribe(u.clone()));
    let out = unsubscribe(&input, &header(&input), Protocol::V5, &rules(&[])).unwrap();
    u.filters = vec!["$share/orders/a/b".into()];
    assert_eq!(
        out.packet.unwrap().as_ref(),
        &v5_bytes(v5::Packet::Unsubscribe(u))[..]
    );
}

#[test]
fn malformed_subscribes_are_refused() {
    let good = v4_bytes(v4::Packet::Subscribe(v4::Subscribe::new(
        "a",
        Q4::AtMostOnce,
    )));
    let bad_flags = [&[0x80], &good[1..]].concat();
    assert!(matches!(
        subscribe(&bad_flags, &header(&bad_flags), Protocol::V311, &rules(&[])),
        Err(PacketError::BadFlags { .. })
    ));
    // QoS 3
    let mut bad_qos = good.clone();
    *bad_qos.last_mut().unwrap() = 3;
    assert!(matches!(
        subscribe(&bad_qos, &header(&bad_qos), Protocol::V311, &rules(&[])),
        Err(PacketError::Codec { .. })
    ));
    // filter length past the end
    let bad_len = vec![0x82, 4, 0, 1, 0, 9];
    assert!(subscribe(&bad_len, &header(&bad_len), Protocol::V5, &rules(&[])).is_err());
    assert!(subscribe(&bad_len, &header(&bad_len), Protocol::V311, &rules(&[])).is_err());
    // no filter at all
    let empty = vec![0x82, 2, 0, 1];
    assert!(subscribe(&empty, &header(&empty), Protocol::V311, &rules(&[])).is_err());
}

// === Topic filters ===

#[test]
fn filter_matching() {
    for (f, t, m) in [
        ("a/b", "a/b", true),
        ("a/+", "a/b", true),
        ("a/+", "a/b/c", false),
        ("a/#", "a", true),
        ("a/#", "a/b/c", true),
        ("#", "a/b", true),
        ("#", "$SYS/x", false),
        ("+/x", "$SYS/x", false),
        ("$SYS/#", "$SYS/x", true),
        ("a/+/c", "a//c", true),
        ("a/b", "a/b/", false),
    ] {
        assert_eq!(matches(f, t), m, "{f} vs {t}");
    }
}

#[test]
fn exclusion_coverage() {
    for (p, f, c) in [
        ("replies/#", "replies", true),
        ("replies/#", "replies/abc", true),
        ("replies/#", "replies/+/x", true),
        ("replies/#", "replies/#", true),
        ("replies/#", "other/x", false),
        ("a/+", "a/b", true),
        ("a/+", "a/+", true),
        ("a/+", "a/#", false),
        ("a/+", "a/b/c", false),
        ("a/b", "a/b", true),
        ("a/b", "a/+", false),
        ("#", "anything/at/all", true),
    ] {
        assert_eq!(covers(p, f), c, "{p} covers {f}");
    }
    let r = rules(&["replies/#", "broadcast"]);
    assert!(r.shares("orders/new"));
    assert!(!r.shares("replies/x"));
    assert!(!r.shares("broadcast"));
    assert!(r.shares("broadcast/x"));
    assert!(!r.shares("$SYS/#"));
    assert!(!r.shares("$share/g/t"));
    assert!(!r.shares("$queue/t"));
}

#[test]
fn filter_validation() {
    for f in ["a", "a/b", "+", "#", "a/+/b", "a/#", "/", "+/+"] {
        assert!(valid_filter(f), "{f}");
    }
    for f in ["", "a#", "a/#/b", "a+/b", "##"] {
        assert!(!valid_filter(f), "{f}");
    }
}

#[test]
fn retained_replays_are_recognised_only_on_shared_filters() {
    let sub = |filter: &str, shared, rap| Subscription {
        filter: filter.into(),
        shared,
        retain_as_published: rap,
    };
    let mut s = Subscriptions::default();
    s.subscribe(vec![
        sub("state/#", true, false),
        sub("state/config", false, false),
        sub("rap/#", true, true),
        sub("$share/own/mine/#", false, false),
    ]);
    assert!(s.only_shared_replay("state/a"));
    assert!(!s.only_shared_replay("state/config")); // also unshared
    assert!(!s.only_shared_replay("rap/x")); // Retain As Published: ambiguous
    assert!(!s.only_shared_replay("mine/x")); // the client's own $share
    assert!(!s.only_shared_replay("other"));
    s.unsubscribe(&["state/config".into()]);
    assert!(s.only_shared_replay("state/config"));
    s.subscribe(vec![sub("state/#", true, true)]);
    assert!(!s.only_shared_replay("state/a"));
}
