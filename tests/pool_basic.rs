//! Basic and typed calls, built-ins, bad input, and stats, on real workers.

mod common;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use snakepit::{CallOptions, Error, Pool, WorkerState};

#[test]
fn pool_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Pool>();
}

#[test]
fn calls_return_what_python_returns() {
    let pool = common::builder(2).build().unwrap();
    assert_eq!(pool.call("add", json!({"a": 2, "b": 40})).unwrap(), json!(42));
    assert_eq!(pool.call("add", json!([1, 2])).unwrap(), json!(3), "positional args");
    assert_eq!(pool.call("add", json!({"a": "py", "b": "thon"})).unwrap(), json!("python"));
    let pids = common::worker_pids(&pool);
    pool.shutdown().unwrap();
    common::assert_gone(&pids, Duration::from_secs(5));
}

#[test]
fn typed_calls_use_serde_both_ways() {
    #[derive(Serialize)]
    struct Add {
        a: i64,
        b: i64,
    }
    #[derive(Deserialize, Debug, PartialEq)]
    struct Tagged {
        value: Vec<String>,
        pid: u32,
    }
    let pool = common::builder(1).build().unwrap();
    let sum: i64 = pool.call_as("add", &Add { a: 20, b: 22 }).unwrap();
    assert_eq!(sum, 42);
    let t: Tagged = pool.call_as("tag", &json!({"value": ["a", "b"]})).unwrap();
    assert_eq!(t.value, vec!["a", "b"]);
    assert_eq!(vec![t.pid], common::worker_pids(&pool));
    // A result that does not fit the requested type is a JSON error, not a panic.
    let err = pool.call_as::<_, Vec<u8>>("add", &json!({"a": 1, "b": 2})).unwrap_err();
    assert!(matches!(err, Error::Json(_)), "{err:?}");
    pool.shutdown().unwrap();
}

#[test]
fn built_in_commands_answer() {
    let pool = Pool::builder().size(1).build().unwrap(); // no adapter: built-ins only
    assert_eq!(pool.call("ping", json!(null)).unwrap(), json!("pong"));
    assert_eq!(
        pool.call("echo", json!({"x": [1, 2, {"y": "é"}]})).unwrap(),
        json!({"x": [1, 2, {"y": "é"}]})
    );
    let info = pool.call("info", json!({})).unwrap();
    let pid = common::worker_pids(&pool)[0];
    assert_eq!(info["pid"], json!(pid));
    assert_eq!(info["implementation"], json!("cpython"));
    assert!(info["python_version"].as_str().unwrap().starts_with("3."), "{info}");
    assert_eq!(info["gil_enabled"], json!(true));
    assert!(info["rss_bytes"].as_u64().unwrap() > 1_000_000, "{info}");
    let commands = info["commands"].as_array().unwrap();
    for c in ["echo", "info", "ping"] {
        assert!(commands.contains(&json!(c)), "{info}");
    }
    pool.shutdown().unwrap();
}

#[test]
fn bad_input_gets_typed_errors_and_the_pool_stays_healthy() {
    let pool = common::builder(1).build().unwrap();
    match pool.call("no_such_command", json!({})).unwrap_err() {
        Error::UnknownCommand { command, known } => {
            assert_eq!(command, "no_such_command");
            assert!(known.contains(&"add".to_string()) && known.contains(&"ping".to_string()), "{known:?}");
        }
        other => panic!("expected UnknownCommand, got {other:?}"),
    }
    let err = pool.call("add", json!(5)).unwrap_err();
    assert!(matches!(&err, Error::InvalidArgs(m) if m.contains("a number")), "{err:?}");
    // Wrong arguments for the Python function: Python's own TypeError.
    match pool.call("add", json!({"a": 1})).unwrap_err() {
        Error::Python(e) => assert_eq!(e.error_type, "TypeError"),
        other => panic!("expected a Python TypeError, got {other:?}"),
    }
    let err = pool.call_with("add", json!([1, 2]), CallOptions::new().timeout(Duration::ZERO)).unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err:?}");
    assert_eq!(pool.call("add", json!([1, 2])).unwrap(), json!(3));
    let stats = pool.stats().unwrap();
    assert_eq!(stats.crashes, 0);
    assert_eq!(stats.restarts, 0);
    pool.shutdown().unwrap();
}

#[test]
fn invalid_settings_fail_before_any_process_starts() {
    let err = common::builder(0).build().unwrap_err();
    assert!(matches!(&err, Error::Config { setting, .. } if setting == "size"), "{err:?}");
    let err = common::builder(1).adapter("not a module").build().unwrap_err();
    assert!(matches!(&err, Error::Config { setting, .. } if setting == "adapter"), "{err:?}");
}

#[test]
fn stats_describe_the_pool_and_each_worker() {
    let pool = common::builder(2).name("stats-test").build().unwrap();
    for i in 0..10 {
        pool.call("add", json!({"a": i, "b": 1})).unwrap();
    }
    let _ = pool.call("boom", json!({})).unwrap_err();
    let s = pool.stats().unwrap();
    assert_eq!(s.name, "stats-test");
    assert_eq!((s.size, s.ready_workers, s.degraded), (2, 2, false));
    assert_eq!((s.calls_ok, s.calls_failed), (10, 1));
    assert_eq!(s.queued, 0);
    assert_eq!(s.execution.samples, 11);
    assert_eq!(s.workers.len(), 2);
    assert_eq!(s.workers.iter().map(|w| w.calls_served).sum::<u64>(), 11);
    assert_eq!(s.workers.iter().map(|w| w.errors).sum::<u64>(), 1);
    for w in &s.workers {
        assert_eq!((w.state, w.in_flight, w.capacity), (WorkerState::Ready, 0, 1));
        assert!(w.rss_bytes.unwrap() > 0);
    }
    // The snapshot serialises for dashboards and the CLI.
    let v = serde_json::to_value(&s).unwrap();
    assert_eq!(v["workers"][0]["state"], json!("ready"));
    pool.shutdown().unwrap();
}

#[test]
fn two_pools_run_side_by_side() {
    let a = common::builder(1).name("a").build().unwrap();
    let b = common::builder(1).name("b").build().unwrap();
    let pa = common::worker_pids(&a);
    let pb = common::worker_pids(&b);
    assert_ne!(pa, pb);
    assert_eq!(a.call("pid", json!({})).unwrap(), json!(pa[0]));
    assert_eq!(b.call("pid", json!({})).unwrap(), json!(pb[0]));
    drop(a);
    common::assert_gone(&pa, Duration::from_secs(5));
    assert_eq!(b.call("add", json!([1, 1])).unwrap(), json!(2));
    drop(b);
    common::assert_gone(&pb, Duration::from_secs(5));
}
