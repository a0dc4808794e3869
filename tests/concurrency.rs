//! Many threads share one pool; every reply reaches the caller that asked for it.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use serde_json::json;

#[test]
fn eight_threads_times_500_calls_each_get_their_own_reply() {
    let pool = common::builder(2).build().unwrap();
    let pids: HashSet<u32> = common::worker_pids(&pool).into_iter().collect();
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let pool = &pool;
            let pids = &pids;
            s.spawn(move || {
                for i in 0..500u64 {
                    let tag = format!("t{t}-c{i}");
                    let r = pool.call("tag", json!({ "value": tag })).unwrap();
                    assert_eq!(r["value"], json!(tag), "a reply went to the wrong caller");
                    assert!(pids.contains(&(r["pid"].as_u64().unwrap() as u32)));
                }
            });
        }
    });
    let s = pool.stats().unwrap();
    assert_eq!(s.calls_ok, 4000);
    assert_eq!(s.calls_failed, 0);
    // Both workers took part.
    assert!(s.workers.iter().all(|w| w.calls_served > 0), "{:?}", s.workers);
    let pids: Vec<u32> = pids.into_iter().collect();
    pool.shutdown().unwrap();
    common::assert_gone(&pids, Duration::from_secs(5));
}

#[test]
fn calls_queue_in_fifo_order_when_every_worker_is_busy() {
    let pool = common::builder(1).build().unwrap();
    std::thread::scope(|s| {
        let busy = s.spawn(|| pool.call("sleep", json!({"seconds": 0.3})));
        assert!(
            common::wait_until(Duration::from_secs(5), || pool.stats().unwrap().workers[0].in_flight == 1)
        );
        let mut handles = Vec::new();
        for i in 0..5 {
            let pool = &pool;
            handles.push(s.spawn(move || pool.call("record", json!({ "value": i })).unwrap()));
            // Each call is queued before the next one is made.
            assert!(common::wait_until(Duration::from_secs(5), || pool.stats().unwrap().queued == i + 1));
        }
        busy.join().unwrap().unwrap();
        for h in handles {
            h.join().unwrap();
        }
    });
    // The one worker ran them in the order they arrived.
    assert_eq!(pool.call("recorded", json!({})).unwrap(), json!([0, 1, 2, 3, 4]));
    pool.shutdown().unwrap();
}

#[test]
fn a_sequential_caller_never_sees_a_busy_pool() {
    // With no queue at all, a caller that waits for each reply before the next call must never
    // be refused: the worker is free the moment the reply arrives.
    let pool = common::builder(1).max_queue(0).build().unwrap();
    for i in 0..3000 {
        assert_eq!(pool.call("add", json!([i, 1])).unwrap(), json!(i + 1));
    }
    pool.shutdown().unwrap();
}
