//! Unit tests of the shared listener's login: credentials to replica, refusals and their
//! CONNACKs, the login timeout on paused time. Clients are in-memory pipes; the integration
//! tests (`tests/it/mqtt_shared.rs`) run the same through sockets and a real Mosquitto.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::BytesMut;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::mqtt::frame::{parse_header, put_remaining_length};
use crate::mqtt::MqttInstance;

/// "orders" (HA): r0 with token "tok-0", r1 without a token; "plain": r0 with token "tok-p".
/// Returns the list and the senders that keep the tokens open.
fn logins() -> (Logins, Vec<watch::Sender<()>>) {
    let mut logins = Logins::default();
    let mut senders = Vec::new();
    for (name, ha, replicas) in [
        ("orders", true, vec![(0, Some("tok-0")), (1, None)]),
        ("plain", false, vec![(0, Some("tok-p"))]),
    ] {
        let instance = Arc::new(InstanceState::new(&MqttInstance {
            name: name.into(),
            ha,
            exclude: vec![],
            replicas: vec![],
        }));
        for (slot, token) in replicas {
            let token = token.map(|t| {
                let (tx, rx) = watch::channel(());
                senders.push(tx);
                Token {
                    digest: parse_sha256(&token_sha256(t.as_bytes())).unwrap(),
                    open: rx,
                }
            });
            logins.insert(Replica {
                instance: instance.clone(),
                slot,
                stats: Arc::new(MqttReplicaStats::new(instance.name.clone(), slot)),
                token,
            });
        }
    }
    (logins, senders)
}

/// A CONNECT with client id "nodered" and the given credentials.
fn connect_v311(user: Option<&str>, pass: Option<&str>) -> Vec<u8> {
    let mut c = v4::Connect::new("nodered");
    c.login = user.map(|u| v4::Login::new(u, pass.unwrap_or_default()));
    let mut b = BytesMut::new();
    v4::Packet::Connect(c).write(&mut b, usize::MAX).unwrap();
    // rumqttc writes an empty password as none (flag and field), which is what no password
    // needs here; checked, in case a later rumqttc fixes that.
    let flags = b[parse_header(&b, usize::MAX).unwrap().unwrap().header_len + 7];
    assert_eq!(flags & 0x40 != 0, pass.is_some_and(|p| !p.is_empty()));
    b.to_vec()
}

fn connect_v5(user: &str, pass: &str) -> Vec<u8> {
    let mut b = BytesMut::new();
    v5::Packet::Connect(
        v5::Connect {
            keep_alive: 30,
            client_id: "nodered".into(),
            clean_start: true,
            properties: None,
        },
        None,
        Some(v5::Login {
            username: user.into(),
            password: pass.into(),
        }),
    )
    .write(&mut b, None)
    .unwrap();
    b.to_vec()
}

fn checked(logins: &Logins, frame: &[u8]) -> Result<(String, usize, Vec<u8>), LoginError> {
    let h = parse_header(frame, usize::MAX).unwrap().unwrap();
    check(logins, frame, &h)
        .map(|(r, _, stripped)| (r.instance.name.to_string(), r.slot, stripped.to_vec()))
}

fn refusal(r: Result<(String, usize, Vec<u8>), LoginError>) -> (Protocol, Refusal) {
    match r {
        Err(LoginError::Refused { protocol, reason }) => (protocol, reason),
        other => panic!("not a refusal: {other:?}"),
    }
}

#[test]
fn the_username_names_the_replica_and_the_token_hash_lets_it_in() {
    let (logins, _open) = logins();
    let (name, slot, stripped) =
        checked(&logins, &connect_v311(Some("orders-r0"), Some("tok-0"))).unwrap();
    assert_eq!((name.as_str(), slot), ("orders", 0));
    assert_eq!(stripped, connect_v311(None, None));
    let (name, slot, _) = checked(&logins, &connect_v5("plain-r0", "tok-p")).unwrap();
    assert_eq!((name.as_str(), slot), ("plain", 0));
}

#[test]
fn bad_credentials_are_refused_with_the_reason() {
    let (logins, _open) = logins();
    let cases = [
        (connect_v311(None, None), Refusal::NoUsername),
        (
            connect_v311(Some("orders-r7"), Some("tok-0")),
            Refusal::UnknownReplica("orders-r7".into()),
        ),
        (
            connect_v311(Some("nobody"), Some("x")),
            Refusal::UnknownReplica("nobody".into()),
        ),
        (
            // A slot written differently is another username.
            connect_v311(Some("orders-r00"), Some("tok-0")),
            Refusal::UnknownReplica("orders-r00".into()),
        ),
        (
            connect_v311(Some("orders-r0"), Some("tok-p")),
            Refusal::WrongPassword("orders-r0".into()),
        ),
        (
            connect_v311(Some("orders-r0"), None),
            Refusal::NoPassword("orders-r0".into()),
        ),
        (
            connect_v311(Some("orders-r1"), Some("tok-0")),
            Refusal::NoToken("orders-r1".into()),
        ),
    ];
    for (frame, reason) in cases {
        assert_eq!(
            refusal(checked(&logins, &frame)),
            (Protocol::V311, reason.clone()),
            "{reason}"
        );
    }
    assert_eq!(
        refusal(checked(&logins, &connect_v5("orders-r0", "wrong"))),
        (Protocol::V5, Refusal::WrongPassword("orders-r0".into()))
    );
    // A long username is cut short in the reason (it goes to the log).
    let long = "x".repeat(1000);
    let (_, reason) = refusal(checked(&logins, &connect_v311(Some(&long), Some("p"))));
    assert_eq!(reason, Refusal::UnknownReplica("x".repeat(64)));
    // No error message carries the password.
    let e = checked(
        &logins,
        &connect_v311(Some("orders-r0"), Some("secret-guess")),
    )
    .unwrap_err()
    .to_string();
    assert!(!e.contains("secret-guess"), "{e}");
}

#[test]
fn not_authorized_is_written_in_the_clients_version() {
    use rumqttc::v5::mqttbytes::v5::ConnectReturnCode as R5;
    use rumqttc::ConnectReturnCode as R4;
    for p in [Protocol::V31, Protocol::V311] {
        let b = not_authorized(p);
        assert_eq!(b, [0x20, 2, 0, 5]);
        let v4::Packet::ConnAck(ack) =
            v4::Packet::read(&mut BytesMut::from(b), usize::MAX).unwrap()
        else {
            panic!("not a CONNACK")
        };
        assert_eq!(ack.code, R4::NotAuthorized);
    }
    let b = not_authorized(Protocol::V5);
    let v5::Packet::ConnAck(ack) = v5::Packet::read(&mut BytesMut::from(b), None).unwrap() else {
        panic!("not a CONNACK")
    };
    assert_eq!((ack.code, ack.session_present), (R5::NotAuthorized, false));
}

#[test]
fn token_hashes_are_hex_sha256() {
    // FIPS 180-2's "abc".
    let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    assert_eq!(token_sha256(b"abc"), abc);
    let digest = parse_sha256(abc).unwrap();
    assert_eq!(parse_sha256(&abc.to_uppercase()), Some(digest));
    assert_eq!(digest[0], 0xba);
    assert_eq!(digest[31], 0xad);
    for bad in [
        "",
        &abc[1..],
        &format!("{abc}0"),
        &abc.replace('b', "g"),
        "é".repeat(32).as_str(),
    ] {
        assert_eq!(parse_sha256(bad), None, "{bad:?}");
    }
    assert!(same_digest(&digest, &digest));
    let mut other = digest;
    other[31] ^= 1;
    assert!(!same_digest(&digest, &other));
    assert_eq!(username("orders", 3), "orders-r3");
}

// === login() over a pipe ===

fn config() -> MqttConfig {
    let mut c = MqttConfig::new("127.0.0.1:1");
    c.login_timeout = Duration::from_secs(5);
    c
}

/// Runs `login` against what a client writes (then closing its sending side when `close`);
/// returns the outcome, every byte the proxy wrote back, and the rejected count.
async fn login_with(
    logins: Logins,
    sent: Vec<u8>,
    close: bool,
) -> (Result<Granted, LoginError>, Vec<u8>, u64) {
    let (mut client, mut server) = tokio::io::duplex(64 * 1024);
    let logins = ArcSwap::from_pointee(logins);
    let rejected = AtomicU64::new(0);
    let config = config();
    let client_side = async move {
        client.write_all(&sent).await.unwrap();
        if close {
            client.shutdown().await.unwrap();
        }
        let mut back = Vec::new();
        // The proxy closes its side after a refusal; after a grant it keeps it open.
        let _ = tokio::time::timeout(Duration::from_secs(30), client.read_to_end(&mut back)).await;
        back
    };
    let (r, back) = tokio::join!(login(&mut server, &logins, &config, &rejected), client_side);
    (r, back, rejected.load(Ordering::Relaxed))
}

#[tokio::test(start_paused = true)]
async fn a_granted_login_hands_on_the_stripped_connect_and_what_followed() {
    let (logins, _open) = logins();
    let subscribe = [0x82, 8, 0, 1, 0, 3, b'a', b'/', b'#', 1];
    let sent = [
        &connect_v311(Some("orders-r0"), Some("tok-0"))[..],
        &subscribe[..],
    ]
    .concat();
    let (r, back, rejected) = login_with(logins, sent, false).await;
    let g = r.unwrap();
    assert_eq!((g.instance.name.as_ref(), g.slot), ("orders", 0));
    assert_eq!(
        g.read.to_vec(),
        [&connect_v311(None, None)[..], &subscribe[..]].concat()
    );
    assert!(
        back.is_empty(),
        "the broker answers, not the proxy: {back:02x?}"
    );
    assert_eq!(rejected, 0);
}

#[tokio::test(start_paused = true)]
async fn a_refused_login_gets_connack_not_authorized_and_is_counted() {
    let (logins, _open) = logins();
    let (r, back, rejected) =
        login_with(logins, connect_v311(Some("orders-r0"), Some("nope")), false).await;
    assert!(matches!(
        r,
        Err(LoginError::Refused {
            reason: Refusal::WrongPassword(_),
            ..
        })
    ));
    assert_eq!(back, [0x20, 2, 0, 5]);
    assert_eq!(rejected, 1);

    let (logins, _open) = self::logins();
    let (_, back, _) = login_with(logins, connect_v5("orders-r1", "tok-0"), false).await;
    assert_eq!(back, [0x20, 3, 0, 0x87, 0]);
}

#[tokio::test(start_paused = true)]
async fn no_connect_in_time_or_not_a_connect_closes_without_an_answer() {
    // Half a CONNECT, then silence: closed at the login timeout.
    let (logins, _open) = logins();
    let partial = connect_v311(Some("orders-r0"), Some("tok-0"))[..10].to_vec();
    let (r, back, rejected) = login_with(logins, partial, false).await;
    assert!(
        matches!(r, Err(LoginError::Timeout(d)) if d == Duration::from_secs(5)),
        "{:?}",
        r.err()
    );
    assert!(back.is_empty());
    assert_eq!(rejected, 1);

    // A PINGREQ first.
    let (logins, _open) = self::logins();
    let (r, back, _) = login_with(logins, vec![0xc0, 0], false).await;
    assert!(matches!(r, Err(LoginError::NotConnect)), "{:?}", r.err());
    assert!(back.is_empty());

    // A CONNECT larger than a login may be, whatever max_packet_bytes allows.
    let (logins, _open) = self::logins();
    let mut huge = vec![0x10];
    put_remaining_length(&mut huge, MAX_LOGIN_BYTES + 1);
    let (r, _, _) = login_with(logins, huge, false).await;
    assert!(
        matches!(
            r,
            Err(LoginError::Conn(ConnError::Frame {
                source: frame::FrameError::TooLarge { .. },
                ..
            }))
        ),
        "{:?}",
        r.err()
    );

    // Connected and closed at once (a TCP probe): not counted.
    let (logins, _open) = self::logins();
    let (r, _, rejected) = login_with(logins, vec![], true).await;
    assert!(matches!(r, Err(LoginError::Closed)), "{:?}", r.err());
    assert_eq!(rejected, 0);
}
