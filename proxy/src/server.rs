//! Serving connections: the proxy listener and the admin listener (`/metrics`, `/healthz`).
//!
//! Both take an already-bound listener and a shutdown future, so tests bind `127.0.0.1:0`.
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
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::body::ResponseBody;
use crate::proxy::{local, Proxy};

/// Serves the proxy on `listener` until `shutdown` completes, then drains.
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>, shutdown: impl Future<Output = ()>) {
    let header_timeout = proxy.config().header_timeout;
    let grace = proxy.config().shutdown_grace;
    let stats = proxy.stats().clone();
    let tunnels = proxy.clone();
    accept_loop(listener, shutdown, grace, header_timeout, move |peer| {
        let proxy = proxy.clone();
        let stats = stats.clone();
        stats.open_connections.fetch_add(1, Ordering::Relaxed);
        let guard = OpenConnection(stats);
        service_fn(move |req: Request<Incoming>| {
            let proxy = proxy.clone();
            let _ = &guard;
            async move { Ok::<_, Infallible>(proxy.handle(req, peer).await) }
        })
    })
    .await;
    // Tunnels outlive their HTTP connection; close them too.
    tunnels.stop_tunnels();
}

/// Serves `/metrics` (Prometheus text format) and `/healthz` until `shutdown` completes.
pub async fn serve_admin(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    shutdown: impl Future<Output = ()>,
) {
    accept_loop(
        listener,
        shutdown,
        Duration::from_secs(1),
        Duration::from_secs(10),
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

async fn accept_loop<F, S>(
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
    header_timeout: Duration,
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
                connections.spawn(async move {
                    let conn = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(header_timeout)
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades();
                    tokio::pin!(conn);
                    let result = tokio::select! {
                        r = conn.as_mut() => r,
                        _ = async { drop(drain.wait_for(|d| *d).await) } => {
                            conn.as_mut().graceful_shutdown();
                            conn.await
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
