//! The soak test, short: runs the `soak` example (`examples/soak.rs`, where the checks live) with
//! 20,000 calls and fault rates raised so that every fault happens in every phase, and asserts
//! that it found no mismatched outcome and no leak. The long run is
//! `cargo run --release --example soak` (1,000,000 calls).
//!
//! The example runs as its own process so that its census of file descriptors, threads and
//! child processes sees only its own pools, not the test harness. Every wait is bounded: the
//! example's watchdog ends it after `--budget-secs`, and this test kills it a little later.

mod common;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The example's own time budget (its watchdog exits with code 3 after it).
const BUDGET_SECS: u64 = 150;
/// How long this test waits for the example before killing it.
const RUN_TIMEOUT: Duration = Duration::from_secs(BUDGET_SECS + 30);
/// How long the nested build of the example may take.
const BUILD_TIMEOUT: Duration = Duration::from_secs(600);

#[test]
fn a_short_soak_finds_no_mismatch_and_no_leak() {
    let binary = soak_binary();
    let args = [
        "--calls",
        "20000",
        "--threads",
        "8",
        "--crash-ppm",
        "1000",
        "--hang-ppm",
        "1000",
        "--budget-secs",
        &BUDGET_SECS.to_string(),
        "--progress-secs",
        "5",
    ]
    .map(String::from);
    let child = Command::new(&binary)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the soak example starts");
    let out = Finished::wait(child, RUN_TIMEOUT);
    // Shown when the test fails, or with `--nocapture`.
    println!("{}", out.stdout);
    eprintln!("{}", out.stderr);
    assert_eq!(out.code, Some(0), "the soak failed:\n{out:?}");

    let line = out.stdout.lines().find_map(|l| l.strip_prefix("soak-json: ")).expect("a soak-json line");
    let summary: Value = serde_json::from_str(line).expect("soak-json is JSON");
    assert_eq!(summary["pass"], true, "{out:?}");
    assert_eq!(summary["calls"], 20000, "{out:?}");
    assert_eq!(summary["mismatches"], 0, "{out:?}");
    assert_eq!(summary["misdelivered"], 0, "{out:?}");
    let phases = summary["phases"].as_array().expect("phases");
    assert_eq!(phases.len(), 3, "{out:?}");
    let mut recycles = 0;
    for p in phases {
        let name = &p["phase"];
        assert_eq!(p["failures"], Value::Array(vec![]), "{name}: {out:?}");
        assert_eq!(p["shutdown_ok"], true, "{name}: {out:?}");
        assert_eq!(p["census_after"], p["census_before"], "{name}: leaked: {out:?}");
        assert_eq!(p["workers_alive"], 0, "{name}: {out:?}");
        // The plan is deterministic (a fixed seed): every phase plans crashes and hangs.
        assert!(p["planned"]["crash"].as_u64() > Some(0), "{name}: no crash planned: {out:?}");
        assert!(p["planned"]["hang"].as_u64() > Some(0), "{name}: no hang planned: {out:?}");
        assert!(p["planned"]["race"].as_u64() > Some(0), "{name}: no deadline race planned: {out:?}");
        recycles += p["stats"]["recycles_max_requests"].as_u64().unwrap_or(0);
    }
    assert!(recycles > 0, "no worker was recycled by max_requests: {out:?}");
}

/// The soak example, built first if need be.
fn soak_binary() -> PathBuf {
    common::example_binary("soak", BUILD_TIMEOUT)
}

/// How a child process ended, with everything it wrote.
struct Finished {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl std::fmt::Debug for Finished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit code {:?}\n--- stdout\n{}\n--- stderr\n{}", self.code, self.stdout, self.stderr)
    }
}

impl Finished {
    /// Waits for `child`, its output read by threads so that it never blocks on a full pipe;
    /// kills it (and reports a timed-out run, code `None`) after `timeout`.
    fn wait(mut child: Child, timeout: Duration) -> Finished {
        fn drain(mut r: impl Read + Send + 'static) -> JoinHandle<String> {
            std::thread::spawn(move || {
                let mut bytes = Vec::new();
                let _ = r.read_to_end(&mut bytes);
                String::from_utf8_lossy(&bytes).into_owned()
            })
        }
        let stdout = drain(child.stdout.take().expect("piped stdout"));
        let stderr = drain(child.stderr.take().expect("piped stderr"));
        let end = Instant::now() + timeout;
        let code = loop {
            match child.try_wait().expect("try_wait") {
                Some(status) => break status.code(),
                None if Instant::now() >= end => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
                None => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        // The pipes close when the process (and any worker holding them) is gone; a worker
        // outliving a killed run would hold them, so the reads are bounded too.
        let read = |h: JoinHandle<String>| {
            let end = Instant::now() + Duration::from_secs(10);
            while !h.is_finished() && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(20));
            }
            if h.is_finished() {
                h.join().unwrap_or_default()
            } else {
                "<output still open 10 s after the process ended>".to_string()
            }
        };
        let mut out = Finished { code, stdout: read(stdout), stderr: read(stderr) };
        if code.is_none() {
            out.stderr.push_str(&format!("\n<killed after {timeout:?}>"));
        }
        out
    }
}
