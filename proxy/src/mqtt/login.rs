//! The shared listener: one address for every replica with an MQTT token, where the CONNECT's
//! credentials say which replica a connection is.
//!
//! A per-replica listener knows its replica from the port a connection arrives on. Pods on a
//! cluster reach the proxy through a Service, and a Service cannot list ports that come and go
//! with replicas, so there the replica names itself: username `<instance>-r<slot>`
//! ([`username`]), password the replica's MQTT token. The proxy holds only the token's SHA-256
//! ([`token_sha256`]) and compares hashes, so neither a stored value nor the time a comparison
//! takes says anything about a token.
//!
//! The first packet must be a CONNECT, within [`MqttConfig::login_timeout`] and at most
//! [`MAX_LOGIN_BYTES`] long: until then the client is unknown, so it gets neither a broker
//! connection nor much memory. Bad credentials are answered with CONNACK "not authorized" in
//! the client's MQTT version, then the connection is closed; anything else that is wrong
//! (no CONNECT, a malformed one, silence) closes it without an answer. Either way the broker
//! never hears of the client. A client that passes becomes a connection of its replica, served
//! exactly as one from the replica's own listener ([`conn::serve`]), with its CONNECT minus
//! username and password ([`rewrite::strip_credentials`]): the broker never sees a token.
//!
//! A replica removed from the proxy's list, or given a new token, loses the connections it made
//! with the old one: a token can be revoked.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::{Buf, BytesMut};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::conn::{self, ConnError};
use super::frame::{self, kind, Header};
use super::rewrite::{self, Protocol};
use super::{InstanceState, MqttConfig};
use crate::metrics::{MqttErrorKind, MqttReplicaStats};

/// Largest CONNECT the shared listener reads from a client it does not know yet, in bytes
/// (remaining length; lower when [`MqttConfig::max_packet_bytes`] is). 1 MiB holds a CONNECT
/// whose every string field is at MQTT's 64 KiB limit, with room for properties.
pub const MAX_LOGIN_BYTES: usize = 1024 * 1024;

/// Time a refused client gets to read its CONNACK before the socket closes: closing a socket
/// with unread input resets it, and a reset can destroy the CONNACK before the client reads it.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// The username of a replica on the shared listener: `<instance>-r<slot>`. Unambiguous, since
/// slots are digits and the last `-r` starts the slot.
pub fn username(instance: &str, slot: usize) -> String {
    format!("{instance}-r{slot}")
}

/// The lowercase hex SHA-256 of a token: the form [`super::MqttReplica::token_sha256`] takes.
pub fn token_sha256(token: &[u8]) -> String {
    Sha256::digest(token)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A SHA-256 written as 64 hex digits (either case).
pub(crate) fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    let digits = hex.as_bytes();
    if digits.len() != 64 {
        return None;
    }
    let nibble = |c: u8| (c as char).to_digit(16).and_then(|d| u8::try_from(d).ok());
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        *o = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

/// Whether two digests are equal, in a time that does not depend on where they differ.
fn same_digest(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

// === Logins ===

/// Who may connect through the shared listener: every listed replica, by username. One
/// immutable snapshot, replaced whole by [`super::MqttProxy::set_instances`].
#[derive(Debug, Default)]
pub(crate) struct Logins {
    replicas: HashMap<String, Replica>,
}

/// A listed replica as the shared listener sees it.
#[derive(Debug)]
pub(crate) struct Replica {
    pub(crate) instance: Arc<InstanceState>,
    pub(crate) slot: usize,
    pub(crate) stats: Arc<MqttReplicaStats>,
    /// `None`: the replica has no token and cannot use the shared listener.
    pub(crate) token: Option<Token>,
}

/// A replica's token as the proxy keeps it.
#[derive(Debug)]
pub(crate) struct Token {
    pub(crate) digest: [u8; 32],
    /// Reports closed when the proxy drops the token (replica removed, token changed): the
    /// connections made with it end.
    pub(crate) open: watch::Receiver<()>,
}

impl Logins {
    pub(crate) fn insert(&mut self, replica: Replica) {
        self.replicas
            .insert(username(&replica.instance.name, replica.slot), replica);
    }
}

// === Errors ===

/// Why the credentials of a CONNECT were refused: answered with CONNACK "not authorized".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No username.
    #[error("CONNECT has no username; on the shared listener the username names the replica, as <instance>-r<slot>")]
    NoUsername,
    /// A username but no password.
    #[error("CONNECT for {0} has no password; the password is the replica's MQTT token")]
    NoPassword(String),
    /// The username names no listed replica (shown lossily, at most 64 characters).
    #[error("username {0:?} names no replica of this proxy; write <instance>-r<slot>")]
    UnknownReplica(String),
    /// The replica has no token, so it is reachable on its own listener only.
    #[error("replica {0} has no MQTT token, so it cannot use the shared listener; connect it to its own listener")]
    NoToken(String),
    /// The password's SHA-256 is not the replica's token hash.
    #[error("wrong password for {0}: it is not the replica's MQTT token")]
    WrongPassword(String),
}

/// Why the shared listener did not hand a connection on to a replica.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// The client closed before sending anything (a TCP probe): not an error.
    #[error("client closed the connection before its CONNECT")]
    Closed,
    /// No whole first packet within the login timeout.
    #[error("no CONNECT within {0:?}")]
    Timeout(Duration),
    /// The first packet is not a CONNECT.
    #[error("first packet is not CONNECT")]
    NotConnect,
    /// Not MQTT, a malformed CONNECT, a socket error.
    #[error(transparent)]
    Conn(#[from] ConnError),
    /// Bad credentials; the client was sent CONNACK "not authorized".
    #[error("refused: {reason}")]
    Refused {
        /// The client's MQTT version, which the CONNACK was written in.
        protocol: Protocol,
        /// What was wrong.
        reason: Refusal,
    },
}

/// CONNACK "not authorized": return code 5 in MQTT 3.1 and 3.1.1; reason code 0x87 with no
/// properties in MQTT 5. Session present is 0: nothing of a session was touched.
pub fn not_authorized(protocol: Protocol) -> &'static [u8] {
    match protocol {
        Protocol::V31 | Protocol::V311 => &[0x20, 0x02, 0x00, 0x05],
        Protocol::V5 => &[0x20, 0x03, 0x00, 0x87, 0x00],
    }
}

/// A username, for a log line or an error: client-controlled, so lossy and cut short.
fn shown(name: &[u8]) -> String {
    String::from_utf8_lossy(name).chars().take(64).collect()
}

// === Login ===

/// A client that logged in as a replica.
pub(crate) struct Granted {
    pub(crate) instance: Arc<InstanceState>,
    pub(crate) slot: usize,
    pub(crate) stats: Arc<MqttReplicaStats>,
    /// Closes when the token the client logged in with is dropped.
    pub(crate) open: watch::Receiver<()>,
    /// What to process as read from the client: the CONNECT without credentials, then any
    /// bytes that followed it.
    pub(crate) read: BytesMut,
}

/// Checks a CONNECT (`frame` is the whole packet) against `logins`: the replica it names and
/// the CONNECT without credentials.
pub(crate) fn check<'a>(
    logins: &'a Logins,
    frame: &[u8],
    h: &Header,
) -> Result<(&'a Replica, &'a Token, bytes::Bytes), LoginError> {
    let c = rewrite::strip_credentials(frame, h).map_err(|source| ConnError::Packet {
        from: "client",
        source,
    })?;
    let refused = |reason| LoginError::Refused {
        protocol: c.protocol,
        reason,
    };
    let Some(name) = c.username else {
        return Err(refused(Refusal::NoUsername));
    };
    // Hashed before the lookup, so an unknown username costs the same as a known one.
    let digest: Option<[u8; 32]> = c.password.map(|p| Sha256::digest(p).into());
    let replica = std::str::from_utf8(name)
        .ok()
        .and_then(|n| logins.replicas.get(n));
    let Some(replica) = replica else {
        return Err(refused(Refusal::UnknownReplica(shown(name))));
    };
    let who = || username(&replica.instance.name, replica.slot);
    let Some(token) = &replica.token else {
        return Err(refused(Refusal::NoToken(who())));
    };
    let Some(digest) = digest else {
        return Err(refused(Refusal::NoPassword(who())));
    };
    if !same_digest(&digest, &token.digest) {
        return Err(refused(Refusal::WrongPassword(who())));
    }
    Ok((replica, token, c.stripped))
}

/// Reads the client's first packet (bounded in size and time) and checks its credentials; a
/// client with bad ones gets CONNACK "not authorized". Counts every failure but a silent close
/// in `rejected`, and a refusal that names a listed replica in that replica's errors
/// (`protocol`), so a replica with a stale token shows on its own series.
pub(crate) async fn login<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut S,
    logins: &ArcSwap<Logins>,
    config: &MqttConfig,
    rejected: &AtomicU64,
) -> Result<Granted, LoginError> {
    let max = config.max_packet_bytes.min(MAX_LOGIN_BYTES);
    let mut buf = BytesMut::new();
    let read = tokio::time::timeout(config.login_timeout, first_packet(client, &mut buf, max));
    let checked = match read.await {
        Err(_) => Err(LoginError::Timeout(config.login_timeout)),
        Ok(Err(e)) => Err(e),
        Ok(Ok(h)) => {
            // The newest list, loaded once the client has spoken.
            let logins = logins.load_full();
            match check(&logins, &buf[..h.frame_len()], &h) {
                Ok((r, token, stripped)) => {
                    buf.advance(h.frame_len());
                    let mut read = BytesMut::with_capacity(stripped.len() + buf.len());
                    read.extend_from_slice(&stripped);
                    read.extend_from_slice(&buf);
                    Ok(Granted {
                        instance: r.instance.clone(),
                        slot: r.slot,
                        stats: r.stats.clone(),
                        open: token.open.clone(),
                        read,
                    })
                }
                Err(e) => {
                    if let LoginError::Refused {
                        reason:
                            Refusal::NoPassword(who)
                            | Refusal::NoToken(who)
                            | Refusal::WrongPassword(who),
                        ..
                    } = &e
                    {
                        if let Some(r) = logins.replicas.get(who) {
                            r.stats.error(MqttErrorKind::Protocol);
                        }
                    }
                    Err(e)
                }
            }
        }
    };
    match &checked {
        Ok(_) | Err(LoginError::Closed) => {}
        Err(e) => {
            rejected.fetch_add(1, Ordering::Relaxed);
            if let LoginError::Refused { protocol, .. } = e {
                refuse(client, *protocol).await;
            }
        }
    }
    checked
}

/// Reads until `buf` holds the client's first packet, which must be a CONNECT.
async fn first_packet<R: AsyncRead + Unpin>(
    client: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Header, LoginError> {
    if !conn::fill(client, buf, max, "client").await? {
        return Err(LoginError::Closed);
    }
    let h = match frame::parse_header(buf, max) {
        Ok(Some(h)) => h,
        // `fill` returned, so a whole packet is there; kept as errors, never a panic.
        Ok(None) => return Err(ConnError::Truncated("client").into()),
        Err(source) => {
            return Err(ConnError::Frame {
                from: "client",
                source,
            }
            .into())
        }
    };
    if h.kind() != kind::CONNECT {
        return Err(LoginError::NotConnect);
    }
    Ok(h)
}

/// Sends CONNACK "not authorized" and closes, giving the client [`REFUSAL_LINGER`] to read it.
async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(client: &mut S, protocol: Protocol) {
    if client.write_all(not_authorized(protocol)).await.is_err() {
        return;
    }
    let _ = client.shutdown().await;
    let mut sink = [0u8; 1024];
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        while matches!(client.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

// === The listener ===

/// Accepts connections on the shared listener until aborted; aborting drops every connection
/// it accepted.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    logins: Arc<ArcSwap<Logins>>,
    config: Arc<ArcSwap<MqttConfig>>,
    next_conn: Arc<AtomicU64>,
    rejected: Arc<AtomicU64>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Some((stream, peer)) =
                    crate::server::accepted_or_back_off(accepted, "MQTT shared").await
                else {
                    continue;
                };
                conns.spawn(serve(
                    stream,
                    peer,
                    logins.clone(),
                    config.load_full(),
                    next_conn.fetch_add(1, Ordering::Relaxed),
                    rejected.clone(),
                ));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// One connection of the shared listener: the login, then the replica's connection until
/// either side closes or the token it logged in with is dropped.
async fn serve(
    mut client: TcpStream,
    peer: SocketAddr,
    logins: Arc<ArcSwap<Logins>>,
    config: Arc<MqttConfig>,
    id: u64,
    rejected: Arc<AtomicU64>,
) {
    let granted = match login(&mut client, &logins, &config, &rejected).await {
        Ok(g) => g,
        Err(LoginError::Closed) => {
            tracing::debug!(%peer, "MQTT shared listener: closed before CONNECT");
            return;
        }
        Err(error) => {
            tracing::warn!(%peer, %error, "MQTT shared listener: connection refused");
            return;
        }
    };
    let Granted {
        instance,
        slot,
        stats,
        mut open,
        read,
    } = granted;
    tracing::debug!(instance = %instance.name, replica = slot, %peer, "MQTT shared listener: logged in");
    let cx = conn::Context {
        instance: instance.clone(),
        rules: instance.rules.load_full().as_ref().clone(),
        slot,
        stats,
        config,
        id,
    };
    tokio::select! {
        () = conn::serve(client, peer, cx, read) => {}
        // Only ever an error: nothing is sent on the channel, it only closes.
        _ = open.changed() => tracing::info!(
            instance = %instance.name, replica = slot, %peer,
            "MQTT connection closed: the replica's token changed or the replica was removed"
        ),
    }
}

#[cfg(test)]
mod tests;
