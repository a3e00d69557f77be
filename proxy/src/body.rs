//! The two body types of the proxy: requests going upstream (with the size limit) and
//! responses going back (streamed from the replica, or a short message of the proxy's own).
//! Neither buffers: frames pass through as they arrive.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::health::InFlight;
use crate::pool::Sender;

/// Boxed error for bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The request body is larger than the configured limit.
#[derive(Debug, thiserror::Error)]
#[error("request body is larger than the limit of {0} bytes")]
pub struct BodyTooLarge(pub u64);

/// A request body on its way to a replica.
#[derive(Debug)]
pub enum RequestBody {
    /// The client's body, cut off with an error past `remaining` bytes.
    Streaming {
        /// The client's body.
        body: Incoming,
        /// The configured limit.
        limit: u64,
        /// Bytes still allowed.
        remaining: u64,
    },
    /// No body (also used to resend a bodyless request).
    Empty,
}

impl RequestBody {
    /// Wraps `body` with a size limit; a body known to be empty becomes [`RequestBody::Empty`].
    pub fn new(body: Incoming, limit: u64) -> Self {
        if body.is_end_stream() {
            Self::Empty
        } else {
            Self::Streaming {
                body,
                limit,
                remaining: limit,
            }
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Empty => Poll::Ready(None),
            Self::Streaming {
                body,
                limit,
                remaining,
            } => match Pin::new(body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        let len = data.len() as u64;
                        if len > *remaining {
                            return Poll::Ready(Some(Err(BodyTooLarge(*limit).into())));
                        }
                        *remaining -= len;
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Empty => true,
            Self::Streaming { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Empty => SizeHint::with_exact(0),
            Self::Streaming { body, .. } => body.size_hint(),
        }
    }
}

/// A response body on its way to the client.
#[derive(Debug)]
pub enum ResponseBody {
    /// Streamed from a replica. Until it ends, the request counts as in flight on the replica;
    /// when it ends, its connection goes back to the replica's pool.
    Upstream {
        /// The replica's body.
        body: Incoming,
        /// Released when the body ends or is dropped.
        tail: Option<Tail>,
    },
    /// A message of the proxy's own.
    Full(Option<Bytes>),
}

/// What a streamed response holds until it ends.
#[derive(Debug)]
pub struct Tail {
    pub(crate) in_flight: InFlight,
    pub(crate) sender: Option<Sender>,
}

impl Tail {
    /// The response was read to its end: the connection can serve another request.
    fn complete(mut self) {
        if let Some(sender) = self.sender.take() {
            self.in_flight.replica().pool.put(sender, Instant::now());
        }
    }
}

impl ResponseBody {
    /// A body of the proxy's own.
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        Self::Full(Some(bytes.into()))
    }

    /// A streamed body; when it is already known to be empty the connection is released now.
    pub(crate) fn upstream(body: Incoming, tail: Tail) -> Self {
        if body.is_end_stream() {
            tail.complete();
            Self::Upstream { body, tail: None }
        } else {
            Self::Upstream {
                body,
                tail: Some(tail),
            }
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Self::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Self::Upstream { body, tail } => {
                let polled = Pin::new(&mut *body).poll_frame(cx);
                match &polled {
                    Poll::Ready(None) => {
                        if let Some(t) = tail.take() {
                            t.complete();
                        }
                    }
                    Poll::Ready(Some(Ok(_))) if body.is_end_stream() => {
                        if let Some(t) = tail.take() {
                            t.complete();
                        }
                    }
                    // An error: the connection is not reused (dropping the sender closes it).
                    Poll::Ready(Some(Err(_))) => drop(tail.take()),
                    _ => {}
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Full(bytes) => bytes.is_none(),
            Self::Upstream { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Self::Full(None) => SizeHint::with_exact(0),
            Self::Upstream { body, .. } => body.size_hint(),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // hyper stops polling once `is_end_stream` says the body is done, so the end may only be
        // seen here.
        if let Self::Upstream { body, tail } = self {
            if body.is_end_stream() {
                if let Some(t) = tail.take() {
                    t.complete();
                }
            }
        }
    }
}
