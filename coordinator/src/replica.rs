//! What names and describes one replica: its id, its phase, and how its last run ended.

use std::fmt;

use serde::Serialize;

/// A replica's identity: its instance and slot. Written `<instance>-r<slot>`, which is the
/// replica's id in routes, the `src` of its log lines and its label in metrics. The slot is
/// stable across restarts, so MQTT client ids and log tags stay the same.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReplicaId {
    /// The instance's name (DNS-safe).
    pub instance: String,
    /// 0-based.
    pub slot: u32,
}

impl ReplicaId {
    /// The replica in `slot` of `instance`.
    pub fn new(instance: impl Into<String>, slot: u32) -> Self {
        Self {
            instance: instance.into(),
            slot,
        }
    }

    /// Reads `<instance>-r<slot>`.
    pub fn parse(text: &str) -> Option<Self> {
        let (instance, slot) = text.rsplit_once("-r")?;
        if instance.is_empty() || !slot.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(Self::new(instance, slot.parse().ok()?))
    }
}

impl fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-r{}", self.instance, self.slot)
    }
}

/// Where a replica is in its life, as the coordinator sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaPhase {
    /// Being started (or adopted), not ready yet.
    Starting,
    /// Ready: answering, its flows in the state asked for.
    Running,
    /// Out of rotation, waiting for its requests in flight to finish before it stops.
    Draining,
    /// Getting new flows: out of rotation while another replica serves, until its flows pass
    /// the deploy's health gate (or, failed, until the deploy is rolled back).
    Deploying,
    /// Being stopped on purpose (scale down, replacement, instance stopped).
    Stopping,
    /// Stopped answering within the detection time; being fenced.
    Hung,
    /// Ended (crash, hang, fence); started again after the restart backoff.
    Restarting,
    /// Held: it crashed each time right after it started.
    Crashed,
}

impl ReplicaPhase {
    /// The lowercase name, as in the status API and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Draining => "draining",
            Self::Deploying => "deploying",
            Self::Stopping => "stopping",
            Self::Hung => "hung",
            Self::Restarting => "restarting",
            Self::Crashed => "crashed",
        }
    }
}

impl fmt::Display for ReplicaPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a replica's run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// Its process exited with this code.
    Code(i32),
    /// Its process was ended by this signal (number).
    Signal(i32),
    /// It stopped answering its liveness check for this long and was fenced.
    Hung {
        /// Time without an answer, ms.
        silent_ms: u64,
    },
    /// It never became ready; the driver says why (deadline, start error, output's end).
    StartFailed(String),
    /// The platform reports it gone (a process that is not Tandem's child, a deleted pod).
    Gone(String),
    /// The kernel ended it for using more memory than its limit (a pod's `OOMKilled`).
    OutOfMemory,
}

impl ExitReason {
    /// From a process's exit status.
    pub fn from_status(status: std::process::ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(code), _) => Self::Code(code),
            (None, Some(signal)) => Self::Signal(signal),
            (None, None) => Self::Gone(status.to_string()),
        }
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Code(code) => write!(f, "exit status: {code}"),
            Self::Signal(s) => {
                let name = match s {
                    1 => " (SIGHUP)",
                    2 => " (SIGINT)",
                    6 => " (SIGABRT)",
                    9 => " (SIGKILL)",
                    11 => " (SIGSEGV)",
                    15 => " (SIGTERM)",
                    _ => "",
                };
                write!(f, "signal: {s}{name}")
            }
            Self::Hung { silent_ms } => write!(
                f,
                "hung: its admin API did not answer for {silent_ms} ms; fenced"
            ),
            Self::StartFailed(why) => write!(f, "did not start: {why}"),
            Self::Gone(why) => f.write_str(why),
            Self::OutOfMemory => {
                f.write_str("out of memory (OOMKilled): it used more than its memory limit")
            }
        }
    }
}

/// Whether a replica's flows run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowState {
    /// Flows run (an active replica).
    Started,
    /// Flows loaded but stopped (a hot standby).
    Stopped,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_read_back_what_they_write() {
        let id = ReplicaId::new("a-r2-b", 11);
        assert_eq!(id.to_string(), "a-r2-b-r11");
        assert_eq!(ReplicaId::parse("a-r2-b-r11"), Some(id));
        for bad in ["", "-r1", "a-r", "a-rx", "a-r1x", "ar1"] {
            assert_eq!(ReplicaId::parse(bad), None, "{bad:?}");
        }
    }
}
