//! Real servers and clients for the proxy's integration tests, all on 127.0.0.1 with ports
//! chosen at run time.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tandem_proxy::{InstanceSpec, Proxy, ProxyConfig, ProxyStats, ReplicaSpec, Routes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub type Error = Box<dyn std::error::Error + Send + Sync>;
type Body = BoxBody<Bytes, Error>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// A real HTTP/1.1 server standing in for a Node-RED replica. It answers with its name and
/// has a few endpoints to make it slow, stream, echo, count a body or show the headers it got.
pub struct Upstream {
    pub name: String,
    pub addr: SocketAddr,
    counts: Arc<Counts>,
    task: Option<JoinHandle<()>>,
}

/// What an upstream has seen, kept across restarts.
#[derive(Default)]
struct Counts {
    /// Requests.
    hits: AtomicUsize,
    /// Body bytes received by `/sink`, counted frame by frame as they arrive.
    body_bytes: AtomicUsize,
    /// `/sink` bodies read to their end or to an error.
    bodies_ended: AtomicUsize,
}

impl Upstream {
    pub async fn start(name: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(name, listener, Arc::default())
    }

    fn serve(name: &str, listener: TcpListener, counts: Arc<Counts>) -> Self {
        let addr = listener.local_addr().unwrap();
        let n = name.to_string();
        let c = counts.clone();
        let task = tokio::spawn(async move {
            // Dropping the JoinSet (when this task is aborted) aborts every connection.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let name = n.clone();
                let counts = c.clone();
                conns.spawn(async move {
                    let svc = service_fn(move |req| {
                        counts.hits.fetch_add(1, Ordering::Relaxed);
                        answer(name.clone(), counts.clone(), req)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades()
                        .await;
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Self {
            name: name.to_string(),
            addr,
            counts,
            task: Some(task),
        }
    }

    /// Stops listening and drops every open connection, like a crashed process.
    pub fn kill(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    /// Starts again on the same port.
    pub async fn restart(&mut self) {
        self.kill();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("cannot rebind {}: {e}", self.addr),
            }
        };
        *self = Self::serve(&self.name, listener, self.counts.clone());
    }

    pub fn hits(&self) -> usize {
        self.counts.hits.load(Ordering::Relaxed)
    }

    /// Body bytes `/sink` has received so far.
    pub fn body_bytes(&self) -> usize {
        self.counts.body_bytes.load(Ordering::Relaxed)
    }

    /// `/sink` bodies read to their end or cut off.
    pub fn bodies_ended(&self) -> usize {
        self.counts.bodies_ended.load(Ordering::Relaxed)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn answer(
    name: String,
    counts: Arc<Counts>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let resp = match path.as_str() {
        "/slow" => {
            let ms: u64 = query.trim_start_matches("ms=").parse().unwrap_or(1000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Response::new(full(name.clone()))
        }
        "/echo" => Response::new(req.into_body().map_err(Error::from).boxed()),
        "/sink" => {
            // Counts the body as it arrives (not once it is complete), then answers with the total.
            let mut body = req.into_body();
            let mut total = 0;
            while let Some(Ok(frame)) = body.frame().await {
                if let Some(data) = frame.data_ref() {
                    counts.body_bytes.fetch_add(data.len(), Ordering::Relaxed);
                    total += data.len();
                }
            }
            counts.bodies_ended.fetch_add(1, Ordering::Relaxed);
            Response::new(full(total.to_string()))
        }
        "/chunks" => {
            // Three chunks, 300 ms apart: a buffering proxy would deliver them all at once.
            let s = futures_util::stream::iter(0..3).then(|i| async move {
                if i > 0 {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                Ok::<_, Error>(Frame::data(Bytes::from(format!("chunk{i};"))))
            });
            Response::new(BodyExt::boxed(StreamBody::new(s)))
        }
        "/headers" => {
            let h = req.headers();
            let get = |n: &str| {
                h.get(n)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-")
                    .to_string()
            };
            let body = format!(
                "host={}\nxff={}\nxfp={}\nxfh={}\nsecret={}\nconnection={}\n",
                get("host"),
                get("x-forwarded-for"),
                get("x-forwarded-proto"),
                get("x-forwarded-host"),
                get("x-secret"),
                get("connection"),
            );
            Response::new(full(body))
        }
        p if p.starts_with("/status/") => {
            let code = p[8..].parse().unwrap_or(500);
            let mut r = Response::new(full(name.clone()));
            *r.status_mut() = StatusCode::from_u16(code).unwrap();
            r
        }
        _ => Response::new(full(name.clone())),
    };
    let mut resp = resp;
    resp.headers_mut()
        .insert("x-upstream", name.parse().unwrap());
    Ok(resp)
}

/// A real WebSocket echo server (tokio-tungstenite). Records the path of each handshake.
pub struct WsEcho {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl WsEcho {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                        return;
                    };
                    while let Some(Ok(msg)) = ws.next().await {
                        if msg.is_text() || msg.is_binary() {
                            use futures_util::SinkExt;
                            if ws.send(msg).await.is_err() {
                                break;
                            }
                        }
                    }
                });
            }
        });
        Self { addr, task }
    }
}

impl Drop for WsEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The proxy under test, serving on its own port with its admin listener beside it.
pub struct TestProxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub routes: Arc<Routes>,
    pub stats: Arc<ProxyStats>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub task: Option<JoinHandle<()>>,
    admin_task: JoinHandle<()>,
}

impl TestProxy {
    pub async fn start(specs: &[InstanceSpec], config: ProxyConfig) -> Self {
        let routes = Arc::new(Routes::new());
        routes.publish(specs).unwrap();
        Self::start_with(routes, config).await
    }

    pub async fn start_with(routes: Arc<Routes>, config: ProxyConfig) -> Self {
        Self::start_from(routes, |routes, stats| Proxy::new(routes, config, stats)).await
    }

    /// A proxy made by `make` from the routes and the stats.
    pub async fn start_from(
        routes: Arc<Routes>,
        make: impl FnOnce(Arc<Routes>, Arc<ProxyStats>) -> Proxy,
    ) -> Self {
        let stats = Arc::new(ProxyStats::default());
        let proxy = Arc::new(make(routes.clone(), stats.clone()));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(tandem_proxy::server::serve(
            listener,
            proxy.clone(),
            async {
                let _ = rx.await;
            },
        ));
        let admin_task = tokio::spawn(tandem_proxy::server::serve_admin(
            admin,
            proxy,
            std::future::pending(),
        ));
        Self {
            addr,
            admin: admin_addr,
            routes,
            stats,
            stop: Some(tx),
            task: Some(task),
            admin_task,
        }
    }

    /// Starts the graceful shutdown.
    pub fn shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }

    /// The value of one series, named with its labels as rendered.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let m = self.metrics().await;
        m.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    pub async fn metrics(&self) -> String {
        let r = get(self.admin, "admin", "/metrics").await.unwrap();
        assert_eq!(r.status, 200);
        r.body
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.admin_task.abort();
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// Settings for tests: short timeouts, so failures show fast.
pub fn test_config() -> ProxyConfig {
    ProxyConfig {
        connect_timeout: Duration::from_millis(500),
        upstream_timeout: Duration::from_secs(5),
        header_timeout: Duration::from_secs(5),
        ejection: tandem_proxy::EjectionPolicy {
            base: Duration::from_millis(300),
            max: Duration::from_secs(2),
        },
        shutdown_grace: Duration::from_secs(5),
        access_log: false,
        ..ProxyConfig::default()
    }
}

pub fn instance(name: &str, replicas: &[SocketAddr]) -> InstanceSpec {
    InstanceSpec {
        certificate: None,
        asleep: false,
        editor_secret: None,
        http_auth: Default::default(),
        name: name.into(),
        hosts: vec![format!("{name}.localhost")],
        ha: false,
        affinity: false,
        hold: false,
        replicas: replicas
            .iter()
            .enumerate()
            .map(|(i, a)| ReplicaSpec {
                id: format!("r{i}"),
                addr: *a,
                ready: true,
            })
            .collect(),
        health: None,
    }
}

/// A port on which nothing listens.
pub fn dead_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], tandem_proxy::net::free_port().unwrap()))
}

/// A response read to its end.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A keep-alive client connection to the proxy.
pub struct Client {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Result<Self, Error> {
        let stream = TcpStream::connect(addr).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn.with_upgrades());
        Ok(Self { sender })
    }

    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> Result<Reply, Error> {
        self.sender.ready().await?;
        let resp = self.sender.send_request(req).await?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Reply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }

    pub async fn get(&mut self, host: &str, path: &str) -> Result<Reply, Error> {
        self.send(req("GET", host, path, Bytes::new())).await
    }
}

pub fn req(method: &str, host: &str, path: &str, body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", host)
        .body(Full::new(body.into()))
        .unwrap()
}

/// One request on a new connection.
pub async fn send(addr: SocketAddr, r: Request<Full<Bytes>>) -> Result<Reply, Error> {
    Client::connect(addr).await?.send(r).await
}

pub async fn get(addr: SocketAddr, host: &str, path: &str) -> Result<Reply, Error> {
    send(addr, req("GET", host, path, Bytes::new())).await
}

/// Writes raw bytes and reads until the server closes or `wait` passes.
pub async fn raw(addr: SocketAddr, bytes: &[u8], wait: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Polls `check` every 20 ms until it holds or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A temporary directory, removed when dropped.
pub fn temp_dir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("tandem-{tag}-"))
        .tempdir()
        .unwrap()
}
