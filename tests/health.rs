//! Idle health checks: a worker that stops answering pings is killed and replaced.

mod common;

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use snakepit::{Event, RecycleReason};

#[test]
fn a_frozen_idle_worker_is_killed_and_replaced() {
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let pool = common::builder(2)
        .health_interval(Duration::from_millis(100))
        .health_timeout(Duration::from_millis(300))
        .on_event(move |e| sink.lock().unwrap().push(e.clone()))
        .build()
        .unwrap();
    let pids = common::worker_pids(&pool);
    // Healthy workers answer their pings: nothing happens for a while.
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(pool.stats().unwrap().recycles.health_check, 0);
    assert_eq!(common::worker_pids(&pool), pids);

    let frozen = pids[0];
    assert!(Command::new("kill").args(["-STOP", &frozen.to_string()]).status().unwrap().success());
    assert!(
        common::wait_until(Duration::from_secs(10), || pool.stats().unwrap().recycles.health_check == 1),
        "the frozen worker was recycled for its health"
    );
    common::assert_gone(&[frozen], Duration::from_secs(5));
    assert!(common::settled(&pool));
    for i in 0..20 {
        assert_eq!(pool.call("add", json!([i, 1])).unwrap(), json!(i + 1), "calls keep succeeding");
    }
    let got = events.lock().unwrap().iter().any(|e| {
        matches!(e, Event::WorkerRecycled { reason: RecycleReason::HealthCheck, pid, .. } if *pid == frozen)
    });
    assert!(got, "a WorkerRecycled event with reason HealthCheck");
    let after = common::worker_pids(&pool);
    pool.shutdown().unwrap();
    common::assert_gone(&after, Duration::from_secs(5));
}

#[test]
fn a_busy_worker_is_not_pinged() {
    // A process worker cannot answer a ping until its call returns; a long call must not be
    // mistaken for a hang.
    let pool = common::builder(1)
        .health_interval(Duration::from_millis(50))
        .health_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let pid = common::worker_pids(&pool)[0];
    assert_eq!(pool.call("sleep", json!({"seconds": 0.8})).unwrap(), json!(0.8));
    assert_eq!(common::worker_pids(&pool), vec![pid]);
    assert_eq!(pool.stats().unwrap().recycles.health_check, 0);
    pool.shutdown().unwrap();
}
