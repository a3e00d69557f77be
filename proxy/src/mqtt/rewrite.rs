//! The three packets the MQTT proxy changes on HA instances: CONNECT (client id), SUBSCRIBE and
//! UNSUBSCRIBE (filters into `$share/<instance>/...`), and the topic-filter logic behind them;
//! and, on every instance, the credentials the shared listener takes out of a CONNECT
//! ([`strip_credentials`]).
//!
//! SUBSCRIBE and UNSUBSCRIBE are decoded and re-encoded with rumqttc's codec (`v4` for MQTT 3.1
//! and 3.1.1, whose SUBSCRIBE is the same, `v5` for MQTT 5), and only when a filter changes:
//! a packet with nothing to rewrite is forwarded as it came.
//!
//! CONNECT is not re-encoded. rumqttc 0.25.1 drops the password flag of a username with an
//! empty password, refuses binary passwords and MQTT 3.1, and mis-parses MQTT 5 in its v4
//! decoder (measured in `shared/notes/mqtt-shared-subscriptions.md`). The client id is the one
//! field the proxy changes, so it is spliced into the packet as sent: the header up to the
//! client id is parsed with bounds checks, the id is replaced, the remaining length fixed. Every
//! other byte (flags, properties, will, credentials) stays as the client wrote it. The
//! credentials are removed the same way: username and password are the last fields of a
//! CONNECT in every version, so the packet is cut where they begin, their two flags cleared and
//! the remaining length fixed.

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;

use super::frame::{put_remaining_length, Header, MAX_REMAINING_LENGTH};

/// The MQTT version a connection speaks, from its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// MQTT 3.1 (`MQIsdp`, level 3).
    V31,
    /// MQTT 3.1.1 (`MQTT`, level 4).
    V311,
    /// MQTT 5 (`MQTT`, level 5).
    V5,
}

/// Why a packet could not be read or rewritten.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// The packet ends before a field it announces.
    #[error("{0} is truncated")]
    Truncated(&'static str),
    /// Fixed-header flags that the packet type does not allow.
    #[error("{packet} has invalid fixed-header flags {byte1:#04x}")]
    BadFlags {
        /// The packet type.
        packet: &'static str,
        /// The first byte as received.
        byte1: u8,
    },
    /// A CONNECT of an MQTT version the proxy does not speak.
    #[error(
        "CONNECT names protocol {name:?} level {level}; only MQTT 3.1, 3.1.1 and 5 are supported"
    )]
    UnsupportedProtocol {
        /// The protocol name, lossily decoded.
        name: String,
        /// The protocol level.
        level: u8,
    },
    /// The reserved CONNECT flag is set.
    #[error("CONNECT has the reserved flag set")]
    ReservedConnectFlag,
    /// The client id is not UTF-8.
    #[error("CONNECT client id is not UTF-8")]
    ClientIdNotUtf8,
    /// Bytes after the last field a packet announces.
    #[error("{0} has bytes after its last field")]
    TrailingBytes(&'static str),
    /// The rewritten packet would not fit MQTT's limits.
    #[error("{0} would be too long after the rewrite")]
    TooLong(&'static str),
    /// rumqttc refused the packet.
    #[error("{packet} is malformed: {reason}")]
    Codec {
        /// The packet type.
        packet: &'static str,
        /// What the codec said.
        reason: String,
    },
}

// === CONNECT ===

/// What the proxy learnt from a CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// The protocol version.
    pub protocol: Protocol,
    /// The client id as sent.
    pub client_id: String,
    /// The packet to send instead, when the client id changed.
    pub rewritten: Option<Bytes>,
}

/// Reads a CONNECT (`frame` is the whole packet) and, when `suffix` is given and the client id
/// is not empty, appends `suffix` to the client id.
pub fn connect(frame: &[u8], h: &Header, suffix: Option<&str>) -> Result<Connect, PacketError> {
    const P: &str = "CONNECT";
    let head = ConnectHead::read(frame, h)?;
    let mut r = head.reader;
    let id_start = r.pos;
    let id = std::str::from_utf8(r.string()?).map_err(|_| PacketError::ClientIdNotUtf8)?;
    let id_end = r.pos;
    let rewritten = match suffix {
        Some(suffix) if !id.is_empty() => {
            let new_id = format!("{id}{suffix}");
            let id_len = u16::try_from(new_id.len()).map_err(|_| PacketError::TooLong(P))?;
            let remaining = h.remaining - (id_end - id_start) + 2 + new_id.len();
            if remaining > MAX_REMAINING_LENGTH {
                return Err(PacketError::TooLong(P));
            }
            let mut out = Vec::with_capacity(5 + remaining);
            out.push(h.byte1);
            put_remaining_length(&mut out, remaining);
            out.extend_from_slice(&frame[h.header_len..id_start]);
            out.extend_from_slice(&id_len.to_be_bytes());
            out.extend_from_slice(new_id.as_bytes());
            out.extend_from_slice(&frame[id_end..]);
            Some(Bytes::from(out))
        }
        _ => None,
    };
    Ok(Connect {
        protocol: head.protocol,
        client_id: id.to_owned(),
        rewritten,
    })
}

/// CONNECT flag: a username follows.
const USERNAME_FLAG: u8 = 0x80;
/// CONNECT flag: a password follows.
const PASSWORD_FLAG: u8 = 0x40;
/// CONNECT flag: a will (properties in MQTT 5, topic, payload) follows the client id.
const WILL_FLAG: u8 = 0x04;

/// A CONNECT's credentials, and the packet without them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials<'a> {
    /// The protocol version.
    pub protocol: Protocol,
    /// The username as sent (MQTT says UTF-8; not checked, it is only compared).
    pub username: Option<&'a [u8]>,
    /// The password as sent (binary in MQTT 3.1.1 and 5).
    pub password: Option<&'a [u8]>,
    /// The CONNECT without username and password: both flags cleared, both fields cut off, the
    /// remaining length fixed, every other byte (client id, properties, will) as sent. The
    /// packet as sent when it carries neither.
    pub stripped: Bytes,
}

/// Reads the credentials of a CONNECT (`frame` is the whole packet) and cuts them out of it.
///
/// Username and password are the last fields of a CONNECT in MQTT 3.1, 3.1.1 and 5, so
/// everything before them is kept byte for byte: the packet is read up to them with bounds
/// checks (properties, client id and will skipped), and a packet with bytes after them is
/// refused, so nothing the client sent is dropped unseen.
pub fn strip_credentials<'a>(frame: &'a [u8], h: &Header) -> Result<Credentials<'a>, PacketError> {
    const P: &str = "CONNECT";
    let head = ConnectHead::read(frame, h)?;
    let mut r = head.reader;
    r.string()?; // client id
    if head.flags & WILL_FLAG != 0 {
        if head.protocol == Protocol::V5 {
            let len = r.varint()?;
            r.skip(len)?;
        }
        r.string()?; // will topic
        r.string()?; // will payload: binary, same length prefix
    }
    let cut = r.pos;
    let username = match head.flags & USERNAME_FLAG {
        0 => None,
        _ => Some(r.string()?),
    };
    let password = match head.flags & PASSWORD_FLAG {
        0 => None,
        _ => Some(r.string()?),
    };
    if r.pos != frame.len() {
        return Err(PacketError::TrailingBytes(P));
    }
    let stripped = match (username, password) {
        (None, None) => Bytes::copy_from_slice(frame),
        _ => {
            let remaining = cut - h.header_len;
            let mut out = Vec::with_capacity(5 + remaining);
            out.push(h.byte1);
            put_remaining_length(&mut out, remaining);
            out.extend_from_slice(&frame[h.header_len..head.flags_pos]);
            out.push(head.flags & !(USERNAME_FLAG | PASSWORD_FLAG));
            out.extend_from_slice(&frame[head.flags_pos + 1..cut]);
            Bytes::from(out)
        }
    };
    Ok(Credentials {
        protocol: head.protocol,
        username,
        password,
        stripped,
    })
}

/// The part of a CONNECT before its payload, read with bounds checks.
struct ConnectHead<'a> {
    protocol: Protocol,
    /// The connect flags.
    flags: u8,
    /// Where the connect flags are in the frame.
    flags_pos: usize,
    /// Positioned at the client id, the first field of the payload.
    reader: Reader<'a>,
}

impl<'a> ConnectHead<'a> {
    fn read(frame: &'a [u8], h: &Header) -> Result<Self, PacketError> {
        const P: &str = "CONNECT";
        if h.byte1 != 0x10 {
            return Err(PacketError::BadFlags {
                packet: P,
                byte1: h.byte1,
            });
        }
        let mut r = Reader {
            buf: frame,
            pos: h.header_len,
            what: P,
        };
        let name = r.string()?;
        let level = r.u8()?;
        let protocol = match (name, level) {
            (b"MQTT", 4) => Protocol::V311,
            (b"MQTT", 5) => Protocol::V5,
            (b"MQIsdp", 3) => Protocol::V31,
            _ => {
                return Err(PacketError::UnsupportedProtocol {
                    name: String::from_utf8_lossy(name).into_owned(),
                    level,
                })
            }
        };
        let flags_pos = r.pos;
        let flags = r.u8()?;
        if flags & 0x01 != 0 {
            return Err(PacketError::ReservedConnectFlag);
        }
        r.skip(2)?; // keep alive
        if protocol == Protocol::V5 {
            let len = r.varint()?;
            r.skip(len)?;
        }
        Ok(Self {
            protocol,
            flags,
            flags_pos,
            reader: r,
        })
    }
}

/// Bounds-checked reads over one packet.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], PacketError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|end| *end <= self.buf.len())
            .ok_or(PacketError::Truncated(self.what))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn skip(&mut self, n: usize) -> Result<(), PacketError> {
        self.take(n).map(drop)
    }

    fn u8(&mut self) -> Result<u8, PacketError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, PacketError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn string(&mut self) -> Result<&'a [u8], PacketError> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }

    fn varint(&mut self) -> Result<usize, PacketError> {
        let mut v = 0usize;
        for i in 0..4 {
            let b = self.u8()?;
            v |= usize::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(PacketError::Truncated(self.what))
    }
}

// === PUBLISH (read only) ===

/// Topic and packet id of a PUBLISH (`frame` is the whole packet). The packet id is `None`
/// for QoS 0.
pub fn publish_topic<'a>(
    frame: &'a [u8],
    h: &Header,
) -> Result<(&'a [u8], Option<u16>), PacketError> {
    let mut r = Reader {
        buf: frame,
        pos: h.header_len,
        what: "PUBLISH",
    };
    let topic = r.string()?;
    let id = match (h.byte1 >> 1) & 0x03 {
        0 => None,
        _ => Some(r.u16()?),
    };
    Ok((topic, id))
}

/// The packet id of a PUBREL (`frame` is the whole packet).
pub fn packet_id(frame: &[u8], h: &Header, what: &'static str) -> Result<u16, PacketError> {
    Reader {
        buf: frame,
        pos: h.header_len,
        what,
    }
    .u16()
}

// === SUBSCRIBE and UNSUBSCRIBE ===

/// One filter of a SUBSCRIBE, as the connection keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// The filter as the client wrote it.
    pub filter: String,
    /// Whether the proxy turned it into a shared subscription.
    pub shared: bool,
    /// MQTT 5 Retain As Published.
    pub retain_as_published: bool,
}

/// A SUBSCRIBE or UNSUBSCRIBE after the rewrite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewritten<T> {
    /// The packet to send instead; `None` when no filter changed (send the original).
    pub packet: Option<Bytes>,
    /// Filters rewritten.
    pub rewrites: u64,
    /// What the packet subscribes to or unsubscribes from, as the client wrote it.
    pub filters: Vec<T>,
}

/// How an HA instance's subscriptions are shared.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ShareRules {
    /// The share name: the instance's name.
    pub group: String,
    /// Filters whose subscriptions are left unshared (see [`covers`]).
    pub exclude: Vec<String>,
}

impl ShareRules {
    /// Whether `filter` is subscribed as `$share/<group>/<filter>`: not when it starts with `$`
    /// (`$SYS`, an explicit `$share` or `$queue`) or is covered by an exclusion.
    pub fn shares(&self, filter: &str) -> bool {
        !filter.starts_with('$') && !self.exclude.iter().any(|e| covers(e, filter))
    }

    /// `$share/<group>/<filter>`; `TooLong` when that no longer fits an MQTT string, since
    /// rumqttc's encoder would write its length modulo 65,536 and the broker would read the
    /// rest of the filter as packet fields of the client's choosing.
    fn shared(&self, filter: &str, packet: &'static str) -> Result<String, PacketError> {
        let shared = format!("$share/{}/{filter}", self.group);
        if shared.len() > usize::from(u16::MAX) {
            return Err(PacketError::TooLong(packet));
        }
        Ok(shared)
    }
}

fn codec_error(packet: &'static str) -> impl Fn(rumqttc::mqttbytes::Error) -> PacketError {
    move |e| PacketError::Codec {
        packet,
        reason: e.to_string(),
    }
}

fn codec_error_v5(packet: &'static str) -> impl Fn(rumqttc::v5::mqttbytes::Error) -> PacketError {
    move |e| PacketError::Codec {
        packet,
        reason: e.to_string(),
    }
}

/// Rewrites the filters of a SUBSCRIBE (`frame` is the whole packet). QoS, Retain As Published,
/// Retain Handling, the subscription identifier and user properties are kept; No Local is
/// cleared on shared filters (it is a protocol error there).
pub fn subscribe(
    frame: &[u8],
    h: &Header,
    protocol: Protocol,
    rules: &ShareRules,
) -> Result<Rewritten<Subscription>, PacketError> {
    const P: &str = "SUBSCRIBE";
    if h.byte1 != 0x82 {
        return Err(PacketError::BadFlags {
            packet: P,
            byte1: h.byte1,
        });
    }
    let bytes = Bytes::copy_from_slice(frame);
    let mut rewrites = 0;
    let mut filters = Vec::new();
    let mut out = BytesMut::new();
    match protocol {
        Protocol::V31 | Protocol::V311 => {
            let fh = rumqttc::mqttbytes::FixedHeader::new(h.byte1, h.header_len - 1, h.remaining);
            let mut sub = v4::Subscribe::read(fh, bytes).map_err(codec_error(P))?;
            for f in &mut sub.filters {
                let shared = rules.shares(&f.path);
                filters.push(Subscription {
                    filter: f.path.clone(),
                    shared,
                    retain_as_published: false,
                });
                if shared {
                    f.path = rules.shared(&f.path, P)?;
                    rewrites += 1;
                }
            }
            if rewrites > 0 {
                sub.write(&mut out).map_err(codec_error(P))?;
            }
        }
        Protocol::V5 => {
            let fh = v5::FixedHeader::new(h.byte1, h.header_len - 1, h.remaining);
            let mut sub = v5::Subscribe::read(fh, bytes).map_err(codec_error_v5(P))?;
            for f in &mut sub.filters {
                let shared = rules.shares(&f.path);
                filters.push(Subscription {
                    filter: f.path.clone(),
                    shared,
                    retain_as_published: f.preserve_retain,
                });
                if shared {
                    f.path = rules.shared(&f.path, P)?;
                    f.nolocal = false;
                    rewrites += 1;
                }
            }
            if rewrites > 0 {
                sub.write(&mut out).map_err(codec_error_v5(P))?;
            }
        }
    }
    Ok(Rewritten {
        packet: (rewrites > 0).then(|| out.freeze()),
        rewrites,
        filters,
    })
}

/// Rewrites the filters of an UNSUBSCRIBE (`frame` is the whole packet) the way [`subscribe`]
/// rewrote them, so each unsubscribes what it subscribed.
pub fn unsubscribe(
    frame: &[u8],
    h: &Header,
    protocol: Protocol,
    rules: &ShareRules,
) -> Result<Rewritten<String>, PacketError> {
    const P: &str = "UNSUBSCRIBE";
    if h.byte1 != 0xa2 {
        return Err(PacketError::BadFlags {
            packet: P,
            byte1: h.byte1,
        });
    }
    let bytes = Bytes::copy_from_slice(frame);
    let mut rewrites = 0;
    let mut out = BytesMut::new();
    let mut rewrite = |paths: &mut Vec<String>| -> Result<Vec<String>, PacketError> {
        let original = paths.clone();
        for p in paths.iter_mut() {
            if rules.shares(p) {
                *p = rules.shared(p, P)?;
                rewrites += 1;
            }
        }
        Ok(original)
    };
    let filters = match protocol {
        Protocol::V31 | Protocol::V311 => {
            let fh = rumqttc::mqttbytes::FixedHeader::new(h.byte1, h.header_len - 1, h.remaining);
            let mut unsub = v4::Unsubscribe::read(fh, bytes).map_err(codec_error(P))?;
            let original = rewrite(&mut unsub.topics)?;
            if rewrites > 0 {
                unsub.write(&mut out).map_err(codec_error(P))?;
            }
            original
        }
        Protocol::V5 => {
            let fh = v5::FixedHeader::new(h.byte1, h.header_len - 1, h.remaining);
            let mut unsub = v5::Unsubscribe::read(fh, bytes).map_err(codec_error_v5(P))?;
            let original = rewrite(&mut unsub.filters)?;
            if rewrites > 0 {
                unsub.write(&mut out).map_err(codec_error_v5(P))?;
            }
            original
        }
    };
    Ok(Rewritten {
        packet: (rewrites > 0).then(|| out.freeze()),
        rewrites,
        filters,
    })
}

// === Topic filters ===

/// Whether `filter` is a valid MQTT topic filter: not empty, `+` and `#` only as whole levels,
/// `#` only last.
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let wild = level.contains('+') || level.contains('#');
        if wild && level != "+" && level != "#" {
            return false;
        }
        if level == "#" && levels.peek().is_some() {
            return false;
        }
    }
    true
}

/// Whether the topic filter `filter` matches the topic name `topic` (MQTT rules: `+` one level,
/// `#` this level and below, including the parent; wildcards at the first level do not match
/// topics starting with `$`).
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether the exclusion filter `pattern` covers the subscription filter `filter`: every topic
/// `filter` can match is matched by `pattern`. So `replies/#` covers `replies`, `replies/x` and
/// `replies/+/y`; `a/+` covers `a/b` and `a/+` but not `a/#`; a literal covers only itself.
pub fn covers(pattern: &str, filter: &str) -> bool {
    let mut p = pattern.split('/');
    let mut f = filter.split('/');
    loop {
        match (p.next(), f.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(level)) if level != "#" => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// The subscriptions of one connection, kept to recognise retained replays.
#[derive(Debug, Default)]
pub struct Subscriptions {
    entries: Vec<Subscription>,
}

impl Subscriptions {
    /// Records a SUBSCRIBE (a filter subscribed again replaces its earlier options).
    pub fn subscribe(&mut self, subs: Vec<Subscription>) {
        for s in subs {
            self.entries.retain(|e| e.filter != s.filter);
            self.entries.push(s);
        }
    }

    /// Records an UNSUBSCRIBE.
    pub fn unsubscribe(&mut self, filters: &[String]) {
        self.entries.retain(|e| !filters.contains(&e.filter));
    }

    /// Whether a PUBLISH with RETAIN = 1 on `topic` can only be a replay of retained messages
    /// to shared subscriptions: it matches a shared filter without Retain As Published, and no
    /// other subscription of the connection (an unshared one gets retained messages, and with
    /// Retain As Published a live message keeps its RETAIN flag, so neither can be told apart).
    pub fn only_shared_replay(&self, topic: &str) -> bool {
        let mut shared = false;
        for e in &self.entries {
            let filter = match (e.shared, strip_share(&e.filter)) {
                (false, Some(inner)) => inner,
                _ => e.filter.as_str(),
            };
            if !matches(filter, topic) {
                continue;
            }
            if e.shared && !e.retain_as_published {
                shared = true;
            } else {
                return false;
            }
        }
        shared
    }
}

/// The filter inside a client's own `$share/<group>/<filter>` or `$queue/<filter>`.
fn strip_share(filter: &str) -> Option<&str> {
    if let Some(rest) = filter.strip_prefix("$share/") {
        return rest.split_once('/').map(|(_, f)| f);
    }
    filter.strip_prefix("$queue/")
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod props;
