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

/// The parent of `pid` (for a worker, its keeper: the process the pool started); `None` once
/// it is gone.
pub fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')').next()?.split_whitespace().nth(1)?.parse().ok()
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

/// A small deterministic generator (xorshift64*), so every run draws the same values.
pub struct Draw(pub u64);

impl Draw {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A duration between `lo` and `hi` microseconds.
    pub fn micros(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_micros(lo + self.next() % (hi - lo + 1))
    }
}

/// The example `name`, built next to this test's binary (`target/<profile>/examples/<name>`).
/// `cargo test` builds the examples before the tests, but `cargo test --test <file>` does not,
/// so it is built here first (which does nothing when it is up to date). Bounded by `timeout`.
pub fn example_binary(name: &str, timeout: Duration) -> PathBuf {
    use std::path::Path;
    use std::process::{Command, Stdio};
    let exe = std::env::current_exe().expect("the test's own path");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>");
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev".to_string(),
        Some(other) => other.to_string(),
    };
    let mut build = Command::new(env!("CARGO"));
    build
        .args(["build", "--quiet", "--example", name, "--profile", &profile])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    if let Some(target_dir) = profile_dir.parent() {
        build.env("CARGO_TARGET_DIR", target_dir);
    }
    let mut child = build.spawn().expect("cargo runs");
    let mut status = None;
    wait_until(timeout, || {
        status = child.try_wait().expect("cargo can be waited for");
        status.is_some()
    });
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("building the example {name} took more than {timeout:?}");
    };
    assert!(status.success(), "building the example {name} failed: {status}");
    profile_dir.join("examples").join(name)
}
pub mod numpy_env;
