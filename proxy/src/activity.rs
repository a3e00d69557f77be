//! What the proxy knows of an instance's use, for instances that sleep when idle (issue 17):
//! when its last request came or ended, its open WebSocket tunnels and its requests in flight;
//! and the [`Waker`] a request to a sleeping instance calls before it waits for a replica.
//!
//! Counting costs one clock read and two relaxed stores per request; nothing is locked.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::routes::Instance;

/// Wakes sleeping instances: called by the first requests to one (each request while it
/// sleeps: implementations ignore repeats), which then wait for a replica like a request to an
/// instance that holds requests.
pub trait Waker: Send + Sync + 'static {
    /// Asks for `instance` to run again. Must not block.
    fn wake(&self, instance: &str);
}

/// One instance's use, shared by the route tables that carry it.
#[derive(Debug, Default)]
pub struct Activity {
    /// When a request last began or ended, epoch ms (0: none since the proxy started).
    last_ms: AtomicU64,
    /// Open WebSocket tunnels.
    tunnels: AtomicI64,
}

/// An instance's use at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Use {
    /// When a request last began or ended, epoch ms; 0 when none did since the proxy started.
    pub last_request_ms: u64,
    /// Open WebSocket tunnels.
    pub tunnels: i64,
    /// Requests in flight to its replicas.
    pub in_flight: u64,
}

impl Use {
    /// Nothing open and nothing in flight.
    pub fn is_quiet(&self) -> bool {
        self.tunnels <= 0 && self.in_flight == 0
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Activity {
    /// A request began or ended now.
    pub(crate) fn touch(&self) {
        self.last_ms.store(now_ms(), Ordering::Relaxed);
    }

    pub(crate) fn tunnel_opened(&self) {
        self.tunnels.fetch_add(1, Ordering::Relaxed);
        self.touch();
    }

    pub(crate) fn tunnel_closed(&self) {
        self.tunnels.fetch_sub(1, Ordering::Relaxed);
        self.touch();
    }
}

impl Instance {
    /// How the instance is used now.
    pub fn activity(&self) -> Use {
        Use {
            last_request_ms: self.stats.activity.last_ms.load(Ordering::Relaxed),
            tunnels: self.stats.activity.tunnels.load(Ordering::Relaxed),
            in_flight: self
                .replicas
                .iter()
                .map(|r| r.state.in_flight() as u64)
                .sum(),
        }
    }
}
