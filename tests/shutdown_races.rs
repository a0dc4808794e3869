//! Shutdown under races and slow exits: every `shutdown()` returns only once the pool is
//! down, and a worker that takes its time to exit is given `stop_timeout` before it is forced.
//! (A call still running at the end of `shutdown_timeout` is cut, with `Timeout(Shutdown)`:
//! see `calls_still_running_after_the_grace_period_are_cut` in tests/shutdown.rs.)

mod common;

use std::path::PathBuf;
use std::sync::Barrier;
use std::time::Duration;

use snakepit::PoolBuilder;

/// `size` workers on `slow_exit_adapter`, whose exit takes `exit_seconds` (an atexit sleep).
fn slow_exit(size: usize, exit_seconds: f64) -> PoolBuilder {
    common::builder(size).adapter("slow_exit_adapter").env("SLOW_EXIT_SECONDS", exit_seconds.to_string())
}

/// A fresh folder where workers that finish their exit leave a file named after their pid.
fn marker_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("snakepit-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Whether worker `pid` ran its exit to the end (its atexit handler left a marker).
fn exited_cleanly(dir: &std::path::Path, pid: u32) -> bool {
    dir.join(pid.to_string()).exists()
}

#[test]
fn shutdown_from_two_threads_at_once_returns_in_both_only_once_the_workers_are_gone() {
    // Pins: the second of two concurrent shutdown() calls finds the pool's threads already
    // taken by the first and returns Ok at once, while the workers are still exiting.
    let pool = slow_exit(2, 0.8).build().unwrap();
    let pids = common::worker_pids(&pool);
    let start = Barrier::new(2);
    let outcomes: Vec<_> = std::thread::scope(|s| {
        let callers: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    start.wait();
                    let result = pool.shutdown();
                    // Only the reaping of an exited worker may still be under way: a moment.
                    common::wait_until(Duration::from_millis(200), || {
                        pids.iter().all(|&p| !common::alive(p))
                    });
                    let left: Vec<u32> = pids.iter().copied().filter(|&p| common::alive(p)).collect();
                    (result, left)
                })
            })
            .collect();
        callers.into_iter().map(|c| c.join().unwrap()).collect()
    });
    for (i, (result, left)) in outcomes.iter().enumerate() {
        assert!(left.is_empty(), "shutdown() #{i} returned ({result:?}) while workers {left:?} still ran");
        assert!(result.is_ok(), "shutdown() #{i}: {result:?}");
    }
    common::assert_gone(&pids, Duration::from_secs(5));
}

#[test]
fn idle_workers_that_exit_slowly_are_given_stop_timeout_and_shutdown_succeeds() {
    // Pins (needs the new API: PoolBuilder::stop_timeout): the grace a worker asked to stop gets
    // before SIGTERM is a fixed 1 s today, so idle workers whose exit takes 1.5 s are forced
    // and shutdown() fails with Timeout(Shutdown) although no call was cut.
    let dir = marker_dir("slow-exit-given");
    let pool = slow_exit(2, 1.5)
        .env("SLOW_EXIT_MARKER", dir.to_str().unwrap())
        .stop_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let pids = common::worker_pids(&pool);
    let result = pool.shutdown();
    assert!(result.is_ok(), "{result:?}");
    common::assert_gone(&pids, Duration::from_secs(5));
    for &pid in &pids {
        assert!(exited_cleanly(&dir, pid), "worker {pid} was let finish its exit");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn idle_workers_forced_after_stop_timeout_do_not_fail_a_shutdown_that_cut_no_call() {
    // Pins (needs the new API: PoolBuilder::stop_timeout): forcing an idle worker that is slow
    // to exit is not a failed shutdown; only cutting a call is. Today any forced worker makes
    // shutdown() return Err(Timeout(Shutdown)).
    let dir = marker_dir("slow-exit-forced");
    let pool = slow_exit(2, 3.0)
        .env("SLOW_EXIT_MARKER", dir.to_str().unwrap())
        .stop_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let pids = common::worker_pids(&pool);
    let result = pool.shutdown();
    assert!(result.is_ok(), "no call was cut: {result:?}");
    common::assert_gone(&pids, Duration::from_secs(5));
    for &pid in &pids {
        assert!(!exited_cleanly(&dir, pid), "worker {pid} was forced, not waited for");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
