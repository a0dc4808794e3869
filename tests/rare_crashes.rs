//! A worker that crashes during a call is that call's fault, not a start-up failure: the
//! replacement starts at once, however soon after getting ready the worker crashed.
//! (A worker that dies while idle right after getting ready, again and again, is a crash loop
//! and is restarted with backoff: see tests/crash_loop.rs.)

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use snakepit::{CallOptions, Error, Event};

#[test]
fn crashes_during_calls_are_replaced_at_once_even_right_after_the_worker_got_ready() {
    // Pins: a worker killed by the call it was running, within a second of getting ready,
    // counts as a quick crash and puts the next start behind the restart backoff (10 s here),
    // so the next call waits on the backoff and times out (and repeated ones escalate like a
    // crash loop). The crash is the call's fault: the replacement must start at once.
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let pool = common::builder(1)
        .restart_backoff(Duration::from_secs(10), Duration::from_secs(10))
        .request_timeout(Duration::from_secs(5))
        .on_event(move |e| sink.lock().unwrap().push(e.clone()))
        .build()
        .unwrap();
    let mut pids = common::worker_pids(&pool);
    for round in 1..=4 {
        // Right after the previous replacement became ready (the last call proved it was).
        match pool.call("exit_now", json!({"code": 5})) {
            Err(Error::WorkerDied { pid, .. }) => {
                if !pids.contains(&pid) {
                    pids.push(pid);
                }
            }
            other => panic!("round {round}: expected WorkerDied, got {other:?}"),
        }
        let next =
            pool.call_with("add", json!([round, 1]), CallOptions::new().timeout(Duration::from_secs(5)));
        match next {
            Ok(v) => assert_eq!(v, json!(round + 1)),
            Err(e) => panic!("round {round}: the call after the crash failed: {e:?}"),
        }
        for p in common::worker_pids(&pool) {
            if !pids.contains(&p) {
                pids.push(p);
            }
        }
    }
    let stats = pool.stats().unwrap();
    assert_eq!(stats.crashes, 4);
    assert_eq!(stats.startup_failures, 0);
    pool.shutdown().unwrap();
    let events = events.lock().unwrap();
    let failed: Vec<&Event> =
        events.iter().filter(|e| matches!(e, Event::WorkerStartFailed { .. })).collect();
    assert!(failed.is_empty(), "no worker failed to start: {failed:?}");
    common::assert_gone(&pids, Duration::from_secs(5));
}
