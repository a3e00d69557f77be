//! What the proxy knows of an instance's use, for instances that sleep when idle (issue 17):
//! when its last request came or ended, its open WebSocket tunnels and its requests in flight;
//! and the [`Waker`] a request to a sleeping instance calls before it waits for a replica.
//!
//! Counting costs one clock read and two relaxed stores per request; nothing is locked.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::routes::Instance;

/// Wakes sleeping instances: called by the first requests to one (each request while it
/// sleeps: implementations ignore repeats), which then wait for a replica like a request to an
/// instance that holds requests.
pub trait Waker: Send + Sync + 'static {
    /// Asks for `instance` to run again. Must not block.
    fn wake(&self, instance: &str);
}

/// For wakers: asks for each instance at most once per period, so that a burst of requests to a
/// sleeping instance asks once.
#[derive(Debug)]
pub struct AskOnce {
    period: Duration,
    asked: Mutex<HashMap<String, Instant>>,
}

impl AskOnce {
    /// At most once per `period` per instance.
    pub fn new(period: Duration) -> Self {
        Self {
            period,
            asked: Mutex::default(),
        }
    }

    /// Whether to ask for `instance` now: not when it was asked for within the period.
    pub fn first(&self, instance: &str) -> bool {
        let mut asked = self.asked.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        asked.retain(|_, at| now.duration_since(*at) < self.period);
        asked.insert(instance.to_owned(), now).is_none()
    }
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
        self.touch_at(now_ms());
    }

    /// A request began or ended at `ms` ([`now_ms`]).
    pub(crate) fn touch_at(&self, ms: u64) {
        self.last_ms.store(ms, Ordering::Relaxed);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_asks_once_per_instance_and_again_after_the_period() {
        let once = AskOnce::new(Duration::from_millis(50));
        assert!(once.first("a"));
        assert!(!once.first("a"), "the burst's second request");
        assert!(once.first("b"), "another instance");
        std::thread::sleep(Duration::from_millis(60));
        assert!(once.first("a"), "asked again once the period passed");
    }
}
