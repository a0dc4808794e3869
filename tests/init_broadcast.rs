//! Reaching every worker: the init command every worker runs before it is ready (restarts and
//! recycling replacements too), a failing init failing the build, `broadcast` (one result per
//! ready worker) and `call_on` (one named worker).

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use snakepit::{CallOptions, Error, Pool, PoolBuilder};

fn builder(size: usize) -> PoolBuilder {
    common::builder(size).adapter("session_adapter")
}

/// Worker id -> pid, from `stats()`.
fn workers(pool: &Pool) -> HashMap<u64, u32> {
    pool.stats().unwrap().workers.iter().map(|w| (w.id, w.pid)).collect()
}

/// Live processes this test process started for the pool named `pool` (keepers and workers:
/// their command lines name the pool and this process as their parent), even if they were
/// re-parented since.
fn processes_of(pool: &str) -> Vec<u32> {
    let needles = [format!("--pool\0{pool}\0"), format!("--parent-pid\0{}\0", std::process::id())];
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if needles.iter().all(|n| cmdline.contains(n.as_str())) && common::alive(pid) {
            pids.push(pid);
        }
    }
    pids
}

/// Asserts that no process of the pool named `pool` is left, within a bounded wait.
fn assert_none_left(pool: &str) {
    assert!(
        common::wait_until(Duration::from_secs(5), || processes_of(pool).is_empty()),
        "processes of pool {pool} left: {:?}",
        processes_of(pool)
    );
}

/// SIGKILL through the `kill` command, so the tests need no unsafe code.
fn kill_9(pid: u32) {
    let status = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    assert!(status.success(), "kill -9 {pid}");
}

/// Asserts that every ready worker ran the init command itself, in its own process, and
/// returns their pids.
fn assert_all_initialised(pool: &Pool, name: &str) -> Vec<u32> {
    assert!(common::settled(pool));
    let workers = workers(pool);
    let results = pool.broadcast("initialised", json!({}), CallOptions::new()).unwrap();
    assert_eq!(results.len(), workers.len());
    for (id, result) in results {
        let pid = workers[&id];
        assert_eq!(result.unwrap(), json!({"name": name, "pid": pid}), "worker {id} (pid {pid})");
    }
    workers.into_values().collect()
}

#[test]
fn the_init_command_has_run_on_every_worker_including_restarts_and_replacements() {
    let pool = builder(2).init("load", json!({"name": "weights-v1"})).build().unwrap();
    let mut seen = assert_all_initialised(&pool, "weights-v1");

    // A worker killed from outside is restarted, and its replacement runs the init too.
    let victim = seen[0];
    kill_9(victim);
    assert!(common::wait_until(Duration::from_secs(10), || !common::worker_pids(&pool).contains(&victim)));
    seen.extend(assert_all_initialised(&pool, "weights-v1"));

    // So does a recycling replacement.
    let old = pool.stats().unwrap().workers[0].clone();
    pool.recycle_worker(old.id).unwrap();
    assert!(common::wait_until(Duration::from_secs(10), || !common::worker_pids(&pool).contains(&old.pid)));
    seen.extend(assert_all_initialised(&pool, "weights-v1"));

    let stats = pool.stats().unwrap();
    assert_eq!((stats.restarts, stats.recycles.manual), (1, 1));
    let distinct: HashSet<u32> = seen.iter().copied().collect();
    assert_eq!(distinct.len(), 4, "two first workers, a restart, a replacement: {seen:?}");
    pool.shutdown().unwrap();
    common::assert_gone(&seen, Duration::from_secs(5));
}

#[test]
fn a_failing_init_command_fails_the_build_with_its_traceback_and_leaves_no_process() {
    let started = Instant::now();
    let err = builder(2)
        .name("init-fails")
        .init("load", json!({"name": "weights", "fail": true}))
        .build()
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(15), "failed fast, not by time-out");
    match &err {
        Error::Startup { message, error: Some(remote) } => {
            assert!(
                message.contains("init command 'load' failed: RuntimeError: cannot load weights"),
                "{message}"
            );
            assert!(message.contains("session_adapter"), "names the adapter: {message}");
            assert_eq!(remote.error_type, "RuntimeError");
            assert!(remote.traceback.contains("Traceback (most recent call last)"), "{}", remote.traceback);
            assert!(remote.traceback.contains("session_adapter.py"), "{}", remote.traceback);
            assert!(remote.traceback.contains("RuntimeError: cannot load weights"), "{}", remote.traceback);
        }
        other => panic!("expected a start-up error with the Python exception, got {other:?}"),
    }
    // What a program prints says it all: the command, the exception and where it was raised.
    let text = err.to_string();
    for part in ["init command 'load' failed", "cannot load weights", "Traceback", "session_adapter.py"] {
        assert!(text.contains(part), "{part:?} missing from: {text}");
    }
    assert_none_left("init-fails");
}

#[test]
fn an_unknown_init_command_fails_the_build_and_names_the_known_ones() {
    let err = builder(2).name("init-unknown").init("no_such_init", Value::Null).build().unwrap_err();
    match &err {
        Error::Startup { message, error: Some(remote) } => {
            assert!(message.contains("init command 'no_such_init' failed"), "{message}");
            assert_eq!(remote.error_type, "UnknownCommand");
            assert!(remote.message.contains("load") && remote.message.contains("initialised"), "{message}");
        }
        other => panic!("expected a start-up error, got {other:?}"),
    }
    assert!(err.to_string().contains("init command 'no_such_init' failed"), "{err}");
    assert_none_left("init-unknown");
}

#[test]
fn broadcast_runs_once_on_every_ready_worker_at_once() {
    let pool = builder(3).build().unwrap();
    let workers = workers(&pool);
    let results = pool.broadcast("pid", json!({}), CallOptions::new()).unwrap();
    assert_eq!(results.len(), 3);
    let ids: HashSet<u64> = results.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, workers.keys().copied().collect(), "each worker once");
    for (id, result) in &results {
        assert_eq!(result.as_ref().unwrap(), &json!(workers[id]), "worker {id} answered itself");
    }
    // At once, not one after another: three 1 s calls take about 1 s.
    let started = Instant::now();
    let slept = pool.broadcast("sleep", json!({"seconds": 1.0}), CallOptions::new()).unwrap();
    assert!(slept.iter().all(|(_, r)| r.as_ref().unwrap() == &json!(1.0)), "{slept:?}");
    assert!(started.elapsed() < Duration::from_millis(2500), "{:?}", started.elapsed());
    let stats = pool.stats().unwrap();
    assert!(stats.workers.iter().all(|w| w.calls_served == 2), "{:?}", stats.workers);
    pool.shutdown().unwrap();
    common::assert_gone(&workers.into_values().collect::<Vec<_>>(), Duration::from_secs(5));
}

#[test]
fn a_broadcast_that_raises_fails_on_each_worker_and_the_pool_carries_on() {
    let pool = builder(2).build().unwrap();
    let before = workers(&pool);
    let results = pool.broadcast("load", json!({"name": "v2", "fail": true}), CallOptions::new()).unwrap();
    assert_eq!(results.len(), 2);
    for (id, result) in results {
        match result {
            Err(Error::Python(e)) => {
                assert_eq!((e.error_type.as_str(), e.message.as_str()), ("RuntimeError", "cannot load v2"));
                assert_eq!(e.command.as_deref(), Some("load"));
            }
            other => panic!("worker {id}: expected the Python exception, got {other:?}"),
        }
    }
    // An unknown command is refused for each worker, before any runs it.
    let unknown = pool.broadcast("no_such_command", json!({}), CallOptions::new()).unwrap();
    assert_eq!(unknown.len(), 2);
    assert!(unknown.iter().all(|(_, r)| matches!(r, Err(Error::UnknownCommand { .. }))), "{unknown:?}");
    // Nothing was hurt: the same workers serve, and nothing was initialised by the failures.
    assert!(common::settled(&pool));
    assert_eq!(workers(&pool), before);
    let stats = pool.stats().unwrap();
    assert_eq!((stats.crashes, stats.restarts, stats.calls_failed), (0, 0, 4));
    let again = pool.broadcast("initialised", json!({}), CallOptions::new()).unwrap();
    assert!(again.iter().all(|(_, r)| r.as_ref().unwrap() == &json!({})), "{again:?}");
    pool.shutdown().unwrap();
    common::assert_gone(&before.into_values().collect::<Vec<_>>(), Duration::from_secs(5));
}

#[test]
fn call_on_runs_on_the_named_worker_and_an_unknown_one_is_refused() {
    let pool = builder(3).build().unwrap();
    let workers = workers(&pool);
    for _ in 0..3 {
        for (&id, &pid) in &workers {
            assert_eq!(pool.call_on(id, "pid", json!({}), CallOptions::new()).unwrap(), json!(pid));
        }
    }
    match pool.call_on(999, "pid", json!({}), CallOptions::new()) {
        Err(e @ Error::UnknownWorker { worker: 999 }) => assert!(e.to_string().contains("999"), "{e}"),
        other => panic!("expected UnknownWorker, got {other:?}"),
    }
    // A worker that died is unknown from then on; its replacement has a new id.
    let (&gone, &pid) = workers.iter().next().unwrap();
    kill_9(pid);
    assert!(common::wait_until(Duration::from_secs(10), || !common::worker_pids(&pool).contains(&pid)));
    assert!(matches!(
        pool.call_on(gone, "pid", json!({}), CallOptions::new()),
        Err(Error::UnknownWorker { worker }) if worker == gone
    ));
    assert!(common::settled(&pool));
    let now = self::workers(&pool);
    assert!(!now.contains_key(&gone));
    for (&id, &pid) in &now {
        assert_eq!(pool.call_on(id, "pid", json!({}), CallOptions::new()).unwrap(), json!(pid));
    }
    pool.shutdown().unwrap();
    let all: Vec<u32> = workers.values().chain(now.values()).copied().collect();
    common::assert_gone(&all, Duration::from_secs(5));
}
