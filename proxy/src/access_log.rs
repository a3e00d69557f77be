//! The access log: one JSON line per request, written to standard error by a thread of its own,
//! so that a request never waits for the terminal or a pipe.
//!
//! A request formats its line and appends it to a shared buffer under a lock held for a copy;
//! nobody is woken per line. The writer thread takes the whole buffer every [`FLUSH_EVERY`] and
//! writes it out, so lines appear within that time and a busy proxy writes large blocks. When
//! the buffer holds [`CAPACITY`] bytes the writer has not taken (a slow terminal, a full pipe, a
//! stopped log reader), further lines are dropped and counted
//! (`tandem_proxy_access_log_dropped_total`) rather than held.
//!
//! `RUST_LOG=tandem::access=off` still silences it: the filter of the `tandem::access` target is
//! asked once per request, as the tracing event that wrote these lines before asked it.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::activity::now_ms;

/// Bytes of lines the writer may be behind by before new ones are dropped: 4 MiB.
pub const CAPACITY: usize = 4 << 20;

/// How often the writer takes what was logged.
pub const FLUSH_EVERY: Duration = Duration::from_millis(50);

/// One request, as logged.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    /// The instance's name.
    pub instance: &'a str,
    /// The replica that answered, or `none`.
    pub replica: &'a str,
    /// The method.
    pub method: &'a str,
    /// The path, without the query.
    pub path: &'a str,
    /// The status sent.
    pub status: u16,
    /// Time from the request's head to the response's head, microseconds.
    pub micros: u64,
    /// The client's address, when known.
    pub client: Option<SocketAddr>,
}

/// The access log, shared by every request; clones share it.
#[derive(Debug, Clone)]
pub struct AccessLog {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// Lines not yet taken by the writer.
    pending: Mutex<Vec<u8>>,
    /// Bytes `pending` may hold.
    capacity: usize,
    dropped: Arc<AtomicU64>,
}

impl AccessLog {
    /// An access log written to standard error; drops are counted in `dropped`.
    pub fn to_stderr(dropped: Arc<AtomicU64>) -> Self {
        Self::to_writer(std::io::stderr(), CAPACITY, dropped)
    }

    /// An access log written to `out` by a thread of its own, at most `capacity` bytes behind.
    pub fn to_writer<W: Write + Send + 'static>(
        out: W,
        capacity: usize,
        dropped: Arc<AtomicU64>,
    ) -> Self {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Vec::new()),
            capacity,
            dropped,
        });
        let writer = shared.clone();
        // A thread that cannot start leaves the log without a writer: once `capacity` is
        // reached, every line is dropped and counted.
        let _ = std::thread::Builder::new()
            .name("tandem-access-log".into())
            .spawn(move || write_lines(&writer, out));
        Self { shared }
    }

    /// Logs `e`, unless the `tandem::access` target is filtered out.
    pub fn record(&self, e: &Entry<'_>) {
        self.record_at(e, now_ms());
    }

    /// Logs `e` as of `ts` (milliseconds since the Unix epoch), for a caller that read the
    /// clock already.
    pub(crate) fn record_at(&self, e: &Entry<'_>, ts: u64) {
        if !tracing::enabled!(target: "tandem::access", tracing::Level::INFO) {
            return;
        }
        // Written in place under the lock, which the writer takes once per FLUSH_EVERY: no
        // allocation and no copy per line.
        let mut pending = self.shared.lock();
        let before = pending.len();
        write_line(&mut pending, e, ts);
        if pending.len() > self.shared.capacity {
            pending.truncate(before);
            drop(pending);
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        // A panic while the lock was held leaves bytes behind, still writable.
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Takes what was logged every [`FLUSH_EVERY`] and writes it out; ends once the log is
/// dropped, after writing what was left.
fn write_lines<W: Write>(shared: &Arc<Shared>, mut out: W) {
    let mut block = Vec::new();
    loop {
        std::thread::sleep(FLUSH_EVERY);
        // The log's last holder gone: this thread holds the only reference.
        let last = Arc::strong_count(shared) == 1;
        std::mem::swap(&mut *shared.lock(), &mut block);
        if !block.is_empty() {
            let _ = out.write_all(&block);
            let _ = out.flush();
            block.clear();
        }
        if last {
            return;
        }
    }
}

/// `{"ts":…,"target":"tandem::access","instance":…,"replica":…,"method":…,"path":…,
/// "status":…,"micros":…,"client":…}` and a newline.
pub fn format_line(e: &Entry<'_>, ts_ms: u64) -> String {
    let mut line = Vec::with_capacity(160 + e.path.len());
    write_line(&mut line, e, ts_ms);
    // Only text from `&str`s and ASCII was written.
    String::from_utf8(line).unwrap_or_default()
}

/// Appends [`format_line`]'s line to `out`, by hand rather than through `fmt`: this runs once
/// per request.
fn write_line(out: &mut Vec<u8>, e: &Entry<'_>, ts_ms: u64) {
    out.extend_from_slice(b"{\"ts\":");
    push_u64(out, ts_ms);
    out.extend_from_slice(b",\"target\":\"tandem::access\",\"instance\":");
    json_str(out, e.instance);
    out.extend_from_slice(b",\"replica\":");
    json_str(out, e.replica);
    out.extend_from_slice(b",\"method\":");
    json_str(out, e.method);
    out.extend_from_slice(b",\"path\":");
    json_str(out, e.path);
    out.extend_from_slice(b",\"status\":");
    push_u64(out, u64::from(e.status));
    out.extend_from_slice(b",\"micros\":");
    push_u64(out, e.micros);
    if let Some(c) = e.client {
        out.extend_from_slice(b",\"client\":\"");
        match c {
            SocketAddr::V4(v4) => {
                for (i, octet) in v4.ip().octets().into_iter().enumerate() {
                    if i > 0 {
                        out.push(b'.');
                    }
                    push_u64(out, u64::from(octet));
                }
                out.push(b':');
                push_u64(out, u64::from(v4.port()));
            }
            SocketAddr::V6(v6) => {
                let _ = write!(out, "{v6}");
            }
        }
        out.push(b'"');
    }
    out.extend_from_slice(b"}\n");
}

fn push_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// `v` as a JSON string: quotes, backslashes and control characters escaped.
fn json_str(out: &mut Vec<u8>, v: &str) {
    out.push(b'"');
    let bytes = v.as_bytes();
    let mut from = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'"' || b == b'\\' || b < 0x20 {
            out.extend_from_slice(&bytes[from..i]);
            match b {
                b'"' => out.extend_from_slice(b"\\\""),
                b'\\' => out.extend_from_slice(b"\\\\"),
                _ => {
                    const HEX: &[u8; 16] = b"0123456789abcdef";
                    out.extend_from_slice(b"\\u00");
                    out.push(HEX[usize::from(b >> 4)]);
                    out.push(HEX[usize::from(b & 0xf)]);
                }
            }
            from = i + 1;
        }
    }
    out.extend_from_slice(&bytes[from..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Condvar, Mutex};

    fn entry(path: &str) -> Entry<'_> {
        Entry {
            instance: "orders",
            replica: "orders-r1",
            method: "GET",
            path,
            status: 200,
            micros: 1234,
            client: Some("10.0.0.7:5555".parse().unwrap()),
        }
    }

    #[test]
    fn numbers_and_addresses_are_written_in_full() {
        let mut e = entry("/");
        e.micros = u64::MAX;
        e.status = 0;
        e.client = Some("[2001:db8::1]:65535".parse().unwrap());
        let line = format_line(&e, 0);
        let v: serde_json::Value = serde_json::from_str(line.trim_end()).unwrap();
        assert_eq!(v["ts"], 0);
        assert_eq!(v["status"], 0);
        assert_eq!(v["micros"], u64::MAX);
        assert_eq!(v["client"], "[2001:db8::1]:65535");
        e.client = Some("0.0.0.0:0".parse().unwrap());
        let line = format_line(&e, 1_700_000_000_123);
        let v: serde_json::Value = serde_json::from_str(line.trim_end()).unwrap();
        assert_eq!(v["client"], "0.0.0.0:0");
        assert_eq!(v["ts"], 1_700_000_000_123u64);
    }

    #[test]
    fn a_line_is_json_whatever_the_path() {
        let line = format_line(&entry("/a\"b\\c\u{1}d"), 1_700_000_000_000);
        let v: serde_json::Value = serde_json::from_str(line.trim_end()).unwrap();
        assert_eq!(v["path"], "/a\"b\\c\u{1}d");
        assert_eq!(v["instance"], "orders");
        assert_eq!(v["replica"], "orders-r1");
        assert_eq!(v["status"], 200);
        assert_eq!(v["micros"], 1234);
        assert_eq!(v["client"], "10.0.0.7:5555");
        assert_eq!(v["ts"], 1_700_000_000_000_u64);
        assert!(line.ends_with("}\n"));
    }

    /// A writer that blocks until released, as a full pipe does, and keeps what it got.
    #[derive(Clone, Default)]
    struct Stuck(Arc<(Mutex<Held>, Condvar)>);

    #[derive(Default)]
    struct Held {
        released: bool,
        entered: bool,
        got: Vec<u8>,
    }

    impl Write for Stuck {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let (lock, cv) = &*self.0;
            let mut g = lock.lock().unwrap();
            g.entered = true;
            cv.notify_all();
            while !g.released {
                g = cv.wait(g).unwrap();
            }
            g.got.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stuck_log_drops_and_counts_lines_and_never_blocks_a_request() {
        let _subscriber = tracing::subscriber::set_default(tracing_subscriber_stub::Everything);
        let out = Stuck::default();
        let dropped = Arc::new(AtomicU64::new(0));
        // Room for 4 lines of `/x`.
        let line = format_line(&entry("/x"), now_ms()).len();
        let log = AccessLog::to_writer(out.clone(), 4 * line, dropped.clone());
        // The writer takes the first line and is stuck writing it out.
        log.record(&entry("/x"));
        {
            let (lock, cv) = &*out.0;
            let mut g = lock.lock().unwrap();
            while !g.entered {
                g = cv.wait(g).unwrap();
            }
        }
        // 4 more wait their turn; the other 96 are dropped and counted, and no call waits.
        let started = std::time::Instant::now();
        for _ in 0..100 {
            log.record(&entry("/x"));
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        assert_eq!(dropped.load(Ordering::Relaxed), 96);
        // Released: the kept lines are written, whole, and the writer ends with the log.
        {
            let (lock, cv) = &*out.0;
            lock.lock().unwrap().released = true;
            cv.notify_all();
        }
        drop(log);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let text = String::from_utf8(out.0 .0.lock().unwrap().got.clone()).unwrap();
            if text.lines().count() == 5 {
                assert!(text.lines().all(|l| l.starts_with('{') && l.ends_with('}')));
                break;
            }
            assert!(std::time::Instant::now() < deadline, "written: {text}");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// A subscriber that enables everything, so that `record` logs in tests.
    mod tracing_subscriber_stub {
        pub struct Everything;
        impl tracing::Subscriber for Everything {
            fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
                true
            }
            fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
                tracing::span::Id::from_u64(1)
            }
            fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
            fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
            fn event(&self, _: &tracing::Event<'_>) {}
            fn enter(&self, _: &tracing::span::Id) {}
            fn exit(&self, _: &tracing::span::Id) {}
        }
    }
}
