//! TLS from the MQTT proxy to the broker (rustls with the ring provider). The broker's
//! certificate is checked against a CA file when one is given, against Mozilla's roots
//! otherwise, and must name the upstream's host (a DNS name or an IP address).

use std::path::PathBuf;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls;

/// TLS settings for the connections to the broker.
#[derive(Clone)]
pub struct UpstreamTls {
    /// PEM file with the CA certificates to trust; Mozilla's roots when absent.
    pub ca_file: Option<PathBuf>,
    connector: tokio_rustls::TlsConnector,
}

impl PartialEq for UpstreamTls {
    fn eq(&self, other: &Self) -> bool {
        self.ca_file == other.ca_file
    }
}

impl Eq for UpstreamTls {}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

impl UpstreamTls {
    /// TLS trusting the certificates in `ca_file` (PEM), or Mozilla's roots.
    pub fn new(ca_file: Option<PathBuf>) -> Result<Self, String> {
        let mut roots = rustls::RootCertStore::empty();
        match &ca_file {
            Some(path) => {
                let certs = CertificateDer::pem_file_iter(path)
                    .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| format!("cannot read the CA file {}: {e}", path.display()))?;
                if certs.is_empty() {
                    return Err(format!("no certificate in the CA file {}", path.display()));
                }
                for cert in certs {
                    roots
                        .add(cert)
                        .map_err(|e| format!("the CA file {}: {e}", path.display()))?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(Self {
            ca_file,
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        })
    }

    /// The TLS handshake on `tcp` with the broker at `upstream` (`host:port`).
    pub(crate) async fn connect(
        &self,
        upstream: &str,
        tcp: TcpStream,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let host = upstream
            .rsplit_once(':')
            .map_or(upstream, |(h, _)| h)
            .trim_start_matches('[')
            .trim_end_matches(']');
        let name = ServerName::try_from(host.to_owned())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        self.connector.connect(name, tcp).await
    }
}
