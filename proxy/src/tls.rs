//! TLS termination: certificates chosen by SNI, reloaded when their files change, and HTTP/1.1
//! or HTTP/2 by ALPN.
//!
//! A proxy has two sources of certificates:
//! - **files** ([`TlsFiles`]): a default certificate (typically `*.<base-domain>`) and
//!   certificates for named hosts, from `tandem proxy --tls-cert/--tls-key`, the routes file's
//!   `[tls]` section, or `tandem serve --tls-cert/--tls-key`. They are checked every few seconds
//!   and reloaded when one changes; a broken rewrite is reported and the previous certificates
//!   keep serving.
//! - **routes**: an instance's own certificate ([`crate::InstanceSpec::certificate`]), for its
//!   custom hostname, which comes with the route table (the control plane's feed) and is parsed
//!   once when the table is built.
//!
//! Each certificate's expiry ([`expiry`], its `notAfter`) is a metric,
//! `tandem_proxy_certificate_expiry_timestamp_seconds`, and one expiring within
//! [`EXPIRY_WARNING`] is logged as a warning when it is loaded.
//!
//! For a client's SNI name the proxy serves, in order: the certificate of the instance at that
//! host when it covers the name, the files' certificate for that exact host, the files'
//! certificate for `*.<parent>`, and the default. Without SNI (an address typed in), the default.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::{Deserialize, Serialize};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{self, ServerConfig};

use crate::routes::{normalize_host, Routes};

/// A certificate that stops being valid within this time is logged as a warning when loaded.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 86_400);

/// The `notAfter` of `key`'s leaf, in seconds since the Unix epoch; warns when that is within
/// [`EXPIRY_WARNING`] (or past) of now. `what` names the certificate in the warning.
pub(crate) fn expiry_checked(key: &CertifiedKey, what: &str) -> Option<u64> {
    let not_after = expiry::not_after(key.cert.first()?)?;
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if not_after <= now {
        tracing::warn!(certificate = %what, not_after, "a TLS certificate has expired; clients refuse it");
    } else if not_after - now < EXPIRY_WARNING.as_secs() {
        tracing::warn!(certificate = %what, not_after, days_left = (not_after - now) / 86_400, "a TLS certificate expires soon; renew it");
    }
    Some(not_after)
}

/// ALPN protocol id of HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN protocol id of HTTP/1.1.
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// A certificate chain and its private key, both PEM: what an owner uploads for a custom
/// hostname, and what the route feed carries to standalone proxies.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PemKeyPair {
    /// The certificate chain, leaf first.
    pub certificate: String,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: String,
}

impl std::fmt::Debug for PemKeyPair {
    /// Never prints the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PemKeyPair")
            .field(
                "certificate",
                &format_args!("{} bytes", self.certificate.len()),
            )
            .field("key", &format_args!("(hidden)"))
            .finish()
    }
}

/// Why a certificate or key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// No PEM certificate was found.
    #[error("the certificate holds no PEM certificate (-----BEGIN CERTIFICATE-----)")]
    NoCertificate,
    /// A PEM certificate block is malformed.
    #[error("the certificate is not valid PEM: {0}")]
    BadCertificate(String),
    /// No usable private key was found.
    #[error("the key holds no PEM private key (PKCS#8, PKCS#1 or SEC1): {0}")]
    BadKey(String),
    /// The key is of a kind rustls cannot sign with, or does not belong to the certificate.
    #[error("the key does not fit the certificate: {0}")]
    Mismatch(String),
    /// The certificate does not name the host.
    #[error("the certificate does not cover {0}")]
    NotCovered(String),
    /// A file's certificate is for an invalid host pattern.
    #[error("{0:?} is not a host name or a *.<domain> pattern")]
    BadHost(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// Parses a PEM chain and key into what rustls serves, checking that they belong together.
pub fn key_pair(certificate: &[u8], key: &[u8]) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = CertificateDer::pem_slice_iter(certificate)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadCertificate(e.to_string()))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| TlsError::BadKey(e.to_string()))?;
    let provider = rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(chain, key, &provider)
        .map(Arc::new)
        .map_err(|e| TlsError::Mismatch(e.to_string()))
}

/// Whether the leaf certificate of `key` is valid for `host` (its names, wildcards included).
pub fn covers(key: &CertifiedKey, host: &str) -> bool {
    let Some(leaf) = key.cert.first() else {
        return false;
    };
    let Ok(name) = ServerName::try_from(host) else {
        return false;
    };
    webpki::EndEntityCert::try_from(leaf)
        .is_ok_and(|cert| cert.verify_is_valid_for_subject_name(&name).is_ok())
}

/// Checks an uploaded pair for `host`: it parses, the key fits, and the certificate covers the
/// host. The error says which of these failed.
pub fn check(pair: &PemKeyPair, host: &str) -> Result<Arc<CertifiedKey>, TlsError> {
    let key = key_pair(pair.certificate.as_bytes(), pair.key.as_bytes())?;
    if !covers(&key, host) {
        return Err(TlsError::NotCovered(host.to_owned()));
    }
    Ok(key)
}

/// A certificate file and its key file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilePair {
    /// The certificate chain, PEM.
    pub cert: PathBuf,
    /// The private key, PEM.
    pub key: PathBuf,
}

/// A certificate for named hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFiles {
    /// Host names (`flows.example.org`) or patterns (`*.example.org`, one label).
    pub hosts: Vec<String>,
    /// The files.
    pub files: FilePair,
}

/// The certificate files of a proxy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// Served when nothing else matches (no SNI, or an unknown name).
    pub default: Option<FilePair>,
    /// Certificates for named hosts.
    pub hosts: Vec<HostFiles>,
}

impl TlsFiles {
    fn paths(&self) -> impl Iterator<Item = &Path> {
        self.default
            .iter()
            .chain(self.hosts.iter().map(|h| &h.files))
            .flat_map(|p| [p.cert.as_path(), p.key.as_path()])
    }
}

/// What a file looked like when it was read: a rewrite changes it.
type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: &Path) -> Stamp {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// The files' certificates, parsed.
#[derive(Debug, Default)]
struct Loaded {
    files: TlsFiles,
    stamps: Vec<Stamp>,
    default: Option<Arc<CertifiedKey>>,
    exact: HashMap<Box<str>, Arc<CertifiedKey>>,
    /// By the parent domain of a `*.<parent>` pattern.
    wildcard: HashMap<Box<str>, Arc<CertifiedKey>>,
    /// Each certificate's name (`default`, or its hosts joined by commas) and expiry.
    expiries: Vec<(Box<str>, u64)>,
}

fn read_pair(pair: &FilePair) -> Result<Arc<CertifiedKey>, TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })
    };
    key_pair(&read(&pair.cert)?, &read(&pair.key)?).map_err(|e| match e {
        TlsError::Read { .. } => e,
        other => TlsError::Read {
            path: pair.cert.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, other.to_string()),
        },
    })
}

impl Loaded {
    fn read(files: TlsFiles) -> Result<Self, TlsError> {
        // Stamped before reading: a rewrite during the read is seen at the next check.
        let stamps = files.paths().map(stamp).collect();
        let default = files.default.as_ref().map(read_pair).transpose()?;
        let mut expiries = Vec::new();
        let mut expires = |name: String, key: &CertifiedKey| {
            if let Some(at) = expiry_checked(key, &name) {
                expiries.push((name.into_boxed_str(), at));
            }
        };
        if let Some(key) = &default {
            expires("default".into(), key);
        }
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for h in &files.hosts {
            let key = read_pair(&h.files)?;
            expires(h.hosts.join(","), &key);
            for host in &h.hosts {
                let (map, name) = match host.strip_prefix("*.") {
                    Some(parent) => (&mut wildcard, parent),
                    None => (&mut exact, host.as_str()),
                };
                let name = normalize_host(name).ok_or_else(|| TlsError::BadHost(host.clone()))?;
                map.insert(name.into_owned().into_boxed_str(), key.clone());
            }
        }
        Ok(Self {
            files,
            stamps,
            default,
            exact,
            wildcard,
            expiries,
        })
    }

    fn changed(&self) -> bool {
        self.files
            .paths()
            .zip(&self.stamps)
            .any(|(p, s)| stamp(p) != *s)
    }
}

/// The certificates a proxy serves: its files' and its instances', chosen by SNI.
#[derive(Debug)]
pub struct Certificates {
    loaded: ArcSwap<Loaded>,
    routes: Option<Arc<Routes>>,
    /// Where the files' expiries go, for the metrics ([`Certificates::report_to`]).
    stats: std::sync::OnceLock<Arc<crate::ProxyStats>>,
}

impl Certificates {
    /// Reads `files`; every one must load. With `routes`, instances' own certificates (custom
    /// hostnames) come first for their hosts.
    pub fn new(files: TlsFiles, routes: Option<Arc<Routes>>) -> Result<Self, TlsError> {
        Ok(Self {
            loaded: ArcSwap::from_pointee(Loaded::read(files)?),
            routes,
            stats: std::sync::OnceLock::new(),
        })
    }

    /// Keeps the files' certificates' expiries in `stats`, for the metrics, from now on.
    pub fn report_to(&self, stats: Arc<crate::ProxyStats>) {
        let _ = self.stats.set(stats);
        self.report();
    }

    fn store(&self, loaded: Loaded) {
        self.loaded.store(Arc::new(loaded));
        self.report();
    }

    fn report(&self) {
        if let Some(stats) = self.stats.get() {
            stats.set_file_certificates(self.loaded.load().expiries.clone());
        }
    }

    /// Whether the files give any certificate (the instances' own aside).
    pub fn has_files(&self) -> bool {
        let l = self.loaded.load();
        l.default.is_some() || !l.exact.is_empty() || !l.wildcard.is_empty()
    }

    /// Serves `files` from now on, if they all load; otherwise the current ones stay.
    pub fn set_files(&self, files: TlsFiles) -> Result<(), TlsError> {
        if self.loaded.load().files == files && !self.loaded.load().changed() {
            return Ok(());
        }
        self.store(Loaded::read(files)?);
        Ok(())
    }

    /// Reads the files again if any changed on disk since they were read. `Ok(true)` when new
    /// certificates are served; on error the current ones stay.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let current = self.loaded.load_full();
        if !current.changed() {
            return Ok(false);
        }
        self.store(Loaded::read(current.files.clone())?);
        Ok(true)
    }

    /// Checks the files every `poll` until `shutdown`, reloading those that changed. A file
    /// half-written or broken is reported once per change, and the previous certificates serve.
    pub async fn watch(self: Arc<Self>, poll: Duration, shutdown: impl std::future::Future) {
        tokio::pin!(shutdown);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(poll) => {}
                _ = &mut shutdown => return,
            }
            match self.reload() {
                Ok(true) => {
                    failing = false;
                    tracing::info!("TLS certificates reloaded");
                }
                Ok(false) => {}
                Err(error) if !failing => {
                    failing = true;
                    tracing::error!(%error, "TLS certificates not reloaded; the previous ones stay in use");
                }
                Err(_) => {}
            }
        }
    }

    /// The certificate for a client that asked for `sni` (already lowercase, as rustls gives it).
    fn pick(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let loaded = self.loaded.load();
        let Some(name) = sni else {
            return loaded.default.clone();
        };
        if let Some(routes) = &self.routes {
            if let Some(key) = routes
                .load()
                .lookup(name)
                .and_then(|i| i.certificate_for(name))
            {
                return Some(key);
            }
        }
        loaded
            .exact
            .get(name)
            .or_else(|| {
                name.split_once('.')
                    .and_then(|(_, parent)| loaded.wildcard.get(parent))
            })
            .or(loaded.default.as_ref())
            .cloned()
    }

    /// The rustls configuration of a listener serving these certificates: TLS 1.2 and 1.3,
    /// ALPN `h2` then `http/1.1`.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()];
        Ok(Arc::new(config))
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.pick(hello.server_name())
    }
}

pub mod expiry;
#[cfg(any(test, feature = "test-ca"))]
pub mod test_ca;
#[cfg(test)]
mod tests;
