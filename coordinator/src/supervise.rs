//! Keeping one replica alive: start it, check that it still answers, restart it when it ends or
//! hangs after the backoff of [`crate::restart`], until it is stopped or held as crashed.

use std::sync::Arc;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::driver::{Driver, ReplicaSpec, Running};
use crate::logs::InstanceLog;
use crate::restart::{Decision, RestartPolicy, RestartState};

/// What happened to a supervised replica, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Being started (first start or restart).
    Starting,
    /// Started and answering its readiness probe.
    Ready(Running),
    /// Its process ended (or it failed to start); a restart follows unless it is crashed.
    Exited {
        /// How it ended.
        reason: String,
        /// Restarts so far, this one included when one follows.
        restarts: u64,
    },
    /// Held: it keeps crashing right after it starts.
    Crashed(String),
    /// Stopped on request.
    Stopped,
}

/// Supervises `spec` until `stop` turns true; reports every change through `events`.
pub async fn supervise<D: Driver>(
    driver: Arc<D>,
    spec: ReplicaSpec,
    log: Arc<InstanceLog>,
    policy: RestartPolicy,
    mut stop: watch::Receiver<bool>,
    events: impl Fn(Event) + Send,
) {
    let id = spec.id();
    let mut state = RestartState::default();
    loop {
        events(Event::Starting);
        state.started(Instant::now());
        let started = tokio::select! {
            started = driver.start(&spec, log.clone()) => started,
            _ = stopped(&mut stop) => {
                let _ = driver.stop(&id).await;
                events(Event::Stopped);
                return;
            }
        };
        let reason = match started {
            Ok(running) => {
                events(Event::Ready(running));
                tokio::select! {
                    reason = driver.wait(&id) => reason,
                    reason = hung(&*driver, &id, &policy) => {
                        // Fence it before a new one starts; a hung process cannot handle SIGTERM.
                        let _ = driver.kill(&id).await;
                        reason
                    }
                    _ = stopped(&mut stop) => {
                        let _ = driver.stop(&id).await;
                        events(Event::Stopped);
                        return;
                    }
                }
            }
            Err(e) => e.to_string(),
        };
        // Forget the ended process before starting another under the same id.
        let _ = driver.stop(&id).await;
        match state.exited(Instant::now(), &reason, &policy) {
            Decision::RestartAfter(delay) => {
                tracing::warn!(replica = %id, %reason, ?delay, "replica ended; restarting");
                log.note(
                    "warn",
                    format!("replica {id} ended ({reason}); restarting in {delay:?}"),
                );
                events(Event::Exited {
                    reason,
                    restarts: state.restarts(),
                });
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stopped(&mut stop) => {
                        events(Event::Stopped);
                        return;
                    }
                }
            }
            Decision::Crashed(why) => {
                tracing::error!(replica = %id, reason = %why, "replica held as crashed");
                log.note("error", format!("replica {id} held as crashed: {why}"));
                events(Event::Crashed(why));
                return;
            }
        }
    }
}

/// Resolves once the replica has failed its liveness check `policy.check_failures` times in a
/// row, with the reason.
async fn hung<D: Driver>(driver: &D, id: &str, policy: &RestartPolicy) -> String {
    let mut failures = 0;
    loop {
        tokio::time::sleep(policy.check_interval).await;
        match driver.check(id).await {
            Ok(()) => failures = 0,
            Err(e) => {
                failures += 1;
                if failures >= policy.check_failures {
                    return format!("hung: its admin API failed {failures} checks in a row ({e})");
                }
            }
        }
    }
}

/// Completes once `stop` is true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
