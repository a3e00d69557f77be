//! One replica connection: the client (a Node-RED replica) on one side, a new connection to the
//! broker on the other, two pumps between them.
//!
//! Each pump reads whole packets (bounded by the size limit) and writes them on in batches: a
//! run of packets that pass through unchanged is written as the bytes that arrived. On HA
//! instances the client-to-broker pump rewrites CONNECT, SUBSCRIBE and UNSUBSCRIBE, and the
//! broker-to-client pump drops retained replays on every replica but the instance's retained
//! holder (see [`super`]), acknowledging them to the broker itself.
//!
//! When one side closes cleanly, the other side's write half is shut down and the other pump
//! gets [`LINGER`] to finish; any error closes both sockets at once.
//!
//! A connection is the same whichever listener accepted it: one from the shared listener
//! arrives with its CONNECT already read and its credentials already removed
//! ([`super::login`]), and is processed from there as if it had just arrived.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use super::frame::{self, kind, FrameError, Header};
use super::rewrite::{self, PacketError, Protocol, ShareRules, Subscriptions};
use super::{InstanceState, MqttConfig};
use crate::metrics::{MqttErrorKind, MqttReplicaStats};

/// Time the second pump gets after the first ended cleanly.
pub const LINGER: Duration = Duration::from_secs(2);

/// Read buffer size of each pump.
const READ_CHUNK: usize = 16 * 1024;

/// Why a connection was closed.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The broker could not be reached.
    #[error("cannot connect to the MQTT broker {upstream}: {reason}")]
    UpstreamConnect {
        /// The broker address.
        upstream: String,
        /// The I/O error or timeout.
        reason: String,
    },
    /// Bytes that are not MQTT, from `from`.
    #[error("{from} sent a malformed packet: {source}")]
    Frame {
        /// `client` or `broker`.
        from: &'static str,
        /// What was wrong.
        source: FrameError,
    },
    /// A packet the proxy reads was invalid.
    #[error("{from} sent an invalid packet: {source}")]
    Packet {
        /// `client` or `broker`.
        from: &'static str,
        /// What was wrong.
        source: PacketError,
    },
    /// A valid packet in the wrong place.
    #[error("client broke the protocol: {0}")]
    Protocol(&'static str),
    /// The client sent a partial packet and closed.
    #[error("{0} closed the connection in the middle of a packet")]
    Truncated(&'static str),
    /// A socket error.
    #[error("{side} connection failed: {source}")]
    Io {
        /// `client` or `broker`.
        side: &'static str,
        /// The error.
        source: std::io::Error,
    },
}

impl ConnError {
    fn kind(&self) -> MqttErrorKind {
        match self {
            Self::UpstreamConnect { .. } => MqttErrorKind::UpstreamConnect,
            Self::Frame {
                source: FrameError::TooLarge { .. },
                ..
            } => MqttErrorKind::TooLarge,
            Self::Frame { .. } | Self::Packet { .. } | Self::Truncated(_) => {
                MqttErrorKind::Malformed
            }
            Self::Protocol(_) => MqttErrorKind::Protocol,
            Self::Io { .. } => MqttErrorKind::Io,
        }
    }
}

fn io(side: &'static str) -> impl Fn(std::io::Error) -> ConnError {
    move |source| ConnError::Io { side, source }
}

/// What a connection needs to know, fixed when it is accepted.
pub struct Context {
    /// The instance (for the retained holder).
    pub instance: Arc<InstanceState>,
    /// Sharing rules when the instance is HA; `None` passes everything through.
    pub rules: Option<Arc<ShareRules>>,
    /// The replica slot.
    pub slot: usize,
    /// Counters of the replica.
    pub stats: Arc<MqttReplicaStats>,
    /// Proxy settings at accept time.
    pub config: Arc<MqttConfig>,
    /// Unique id of this connection in the process.
    pub id: u64,
}

/// State both pumps of an HA connection share.
#[derive(Default)]
struct Shared {
    subscriptions: Subscriptions,
    /// QoS 2 retained replays dropped (PUBREC sent), whose PUBREL the proxy answers.
    dropped_qos2: HashSet<u16>,
}

/// Serves one accepted client connection until either side closes. `read` holds what was
/// already read from the client, processed before anything else it sends: empty on a
/// replica's own listener, the CONNECT without credentials on the shared one.
pub async fn serve(client: TcpStream, peer: SocketAddr, cx: Context, read: BytesMut) {
    let stats = cx.stats.clone();
    stats.connections.fetch_add(1, Ordering::Relaxed);
    stats.open.fetch_add(1, Ordering::Relaxed);
    let _open = Open(stats.clone(), cx.instance.clone(), cx.id);
    match run(client, &cx, read).await {
        Ok(()) => tracing::debug!(
            instance = %cx.instance.name, replica = cx.slot, %peer, "MQTT connection closed"
        ),
        Err(error) => {
            stats.error(error.kind());
            tracing::warn!(
                instance = %cx.instance.name, replica = cx.slot, %peer, %error,
                "MQTT connection closed"
            );
        }
    }
}

/// Counts an open connection and holds its place in the instance's connection order.
struct Open(Arc<MqttReplicaStats>, Arc<InstanceState>, u64);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
        self.1.leave(self.2);
    }
}

async fn run(client: TcpStream, cx: &Context, read: BytesMut) -> Result<(), ConnError> {
    let upstream = cx.config.upstream.as_str();
    let broker =
        match tokio::time::timeout(cx.config.connect_timeout, TcpStream::connect(upstream)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return Err(ConnError::UpstreamConnect {
                    upstream: upstream.into(),
                    reason: e.to_string(),
                })
            }
            Err(_) => {
                return Err(ConnError::UpstreamConnect {
                    upstream: upstream.into(),
                    reason: format!("no connection within {:?}", cx.config.connect_timeout),
                })
            }
        };
    let _ = client.set_nodelay(true);
    let _ = broker.set_nodelay(true);
    let (client_rd, client_wr) = client.into_split();
    match &cx.config.tls {
        None => {
            let (broker_rd, broker_wr) = broker.into_split();
            pump(client_rd, client_wr, read, broker_rd, broker_wr, cx).await
        }
        Some(tls) => {
            let handshake = tls.connect(upstream, broker);
            let broker = match tokio::time::timeout(cx.config.connect_timeout, handshake).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    return Err(ConnError::UpstreamConnect {
                        upstream: upstream.into(),
                        reason: format!("TLS: {e}"),
                    })
                }
                Err(_) => {
                    return Err(ConnError::UpstreamConnect {
                        upstream: upstream.into(),
                        reason: format!("no TLS handshake within {:?}", cx.config.connect_timeout),
                    })
                }
            };
            let (broker_rd, broker_wr) = tokio::io::split(broker);
            pump(client_rd, client_wr, read, broker_rd, broker_wr, cx).await
        }
    }
}

/// Both directions of one connection until either side closes.
async fn pump<R, W>(
    client_rd: OwnedReadHalf,
    client_wr: OwnedWriteHalf,
    read: BytesMut,
    broker_rd: R,
    broker_wr: W,
    cx: &Context,
) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let broker_wr = tokio::sync::Mutex::new(broker_wr);
    let shared = Mutex::new(Shared::default());

    let up = to_broker(client_rd, read, &broker_wr, &shared, cx);
    let down = to_client(broker_rd, client_wr, &broker_wr, &shared, cx);
    tokio::pin!(up, down);
    tokio::select! {
        r = &mut up => {
            r?;
            finish(down).await
        }
        r = &mut down => {
            r?;
            finish(up).await
        }
    }
}

/// Lets the other pump end by itself for [`LINGER`]; after that the connection just closes.
async fn finish(
    other: std::pin::Pin<&mut impl std::future::Future<Output = Result<(), ConnError>>>,
) -> Result<(), ConnError> {
    tokio::time::timeout(LINGER, other).await.unwrap_or(Ok(()))
}

/// Reads until `buf` holds at least one whole packet. `Ok(false)`: clean end of stream.
pub(crate) async fn fill<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    max: usize,
    side: &'static str,
) -> Result<bool, ConnError> {
    loop {
        let need = match frame::parse_header(buf, max) {
            Ok(Some(h)) if buf.len() >= h.frame_len() => return Ok(true),
            Ok(Some(h)) => h.frame_len() - buf.len(),
            Ok(None) => 1,
            Err(source) => return Err(ConnError::Frame { from: side, source }),
        };
        buf.reserve(need.max(READ_CHUNK));
        let n = rd.read_buf(buf).await.map_err(io(side))?;
        if n == 0 {
            return match buf.is_empty() {
                true => Ok(false),
                false => Err(ConnError::Truncated(side)),
            };
        }
    }
}

/// Writes what one batch produced: runs of untouched input and replacement packets, in order.
#[derive(Default)]
struct Batch {
    parts: Vec<Bytes>,
    packets: u64,
    bytes: u64,
}

impl Batch {
    fn push(&mut self, b: Bytes) {
        self.packets += 1;
        self.bytes += b.len() as u64;
        self.parts.push(b);
    }

    async fn write<W: AsyncWrite + Unpin>(
        &mut self,
        wr: &mut W,
        side: &'static str,
    ) -> Result<(), ConnError> {
        for part in self.parts.drain(..) {
            wr.write_all(&part).await.map_err(io(side))?;
        }
        Ok(())
    }
}

/// Client to broker: CONNECT first (client id rewritten on HA), SUBSCRIBE and UNSUBSCRIBE
/// rewritten on HA, everything else as is.
async fn to_broker<W: AsyncWrite + Unpin>(
    mut rd: OwnedReadHalf,
    mut buf: BytesMut,
    wr: &tokio::sync::Mutex<W>,
    shared: &Mutex<Shared>,
    cx: &Context,
) -> Result<(), ConnError> {
    let max = cx.config.max_packet_bytes;
    buf.reserve(READ_CHUNK);
    let mut protocol: Option<Protocol> = None;
    let mut batch = Batch::default();
    let suffix = format!("-r{}", cx.slot);
    loop {
        if !fill(&mut rd, &mut buf, max, "client").await? {
            let _ = wr.lock().await.shutdown().await;
            return Ok(());
        }
        // Every whole packet in the buffer; `run` counts the bytes passing through untouched.
        let mut run = 0;
        let mut run_packets = 0;
        while let Ok(Some(h)) = frame::parse_header(&buf[run..], max) {
            if buf.len() - run < h.frame_len() {
                break;
            }
            let len = h.frame_len();
            let packet = &buf[run..run + len];
            let replacement = match (h.kind(), protocol, cx.rules.as_deref()) {
                (kind::CONNECT, Some(_), _) => {
                    return Err(ConnError::Protocol("a second CONNECT"));
                }
                (kind::CONNECT, None, rules) => {
                    let c = rewrite::connect(packet, &h, rules.map(|_| suffix.as_str())).map_err(
                        |source| ConnError::Packet {
                            from: "client",
                            source,
                        },
                    )?;
                    protocol = Some(c.protocol);
                    if c.rewritten.is_some() {
                        cx.stats.client_id_rewrites.fetch_add(1, Ordering::Relaxed);
                    }
                    if rules.is_some() {
                        cx.instance.join(cx.id, &c.client_id);
                        tracing::debug!(instance = %cx.instance.name, replica = cx.slot, client_id = %c.client_id, "MQTT client connecting");
                    }
                    c.rewritten
                }
                (_, None, _) => return Err(ConnError::Protocol("first packet is not CONNECT")),
                (kind::SUBSCRIBE, Some(p), Some(rules)) => {
                    let r = rewrite::subscribe(packet, &h, p, rules).map_err(|source| {
                        ConnError::Packet {
                            from: "client",
                            source,
                        }
                    })?;
                    cx.stats
                        .filter_rewrites
                        .fetch_add(r.rewrites, Ordering::Relaxed);
                    lock(shared).subscriptions.subscribe(r.filters);
                    r.packet
                }
                (kind::UNSUBSCRIBE, Some(p), Some(rules)) => {
                    let r = rewrite::unsubscribe(packet, &h, p, rules).map_err(|source| {
                        ConnError::Packet {
                            from: "client",
                            source,
                        }
                    })?;
                    cx.stats
                        .filter_rewrites
                        .fetch_add(r.rewrites, Ordering::Relaxed);
                    lock(shared).subscriptions.unsubscribe(&r.filters);
                    r.packet
                }
                _ => None,
            };
            match replacement {
                None => {
                    run += len;
                    run_packets += 1;
                }
                Some(new) => {
                    if run > 0 {
                        batch.parts.push(buf.split_to(run).freeze());
                        batch.packets += run_packets;
                        batch.bytes += run as u64;
                    }
                    buf.advance(len);
                    batch.push(new);
                    run = 0;
                    run_packets = 0;
                }
            }
        }
        if run > 0 {
            batch.parts.push(buf.split_to(run).freeze());
            batch.packets += run_packets;
            batch.bytes += run as u64;
        }
        cx.stats.to_broker(batch.packets, batch.bytes);
        batch.packets = 0;
        batch.bytes = 0;
        let mut w = wr.lock().await;
        batch.write(&mut *w, "broker").await?;
    }
}

/// Broker to client: everything as is, except retained replays to shared subscriptions on
/// replicas that are not the instance's retained holder, which are acknowledged and dropped.
async fn to_client<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    mut rd: R,
    mut wr: OwnedWriteHalf,
    broker: &tokio::sync::Mutex<W>,
    shared: &Mutex<Shared>,
    cx: &Context,
) -> Result<(), ConnError> {
    let max = cx.config.max_packet_bytes;
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut batch = Batch::default();
    let mut acks: Vec<u8> = Vec::new();
    loop {
        if !fill(&mut rd, &mut buf, max, "broker").await? {
            let _ = wr.shutdown().await;
            return Ok(());
        }
        let mut run = 0;
        let mut run_packets = 0;
        while let Ok(Some(h)) = frame::parse_header(&buf[run..], max) {
            if buf.len() - run < h.frame_len() {
                break;
            }
            let len = h.frame_len();
            let drop_it = cx.rules.is_some()
                && match h.kind() {
                    kind::PUBLISH if h.byte1 & 0x01 == 1 => {
                        replay_to_drop(&buf[run..run + len], &h, shared, cx, &mut acks)?
                    }
                    kind::PUBREL => {
                        let id = rewrite::packet_id(&buf[run..run + len], &h, "PUBREL").map_err(
                            |source| ConnError::Packet {
                                from: "broker",
                                source,
                            },
                        )?;
                        let ours = lock(shared).dropped_qos2.remove(&id);
                        if ours {
                            acks.extend_from_slice(&[0x70, 0x02]);
                            acks.extend_from_slice(&id.to_be_bytes());
                        }
                        ours
                    }
                    _ => false,
                };
            if drop_it {
                if run > 0 {
                    batch.parts.push(buf.split_to(run).freeze());
                    batch.packets += run_packets;
                    batch.bytes += run as u64;
                }
                buf.advance(len);
                run = 0;
                run_packets = 0;
            } else {
                run += len;
                run_packets += 1;
            }
        }
        if run > 0 {
            batch.parts.push(buf.split_to(run).freeze());
            batch.packets += run_packets;
            batch.bytes += run as u64;
        }
        cx.stats.to_client(batch.packets, batch.bytes);
        batch.packets = 0;
        batch.bytes = 0;
        batch.write(&mut wr, "client").await?;
        if !acks.is_empty() {
            let mut w = broker.lock().await;
            w.write_all(&acks).await.map_err(io("broker"))?;
            acks.clear();
        }
    }
}

/// Whether a PUBLISH with RETAIN = 1 is a retained replay this replica must not process; if
/// so, queues its acknowledgement to the broker.
fn replay_to_drop(
    packet: &[u8],
    h: &Header,
    shared: &Mutex<Shared>,
    cx: &Context,
    acks: &mut Vec<u8>,
) -> Result<bool, ConnError> {
    let (topic, id) = rewrite::publish_topic(packet, h).map_err(|source| ConnError::Packet {
        from: "broker",
        source,
    })?;
    // An empty topic is a topic alias: not recognisable, so delivered.
    let Ok(topic) = std::str::from_utf8(topic) else {
        return Ok(false);
    };
    if topic.is_empty() || cx.instance.is_holder(cx.id) {
        return Ok(false);
    }
    let mut s = lock(shared);
    if !s.subscriptions.only_shared_replay(topic) {
        return Ok(false);
    }
    match ((h.byte1 >> 1) & 0x03, id) {
        (1, Some(id)) => {
            acks.extend_from_slice(&[0x40, 0x02]);
            acks.extend_from_slice(&id.to_be_bytes());
        }
        (2, Some(id)) => {
            acks.extend_from_slice(&[0x50, 0x02]);
            acks.extend_from_slice(&id.to_be_bytes());
            s.dropped_qos2.insert(id);
        }
        _ => {}
    }
    cx.stats.retained_dropped.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(instance = %cx.instance.name, replica = cx.slot, topic, "retained replay dropped: another replica of the instance processes it");
    Ok(true)
}

/// Locks the per-connection state; a poisoned lock (a panic elsewhere) still holds valid data.
fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}
