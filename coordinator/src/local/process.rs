//! A replica's process: signals to its process group (rustix), how it ended, and the record
//! that lets the next Tandem adopt it.

use std::path::Path;
use std::time::Duration;

use rustix::process::{Pid, Signal};
use tokio::process::Child;
use tokio::sync::watch;

use crate::replica::ExitReason;

/// What `replica.json` in a replica's userDir records about its running process.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct Record {
    pub pid: u32,
    pub port: u16,
    /// [`super::settings::spec_hash`] of what it was started for.
    pub spec: String,
}

/// Sends `signal` to the process group `pid` leads (a replica and everything it started).
pub(crate) fn signal_group(pid: u32, signal: Signal) {
    let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) else {
        return;
    };
    // ESRCH: the group is gone already.
    let _ = rustix::process::kill_process_group(pid, signal);
}

/// Whether any process of the group `pid` leads still runs. Zombies do not count: they serve
/// and run nothing, and one whose parent is gone may never be reaped (Tandem as a container's
/// PID 1 does not reap orphans).
pub(crate) async fn group_running(pgid: u32) -> bool {
    // The kernel says at once when nothing of the group is left, zombies included: the usual
    // case, a replica alone in its group and reaped.
    let any = i32::try_from(pgid)
        .ok()
        .and_then(Pid::from_raw)
        .is_some_and(|pid| rustix::process::test_kill_process_group(pid).is_ok());
    if !any {
        return false;
    }
    let Ok(mut dir) = tokio::fs::read_dir("/proc").await else {
        return true;
    };
    while let Ok(Some(entry)) = dir.next_entry().await {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(stat) = tokio::fs::read_to_string(format!("/proc/{pid}/stat")).await else {
            continue;
        };
        // After the parenthesised command name: state, ppid, pgrp.
        let mut fields = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace())
            .into_iter()
            .flatten();
        let state = fields.next();
        let group = fields.nth(1).and_then(|g| g.parse::<u32>().ok());
        if group == Some(pgid) && !matches!(state, Some("Z" | "X")) {
            return true;
        }
    }
    false
}

/// Owns the child until it exits and says how it ended.
pub(crate) fn watch_child(mut child: Child) -> watch::Receiver<Option<ExitReason>> {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let reason = match child.wait().await {
            Ok(status) => ExitReason::from_status(status),
            Err(e) => ExitReason::Gone(format!("cannot wait for the process: {e}")),
        };
        let _ = tx.send(Some(reason));
    });
    rx
}

/// Watches a process that is not our child (adopted): it has ended when `/proc/<pid>` is gone
/// or a zombie.
pub(crate) fn watch_pid(pid: u32) -> watch::Receiver<Option<ExitReason>> {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        while process_alive(pid).await && !tx.is_closed() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = tx.send(Some(ExitReason::Gone(format!("process {pid} ended"))));
    });
    rx
}

/// Resolves with how the process ended.
pub(crate) async fn exited(rx: &mut watch::Receiver<Option<ExitReason>>) -> ExitReason {
    match rx.wait_for(Option::is_some).await {
        Ok(r) => r
            .clone()
            .unwrap_or_else(|| ExitReason::Gone("ended".into())),
        Err(_) => ExitReason::Gone("the process watcher ended".into()),
    }
}

pub(crate) async fn process_alive(pid: u32) -> bool {
    match tokio::fs::read_to_string(format!("/proc/{pid}/stat")).await {
        // The state is the field after the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Whether `pid` is the Node-RED of the replica in `user_dir` (and not a reused pid): replicas
/// run with their userDir as working directory. (Node-RED rewrites its command line, so that
/// cannot tell.)
pub(crate) async fn is_replica_process(pid: u32, user_dir: &Path) -> bool {
    let Ok(cwd) = tokio::fs::read_link(format!("/proc/{pid}/cwd")).await else {
        return false;
    };
    let same = match tokio::fs::canonicalize(user_dir).await {
        Ok(dir) => cwd == dir,
        Err(_) => false,
    };
    same && process_alive(pid).await
}

/// Waits until the process `pid` has exited (`exit`) and no process of its group runs, killing
/// what is left of the group (SIGKILL) until then; gives up after 10 s.
pub(crate) async fn reap_group(
    id: &crate::replica::ReplicaId,
    pid: u32,
    mut exit: watch::Receiver<Option<ExitReason>>,
) -> Result<(), crate::driver::DriverError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    if tokio::time::timeout_at(deadline, exited(&mut exit))
        .await
        .is_ok()
    {
        while group_running(pid).await {
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            signal_group(pid, Signal::KILL);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if !group_running(pid).await {
            return Ok(());
        }
    }
    Err(crate::driver::DriverError::Io {
        context: format!("the processes of {id} (group {pid}) did not end"),
        source: std::io::Error::from(std::io::ErrorKind::TimedOut),
    })
}
