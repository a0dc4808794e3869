//! A worker's death is seen directly, from the process itself, not through EOF on its output:
//! something else may hold the worker's pipes long after it died.

mod common;

use std::fs::File;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::time::{Duration, Instant};

use serde_json::json;
use snakepit::{CallOptions, Error, ExitKind};

/// Opens every pipe the process `pid` holds, from outside its process tree (through
/// `/proc/<pid>/fd`), so that no end of them closes when it dies: the worker's keeper kills
/// whatever the worker started, but not this.
fn hold_pipes_of(pid: u32) -> Vec<File> {
    let mut held = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
        let path = entry.path();
        let is_pipe = std::fs::metadata(&path).is_ok_and(|m| m.file_type().is_fifo());
        if is_pipe {
            // Read and write: opening a pipe so never blocks, and holds its write end open.
            let file =
                std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_NONBLOCK).open(&path);
            held.extend(file.ok());
        }
    }
    held
}

#[test]
fn a_worker_that_dies_while_something_holds_its_protocol_pipes_fails_its_call_as_died() {
    // Before the pidfd, the host learnt of a worker's exit only from EOF on its stdout: a
    // process holding the pipe kept that from coming, so the call waited for its whole
    // deadline and failed with Timeout(Call) instead of WorkerDied, and the dead worker was
    // not reaped while the holder lived.
    let pool = common::builder(1).build().unwrap();
    let mut pids = common::worker_pids(&pool);
    let held = hold_pipes_of(pids[0]);
    assert!(held.len() >= 3, "the worker's stdin, stdout and stderr pipes at least: {}", held.len());
    let started = Instant::now();
    let result =
        pool.call_with("exit_now", json!({"code": 3}), CallOptions::new().timeout(Duration::from_secs(20)));
    match result {
        Err(Error::WorkerDied { pid, exit, collateral: false, .. }) => {
            assert_eq!(pid, pids[0]);
            assert_eq!(exit, ExitKind::Code(3));
        }
        other => panic!("expected WorkerDied (the worker exited with 3), got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(10), "not by the 20 s deadline: {:?}", started.elapsed());
    // The dead worker is gone although its pipes are still open, and the pool serves on.
    common::assert_gone(&pids, Duration::from_secs(5));
    assert_eq!(pool.call("add", json!([2, 3])).unwrap(), json!(5));
    assert_eq!(pool.stats().unwrap().crashes, 1);
    pids.extend(common::worker_pids(&pool));
    pool.shutdown().unwrap();
    common::assert_gone(&pids, Duration::from_secs(5));
    drop(held);
}
