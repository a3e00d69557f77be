//! A replica's watcher: one task per run that waits for readiness, then checks the admin API
//! every [`Liveness::interval`], reports [`EventKind::Hung`] once nothing has answered for
//! [`Liveness::hang_after`], and reports how the process ended. A replica stopped or fenced on
//! purpose reports nothing more.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rustix::process::Signal;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::process::{self, Record};
use super::{tail, Replica};
use crate::admin;
use crate::driver::{Event, EventKind, Liveness, Running};
use crate::replica::{ExitReason, ReplicaId};

/// What a started replica's watcher waits for before it is ready.
pub(crate) struct Boot {
    pub start_stopped: bool,
    pub seen: Arc<tail::Seen>,
    pub deadline: Instant,
    /// Written once it is ready: only a ready replica is adopted.
    pub record_at: PathBuf,
    pub record: Record,
}

/// Follows one run of a replica and reports it.
pub(crate) struct Watcher {
    pub id: ReplicaId,
    pub slot: u32,
    pub run: u64,
    pub replica: Replica,
    pub liveness: Liveness,
    pub events: mpsc::UnboundedSender<Event>,
}

impl Watcher {
    /// The replica ended on its own (or never became ready): whatever its flows started in its
    /// process group is ended too before the exit is reported, so nothing of it runs when a
    /// standby takes over.
    async fn ended(&self, reason: ExitReason) {
        if !self.replica.ending.load(Ordering::Relaxed) {
            process::signal_group(self.replica.pid, Signal::KILL);
            match process::reap_group(&self.id, self.replica.pid, self.replica.exit.clone()).await {
                Ok(()) => self.replica.reaped.store(true, Ordering::Relaxed),
                Err(e) => {
                    tracing::error!(replica = %self.id, error = %e, "what the replica started is still running")
                }
            }
        }
        self.send(EventKind::Exited {
            reason,
            restarting: false,
        });
    }

    fn send(&self, kind: EventKind) {
        if !self.replica.ending.load(Ordering::Relaxed) {
            let _ = self.events.send(Event {
                slot: self.slot,
                run: self.run,
                kind,
            });
        }
    }
}

/// A replica's watcher: readiness (when `boot`), then liveness checks until it ends.
pub(crate) async fn watch_replica(w: Watcher, boot: Option<Boot>, running: Running) {
    let mut exit = w.replica.exit.clone();
    if let Some(boot) = boot {
        match ready(&w, &boot, &mut exit).await {
            Ok(()) => {
                let text = serde_json::to_string(&boot.record).unwrap_or_default();
                if let Err(e) = tokio::fs::write(&boot.record_at, text).await {
                    tracing::warn!(replica = %w.id, error = %e, "cannot record the replica for adoption");
                }
                tracing::info!(replica = %w.id, addr = %w.replica.addr, pid = w.replica.pid, "replica ready");
                w.send(EventKind::Ready(running));
            }
            Err(reason) => {
                w.ended(reason).await;
                return;
            }
        }
    }
    let mut last_answer = Instant::now();
    let mut hung = false;
    loop {
        tokio::select! {
            reason = process::exited(&mut exit) => {
                w.ended(reason).await;
                return;
            }
            _ = tokio::time::sleep(w.liveness.interval) => {}
        }
        let answered = tokio::select! {
            reason = process::exited(&mut exit) => {
                w.ended(reason).await;
                return;
            }
            r = admin::flow_state(w.replica.addr, &w.replica.secret, w.liveness.hang_after) => r.is_ok(),
        };
        if answered {
            last_answer = Instant::now();
            hung = false;
        } else if !hung && last_answer.elapsed() >= w.liveness.hang_after {
            hung = true;
            let silent_ms = last_answer.elapsed().as_millis() as u64;
            w.send(EventKind::Hung { silent_ms });
        }
    }
}

/// Waits until a starting replica answers with its flows in the state asked for; kills it when
/// the deadline passes.
async fn ready(
    w: &Watcher,
    boot: &Boot,
    exit: &mut watch::Receiver<Option<ExitReason>>,
) -> Result<(), ExitReason> {
    loop {
        let ended = exit.borrow().clone();
        if let Some(reason) = ended {
            // Let the tailer read the last lines before quoting them.
            tokio::time::sleep(Duration::from_millis(150)).await;
            return Err(ExitReason::StartFailed(format!(
                "{reason}: {}",
                boot.seen.tail()
            )));
        }
        // Ready means the flows are in the state asked for: right after the port opens,
        // Node-RED can still report the state it had before it applied the stored one.
        let why = match admin::flow_state(w.replica.addr, &w.replica.secret, Duration::from_secs(5))
            .await
        {
            Ok(state)
                if admin::state_matches(&state, boot.start_stopped)
                    && (boot.start_stopped || boot.seen.flows_started.load(Ordering::Relaxed)) =>
            {
                return Ok(())
            }
            Ok(state) => format!("flows are in state {state:?}"),
            Err(e) => e,
        };
        if Instant::now() >= boot.deadline {
            process::signal_group(w.replica.pid, Signal::KILL);
            return Err(ExitReason::StartFailed(format!(
                "not ready in time ({why}); killed"
            )));
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = exit.changed() => {}
        }
    }
}
