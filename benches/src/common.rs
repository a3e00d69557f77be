//! What the benchmark binaries share: one HTTP request on a new connection, a free port, a
//! median. Each binary includes it with `#[path = "../common.rs"] mod common;`.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// Any error of a benchmark.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// An answer: its status, the replica that gave it (`X-Tandem-Replica`) and its whole body.
pub struct Answer {
    pub status: u16,
    pub replica: Option<String>,
    pub body: Bytes,
}

/// One request on a new connection, asking for JSON (Node-RED's admin API answers HTML
/// without it).
pub async fn call(
    addr: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Result<Answer, Error> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", host)
        .header("accept", "application/json");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let body = match body {
        Some(b) => {
            req = req.header("content-type", "application/json");
            Bytes::from(b.to_string())
        }
        None => Bytes::new(),
    };
    let res = sender.send_request(req.body(Full::new(body))?).await?;
    let status = res.status().as_u16();
    let replica = res
        .headers()
        .get("x-tandem-replica")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = res.into_body().collect().await?.to_bytes();
    Ok(Answer {
        status,
        replica,
        body,
    })
}

/// A free port on 127.0.0.1.
pub fn free_port() -> Result<SocketAddr, Error> {
    Ok(SocketAddr::from((
        [127, 0, 0, 1],
        tandem_proxy::net::free_port()?,
    )))
}

/// The median of `v` (the upper one of an even count).
pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}
