//! Shutdown and Drop: graceful, bounded, and nothing survives a pool.

mod common;

use std::time::{Duration, Instant};

use serde_json::json;
use snakepit::{Error, TimeoutKind};

#[test]
fn shutdown_leaves_no_worker_and_refuses_later_calls() {
    let pool = common::builder(3).build().unwrap();
    let pids = common::worker_pids(&pool);
    assert_eq!(pids.len(), 3);
    pool.shutdown().unwrap();
    common::assert_gone(&pids, Duration::from_secs(5));
    assert!(matches!(pool.call("add", json!([1, 2])), Err(Error::ShuttingDown)));
    assert!(matches!(pool.stats(), Err(Error::ShuttingDown)));
    pool.shutdown().unwrap(); // a second shutdown does nothing
}

#[test]
fn dropping_the_pool_leaves_no_worker() {
    let pool = common::builder(2).build().unwrap();
    let pids = common::worker_pids(&pool);
    drop(pool);
    common::assert_gone(&pids, Duration::from_secs(5));
}

#[test]
fn in_flight_calls_finish_and_queued_calls_are_refused() {
    let pool = common::builder(1).build().unwrap();
    let pids = common::worker_pids(&pool);
    std::thread::scope(|s| {
        let running = s.spawn(|| pool.call("sleep", json!({"seconds": 0.5})));
        assert!(
            common::wait_until(Duration::from_secs(5), || pool.stats().unwrap().workers[0].in_flight == 1)
        );
        let queued = s.spawn(|| pool.call("add", json!([1, 2])));
        assert!(common::wait_until(Duration::from_secs(5), || pool.stats().unwrap().queued == 1));
        pool.shutdown().unwrap();
        assert_eq!(running.join().unwrap().unwrap(), json!(0.5), "the in-flight call finished");
        assert!(matches!(queued.join().unwrap(), Err(Error::ShuttingDown)));
    });
    common::assert_gone(&pids, Duration::from_secs(5));
}

#[test]
fn calls_still_running_after_the_grace_period_are_cut() {
    let pool = common::builder(1).shutdown_timeout(Duration::from_millis(300)).build().unwrap();
    let pids = common::worker_pids(&pool);
    std::thread::scope(|s| {
        let running = s.spawn(|| pool.call("sleep", json!({"seconds": 30})));
        assert!(
            common::wait_until(Duration::from_secs(5), || pool.stats().unwrap().workers[0].in_flight == 1)
        );
        let started = Instant::now();
        let result = pool.shutdown();
        assert!(matches!(result, Err(Error::Timeout { kind: TimeoutKind::Shutdown, .. })), "{result:?}");
        // Bounded: grace + SIGTERM step, far from the 30 s the call wanted.
        assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
        assert!(matches!(running.join().unwrap(), Err(Error::Timeout { kind: TimeoutKind::Shutdown, .. })));
    });
    common::assert_gone(&pids, Duration::from_secs(5));
}

#[test]
fn a_workers_own_children_die_with_it() {
    let pool = common::builder(1).build().unwrap();
    let pids = common::worker_pids(&pool);
    let child = pool.call("spawn_child", json!({"seconds": 60})).unwrap().as_u64().unwrap() as u32;
    assert!(common::alive(child));
    pool.shutdown().unwrap();
    common::assert_gone(&pids, Duration::from_secs(5));
    common::assert_gone(&[child], Duration::from_secs(5));
}

#[test]
fn a_crashed_workers_children_die_too() {
    let pool = common::builder(1).build().unwrap();
    let child = pool.call("spawn_child", json!({"seconds": 60})).unwrap().as_u64().unwrap() as u32;
    assert!(matches!(pool.call("exit_now", json!({"code": 3})), Err(Error::WorkerDied { .. })));
    common::assert_gone(&[child], Duration::from_secs(5));
    pool.shutdown().unwrap();
}
