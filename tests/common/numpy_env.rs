//! A Python with numpy, for the tests and the bench that need one: a virtual environment made
//! once under the target folder (`target/tmp/numpy-venv`) and reused. numpy is never a
//! dependency of the package; only these tests and the bench install it.
//!
//! Shared by `tests/` (through `common`) and `examples/bench.rs` (by path).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One thread of a process makes the environment; the others (tests run in parallel) wait for
/// it and then use it. (Processes each make their own and the first rename wins.)
static MAKING: Mutex<()> = Mutex::new(());

/// How a numpy environment could not be had.
#[derive(Debug)]
pub enum NoNumpy {
    /// No package index could be reached: the caller may skip, loudly.
    Offline(String),
    /// Anything else: a real failure.
    Failed(String),
}

/// The folder the environment lives in.
fn home() -> PathBuf {
    match option_env!("CARGO_TARGET_TMPDIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target").join("tmp"),
    }
    .join("numpy-venv")
}

/// The environment's interpreter, making the environment first if need be (which takes a
/// download of numpy, under a minute on this machine class; bounded by five minutes).
pub fn numpy_python() -> Result<PathBuf, NoNumpy> {
    let _one_at_a_time = MAKING.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let home = home();
    let python = home.join("bin").join("python");
    if has_numpy(&python) {
        return Ok(python);
    }
    // Made in a folder of its own and renamed into place whole, so that test binaries running
    // at once never see (or use) a half-made one.
    let parent = home.parent().expect("a parent folder");
    std::fs::create_dir_all(parent)
        .map_err(|e| NoNumpy::Failed(format!("creating {}: {e}", parent.display())))?;
    let making = parent.join(format!("numpy-venv.making-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&making);
    let base = std::env::var("SNAKEPIT_PYTHON").unwrap_or_else(|_| "python3".into());
    let venv = run(Command::new(&base).arg("-m").arg("venv").arg(&making), Duration::from_secs(120))?;
    if !venv.status.success() {
        return Err(NoNumpy::Failed(format!(
            "{base} -m venv failed: {}",
            String::from_utf8_lossy(&venv.stderr)
        )));
    }
    let made = making.join("bin").join("python");
    let pip = run(
        Command::new(&made).args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-input",
            "--quiet",
            "--timeout",
            "30",
            "--retries",
            "2",
            "numpy",
        ]),
        Duration::from_secs(300),
    )?;
    if !pip.status.success() {
        let _ = std::fs::remove_dir_all(&making);
        let text = String::from_utf8_lossy(&pip.stderr).into_owned();
        let offline = [
            "NewConnectionError",
            "Temporary failure in name resolution",
            "Network is unreachable",
            "Connection refused",
            "ConnectTimeout",
            "ReadTimeout",
            "No matching distribution found",
            "Could not find a version",
        ];
        return Err(if offline.iter().any(|o| text.contains(o)) {
            NoNumpy::Offline(text)
        } else {
            NoNumpy::Failed(format!("pip install numpy failed: {text}"))
        });
    }
    match std::fs::rename(&making, &home) {
        Ok(()) => {}
        // Another test binary got there first: use its environment.
        Err(_) if has_numpy(&python) => {
            let _ = std::fs::remove_dir_all(&making);
        }
        Err(e) => return Err(NoNumpy::Failed(format!("renaming the environment into place: {e}"))),
    }
    if has_numpy(&python) {
        Ok(python)
    } else {
        Err(NoNumpy::Failed(format!("{} cannot import numpy after installing it", python.display())))
    }
}

/// [`numpy_python`] for a test: the interpreter, or `None` after a loud message when no package
/// index can be reached; any other failure fails the test.
pub fn numpy_python_or_skip(test: &str) -> Option<PathBuf> {
    match numpy_python() {
        Ok(python) => Some(python),
        Err(NoNumpy::Offline(why)) => {
            eprintln!(
                "\n**********\nSKIPPED {test}: numpy could not be installed because no package index \
                 can be reached:\n{why}\n**********\n"
            );
            None
        }
        Err(NoNumpy::Failed(why)) => panic!("{test}: could not make a Python with numpy: {why}"),
    }
}

fn has_numpy(python: &Path) -> bool {
    python.exists()
        && Command::new(python)
            .args(["-c", "import numpy"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

/// Runs `cmd` to its end, killing it after `limit`. Its output goes to a file (a pipe nobody
/// reads while it runs could fill and stall it).
fn run(cmd: &mut Command, limit: Duration) -> Result<Output, NoNumpy> {
    let log = home().with_extension(format!("log-{}", std::process::id()));
    let file = std::fs::File::create(&log)
        .map_err(|e| NoNumpy::Failed(format!("creating {}: {e}", log.display())))?;
    let err = file.try_clone().map_err(|e| NoNumpy::Failed(e.to_string()))?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .spawn()
        .map_err(|e| NoNumpy::Failed(format!("starting {cmd:?}: {e}")))?;
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(NoNumpy::Failed(format!("{cmd:?} took longer than {limit:?}")));
            }
        }
    };
    let text = std::fs::read(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    Ok(Output { status, stdout: Vec::new(), stderr: text })
}
