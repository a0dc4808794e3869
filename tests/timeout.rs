//! Deadlines: a hung call is cut and its worker replaced; queue time-outs; a full queue.

mod common;

use std::time::{Duration, Instant};

use serde_json::json;
use snakepit::{CallOptions, Error, TimeoutKind};

#[test]
fn a_hung_call_times_out_and_the_pool_regains_full_capacity() {
    let pool = common::builder(2).build().unwrap();
    let before = common::worker_pids(&pool);
    let started = Instant::now();
    let err = pool
        .call_with(
            "deaf_sleep",
            json!({"seconds": 30}),
            CallOptions::new().timeout(Duration::from_millis(300)),
        )
        .unwrap_err();
    let waited = started.elapsed();
    assert!(matches!(err, Error::Timeout { kind: TimeoutKind::Call, .. }), "{err:?}");
    assert!(waited >= Duration::from_millis(300), "returned before its deadline: {waited:?}");
    assert!(waited < Duration::from_secs(5), "waited far past its deadline: {waited:?}");
    // Its command ignored every step of the cancel that followed its deadline, so the worker
    // running it was killed and replaced (and reaped: `settled`).
    let replaced = || common::worker_pids(&pool).iter().any(|p| !before.contains(p));
    assert!(common::wait_until(Duration::from_secs(10), replaced), "a replacement started");
    assert!(common::settled(&pool));
    let after = common::worker_pids(&pool);
    let killed: Vec<u32> = before.iter().copied().filter(|p| !after.contains(p)).collect();
    assert_eq!(killed.len(), 1, "exactly one worker replaced: {before:?} -> {after:?}");
    common::assert_gone(&killed, Duration::from_secs(5));
    // Full capacity again: two calls run at once on two different workers.
    std::thread::scope(|s| {
        let a = s.spawn(|| pool.call("tag", json!({"value": 1, "delay": 0.3})).unwrap());
        let b = s.spawn(|| pool.call("tag", json!({"value": 2, "delay": 0.3})).unwrap());
        let (a, b) = (a.join().unwrap(), b.join().unwrap());
        assert_ne!(a["pid"], b["pid"]);
    });
    assert_eq!(pool.stats().unwrap().timeouts, 1);
    pool.shutdown().unwrap();
    common::assert_gone(&after, Duration::from_secs(5));
}

#[test]
fn a_call_that_waits_too_long_in_the_queue_gets_a_queue_timeout() {
    let pool = common::builder(1).queue_timeout(Duration::from_millis(200)).build().unwrap();
    std::thread::scope(|s| {
        let busy = s.spawn(|| pool.call("sleep", json!({"seconds": 1.0})));
        assert!(
            common::wait_until(Duration::from_secs(5), || pool.stats().unwrap().workers[0].in_flight == 1)
        );
        let started = Instant::now();
        let err = pool.call("add", json!([1, 2])).unwrap_err();
        assert!(matches!(err, Error::Timeout { kind: TimeoutKind::Queue, .. }), "{err:?}");
        assert!(started.elapsed() >= Duration::from_millis(200));
        // The busy call was not disturbed.
        assert_eq!(busy.join().unwrap().unwrap(), json!(1.0));
    });
    assert_eq!(pool.call("add", json!([1, 2])).unwrap(), json!(3));
    pool.shutdown().unwrap();
}

#[test]
fn the_whole_deadline_covers_the_queue_too() {
    let pool = common::builder(1).build().unwrap();
    std::thread::scope(|s| {
        let busy = s.spawn(|| pool.call("sleep", json!({"seconds": 1.0})));
        assert!(
            common::wait_until(Duration::from_secs(5), || pool.stats().unwrap().workers[0].in_flight == 1)
        );
        let err = pool
            .call_with("add", json!([1, 2]), CallOptions::new().timeout(Duration::from_millis(150)))
            .unwrap_err();
        assert!(matches!(err, Error::Timeout { kind: TimeoutKind::Queue, .. }), "{err:?}");
        assert!(busy.join().unwrap().is_ok());
    });
    pool.shutdown().unwrap();
}

#[test]
fn a_call_already_past_its_deadline_costs_no_worker() {
    let pool = common::builder(1).build().unwrap();
    let pid = common::worker_pids(&pool);
    for _ in 0..20 {
        let err = pool.call_with("add", json!([1, 2]), CallOptions::new().timeout(Duration::from_nanos(1)));
        assert!(matches!(err, Err(Error::Timeout { kind: TimeoutKind::Queue, .. })), "{err:?}");
    }
    assert_eq!(common::worker_pids(&pool), pid, "no worker was killed for it");
    assert_eq!(pool.stats().unwrap().restarts, 0);
    pool.shutdown().unwrap();
}

#[test]
fn a_full_queue_refuses_at_once() {
    let pool = common::builder(1).max_queue(1).build().unwrap();
    std::thread::scope(|s| {
        let busy = s.spawn(|| pool.call("sleep", json!({"seconds": 0.8})));
        assert!(
            common::wait_until(Duration::from_secs(5), || pool.stats().unwrap().workers[0].in_flight == 1)
        );
        let queued = s.spawn(|| pool.call("add", json!([1, 1])));
        assert!(common::wait_until(Duration::from_secs(5), || pool.stats().unwrap().queued == 1));
        let started = Instant::now();
        let err = pool.call("add", json!([2, 2])).unwrap_err();
        assert!(matches!(err, Error::QueueFull { max_queue: 1 }), "{err:?}");
        assert!(started.elapsed() < Duration::from_millis(500), "QueueFull is immediate");
        assert!(busy.join().unwrap().is_ok());
        assert_eq!(queued.join().unwrap().unwrap(), json!(2));
    });
    let s = pool.stats().unwrap();
    assert_eq!(s.queue_high_water, 1);
    pool.shutdown().unwrap();
}

#[test]
fn time_outs_and_python_errors_name_the_command_and_the_deadline() {
    let pool = common::builder(1).build().unwrap();
    let pids = common::worker_pids(&pool);
    let late = pool
        .call_with("sleep", json!({"seconds": 5}), CallOptions::new().timeout(Duration::from_millis(200)))
        .unwrap_err();
    match &late {
        Error::Timeout { kind: TimeoutKind::Call, command: Some(c), after: Some(d), .. } => {
            assert_eq!((c.as_str(), *d), ("sleep", Duration::from_millis(200)))
        }
        other => panic!("expected a call time-out naming its command, got {other:?}"),
    }
    let text = late.to_string();
    assert!(
        text.starts_with("timed out: running the call (`sleep`, deadline 200ms); where Python was:\n"),
        "{text}"
    );
    assert!(text.contains("in sleep"), "the stack names the command's function: {text}");
    let raised = pool.call("boom", json!({"message": "kaput"})).unwrap_err();
    match &raised {
        Error::Python(e) => assert_eq!(e.command.as_deref(), Some("boom")),
        other => panic!("expected a Python error, got {other:?}"),
    }
    assert!(raised.to_string().starts_with("python exception in `boom`: "), "{raised}");
    let pids: Vec<u32> = pids.into_iter().chain(common::worker_pids(&pool)).collect();
    pool.shutdown().unwrap();
    common::assert_gone(&pids, Duration::from_secs(5));
}
