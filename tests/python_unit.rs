//! Runs the Python package's own unit tests (`python3 -m unittest`) as part of `cargo test`.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

#[allow(dead_code)]
#[path = "common/numpy_env.rs"]
mod numpy_env;

#[test]
fn python_unit_tests_pass() {
    let python = std::env::var("SNAKEPIT_PYTHON").unwrap_or_else(|_| "python3".to_string());
    run_unit_tests(&python);
}

#[test]
fn python_unit_tests_pass_on_the_oldest_python_supported() {
    // The README promises Python 3.8 or later; the keeper once used a 3.9 function.
    let Some(python) = python38() else {
        eprintln!(
            "SKIPPED: no Python 3.8 found (python3.8 on PATH, or under pyenv's versions), so the \
             unit tests ran only on the default python3"
        );
        return;
    };
    run_unit_tests(&python);
}

#[test]
fn python_unit_tests_pass_with_numpy_installed() {
    // The array tests that need numpy skip without it; here they run.
    let Some(python) = numpy_env::numpy_python_or_skip("python_unit_tests_pass_with_numpy_installed") else {
        return;
    };
    run_unit_tests(&python.to_string_lossy());
}

/// A Python 3.8: `python3.8` on `PATH`, else one that pyenv installed.
fn python38() -> Option<String> {
    let is_38 = |python: &str| {
        Command::new(python)
            .args(["-c", "import sys; assert sys.version_info[:2] == (3, 8)"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if is_38("python3.8") {
        return Some("python3.8".into());
    }
    let root = std::env::var_os("PYENV_ROOT")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".pyenv")))?;
    let mut versions: Vec<PathBuf> = std::fs::read_dir(root.join("versions"))
        .ok()?
        .flatten()
        .filter(|v| v.file_name().to_string_lossy().starts_with("3.8."))
        .map(|v| v.path().join("bin").join("python3.8"))
        .collect();
    versions.sort();
    versions.into_iter().map(|p| p.to_string_lossy().into_owned()).find(|p| is_38(p))
}

fn run_unit_tests(python: &str) {
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
    assert!(out.status.success(), "python unit tests failed on {python}:\n{stderr}");
    // unittest prints "Ran N tests"; make sure it found some.
    let ran = stderr.lines().find_map(|l| l.strip_prefix("Ran ")).unwrap_or("0");
    let n: usize = ran.split_whitespace().next().unwrap_or("0").parse().unwrap_or(0);
    assert!(n >= 20, "only {n} python tests ran:\n{stderr}");
}
