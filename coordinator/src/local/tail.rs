//! A replica's output file, followed into the instance's log (and rotated), and what a start
//! waits for in it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::watch;

use crate::logs::InstanceLog;
use crate::replica::ExitReason;

/// Follows a replica's output file from `offset` into `log` until the process has ended and the
/// file is read to its end. Rotates the file past `max_bytes`.
///
/// What the file already holds past `offset` is in the log when this returns.
pub(crate) async fn tail(
    path: PathBuf,
    offset: u64,
    src: String,
    log: Arc<InstanceLog>,
    mut exit: watch::Receiver<Option<ExitReason>>,
    max_bytes: u64,
    seen: Arc<Seen>,
) {
    let mut t = Tail {
        offset,
        start: offset,
        partial: Vec::new(),
        src,
        log,
        seen,
    };
    if let Ok(mut f) = tokio::fs::File::open(&path).await {
        t.read(&mut f).await;
    }
    tokio::spawn(async move {
        // The sender gone without an exit reason: the start was abandoned (and its process
        // killed); read what is left and end.
        let mut abandoned = false;
        loop {
            let done = abandoned || exit.borrow_and_update().is_some();
            if let Ok(mut f) = tokio::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .await
            {
                t.read(&mut f).await;
                if t.offset - t.start > max_bytes {
                    rotate(&path, &mut f, &mut t).await;
                }
            }
            if done {
                if !t.partial.is_empty() {
                    t.log
                        .push_line(&t.src, &String::from_utf8_lossy(&t.partial));
                }
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                changed = exit.changed() => abandoned = changed.is_err(),
            }
        }
    });
}

/// Rotates a replica's output file once the tailer has read past the limit: what was read
/// since the last rotation is copied to `<file>.1` (one old file kept), then freed in place by
/// punching a hole over it. The writer appends (O_APPEND) and nothing is truncated, so no line
/// written meanwhile is lost; the file's apparent size keeps growing, its disk use does not.
/// Where holes are not supported, the file is copied and truncated instead, which can lose the
/// lines written between the last read and the truncation.
async fn rotate(path: &Path, f: &mut tokio::fs::File, t: &mut Tail) {
    use std::os::fd::AsFd;
    let old = path.with_extension("log.1");
    let copied = async {
        let mut src = tokio::fs::File::open(path).await?;
        src.seek(std::io::SeekFrom::Start(t.start)).await?;
        let mut dst = tokio::fs::File::create(&old).await?;
        tokio::io::copy(&mut (&mut src).take(t.offset - t.start), &mut dst).await
    };
    if copied.await.is_err() {
        return;
    }
    let punched = rustix::fs::fallocate(
        f.as_fd(),
        rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
        0,
        t.offset,
    );
    if punched.is_ok() {
        t.start = t.offset;
        return;
    }
    t.read(f).await;
    if f.set_len(0).await.is_ok() {
        t.offset = 0;
        t.start = 0;
    }
}

/// The offset of the first line that starts in the last `window` bytes of `path`.
pub(crate) async fn replay_start(path: &Path, window: u64) -> u64 {
    let Ok(mut f) = tokio::fs::File::open(path).await else {
        return 0;
    };
    let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(window);
    if start == 0 || f.seek(std::io::SeekFrom::Start(start - 1)).await.is_err() {
        return start;
    }
    let mut buf = Vec::new();
    if (&mut f)
        .take(window + 1)
        .read_to_end(&mut buf)
        .await
        .is_err()
    {
        return len;
    }
    // The byte before the window included: a newline there means the window starts a line.
    match buf.iter().position(|b| *b == b'\n') {
        Some(i) => start - 1 + i as u64 + 1,
        None => len,
    }
}

/// Where a tailer is in a replica's output file.
struct Tail {
    offset: u64,
    /// Where the bytes not yet rotated out begin (what is before is a hole, or gone).
    start: u64,
    partial: Vec<u8>,
    src: String,
    log: Arc<InstanceLog>,
    seen: Arc<Seen>,
}

impl Tail {
    /// Reads `f` from the offset to its end, pushing every whole line.
    async fn read(&mut self, f: &mut tokio::fs::File) {
        let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
        if len < self.offset {
            // Truncated under us: start over.
            self.offset = 0;
            self.start = 0;
            self.partial.clear();
        }
        if len <= self.offset || f.seek(std::io::SeekFrom::Start(self.offset)).await.is_err() {
            return;
        }
        let mut buf = Vec::with_capacity((len - self.offset) as usize);
        if f.read_to_end(&mut buf).await.is_err() {
            return;
        }
        self.offset += buf.len() as u64;
        self.partial.extend_from_slice(&buf);
        let mut lines: Vec<&[u8]> = self.partial.split(|b| *b == b'\n').collect();
        let rest = lines.pop().unwrap_or_default().to_vec();
        for line in lines {
            let line = String::from_utf8_lossy(line);
            let line = line.trim_end_matches('\r');
            if !line.is_empty() {
                self.seen.line(line);
                self.log.push_line(&self.src, line);
            }
        }
        self.partial = rest;
    }
}

/// What the start of a replica waits for in its output: "Started flows", and the last lines to
/// explain a failed start.
#[derive(Debug, Default)]
pub(crate) struct Seen {
    pub(crate) flows_started: std::sync::atomic::AtomicBool,
    last: std::sync::Mutex<std::collections::VecDeque<String>>,
}

impl Seen {
    fn line(&self, line: &str) {
        // Node-RED logs "Started flows" once its flows run; its flow state says "start" a
        // little earlier, before the http-in routes exist.
        if line.contains("Started flows") {
            self.flows_started
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        if let Ok(mut l) = self.last.lock() {
            l.push_back(line.to_owned());
            if l.len() > 20 {
                l.pop_front();
            }
        }
    }

    pub(crate) fn tail(&self) -> String {
        self.last
            .lock()
            .map(|l| l.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }
}
