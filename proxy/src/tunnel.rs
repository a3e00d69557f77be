//! Upgraded connections (WebSocket): once both sides have switched protocols, bytes are copied
//! both ways until either side closes, the tunnel sits idle past the idle timeout, or the proxy
//! stops.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;

use crate::metrics::ProxyStats;

/// Copies between the client's and the replica's upgraded connections.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run(
    client: OnUpgrade,
    upstream: OnUpgrade,
    idle: Duration,
    stats: Arc<ProxyStats>,
    instance_stats: Arc<crate::metrics::InstanceStats>,
    mut stop: watch::Receiver<bool>,
    instance: Arc<str>,
    replica: Arc<str>,
) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(error) => {
            tracing::debug!(%instance, %replica, %error, "upgrade did not complete");
            return;
        }
    };
    stats.websocket_tunnels.fetch_add(1, Ordering::Relaxed);
    // An open WebSocket keeps a sleeping-when-idle instance awake.
    instance_stats.activity.tunnel_opened();
    let activity = Arc::new(AtomicU64::new(0));
    let mut client = Counted {
        io: TokioIo::new(client),
        bytes: activity.clone(),
    };
    let mut upstream = TokioIo::new(upstream);
    let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
    tokio::pin!(copy);
    let mut seen = 0;
    loop {
        tokio::select! {
            result = &mut copy => {
                if let Err(error) = result {
                    tracing::debug!(%instance, %replica, %error, "tunnel closed with an error");
                }
                break;
            }
            _ = tokio::time::sleep(idle) => {
                let now = activity.load(Ordering::Relaxed);
                if now == seen {
                    tracing::info!(%instance, %replica, ?idle, "closing idle WebSocket tunnel");
                    break;
                }
                seen = now;
            }
            _ = async { drop(stop.wait_for(|s| *s).await) } => break,
        }
    }
    stats.websocket_tunnels.fetch_sub(1, Ordering::Relaxed);
    instance_stats.activity.tunnel_closed();
}

/// Counts the bytes that pass through `io`, for the idle check.
struct Counted<T> {
    io: T,
    bytes: Arc<AtomicU64>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
