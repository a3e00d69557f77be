//! One request through the proxy, phase by phase: find the instance by host, apply the editor
//! policy (and answer the editor ticket handoff, [`crate::ticket`]), choose a replica, forward
//! (retrying where that is safe), and stream the answer back.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::access_log::{AccessLog, Entry};
use crate::body::{RequestBody, ResponseBody, Tail};
use crate::credentials::{self, ADMIN_TOKEN};
use crate::metrics::ProxyStats;
use crate::pool::{self, ConnectError, Sender};
use crate::routes::{normalize_host, Instance, Routes};
use crate::{balance, policy, ticket, tunnel, ProxyConfig};

/// Name of the affinity cookie.
pub const AFFINITY_COOKIE: &str = "tandem_affinity";

/// Name of the response header that says which replica answered.
pub const REPLICA_HEADER: &str = "x-tandem-replica";

/// Reused connections that turn out closed before the request was written are replaced
/// without counting as an attempt, this many times at most.
pub(crate) const STALE_RETRIES: u32 = 4;

/// How often a held request looks for a ready replica besides when a table is swapped in.
const HOLD_RECHECK: std::time::Duration = std::time::Duration::from_millis(50);

/// The proxy: routes, settings and counters, shared by every connection.
#[derive(Debug)]
pub struct Proxy {
    routes: Arc<Routes>,
    config: ProxyConfig,
    stats: Arc<ProxyStats>,
    stop: tokio::sync::watch::Sender<bool>,
    gate: Option<Arc<dyn policy::EditorGate>>,
    /// The access log, when [`ProxyConfig::access_log`] is on.
    access: Option<AccessLog>,
    /// Wakes sleeping instances.
    waker: Option<Arc<dyn crate::activity::Waker>>,
}

impl std::fmt::Debug for dyn crate::activity::Waker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Waker")
    }
}

impl std::fmt::Debug for dyn policy::EditorGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EditorGate")
    }
}

/// Why [`Proxy::send`] sent nothing, or what went wrong.
enum Unsent {
    /// No replica could take it; nothing was tried, so the request comes back whole.
    NoneReady(Box<Request<RequestBody>>),
    /// It failed.
    Failed(Failure),
}

impl Unsent {
    fn failure(self) -> Failure {
        match self {
            Self::NoneReady(_) => Failure::NoReplica,
            Self::Failed(f) => f,
        }
    }
}

/// How a forwarded request ended without a response from a replica.
pub(crate) enum Failure {
    NoReplica,
    Connect(Arc<str>, ConnectError),
    Closed(Arc<str>, crate::body::BoxError),
    Timeout(Arc<str>),
    TooLarge(u64),
}

// === impl Proxy ===

impl Proxy {
    /// A proxy serving `routes`.
    pub fn new(routes: Arc<Routes>, config: ProxyConfig, stats: Arc<ProxyStats>) -> Self {
        Self {
            access: config
                .access_log
                .then(|| AccessLog::to_stderr(stats.access_log_dropped.clone())),
            routes,
            config,
            stats,
            stop: tokio::sync::watch::Sender::new(false),
            gate: None,
            waker: None,
        }
    }

    /// Who wakes sleeping instances. Without one, a request to a sleeping instance waits for
    /// a replica that nothing starts, and gets 503 after the hold timeout.
    pub fn with_waker(mut self, waker: Arc<dyn crate::activity::Waker>) -> Self {
        self.waker = Some(waker);
        self
    }

    /// Who may open the editor of instances that have an admin secret. Without a gate, their
    /// editor answers 401 to everyone.
    pub fn with_editor_gate(mut self, gate: Arc<dyn policy::EditorGate>) -> Self {
        self.gate = Some(gate);
        self
    }

    /// Writes the access log to `log` rather than standard error (when the access log is on).
    pub fn with_access_log(mut self, log: AccessLog) -> Self {
        if self.access.is_some() {
            self.access = Some(log);
        }
        self
    }

    /// Closes every open WebSocket tunnel (at the end of shutdown).
    pub fn stop_tunnels(&self) {
        self.stop.send_replace(true);
    }

    /// The routes this proxy serves.
    pub fn routes(&self) -> &Arc<Routes> {
        &self.routes
    }

    /// The proxy's counters.
    pub fn stats(&self) -> &Arc<ProxyStats> {
        &self.stats
    }

    /// The proxy's settings.
    pub fn config(&self) -> &ProxyConfig {
        &self.config
    }

    /// Answers one request from `client`, which came over TLS when `tls` is set. Never fails:
    /// every problem becomes a response.
    pub async fn handle(
        &self,
        mut req: Request<Incoming>,
        client: SocketAddr,
        tls: bool,
    ) -> Response<ResponseBody> {
        let start = Instant::now();

        // Phase 1: which instance.
        let host = match request_host(&req) {
            Ok(h) => h,
            Err(msg) => {
                self.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
                // Like nginx: a client that sends malformed requests loses its connection.
                let mut resp = local(StatusCode::BAD_REQUEST, msg);
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                return resp;
            }
        };
        let instance = match self.routes.load().lookup(&host) {
            Some(i) => i.clone(),
            None => {
                self.stats.unknown_host.fetch_add(1, Ordering::Relaxed);
                return local(
                    StatusCode::NOT_FOUND,
                    format!("No Node-RED instance is served at host {host}.\n"),
                );
            }
        };

        // Phase 2: policy and limits.
        // The admin secret is the proxy's to add, on editor paths only: a client-sent one never
        // passes, whatever the instance (HA, without a secret, or the path of a flow).
        req.headers_mut().remove(ADMIN_TOKEN);
        // The editor ticket handoff is the proxy's own on every instance with an admin secret,
        // answered here and never forwarded: its query holds a ticket no flow may see.
        if instance.editor_secret.is_some() && ticket::is_ticket_path(req.uri().path()) {
            let resp = ticket::answer(
                self.gate.as_deref(),
                &instance,
                req.method(),
                req.uri().query(),
                tls,
            )
            .await;
            return self.finish_local(&instance, &req, start, resp);
        }
        let editor = policy::is_editor_path(req.uri().path());
        if instance.ha && editor {
            instance.stats.editor_blocked();
            return self.finish_local(
                &instance,
                &req,
                start,
                local(StatusCode::FORBIDDEN, policy::EDITOR_BLOCKED),
            );
        }
        // The instance's own endpoints, when they are protected: asked before anything is
        // stripped (the credentials are what is asked about).
        if !editor && instance.http_auth != policy::HttpAuth::None {
            let decision = match &self.gate {
                Some(gate) => {
                    gate.check(
                        &instance.name,
                        policy::Access::Flows(instance.http_auth),
                        req.method(),
                        req.headers(),
                    )
                    .await
                }
                None => policy::EditorDecision::SignIn(
                    "This instance's endpoints are protected, and no gate checks them here.\n"
                        .into(),
                ),
            };
            if let Some(resp) = http_auth_refusal(&instance, decision) {
                return self.finish_local(&instance, &req, start, resp);
            }
        }
        if let Some(secret) = &instance.editor_secret {
            if editor {
                let decision = match &self.gate {
                    Some(gate) => {
                        gate.check(
                            &instance.name,
                            policy::Access::Editor,
                            req.method(),
                            req.headers(),
                        )
                        .await
                    }
                    None => policy::EditorDecision::SignIn(
                        "The editor of this instance is not open here.\n".into(),
                    ),
                };
                let refusal = match decision {
                    policy::EditorDecision::Allow => None,
                    policy::EditorDecision::SignIn(msg) => Some((StatusCode::UNAUTHORIZED, msg)),
                    policy::EditorDecision::Deny(msg) => Some((StatusCode::FORBIDDEN, msg)),
                };
                if let Some((status, msg)) = refusal {
                    instance.stats.editor_blocked();
                    return self.finish_local(&instance, &req, start, local(status, msg));
                }
            }
            credentials::strip(req.headers_mut());
            if editor {
                req.headers_mut().insert(ADMIN_TOKEN, secret.clone());
            }
        }
        if let Some(len) = content_length(req.headers()) {
            if len > self.config.max_body_bytes {
                let msg = format!(
                    "The request body of {len} bytes is larger than the limit of {} bytes.\n",
                    self.config.max_body_bytes
                );
                return self.finish_local(
                    &instance,
                    &req,
                    start,
                    local(StatusCode::PAYLOAD_TOO_LARGE, msg),
                );
            }
        }

        // Phase 3: affinity key.
        // The replica the client's cookie names; the answer names the one it got, when they
        // differ (a new client, or one whose replica left the rotation).
        let key = instance
            .affinity
            .then(|| affinity_cookie(req.headers()))
            .flatten();

        // Its use, for sleeping when idle; a sleeping instance is woken, and the request waits
        // for its replica like any held request. Only requests that passed the checks above: a
        // client refused 401 neither wakes an instance nor keeps it awake.
        instance.stats.activity.touch();
        self.wake_if_asleep(&instance);

        // Phase 4: forward (once a replica is ready, for an instance that holds requests).
        let upgrade = is_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
        let method = req.method().clone();
        // Copied only for the access log: the request itself moves upstream.
        let path = self.config.access_log.then(|| req.uri().path().to_owned());
        let upstream = self.upstream_request(req, &host, client, upgrade.is_some(), tls);
        let (instance, result) = self
            .forward(
                instance,
                &host,
                upstream,
                key.as_deref().map(str::as_bytes),
                upgrade.is_some(),
            )
            .await;

        let (resp, status, replica) = match result {
            Ok((resp, idx, tail)) => {
                let status = resp.status().as_u16();
                let r = &instance.replicas[idx];
                r.state.stats.record(status);
                let mut resp = self.client_response(resp, &instance, idx, tail, upgrade);
                if instance.affinity && key.as_deref() != Some(&*r.id) {
                    let cookie =
                        format!("{AFFINITY_COOKIE}={}; Path=/; HttpOnly; SameSite=Lax", r.id);
                    if let Ok(v) = HeaderValue::from_str(&cookie) {
                        resp.headers_mut().append(header::SET_COOKIE, v);
                    }
                }
                (resp, status, Some(r.id.clone()))
            }
            Err(failure) => {
                let (resp, replica) = self.failure_response(&instance, failure);
                let status = resp.status().as_u16();
                instance.stats.record_local(status);
                (resp, status, replica)
            }
        };
        let elapsed = start.elapsed();
        instance.stats.observe(elapsed);
        // Forwarded: the end of its use too (a long request counts until it ends).
        instance.stats.activity.touch();
        if let Some(log) = &self.access {
            log.record(&Entry {
                instance: &instance.name,
                replica: replica.as_deref().unwrap_or("none"),
                method: method.as_str(),
                path: path.as_deref().unwrap_or_default(),
                status,
                micros: u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
                client: Some(client),
            });
        }
        resp
    }

    /// Asks the waker to wake `instance` when it sleeps.
    fn wake_if_asleep(&self, instance: &Instance) {
        if instance.asleep {
            instance.stats.woken();
            if let Some(waker) = &self.waker {
                waker.wake(&instance.name);
            }
        }
    }

    /// The access log, when it is on.
    pub(crate) fn access_log(&self) -> Option<&AccessLog> {
        self.access.as_ref()
    }

    /// The answer for a request no replica answered, and the replica to blame, if any.
    pub(crate) fn failure_response(
        &self,
        instance: &Instance,
        failure: Failure,
    ) -> (Response<ResponseBody>, Option<Arc<str>>) {
        let name = &instance.name;
        let (status, msg, replica) = match failure {
            Failure::NoReplica => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("No replica of instance {name} is ready and healthy; try again shortly.\n"),
                None,
            ),
            Failure::Connect(r, e) => (
                StatusCode::BAD_GATEWAY,
                format!("Could not reach replica {r} of instance {name}: {e}.\n"),
                Some(r),
            ),
            Failure::Closed(r, e) => (
                StatusCode::BAD_GATEWAY,
                format!("Replica {r} of instance {name} failed before it answered: {e}.\n"),
                Some(r),
            ),
            Failure::TooLarge(limit) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("The request body is larger than the limit of {limit} bytes.\n"),
                None,
            ),
            Failure::Timeout(r) => (
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "Replica {r} of instance {name} did not answer within {:?}.\n",
                    self.config.upstream_timeout
                ),
                Some(r),
            ),
        };
        let mut resp = local(status, msg);
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        (resp, replica)
    }

    /// Counts and logs an answer of the proxy's own for a known instance.
    fn finish_local(
        &self,
        instance: &Instance,
        req: &Request<Incoming>,
        start: Instant,
        resp: Response<ResponseBody>,
    ) -> Response<ResponseBody> {
        let status = resp.status().as_u16();
        instance.stats.record_local(status);
        let elapsed = start.elapsed();
        instance.stats.observe(elapsed);
        if let Some(log) = &self.access {
            log.record(&Entry {
                instance: &instance.name,
                replica: "none",
                method: req.method().as_str(),
                path: req.uri().path(),
                status,
                micros: u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
                client: None,
            });
        }
        resp
    }

    /// The request as the replica gets it: origin-form URI, hop-by-hop headers removed,
    /// `X-Forwarded-*` set, body limited.
    fn upstream_request(
        &self,
        req: Request<Incoming>,
        host: &str,
        client: SocketAddr,
        upgrade: bool,
        tls: bool,
    ) -> Request<RequestBody> {
        let (mut parts, body) = req.into_parts();
        // HTTP/2 names the host in the target's authority and sends no Host header.
        let original_host = parts
            .headers
            .get(header::HOST)
            .cloned()
            .or_else(|| {
                let authority = parts.uri.authority()?;
                HeaderValue::from_str(authority.as_str()).ok()
            })
            .or_else(|| HeaderValue::from_str(host).ok());
        if parts.uri.authority().is_some() {
            // Absolute-form target: the authority is the host; the replica gets origin-form.
            let pq = parts
                .uri
                .path_and_query()
                .map(|pq| pq.as_str())
                .unwrap_or("/");
            parts.uri = pq.parse::<Uri>().unwrap_or_else(|_| Uri::from_static("/"));
        }
        let upgrade_value = if upgrade {
            parts.headers.get(header::UPGRADE).cloned()
        } else {
            None
        };
        strip_hop_by_hop(&mut parts.headers);
        if let Some(v) = upgrade_value {
            parts.headers.insert(header::UPGRADE, v);
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        if let Some(h) = &original_host {
            parts.headers.insert(header::HOST, h.clone());
            parts.headers.insert(X_FORWARDED_HOST, h.clone());
        }
        let mut xff = String::with_capacity(64);
        if let Some(prev) = parts
            .headers
            .get(X_FORWARDED_FOR)
            .and_then(|v| v.to_str().ok())
        {
            xff.push_str(prev);
            xff.push_str(", ");
        }
        let _ = std::fmt::Write::write_fmt(&mut xff, format_args!("{}", client.ip()));
        if let Ok(v) = HeaderValue::from_str(&xff) {
            parts.headers.insert(X_FORWARDED_FOR, v);
        }
        parts.headers.insert(
            X_FORWARDED_PROTO,
            HeaderValue::from_static(if tls { "https" } else { "http" }),
        );
        parts.version = Version::HTTP_11;
        Request::from_parts(parts, RequestBody::new(body, self.config.max_body_bytes))
    }

    /// Sends `req` to a replica of `instance`, retrying on another replica when nothing was sent
    /// (connect failure) and, for idempotent bodyless requests, when the replica failed before
    /// answering.
    ///
    /// A request that finds no replica available, to an instance that holds requests, waits for
    /// one ([`Proxy::ready_instance`]); the instance it was sent to comes back with the result,
    /// as the table may have changed meanwhile.
    async fn forward(
        &self,
        instance: Arc<Instance>,
        host: &str,
        req: Request<RequestBody>,
        key: Option<&[u8]>,
        upgrade: bool,
    ) -> (
        Arc<Instance>,
        Result<(Response<Incoming>, usize, Tail), Failure>,
    ) {
        let req = match self.send(&instance, req, key, upgrade).await {
            Err(Unsent::NoneReady(req)) if instance.hold => *req,
            other => return (instance, other.map_err(Unsent::failure)),
        };
        let instance = self.ready_instance(instance, host, key).await;
        let result = self.send(&instance, req, key, upgrade).await;
        (instance, result.map_err(Unsent::failure))
    }

    /// One try of [`Proxy::forward`] on one table's instance.
    async fn send(
        &self,
        instance: &Instance,
        mut req: Request<RequestBody>,
        key: Option<&[u8]>,
        upgrade: bool,
    ) -> Result<(Response<Incoming>, usize, Tail), Unsent> {
        // What is needed to send the request again once it has been written. Only for requests
        // that are safe to repeat (idempotent and without a body), and only when there is another
        // replica to send it to.
        let replay = (instance.replicas.len() > 1
            && self.config.max_attempts > 1
            && is_idempotent(req.method())
            && matches!(req.body(), RequestBody::Empty))
        .then(|| {
            (
                req.method().clone(),
                req.uri().clone(),
                req.headers().clone(),
            )
        });
        let mut tried = 0u64;
        let mut attempts = 0u32;
        let mut stale = 0u32;
        let mut last = Failure::NoReplica;
        while attempts < self.config.max_attempts {
            let now = Instant::now();
            let Some(idx) = balance::pick(instance, tried, key, now) else {
                // Nothing tried yet: the request is whole, and may wait for a replica. (Checked
                // at the pick itself: readiness changes under a table, shared with newer ones.)
                if tried == 0 && stale == 0 {
                    return Err(Unsent::NoneReady(Box::new(req)));
                }
                break;
            };
            let replica = &instance.replicas[idx];
            if attempts > 0 || stale > 0 {
                instance.stats.retry();
            }
            let (mut sender, reused) = match self
                .checkout(replica.addr, &replica.state, upgrade, now)
                .await
            {
                Ok(s) => s,
                Err(e) => {
                    attempts += 1;
                    tried |= 1 << idx;
                    self.connect_failed(instance, replica, &e);
                    last = Failure::Connect(replica.id.clone(), e);
                    continue;
                }
            };
            let in_flight = replica.state.begin_request();
            let sent =
                tokio::time::timeout(self.config.upstream_timeout, sender.try_send_request(req))
                    .await;
            match sent {
                Ok(Ok(resp)) => {
                    replica.state.health.record_success();
                    let tail = Tail {
                        in_flight,
                        sender: (!upgrade).then_some(sender),
                    };
                    return Ok((resp, idx, tail));
                }
                // Dropping the sender closes the connection, so the replica sees the request go.
                Err(_) => return Err(Unsent::Failed(Failure::Timeout(replica.id.clone()))),
                Ok(Err(mut e)) => {
                    if let Some(back) = e.take_message() {
                        // Not written: a reused connection closed under us. Try another one.
                        req = back;
                        if reused && stale < STALE_RETRIES {
                            stale += 1;
                        } else {
                            attempts += 1;
                            tried |= 1 << idx;
                        }
                        last = Failure::Closed(replica.id.clone(), e.into_error().into());
                        continue;
                    }
                    attempts += 1;
                    tried |= 1 << idx;
                    let error = e.into_error();
                    if let Some(limit) = body_too_large(&error) {
                        return Err(Unsent::Failed(Failure::TooLarge(limit)));
                    }
                    tracing::warn!(instance = %instance.name, replica = %replica.id, %error, "replica failed before answering");
                    match &replay {
                        Some((m, u, h)) => {
                            let mut again = Request::new(RequestBody::Empty);
                            *again.method_mut() = m.clone();
                            *again.uri_mut() = u.clone();
                            *again.headers_mut() = h.clone();
                            req = again;
                            last = Failure::Closed(replica.id.clone(), error.into());
                        }
                        None => {
                            return Err(Unsent::Failed(Failure::Closed(
                                replica.id.clone(),
                                error.into(),
                            )))
                        }
                    }
                }
            }
        }
        Err(Unsent::Failed(last))
    }

    /// Counts a failed connect to `replica`, ejects it for a while, and says so once.
    pub(crate) fn connect_failed(
        &self,
        instance: &Instance,
        replica: &crate::routes::Replica,
        e: &ConnectError,
    ) {
        replica.state.stats.connect_error();
        let now = Instant::now();
        let fresh = !replica.state.health.is_ejected(now);
        let period = replica.state.health.eject(now, &self.config.ejection);
        if fresh {
            replica.state.verdicts.send(crate::health::Verdict {
                instance: instance.name.clone(),
                replica: replica.id.clone(),
                healthy: false,
                reason: format!("connect failed: {e}"),
            });
        }
        tracing::warn!(instance = %instance.name, replica = %replica.id, addr = %replica.addr, error = %e, ejected_for = ?period, "could not connect to replica");
    }

    /// `instance`, or, when none of its replicas can take the request and it expects one soon
    /// ([`crate::routes::InstanceSpec::hold`]), the instance as the route table has it once one
    /// can, or once [`ProxyConfig::hold_timeout`] has passed.
    async fn ready_instance(
        &self,
        mut instance: Arc<Instance>,
        host: &str,
        key: Option<&[u8]>,
    ) -> Arc<Instance> {
        if !instance.hold || balance::pick(&instance, 0, key, Instant::now()).is_some() {
            return instance;
        }
        instance.stats.held();
        let deadline = Instant::now() + self.config.hold_timeout;
        // Subscribed before the table is looked at again, so no swap goes unseen.
        let mut swaps = self.routes.swaps();
        let mut asked = instance.asleep;
        loop {
            match self.routes.load().lookup(host) {
                Some(i) => instance = i.clone(),
                None => break,
            }
            // Fell asleep while this request waited (it came as its replica was stopped): asked
            // to wake once (`handle` asked already for one asleep from the start).
            if instance.asleep && !asked {
                asked = true;
                if let Some(waker) = &self.waker {
                    waker.wake(&instance.name);
                }
            }
            if !instance.hold || balance::pick(&instance, 0, key, Instant::now()).is_some() {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            // A swap wakes it at once; a replica whose probes pass again changes no table, so
            // it looks again every HOLD_RECHECK too.
            let _ =
                tokio::time::timeout_at(deadline.min(now + HOLD_RECHECK), swaps.changed()).await;
        }
        instance
    }

    /// A pooled connection to the replica, or a new one. Upgrades always get a new one, since
    /// the connection becomes the tunnel.
    async fn checkout(
        &self,
        addr: SocketAddr,
        state: &crate::health::ReplicaState,
        upgrade: bool,
        now: Instant,
    ) -> Result<(Sender, bool), ConnectError> {
        if !upgrade {
            while let Some(mut sender) = state.pool.take(now, self.config.pool_idle_timeout) {
                // A connection goes back to the pool when its response was read to the end;
                // hyper may need a moment to notice it can take the next request.
                if sender.is_ready() || sender.ready().await.is_ok() {
                    return Ok((sender, true));
                }
            }
        }
        Ok((
            pool::connect(addr, self.config.connect_timeout).await?,
            false,
        ))
    }

    /// The replica's response as the client gets it.
    fn client_response(
        &self,
        mut resp: Response<Incoming>,
        instance: &Instance,
        replica: usize,
        tail: Tail,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    ) -> Response<ResponseBody> {
        let r = &instance.replicas[replica];
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client) = client_upgrade {
                let upstream = hyper::upgrade::on(&mut resp);
                tokio::spawn(tunnel::run(
                    client,
                    upstream,
                    self.config.idle_timeout,
                    self.stats.clone(),
                    instance.stats.clone(),
                    self.stop.subscribe(),
                    instance.name.clone(),
                    r.id.clone(),
                ));
                // The tunnel is not counted as in flight: a long-lived WebSocket is not load.
                drop(tail);
                let (mut parts, _) = resp.into_parts();
                if self.config.replica_header {
                    parts.headers.insert(REPLICA_HEADER, r.header.clone());
                }
                return Response::from_parts(parts, ResponseBody::Full(None));
            }
        }
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        if self.config.replica_header {
            parts.headers.insert(REPLICA_HEADER, r.header.clone());
        }
        Response::from_parts(parts, ResponseBody::upstream(body, tail))
    }
}

/// A short plain-text answer of the proxy's own.
pub(crate) fn local(status: StatusCode, msg: impl Into<bytes::Bytes>) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::full(msg));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The normalized host a request is for: the authority of an absolute-form target, else the one
/// `Host` header. The error says what is wrong with it.
pub(crate) fn request_host(req: &Request<Incoming>) -> Result<String, String> {
    if let Some(authority) = req.uri().authority() {
        return normalize_host(authority.as_str())
            .map(|h| h.into_owned())
            .ok_or_else(|| {
                format!(
                    "The request target names an invalid host {:?}.\n",
                    authority.as_str()
                )
            });
    }
    let mut values = req.headers().get_all(header::HOST).iter();
    let Some(value) = values.next() else {
        return Err("The request has no Host header; say which instance it is for.\n".into());
    };
    if values.next().is_some() {
        return Err("The request has more than one Host header.\n".into());
    }
    let raw = value
        .to_str()
        .map_err(|_| "The Host header is not valid text.\n".to_string())?;
    normalize_host(raw)
        .map(|h| h.into_owned())
        .ok_or_else(|| format!("The Host header {raw:?} is not a valid host name.\n"))
}

/// The limit, when `error` comes from a request body cut off at the size limit.
fn body_too_large(error: &hyper::Error) -> Option<u64> {
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        if let Some(t) = e.downcast_ref::<crate::body::BodyTooLarge>() {
            return Some(t.0);
        }
        source = e.source();
    }
    None
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// Whether a request for `path` on `instance` goes to a replica with nothing for the proxy to
/// decide or answer first: no editor ticket, no editor policy, no HTTP auth, not asleep. These
/// are the checks of [`Proxy::handle`]'s phase 2 that can answer or wait; the HTTP/1.1 core
/// ([`crate::h1`]) forwards only such requests and leaves the rest to `handle`.
pub(crate) fn forwarded_as_is(instance: &Instance, path: &str) -> bool {
    let editor = policy::is_editor_path(path);
    let ticket = instance.editor_secret.is_some() && ticket::is_ticket_path(path);
    let editor_checked = editor && (instance.ha || instance.editor_secret.is_some());
    let flows_checked = !editor && instance.http_auth != policy::HttpAuth::None;
    !(ticket || editor_checked || flows_checked || instance.asleep)
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

fn affinity_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, v)| *k == AFFINITY_COOKIE && !v.is_empty())
        .map(|(_, v)| v.to_string())
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TE
        || name == header::TRAILER
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == header::PROXY_AUTHENTICATE
        || name == header::PROXY_AUTHORIZATION
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

/// Removes hop-by-hop headers: the fixed list and every header the `Connection` header names.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names instead of nine removals.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

/// The answer to a refused request for a protected instance's own endpoints: 401 with
/// `WWW-Authenticate` (no credentials, or not valid ones), or 403 (valid credentials of someone
/// outside the instance's team); `None` when it may pass.
fn http_auth_refusal(
    instance: &Instance,
    decision: policy::EditorDecision,
) -> Option<Response<ResponseBody>> {
    let (status, msg) = match decision {
        policy::EditorDecision::Allow => return None,
        policy::EditorDecision::SignIn(msg) => (StatusCode::UNAUTHORIZED, msg),
        policy::EditorDecision::Deny(msg) => (StatusCode::FORBIDDEN, msg),
    };
    let mut resp = local(status, msg);
    if status == StatusCode::UNAUTHORIZED {
        // Tokens are bearer tokens; members sign in, and a user token is a bearer token too.
        let challenge = format!("Bearer realm=\"{}\"", instance.name);
        if let Ok(v) = HeaderValue::from_str(&challenge) {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
    }
    Some(resp)
}
