//! A worker that keeps failing at start-up: capped backoff, a degraded pool that fails calls
//! fast with the last start-up error, and recovery once starts succeed again.

mod common;

use std::time::{Duration, Instant};

use serde_json::json;
use snakepit::Error;

#[test]
fn crash_loop_degrades_fails_fast_backs_off_and_recovers() {
    let flag = std::env::temp_dir().join(format!("snakepit-flaky-{}", std::process::id()));
    let _ = std::fs::remove_file(&flag);
    let pool = common::flaky_builder(&flag, (Duration::from_millis(100), Duration::from_millis(400)))
        .degraded_after(2)
        .build()
        .unwrap();
    let first = common::worker_pids(&pool);

    // From now on every start fails at import.
    std::fs::write(&flag, b"fail").unwrap();
    assert!(matches!(pool.call("exit_now", json!({})), Err(Error::WorkerDied { .. })));
    assert!(
        common::wait_until(Duration::from_secs(20), || pool.stats().unwrap().degraded),
        "the pool reports itself degraded"
    );
    let started = Instant::now();
    match pool.call("pid", json!({})).unwrap_err() {
        Error::Degraded { last_error } => assert!(last_error.contains("flag file"), "{last_error}"),
        other => panic!("expected Degraded, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(1), "a degraded pool fails calls fast");

    // Backoff: over 1.5 s at most a handful of starts, not a fork storm (~25 starts/s here).
    let before = pool.stats().unwrap().startup_failures;
    std::thread::sleep(Duration::from_millis(1500));
    let tries = pool.stats().unwrap().startup_failures - before;
    assert!(tries <= 8, "{tries} start attempts in 1.5 s with a 400 ms backoff cap");

    // Fixed: the next start succeeds and the pool recovers by itself.
    std::fs::remove_file(&flag).unwrap();
    assert!(common::settled(&pool), "the pool recovered");
    let s = pool.stats().unwrap();
    assert!(!s.degraded);
    assert_eq!(s.startup_failures, 0);
    let now = common::worker_pids(&pool);
    assert_eq!(pool.call("pid", json!({})).unwrap(), json!(now[0]));
    pool.shutdown().unwrap();
    common::assert_gone(&first, Duration::from_secs(5));
    common::assert_gone(&now, Duration::from_secs(5));
}

#[test]
fn workers_that_die_right_after_starting_are_restarted_with_backoff() {
    let flag = std::env::temp_dir().join(format!("snakepit-quickcrash-{}", std::process::id()));
    let _ = std::fs::remove_file(&flag);
    // Imports never fail here (FLAKY_FLAG names no file); CRASH_FLAG makes workers die.
    let never = std::env::temp_dir().join("snakepit-no-such-flag");
    let pool = common::flaky_builder(&never, (Duration::from_millis(100), Duration::from_millis(400)))
        .env("CRASH_FLAG", flag.to_str().unwrap())
        .build()
        .unwrap();
    // From now on every worker dies 50 ms after it is ready.
    std::fs::write(&flag, b"crash").unwrap();
    assert!(matches!(pool.call("exit_now", json!({})), Err(Error::WorkerDied { .. })));
    std::thread::sleep(Duration::from_millis(300));
    let before = pool.stats().unwrap().restarts;
    std::thread::sleep(Duration::from_millis(1500));
    let restarts = pool.stats().unwrap().restarts - before;
    // Without backoff a worker would be started every ~100 ms here (start-up plus 50 ms).
    assert!(restarts <= 6, "{restarts} restarts in 1.5 s with a 400 ms backoff cap");
    std::fs::remove_file(&flag).unwrap();
    // Recovered: one worker, ready, alive well past the 50 ms a doomed one gets.
    let recovered = common::wait_until(Duration::from_secs(20), || {
        let s = pool.stats().unwrap();
        s.workers.len() == 1 && s.ready_workers == 1 && s.workers[0].age_ms > 500
    });
    assert!(recovered, "the pool recovers once workers survive");
    let pid = common::worker_pids(&pool)[0];
    assert_eq!(pool.call("pid", json!({})).unwrap(), json!(pid));
    pool.shutdown().unwrap();
}
