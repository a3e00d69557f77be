//! A replica's admin API, called with the instance's admin secret over hyper's HTTP/1 client.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use tandem_proxy::credentials::ADMIN_TOKEN;

/// Largest answer read from a replica's admin API.
const MAX_ANSWER: usize = 1 << 20;

/// One admin API call (`/admin<path>`) with the secret: the status and body, or why there is
/// none within `timeout`.
pub(crate) async fn call(
    addr: SocketAddr,
    secret: &str,
    method: Method,
    path: &str,
    body: String,
    timeout: Duration,
) -> Result<(u16, Bytes), String> {
    let call = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        // The connection ends when the answer is read and the sender dropped.
        tokio::spawn(conn);
        let request = Request::builder()
            .method(method)
            .uri(format!("/admin{path}"))
            .header(header::HOST, addr.to_string())
            .header(ADMIN_TOKEN, secret)
            .header(header::CONTENT_TYPE, "application/json")
            .header("node-red-deployment-type", "full")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
}

/// `GET /admin/flows/state`: the flow state (`start`, `stop`, `safe`) on a 200.
pub(crate) async fn flow_state(
    addr: SocketAddr,
    secret: &str,
    timeout: Duration,
) -> Result<String, String> {
    let (status, body) = call(
        addr,
        secret,
        Method::GET,
        "/flows/state",
        String::new(),
        timeout,
    )
    .await?;
    if status != 200 {
        return Err(format!("status {status}"));
    }
    let v: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&body)))?;
    Ok(v.get("state")
        .and_then(|s| s.as_str())
        .unwrap_or("")
        .to_owned())
}

/// A call that must answer one of `ok`: otherwise the status and body, as an error.
pub(crate) async fn expect(
    addr: SocketAddr,
    secret: &str,
    method: Method,
    path: &str,
    body: String,
    ok: &[u16],
) -> Result<(), String> {
    let m = method.clone();
    match call(addr, secret, method, path, body, Duration::from_secs(30)).await? {
        (status, _) if ok.contains(&status) => Ok(()),
        (status, body) => Err(format!(
            "{m} /admin{path} answered {status}: {}",
            String::from_utf8_lossy(&body)
        )),
    }
}

/// Whether a reported flow state is the one a replica was started for.
pub(crate) fn state_matches(state: &str, start_stopped: bool) -> bool {
    if start_stopped {
        state == "stop" || state == "safe"
    } else {
        state == "start"
    }
}
