//! Start-up failures are fast, clear, and leave no process behind.

mod common;

use std::time::{Duration, Instant};

use serde_json::json;
use snakepit::{Error, Pool, TimeoutKind};

/// Pids of live workers of the pool named `pool` that are children of this test process
/// (tests in this file run in parallel, so each uses its own pool name).
fn my_workers(pool: &str) -> Vec<u32> {
    let me = std::process::id().to_string();
    let needle = format!("--pool\0{pool}\0");
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
        let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if fields.get(1) == Some(&me.as_str()) && cmdline.contains(&needle) && common::alive(pid) {
            pids.push(pid);
        }
    }
    pids
}

#[test]
fn an_adapter_that_fails_to_import_fails_the_build_with_its_traceback() {
    let started = Instant::now();
    let err = common::builder(3).name("broken").adapter("broken_adapter").build().unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(15), "failed fast, not by time-out");
    match &err {
        Error::Startup { message, error: Some(remote) } => {
            assert!(message.contains("broken_adapter"), "{message}");
            assert_eq!(remote.error_type, "RuntimeError");
            assert!(remote.traceback.contains("refuses to load"), "{}", remote.traceback);
        }
        other => panic!("expected a start-up error, got {other:?}"),
    }
    assert!(err.to_string().contains("broken_adapter"), "{err}");
    assert!(
        common::wait_until(Duration::from_secs(5), || my_workers("broken").is_empty()),
        "{:?}",
        my_workers("broken")
    );
}

#[test]
fn a_missing_adapter_module_is_named() {
    let err = common::builder(2).name("missing").adapter("no_such_adapter_module").build().unwrap_err();
    match &err {
        Error::Startup { message, error: Some(remote) } => {
            assert!(message.contains("no_such_adapter_module"), "{message}");
            // Which interpreter could not import it (a venv's python, or the system's?).
            let python = std::process::Command::new("python3")
                .args(["-c", "import sys; print(sys.executable, end='')"])
                .output()
                .unwrap()
                .stdout;
            let python = String::from_utf8(python).unwrap();
            assert!(message.contains(&format!("(python {python})")), "{message} should name {python}");
            assert_eq!(remote.error_type, "ModuleNotFoundError");
        }
        other => panic!("expected a start-up error, got {other:?}"),
    }
    assert!(common::wait_until(Duration::from_secs(5), || my_workers("missing").is_empty()));
}

#[test]
fn a_missing_interpreter_says_what_was_searched() {
    let err = Pool::builder().size(1).python("/no/such/python3").build().unwrap_err();
    match &err {
        Error::PythonNotFound { searched } => {
            assert!(searched[0].contains("/no/such/python3"), "{searched:?}")
        }
        other => panic!("expected PythonNotFound, got {other:?}"),
    }
}

#[test]
fn a_worker_that_never_gets_ready_times_out_the_build() {
    let started = Instant::now();
    let err = common::builder(2)
        .name("slow")
        .adapter("slow_import_adapter")
        .startup_timeout(Duration::from_millis(500))
        .build()
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { kind: TimeoutKind::Startup, .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        common::wait_until(Duration::from_secs(5), || my_workers("slow").is_empty()),
        "{:?}",
        my_workers("slow")
    );
}

#[test]
fn the_process_scan_above_does_see_live_workers() {
    // Guards the checks above against passing because the scan finds nothing at all.
    let pool = common::builder(2).name("probe").build().unwrap();
    let mut seen = my_workers("probe");
    // The processes this test started are the workers' keepers, their parents.
    let mut pids: Vec<u32> =
        common::worker_pids(&pool).into_iter().map(|w| common::parent_of(w).unwrap()).collect();
    seen.sort();
    pids.sort();
    assert_eq!(seen, pids);
    pool.shutdown().unwrap();
    assert!(my_workers("probe").is_empty());
}

#[test]
fn text_the_interpreter_prints_to_stdout_before_the_worker_starts_is_skipped() {
    // A sitecustomize module on the path prints at interpreter start-up, before the worker
    // takes stdout over. It used to be read as a frame header ("frame too large").
    let pool = common::builder(2).python_path(common::fixtures().join("noisy_site")).build().unwrap();
    let pids = common::worker_pids(&pool);
    for i in 0..5 {
        assert_eq!(pool.call("add", json!([i, 1])).unwrap(), json!(i + 1));
    }
    pool.shutdown().unwrap();
    common::assert_gone(&pids, Duration::from_secs(5));
}
