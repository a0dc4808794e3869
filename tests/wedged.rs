//! A thread worker whose every call slot is held by calls that already timed out is wedged:
//! it is replaced, make before break, instead of leaving the pool with no capacity.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use snakepit::{CallOptions, Error, Event, Profile, RecycleReason, TimeoutKind};

#[test]
fn a_thread_worker_whose_every_slot_is_held_by_timed_out_calls_is_replaced() {
    // Pins (needs the new API: RecycleReason::Wedged, Recycles::wedged): a timed-out call on a
    // thread worker keeps its slot until the Python function returns; once every slot is held
    // that way the worker can take nothing, and today the pool stays at zero capacity until
    // those functions return (30 s here), so the next call times out in the queue.
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let pool = common::builder(1)
        .adapter("thread_adapter")
        .profile(Profile::Thread)
        .threads_per_worker(2)
        .on_event(move |e| sink.lock().unwrap().push(e.clone()))
        .build()
        .unwrap();
    let old = common::worker_pids(&pool)[0];
    for i in 0..2 {
        let late = pool.call_with(
            "nap",
            json!({"seconds": 30, "tag": i}),
            CallOptions::new().timeout(Duration::from_millis(200)),
        );
        assert!(matches!(late, Err(Error::Timeout { kind: TimeoutKind::Call, .. })), "nap {i}: {late:?}");
    }
    // Both slots are held by calls nobody waits for: a new worker must take the next call.
    let next = pool.call_with("pid", json!({}), CallOptions::new().timeout(Duration::from_secs(20)));
    let new = match next {
        Ok(v) => v.as_u64().unwrap() as u32,
        Err(e) => panic!("the call after the worker wedged failed: {e:?}"),
    };
    assert_ne!(new, old, "served by a new worker");
    assert_eq!(pool.stats().unwrap().recycles.wedged, 1);
    common::assert_gone(&[old], Duration::from_secs(5));
    let pids = common::worker_pids(&pool);
    pool.shutdown().unwrap();
    let events = events.lock().unwrap();
    assert!(
        events.iter().any(|e| matches!(e,
            Event::WorkerRecycled { pid, reason: RecycleReason::Wedged, .. } if *pid == old)),
        "WorkerRecycled with reason Wedged for pid {old}: {events:?}"
    );
    common::assert_gone(&pids, Duration::from_secs(5));
}
