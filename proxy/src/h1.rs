//! The HTTP/1.1 core: the common request, forwarded without a generic HTTP implementation.
//!
//! Most requests to an instance are plain: an HTTP/1.1 request for a flow's endpoint or a
//! dashboard, with a small body or none, that the proxy only passes on. For these, running two
//! full HTTP/1 state machines (hyper's server for the client, hyper's client for the replica,
//! each on its own task) costs more than the forwarding itself (`benches/README.md`). This core
//! does what nginx and HAProxy do instead, on the client connection's own task:
//!
//! 1. parse the request head once (`httparse`), in the connection's buffer;
//! 2. write the replica's request head straight from it: hop-by-hop headers and Tandem's
//!    credentials left out, `X-Forwarded-*` added; the head and the body go in one write, on a
//!    bare keep-alive socket from the replica's pool;
//! 3. parse the response head, write the client's head (hop-by-hop headers out,
//!    `X-Tandem-Replica` in), and relay the body as it comes, byte for byte, following its
//!    framing (length, chunked, or to the end of the connection) only to know where it ends.
//!
//! Everything else goes to hyper and [`Proxy::handle`], which stays the reference: what the
//! core forwards, it forwards exactly as `handle` would, and anything it does not recognise
//! as plain it hands over, with the bytes it has read, for the rest of the connection. That is
//! every request the proxy answers or waits on itself (unknown hosts, the editor policy, HTTP
//! auth, tickets, sleeping or held instances, bad input), upgrades, `Expect`, chunked or large
//! request bodies (they stream through hyper), absolute-form targets and HTTP/1.0.
//!
//! Failures the core meets once it has a request (no replica reachable, a replica that closes,
//! the upstream timeout) are answered and retried here by the same rules as `handle`'s
//! ([`crate::proxy::Failure`]).
//!
//! A connection keeps its buffers from request to request, so a busy one allocates nothing; once
//! idle for [`IDLE_RELEASE`] it gives them back. The tests (`h1/tests.rs`) hold the two head
//! rewrites to `handle`'s rules over generated requests and responses.

mod chunked;

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Response;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use crate::access_log::Entry;
use crate::body::ResponseBody;
use crate::credentials::{carries_tandem_token, SESSION_COOKIE};
use crate::proxy::{forwarded_as_is, Failure, Proxy, AFFINITY_COOKIE, STALE_RETRIES};
use crate::routes::{normalize_host, Instance};
use crate::{balance, pool};
use chunked::Chunked;

/// Longest request head the core reads; a longer one goes to hyper, whose limits answer it.
const MAX_REQUEST_HEAD: usize = 32 * 1024;
/// Most request headers the core parses; more go to hyper (which takes up to 100).
const MAX_REQUEST_HEADERS: usize = 64;
/// Largest request body the core takes. It holds the body whole, to send it again when a
/// replica fails before answering; larger bodies stream through hyper.
const MAX_BODY: usize = 64 * 1024;
/// Longest response head read from a replica; a longer one is a 502.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Most response headers read from a replica; more are a 502.
const MAX_RESPONSE_HEADERS: usize = 100;
/// A connection idle this long between requests gives its buffers back ([`Conn::release`]).
const IDLE_RELEASE: std::time::Duration = std::time::Duration::from_secs(1);
/// Room for a read from the client: a request head and a small body usually fit.
const CLIENT_READ: usize = 4 * 1024;
/// Room for a read from a replica, at first: most answers are small.
const REPLICA_READ: usize = 4 * 1024;
/// Room for a read from a replica once a large body has filled the smaller ones.
const REPLICA_READ_MAX: usize = 64 * 1024;

/// How a connection left the core.
pub(crate) enum Outcome<C> {
    /// It is over: closed by either side, timed out, or drained.
    Done,
    /// Hyper takes it from here, starting with the bytes the core has read.
    Hyper(Rewind<C>),
}

/// Serves `client`'s requests until the connection ends or one is not for the core.
///
/// `drain` set: the connection closes once it is between requests.
pub(crate) async fn serve<C>(
    proxy: &Proxy,
    mut client: C,
    peer: SocketAddr,
    tls: bool,
    drain: &mut watch::Receiver<bool>,
) -> Outcome<C>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let mut conn = Conn {
        inb: Vec::new(),
        out: Vec::new(),
        upbuf: Vec::new(),
        hout: Vec::new(),
        peer,
        peer_ip: peer.ip().to_string(),
        tls,
        deadline: Deadline::new(proxy.config().header_timeout),
        idle_release: Deadline::new(IDLE_RELEASE),
    };
    // One wait for the drain per connection, registered once, rather than one per request.
    let mut drain_wait = drain.clone();
    let mut drained = std::pin::pin!(async move {
        let _ = drain_wait.changed().await;
    });
    loop {
        if *drain.borrow() {
            return Outcome::Done;
        }
        let now = Instant::now();
        conn.deadline.set(now + proxy.config().header_timeout);
        conn.idle_release.set(now + IDLE_RELEASE);
        let mut released = false;
        let req = loop {
            match prepare(proxy, &conn.inb, &mut conn.out, &conn.peer_ip, conn.tls) {
                Prepared::Forward(req) => break req,
                Prepared::Hyper => return Outcome::Hyper(Rewind::new(conn.inb, client)),
                Prepared::Head => {}
                Prepared::Body => {
                    // A body not here with its head is left to hyper, which streams it; one
                    // already on its way is taken.
                    match read_now(&mut client, &mut conn.inb).await {
                        Some(Ok(n)) if n > 0 => continue,
                        Some(_) => return Outcome::Done,
                        None => return Outcome::Hyper(Rewind::new(conn.inb, client)),
                    }
                }
            }
            let idle = conn.inb.is_empty();
            let read = tokio::select! {
                biased;
                r = read_client(&mut client, &mut conn.inb) => r,
                () = conn.deadline.passed() => return Outcome::Done,
                // Completes once, and the connection ends with it: never polled again.
                () = drained.as_mut(), if idle => return Outcome::Done,
                () = conn.idle_release.passed(), if idle && !released => {
                    conn.release();
                    released = true;
                    continue;
                }
            };
            match read {
                Ok(n) if n > 0 => {}
                // Closed, or reset: between requests that is the end; within a head, nothing
                // was asked.
                _ => return Outcome::Done,
            }
        };
        match exchange(proxy, &mut conn, &mut client, &req, drain).await {
            Step::Next => {
                // Usually the whole buffer; a pipelined request stays.
                conn.inb.drain(..req.len.min(conn.inb.len()));
            }
            Step::Close => {
                let _ = client.shutdown().await;
                return Outcome::Done;
            }
        }
    }
}

/// A client connection's buffers, reused from request to request.
struct Conn {
    /// What the client sent and the core has not answered yet.
    inb: Vec<u8>,
    /// The request as the replica gets it.
    out: Vec<u8>,
    /// What the replica sent.
    upbuf: Vec<u8>,
    /// The response head as the client gets it.
    hout: Vec<u8>,
    peer: SocketAddr,
    /// The client's address as `X-Forwarded-For` names it.
    peer_ip: String,
    tls: bool,
    /// The client's next head, or the replica's answer.
    deadline: Deadline,
    /// When the connection, idle, gives its buffers back.
    idle_release: Deadline,
}

impl Conn {
    /// Gives back the buffers of a connection idle between requests, as nginx does: a
    /// keep-alive connection waiting for its next request then holds no buffer at all, where it
    /// would otherwise keep them (4 KiB and up) for as long as the header timeout lets it wait.
    fn release(&mut self) {
        self.out = Vec::new();
        self.upbuf = Vec::new();
        self.hout = Vec::new();
        if self.inb.is_empty() {
            self.inb = Vec::new();
        }
    }
}

/// What [`prepare`] made of the client's buffer.
enum Prepared {
    /// The head is not complete yet.
    Head,
    /// The head is, and the body is not.
    Body,
    /// Not for the core.
    Hyper,
    /// A request the core forwards; its replica's version is in `out`.
    Forward(Request),
}

/// A request the core forwards, as it lies in the client's buffer.
struct Request {
    instance: Arc<Instance>,
    /// The replica picked first.
    first: usize,
    /// Bytes of the buffer it takes, head and body.
    len: usize,
    method: Range<usize>,
    path: Range<usize>,
    /// The affinity cookie's value (a replica id), when the instance has affinity.
    key: Option<Range<usize>>,
    /// The client asked to close after it.
    close: bool,
    /// A `HEAD` request: the response has no body, whatever its head says.
    head: bool,
    /// Safe to send again once written (see [`crate::proxy`]'s retries).
    idempotent: bool,
    start: Instant,
}

/// What the core does with a request header.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Header {
    Host,
    ContentLength,
    Connection,
    /// Hop-by-hop, or one the proxy sets itself: not forwarded.
    Dropped,
    XForwardedFor,
    Authorization,
    Cookie,
    /// Something hyper's path handles (upgrades, `Expect`, `Transfer-Encoding`).
    NotHere,
    Other,
}

fn request_header(name: &str) -> Header {
    let is = |n: &str| name.eq_ignore_ascii_case(n);
    match name.len() {
        4 if is("host") => Header::Host,
        6 if is("cookie") => Header::Cookie,
        6 if is("expect") => Header::NotHere,
        7 if is("upgrade") => Header::NotHere,
        10 if is("connection") => Header::Connection,
        13 if is("authorization") => Header::Authorization,
        14 if is("content-length") => Header::ContentLength,
        15 if is("x-forwarded-for") => Header::XForwardedFor,
        17 if is("transfer-encoding") => Header::NotHere,
        2 if is("te") => Header::Dropped,
        7 if is("trailer") => Header::Dropped,
        10 if is("keep-alive") => Header::Dropped,
        14 if is("x-tandem-token") => Header::Dropped,
        16 if is("proxy-connection") || is("x-forwarded-host") => Header::Dropped,
        17 if is("x-forwarded-proto") => Header::Dropped,
        18 if is("proxy-authenticate") => Header::Dropped,
        19 if is("proxy-authorization") => Header::Dropped,
        _ => Header::Other,
    }
}

/// Reads the request at the start of `buf` and, when the core forwards it, writes the replica's
/// version of it to `out`. No system call, no wait: it decides on the table as it is.
fn prepare(proxy: &Proxy, buf: &[u8], out: &mut Vec<u8>, peer_ip: &str, tls: bool) -> Prepared {
    if buf.is_empty() {
        return Prepared::Head;
    }
    let mut storage =
        [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_REQUEST_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let head_len = match req.parse_with_uninit_headers(buf, &mut storage) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_REQUEST_HEAD => return Prepared::Head,
        // Too long, too many headers, or malformed: hyper answers it (431, 400).
        _ => return Prepared::Hyper,
    };
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return Prepared::Hyper;
    };
    // Origin-form with only the characters of RFC 3986's path and query: the policy reads the
    // same path as hyper's `Uri` would give `handle` (no fragment, no other delimiter).
    if method == "CONNECT" || !target.starts_with('/') || !target.bytes().all(is_target_byte) {
        return Prepared::Hyper;
    }
    let mut host = None;
    let mut hosts = 0;
    let mut length: Option<usize> = None;
    let mut close = false;
    let mut forwarded_for = None;
    for h in req.headers.iter() {
        match request_header(h.name) {
            Header::Host => {
                hosts += 1;
                host = Some(h.value);
            }
            Header::ContentLength => match (length, parse_length(h.value)) {
                (None, Some(n)) => length = Some(n),
                // Repeated, or not a number: hyper answers 400.
                _ => return Prepared::Hyper,
            },
            Header::Connection => {
                for token in h.value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if !token.eq_ignore_ascii_case(b"keep-alive") && !token.is_empty() {
                        // It names headers to remove, or asks for an upgrade.
                        return Prepared::Hyper;
                    }
                }
            }
            Header::XForwardedFor if forwarded_for.is_some() => return Prepared::Hyper,
            Header::XForwardedFor => forwarded_for = Some(h.value),
            Header::NotHere => return Prepared::Hyper,
            Header::Dropped | Header::Authorization | Header::Cookie | Header::Other => {}
        }
    }
    let (Some(host_value), 1) = (host, hosts) else {
        return Prepared::Hyper;
    };
    // `HeaderValue::to_str`'s rule, as `handle` reads the host.
    if !host_value
        .iter()
        .all(|b| *b == b'\t' || (b' '..=b'~').contains(b))
    {
        return Prepared::Hyper;
    }
    let Some(name) = std::str::from_utf8(host_value)
        .ok()
        .and_then(normalize_host)
    else {
        return Prepared::Hyper;
    };
    let Some(instance) = proxy.routes().load().lookup(&name).cloned() else {
        return Prepared::Hyper;
    };
    let path = target.split('?').next().unwrap_or(target);
    let length = length.unwrap_or(0);
    if !forwarded_as_is(&instance, path)
        || length > MAX_BODY
        || length as u64 > proxy.config().max_body_bytes
    {
        return Prepared::Hyper;
    }
    let secret = instance.editor_secret.is_some();
    let mut key = None;
    for h in req.headers.iter() {
        if request_header(h.name) != Header::Cookie {
            continue;
        }
        // The session cookie is taken out of the others by `credentials::strip`.
        if secret && contains(h.value, SESSION_COOKIE.as_bytes()) {
            return Prepared::Hyper;
        }
        if instance.affinity && key.is_none() {
            key = affinity_cookie(h.value).map(|v| offset(buf, v)..offset(buf, v) + v.len());
        }
    }
    let start = Instant::now();
    let Some(first) = balance::pick(&instance, 0, key.clone().and_then(|r| buf.get(r)), start)
    else {
        // None ready: `handle` holds it, or answers 503.
        return Prepared::Hyper;
    };
    let Some(body) = buf.get(head_len..head_len + length) else {
        return Prepared::Body;
    };

    out.clear();
    for part in [method.as_bytes(), b" ", target.as_bytes(), b" HTTP/1.1\r\n"] {
        out.extend_from_slice(part);
    }
    for h in req.headers.iter() {
        let kept = match request_header(h.name) {
            Header::Host | Header::ContentLength | Header::Cookie | Header::Other => true,
            // Tandem's tokens, which `credentials::strip` takes out on instances with a secret.
            Header::Authorization => !(secret && carries_tandem_token(h.value)),
            _ => false,
        };
        if kept {
            for part in [h.name.as_bytes(), b": ", h.value, b"\r\n"] {
                out.extend_from_slice(part);
            }
        }
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    if let Some(prev) = forwarded_for.filter(|v| v.iter().all(|b| (b' '..=b'~').contains(b))) {
        out.extend_from_slice(prev);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(peer_ip.as_bytes());
    out.extend_from_slice(b"\r\nx-forwarded-host: ");
    out.extend_from_slice(host_value);
    out.extend_from_slice(if tls {
        &b"\r\nx-forwarded-proto: https\r\n\r\n"[..]
    } else {
        &b"\r\nx-forwarded-proto: http\r\n\r\n"[..]
    });
    out.extend_from_slice(body);

    Prepared::Forward(Request {
        instance,
        first,
        len: head_len + length,
        method: offset(buf, method.as_bytes())..offset(buf, method.as_bytes()) + method.len(),
        path: offset(buf, path.as_bytes())..offset(buf, path.as_bytes()) + path.len(),
        key,
        close,
        head: method == "HEAD",
        idempotent: matches!(
            method,
            "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE" | "TRACE"
        ),
        start,
    })
}

/// RFC 3986's `pchar`, `/` and `?`: the characters of an origin-form target's path and query.
fn is_target_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'%'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
                | b':'
                | b'@'
                | b'/'
                | b'?'
        )
}

/// A `Content-Length` value: digits only.
fn parse_length(v: &[u8]) -> Option<usize> {
    if v.is_empty() || v.len() > 12 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Where `part`, a slice of `buf`, starts in it.
fn offset(buf: &[u8], part: &[u8]) -> usize {
    (part.as_ptr() as usize).saturating_sub(buf.as_ptr() as usize)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The affinity cookie's value in one `Cookie` header, read as `handle` reads it.
fn affinity_cookie(value: &[u8]) -> Option<&[u8]> {
    if !value
        .iter()
        .all(|b| *b == b'\t' || (b' '..=b'~').contains(b))
    {
        return None;
    }
    value
        .split(|b| *b == b';')
        .filter_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|b| *b == b'=')?;
            Some((&pair[..eq], &pair[eq + 1..]))
        })
        .find(|(k, v)| *k == AFFINITY_COOKIE.as_bytes() && !v.is_empty())
        .map(|(_, v)| v)
}

/// What the connection does after a request.
enum Step {
    Next,
    Close,
}

/// Why a replica gave no usable response head.
enum Unanswered {
    /// Nothing came back: the request may not have been read (a reused socket the replica had
    /// closed), or the replica failed on it.
    Nothing(io::Error),
    /// Something came back that is not a response head.
    Broken(String),
    Timeout,
}

/// Forwards `req` (in `conn.out`) to a replica and relays its answer to the client, retrying
/// where `handle` would.
async fn exchange<C>(
    proxy: &Proxy,
    conn: &mut Conn,
    client: &mut C,
    req: &Request,
    drain: &watch::Receiver<bool>,
) -> Step
where
    C: AsyncWrite + Unpin,
{
    let config = proxy.config();
    let instance = &*req.instance;
    let key = req.key.clone().and_then(|r| conn.inb.get(r));
    instance.stats.activity.touch();
    // Sent again on another replica after a failure, as `handle` sends bodyless idempotent
    // requests again (the core holds the body, so a body does not prevent it here).
    let resend = instance.replicas.len() > 1 && config.max_attempts > 1 && req.idempotent;
    let mut next = Some(req.first);
    let mut tried = 0u64;
    let mut attempts = 0u32;
    let mut stale = 0u32;
    let mut last = Failure::NoReplica;
    while attempts < config.max_attempts {
        // The first try goes at once: the clock was read as the request was taken.
        let now = match (attempts, stale) {
            (0, 0) => req.start,
            _ => Instant::now(),
        };
        let Some(idx) = next
            .take()
            .or_else(|| balance::pick(instance, tried, key, now))
        else {
            break;
        };
        let replica = &instance.replicas[idx];
        if attempts > 0 || stale > 0 {
            instance.stats.retry();
        }
        let (mut up, reused) = match replica
            .state
            .pool
            .take_socket(now, config.pool_idle_timeout)
        {
            Some(s) => (s, true),
            None => match pool::connect_socket(replica.addr, config.connect_timeout).await {
                Ok(s) => (s, false),
                Err(e) => {
                    attempts += 1;
                    tried |= 1 << idx;
                    proxy.connect_failed(instance, replica, &e);
                    last = Failure::Connect(replica.id.clone(), e);
                    continue;
                }
            },
        };
        let in_flight = replica.state.begin_request();
        let sent = if reused { now } else { Instant::now() };
        conn.deadline.set(sent + config.upstream_timeout);
        conn.upbuf.clear();
        let add = Additions {
            replica: config.replica_header.then(|| replica.header.as_bytes()),
            affinity: (instance.affinity && key != Some(replica.id.as_bytes()))
                .then_some(&*replica.id),
            close: req.close,
            drain,
            head: req.head,
        };
        let answer = tokio::select! {
            biased;
            a = ask(&mut up, &conn.out, &mut conn.upbuf, &mut conn.hout, &add) => a,
            () = conn.deadline.passed() => Err(Unanswered::Timeout),
        };
        let answer = match answer {
            Ok(a) => a,
            Err(Unanswered::Timeout) => {
                // The socket is dropped: the replica sees the request go.
                last = Failure::Timeout(replica.id.clone());
                break;
            }
            Err(Unanswered::Nothing(e)) => {
                if reused && req.idempotent && stale < STALE_RETRIES {
                    // Most likely closed while idle, under us: another socket.
                    stale += 1;
                    next = Some(idx);
                    continue;
                }
                attempts += 1;
                tried |= 1 << idx;
                tracing::warn!(instance = %instance.name, replica = %replica.id, error = %e, "replica failed before answering");
                last = Failure::Closed(replica.id.clone(), e.into());
                if resend {
                    continue;
                }
                break;
            }
            Err(Unanswered::Broken(msg)) => {
                tracing::warn!(instance = %instance.name, replica = %replica.id, error = %msg, "replica answered with a malformed response");
                last = Failure::Closed(replica.id.clone(), msg.into());
                break;
            }
        };
        replica.state.health.record_success();
        replica.state.stats.record(answer.status);
        let answered = finish(proxy, req, &conn.inb, &replica.id, answer.status, conn.peer);
        let relayed = relay(client, &mut up, conn, answer.head_len, answer.framing).await;
        drop(in_flight);
        return match relayed {
            Relayed::Whole { reusable } => {
                if reusable && answer.reusable {
                    // Its idle time counts from the head: never less than it really is.
                    replica.state.pool.put_socket(up, answered);
                }
                if answer.close {
                    Step::Close
                } else {
                    Step::Next
                }
            }
            Relayed::Cut => Step::Close,
        };
    }
    let (resp, replica) = proxy.failure_response(instance, last);
    let status = resp.status().as_u16();
    instance.stats.record_local(status);
    finish(
        proxy,
        req,
        &conn.inb,
        replica.as_deref().unwrap_or("none"),
        status,
        conn.peer,
    );
    let close = req.close || *drain.borrow();
    local_response(&mut conn.hout, &resp, req.head, close);
    if client.write_all(&conn.hout).await.is_err() || client.flush().await.is_err() || close {
        return Step::Close;
    }
    Step::Next
}

/// Counts a request answered (its head sent) and logs it, as `handle` does; the time it was
/// answered.
fn finish(
    proxy: &Proxy,
    req: &Request,
    inb: &[u8],
    replica: &str,
    status: u16,
    client: SocketAddr,
) -> Instant {
    let instance = &req.instance;
    let answered = Instant::now();
    let elapsed = answered.saturating_duration_since(req.start);
    instance.stats.observe(elapsed);
    // One wall-clock read for the activity and the log line.
    let ms = crate::activity::now_ms();
    instance.stats.activity.touch_at(ms);
    if let Some(log) = proxy.access_log() {
        let text = |r: &Range<usize>| {
            inb.get(r.clone())
                .and_then(|b| std::str::from_utf8(b).ok())
                .unwrap_or_default()
        };
        log.record_at(
            &Entry {
                instance: &instance.name,
                replica,
                method: text(&req.method),
                path: text(&req.path),
                status,
                micros: u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
                client: Some(client),
            },
            ms,
        );
    }
    answered
}

/// How the response body ends.
enum Framing {
    /// No body (`HEAD`, 204, 304).
    Empty,
    /// `Content-Length`: this many bytes left.
    Length(u64),
    Chunked(Chunked),
    /// At the end of the connection.
    Close,
}

impl Framing {
    /// Of `buf`, the next bytes from the replica, how many belong to the body, and whether the
    /// body ends with them.
    fn advance(&mut self, buf: &[u8]) -> Result<(usize, bool), chunked::Malformed> {
        Ok(match self {
            Self::Empty => (0, true),
            Self::Length(left) => {
                let n = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
                *left -= n as u64;
                (n, *left == 0)
            }
            Self::Chunked(c) => match c.scan(buf)? {
                Some(n) => (n, true),
                None => (buf.len(), false),
            },
            Self::Close => (buf.len(), false),
        })
    }
}

/// A replica's response head, as read.
struct Answer {
    /// Where the final head ends in the replica's buffer (interim 1xx heads before it are
    /// skipped, as hyper's client skips them).
    head_len: usize,
    status: u16,
    framing: Framing,
    /// The socket may take another request once the body is read.
    reusable: bool,
    /// The client's connection ends with this response.
    close: bool,
}

/// What the client's response head gets besides the replica's headers.
struct Additions<'a> {
    /// `X-Tandem-Replica`'s value, when it is on.
    replica: Option<&'a [u8]>,
    /// The replica id to set the affinity cookie to, when the client has to learn it.
    affinity: Option<&'a str>,
    /// The client asked to close.
    close: bool,
    /// Set: the proxy is draining, so this is the connection's last response, and says so.
    drain: &'a watch::Receiver<bool>,
    /// The request was `HEAD`: no body, whatever the head says.
    head: bool,
}

/// Writes the request to `up`, reads the response head into `buf`, and writes the client's
/// response head to `out`.
async fn ask(
    up: &mut TcpStream,
    request: &[u8],
    buf: &mut Vec<u8>,
    out: &mut Vec<u8>,
    add: &Additions<'_>,
) -> Result<Answer, Unanswered> {
    up.write_all(request).await.map_err(Unanswered::Nothing)?;
    loop {
        match read_more(up, buf, REPLICA_READ).await {
            Ok(0) if buf.is_empty() => {
                return Err(Unanswered::Nothing(io::ErrorKind::UnexpectedEof.into()))
            }
            Ok(0) => return Err(Unanswered::Broken("closed within the response head".into())),
            Ok(_) => {}
            Err(e) if buf.is_empty() => return Err(Unanswered::Nothing(e)),
            Err(e) => return Err(Unanswered::Broken(e.to_string())),
        }
        if let Some(answer) = response_head(buf, out, add)? {
            return Ok(answer);
        }
        if buf.len() > MAX_RESPONSE_HEAD {
            return Err(Unanswered::Broken("response head too large".into()));
        }
    }
}

/// Reads the final response head at the start of `buf`, when it is all there, and writes the
/// client's to `out`: the replica's, less its hop-by-hop headers, plus [`Additions`] and
/// `Connection: close` when the client's connection ends with this response.
fn response_head(
    buf: &[u8],
    out: &mut Vec<u8>,
    add: &Additions<'_>,
) -> Result<Option<Answer>, Unanswered> {
    let mut start = 0;
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        let len = match resp.parse(buf.get(start..).unwrap_or_default()) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(Unanswered::Broken(format!("malformed response head: {e}"))),
        };
        let (Some(status), Some(version)) = (resp.code, resp.version) else {
            return Err(Unanswered::Broken("malformed response head".into()));
        };
        if status == 101 {
            return Err(Unanswered::Broken(
                "101 to a request that asked for no upgrade".into(),
            ));
        }
        if (100..200).contains(&status) {
            start += len;
            continue;
        }
        let mut length = None;
        let mut chunked = None;
        let (mut close, mut keep_alive) = (false, false);
        // Headers the `Connection` header names are hop-by-hop too.
        let mut named: Vec<&[u8]> = Vec::new();
        for h in resp.headers.iter() {
            let is = |n: &str| h.name.eq_ignore_ascii_case(n);
            if is("content-length") {
                match (length, parse_length(h.value)) {
                    (None, Some(n)) => length = Some(n as u64),
                    _ => return Err(Unanswered::Broken("bad Content-Length".into())),
                }
            } else if is("transfer-encoding") {
                let last = h.value.rsplit(|b| *b == b',').next().unwrap_or_default();
                chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            } else if is("connection") {
                for token in h.value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        // `Keep-Alive` is dropped anyway: Node.js's every answer says this,
                        // and it costs no allocation.
                        keep_alive = true;
                    } else if !token.is_empty() {
                        named.push(token);
                    }
                }
            }
        }
        let framing = if add.head || status == 204 || status == 304 {
            Framing::Empty
        } else {
            match (chunked, length) {
                (Some(_), Some(_)) => {
                    return Err(Unanswered::Broken(
                        "both Transfer-Encoding and Content-Length".into(),
                    ))
                }
                (Some(true), None) => Framing::Chunked(Chunked::default()),
                (Some(false), None) | (None, None) => Framing::Close,
                (None, Some(n)) => Framing::Length(n),
            }
        };
        // HTTP/1.0 closes unless it says otherwise.
        let upstream_close = close || (version == 0 && !keep_alive);
        let until_close = matches!(framing, Framing::Close);
        let client_close = add.close || until_close || *add.drain.borrow();

        out.clear();
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(&three_digits(status));
        out.push(b' ');
        out.extend_from_slice(resp.reason.unwrap_or_default().as_bytes());
        out.extend_from_slice(b"\r\n");
        for h in resp.headers.iter() {
            let is = |n: &str| h.name.eq_ignore_ascii_case(n);
            let dropped = is("connection")
                || is("keep-alive")
                || is("proxy-connection")
                || is("upgrade")
                || is("te")
                || is("proxy-authenticate")
                || is("x-tandem-replica")
                || named
                    .iter()
                    .any(|n| n.eq_ignore_ascii_case(h.name.as_bytes()));
            if !dropped {
                for part in [h.name.as_bytes(), b": ", h.value, b"\r\n"] {
                    out.extend_from_slice(part);
                }
            }
        }
        if let Some(id) = add.replica {
            out.extend_from_slice(b"x-tandem-replica: ");
            out.extend_from_slice(id);
            out.extend_from_slice(b"\r\n");
        }
        if let Some(id) = add.affinity {
            out.extend_from_slice(b"set-cookie: ");
            out.extend_from_slice(AFFINITY_COOKIE.as_bytes());
            out.push(b'=');
            out.extend_from_slice(id.as_bytes());
            out.extend_from_slice(b"; Path=/; HttpOnly; SameSite=Lax\r\n");
        }
        if client_close {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        return Ok(Some(Answer {
            head_len: start + len,
            status,
            framing,
            reusable: !upstream_close && !until_close,
            close: client_close,
        }));
    }
}

fn three_digits(n: u16) -> [u8; 3] {
    let n = n.min(999);
    [
        b'0' + (n / 100) as u8,
        b'0' + (n / 10 % 10) as u8,
        b'0' + (n % 10) as u8,
    ]
}

/// How relaying a body ended.
enum Relayed {
    /// The client has the whole response; `reusable`: the replica sent nothing past it.
    Whole { reusable: bool },
    /// Either side failed or closed within it: the client's connection must close, as the
    /// client cannot tell where the response ends.
    Cut,
}

/// Sends the client the head in `conn.hout` and the body from the replica, as it comes.
async fn relay<C>(
    client: &mut C,
    up: &mut TcpStream,
    conn: &mut Conn,
    body_start: usize,
    mut framing: Framing,
) -> Relayed
where
    C: AsyncWrite + Unpin,
{
    let first = conn.upbuf.get(body_start..).unwrap_or_default();
    let Ok((used, mut done)) = framing.advance(first) else {
        return Relayed::Cut;
    };
    let mut reusable = used == first.len();
    conn.hout.extend_from_slice(&first[..used]);
    if client.write_all(&conn.hout).await.is_err() {
        return Relayed::Cut;
    }
    while !done {
        conn.upbuf.clear();
        let n = match read_more(up, &mut conn.upbuf, REPLICA_READ).await {
            Ok(0) if matches!(framing, Framing::Close) => break,
            Ok(0) | Err(_) => return Relayed::Cut,
            Ok(n) => n,
        };
        // A large body: fewer, larger reads.
        if n == conn.upbuf.capacity() && n < REPLICA_READ_MAX {
            conn.upbuf.reserve(n);
        }
        let Ok((used, end)) = framing.advance(&conn.upbuf[..n]) else {
            return Relayed::Cut;
        };
        done = end;
        reusable = used == n;
        if client.write_all(&conn.upbuf[..used]).await.is_err() {
            return Relayed::Cut;
        }
    }
    if client.flush().await.is_err() {
        return Relayed::Cut;
    }
    Relayed::Whole { reusable }
}

/// Writes an answer of the proxy's own (a short text body) to `out`.
fn local_response(out: &mut Vec<u8>, resp: &Response<ResponseBody>, head: bool, close: bool) {
    out.clear();
    let status = resp.status();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or_default().as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in resp.headers() {
        for part in [name.as_str().as_bytes(), b": ", value.as_bytes(), b"\r\n"] {
            out.extend_from_slice(part);
        }
    }
    let body: &[u8] = match resp.body() {
        ResponseBody::Full(Some(b)) => b,
        _ => &[],
    };
    out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !head {
        out.extend_from_slice(body);
    }
}

/// Reads what is there into `buf`, as one read of up to `room` bytes (or `buf`'s spare room,
/// when it has a quarter of that).
async fn read_more<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut Vec<u8>,
    room: usize,
) -> io::Result<usize> {
    if buf.capacity() - buf.len() < room / 4 {
        buf.reserve(room);
    }
    io.read_buf(buf).await
}

/// [`read_more`] for a client between requests: while it waits, it holds no room it has not
/// filled. With too little spare room in `buf`, it reads onto the stack and appends what came,
/// so that an idle connection whose buffers were given back holds none.
async fn read_client<R: AsyncRead + Unpin>(io: &mut R, buf: &mut Vec<u8>) -> io::Result<usize> {
    if buf.capacity() - buf.len() >= CLIENT_READ / 4 {
        return io.read_buf(buf).await;
    }
    std::future::poll_fn(|cx| {
        let mut stack = [const { MaybeUninit::<u8>::uninit() }; CLIENT_READ];
        let mut read = ReadBuf::uninit(&mut stack);
        match Pin::new(&mut *io).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) => {
                buf.extend_from_slice(read.filled());
                Poll::Ready(Ok(read.filled().len()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// Reads what is already there without waiting: `None` when nothing is.
async fn read_now<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut Vec<u8>,
) -> Option<io::Result<usize>> {
    let mut read = std::pin::pin!(read_client(io, buf));
    std::future::poll_fn(|cx| match read.as_mut().poll(cx) {
        Poll::Ready(r) => Poll::Ready(Some(r)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

/// One timer per connection, for whichever deadline applies now (the client's next head, the
/// replica's answer). Setting a deadline only stores it; the timer is moved when it fires
/// before the deadline, or when a deadline comes before it. A request thus costs no timer
/// update, where a timeout per read would register and cancel one each time.
struct Deadline {
    sleep: Pin<Box<Sleep>>,
    at: Instant,
}

impl Deadline {
    fn new(after: std::time::Duration) -> Self {
        let at = Instant::now() + after;
        Self {
            sleep: Box::pin(tokio::time::sleep_until(at)),
            at,
        }
    }

    fn set(&mut self, at: Instant) {
        self.at = at;
        if at < self.sleep.deadline() {
            self.sleep.as_mut().reset(at);
        }
    }

    /// Completes once the deadline has passed.
    async fn passed(&mut self) {
        loop {
            self.sleep.as_mut().await;
            if Instant::now() >= self.at {
                return;
            }
            self.sleep.as_mut().reset(self.at);
        }
    }
}

/// A connection handed to hyper with the bytes the core read from it: reads return those
/// first.
pub(crate) struct Rewind<C> {
    read: Vec<u8>,
    at: usize,
    io: C,
}

impl<C> Rewind<C> {
    pub(crate) fn new(read: Vec<u8>, io: C) -> Self {
        Self { read, at: 0, io }
    }
}

impl<C: AsyncRead + Unpin> AsyncRead for Rewind<C> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(left) = this.read.get(this.at..).filter(|l| !l.is_empty()) {
            let n = left.len().min(buf.remaining());
            buf.put_slice(&left[..n]);
            this.at += n;
            if this.at == this.read.len() {
                this.read = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<C: AsyncWrite + Unpin> AsyncWrite for Rewind<C> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
