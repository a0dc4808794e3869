//! Helpers shared by the integration tests. Every wait here is bounded.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use snakepit::{Pool, PoolBuilder};

/// The folder holding the test adapters.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures")
}

/// A builder for `size` workers on `basic_adapter`, with start-up bounded for tests.
pub fn builder(size: usize) -> PoolBuilder {
    Pool::builder()
        .size(size)
        .python_path(fixtures())
        .adapter("basic_adapter")
        .startup_timeout(Duration::from_secs(20))
}

/// A one-worker pool on `flaky_adapter`, which fails to import while `flag` exists, with a
/// short restart backoff.
pub fn flaky_builder(flag: &std::path::Path, backoff: (Duration, Duration)) -> PoolBuilder {
    Pool::builder()
        .size(1)
        .python_path(fixtures())
        .adapter("flaky_adapter")
        .env("FLAKY_FLAG", flag.to_str().unwrap())
        .restart_backoff(backoff.0, backoff.1)
}

/// The pids of the pool's live workers.
pub fn worker_pids(pool: &Pool) -> Vec<u32> {
    pool.stats().expect("stats").workers.iter().map(|w| w.pid).collect()
}

/// Whether `pid` is a live (not reaped) snakepit worker or one of its children.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // A zombie has exited; only its parent's reaping is missing.
        Ok(stat) => !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
        Err(_) => false,
    }
}

/// Polls `cond` every 10 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Asserts that every pid has exited within `timeout`.
pub fn assert_gone(pids: &[u32], timeout: Duration) {
    assert!(!pids.is_empty(), "no pids to check");
    let ok = wait_until(timeout, || pids.iter().all(|&p| !alive(p)));
    let left: Vec<u32> = pids.iter().copied().filter(|&p| alive(p)).collect();
    assert!(ok, "processes still running after {timeout:?}: {left:?}");
}

/// Waits until the pool has exactly its size in workers, all ready: nothing starting,
/// draining or still being reaped.
pub fn settled(pool: &Pool) -> bool {
    wait_until(Duration::from_secs(20), || {
        let s = pool.stats().unwrap();
        s.workers.len() == s.size && s.workers.iter().all(|w| w.state == snakepit::WorkerState::Ready)
    })
}
