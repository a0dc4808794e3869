//! Which Python interpreter the workers run: discovery, resolution to the real executable, and
//! [`inspect`]: its version, whether it is free-threaded and the GIL is on, the profile that
//! fits it, and how the libraries installed in it behave under threads.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;

use crate::compat::{ThreadSafety, TABLE};
use crate::config::Profile;
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

/// What [`inspect`] found out about an interpreter.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct PythonInfo {
    /// The real executable (`sys.executable`).
    pub executable: PathBuf,
    /// The version, e.g. `3.11.7`.
    pub version: String,
    /// `sys.implementation.name`, e.g. `cpython`.
    pub implementation: String,
    /// Whether the build is free-threaded (`Py_GIL_DISABLED`, 3.13t and later).
    pub free_threaded: bool,
    /// Whether the GIL is enabled right now (`sys._is_gil_enabled()`; always on in a GIL build).
    pub gil_enabled: bool,
    /// The profile that fits this interpreter best for Python code in general.
    pub recommended_profile: Profile,
    /// Why, and when to choose otherwise.
    pub reason: String,
    /// The libraries of the compatibility table that are installed, with their thread-safety.
    pub libraries: Vec<Library>,
}

/// One installed library and how it behaves under threads.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct Library {
    /// Its name.
    pub name: String,
    /// Its installed version (`stdlib` for the standard library).
    pub version: String,
    /// Whether it is safe to share between threads.
    pub safety: ThreadSafety,
    /// What to know.
    pub note: String,
}

/// The script [`inspect`] runs: facts about the interpreter and the versions of the given
/// distributions, read from their metadata without importing them.
const INSPECT: &str = r#"
import json, sys
try:
    from importlib import metadata
except ImportError:
    metadata = None
def version(dist):
    try:
        return metadata.version(dist) if metadata else None
    except Exception:
        return None
free = False
if sys.version_info >= (3, 13):
    import sysconfig
    free = sysconfig.get_config_var("Py_GIL_DISABLED") == 1
gil = getattr(sys, "_is_gil_enabled", None)
v = sys.version_info
print(json.dumps({
    "executable": sys.executable,
    "version": "%d.%d.%d" % (v.major, v.minor, v.micro),
    "implementation": sys.implementation.name,
    "free_threaded": bool(free),
    "gil_enabled": bool(gil()) if gil else True,
    "installed": {d: version(d) for d in sys.argv[1:]},
}))
"#;

/// Inspects an interpreter (found as for a pool: `python`, else `$SNAKEPIT_PYTHON`, else
/// `python3`): version, free-threading, the GIL, the recommended [`Profile`] with its reason,
/// and which libraries of the compatibility table are installed (read from their metadata,
/// without importing them).
pub fn inspect(python: Option<&Path>) -> Result<PythonInfo> {
    let interp = resolve(python)?;
    let dists: Vec<&std::ffi::OsStr> =
        TABLE.iter().flat_map(|e| e.distributions.iter()).map(std::ffi::OsStr::new).collect();
    let out = run_script(&interp.executable, INSPECT, &dists, RESOLVE_TIMEOUT).map_err(|why| {
        Error::PythonNotFound { searched: vec![format!("{}: {why}", interp.executable.display())] }
    })?;
    parse_inspection(&out)
}

/// Turns the inspection script's output into a [`PythonInfo`]. Pure, so the branches for
/// interpreters this machine does not have are tested with recorded answers.
pub(crate) fn parse_inspection(out: &str) -> Result<PythonInfo> {
    #[derive(serde::Deserialize)]
    struct Raw {
        executable: PathBuf,
        version: String,
        implementation: String,
        free_threaded: bool,
        gil_enabled: bool,
        installed: HashMap<String, Option<String>>,
    }
    let raw: Raw = serde_json::from_str(out.trim())
        .map_err(|e| Error::Protocol(format!("unexpected answer from the interpreter inspection: {e}")))?;
    let (recommended_profile, reason) = recommend(raw.free_threaded, raw.gil_enabled);
    let libraries = TABLE
        .iter()
        .filter_map(|e| {
            let version = if e.distributions.is_empty() {
                Some("stdlib".to_string())
            } else {
                e.distributions.iter().find_map(|d| raw.installed.get(*d).cloned().flatten())
            }?;
            Some(Library { name: e.name.to_string(), version, safety: e.safety, note: e.note.to_string() })
        })
        .collect();
    Ok(PythonInfo {
        executable: raw.executable,
        version: raw.version,
        implementation: raw.implementation,
        free_threaded: raw.free_threaded,
        gil_enabled: raw.gil_enabled,
        recommended_profile,
        reason: reason.to_string(),
        libraries,
    })
}

/// The profile that fits an interpreter, and why.
pub(crate) fn recommend(free_threaded: bool, gil_enabled: bool) -> (Profile, &'static str) {
    match (free_threaded, gil_enabled) {
        (true, false) => (
            Profile::Thread,
            "free-threaded build with the GIL off: threads run Python in parallel, so one process \
             with many threads serves CPU-bound and I/O-bound commands and saves the memory of many \
             processes (commands must be thread-safe)",
        ),
        (true, true) => (
            Profile::Process,
            "free-threaded build, but the GIL is on (an extension module turned it back on): use the \
             process profile for CPU-bound commands, the thread profile only for I/O-bound ones",
        ),
        _ => (
            Profile::Process,
            "the GIL lets one thread run Python at a time: use the process profile for CPU-bound \
             commands; the thread profile suits I/O-bound ones (HTTP, databases, model servers)",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recommendations_follow_the_gil() {
        assert_eq!(recommend(false, true).0, Profile::Process);
        assert_eq!(recommend(true, false).0, Profile::Thread);
        assert_eq!(recommend(true, true).0, Profile::Process);
        assert!(recommend(true, true).1.contains("turned it back on"));
    }

    #[test]
    fn a_recorded_free_threaded_answer() {
        let out = r#"{"executable": "/usr/bin/python3.13t", "version": "3.13.1", "implementation": "cpython",
            "free_threaded": true, "gil_enabled": false,
            "installed": {"numpy": "2.1.0", "pandas": "2.2.2", "Pillow": "11.0.0", "torch": null}}"#;
        let info = parse_inspection(out).unwrap();
        assert_eq!((info.free_threaded, info.gil_enabled), (true, false));
        assert_eq!(info.recommended_profile, Profile::Thread);
        let libs: Vec<(&str, &str, ThreadSafety)> =
            info.libraries.iter().map(|l| (l.name.as_str(), l.version.as_str(), l.safety)).collect();
        assert_eq!(
            libs,
            vec![
                ("numpy", "2.1.0", ThreadSafety::Safe),
                ("pillow", "11.0.0", ThreadSafety::Conditional),
                ("pandas", "2.2.2", ThreadSafety::NotSafe),
                ("sqlite3", "stdlib", ThreadSafety::NotSafe),
            ]
        );
        assert!(parse_inspection("not json").is_err());
    }

    #[test]
    fn this_machines_python_is_a_gil_build() {
        let info = inspect(Some(Path::new("python3"))).unwrap();
        assert!(info.version.starts_with("3."), "{}", info.version);
        assert_eq!(info.implementation, "cpython");
        assert_eq!((info.free_threaded, info.gil_enabled), (false, true));
        assert_eq!(info.recommended_profile, Profile::Process);
        assert!(info.executable.is_absolute());
        // sqlite3 ships with the standard library.
        assert!(info.libraries.iter().any(|l| l.name == "sqlite3" && l.version == "stdlib"));
    }

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
