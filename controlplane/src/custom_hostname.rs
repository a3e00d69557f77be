//! Custom hostnames of instances (issue 16): a host of an owner's own domain
//! (`flows.example.org`), routed like the instance's `<name>.<base domain>`, with a certificate
//! the proxies' HTTPS listeners serve for it when one is uploaded. The API that sets them is
//! [`crate::api::custom_hostname`]; [`crate::desired`] puts them in every instance's desired
//! state, and so in the route table and the standalone proxies' feed.
//!
//! A hostname is at most one per instance and unique on the platform (`custom_hostnames`). The
//! private key is sealed with the platform key ([`crate::secrets::PlatformKey::seal`], as secret
//! variables are) for the instance, bound to the hostname: a copy of the database holds no key,
//! and a sealed key moved to another row does not open. It is opened only to build the desired
//! state, never shown.

use std::collections::HashMap;

use sqlx::Row;
use tandem_proxy::tls::PemKeyPair;

use crate::secrets::PlatformKey;
use crate::state::AppState;

/// The purpose custom hostnames' keys are sealed for.
const PURPOSE: &str = "custom-hostname-key";

/// Largest certificate chain, and largest key, an owner may upload, in bytes (PEM).
pub const MAX_PEM_BYTES: usize = 64 * 1024;

/// Why a name cannot be a custom hostname. Each message says what to give instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostnameError {
    /// `*.example.org`.
    #[error("is a wildcard: give one host, such as flows.example.org")]
    Wildcard,
    /// `https://flows.example.org/`.
    #[error("is a URL: give the host alone, such as flows.example.org")]
    Url,
    /// `flows.example.org:8443`.
    #[error("has a port: give the host alone (the proxies listen on their own ports)")]
    Port,
    /// `192.0.2.1`, `[2001:db8::1]`, or a name resolvers take for an address (`10.1`).
    #[error("is an IP address: give a DNS name, such as flows.example.org")]
    IpAddress,
    /// Not a DNS name.
    #[error("is not a DNS name: use labels of 1 to 63 of a-z, 0-9 and '-', not starting or ending with '-', joined by dots, at most 253 characters in all")]
    NotDnsName,
    /// One label only (`intranet`).
    #[error("has no dot: give a full name, such as flows.example.org")]
    NoDot,
    /// `localhost` or under it.
    #[error("is localhost or under it, which names every machine itself: give a name of your own domain")]
    Localhost,
    /// The base domain or under it.
    #[error(
        "is {0} or under it: those are Tandem's own instance hosts; give a name of your own domain"
    )]
    BaseDomain(String),
}

/// The hostname `raw` stands for, lower-cased and without a trailing dot, when it may be a
/// custom hostname on a platform whose instances are at `<name>.<base_domain>`: a DNS name with
/// a dot, not an IP address, not `localhost` or under it, not the base domain or under it, with
/// no port and no wildcard.
pub fn check_hostname(raw: &str, base_domain: &str) -> Result<String, HostnameError> {
    if raw.contains('*') {
        return Err(HostnameError::Wildcard);
    }
    if raw.contains('/') {
        return Err(HostnameError::Url);
    }
    let bare = raw.strip_suffix('.').unwrap_or(raw);
    let unbracketed = bare
        .strip_prefix('[')
        .and_then(|r| r.split_once(']'))
        .map_or(bare, |(ip, _)| ip);
    let before_port = bare.rsplit_once(':').map_or(bare, |(h, _)| h);
    if [bare, unbracketed, before_port]
        .iter()
        .any(|h| h.parse::<std::net::IpAddr>().is_ok())
    {
        return Err(HostnameError::IpAddress);
    }
    if raw.contains(':') {
        return Err(HostnameError::Port);
    }
    let host = tandem_proxy::routes::normalize_host(raw).ok_or(HostnameError::NotDnsName)?;
    let labels_ok = host.split('.').all(|l| {
        (1..=63).contains(&l.len())
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    });
    if !labels_ok || host.len() > 253 {
        return Err(HostnameError::NotDnsName);
    }
    if host == "localhost" || host.ends_with(".localhost") {
        return Err(HostnameError::Localhost);
    }
    let Some((_, top)) = host.rsplit_once('.') else {
        return Err(HostnameError::NoDot);
    };
    // No top-level domain is all digits: `10.1` or `127.0.0.010` is an address to resolvers.
    if top.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HostnameError::IpAddress);
    }
    let base = base_domain.trim_end_matches('.').to_ascii_lowercase();
    if host == base || host.ends_with(&format!(".{base}")) {
        return Err(HostnameError::BaseDomain(base));
    }
    Ok(host.into_owned())
}

/// Seals the private key `key` of the certificate for `hostname` of instance `instance_id`.
pub fn seal_key(
    platform: &PlatformKey,
    instance_id: &str,
    hostname: &str,
    key: &str,
) -> anyhow::Result<String> {
    platform.seal(PURPOSE, instance_id, hostname, key)
}

/// Opens what [`seal_key`] sealed; `None` when it does not open.
pub fn open_key(
    platform: &PlatformKey,
    instance_id: &str,
    hostname: &str,
    sealed: &str,
) -> Option<String> {
    platform.open(PURPOSE, instance_id, hostname, sealed)
}

/// An instance's custom hostname as the proxies get it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed {
    /// The hostname.
    pub hostname: String,
    /// Its certificate and key, the key opened; `None` without one.
    pub certificate: Option<PemKeyPair>,
}

/// Every instance's custom hostname, by instance id, in one query: for the desired state.
///
/// A hostname the platform's base domain now covers (the base domain changed since it was
/// set) is left out with a warning: it would take another instance's host. A key that does not
/// open (another platform key, a damaged row) leaves the certificate out, with a warning; the
/// hostname is still routed.
pub async fn load_all(state: &AppState) -> Result<HashMap<String, Routed>, sqlx::Error> {
    let rows =
        sqlx::query("SELECT instance_id, hostname, certificate, key_sealed FROM custom_hostnames")
            .fetch_all(&state.store.pool)
            .await?;
    let mut out = HashMap::with_capacity(rows.len());
    for r in &rows {
        let id: String = r.get(0);
        let hostname: String = r.get(1);
        if let Err(e) = check_hostname(&hostname, &state.config.base_domain) {
            tracing::warn!(instance = %id, hostname = %hostname, error = %e, "custom hostname left out of the routes");
            continue;
        }
        let certificate = match (r.get::<Option<String>, _>(2), r.get::<Option<String>, _>(3)) {
            (Some(certificate), Some(sealed)) => {
                match open_key(&state.key, &id, &hostname, &sealed) {
                    Some(key) => Some(PemKeyPair { certificate, key }),
                    None => {
                        tracing::warn!(instance = %id, hostname = %hostname, "the key of a custom hostname's certificate does not open; certificate left out");
                        None
                    }
                }
            }
            _ => None,
        };
        out.insert(
            id,
            Routed {
                hostname,
                certificate,
            },
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames_are_normalized_and_checked() {
        let base = "tandem.example";
        for (raw, want) in [
            ("flows.customer.org", "flows.customer.org"),
            ("Flows.Customer.ORG.", "flows.customer.org"),
            ("a-b.c1.io", "a-b.c1.io"),
            ("xn--bcher-kva.example", "xn--bcher-kva.example"),
            ("tandem.example.org", "tandem.example.org"),
            ("nottandem.example", "nottandem.example"),
        ] {
            assert_eq!(check_hostname(raw, base).as_deref(), Ok(want), "{raw}");
        }
        let long = format!("{}.org", vec!["a".repeat(63); 4].join("."));
        let too_long_label = format!("{}.org", "a".repeat(64));
        for (raw, want) in [
            ("*.customer.org", HostnameError::Wildcard),
            ("flows.customer.org:8443", HostnameError::Port),
            ("flows.customer.org:", HostnameError::Port),
            ("192.0.2.1", HostnameError::IpAddress),
            ("192.0.2.1.", HostnameError::IpAddress),
            ("192.0.2.1:80", HostnameError::IpAddress),
            ("2001:db8::1", HostnameError::IpAddress),
            ("[2001:db8::1]", HostnameError::IpAddress),
            ("[::1]:8080", HostnameError::IpAddress),
            ("10.1", HostnameError::IpAddress),
            ("127.0.0.010", HostnameError::IpAddress),
            ("localhost", HostnameError::Localhost),
            ("app.localhost", HostnameError::Localhost),
            ("intranet", HostnameError::NoDot),
            ("", HostnameError::NotDnsName),
            ("a..b", HostnameError::NotDnsName),
            ("-a.org", HostnameError::NotDnsName),
            ("a-.org", HostnameError::NotDnsName),
            ("under_score.org", HostnameError::NotDnsName),
            ("sp ace.org", HostnameError::NotDnsName),
            ("http://flows.customer.org", HostnameError::Url),
            ("flows.customer.org/x", HostnameError::Url),
            ("ünï.org", HostnameError::NotDnsName),
            (&long, HostnameError::NotDnsName),
            (&too_long_label, HostnameError::NotDnsName),
            ("tandem.example", HostnameError::BaseDomain(base.into())),
            ("TANDEM.example.", HostnameError::BaseDomain(base.into())),
            (
                "orders.tandem.example",
                HostnameError::BaseDomain(base.into()),
            ),
            ("a.b.tandem.example", HostnameError::BaseDomain(base.into())),
        ] {
            assert_eq!(check_hostname(raw, base), Err(want), "{raw:?}");
        }
        assert_eq!(
            check_hostname("x.example.org", "Example.org."),
            Err(HostnameError::BaseDomain("example.org".into()))
        );
    }

    #[test]
    fn a_sealed_key_opens_only_for_its_instance_and_hostname() {
        let k = PlatformKey::from_bytes([3; 32]);
        let pem = "-----BEGIN PRIVATE KEY-----\nsecret\n-----END PRIVATE KEY-----\n";
        let sealed = seal_key(&k, "i1", "a.example.org", pem).unwrap_or_default();
        assert!(!sealed.contains("secret"));
        assert_eq!(
            open_key(&k, "i1", "a.example.org", &sealed).as_deref(),
            Some(pem)
        );
        assert_eq!(open_key(&k, "i2", "a.example.org", &sealed), None);
        assert_eq!(open_key(&k, "i1", "b.example.org", &sealed), None);
        // Not a secret variable's seal: another purpose's key.
        assert_eq!(
            crate::env_secrets::open(&k, "i1", "a.example.org", &sealed),
            None
        );
    }
}
