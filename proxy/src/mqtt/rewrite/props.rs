//! Property tests of the rewrites: no panic on any input, and every packet a rewrite produces
//! is framed right and reads again (with the proxy's own reader and with rumqttc's decoder).
//!
//! Inputs are arbitrary bytes behind a right fixed header, and packets built with arbitrary
//! fields: client ids and filters up to MQTT's 65,535-byte string limit, where a rewrite that
//! adds a suffix or a `$share/<group>/` prefix must refuse instead of writing a wrong length.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::BytesMut;
use proptest::prelude::*;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;

use super::*;
use crate::mqtt::frame::parse_header;

const PROTOCOLS: [Protocol; 3] = [Protocol::V31, Protocol::V311, Protocol::V5];

/// A packet with a right fixed header around `body`.
fn packet(byte1: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![byte1];
    put_remaining_length(&mut out, body.len());
    out.extend_from_slice(body);
    out
}

fn header_of(frame: &[u8]) -> Header {
    let h = parse_header(frame, usize::MAX).unwrap().unwrap();
    assert_eq!(h.frame_len(), frame.len(), "the packet is framed right");
    h
}

fn mqtt_string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&u16::try_from(s.len()).unwrap().to_be_bytes());
    out.extend_from_slice(s);
}

fn rules() -> impl Strategy<Value = ShareRules> {
    (
        "[a-z][a-z0-9-]{0,20}",
        proptest::collection::vec("[a-z+#/$]{1,6}", 0..3),
    )
        .prop_map(|(group, exclude)| ShareRules { group, exclude })
}

/// Strings as clients send them, and some at the length limit of an MQTT string.
fn mqtt_text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z0-9/+#$]{0,12}",
        2 => any::<String>().prop_filter("fits", |s| s.len() <= 64),
        1 => (65_400usize..=65_535).prop_map(|n| "t".repeat(n)),
    ]
}

fn qos4() -> impl Strategy<Value = rumqttc::QoS> {
    prop_oneof![
        Just(rumqttc::QoS::AtMostOnce),
        Just(rumqttc::QoS::AtLeastOnce),
        Just(rumqttc::QoS::ExactlyOnce)
    ]
}

fn qos5() -> impl Strategy<Value = rumqttc::v5::mqttbytes::QoS> {
    use rumqttc::v5::mqttbytes::QoS;
    prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce)
    ]
}

/// A SUBSCRIBE or UNSUBSCRIBE that rumqttc encodes, with the protocol it is for.
fn sub_packets() -> impl Strategy<Value = (Vec<u8>, Protocol)> {
    let filters = || proptest::collection::vec(mqtt_text(), 1..4);
    prop_oneof![
        (
            any::<u16>(),
            proptest::collection::vec((mqtt_text(), qos4()), 1..4)
        )
            .prop_map(|(pkid, filters)| {
                let mut sub = v4::Subscribe::new_many(
                    filters
                        .into_iter()
                        .map(|(path, qos)| v4::SubscribeFilter { path, qos }),
                );
                sub.pkid = pkid;
                let mut b = BytesMut::new();
                sub.write(&mut b).unwrap();
                (b.to_vec(), Protocol::V311)
            }),
        (
            any::<u16>(),
            proptest::collection::vec(
                (mqtt_text(), qos5(), any::<bool>(), any::<bool>(), 0u8..3),
                1..4
            ),
            proptest::option::of((
                proptest::option::of(1usize..268_435_455),
                proptest::collection::vec(("[a-z]{0,4}", "[a-z]{0,4}"), 0..2)
            )),
        )
            .prop_map(|(pkid, filters, props)| {
                let filters = filters
                    .into_iter()
                    .map(|(path, qos, nolocal, rap, rh)| v5::Filter {
                        path,
                        qos,
                        nolocal,
                        preserve_retain: rap,
                        retain_forward_rule: match rh {
                            0 => v5::RetainForwardRule::OnEverySubscribe,
                            1 => v5::RetainForwardRule::OnNewSubscribe,
                            _ => v5::RetainForwardRule::Never,
                        },
                    });
                let props = props.map(|(id, user_properties)| v5::SubscribeProperties {
                    id,
                    user_properties,
                });
                let mut sub = v5::Subscribe::new_many(filters, props);
                sub.pkid = pkid;
                let mut b = BytesMut::new();
                sub.write(&mut b).unwrap();
                (b.to_vec(), Protocol::V5)
            }),
        (any::<u16>(), filters()).prop_map(|(pkid, topics)| {
            let unsub = v4::Unsubscribe { pkid, topics };
            let mut b = BytesMut::new();
            unsub.write(&mut b).unwrap();
            (b.to_vec(), Protocol::V311)
        }),
        (any::<u16>(), filters()).prop_map(|(pkid, filters)| {
            let unsub = v5::Unsubscribe {
                pkid,
                filters,
                properties: None,
            };
            let mut b = BytesMut::new();
            unsub.write(&mut b).unwrap();
            (b.to_vec(), Protocol::V5)
        }),
    ]
}

/// A CONNECT of any supported version with arbitrary fields, built by hand (rumqttc cannot
/// write MQTT 3.1 or every flag combination): the packet, the bytes before its client id (after
/// the fixed header), the client id, and the bytes after it.
fn connect_packets() -> impl Strategy<Value = (Vec<u8>, Vec<u8>, String, Vec<u8>)> {
    (
        prop::sample::select(&PROTOCOLS[..]),
        any::<u8>().prop_map(|f| f & !0x01),
        any::<u16>(),
        proptest::collection::vec(any::<u8>(), 0..40),
        mqtt_text(),
        proptest::collection::vec(any::<u8>(), 0..40),
    )
        .prop_map(|(protocol, flags, keep_alive, props, id, payload)| {
            let mut body = Vec::new();
            match protocol {
                Protocol::V31 => {
                    mqtt_string(&mut body, b"MQIsdp");
                    body.push(3);
                }
                Protocol::V311 => {
                    mqtt_string(&mut body, b"MQTT");
                    body.push(4);
                }
                Protocol::V5 => {
                    mqtt_string(&mut body, b"MQTT");
                    body.push(5);
                }
            }
            body.push(flags);
            body.extend_from_slice(&keep_alive.to_be_bytes());
            if protocol == Protocol::V5 {
                put_remaining_length(&mut body, props.len());
                body.extend_from_slice(&props);
            }
            let head = body.clone();
            mqtt_string(&mut body, id.as_bytes());
            body.extend_from_slice(&payload);
            (packet(0x10, &body), head, id, payload)
        })
}

/// Checks a SUBSCRIBE or UNSUBSCRIBE rewrite: when it produced a packet, that packet is framed
/// right, rumqttc reads it, and rewriting it again changes nothing (every filter is shared or
/// was left alone on purpose).
fn check_rewrite(
    frame: &[u8],
    protocol: Protocol,
    rules: &ShareRules,
) -> Result<(), TestCaseError> {
    let h = header_of(frame);
    let produced = match h.kind() {
        8 => subscribe(frame, &h, protocol, rules).map(|r| (r.packet, r.filters.len())),
        _ => unsubscribe(frame, &h, protocol, rules).map(|r| (r.packet, r.filters.len())),
    };
    let Ok((Some(out), n)) = produced else {
        return Ok(());
    };
    let h2 = header_of(&out);
    prop_assert_eq!(h2.byte1, h.byte1);
    match protocol {
        Protocol::V5 => {
            prop_assert!(v5::Packet::read(&mut BytesMut::from(&out[..]), None).is_ok());
        }
        _ => {
            prop_assert!(v4::Packet::read(&mut BytesMut::from(&out[..]), usize::MAX).is_ok());
        }
    }
    let again = match h2.kind() {
        8 => subscribe(&out, &h2, protocol, rules).map(|r| (r.packet, r.filters.len())),
        _ => unsubscribe(&out, &h2, protocol, rules).map(|r| (r.packet, r.filters.len())),
    };
    prop_assert_eq!(again, Ok((None, n)));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any bytes after a right fixed header: every reader answers without panicking.
    #[test]
    fn any_packet_body_is_read_without_panic(
        byte1 in prop_oneof![Just(0x10u8), Just(0x82), Just(0xa2), Just(0x30), Just(0x62), any::<u8>()],
        body in proptest::collection::vec(any::<u8>(), 0..160),
        rules in rules(),
        suffix in proptest::option::of("-r[0-9]{1,2}"),
    ) {
        let frame = packet(byte1.max(0x10), &body);
        let h = header_of(&frame);
        if let Ok(c) = connect(&frame, &h, suffix.as_deref()) {
            if let Some(out) = c.rewritten {
                let h2 = header_of(&out);
                let again = connect(&out, &h2, None).unwrap();
                prop_assert_eq!(again.protocol, c.protocol);
                prop_assert_eq!(again.client_id, format!("{}{}", c.client_id, suffix.unwrap_or_default()));
            }
        }
        for protocol in PROTOCOLS {
            if h.byte1 == 0x82 || h.byte1 == 0xa2 {
                check_rewrite(&frame, protocol, &rules)?;
            } else {
                prop_assert!(subscribe(&frame, &h, protocol, &rules).is_err());
                prop_assert!(unsubscribe(&frame, &h, protocol, &rules).is_err());
            }
        }
        if let Ok(c) = strip_credentials(&frame, &h) {
            // The stripped CONNECT has no credentials left, reads again with the same client
            // id, and is no longer than the input.
            let h2 = header_of(&c.stripped);
            let again = strip_credentials(&c.stripped, &h2).unwrap();
            prop_assert_eq!((again.username, again.password), (None, None));
            prop_assert_eq!(&again.stripped, &c.stripped);
            prop_assert_eq!(
                connect(&c.stripped, &h2, None).map(|c| c.client_id),
                connect(&frame, &h, None).map(|c| c.client_id)
            );
            prop_assert!(c.stripped.len() <= frame.len());
        }
        let _ = publish_topic(&frame, &h);
        let _ = packet_id(&frame, &h, "PUBREL");
    }

    /// A CONNECT with arbitrary fields: read right, and the spliced client id reads again with
    /// every other byte as sent; an id too long for the suffix is refused, not mangled.
    #[test]
    fn connect_splice_reads_again(
        (frame, head, id, payload) in connect_packets(),
        suffix in prop_oneof!["-r[0-9]{1,2}", ".{0,8}"],
    ) {
        let h = header_of(&frame);
        let c = match connect(&frame, &h, Some(&suffix)) {
            Ok(c) => c,
            // Only a V5 CONNECT whose arbitrary properties run past the packet fails to read.
            Err(PacketError::Truncated(_)) => return Ok(()),
            Err(PacketError::TooLong(_)) => {
                prop_assert!(id.len() + suffix.len() > usize::from(u16::MAX));
                return Ok(());
            }
            Err(e) => return Err(TestCaseError::fail(format!("unexpected error {e}"))),
        };
        prop_assert_eq!(&c.client_id, &id);
        match c.rewritten {
            None => prop_assert!(id.is_empty()),
            Some(out) => {
                let h2 = header_of(&out);
                let again = connect(&out, &h2, None).unwrap();
                prop_assert_eq!(again.protocol, c.protocol);
                prop_assert_eq!(again.client_id, format!("{id}{suffix}"));
                // Every other byte is as the client sent it.
                prop_assert_eq!(&out[h2.header_len..h2.header_len + head.len()], &head[..]);
                prop_assert!(out.ends_with(&payload));
                prop_assert_eq!(out.len() - h2.header_len, frame.len() - h.header_len + suffix.len());
            }
        }
    }

    /// SUBSCRIBE and UNSUBSCRIBE of MQTT 3.1.1 and 5 with arbitrary filters and options.
    #[test]
    fn filter_rewrites_read_again((frame, protocol) in sub_packets(), rules in rules()) {
        check_rewrite(&frame, protocol, &rules)?;
    }
}

/// The case the properties found: a filter that fits an MQTT string, but not once
/// `$share/<group>/` is put in front of it, is refused instead of sent with a wrapped length.
#[test]
fn a_filter_too_long_to_share_is_refused() {
    let rules = ShareRules {
        group: "orders".into(),
        exclude: Vec::new(),
    };
    let long = "t".repeat(usize::from(u16::MAX) - 5);
    let mut b = BytesMut::new();
    v4::Subscribe::new(long.clone(), rumqttc::QoS::AtLeastOnce)
        .write(&mut b)
        .unwrap();
    let h = header_of(&b);
    assert_eq!(
        subscribe(&b, &h, Protocol::V311, &rules),
        Err(PacketError::TooLong("SUBSCRIBE"))
    );
    let mut b = BytesMut::new();
    v5::Unsubscribe {
        pkid: 1,
        filters: vec![long],
        properties: None,
    }
    .write(&mut b)
    .unwrap();
    let h = header_of(&b);
    assert_eq!(
        unsubscribe(&b, &h, Protocol::V5, &rules),
        Err(PacketError::TooLong("UNSUBSCRIBE"))
    );
}
