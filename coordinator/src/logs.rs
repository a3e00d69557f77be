//! Instance logs: every replica's output, one entry per line, tagged with the replica (`src`),
//! kept per instance in a bounded ring and streamed to subscribers.
//!
//! Node-RED writes JSON lines (the generated settings install a JSON console handler); those are
//! kept with their fields. Anything else (a stack trace, npm's output) is kept as it came, as
//! `msg` with level `raw`. Each entry gets a sequence number, increasing per instance, that the
//! logs API uses as its cursor.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde_json::{Map, Value};
use tokio::sync::broadcast;

/// Entries kept per instance unless configured otherwise.
pub const DEFAULT_RING: usize = 10_000;

/// One log line.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LogEntry {
    /// Position in the instance's log; increases by one per entry.
    pub seq: u64,
    /// Time, epoch ms: Node-RED's own timestamp, or when Tandem read a raw line.
    pub ts: i64,
    /// Where it came from: a replica id (`<instance>-r<slot>`) or `tandem` for the platform's own
    /// lines (installs, starts, crashes).
    pub src: String,
    /// `fatal`, `error`, `warn`, `info`, `debug`, `trace`, or `raw` for a line that was not JSON.
    pub level: String,
    /// The message.
    pub msg: String,
    /// Any other fields of a JSON line (`type`, `id`, `name`, ...).
    #[serde(flatten)]
    pub fields: Map<String, Value>,
}

/// Parses one line of a replica's output.
pub fn parse_line(line: &str, src: &str, now_ms: i64) -> LogEntry {
    let raw = || LogEntry {
        seq: 0,
        ts: now_ms,
        src: src.to_owned(),
        level: "raw".into(),
        msg: line.to_owned(),
        fields: Map::new(),
    };
    if !line.starts_with('{') {
        return raw();
    }
    let Ok(Value::Object(mut fields)) = serde_json::from_str::<Value>(line) else {
        return raw();
    };
    let ts = fields
        .remove("ts")
        .and_then(|v| v.as_i64())
        .unwrap_or(now_ms);
    let level = match fields.remove("level") {
        Some(Value::String(s)) => s,
        _ => "info".into(),
    };
    let msg = match fields.remove("msg") {
        Some(Value::String(s)) => s,
        Some(v) => v.to_string(),
        None => String::new(),
    };
    fields.remove("seq");
    fields.remove("src");
    LogEntry {
        seq: 0,
        ts,
        src: src.to_owned(),
        level,
        msg,
        fields,
    }
}

/// Which entries to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cursor {
    /// The newest entries.
    Latest,
    /// Entries after this sequence number, oldest first.
    After(u64),
    /// Entries before this sequence number (the newest of them).
    Before(u64),
}

/// A page of entries.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Page {
    /// The entries, in sequence order.
    pub entries: Vec<LogEntry>,
    /// Whether older entries than the first are still in the ring.
    pub more_before: bool,
    /// The sequence number the next entry will get.
    pub next_seq: u64,
}

/// The log of one instance.
#[derive(Debug)]
pub struct InstanceLog {
    ring: Mutex<Ring>,
    tx: broadcast::Sender<LogEntry>,
}

#[derive(Debug)]
struct Ring {
    entries: VecDeque<LogEntry>,
    next_seq: u64,
    capacity: usize,
}

impl InstanceLog {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            ring: Mutex::new(Ring {
                entries: VecDeque::new(),
                next_seq: 1,
                capacity: capacity.max(1),
            }),
            tx: broadcast::channel(1024).0,
        }
    }

    /// Appends an entry, numbering it, and sends it to subscribers.
    pub fn push(&self, mut entry: LogEntry) {
        let Ok(mut ring) = self.ring.lock() else {
            return;
        };
        entry.seq = ring.next_seq;
        ring.next_seq += 1;
        if ring.entries.len() == ring.capacity {
            ring.entries.pop_front();
        }
        ring.entries.push_back(entry.clone());
        // Under the lock, so subscribers see entries in sequence order.
        let _ = self.tx.send(entry);
    }

    /// Appends a line from `src`.
    pub fn push_line(&self, src: &str, line: &str) {
        self.push(parse_line(line, src, now_ms()));
    }

    /// A line of Tandem's own about this instance.
    pub fn note(&self, level: &str, msg: impl Into<String>) {
        self.push(LogEntry {
            seq: 0,
            ts: now_ms(),
            src: "tandem".into(),
            level: level.into(),
            msg: msg.into(),
            fields: Map::new(),
        });
    }

    /// Up to `limit` entries at `cursor`, optionally only those from `src`.
    pub fn read(&self, cursor: Cursor, limit: usize, src: Option<&str>) -> Page {
        let Ok(ring) = self.ring.lock() else {
            return Page {
                entries: Vec::new(),
                more_before: false,
                next_seq: 1,
            };
        };
        let keep = |e: &&LogEntry| src.is_none_or(|s| e.src == s);
        let mut entries: Vec<LogEntry> = match cursor {
            Cursor::After(seq) => ring
                .entries
                .iter()
                .filter(|e| e.seq > seq)
                .filter(keep)
                .take(limit)
                .cloned()
                .collect(),
            Cursor::Latest | Cursor::Before(_) => {
                let before = match cursor {
                    Cursor::Before(seq) => seq,
                    _ => u64::MAX,
                };
                let mut v: Vec<LogEntry> = ring
                    .entries
                    .iter()
                    .rev()
                    .filter(|e| e.seq < before)
                    .filter(keep)
                    .take(limit)
                    .cloned()
                    .collect();
                v.reverse();
                v
            }
        };
        entries.shrink_to_fit();
        let more_before = match entries.first() {
            Some(first) => ring
                .entries
                .iter()
                .take_while(|e| e.seq < first.seq)
                .any(|e| keep(&e)),
            None => false,
        };
        Page {
            entries,
            more_before,
            next_seq: ring.next_seq,
        }
    }

    /// New entries as they are pushed. A subscriber that falls more than 1,024 entries behind
    /// gets `Lagged` and should read the gap with [`Self::read`].
    pub fn subscribe(&self) -> broadcast::Receiver<LogEntry> {
        self.tx.subscribe()
    }
}

/// The logs of every instance, by instance id.
#[derive(Debug)]
pub struct LogBook {
    instances: Mutex<HashMap<String, Arc<InstanceLog>>>,
    capacity: usize,
}

impl Default for LogBook {
    fn default() -> Self {
        Self::new(DEFAULT_RING)
    }
}

impl LogBook {
    /// A log book keeping `capacity` entries per instance.
    pub fn new(capacity: usize) -> Self {
        Self {
            instances: Mutex::new(HashMap::new()),
            capacity,
        }
    }

    /// The log of `instance_id`, created empty on first use.
    pub fn instance(&self, instance_id: &str) -> Arc<InstanceLog> {
        let Ok(mut map) = self.instances.lock() else {
            return Arc::new(InstanceLog::new(self.capacity));
        };
        map.entry(instance_id.to_owned())
            .or_insert_with(|| Arc::new(InstanceLog::new(self.capacity)))
            .clone()
    }

    /// Forgets a deleted instance's log.
    pub fn remove(&self, instance_id: &str) {
        if let Ok(mut map) = self.instances.lock() {
            map.remove(instance_id);
        }
    }
}

/// Now, epoch ms.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_keep_their_fields_and_raw_lines_are_kept_whole() {
        let e = parse_line(
            r#"{"level":"warn","msg":"boom","ts":1700000000000,"type":"inject","id":"n1"}"#,
            "orders-r1",
            5,
        );
        assert_eq!(
            (e.ts, e.level.as_str(), e.msg.as_str()),
            (1_700_000_000_000, "warn", "boom")
        );
        assert_eq!(e.fields.get("type"), Some(&Value::from("inject")));
        assert_eq!(e.src, "orders-r1");
        let raw = parse_line("    at Object.<anonymous> (/x.js:1:1)", "orders-r0", 7);
        assert_eq!(
            (raw.level.as_str(), raw.ts, raw.msg.as_str()),
            ("raw", 7, "    at Object.<anonymous> (/x.js:1:1)")
        );
        // A line that claims to be JSON but is not stays raw, and cannot forge its source.
        assert_eq!(parse_line("{not json", "a-r0", 1).level, "raw");
        assert_eq!(
            parse_line(r#"{"src":"evil","msg":"x"}"#, "a-r0", 1).src,
            "a-r0"
        );
    }

    #[test]
    fn cursors_page_both_ways_and_filter_by_replica() {
        let log = InstanceLog::new(5);
        for i in 0..8 {
            log.push_line(&format!("a-r{}", i % 2), &format!("line {i}"));
        }
        // The ring keeps the newest 5: seq 4..=8.
        let latest = log.read(Cursor::Latest, 2, None);
        let seqs: Vec<u64> = latest.entries.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [7, 8]);
        assert!(latest.more_before);
        let older = log.read(Cursor::Before(7), 10, None);
        assert_eq!(
            older.entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [4, 5, 6]
        );
        assert!(!older.more_before);
        let newer = log.read(Cursor::After(5), 10, None);
        assert_eq!(
            newer.entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [6, 7, 8]
        );
        assert_eq!(newer.next_seq, 9);
        let r1 = log.read(Cursor::Latest, 10, Some("a-r1"));
        assert!(r1.entries.iter().all(|e| e.src == "a-r1"));
        // Odd lines come from r1 (seq 2, 4, 6, 8); the ring still holds 4, 6 and 8.
        assert_eq!(
            r1.entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [4, 6, 8]
        );
    }
}
