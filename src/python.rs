//! Which Python interpreter the workers run: discovery and resolution to the real executable.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::error::{Error, Result};

/// The environment variable naming the interpreter when the builder does not.
pub const PYTHON_ENV: &str = "SNAKEPIT_PYTHON";

/// How long resolving one interpreter may take (a cold pyenv shim takes ~100 ms).
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(20);

/// A resolved interpreter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Interpreter {
    /// The real executable (`sys.executable`).
    pub(crate) executable: PathBuf,
    /// `sys.implementation.cache_tag`, e.g. `cpython-311`: names its bytecode files.
    pub(crate) cache_tag: String,
}

/// Finds the interpreter: `requested`, else `$SNAKEPIT_PYTHON`, else `python3` on `PATH`, and
/// resolves it once per process to `sys.executable`, so that a shim script (pyenv's costs ~47
/// ms) is not paid at every worker start.
pub(crate) fn resolve(requested: Option<&Path>) -> Result<Interpreter> {
    let (candidate, origin) = match requested {
        Some(p) => (p.to_path_buf(), "the builder's python setting"),
        None => match std::env::var_os(PYTHON_ENV) {
            Some(p) if !p.is_empty() => (PathBuf::from(p), "$SNAKEPIT_PYTHON"),
            _ => (PathBuf::from("python3"), "python3 on PATH"),
        },
    };
    static CACHE: OnceLock<Mutex<HashMap<PathBuf, Interpreter>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(real) = cache.lock().get(&candidate) {
        return Ok(real.clone());
    }
    let real = ask_executable(&candidate).map_err(|why| Error::PythonNotFound {
        searched: vec![format!("{} ({origin}): {why}", candidate.display())],
    })?;
    log::debug!("python {} resolved to {}", candidate.display(), real.executable.display());
    cache.lock().insert(candidate, real.clone());
    Ok(real)
}

/// Runs the interpreter once to ask for `sys.executable`, bounded by [`RESOLVE_TIMEOUT`].
fn ask_executable(python: &Path) -> std::result::Result<Interpreter, String> {
    let script =
        "import sys; sys.stdout.write((sys.executable or '') + '\\n' + (sys.implementation.cache_tag or ''))";
    let out = run_script(python, script, &[], RESOLVE_TIMEOUT)?;
    let mut lines = out.lines();
    let executable = lines.next().unwrap_or("").trim();
    let cache_tag = lines.next().unwrap_or("").trim().to_string();
    let executable = if executable.is_empty() { python.to_path_buf() } else { PathBuf::from(executable) };
    Ok(Interpreter { executable, cache_tag })
}

/// Runs `python -c script args...` with no stdin and returns its stdout, or why it failed
/// (including not finishing within `timeout`, when it is killed). Output must be small: it is
/// read once the process has exited.
pub(crate) fn run_script(
    python: &Path,
    script: &str,
    args: &[&std::ffi::OsStr],
    timeout: Duration,
) -> std::result::Result<String, String> {
    let mut child = Command::new(python)
        .arg("-c")
        .arg(script)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait().map_err(|e| e.to_string())? {
            Some(status) => break status,
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("no answer within {timeout:?}"));
            }
            None => std::thread::sleep(Duration::from_millis(2)),
        }
    };
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut s) = child.stdout.take() {
        let _ = s.read_to_string(&mut out);
    }
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_string(&mut err);
    }
    if !status.success() {
        let last = err.lines().last().unwrap_or("").trim().to_string();
        return Err(format!("exited with {status}: {last}"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_interpreter_says_what_was_searched() {
        let err = resolve(Some(Path::new("/nonexistent/python9"))).unwrap_err();
        match &err {
            Error::PythonNotFound { searched } => {
                assert!(searched[0].contains("/nonexistent/python9"), "{searched:?}");
                assert!(searched[0].contains("builder"), "{searched:?}");
            }
            other => panic!("expected PythonNotFound, got {other:?}"),
        }
    }

    #[test]
    fn a_program_that_is_not_python_is_refused() {
        let err = resolve(Some(Path::new("false"))).unwrap_err();
        assert!(matches!(err, Error::PythonNotFound { .. }), "{err:?}");
    }

    #[test]
    fn python3_resolves_to_a_real_file_and_is_cached() {
        let real = resolve(Some(Path::new("python3"))).unwrap();
        let exe = &real.executable;
        assert!(exe.is_absolute() && exe.is_file(), "{}", exe.display());
        assert!(real.cache_tag.starts_with("cpython-3"), "{}", real.cache_tag);
        assert_eq!(resolve(Some(Path::new("python3"))).unwrap(), real);
    }
}
