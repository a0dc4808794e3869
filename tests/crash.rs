//! A worker that dies mid-call fails exactly the calls it held; the pool replaces it.

mod common;

use std::time::Duration;

use serde_json::json;
use snakepit::{Error, ExitKind};

#[test]
fn os_exit_fails_the_call_with_exit_code_and_stderr() {
    let pool = common::builder(2).build().unwrap();
    let before = common::worker_pids(&pool);
    match pool.call("exit_now", json!({"code": 13})).unwrap_err() {
        Error::WorkerDied { pid, exit, stderr, collateral: false, killed_by: None, .. } => {
            assert!(before.contains(&pid));
            assert_eq!(exit, ExitKind::Code(13));
            assert!(stderr.iter().any(|l| l.contains("about to exit with 13")), "{stderr:?}");
        }
        other => panic!("expected WorkerDied, got {other:?}"),
    }
    assert!(common::settled(&pool), "the pool came back to full size");
    let s = pool.stats().unwrap();
    assert_eq!((s.crashes, s.restarts), (1, 1));
    assert_eq!(pool.call("add", json!([1, 2])).unwrap(), json!(3));
    let after = common::worker_pids(&pool);
    pool.shutdown().unwrap();
    common::assert_gone(&before, Duration::from_secs(5));
    common::assert_gone(&after, Duration::from_secs(5));
}

#[test]
fn sigkill_from_outside_fails_only_the_call_it_held() {
    let pool = common::builder(2).build().unwrap();
    let pids = common::worker_pids(&pool);
    std::thread::scope(|s| {
        // Two long calls, one on each worker; the victim is whichever runs `sleep` 5 s.
        let victim = s.spawn(|| pool.call("tag", json!({"value": "victim", "delay": 5.0})));
        let bystander = s.spawn(|| pool.call("tag", json!({"value": "bystander", "delay": 1.0})));
        assert!(common::wait_until(Duration::from_secs(10), || {
            pool.stats().unwrap().workers.iter().all(|w| w.in_flight == 1)
        }));
        // Find the victim's worker: the one still busy after the bystander finished.
        let b = bystander.join().unwrap().unwrap();
        assert_eq!(b["value"], json!("bystander"));
        let busy: Vec<u32> =
            pool.stats().unwrap().workers.iter().filter(|w| w.in_flight == 1).map(|w| w.pid).collect();
        assert_eq!(busy.len(), 1);
        unsafe_free_kill(busy[0]);
        match victim.join().unwrap().unwrap_err() {
            Error::WorkerDied { pid, exit, .. } => {
                assert_eq!(pid, busy[0]);
                assert_eq!(exit, ExitKind::Signal(9));
            }
            other => panic!("expected WorkerDied, got {other:?}"),
        }
    });
    assert!(common::settled(&pool));
    assert_eq!(pool.call("add", json!([2, 3])).unwrap(), json!(5));
    let after = common::worker_pids(&pool);
    pool.shutdown().unwrap();
    common::assert_gone(&pids, Duration::from_secs(5));
    common::assert_gone(&after, Duration::from_secs(5));
}

#[test]
fn a_segfault_is_reported_as_a_signal() {
    let pool = common::builder(1).build().unwrap();
    match pool.call("segfault", json!({})).unwrap_err() {
        Error::WorkerDied { exit, .. } => assert_eq!(exit, ExitKind::Signal(11)),
        other => panic!("expected WorkerDied, got {other:?}"),
    }
    assert_eq!(
        pool.call("add", json!([1, 1])).unwrap(),
        json!(2),
        "a queued-behind call is served by the replacement"
    );
    pool.shutdown().unwrap();
}

#[test]
fn calls_waiting_behind_a_crash_are_served_by_the_replacement() {
    let pool = common::builder(1).build().unwrap();
    std::thread::scope(|s| {
        let crash = s.spawn(|| pool.call("tag", json!({"value": 0, "delay": 0.3})));
        assert!(
            common::wait_until(Duration::from_secs(5), || pool.stats().unwrap().workers[0].in_flight == 1)
        );
        let waiting: Vec<_> = (1..=3)
            .map(|i| {
                let pool = &pool;
                s.spawn(move || pool.call("add", json!([i, 0])))
            })
            .collect();
        assert!(common::wait_until(Duration::from_secs(5), || pool.stats().unwrap().queued == 3));
        unsafe_free_kill(common::worker_pids(&pool)[0]);
        assert!(matches!(crash.join().unwrap(), Err(Error::WorkerDied { .. })));
        for (i, w) in waiting.into_iter().enumerate() {
            assert_eq!(w.join().unwrap().unwrap(), json!(i + 1));
        }
    });
    pool.shutdown().unwrap();
}

#[test]
fn a_worker_that_forked_before_dying_is_still_reported_dead() {
    // The forked child keeps running with copies of the worker's fds; the pool must still see
    // the worker die instead of waiting for the call's deadline.
    let pool = common::builder(1).request_timeout(Duration::from_secs(20)).build().unwrap();
    let started = std::time::Instant::now();
    match pool.call("fork_then_exit", json!({"code": 7})).unwrap_err() {
        Error::WorkerDied { exit, .. } => assert_eq!(exit, ExitKind::Code(7)),
        other => panic!("expected WorkerDied, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(10), "not by the 20 s deadline");
    assert_eq!(pool.call("add", json!([1, 1])).unwrap(), json!(2));
    pool.shutdown().unwrap();
}

#[test]
fn a_child_that_escaped_the_group_dies_with_its_worker_and_does_not_stall_the_pool() {
    let dir = std::env::temp_dir().join(format!("snakepit-escape-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pid_file = dir.join("child.pid");
    let pool = common::builder(2).build().unwrap();
    let err = pool.call("escape_then_exit", json!({"pid_file": pid_file, "seconds": 30})).unwrap_err();
    assert!(matches!(err, Error::WorkerDied { .. }), "{err:?}");
    let child: u32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    // The escaped child held the dead worker's stderr open; its keeper killed it with the
    // worker, and calls and stats flow on.
    let gone = common::wait_until(Duration::from_secs(3), || !common::alive(child));
    if !gone {
        let _ = std::process::Command::new("kill").args(["-9", &child.to_string()]).status();
    }
    assert!(gone, "the escaped child {child} outlived its worker");
    for i in 0..20 {
        assert_eq!(pool.call("add", json!([i, 1])).unwrap(), json!(i + 1));
    }
    assert!(common::settled(&pool));
    let started = std::time::Instant::now();
    pool.shutdown().unwrap();
    assert!(started.elapsed() < Duration::from_secs(10), "shutdown is bounded: {:?}", started.elapsed());
    let _ = std::fs::remove_dir_all(&dir);
}

/// SIGKILL through the `kill` command, so the tests need no unsafe code.
fn unsafe_free_kill(pid: u32) {
    let status = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    assert!(status.success());
}
