//! A worker's death is seen directly, from the process itself, not through EOF on its output:
//! something else may hold the worker's pipes long after it died.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;
use snakepit::{CallOptions, Error, ExitKind};

/// Kills (SIGKILL, through the `kill` command) the process whose pid a worker wrote to a file,
/// when dropped: the escaped child never outlives the test, even one that failed.
struct KillRecorded(PathBuf);

impl KillRecorded {
    fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(&self.0).ok()?.trim().parse().ok()
    }
}

impl Drop for KillRecorded {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            let _ = std::process::Command::new("kill").arg("-9").arg(pid.to_string()).status();
        }
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

#[test]
fn a_worker_that_dies_while_a_child_holds_its_protocol_pipes_fails_its_call_as_died() {
    // Pins: the host learns of a worker's exit only from EOF on its stdout (then reaps it).
    // A child that escaped the worker's process group holding the protocol pipes keeps that
    // EOF from coming, so the call waits for its whole deadline and fails with Timeout(Call)
    // instead of WorkerDied, and the dead worker is never reaped while the child lives.
    let dir = std::env::temp_dir().join(format!("snakepit-exitdetect-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let pool = common::builder(1).adapter("exit_adapter").build().unwrap();
    // Declared after the pool, so a failing test kills the child before it drops the pool.
    let child = KillRecorded(dir.join("child.pid"));
    let mut pids = common::worker_pids(&pool);
    let result = pool.call_with(
        "die_leaving_stdout_held",
        json!({"seconds": 60, "pid_file": child.0}),
        CallOptions::new().timeout(Duration::from_secs(20)),
    );
    let holder = child.pid().expect("the worker recorded its child's pid");
    assert!(common::alive(holder), "the child still holds the dead worker's pipes");
    match result {
        Err(Error::WorkerDied { pid, exit, collateral: false, .. }) => {
            assert_eq!(pid, pids[0]);
            assert_eq!(exit, ExitKind::Code(3));
        }
        other => panic!("expected WorkerDied (the worker exited with 3), got {other:?}"),
    }
    // The dead worker is gone although its pipes are still open, and the pool serves on.
    common::assert_gone(&pids, Duration::from_secs(5));
    assert_eq!(pool.call("add", json!([2, 3])).unwrap(), json!(5));
    assert_eq!(pool.stats().unwrap().crashes, 1);
    pids.extend(common::worker_pids(&pool));
    pool.shutdown().unwrap();
    common::assert_gone(&pids, Duration::from_secs(5));
    drop(child);
    common::assert_gone(&[holder], Duration::from_secs(5));
}
