//! Runs the Python package's own unit tests (`python3 -m unittest`) as part of `cargo test`.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn python_unit_tests_pass() {
    let python = std::env::var("SNAKEPIT_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python");
    let mut child = Command::new(python)
        .args(["-m", "unittest", "discover", "-s", ".", "-t", ".", "-p", "test_*.py"])
        .current_dir(&dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("python unit tests took longer than 120 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "python unit tests failed:\n{stderr}");
    // unittest prints "Ran N tests"; make sure it found some.
    let ran = stderr.lines().find_map(|l| l.strip_prefix("Ran ")).unwrap_or("0");
    let n: usize = ran.split_whitespace().next().unwrap_or("0").parse().unwrap_or(0);
    assert!(n >= 20, "only {n} python tests ran:\n{stderr}");
}
