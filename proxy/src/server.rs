//! Serving connections: the proxy's listeners (plain HTTP, HTTPS, and plain HTTP redirecting to
//! HTTPS) and the admin listener (`/metrics`, `/healthz`).
//!
//! HTTPS speaks HTTP/2 to clients that offer it by ALPN and HTTP/1.1 to the others; replicas are
//! always spoken to in HTTP/1.1. An HTTP/1.1 connection of the proxy's listeners starts in the
//! proxy's own core ([`crate::h1`]), which hands it to hyper for what it does not forward itself. WebSocket upgrades need HTTP/1.1, which browsers use for them
//! since the proxy does not offer HTTP/2's extended CONNECT.
//!
//! Each takes an already-bound listener and a shutdown future, so tests bind `127.0.0.1:0`.
//! On shutdown the listener closes at once, open connections finish their current request
//! (idle ones close), and whatever is still open after the grace period is closed.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::rustls::ServerConfig;

use crate::body::ResponseBody;
use crate::h1;
use crate::proxy::{local, Proxy};

/// How a listener's connections are spoken to.
#[derive(Clone)]
enum Speech {
    /// Plain HTTP/1.1.
    Plain,
    /// TLS, then HTTP/2 or HTTP/1.1 by ALPN.
    Tls(tokio_rustls::TlsAcceptor),
}

/// Serves the proxy on `listener` in plain HTTP until `shutdown` completes, then drains.
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>, shutdown: impl Future<Output = ()>) {
    serve_as(listener, proxy, Speech::Plain, shutdown).await
}

/// Serves the proxy on `listener` in HTTPS (certificates and ALPN from `tls`, see
/// [`crate::tls::Certificates::server_config`]) until `shutdown` completes, then drains.
pub async fn serve_tls(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    tls: Arc<ServerConfig>,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    serve_as(listener, proxy, Speech::Tls(acceptor), shutdown).await
}

async fn serve_as(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    speech: Speech,
    shutdown: impl Future<Output = ()>,
) {
    let header_timeout = proxy.config().header_timeout;
    let grace = proxy.config().shutdown_grace;
    let stats = proxy.stats().clone();
    let tunnels = proxy.clone();
    let tls = matches!(speech, Speech::Tls(_));
    let loop_stats = stats.clone();
    let core = proxy.clone();
    accept_loop(
        listener,
        shutdown,
        grace,
        header_timeout,
        speech,
        loop_stats,
        Some(core),
        move |peer| {
            let proxy = proxy.clone();
            let stats = stats.clone();
            stats.open_connections.fetch_add(1, Ordering::Relaxed);
            let guard = OpenConnection(stats);
            service_fn(move |req: Request<Incoming>| {
                let proxy = proxy.clone();
                let _ = &guard;
                async move { Ok::<_, Infallible>(proxy.handle(req, peer, tls).await) }
            })
        },
    )
    .await;
    // Tunnels outlive their HTTP connection; close them too.
    tunnels.stop_tunnels();
}

/// Serves plain HTTP on `listener` by redirecting every request to the same host and path on
/// HTTPS at `https_port` (308, so methods and bodies are kept), until `shutdown` completes.
/// A request without a valid host gets 400.
pub async fn serve_redirect(
    listener: TcpListener,
    https_port: u16,
    header_timeout: Duration,
    shutdown: impl Future<Output = ()>,
) {
    let stats = Arc::new(crate::metrics::ProxyStats::default());
    accept_loop(
        listener,
        shutdown,
        Duration::from_secs(1),
        header_timeout,
        Speech::Plain,
        stats,
        None,
        move |_| {
            service_fn(move |req: Request<Incoming>| async move {
                Ok::<_, Infallible>(redirect(&req, https_port))
            })
        },
    )
    .await;
}

fn redirect(req: &Request<Incoming>, https_port: u16) -> Response<ResponseBody> {
    let host = match crate::proxy::request_host(req) {
        Ok(h) => h,
        Err(msg) => return local(StatusCode::BAD_REQUEST, msg),
    };
    let path = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    let location = match https_port {
        443 => format!("https://{host}{path}"),
        port => format!("https://{host}:{port}{path}"),
    };
    let Ok(value) = HeaderValue::from_str(&location) else {
        return local(
            StatusCode::BAD_REQUEST,
            "The request target is not valid.\n",
        );
    };
    let mut resp = local(
        StatusCode::PERMANENT_REDIRECT,
        format!("This site is served on HTTPS: {location}\n"),
    );
    resp.headers_mut().insert(header::LOCATION, value);
    resp
}

/// Serves `/metrics` (Prometheus text format) and `/healthz` until `shutdown` completes.
pub async fn serve_admin(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    shutdown: impl Future<Output = ()>,
) {
    let stats = proxy.stats().clone();
    accept_loop(
        listener,
        shutdown,
        Duration::from_secs(1),
        Duration::from_secs(10),
        Speech::Plain,
        stats,
        None,
        move |_| {
            let proxy = proxy.clone();
            service_fn(move |req: Request<Incoming>| {
                let proxy = proxy.clone();
                async move { Ok::<_, Infallible>(admin(&proxy, &req)) }
            })
        },
    )
    .await;
}

fn admin(proxy: &Proxy, req: &Request<Incoming>) -> Response<ResponseBody> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return local(
            StatusCode::METHOD_NOT_ALLOWED,
            "Only GET is supported here.\n",
        );
    }
    match req.uri().path() {
        "/metrics" => {
            let table = proxy.routes().snapshot();
            let mut resp = local(
                StatusCode::OK,
                crate::metrics::render(&table, proxy.stats()),
            );
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        "/healthz" => local(StatusCode::OK, "ok\n"),
        other => local(
            StatusCode::NOT_FOUND,
            format!("No admin endpoint at {other}; try /metrics or /healthz.\n"),
        ),
    }
}

/// Counts an open client connection until dropped.
struct OpenConnection(Arc<crate::metrics::ProxyStats>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Runs one served connection to its end, or, once `drain` is set, lets it finish its current
/// request (idle ones close at once).
macro_rules! until_drained {
    ($conn:expr, $drain:expr) => {{
        let conn = $conn;
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => r,
            _ = async { drop($drain.wait_for(|d| *d).await) } => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    }};
}

#[allow(clippy::too_many_arguments)]
async fn accept_loop<F, S>(
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
    header_timeout: Duration,
    speech: Speech,
    stats: Arc<crate::metrics::ProxyStats>,
    core: Option<Arc<Proxy>>,
    make_service: F,
) where
    F: Fn(SocketAddr) -> S,
    S: hyper::service::Service<
            Request<Incoming>,
            Response = Response<ResponseBody>,
            Error = Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    let (drain_tx, drain_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Some((stream, peer)) = accepted_or_back_off(accepted, "HTTP").await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let service = make_service(peer);
                let mut drain = drain_rx.clone();
                let speech = speech.clone();
                let stats = stats.clone();
                let core = core.clone();
                connections.spawn(async move {
                    let http1 = || {
                        let mut b = http1::Builder::new();
                        b.timer(TokioTimer::new()).header_read_timeout(header_timeout);
                        b
                    };
                    // HTTP/1.1 starts in the proxy's own core, which hands hyper what it does not
                    // forward itself.
                    macro_rules! http1_conn {
                        ($io:expr, $tls:expr) => {{
                            let io = match &core {
                                Some(proxy) => match h1::serve(proxy, $io, peer, $tls, &mut drain).await {
                                    h1::Outcome::Done => return,
                                    h1::Outcome::Hyper(io) => io,
                                },
                                None => h1::Rewind::new(Vec::new(), $io),
                            };
                            until_drained!(http1().serve_connection(TokioIo::new(io), service).with_upgrades(), drain)
                        }};
                    }
                    let result = match speech {
                        Speech::Plain => http1_conn!(stream, false),
                        Speech::Tls(acceptor) => {
                            // The handshake is bounded like a request head.
                            let stream = match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
                                Ok(Ok(s)) => s,
                                Ok(Err(error)) => {
                                    stats.tls_handshake_failures.fetch_add(1, Ordering::Relaxed);
                                    tracing::debug!(%peer, %error, "TLS handshake failed");
                                    return;
                                }
                                Err(_) => {
                                    stats.tls_handshake_failures.fetch_add(1, Ordering::Relaxed);
                                    tracing::debug!(%peer, "TLS handshake timed out");
                                    return;
                                }
                            };
                            let h2 = stream.get_ref().1.alpn_protocol() == Some(crate::tls::ALPN_H2);
                            let io = TokioIo::new(stream);
                            if h2 {
                                // Pings find dead peers; streams per connection are bounded
                                // like nginx's default (128).
                                let mut b = http2::Builder::new(TokioExecutor::new());
                                b.timer(TokioTimer::new())
                                    .keep_alive_interval(Some(header_timeout))
                                    .keep_alive_timeout(header_timeout)
                                    .max_concurrent_streams(128);
                                until_drained!(b.serve_connection(io, service), drain)
                            } else {
                                http1_conn!(io.into_inner(), true)
                            }
                        }
                    };
                    if let Err(error) = result {
                        tracing::debug!(%peer, %error, "client connection ended with an error");
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = &mut shutdown => break,
        }
    }
    drop(listener);
    let _ = drain_tx.send(true);
    let drained = tokio::time::timeout(grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = connections.len(),
            ?grace,
            "closing connections still open after the shutdown grace period"
        );
        connections.shutdown().await;
    }
}

/// The accepted connection, or, after an accept error (out of file descriptors and the like),
/// `None` once a short pause has passed, so an accept loop backs off instead of spinning.
pub(crate) async fn accepted_or_back_off(
    accepted: std::io::Result<(tokio::net::TcpStream, std::net::SocketAddr)>,
    listener: &str,
) -> Option<(tokio::net::TcpStream, std::net::SocketAddr)> {
    match accepted {
        Ok(x) => Some(x),
        Err(error) => {
            tracing::warn!(%error, %listener, "accept failed");
            tokio::time::sleep(Duration::from_millis(50)).await;
            None
        }
    }
}
