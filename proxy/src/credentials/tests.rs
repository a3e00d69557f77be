//! Unit and property tests of the credential parser and stripping.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use http::header::{self, HeaderMap, HeaderValue};
use proptest::prelude::*;

use super::*;

fn headers(pairs: &[(&str, &[u8])]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (name, value) in pairs {
        h.append(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_bytes(value).unwrap(),
        );
    }
    h
}

fn values(h: &HeaderMap, name: header::HeaderName) -> Vec<&[u8]> {
    h.get_all(name).iter().map(HeaderValue::as_bytes).collect()
}

#[test]
fn bearer_takes_any_whitespace_and_any_case() {
    for v in [
        "Bearer tdm_x",
        "bearer tdm_x",
        "BEARER tdm_x",
        "bEaReR tdm_x",
        "Bearer\ttdm_x",
        "Bearer  tdm_x",
        "Bearer \t \ttdm_x",
        " Bearer tdm_x",
        "\tBearer tdm_x \t",
        "Bearer tdm_x  ",
    ] {
        assert_eq!(bearer_token(v), Some("tdm_x"), "{v:?}");
        let h = headers(&[("authorization", v.as_bytes())]);
        assert_eq!(bearer(&h), Some("tdm_x"), "{v:?}");
    }
    for v in [
        "",
        "Bearer",
        "Bearer ",
        "Bearer \t ",
        "Bearertdm_x",
        "Basic tdm_x",
        "Bearer-tdm_x",
        "Token tdm_x",
        "tdm_x",
    ] {
        assert_eq!(bearer_token(v), None, "{v:?}");
    }
    // A flow's own token is a bearer token too: the API looks it up and refuses it.
    assert_eq!(bearer_token("Bearer flow-token"), Some("flow-token"));
    // Not text: not accepted (the API reads text only).
    let h = headers(&[("authorization", b"Bearer tdm_\xe9")]);
    assert_eq!(bearer(&h), None);
}

#[test]
fn every_form_of_a_tandem_token_is_stripped() {
    for v in [
        &b"Bearer tdm_abc"[..],
        b"bearer\ttdm_abc",
        b"BEARER  \t tdm_abc ",
        b"  Bearer tdm_abc",
        b"Bearer flow, Bearer tdm_abc",
        b"Token tdm_abc",
        b"tdm_abc",
        b"Custom token=\"tdm_abc\"",
        b"Bearer tdm_\xe9",
    ] {
        let mut h = headers(&[("authorization", v)]);
        strip(&mut h);
        assert!(
            h.get(header::AUTHORIZATION).is_none(),
            "{:?}",
            String::from_utf8_lossy(v)
        );
    }
}

#[test]
fn every_authorization_header_is_looked_at() {
    let mut h = headers(&[
        ("authorization", b"Bearer flow-one"),
        ("authorization", b"Bearer\ttdm_abc"),
        ("authorization", b"Basic Zmxvdzp0d28="),
        ("authorization", b"bearer tdm_def"),
    ]);
    strip(&mut h);
    assert_eq!(
        values(&h, header::AUTHORIZATION),
        [&b"Bearer flow-one"[..], b"Basic Zmxvdzp0d28="]
    );
}

#[test]
fn a_flows_own_credentials_pass() {
    for v in [
        &b"Bearer flow-token"[..],
        b"Basic dXNlcjpwYXNz",
        b"Bearer xtdm_abc",
        b"Bearer my-tdm_abc",
    ] {
        let mut h = headers(&[("authorization", v)]);
        strip(&mut h);
        assert_eq!(values(&h, header::AUTHORIZATION), [v]);
    }
}

#[test]
fn session_cookie_goes_in_every_cookie_header_and_other_cookies_stay() {
    let mut h = headers(&[
        ("cookie", b"theme=dark; tandem_session=s3cret"),
        ("cookie", b"lang=en"),
        ("cookie", "name=Jos\u{e9}".as_bytes()),
        ("cookie", b" tandem_session=again ;x=1"),
        ("authorization", b"Bearer tdm_abc"),
        ("x-tandem-token", b"guess"),
    ]);
    assert_eq!(session_cookie(&h), Some("s3cret"));
    strip(&mut h);
    assert_eq!(
        values(&h, header::COOKIE),
        ["theme=dark; lang=en; name=Jos\u{e9}; x=1".as_bytes()]
    );
    assert_eq!(session_cookie(&h), None);
    assert!(h.get(header::AUTHORIZATION).is_none());
    assert!(h.get(ADMIN_TOKEN).is_none());

    // Only Tandem's cookie: the header goes.
    let mut h = headers(&[("cookie", b"tandem_session=x")]);
    strip(&mut h);
    assert!(h.get(header::COOKIE).is_none());
}

// === Properties ===

/// Whitespace as a client may put it around and inside a header value.
fn ws(min: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(prop_oneof![Just(' '), Just('\t')], min..4)
        .prop_map(|v| v.into_iter().collect())
}

/// `Bearer` in any case.
fn scheme() -> impl Strategy<Value = String> {
    proptest::collection::vec(any::<bool>(), 6).prop_map(|upper| {
        "bearer"
            .chars()
            .zip(upper)
            .map(|(c, u)| if u { c.to_ascii_uppercase() } else { c })
            .collect()
    })
}

/// An `Authorization` value: a bearer token in any spelling, or any bytes a header may hold.
fn authorization() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        (ws(0), scheme(), ws(1), "(tdm_)?[!-~]{0,12}", ws(0))
            .prop_map(|(a, s, b, t, c)| format!("{a}{s}{b}{t}{c}").into_bytes()),
        "[ -~\t]{0,40}".prop_map(String::into_bytes),
        proptest::collection::vec(
            any::<u8>().prop_filter("header byte", |b| *b == b'\t' || *b >= 0x20 && *b != 0x7f),
            0..40
        ),
    ]
}

fn cookie() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(
        prop_oneof![
            "[ \t]{0,2}tandem_session=[!-:<-~]{0,10}[ \t]{0,2}",
            "[a-z_]{1,8}=[!-:<-~]{0,10}",
            "[ -~]{0,12}",
        ],
        0..4,
    )
    .prop_map(|parts| parts.join(";").into_bytes())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Whatever the API accepts as a `tdm_` token never reaches a flow, nor does the session.
    #[test]
    fn what_the_api_accepts_is_stripped(
        auths in proptest::collection::vec(authorization(), 0..4),
        cookies in proptest::collection::vec(cookie(), 0..3),
    ) {
        let mut h = HeaderMap::new();
        for a in &auths {
            if let Ok(v) = HeaderValue::from_bytes(a) {
                h.append(header::AUTHORIZATION, v);
            }
        }
        for c in &cookies {
            if let Ok(v) = HeaderValue::from_bytes(c) {
                h.append(header::COOKIE, v);
            }
        }
        let accepted: Vec<Vec<u8>> = h
            .get_all(header::AUTHORIZATION)
            .iter()
            .filter(|v| {
                v.to_str()
                    .ok()
                    .and_then(bearer_token)
                    .is_some_and(|t| t.starts_with(TOKEN_PREFIX))
            })
            .map(|v| v.as_bytes().to_vec())
            .collect();
        let had_session = session_cookie(&h).is_some();
        let before = h.clone();
        strip(&mut h);
        for v in &accepted {
            prop_assert!(carries_tandem_token(v));
            prop_assert!(!values(&h, header::AUTHORIZATION).contains(&v.as_slice()));
        }
        prop_assert!(bearer(&h).is_none_or(|t| !t.starts_with(TOKEN_PREFIX)));
        prop_assert_eq!(session_cookie(&h), None);
        if !had_session && !before.contains_key(header::COOKIE) {
            prop_assert!(!h.contains_key(header::COOKIE));
        }
        // Idempotent: stripping again changes nothing.
        let once = h.clone();
        strip(&mut h);
        prop_assert_eq!(once, h);
    }
}
