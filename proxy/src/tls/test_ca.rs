//! A certificate authority for tests (feature `test-ca`): certificates for any names, signed by
//! a CA a test client trusts, made in memory.
#![allow(clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tokio_rustls::rustls;

use super::PemKeyPair;

/// A CA and its certificate.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

impl TestCa {
    /// A new CA with a fresh key.
    pub fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "Tandem test CA");
        let key = KeyPair::generate().expect("CA key");
        let pem = params.self_signed(&key).expect("CA certificate").pem();
        Self {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    /// The CA's certificate, PEM.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// A certificate for `names` (host names or `*.<domain>`), with its own key.
    pub fn issue(&self, names: &[&str]) -> PemKeyPair {
        self.issue_with(names, None)
    }

    /// A certificate for `names`, as [`TestCa::issue`], valid until midnight UTC that starts
    /// `(year, month, day)`.
    pub fn issue_until(&self, names: &[&str], until: (i32, u8, u8)) -> PemKeyPair {
        self.issue_with(names, Some(until))
    }

    fn issue_with(&self, names: &[&str], until: Option<(i32, u8, u8)>) -> PemKeyPair {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("leaf params");
        if let Some((year, month, day)) = until {
            params.not_after = rcgen::date_time_ymd(year, month, day);
        }
        let key = KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("leaf certificate");
        PemKeyPair {
            certificate: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// A client configuration trusting this CA only, offering `alpn`.
    pub fn client_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.pem.as_bytes()).expect("CA PEM"))
            .expect("CA root");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

/// What an HTTPS request saw.
#[derive(Debug)]
pub struct Seen {
    /// The certificates the server presented, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The HTTP version ALPN chose.
    pub version: http::Version,
    /// The answer's status.
    pub status: u16,
    /// Its headers.
    pub headers: http::HeaderMap,
    /// Its body, as text.
    pub body: String,
}

impl TestCa {
    /// One GET of `path` over TLS to `addr`, asking for `sni`, trusting this CA only and
    /// offering `alpn` (HTTP/2 when the server picks `h2`).
    pub async fn get(
        &self,
        addr: SocketAddr,
        sni: &str,
        alpn: &[&[u8]],
        path: &str,
    ) -> Result<Seen, Box<dyn std::error::Error + Send + Sync>> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let connector = tokio_rustls::TlsConnector::from(self.client_config(alpn));
        let tls = connector
            .connect(ServerName::try_from(sni.to_owned())?, tcp)
            .await?;
        let chain = tls
            .get_ref()
            .1
            .peer_certificates()
            .unwrap_or_default()
            .to_vec();
        let h2 = tls.get_ref().1.alpn_protocol() == Some(super::ALPN_H2);
        let io = TokioIo::new(tls);
        let resp = if h2 {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(conn);
            let req =
                http::Request::get(format!("https://{sni}{path}")).body(Empty::<Bytes>::new())?;
            sender.send_request(req).await?
        } else {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(conn);
            let req = http::Request::get(path)
                .header("host", sni)
                .body(Empty::<Bytes>::new())?;
            sender.send_request(req).await?
        };
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Seen {
            chain,
            version: parts.version,
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }
}

/// Whether `pair`'s certificate is the leaf of `chain`: how tests tell which certificate a
/// server presented.
pub fn is_leaf_of(pair: &PemKeyPair, chain: &[CertificateDer<'_>]) -> bool {
    let ours = CertificateDer::from_pem_slice(pair.certificate.as_bytes()).expect("our PEM");
    chain.first().is_some_and(|c| c.as_ref() == ours.as_ref())
}
