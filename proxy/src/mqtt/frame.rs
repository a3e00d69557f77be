//! MQTT framing: the fixed header and the remaining length, nothing more.
//!
//! Every packet the proxy does not rewrite is forwarded as the bytes it arrived as, so all the
//! proxy must know of it is where it ends. Same wire format in MQTT 3.1, 3.1.1 and 5.

/// Largest remaining length MQTT can encode (four length bytes).
pub const MAX_REMAINING_LENGTH: usize = 268_435_455;

/// Packet types the proxy looks at (the high nibble of the first byte).
pub mod kind {
    /// CONNECT (client to broker, first packet).
    pub const CONNECT: u8 = 1;
    /// PUBLISH (both ways).
    pub const PUBLISH: u8 = 3;
    /// PUBACK (both ways).
    pub const PUBACK: u8 = 4;
    /// PUBREC (both ways).
    pub const PUBREC: u8 = 5;
    /// PUBREL (both ways).
    pub const PUBREL: u8 = 6;
    /// PUBCOMP (both ways).
    pub const PUBCOMP: u8 = 7;
    /// SUBSCRIBE (client to broker).
    pub const SUBSCRIBE: u8 = 8;
    /// UNSUBSCRIBE (client to broker).
    pub const UNSUBSCRIBE: u8 = 10;
}

/// Why a byte stream is not MQTT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The remaining length runs past four bytes.
    #[error("malformed remaining length (more than 4 length bytes)")]
    BadLength,
    /// The packet is larger than the configured limit.
    #[error("packet of {size} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Remaining length announced by the packet.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// Packet type 0 is reserved.
    #[error("reserved packet type 0")]
    ReservedType,
}

/// A parsed fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// First byte: type in the high nibble, flags in the low one.
    pub byte1: u8,
    /// Bytes of the fixed header (first byte + length bytes): 2 to 5.
    pub header_len: usize,
    /// Bytes after the fixed header.
    pub remaining: usize,
}

impl Header {
    /// The packet type.
    pub fn kind(&self) -> u8 {
        self.byte1 >> 4
    }

    /// Bytes of the whole packet.
    pub fn frame_len(&self) -> usize {
        self.header_len + self.remaining
    }
}

/// Reads the fixed header at the start of `buf`. `Ok(None)`: more bytes are needed to know it.
/// The packet itself may still be incomplete; compare [`Header::frame_len`] with `buf.len()`.
pub fn parse_header(buf: &[u8], max: usize) -> Result<Option<Header>, FrameError> {
    let Some(&byte1) = buf.first() else {
        return Ok(None);
    };
    if byte1 >> 4 == 0 {
        return Err(FrameError::ReservedType);
    }
    let mut remaining = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        remaining |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            if remaining > max {
                return Err(FrameError::TooLarge {
                    size: remaining,
                    max,
                });
            }
            return Ok(Some(Header {
                byte1,
                header_len: 2 + i,
                remaining,
            }));
        }
    }
    Err(FrameError::BadLength)
}

/// Appends the variable-length encoding of `len` (at most [`MAX_REMAINING_LENGTH`]).
pub fn put_remaining_length(out: &mut Vec<u8>, mut len: usize) {
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
}

#[cfg(test)]
mod tests;
