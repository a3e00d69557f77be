//! A replica's admin API, called with the instance's admin secret over hyper's HTTP/1 client:
//! what every driver does to a running Node-RED, wherever it runs (a local process, a pod).
//! [`check`], [`push_flows`] with its health [`gate`], and [`set_flows`] are the driver
//! operations; the rest are the calls they are made of.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use tandem_proxy::credentials::ADMIN_TOKEN;
use tokio::sync::broadcast;

use crate::driver::{DriverError, Gate};
use crate::logs::LogEntry;
use crate::replica::{FlowState, ReplicaId};
use crate::spec::Flows;

/// How long a deploy's health gate waits for the flows to start and a probe to answer.
const GATE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a deploy's probe is tried until it answers as asked.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long after the flows started a deploy's gate looks for nodes logging errors.
const GATE_SETTLE: Duration = Duration::from_millis(300);

/// Checks once that the replica `id` at `addr` answers its admin API within `timeout`.
pub async fn check(
    id: &ReplicaId,
    addr: SocketAddr,
    secret: &str,
    timeout: Duration,
) -> Result<(), DriverError> {
    flow_state(addr, secret, timeout)
        .await
        .map(drop)
        .map_err(|reason| DriverError::Admin {
            id: id.clone(),
            reason,
        })
}

/// Deploys `flows` to the replica (a full deploy; a replica whose flows are stopped keeps them
/// stopped). Flows Node-RED itself refuses (not JSON it can take, larger than it accepts) are a
/// refusal like the gate's: the deploy rolls back rather than tries again.
pub async fn push_flows(
    id: &ReplicaId,
    addr: SocketAddr,
    secret: &str,
    flows: &Flows,
) -> Result<(), DriverError> {
    // API v2 takes the credentials as stored (`{"$": ...}`): the replica decrypts them with the
    // instance's credential secret. Flows that carry their credentials inline (as given at
    // creation) go without.
    let mut body = serde_json::json!({ "flows": &*flows.value });
    if flows.credentials.as_object().is_none_or(|c| !c.is_empty()) {
        body["credentials"] = (*flows.credentials).clone();
    }
    deploy(addr, secret, body.to_string())
        .await
        .map_err(|e| match e {
            DeployError::Refused(reason) => DriverError::Refused {
                id: id.clone(),
                reason,
            },
            DeployError::Failed(reason) => DriverError::Admin {
                id: id.clone(),
                reason,
            },
        })
}

/// The health gate of a deploy just pushed ([`push_flows`]): every node type is known; when the
/// flows run, they started and no node logged an error since `lines` was subscribed (before the
/// push); the probe answers as asked. A gate that fails is [`DriverError::Refused`].
pub async fn gate(
    id: &ReplicaId,
    addr: SocketAddr,
    secret: &str,
    mut lines: broadcast::Receiver<LogEntry>,
    flows: &Flows,
    gate: &Gate,
) -> Result<(), DriverError> {
    let admin_error = |reason: String| DriverError::Admin {
        id: id.clone(),
        reason,
    };
    let refused = |reason: String| DriverError::Refused {
        id: id.clone(),
        reason,
    };
    let missing = missing_types(addr, secret, &flows.value)
        .await
        .map_err(admin_error)?;
    if !missing.is_empty() {
        return Err(refused(format!(
            "unknown node type: {}",
            missing.join(", ")
        )));
    }
    if gate.flows_on {
        wait_started(addr, secret, GATE_TIMEOUT)
            .await
            .map_err(refused)?;
        // Nodes that fail as they start log an error within moments.
        tokio::time::sleep(GATE_SETTLE).await;
        let src = id.to_string();
        while let Ok(line) = lines.try_recv() {
            // Node-RED tags a node's own lines with its type and id.
            if line.src == src && line.level == "error" && line.fields.contains_key("type") {
                return Err(refused(format!(
                    "a node failed as the flows started: {}",
                    line.msg
                )));
            }
        }
    }
    // A standby's flows are stopped: its routes answer nothing until it is promoted.
    if let Some(p) = gate.probe.as_ref().filter(|_| gate.flows_on) {
        probe(addr, p, PROBE_TIMEOUT).await.map_err(refused)?;
    }
    Ok(())
}

/// Starts or stops the replica's flows without restarting it.
pub async fn set_flows(
    id: &ReplicaId,
    addr: SocketAddr,
    secret: &str,
    state: FlowState,
) -> Result<(), DriverError> {
    let state = match state {
        FlowState::Started => "start",
        FlowState::Stopped => "stop",
    };
    let body = serde_json::json!({ "state": state }).to_string();
    expect(addr, secret, Method::POST, "/flows/state", body, &[200])
        .await
        .map_err(|reason| DriverError::Admin {
            id: id.clone(),
            reason,
        })
}

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
    let request = Request::builder()
        .method(method)
        .uri(format!("/admin{path}"))
        .header(header::HOST, addr.to_string())
        .header(ADMIN_TOKEN, secret)
        .header(header::CONTENT_TYPE, "application/json")
        // `GET /nodes` answers HTML without it.
        .header(header::ACCEPT, "application/json")
        .header("node-red-deployment-type", "full")
        // Flows as `{rev, flows}`, with credentials as stored (`{"$": ...}`).
        .header("node-red-api-version", "v2")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    send(addr, request, timeout).await
}

/// `request` on a new connection to the replica: the status and body (at most
/// [`MAX_ANSWER`]), or why there is none within `timeout`.
async fn send(
    addr: SocketAddr,
    request: Request<Full<Bytes>>,
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

/// Whether Node-RED serves at `addr`: its admin API's sign-in description, which needs no token
/// and reveals nothing, answers 200.
pub(crate) async fn serves(addr: SocketAddr, timeout: Duration) -> bool {
    let Ok(request) = Request::builder()
        .uri("/admin/auth/login")
        .header(header::HOST, addr.to_string())
        .body(Full::new(Bytes::new()))
    else {
        return false;
    };
    matches!(send(addr, request, timeout).await, Ok((200, _)))
}

/// `POST /admin/flows` as a `reload` deploy: Node-RED loads the flows from its storage again
/// and starts them (how a warm runtime starts its instance's flows).
pub(crate) async fn reload(
    addr: SocketAddr,
    secret: &str,
    timeout: Duration,
) -> Result<u16, String> {
    let request = Request::builder()
        .method(Method::POST)
        .uri("/admin/flows")
        .header(header::HOST, addr.to_string())
        .header(ADMIN_TOKEN, secret)
        .header(header::CONTENT_TYPE, "application/json")
        .header("node-red-deployment-type", "reload")
        .body(Full::new(Bytes::from_static(b"{}")))
        .map_err(|e| e.to_string())?;
    send(addr, request, timeout).await.map(|(status, _)| status)
}

/// `GET /admin/flows/state`: the flow state (`start`, `stop`, `safe`) on a 200.
pub async fn flow_state(
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
pub fn state_matches(state: &str, start_stopped: bool) -> bool {
    if start_stopped {
        state == "stop" || state == "safe"
    } else {
        state == "start"
    }
}

/// Why a deploy did not take.
pub(crate) enum DeployError {
    /// Node-RED refused the flows (a 4xx): they are bad, or too large for it.
    Refused(String),
    /// The call failed (no answer, a 5xx).
    Failed(String),
}

/// `POST /admin/flows`: a full deploy of `body` (`{flows, credentials}`).
pub(crate) async fn deploy(
    addr: SocketAddr,
    secret: &str,
    body: String,
) -> Result<(), DeployError> {
    match call(
        addr,
        secret,
        Method::POST,
        "/flows",
        body,
        Duration::from_secs(30),
    )
    .await
    {
        Ok((200 | 204, _)) => Ok(()),
        Ok((status, body)) => {
            let why = format!(
                "Node-RED refused the flows ({status}): {}",
                String::from_utf8_lossy(&body)
            );
            Err(if (400..500).contains(&status) {
                DeployError::Refused(why)
            } else {
                DeployError::Failed(why)
            })
        }
        Err(e) => Err(DeployError::Failed(e)),
    }
}

/// Node types `flows` uses that no node set of the replica provides: Node-RED accepts such
/// flows, and then runs none of them ("Waiting for missing types").
pub(crate) async fn missing_types(
    addr: SocketAddr,
    secret: &str,
    flows: &serde_json::Value,
) -> Result<Vec<String>, String> {
    let (status, body) = call(
        addr,
        secret,
        Method::GET,
        "/nodes",
        String::new(),
        Duration::from_secs(30),
    )
    .await?;
    if status != 200 {
        return Err(format!("GET /admin/nodes answered {status}"));
    }
    let sets: Vec<serde_json::Value> = serde_json::from_slice(&body)
        .map_err(|e| format!("GET /admin/nodes answered no node list: {e}"))?;
    let known: std::collections::HashSet<&str> = sets
        .iter()
        .filter(|set| set.get("enabled").and_then(|e| e.as_bool()) != Some(false))
        .filter_map(|set| set.get("types").and_then(|t| t.as_array()))
        .flatten()
        .filter_map(|t| t.as_str())
        .collect();
    let mut missing: Vec<String> = flows
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|node| node.get("type").and_then(|t| t.as_str()))
        .filter(|t| !STRUCTURAL.contains(t) && !t.starts_with("subflow:") && !known.contains(t))
        .map(str::to_owned)
        .collect();
    missing.sort();
    missing.dedup();
    Ok(missing)
}

/// Entries of a flows array that are not nodes of a node set: tabs, subflow definitions,
/// groups and junctions (subflow instances are `subflow:<id>`).
const STRUCTURAL: [&str; 4] = ["tab", "subflow", "group", "junction"];

/// Waits until the replica says its flows run.
pub(crate) async fn wait_started(
    addr: SocketAddr,
    secret: &str,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let state = flow_state(addr, secret, timeout).await?;
        if state == "start" {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "the flows did not start within {timeout:?} (state {state})"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends the deploy's probe to the replica's own flows, until it answers as expected or
/// `timeout` has passed.
pub(crate) async fn probe(
    addr: SocketAddr,
    probe: &crate::spec::Probe,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let got = plain_get(addr, &probe.path).await;
        match &got {
            Ok(status) if *status == probe.expect_status => return Ok(()),
            _ if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(status) => {
                return Err(format!(
                    "probe GET {} answered {status}, not {}",
                    probe.path, probe.expect_status
                ))
            }
            Err(e) => return Err(format!("probe GET {}: {e}", probe.path)),
        }
    }
}

/// A GET of a flow's route, without the admin secret: its status.
async fn plain_get(addr: SocketAddr, path: &str) -> Result<u16, String> {
    let request = Request::builder()
        .method(Method::GET)
        .uri(path)
        .header(header::HOST, addr.to_string())
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    send(addr, request, Duration::from_secs(5))
        .await
        .map(|(status, _)| status)
}
