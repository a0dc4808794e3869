//! A daemon an adapter starts (double fork and `setsid`, leaving the worker's process group
//! and session) does not outlive its worker, however the worker ends: a clean shutdown, a
//! SIGKILL from outside, a crash, or a kill by the pool itself. The worker's keeper (its parent
//! process, a child subreaper) adopts such daemons and kills them.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use snakepit::{CallOptions, Error, Pool};

/// A fresh folder for this test's pid files.
fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("snakepit-daemon-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn field(pid: u32, n: usize) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat.rsplit(')').next().unwrap().split_whitespace().nth(n).unwrap().parse().unwrap()
}

/// Starts a daemon on `pool`'s worker and returns its pid, checking that it left the worker's
/// process group and session (so no signal to the group reaches it).
fn start_daemon(pool: &Pool, pid_file: &Path) -> u32 {
    let worker = common::worker_pids(pool)[0];
    let daemon = pool.call("daemonize", json!({"pid_file": pid_file, "seconds": 60})).unwrap();
    let daemon = daemon.as_u64().expect("the daemon's pid") as u32;
    assert!(common::alive(daemon), "the daemon runs");
    assert_ne!(field(daemon, 2), field(worker, 2), "the daemon left the worker's process group");
    assert_ne!(field(daemon, 3), field(worker, 3), "the daemon left the worker's session");
    daemon
}

/// Asserts `daemon` dies within 3 s (and kills it if not, so that a failure leaves nothing).
fn assert_daemon_gone(daemon: u32, after: &str) {
    let gone = common::wait_until(Duration::from_secs(3), || !common::alive(daemon));
    if !gone {
        let _ = std::process::Command::new("kill").args(["-9", &daemon.to_string()]).status();
    }
    assert!(gone, "the daemon {daemon} outlived {after}");
}

/// The worker's keeper: its parent, which this process started.
fn keeper_of(worker: u32) -> u32 {
    let keeper = common::parent_of(worker).expect("the worker runs");
    assert_eq!(common::parent_of(keeper), Some(std::process::id()), "the keeper is our child");
    keeper
}

#[test]
fn a_daemon_started_by_an_adapter_is_gone_after_shutdown() {
    let dir = scratch("shutdown");
    let pool = common::builder(1).build().unwrap();
    let workers = common::worker_pids(&pool);
    let keeper = keeper_of(workers[0]);
    let daemon = start_daemon(&pool, &dir.join("daemon.pid"));
    pool.shutdown().unwrap();
    assert_daemon_gone(daemon, "shutdown()");
    common::assert_gone(&[workers[0], keeper], Duration::from_secs(5));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_daemon_dies_with_a_worker_killed_from_outside() {
    let dir = scratch("sigkill");
    let pool = common::builder(1).build().unwrap();
    let worker = common::worker_pids(&pool)[0];
    let keeper = keeper_of(worker);
    let daemon = start_daemon(&pool, &dir.join("daemon.pid"));
    // SIGKILL: nothing of the worker's own runs at its end.
    std::process::Command::new("kill").args(["-9", &worker.to_string()]).status().unwrap();
    assert_daemon_gone(daemon, "a SIGKILL of its worker");
    common::assert_gone(&[worker, keeper], Duration::from_secs(3));
    // The pool replaces the worker and goes on.
    assert!(common::settled(&pool), "the pool started a replacement");
    assert_eq!(pool.call("add", json!({"a": 1, "b": 2})).unwrap(), json!(3));
    let replacement = common::worker_pids(&pool);
    pool.shutdown().unwrap();
    common::assert_gone(&replacement, Duration::from_secs(5));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_daemon_dies_with_a_worker_that_crashes() {
    let dir = scratch("crash");
    let pool = common::builder(1).build().unwrap();
    let worker = common::worker_pids(&pool)[0];
    let daemon = start_daemon(&pool, &dir.join("daemon.pid"));
    // os._exit skips every exit handler of the worker's.
    let err = pool.call("exit_now", json!({"code": 13})).unwrap_err();
    assert!(matches!(err, Error::WorkerDied { .. }), "{err:?}");
    assert!(err.to_string().contains("13"), "the worker's own exit code comes through the keeper: {err}");
    assert_daemon_gone(daemon, "its worker's crash");
    assert!(common::settled(&pool));
    let replacement = common::worker_pids(&pool);
    pool.shutdown().unwrap();
    common::assert_gone(&[&[worker][..], &replacement].concat(), Duration::from_secs(5));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_daemon_dies_with_a_worker_the_pool_kills_for_a_time_out() {
    let dir = scratch("timeout");
    let pid_file = dir.join("daemon.pid");
    let pool = common::builder(1).kill_on_timeout(true).build().unwrap();
    let worker = common::worker_pids(&pool)[0];
    let keeper = keeper_of(worker);
    // The command starts a daemon, then runs past its deadline: the pool kills the worker.
    let err = pool
        .call_with(
            "daemonize",
            json!({"pid_file": pid_file, "seconds": 60, "linger": 60}),
            CallOptions::new().timeout(Duration::from_secs(2)),
        )
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    let daemon: u32 =
        std::fs::read_to_string(&pid_file).expect("the daemon wrote its pid").trim().parse().unwrap();
    assert_daemon_gone(daemon, "the pool's kill of its worker");
    common::assert_gone(&[worker, keeper], Duration::from_secs(3));
    assert!(common::settled(&pool));
    let replacement = common::worker_pids(&pool);
    pool.shutdown().unwrap();
    common::assert_gone(&replacement, Duration::from_secs(5));
    let _ = std::fs::remove_dir_all(&dir);
}
