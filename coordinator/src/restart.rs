//! When to restart a replica that exited, and when to give up.
//!
//! A replica that exits is restarted after a delay that doubles with each crash in a row (base
//! and cap in [`RestartPolicy`]). A replica that ran for `stable_after` before exiting starts a
//! fresh streak: one crash a day is not a crash loop. A replica that crashes `max_quick_crashes`
//! times in a row, each within `stable_after` of its start, is held in `crashed` with the reason,
//! instead of burning CPU; the other replicas of the instance are not touched.

use std::time::Duration;

use tokio::time::Instant;

/// Restart settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    /// Delay before the first restart. Default 1 s.
    pub base: Duration,
    /// Longest delay. Default 60 s.
    pub max: Duration,
    /// A run this long ends a crash streak. Default 60 s.
    pub stable_after: Duration,
    /// Quick crashes in a row that hold the replica in `crashed`. Default 5.
    pub max_quick_crashes: u32,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            base: Duration::from_secs(1),
            max: Duration::from_secs(60),
            stable_after: Duration::from_secs(60),
            max_quick_crashes: 5,
        }
    }
}

/// What to do after an exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Start it again once this delay has passed.
    RestartAfter(Duration),
    /// Stop trying: the replica crashes as soon as it starts. Carries the reason to report.
    Crashed(String),
}

/// The restart history of one replica.
#[derive(Debug, Clone, Default)]
pub struct RestartState {
    streak: u32,
    restarts: u64,
    started_at: Option<Instant>,
}

impl RestartState {
    /// The replica was (re)started at `now`.
    pub fn started(&mut self, now: Instant) {
        self.started_at = Some(now);
    }

    /// Restarts so far.
    pub fn restarts(&self) -> u64 {
        self.restarts
    }

    /// The replica exited at `now` with `reason` (exit status, signal, failed probe).
    pub fn exited(&mut self, now: Instant, reason: &str, policy: &RestartPolicy) -> Decision {
        let ran = self
            .started_at
            .map(|s| now.saturating_duration_since(s))
            .unwrap_or_default();
        if ran >= policy.stable_after {
            self.streak = 0;
        }
        self.streak += 1;
        if self.streak >= policy.max_quick_crashes && ran < policy.stable_after {
            return Decision::Crashed(format!(
                "crashed {} times in a row, each within {:?} of starting; last: {reason}",
                self.streak, policy.stable_after
            ));
        }
        self.restarts += 1;
        let factor = 1u32 << (self.streak - 1).min(20);
        Decision::RestartAfter(policy.base.saturating_mul(factor).min(policy.max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn quick_crashes_back_off_then_hold_the_replica() {
        let p = RestartPolicy {
            base: Duration::from_secs(1),
            max: Duration::from_secs(5),
            stable_after: Duration::from_secs(60),
            max_quick_crashes: 5,
        };
        let mut s = RestartState::default();
        let mut delays = Vec::new();
        for _ in 0..4 {
            s.started(Instant::now());
            tokio::time::advance(Duration::from_secs(2)).await;
            match s.exited(Instant::now(), "exit status 1", &p) {
                Decision::RestartAfter(d) => {
                    delays.push(d.as_secs());
                    tokio::time::advance(d).await;
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(delays, [1, 2, 4, 5], "doubling, capped");
        s.started(Instant::now());
        tokio::time::advance(Duration::from_secs(2)).await;
        match s.exited(Instant::now(), "exit status 1", &p) {
            Decision::Crashed(reason) => assert!(
                reason.contains("5 times") && reason.contains("exit status 1"),
                "{reason}"
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(s.restarts(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stable_run_ends_the_streak() {
        let p = RestartPolicy::default();
        let mut s = RestartState::default();
        for _ in 0..3 {
            s.started(Instant::now());
            tokio::time::advance(Duration::from_secs(1)).await;
            assert!(matches!(
                s.exited(Instant::now(), "crash", &p),
                Decision::RestartAfter(_)
            ));
        }
        s.started(Instant::now());
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(
            s.exited(Instant::now(), "killed", &p),
            Decision::RestartAfter(Duration::from_secs(1))
        );
    }
}
