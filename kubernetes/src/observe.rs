//! What a pod's status says about its replica, read the same way for every pod the watch
//! reports: ready (and where), not ready any more, restarted by the kubelet (and why it ended),
//! or ended for good.

use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::{ContainerStateTerminated, Pod};
use tandem_coordinator::replica::ExitReason;

/// One reading of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reading {
    /// Ready, and where Node-RED answers; `None` while not ready.
    pub ready: Option<SocketAddr>,
    /// Its container runs (ready or not): it has a log to follow.
    pub running: bool,
    /// How many times the kubelet restarted the container.
    pub restarts: u32,
    /// Why the container last ended, when it did.
    pub last_exit: Option<ExitReason>,
    /// The pod ended for good (phase `Failed` or `Succeeded`), or is being deleted.
    pub ended: Option<ExitReason>,
}

/// Reads `pod`, whose Node-RED listens on `port`.
pub fn read(pod: &Pod, port: u16) -> Reading {
    let status = pod.status.as_ref();
    let container = status
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.name == "node-red"));
    let ready_condition = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let ip = status
        .and_then(|s| s.pod_ip.as_deref())
        .and_then(|ip| ip.parse::<IpAddr>().ok());
    let deleting = pod.metadata.deletion_timestamp.is_some();
    let ready = match (ready_condition && !deleting, ip) {
        (true, Some(ip)) => Some(SocketAddr::new(ip, port)),
        _ => None,
    };
    let running = container
        .and_then(|c| c.state.as_ref())
        .is_some_and(|s| s.running.is_some());
    let restarts = container.map_or(0, |c| u32::try_from(c.restart_count).unwrap_or(0));
    let last_exit = container
        .and_then(|c| c.last_state.as_ref())
        .and_then(|s| s.terminated.as_ref())
        .map(exit_reason);
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("");
    let ended = if deleting {
        Some(ExitReason::Gone("the pod is being deleted".into()))
    } else if phase == "Failed" || phase == "Succeeded" {
        let terminated = container
            .and_then(|c| c.state.as_ref())
            .and_then(|s| s.terminated.as_ref());
        Some(terminated.map(exit_reason).unwrap_or_else(|| {
            let why = status
                .and_then(|s| s.reason.clone().or_else(|| s.message.clone()))
                .unwrap_or_else(|| phase.to_ascii_lowercase());
            ExitReason::Gone(format!("the pod ended: {why}"))
        }))
    } else {
        None
    };
    Reading {
        ready,
        running,
        restarts,
        last_exit,
        ended,
    }
}

/// Why a pod is not running yet, as the kubelet says (`ImagePullBackOff: ...`,
/// `Unschedulable: ...`), for a start that timed out.
pub fn waiting_reason(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    let waiting = status
        .container_statuses
        .iter()
        .flatten()
        .filter_map(|c| c.state.as_ref()?.waiting.as_ref())
        .map(|w| {
            let reason = w.reason.clone().unwrap_or_default();
            match &w.message {
                Some(m) => format!("{reason}: {m}"),
                None => reason,
            }
        })
        .next();
    waiting.or_else(|| {
        status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "PodScheduled" && c.status == "False")
            .map(|c| {
                format!(
                    "{}: {}",
                    c.reason.clone().unwrap_or_default(),
                    c.message.clone().unwrap_or_default()
                )
            })
    })
}

/// Why a container ended, in the local driver's terms: out of memory, a signal (exit codes
/// above 128 are a signal's, as the kubelet reports them), or an exit code.
fn exit_reason(t: &ContainerStateTerminated) -> ExitReason {
    if t.reason.as_deref() == Some("OOMKilled") {
        return ExitReason::OutOfMemory;
    }
    match t.signal {
        Some(signal) if signal != 0 => ExitReason::Signal(signal),
        _ if t.exit_code > 128 => ExitReason::Signal(t.exit_code - 128),
        _ => ExitReason::Code(t.exit_code),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": { "name": "orders-r0" },
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn a_ready_pod_answers_at_its_ip() {
        let r = read(
            &pod(json!({
                "phase": "Running", "podIP": "10.1.2.3",
                "conditions": [{ "type": "Ready", "status": "True" }],
                "containerStatuses": [{ "name": "node-red", "ready": true, "restartCount": 0, "image": "i", "imageID": "" }],
            })),
            1880,
        );
        assert_eq!(r.ready, Some("10.1.2.3:1880".parse().unwrap()));
        assert_eq!(r.ended, None);
    }

    #[test]
    fn an_unready_pod_has_no_address() {
        let r = read(
            &pod(json!({
                "phase": "Running", "podIP": "10.1.2.3",
                "conditions": [{ "type": "Ready", "status": "False" }],
            })),
            1880,
        );
        assert_eq!(r.ready, None);
        assert_eq!(r.ended, None);
    }

    #[test]
    fn an_oom_killed_container_says_so() {
        let r = read(
            &pod(json!({
                "phase": "Running", "podIP": "10.1.2.3",
                "conditions": [{ "type": "Ready", "status": "False" }],
                "containerStatuses": [{ "name": "node-red", "ready": false, "restartCount": 1, "image": "i", "imageID": "",
                    "lastState": { "terminated": { "exitCode": 137, "reason": "OOMKilled" } } }],
            })),
            1880,
        );
        assert_eq!(r.restarts, 1);
        assert_eq!(r.last_exit, Some(ExitReason::OutOfMemory));
    }

    #[test]
    fn a_killed_container_is_a_signal_and_a_failed_pod_has_ended() {
        let r = read(
            &pod(json!({
                "phase": "Failed",
                "containerStatuses": [{ "name": "node-red", "ready": false, "restartCount": 0, "image": "i", "imageID": "",
                    "state": { "terminated": { "exitCode": 137, "reason": "Error" } } }],
            })),
            1880,
        );
        assert_eq!(r.ended, Some(ExitReason::Signal(9)));
        let r = read(
            &pod(json!({ "phase": "Failed", "reason": "Evicted" })),
            1880,
        );
        assert_eq!(
            r.ended,
            Some(ExitReason::Gone("the pod ended: Evicted".into()))
        );
    }
}
