//! Where a chunked body ends. The core relays a replica's chunked body byte for byte, so it
//! only has to know where the body ends, to keep the connection for the next request: this
//! follows the chunk sizes, extensions, data and trailers across reads without copying.

use crate::policy::hex;

/// A chunked body's framing, fed the body's bytes in order.
#[derive(Debug, Clone, Default)]
pub(crate) struct Chunked {
    state: State,
}

#[derive(Debug, Clone, Copy, Default)]
enum State {
    /// At the start of a chunk size, before its first digit.
    #[default]
    SizeStart,
    /// In a chunk size, `size` so far.
    Size {
        size: u64,
    },
    /// Past the size: extensions, until CR.
    Extension {
        size: u64,
    },
    SizeLf {
        size: u64,
    },
    Data {
        left: u64,
    },
    DataCr,
    DataLf,
    /// At the start of a trailer line, or of the final CRLF.
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

/// The body is not valid chunked encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the replica's chunked body is malformed")]
pub(crate) struct Malformed;

impl Chunked {
    /// Reads `buf`, the next bytes of the body: `Some(n)` when the body ends after its first
    /// `n` bytes, `None` when all of it belongs to the body and more is to come.
    pub(crate) fn scan(&mut self, buf: &[u8]) -> Result<Option<usize>, Malformed> {
        let mut i = 0;
        while i < buf.len() {
            let b = buf[i];
            self.state = match self.state {
                State::SizeStart => State::Size {
                    size: u64::from(hex(b).ok_or(Malformed)?),
                },
                State::Size { size } => match b {
                    b'\r' => State::SizeLf { size },
                    b';' | b' ' | b'\t' => State::Extension { size },
                    _ => {
                        let digit = hex(b).ok_or(Malformed)?;
                        let size = size
                            .checked_mul(16)
                            .and_then(|s| s.checked_add(u64::from(digit)))
                            .ok_or(Malformed)?;
                        State::Size { size }
                    }
                },
                State::Extension { size } => match b {
                    b'\r' => State::SizeLf { size },
                    b'\n' => return Err(Malformed),
                    _ => State::Extension { size },
                },
                State::SizeLf { size } => match (b, size) {
                    (b'\n', 0) => State::TrailerStart,
                    (b'\n', left) => State::Data { left },
                    _ => return Err(Malformed),
                },
                State::Data { left } => {
                    // Skip the data in one step.
                    let take = usize::try_from(left)
                        .unwrap_or(usize::MAX)
                        .min(buf.len() - i);
                    i += take;
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        State::DataCr
                    } else {
                        State::Data { left }
                    };
                    continue;
                }
                State::DataCr if b == b'\r' => State::DataLf,
                State::DataLf if b == b'\n' => State::SizeStart,
                State::DataCr | State::DataLf => return Err(Malformed),
                State::TrailerStart => match b {
                    b'\r' => State::EndLf,
                    b'\n' => return Err(Malformed),
                    _ => State::Trailer,
                },
                State::Trailer => match b {
                    b'\r' => State::TrailerLf,
                    b'\n' => return Err(Malformed),
                    _ => State::Trailer,
                },
                State::TrailerLf if b == b'\n' => State::TrailerStart,
                State::EndLf if b == b'\n' => State::Done,
                State::TrailerLf | State::EndLf => return Err(Malformed),
                State::Done => return Ok(Some(i)),
            };
            i += 1;
            if matches!(self.state, State::Done) {
                return Ok(Some(i));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where the body ends when `body` comes in pieces of `step` bytes.
    fn end_in_steps(body: &[u8], step: usize) -> Result<Option<usize>, Malformed> {
        let mut c = Chunked::default();
        let mut at = 0;
        for piece in body.chunks(step) {
            if let Some(n) = c.scan(piece)? {
                return Ok(Some(at + n));
            }
            at += piece.len();
        }
        Ok(None)
    }

    #[test]
    fn finds_the_end_in_any_split() {
        let body = b"5\r\nhello\r\n1a;name=value\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nx-trailer: 1\r\n\r\n";
        for step in 1..=body.len() {
            assert_eq!(
                end_in_steps(body, step),
                Ok(Some(body.len())),
                "step {step}"
            );
        }
        // What follows the body is not part of it.
        let mut more = body.to_vec();
        more.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        for step in 1..=more.len() {
            assert_eq!(
                end_in_steps(&more, step),
                Ok(Some(body.len())),
                "step {step}"
            );
        }
    }

    #[test]
    fn an_empty_body_and_an_unfinished_one() {
        assert_eq!(end_in_steps(b"0\r\n\r\n", 1), Ok(Some(5)));
        assert_eq!(end_in_steps(b"5\r\nhel", 2), Ok(None));
        assert_eq!(end_in_steps(b"0\r\n", 3), Ok(None));
        assert_eq!(end_in_steps(b"0\r\nx: y\r\n", 3), Ok(None));
    }

    #[test]
    fn refuses_what_is_not_chunked() {
        for bad in [
            &b"\r\n"[..],
            b"g\r\n",
            b"5\nhello\r\n",
            b"5\r\nhelloX\r\n",
            b"0\r\n\n",
            b"ffffffffffffffffff\r\n",
        ] {
            assert_eq!(
                end_in_steps(bad, 1),
                Err(Malformed),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
