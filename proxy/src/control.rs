//! A standalone proxy's link to its control plane (`tandem proxy --control-plane URL`), with the
//! proxy token:
//! - the route feed, `GET /api/v1/routes`: server-sent events, each a whole table
//!   ([`FeedTable`]); applied as it comes, written to the cache file, and kept serving while the
//!   control plane is away (reconnects back off from 100 ms to 5 s);
//! - reports, `POST /api/v1/routes/report`: the proxy's presence, the generation it serves and
//!   the requests in flight to replicas out of rotation, which the coordinator's drains wait
//!   for; at once after each table, every 25 ms while such requests are in flight, else every
//!   second;
//! - the editor gate's question, `POST /api/v1/routes/editor-check` ([`RemoteEditorGate`]),
//!   answers kept for [`GATE_TTL`];
//! - editor ticket exchanges, `POST /api/v1/routes/editor-ticket` ([`TicketExchange`]), never
//!   kept: a ticket is good once.
//!
//! Plain HTTP only: run the link over a private network (the feed carries instances' admin
//! secrets).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::routes::feed::{CacheError, FeedTable};
use crate::{EditorDecision, EditorGate, ProxyStats, Routes, TicketDecision};

/// How long an editor gate answer is reused for the same request credentials.
pub const GATE_TTL: Duration = Duration::from_secs(2);

/// Longest wait for a control plane's answer (not the feed, which stays open).
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the control plane could not be reached or understood.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The URL is not `http://host[:port]`.
    #[error("the control plane URL must be http://host[:port], not {0:?}")]
    BadUrl(String),
    /// No connection.
    #[error("cannot reach the control plane at {0}: {1}")]
    Connect(String, String),
    /// The control plane answered something else than expected.
    #[error("the control plane answered {0}: {1}")]
    Status(u16, String),
    /// The exchange broke off or made no sense.
    #[error("the control plane's answer is unusable: {0}")]
    Protocol(String),
}

/// What a proxy reports ([`ControlPlane::report`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    /// The proxy's id (`--proxy-id`, default its host name and listen address).
    pub id: String,
    /// Where it takes requests.
    pub address: String,
    /// The generation of the table it serves.
    pub generation: u64,
    /// Requests in flight to replicas out of rotation: replica id → count, only those above 0.
    pub in_flight: HashMap<String, u64>,
    /// When each instance was last used through this proxy, epoch ms (now, while it has a
    /// request in flight or a WebSocket open); instances unused since the proxy started are left
    /// out. The control plane's sleeper reads it (issue 17).
    #[serde(default, skip_serializing_if = "HashMap::is_empty")]
    pub active: HashMap<String, u64>,
}

/// What the editor gate asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EditorCheck {
    /// The instance's name.
    pub instance: String,
    /// The request's method.
    pub method: String,
    /// Its `Authorization`, `Cookie`, `Origin` and `Sec-Fetch-Site` headers.
    pub authorization: Option<String>,
    /// See `authorization`.
    pub cookie: Option<String>,
    /// See `authorization`.
    pub origin: Option<String>,
    /// See `authorization`.
    pub sec_fetch_site: Option<String>,
    /// A request to the instance's own endpoints, protected by this mode; absent for the
    /// editor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flows: Option<crate::HttpAuth>,
}

/// The control plane's answer to an [`EditorCheck`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EditorAnswer {
    /// `allow`, `sign_in` (401) or `deny` (403).
    pub decision: Decision,
    /// Why, for 401 and 403.
    pub message: String,
}

/// An editor gate's verdict on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Let it through.
    Allow,
    /// 401.
    SignIn,
    /// 403.
    Deny,
}

impl From<EditorDecision> for EditorAnswer {
    fn from(d: EditorDecision) -> Self {
        match d {
            EditorDecision::Allow => Self {
                decision: Decision::Allow,
                message: String::new(),
            },
            EditorDecision::SignIn(m) => Self {
                decision: Decision::SignIn,
                message: m,
            },
            EditorDecision::Deny(m) => Self {
                decision: Decision::Deny,
                message: m,
            },
        }
    }
}

impl From<EditorAnswer> for EditorDecision {
    fn from(a: EditorAnswer) -> Self {
        match a.decision {
            Decision::Allow => Self::Allow,
            Decision::SignIn => Self::SignIn(a.message),
            Decision::Deny => Self::Deny(a.message),
        }
    }
}

/// An editor ticket a browser brought to an instance's host, to exchange for a session.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TicketExchange {
    /// The instance whose host the ticket was brought to.
    pub instance: String,
    /// The ticket.
    pub ticket: String,
}

// By hand: the ticket must not reach a log through `{:?}`.
impl std::fmt::Debug for TicketExchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TicketExchange")
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

/// The control plane's answer to a [`TicketExchange`].
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TicketAnswer {
    /// `session` (the ticket is spent; `session` holds the new session) or `refused` (403).
    pub decision: TicketVerdict,
    /// The new session's secret, for the host-only session cookie; with `session` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// Where the ticket leads (`editor` when absent).
    #[serde(default)]
    pub home: crate::TicketHome,
    /// Why, with `refused`.
    #[serde(default)]
    pub message: String,
}

// By hand: the session must not reach a log through `{:?}`.
impl std::fmt::Debug for TicketAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TicketAnswer")
            .field("decision", &self.decision)
            .field("message", &self.message)
            .finish_non_exhaustive()
    }
}

/// A ticket exchange's verdict on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TicketVerdict {
    /// Spent, and a session made.
    Session,
    /// 403.
    Refused,
}

impl From<TicketDecision> for TicketAnswer {
    fn from(d: TicketDecision) -> Self {
        match d {
            TicketDecision::Session { secret, home } => Self {
                decision: TicketVerdict::Session,
                session: Some(secret),
                home,
                message: String::new(),
            },
            TicketDecision::Refused(m) => Self {
                decision: TicketVerdict::Refused,
                session: None,
                home: crate::TicketHome::default(),
                message: m,
            },
        }
    }
}

impl From<TicketAnswer> for TicketDecision {
    fn from(a: TicketAnswer) -> Self {
        match (a.decision, a.session) {
            (TicketVerdict::Session, Some(secret)) => Self::Session {
                secret,
                home: a.home,
            },
            (TicketVerdict::Session, None) => Self::Refused(
                "the control plane accepted the ticket but sent no session; open the editor from the console again\n".into(),
            ),
            (TicketVerdict::Refused, _) => Self::Refused(a.message),
        }
    }
}

/// The link of one proxy to its control plane.
#[derive(Debug)]
pub struct ControlPlane {
    authority: String,
    token: String,
    id: String,
    address: String,
    routes: Arc<Routes>,
    stats: Arc<ProxyStats>,
    cache: Option<PathBuf>,
    generation: watch::Sender<u64>,
    /// The MQTT identities of the last table served, for [`ControlPlane::follow_mqtt`].
    mqtt: watch::Sender<Arc<Vec<crate::mqtt::MqttInstance>>>,
}

impl ControlPlane {
    /// A link to the control plane at `url` (`http://host[:port]`) with `token`, feeding
    /// `routes`; `cache` is the file the table is kept in.
    pub fn new(
        url: &str,
        token: &str,
        id: &str,
        address: &str,
        routes: Arc<Routes>,
        stats: Arc<ProxyStats>,
        cache: Option<PathBuf>,
    ) -> Result<Self, LinkError> {
        let bad = || LinkError::BadUrl(url.to_owned());
        let rest = url.strip_prefix("http://").ok_or_else(bad)?;
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        let uri: http::uri::Authority = authority.parse().map_err(|_| bad())?;
        let authority = match uri.port_u16() {
            Some(_) => uri.to_string(),
            None => format!("{}:80", uri.host()),
        };
        Ok(Self {
            authority,
            token: token.trim().to_owned(),
            id: id.to_owned(),
            address: address.to_owned(),
            routes,
            stats,
            cache,
            generation: watch::channel(0).0,
            mqtt: watch::channel(Arc::new(Vec::new())).0,
        })
    }

    /// Applies the MQTT identities of every table served to `proxy`'s shared listener, for ever,
    /// the newest first: a table that comes while the last one is applied replaces it.
    pub async fn follow_mqtt(self: Arc<Self>, proxy: Arc<crate::mqtt::MqttProxy>) {
        let mut tables = self.mqtt.subscribe();
        loop {
            let instances = tables.borrow_and_update().clone();
            if let Err(e) = proxy.set_instances(&instances).await {
                tracing::error!(error = %e, "the control plane sent MQTT identities the MQTT proxy cannot use");
            }
            if tables.changed().await.is_err() {
                return;
            }
        }
    }

    /// Serves the table of the cache file, if there is one: a proxy started while its control
    /// plane is away still serves. Returns its generation.
    pub fn load_cache(&self) -> Result<Option<u64>, CacheError> {
        let Some(path) = &self.cache else {
            return Ok(None);
        };
        let Some(table) = FeedTable::load(path)? else {
            return Ok(None);
        };
        let generation = table.generation;
        self.publish(&table);
        Ok(Some(generation))
    }

    /// Follows the route feed for ever: connects, applies every table, reconnects with backoff
    /// when the connection ends. The last table keeps serving meanwhile.
    pub async fn follow(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.stream_once().await {
                Ok(()) => {
                    tracing::warn!("the control plane closed the route feed; reconnecting");
                    backoff = Duration::from_millis(100);
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "route feed unavailable; serving the last table")
                }
            }
            self.stats.record_feed_connected(false);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// One connection of the feed, until it ends.
    async fn stream_once(&self) -> Result<(), LinkError> {
        let res = self
            .call(
                http::Method::GET,
                "/api/v1/routes",
                None,
                Some("text/event-stream"),
            )
            .await?;
        let res = expect_ok(res).await?;
        self.stats.record_feed_connected(true);
        tracing::info!(control_plane = %self.authority, "route feed connected");
        let mut body = res.into_body();
        let mut buf: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| LinkError::Protocol(e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            while let Some(end) = find(&buf, b"\n\n") {
                let event: Vec<u8> = buf.drain(..end + 2).collect();
                if let Some(table) = parse_event(&event)? {
                    self.apply(table);
                }
            }
            if buf.len() > 64 << 20 {
                return Err(LinkError::Protocol("an event over 64 MiB".into()));
            }
        }
        Ok(())
    }

    fn publish(&self, table: &FeedTable) -> bool {
        match self.routes.publish(&table.specs()) {
            Ok(_) => {
                self.stats.record_reload(true);
                self.stats.record_feed_generation(table.generation);
                self.generation.send_replace(table.generation);
                let mqtt = table.mqtt_instances();
                self.mqtt.send_if_modified(|m| {
                    let changed = **m != mqtt;
                    if changed {
                        *m = Arc::new(mqtt);
                    }
                    changed
                });
                true
            }
            Err(e) => {
                self.stats.record_reload(false);
                tracing::error!(error = %e, generation = table.generation, "the control plane sent a table the proxy cannot use; keeping the current one");
                false
            }
        }
    }

    fn apply(&self, table: FeedTable) {
        if !self.publish(&table) {
            return;
        }
        if let Some(path) = &self.cache {
            if let Err(e) = table.save(path) {
                tracing::warn!(error = %e, "cannot write the route cache");
            }
        }
    }

    /// Reports for ever: at once after each applied table, every 25 ms while requests are in
    /// flight to replicas out of rotation, else every second.
    pub async fn report(self: Arc<Self>) {
        let mut applied = self.generation.subscribe();
        loop {
            let report = self.current_report();
            let busy = !report.in_flight.is_empty();
            if let Err(e) = self.send_report(&report).await {
                tracing::debug!(error = %e, "cannot report to the control plane");
            }
            let wait = if busy {
                Duration::from_millis(25)
            } else {
                Duration::from_secs(1)
            };
            tokio::select! {
                _ = applied.changed() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// The report as of now.
    pub fn current_report(&self) -> Report {
        let table = self.routes.load();
        let mut in_flight = HashMap::new();
        let mut active = HashMap::new();
        let now = crate::activity::now_ms();
        for i in table.instances() {
            let used = i.activity();
            let last = if used.is_quiet() {
                used.last_request_ms
            } else {
                now
            };
            if last > 0 {
                active.insert(i.name.to_string(), last);
            }
            for r in &i.replicas {
                let n = r.state.in_flight();
                if n > 0 && !r.state.is_ready() {
                    in_flight.insert(r.id.to_string(), n as u64);
                }
            }
        }
        Report {
            id: self.id.clone(),
            address: self.address.clone(),
            generation: *self.generation.borrow(),
            in_flight,
            active,
        }
    }

    /// Asks the control plane to wake a sleeping instance (`POST /api/v1/routes/wake`).
    pub async fn wake(&self, instance: &str) -> Result<(), LinkError> {
        let body = serde_json::to_vec(&serde_json::json!({ "instance": instance }))
            .map_err(|e| LinkError::Protocol(e.to_string()))?;
        let res = tokio::time::timeout(
            CALL_TIMEOUT,
            self.call(http::Method::POST, "/api/v1/routes/wake", Some(body), None),
        )
        .await
        .map_err(|_| LinkError::Connect(self.authority.clone(), "timed out".into()))??;
        expect_ok(res).await.map(drop)
    }

    async fn send_report(&self, report: &Report) -> Result<(), LinkError> {
        let body = serde_json::to_vec(report).map_err(|e| LinkError::Protocol(e.to_string()))?;
        let res = tokio::time::timeout(
            CALL_TIMEOUT,
            self.call(
                http::Method::POST,
                "/api/v1/routes/report",
                Some(body),
                None,
            ),
        )
        .await
        .map_err(|_| LinkError::Connect(self.authority.clone(), "timed out".into()))??;
        expect_ok(res).await.map(drop)
    }

    /// Asks the control plane whether a request may open an instance's editor.
    pub async fn editor_check(&self, check: &EditorCheck) -> Result<EditorDecision, LinkError> {
        let answer: EditorAnswer = self.post_json("/api/v1/routes/editor-check", check).await?;
        Ok(answer.into())
    }

    /// Asks the control plane to exchange an editor ticket for a session. Not retried: the
    /// control plane may have spent the ticket before an answer was lost.
    pub async fn editor_ticket(
        &self,
        exchange: &TicketExchange,
    ) -> Result<TicketDecision, LinkError> {
        let answer: TicketAnswer = self
            .post_json("/api/v1/routes/editor-ticket", exchange)
            .await?;
        Ok(answer.into())
    }

    /// One JSON call to the control plane (`POST path`), within [`CALL_TIMEOUT`], and its JSON
    /// answer.
    async fn post_json<T: serde::Serialize, A: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &T,
    ) -> Result<A, LinkError> {
        let body = serde_json::to_vec(body).map_err(|e| LinkError::Protocol(e.to_string()))?;
        let res = tokio::time::timeout(
            CALL_TIMEOUT,
            self.call(http::Method::POST, path, Some(body), None),
        )
        .await
        .map_err(|_| LinkError::Connect(self.authority.clone(), "timed out".into()))??;
        let res = expect_ok(res).await?;
        let bytes = res
            .into_body()
            .collect()
            .await
            .map_err(|e| LinkError::Protocol(e.to_string()))?
            .to_bytes();
        serde_json::from_slice(&bytes).map_err(|e| LinkError::Protocol(e.to_string()))
    }

    async fn call(
        &self,
        method: http::Method,
        path: &str,
        body: Option<Vec<u8>>,
        accept: Option<&str>,
    ) -> Result<hyper::Response<Incoming>, LinkError> {
        let connect =
            |e: &dyn std::fmt::Display| LinkError::Connect(self.authority.clone(), e.to_string());
        let stream = tokio::net::TcpStream::connect(&self.authority)
            .await
            .map_err(|e| connect(&e))?;
        let _ = stream.set_nodelay(true);
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| connect(&e))?;
        tokio::spawn(conn);
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, &self.authority)
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", self.token),
            );
        if let Some(a) = accept {
            req = req.header(http::header::ACCEPT, a);
        }
        let body = match body {
            Some(b) => {
                req = req.header(http::header::CONTENT_TYPE, "application/json");
                Bytes::from(b)
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(body))
            .map_err(|e| LinkError::Protocol(e.to_string()))?;
        send.send_request(req).await.map_err(|e| connect(&e))
    }
}

/// The response if it is a 200, else its status and (the start of) its body as the error.
async fn expect_ok(res: hyper::Response<Incoming>) -> Result<hyper::Response<Incoming>, LinkError> {
    if res.status() == http::StatusCode::OK {
        return Ok(res);
    }
    let status = res.status().as_u16();
    let body = res
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned();
    Err(LinkError::Status(status, text))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The table of one server-sent event (`event: table`, `data:` lines); `None` for other events
/// and comments (keep-alives).
fn parse_event(event: &[u8]) -> Result<Option<FeedTable>, LinkError> {
    let text = std::str::from_utf8(event).map_err(|e| LinkError::Protocol(e.to_string()))?;
    let mut kind = "message";
    let mut data = String::new();
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("event:") {
            kind = v.trim();
        } else if let Some(v) = line.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(v.strip_prefix(' ').unwrap_or(v));
        }
    }
    if kind != "table" || data.is_empty() {
        return Ok(None);
    }
    serde_json::from_str(&data)
        .map(Some)
        .map_err(|e| LinkError::Protocol(format!("a table that is not one: {e}")))
}

/// What a request asks for, its credentials and origin, as the gate's answer depends on them.
type GateKey = (
    Option<crate::HttpAuth>,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
);

/// The waker of a standalone proxy: asks the control plane, at most once per instance every
/// half second (a burst of requests to a sleeping instance asks once).
#[derive(Debug)]
pub struct RemoteWaker {
    link: Arc<ControlPlane>,
    asked: crate::activity::AskOnce,
}

impl RemoteWaker {
    /// A waker asking `link`'s control plane.
    pub fn new(link: Arc<ControlPlane>) -> Self {
        Self {
            link,
            asked: crate::activity::AskOnce::new(Duration::from_millis(500)),
        }
    }
}

impl crate::activity::Waker for RemoteWaker {
    fn wake(&self, instance: &str) {
        if !self.asked.first(instance) {
            return;
        }
        let (link, name) = (self.link.clone(), instance.to_owned());
        tokio::spawn(async move {
            if let Err(error) = link.wake(&name).await {
                tracing::warn!(instance = %name, %error, "cannot ask the control plane to wake the instance");
            }
        });
    }
}

/// The editor gate of a standalone proxy: asks the control plane, keeps each answer for
/// [`GATE_TTL`] per instance, method and credentials. A control plane that cannot answer
/// denies (403), naming why. Editor tickets go to the control plane every time, and nothing of
/// them is kept.
#[derive(Debug)]
pub struct RemoteEditorGate {
    link: Arc<ControlPlane>,
    answers: Mutex<HashMap<GateKey, (Instant, EditorDecision)>>,
}

impl RemoteEditorGate {
    /// A gate asking `link`'s control plane.
    pub fn new(link: Arc<ControlPlane>) -> Self {
        Self {
            link,
            answers: Mutex::default(),
        }
    }
}

/// Most answers kept; past it, expired ones are dropped, and all if none is.
const MAX_ANSWERS: usize = 10_000;

impl EditorGate for RemoteEditorGate {
    fn check<'a>(
        &'a self,
        instance: &'a str,
        access: crate::Access,
        method: &'a http::Method,
        headers: &'a http::HeaderMap,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = EditorDecision> + Send + 'a>> {
        Box::pin(async move {
            let header = |name: http::header::HeaderName| {
                headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            let check = EditorCheck {
                instance: instance.to_owned(),
                method: method.as_str().to_owned(),
                authorization: header(http::header::AUTHORIZATION),
                cookie: header(http::header::COOKIE),
                origin: header(http::header::ORIGIN),
                sec_fetch_site: header(http::header::HeaderName::from_static("sec-fetch-site")),
                flows: match access {
                    crate::Access::Editor => None,
                    crate::Access::Flows(mode) => Some(mode),
                },
            };
            let key: GateKey = (
                check.flows,
                check.instance.clone(),
                check.method.clone(),
                check.authorization.clone(),
                check.cookie.clone(),
                check.origin.clone(),
                check.sec_fetch_site.clone(),
            );
            let now = Instant::now();
            if let Ok(answers) = self.answers.lock() {
                if let Some((at, d)) = answers.get(&key) {
                    if now.duration_since(*at) < GATE_TTL {
                        return d.clone();
                    }
                }
            }
            let decision = match self.link.editor_check(&check).await {
                Ok(d) => d,
                Err(e) => {
                    let what = match access {
                        crate::Access::Editor => "the editor of",
                        crate::Access::Flows(_) => "",
                    };
                    return EditorDecision::Deny(format!(
                        "cannot check access to {what} {instance}: {e}\n"
                    ));
                }
            };
            if let Ok(mut answers) = self.answers.lock() {
                if answers.len() >= MAX_ANSWERS {
                    answers.retain(|_, (at, _)| now.duration_since(*at) < GATE_TTL);
                    if answers.len() >= MAX_ANSWERS {
                        answers.clear();
                    }
                }
                answers.insert(key, (now, decision.clone()));
            }
            decision
        })
    }

    fn exchange<'a>(
        &'a self,
        instance: &'a str,
        ticket: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = TicketDecision> + Send + 'a>> {
        // Straight to the control plane every time: an answer kept and given again would
        // hand one ticket's session to a second browser.
        Box::pin(async move {
            let exchange = TicketExchange {
                instance: instance.to_owned(),
                ticket: ticket.to_owned(),
            };
            match self.link.editor_ticket(&exchange).await {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(%instance, error = %e, "cannot exchange an editor ticket");
                    TicketDecision::Refused(format!(
                        "cannot open the editor of {instance}: {e}; try again from the console\n"
                    ))
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_carry_tables_and_everything_else_is_skipped() {
        let table = FeedTable {
            generation: 3,
            instances: Vec::new(),
            mqtt: Vec::new(),
        };
        let event = format!(
            "event: table\nid: 3\ndata: {}\n\n",
            serde_json::to_string(&table).unwrap()
        );
        assert_eq!(parse_event(event.as_bytes()).unwrap(), Some(table));
        assert_eq!(parse_event(b": keep-alive\n\n").unwrap(), None);
        assert_eq!(parse_event(b"event: other\ndata: {}\n\n").unwrap(), None);
        assert!(parse_event(b"event: table\ndata: {\n\n").is_err());
    }

    #[test]
    fn ticket_answers_cross_the_wire_and_a_session_without_a_secret_is_refused() {
        for d in [
            TicketDecision::Session {
                secret: "abc".into(),
                home: crate::TicketHome::Editor,
            },
            TicketDecision::Session {
                secret: "abc".into(),
                home: crate::TicketHome::Flows,
            },
            TicketDecision::Refused("used\n".into()),
        ] {
            let wire = serde_json::to_string(&TicketAnswer::from(d.clone())).unwrap();
            let back: TicketAnswer = serde_json::from_str(&wire).unwrap();
            assert_eq!(TicketDecision::from(back), d, "{wire}");
        }
        let empty: TicketAnswer = serde_json::from_str(r#"{"decision":"session"}"#).unwrap();
        assert!(matches!(
            TicketDecision::from(empty),
            TicketDecision::Refused(_)
        ));
    }

    #[test]
    fn only_plain_http_urls_name_a_control_plane() {
        let routes = Arc::new(Routes::new());
        let stats = Arc::new(ProxyStats::default());
        let link = |url: &str| {
            ControlPlane::new(url, "t", "p", "a", routes.clone(), stats.clone(), None)
                .map(|c| c.authority)
        };
        assert_eq!(link("http://cp:3000").unwrap(), "cp:3000");
        assert_eq!(link("http://cp/").unwrap(), "cp:80");
        for bad in [
            "https://cp:3000",
            "cp:3000",
            "http://",
            "http://cp:3000/x y",
        ] {
            assert!(link(bad).is_err(), "{bad}");
        }
    }
}
