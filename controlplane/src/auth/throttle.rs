//! Limits on failed sign-ins, per username and per client address, so that passwords cannot be
//! guessed quickly and wrong sign-ins cannot pile up argon2 work.
//!
//! The rules, with the defaults of [`LoginLimits`]:
//! - A username may fail 5 times within a 60 s window; the next attempt is refused (429 with
//!   `Retry-After`) for a lockout of 60 s, which doubles with each further lockout of the same
//!   key, up to 15 minutes. A successful sign-in clears the username's record.
//! - A client address may fail 50 times within 60 s (many users behind one NAT share it), with
//!   the same lockouts. A success does not clear the address's record: one valid account must not
//!   reset the count of an address that guesses other people's passwords. IPv6 addresses count by
//!   their /64, since one host commonly holds a whole /64.
//! - Attempts count when they start, not when they fail: 100 concurrent guesses for one user get
//!   5 through to the password check, not 100. A success gives its address's count back.
//! - During a lockout every attempt is refused, the right password too, and is not counted.
//! - Usernames and unknown users are limited alike, so a 429 says nothing about whether a user
//!   exists. Names longer than any username can be are limited by address only.
//!
//! Memory stays bounded: at most [`LoginLimits::max_keys`] records per kind. When a table is
//! full, records idle for longer than the longest lockout go first, then the least recently
//! seen one.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use axum::extract::{ConnectInfo, FromRequestParts};
use http::request::Parts;
use tokio::time::Instant;

/// Longest username there can be (see `check_username`): longer names are not tracked by name.
const MAX_USERNAME_BYTES: usize = 64;

/// How many failed sign-ins are allowed, and what happens after.
#[derive(Debug, Clone)]
pub struct LoginLimits {
    /// Failed attempts per username within [`Self::window`] before a lockout. Default 5.
    pub user_failures: u32,
    /// Failed attempts per client address (IPv6: per /64) within [`Self::window`] before a
    /// lockout. Default 50.
    pub address_failures: u32,
    /// The window failures are counted in. Default 60 s.
    pub window: Duration,
    /// The first lockout; each further lockout of the same key doubles it. Default 60 s.
    pub lockout: Duration,
    /// The longest lockout. Default 15 minutes.
    pub max_lockout: Duration,
    /// Most records kept per kind (usernames, addresses). Default 10,000.
    pub max_keys: usize,
}

impl Default for LoginLimits {
    fn default() -> Self {
        Self {
            user_failures: 5,
            address_failures: 50,
            window: Duration::from_secs(60),
            lockout: Duration::from_secs(60),
            max_lockout: Duration::from_secs(15 * 60),
            max_keys: 10_000,
        }
    }
}

/// The address a request came from, when the server was started with connect info
/// (`into_make_service_with_connect_info::<SocketAddr>`); `None` otherwise, and every such
/// request then counts as one unknown address.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(
            parts
                .extensions
                .get::<ConnectInfo<std::net::SocketAddr>>()
                .map(|c| c.0.ip()),
        ))
    }
}

/// Failed sign-ins by username and by client address.
#[derive(Debug)]
pub struct LoginThrottle {
    limits: LoginLimits,
    tables: Mutex<Tables>,
}

#[derive(Debug, Default)]
struct Tables {
    users: Table<String>,
    addresses: Table<Option<IpAddr>>,
}

/// A sign-in refused for now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// How long until an attempt is allowed again.
    pub retry_after: Duration,
}

impl Refused {
    /// [`Self::retry_after`] in whole seconds, rounded up, at least 1: `Retry-After`.
    pub fn retry_after_secs(&self) -> u64 {
        let ms = self.retry_after.as_millis();
        u64::try_from(ms.div_ceil(1000)).unwrap_or(u64::MAX).max(1)
    }
}

// === impl LoginThrottle ===

impl LoginThrottle {
    /// A throttle with no failures recorded.
    pub fn new(limits: LoginLimits) -> Self {
        Self {
            limits,
            tables: Mutex::default(),
        }
    }

    /// Counts a sign-in attempt of `username` from `addr` that starts at `now`, or refuses it.
    /// Call [`Self::succeeded`] if the password was right.
    pub fn begin(&self, username: &str, addr: Option<IpAddr>, now: Instant) -> Result<(), Refused> {
        let limits = &self.limits;
        let addr = address_key(addr);
        let mut tables = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        let Tables { users, addresses } = &mut *tables;
        let user = (username.len() <= MAX_USERNAME_BYTES).then(|| username.to_owned());
        if let Some(name) = &user {
            if let Err(until) =
                users
                    .record(name, now, limits)
                    .attempt(now, limits.user_failures, limits)
            {
                return Err(Refused {
                    retry_after: until.saturating_duration_since(now),
                });
            }
        }
        if let Err(until) =
            addresses
                .record(&addr, now, limits)
                .attempt(now, limits.address_failures, limits)
        {
            // Refused by address: the attempt does not count against the user either.
            if let Some(r) = user.as_ref().and_then(|name| users.map.get_mut(name)) {
                r.failures = r.failures.saturating_sub(1);
            }
            return Err(Refused {
                retry_after: until.saturating_duration_since(now),
            });
        }
        Ok(())
    }

    /// The attempt [`Self::begin`] counted had the right password: forget the user's failures
    /// and give the address its attempt back.
    pub fn succeeded(&self, username: &str, addr: Option<IpAddr>) {
        let mut tables = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        tables.users.map.remove(username);
        if let Some(r) = tables.addresses.map.get_mut(&address_key(addr)) {
            r.failures = r.failures.saturating_sub(1);
        }
    }

    /// How many usernames and addresses have a record (to check that memory stays bounded).
    pub fn tracked(&self) -> (usize, usize) {
        let tables = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        (tables.users.map.len(), tables.addresses.map.len())
    }
}

/// The key an address counts under: IPv4-mapped IPv6 as IPv4, other IPv6 by its /64.
fn address_key(addr: Option<IpAddr>) -> Option<IpAddr> {
    match addr?.to_canonical() {
        IpAddr::V4(v4) => Some(IpAddr::V4(v4)),
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            Some(IpAddr::V6(prefix.into()))
        }
    }
}

// === impl Table ===

#[derive(Debug)]
struct Table<K> {
    map: HashMap<K, Record>,
}

impl<K> Default for Table<K> {
    fn default() -> Self {
        Self {
            map: HashMap::new(),
        }
    }
}

impl<K: Hash + Eq + Clone> Table<K> {
    /// The record of `key`, made if new; makes room first when the table is full.
    fn record(&mut self, key: &K, now: Instant, limits: &LoginLimits) -> &mut Record {
        if !self.map.contains_key(key) && self.map.len() >= limits.max_keys.max(1) {
            self.make_room(now, limits);
        }
        self.map
            .entry(key.clone())
            .or_insert_with(|| Record::new(now))
    }

    fn make_room(&mut self, now: Instant, limits: &LoginLimits) {
        self.map.retain(|_, r| !r.idle(now, limits));
        if self.map.len() < limits.max_keys.max(1) {
            return;
        }
        // Still full of live records: forget the least recently seen. Flooding the table this
        // way could end someone's lockout early, but takes `max_keys` failures that are
        // themselves limited by address.
        let oldest = self
            .map
            .iter()
            .min_by_key(|(_, r)| r.seen)
            .map(|(k, _)| k.clone());
        if let Some(k) = oldest {
            self.map.remove(&k);
        }
    }
}

// === impl Record ===

#[derive(Debug, Clone)]
struct Record {
    /// Start of the current counting window.
    window_start: Instant,
    /// Attempts counted in the window (started and not succeeded).
    failures: u32,
    /// Lockouts so far; each doubles the next.
    lockouts: u32,
    /// Refused until then.
    locked_until: Option<Instant>,
    /// Last attempt.
    seen: Instant,
}

impl Record {
    fn new(now: Instant) -> Self {
        Self {
            window_start: now,
            failures: 0,
            lockouts: 0,
            locked_until: None,
            seen: now,
        }
    }

    /// Counts an attempt at `now` against `limit`, or says until when it is refused.
    fn attempt(&mut self, now: Instant, limit: u32, limits: &LoginLimits) -> Result<(), Instant> {
        self.seen = now;
        if let Some(until) = self.locked_until {
            if now < until {
                return Err(until);
            }
            // The lockout is over: a fresh window, so the next failure does not lock again.
            self.locked_until = None;
            self.failures = 0;
            self.window_start = now;
        }
        if now.saturating_duration_since(self.window_start) >= limits.window {
            self.failures = 0;
            self.window_start = now;
        }
        if self.failures >= limit {
            let until = now + lockout(self.lockouts, limits);
            self.lockouts = self.lockouts.saturating_add(1);
            self.locked_until = Some(until);
            return Err(until);
        }
        self.failures += 1;
        Ok(())
    }

    /// Not locked and not seen for longer than any lockout or window lasts: nothing to keep.
    fn idle(&self, now: Instant, limits: &LoginLimits) -> bool {
        let locked = self.locked_until.is_some_and(|u| u > now);
        let quiet =
            now.saturating_duration_since(self.seen) >= limits.max_lockout.max(limits.window);
        !locked && quiet
    }
}

/// The lockout after `previous` lockouts: the base doubled each time, capped.
fn lockout(previous: u32, limits: &LoginLimits) -> Duration {
    let factor = 1u32.checked_shl(previous.min(31)).unwrap_or(u32::MAX);
    limits
        .lockout
        .saturating_mul(factor)
        .min(limits.max_lockout)
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    fn limits() -> LoginLimits {
        LoginLimits {
            user_failures: 3,
            address_failures: 5,
            window: Duration::from_secs(60),
            lockout: Duration::from_secs(10),
            max_lockout: Duration::from_secs(35),
            max_keys: 4,
        }
    }

    const HOME: Option<IpAddr> = Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)));

    #[test]
    fn a_user_is_locked_out_after_its_failures_and_the_lockout_doubles_up_to_the_cap() {
        let t = LoginThrottle::new(limits());
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(t.begin("alice", HOME, t0), Ok(()));
        }
        let refused = t.begin("alice", HOME, t0).unwrap_err();
        assert_eq!(refused.retry_after, Duration::from_secs(10));
        assert_eq!(refused.retry_after_secs(), 10);
        // Refused all along the lockout, without extending it; another user is not.
        let later = t0 + Duration::from_millis(9_500);
        assert_eq!(
            t.begin("alice", HOME, later)
                .unwrap_err()
                .retry_after_secs(),
            1
        );
        assert_eq!(t.begin("bob", HOME, later), Ok(()));
        // After it, a fresh window; the next lockout is twice as long, then capped. (Each round
        // from another address, so that only the user's limit is at work.)
        let mut now = t0 + Duration::from_secs(10);
        for (round, want) in [(1u8, 20), (2, 35), (3, 35)] {
            let addr = Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, round)));
            for _ in 0..3 {
                assert_eq!(t.begin("alice", addr, now), Ok(()));
            }
            let refused = t.begin("alice", addr, now).unwrap_err();
            assert_eq!(refused.retry_after, Duration::from_secs(want));
            now += refused.retry_after;
        }
    }

    #[test]
    fn concurrent_attempts_count_when_they_start_and_a_success_clears_the_user() {
        let t = LoginThrottle::new(limits());
        let now = Instant::now();
        // Three in flight at once: the fourth is refused before any has failed.
        for _ in 0..3 {
            assert_eq!(t.begin("alice", HOME, now), Ok(()));
        }
        assert!(t.begin("alice", HOME, now).is_err());
        t.succeeded("alice", HOME);
        assert_eq!(t.begin("alice", HOME, now), Ok(()));
    }

    #[test]
    fn an_address_is_locked_out_across_users_and_a_success_does_not_reset_it() {
        let t = LoginThrottle::new(limits());
        let now = Instant::now();
        for i in 0..4 {
            assert_eq!(t.begin(&format!("u{i}"), HOME, now), Ok(()));
        }
        // A success gives its own attempt back, but not the others.
        assert_eq!(t.begin("mallory", HOME, now), Ok(()));
        t.succeeded("mallory", HOME);
        assert_eq!(t.begin("u5", HOME, now), Ok(()));
        // u6 failed twice elsewhere; refused by this address, that attempt does not count
        // against u6, who has one left.
        for _ in 0..2 {
            assert_eq!(t.begin("u6", None, now), Ok(()));
        }
        let refused = t.begin("u6", HOME, now).unwrap_err();
        assert_eq!(refused.retry_after, Duration::from_secs(10));
        assert_eq!(t.begin("u6", None, now), Ok(()));
        assert!(t.begin("u6", None, now).is_err());
        // Another address is not affected; nor is another /64, but the same /64 is.
        let v6 = |last: u16| {
            Some(IpAddr::V6(Ipv6Addr::new(
                0x2001, 0xdb8, 0, 1, 0, 0, 0, last,
            )))
        };
        for i in 0..5 {
            assert_eq!(t.begin(&format!("v{i}"), v6(i), now), Ok(()));
        }
        assert!(t.begin("v9", v6(99), now).is_err());
        let other = Some(IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 2, 0, 0, 0, 1)));
        assert_eq!(t.begin("w", other, now), Ok(()));
        // IPv4 as IPv4-mapped IPv6 is the same address.
        let mapped = Some(IpAddr::V6(Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped()));
        assert!(t.begin("x", mapped, now).is_err());
    }

    #[test]
    fn memory_stays_bounded_and_idle_records_go_first() {
        let t = LoginThrottle::new(limits());
        let t0 = Instant::now();
        // Lock one user out; then flood with many names from many addresses.
        for _ in 0..4 {
            let _ = t.begin("victim", None, t0);
        }
        for i in 0..1000u32 {
            let addr = Some(IpAddr::V4(Ipv4Addr::from(i)));
            let _ = t.begin(
                &format!("user{i}"),
                addr,
                t0 + Duration::from_millis(u64::from(i)),
            );
            let (users, addresses) = t.tracked();
            assert!(users <= 4 && addresses <= 4, "{users} {addresses}");
        }
        // Names longer than a username can be are not kept by name at all.
        let long = "x".repeat(100_000);
        let _ = t.begin(&long, None, t0);
        assert!(!t.tables.lock().unwrap().users.map.contains_key(&long));
        // Idle records are dropped before live ones when room is needed.
        let t = LoginThrottle::new(limits());
        let _ = t.begin("old", None, t0);
        let late = t0 + Duration::from_secs(3600);
        for name in ["a", "b", "c"] {
            let _ = t.begin(name, None, late);
        }
        let _ = t.begin("d", None, late);
        let users = t.tables.lock().unwrap();
        assert!(!users.users.map.contains_key("old"));
        assert_eq!(users.users.map.len(), 4);
    }
}
