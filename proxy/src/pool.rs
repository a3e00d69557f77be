//! Upstream connections: connect with a timeout, and a small per-replica pool of idle
//! keep-alive connections.
//!
//! The pool is ours rather than hyper-util's so that a failed connect hands the request back
//! (nothing was sent, so any method can be retried on another replica) and so that each
//! replica's connections go away with the replica.
//!
//! It keeps two kinds apart: hyper's senders, for requests that go through hyper, and bare
//! sockets, for those the HTTP/1.1 core ([`crate::h1`]) forwards itself.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::body::RequestBody;

/// Sender half of an upstream HTTP/1.1 connection.
pub(crate) type Sender = http1::SendRequest<RequestBody>;

/// Idle connections kept per replica; more than this are closed when they come back.
const MAX_IDLE: usize = 256;

/// Why no connection to a replica could be made. Nothing was sent in either case.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    #[error("connect failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("HTTP handshake failed: {0}")]
    Handshake(#[from] hyper::Error),
}

/// Idle keep-alive connections to one replica, most recently used last.
#[derive(Debug, Default)]
pub(crate) struct Pool {
    idle: Mutex<Vec<Idle>>,
    sockets: Mutex<Vec<IdleSocket>>,
}

#[derive(Debug)]
struct IdleSocket {
    stream: TcpStream,
    since: Instant,
}

#[derive(Debug)]
struct Idle {
    sender: Sender,
    since: Instant,
}

impl Pool {
    /// Takes the most recently used idle connection that is still open and younger than
    /// `max_age`. Connections past `max_age` are closed: Node.js closes idle keep-alive sockets
    /// after 5 s, and a request written into a socket the server is closing may be lost.
    pub(crate) fn take(&self, now: Instant, max_age: Duration) -> Option<Sender> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(entry) = idle.pop() {
            if !entry.sender.is_closed() && now.saturating_duration_since(entry.since) < max_age {
                return Some(entry.sender);
            }
        }
        None
    }

    /// Returns a connection whose last response has been read to the end.
    pub(crate) fn put(&self, sender: Sender, now: Instant) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(Idle { sender, since: now });
        }
    }

    /// Takes the most recently used idle socket younger than `max_age` that has nothing to
    /// read. An idle socket with something to read has been closed by the replica (or sent what
    /// nobody asked for); either way it is dropped. The check reads the readiness tokio already
    /// has from epoll, so it costs no system call.
    pub(crate) fn take_socket(&self, now: Instant, max_age: Duration) -> Option<TcpStream> {
        let mut idle = self.sockets.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(entry) = idle.pop() {
            if now.saturating_duration_since(entry.since) < max_age && !readable(&entry.stream) {
                return Some(entry.stream);
            }
        }
        None
    }

    /// Returns a socket whose last response has been read to the end.
    pub(crate) fn put_socket(&self, stream: TcpStream, now: Instant) {
        let mut idle = self.sockets.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(IdleSocket { stream, since: now });
        }
    }

    /// Number of idle connections.
    pub(crate) fn idle_count(&self) -> usize {
        self.idle.lock().map(|i| i.len()).unwrap_or(0)
            + self.sockets.lock().map(|i| i.len()).unwrap_or(0)
    }
}

/// Whether tokio has seen `stream` become readable since its last read came up short.
fn readable(stream: &TcpStream) -> bool {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    stream.poll_read_ready(&mut cx).is_ready()
}

/// Opens a bare socket to `addr`, within `timeout`, for [`crate::h1`].
pub(crate) async fn connect_socket(
    addr: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream, ConnectError> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| ConnectError::Timeout(timeout))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Opens a new connection to `addr`, within `timeout`. The connection task runs on its own;
/// it supports upgrades, so the same path serves WebSocket requests.
pub(crate) async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Sender, ConnectError> {
    let stream = connect_socket(addr, timeout).await?;
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await?;
    tokio::spawn(async move {
        if let Err(error) = conn.with_upgrades().await {
            tracing::debug!(%addr, %error, "upstream connection closed with an error");
        }
    });
    Ok(sender)
}
