//! Properties of the core's two head rewrites, over generated requests and responses: nothing
//! panics, and what the core forwards is what `Proxy::handle` would let through.

use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use crate::credentials::carries_tandem_token;
use crate::routes::{InstanceSpec, ReplicaSpec, Routes};
use crate::{policy, ticket, ProxyConfig, ProxyStats};

fn spec(name: &str, ha: bool, secret: bool) -> InstanceSpec {
    InstanceSpec {
        certificate: None,
        asleep: false,
        editor_secret: secret.then(|| "s3cret".to_string()),
        http_auth: Default::default(),
        name: name.into(),
        hosts: vec![format!("{name}.localhost")],
        ha,
        affinity: ha,
        hold: false,
        replicas: (0..if ha { 2 } else { 1 })
            .map(|i| ReplicaSpec {
                id: format!("{name}-r{i}"),
                addr: format!("127.0.0.1:{}", 20000 + i).parse().unwrap(),
                ready: true,
            })
            .collect(),
        health: None,
    }
}

/// A proxy for `open` (no secret), `ha` (HA, affinity) and `secret` (an admin secret).
fn proxy() -> Proxy {
    let routes = Arc::new(Routes::new());
    routes
        .publish(&[
            spec("open", false, false),
            spec("ha", true, false),
            spec("secret", false, true),
        ])
        .unwrap();
    let config = ProxyConfig {
        access_log: false,
        ..ProxyConfig::default()
    };
    Proxy::new(routes, config, Arc::new(ProxyStats::default()))
}

fn one_of(items: &'static [&'static str]) -> impl Strategy<Value = String> {
    proptest::sample::select(items).prop_map(str::to_string)
}

/// `s` with each letter's case flipped at random.
fn any_case(s: String) -> impl Strategy<Value = String> {
    let n = s.len();
    proptest::collection::vec(any::<bool>(), n).prop_map(move |upper| {
        s.chars()
            .zip(&upper)
            .map(|(c, u)| if *u { c.to_ascii_uppercase() } else { c })
            .collect()
    })
}

/// A header the core forwards, drops or strips (most of them), or one of those that frame or
/// route a request, which decide whether the core takes it at all.
fn header() -> impl Strategy<Value = (String, String)> {
    let handled = one_of(&[
        "x-custom",
        "cookie",
        "authorization",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-tandem-token",
        "te",
        "trailer",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
    ]);
    let framing = one_of(&[
        "host",
        "content-length",
        "connection",
        "upgrade",
        "expect",
        "transfer-encoding",
    ]);
    let name = prop_oneof![12 => handled, 1 => framing].prop_flat_map(any_case);
    let value = one_of(&[
        "close",
        "keep-alive",
        "keep-alive, x-custom",
        "Bearer tdm_abc",
        "bearer\ttdh_xyz",
        "Basic dXNlcg==",
        "Bearer flow-token",
        "tandem_session=abc; a=b",
        "a=1; tandem_affinity=ha-r1",
        "tandem_affinity=",
        "0",
        "3",
        "12",
        "99999999999999",
        "-1",
        "chunked",
        "100-continue",
        "websocket",
        "1.2.3.4",
        "open.localhost",
        "ha.localhost",
        "s3cret",
        "",
        "\u{e9}t\u{e9}",
    ]);
    (name, value)
}

fn target() -> impl Strategy<Value = String> {
    let base = one_of(&[
        "/",
        "/hello",
        "/admin",
        "/ADMIN/flows",
        "//admin",
        "/./admin",
        "/%61dmin",
        "/x/../admin",
        "/admin?x=1",
        "/admin/",
        "/adminx",
        "/_tandem/editor-ticket",
        "/_TANDEM/editor-ticket?ticket=x",
        "/a?b=1",
        "*",
        "http://open.localhost/x",
        "/a#b",
        "/a b",
    ]);
    let tail = prop_oneof![
        3 => Just(String::new()),
        2 => one_of(&["/", "x", "%2e%2e/admin", "?q", ";p", "/..", "/./admin", "%2F..%2Fadmin"]),
        1 => one_of(&["\\admin", "{}", "\t", "#x"]),
    ];
    (base, tail).prop_map(|(b, t)| b + &t)
}

fn request() -> impl Strategy<Value = Vec<u8>> {
    let method = one_of(&[
        "GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH", "CONNECT", "get",
    ]);
    let host = prop_oneof![
        6 => one_of(&["open.localhost", "HA.localhost:8080", "secret.localhost."]).prop_map(Some),
        1 => proptest::option::of(one_of(&[
            "unknown.localhost",
            "",
            "open.localhost, ha.localhost",
            "[::1]",
        ])),
    ];
    let version =
        prop_oneof![8 => Just("HTTP/1.1".to_string()), 1 => one_of(&["HTTP/1.0", "HTTP/2"])];
    let headers = proptest::collection::vec(header(), 0..6);
    let body = proptest::collection::vec(any::<u8>(), 0..16);
    (method, target(), version, host, headers, body).prop_map(
        |(method, target, version, host, headers, body)| {
            let mut r = format!("{method} {target} {version}\r\n");
            if let Some(h) = host {
                r += &format!("Host: {h}\r\n");
            }
            for (n, v) in headers {
                r += &format!("{n}: {v}\r\n");
            }
            r += "\r\n";
            let mut bytes = r.into_bytes();
            bytes.extend(body);
            bytes
        },
    )
}

/// Every header of `head` (a whole request or response head) by lower-case name.
fn headers_of(head: &[u8], request: bool) -> Vec<(String, Vec<u8>)> {
    let mut storage = [httparse::EMPTY_HEADER; 128];
    let parsed = if request {
        httparse::Request::new(&mut storage).parse(head)
    } else {
        httparse::Response::new(&mut storage).parse(head)
    };
    assert!(
        matches!(parsed, Ok(httparse::Status::Complete(_))),
        "not a whole head ({parsed:?}): {:?}",
        String::from_utf8_lossy(head)
    );
    storage
        .iter()
        .take_while(|h| !h.name.is_empty())
        .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
        .collect()
}

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "transfer-encoding",
    "proxy-authorization",
    "proxy-connection",
    "proxy-authenticate",
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn what_the_core_forwards_is_what_handle_would(req in request(), cut in 0usize..400) {
        let proxy = proxy();
        let mut out = Vec::new();
        // Any prefix of a request is safe to look at (the core reparses as bytes come).
        let _ = prepare(&proxy, &req[..cut.min(req.len())], &mut out, "10.0.0.1", false);
        let Prepared::Forward(r) = prepare(&proxy, &req, &mut out, "10.0.0.1", false) else {
            return Ok(());
        };
        let instance = &r.instance;
        let path = std::str::from_utf8(&req[r.path.clone()]).unwrap();
        // The policy's paths never pass the core.
        prop_assert!(!(instance.ha && policy::is_editor_path(path)), "{path}");
        if instance.editor_secret.is_some() {
            prop_assert!(!policy::is_editor_path(path), "{path}");
            prop_assert!(!ticket::is_ticket_path(path), "{path}");
        }
        let headers = headers_of(&out, true);
        let count = |n: &str| headers.iter().filter(|(k, _)| k == n).count();
        prop_assert_eq!(count("host"), 1);
        prop_assert_eq!(count("x-forwarded-for"), 1);
        prop_assert_eq!(count("x-forwarded-host"), 1);
        prop_assert_eq!(count("x-forwarded-proto"), 1);
        prop_assert_eq!(count("x-tandem-token"), 0);
        for h in HOP_BY_HOP {
            prop_assert_eq!(count(h), 0, "{}", h);
        }
        if instance.editor_secret.is_some() {
            for (k, v) in &headers {
                prop_assert!(!(k == "authorization" && carries_tandem_token(v)));
                prop_assert!(!(k == "cookie" && String::from_utf8_lossy(v).contains("tandem_session")));
            }
        }
        // The body is the declared one, whole, after the head.
        let declared = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .map_or(0, |(_, v)| std::str::from_utf8(v).unwrap().parse::<usize>().unwrap());
        let head_end = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        prop_assert_eq!(out.len() - head_end, declared);
        prop_assert_eq!(&out[head_end..], &req[r.len - declared..r.len]);
    }

    #[test]
    fn a_response_head_is_rewritten_or_refused_never_forged(
        status in one_of(&["200 OK", "204 No Content", "304 Not Modified", "101 Switching", "103 Hints", "2x0 Bad", "500 Oops"]),
        version in one_of(&["HTTP/1.1", "HTTP/1.0", "HTTP/2"]),
        headers in proptest::collection::vec((one_of(&[
            "content-length", "transfer-encoding", "connection", "keep-alive", "x-tandem-replica",
            "upgrade", "proxy-authenticate", "trailer", "x-custom", "set-cookie",
        ]), one_of(&["0", "5", "chunked", "gzip", "close", "keep-alive, x-custom", "forged", "a=b", ""])), 0..6),
        head_request in any::<bool>(),
        cut in 0usize..300,
    ) {
        let mut resp = format!("{version} {status}\r\n");
        for (n, v) in &headers {
            resp += &format!("{n}: {v}\r\n");
        }
        resp += "\r\n";
        let bytes = resp.into_bytes();
        let (_tx, drain) = tokio::sync::watch::channel(false);
        let add = Additions {
            replica: Some(b"open-r0"),
            affinity: None,
            close: false,
            drain: &drain,
            head: head_request,
        };
        let mut out = Vec::new();
        let _ = response_head(&bytes[..cut.min(bytes.len())], &mut out, &add);
        if let Ok(Some(answer)) = response_head(&bytes, &mut out, &add) {
            prop_assert!(!(100..200).contains(&answer.status));
            let seen = headers_of(&out, false);
            let count = |n: &str| seen.iter().filter(|(k, _)| k == n).count();
            prop_assert_eq!(count("x-tandem-replica"), 1);
            prop_assert!(seen.iter().any(|(k, v)| k == "x-tandem-replica" && v == b"open-r0"));
            for h in ["keep-alive", "upgrade", "proxy-authenticate"] {
                prop_assert_eq!(count(h), 0, "{}", h);
            }
            // The client's connection is closed exactly when it says so.
            prop_assert_eq!(count("connection"), usize::from(answer.close));
            // Named by `Connection`: hop-by-hop too.
            let named = headers.iter().any(|(n, v)| n == "connection" && v.contains("x-custom"));
            if named {
                prop_assert_eq!(count("x-custom"), 0);
            }
        }
    }
}
