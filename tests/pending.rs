//! Calls in the background: handles, waiting on many at once across pools, cancelling a
//! queued call, detaching, and `map`.

mod common;

use std::time::Duration;

use crossbeam_channel::select;
use serde_json::{json, Value};
use snakepit::{CallOptions, Error};

/// The runner threads of the pool named `pool` in this process (named `sp-run-<pool>`).
fn runner_threads(pool: &str) -> usize {
    let name = format!("sp-run-{pool}\n");
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c == name))
        .count()
}

#[test]
fn submitted_calls_all_come_back_with_their_own_results_and_the_runners_are_joined() {
    let pool = common::builder(2).name("joined").build().unwrap();
    let pids = common::worker_pids(&pool);
    let pending: Vec<_> = (0..50).map(|i| pool.submit("add", json!([i, 1])).unwrap()).collect();
    for (i, p) in pending.into_iter().enumerate() {
        assert_eq!(p.wait().unwrap(), json!(i + 1));
    }
    assert!(runner_threads("joined") > 0);
    pool.shutdown().unwrap();
    assert_eq!(runner_threads("joined"), 0, "shutdown joined the runner threads");
    common::assert_gone(&pids, Duration::from_secs(5));
}

#[test]
fn one_thread_waits_on_calls_of_two_pools_at_once() {
    let a = common::builder(1).name("a").build().unwrap();
    let b = common::builder(1).name("b").build().unwrap();
    let slow = a.submit("sleep", json!({"seconds": 1.0})).unwrap();
    let fast = b.submit("sleep", json!({"seconds": 0.05})).unwrap();
    let first = select! {
        recv(slow.receiver()) -> r => ("a", r.unwrap()),
        recv(fast.receiver()) -> r => ("b", r.unwrap()),
    };
    assert_eq!((first.0, first.1.unwrap()), ("b", json!(0.05)));
    assert!(slow.try_result().is_none(), "still running");
    assert_eq!(slow.wait_timeout(Duration::from_secs(10)).unwrap().unwrap(), json!(1.0));
    a.shutdown().unwrap();
    b.shutdown().unwrap();
}

#[test]
fn a_queued_call_is_cancelled_at_once_and_never_runs() {
    let pool = common::builder(1).build().unwrap();
    let running = pool.submit("sleep", json!({"seconds": 1.0})).unwrap();
    assert!(common::wait_until(Duration::from_secs(5), || pool.stats().unwrap().workers[0].in_flight == 1));
    let queued = pool.submit("record", json!({"value": "never"})).unwrap();
    assert!(common::wait_until(Duration::from_secs(5), || pool.stats().unwrap().queued == 1));
    let failed = pool.stats().unwrap().calls_failed;
    assert!(queued.cancel(), "it was still queued");
    assert!(matches!(queued.wait_timeout(Duration::from_secs(5)), Some(Err(Error::Cancelled))));
    assert!(running.try_result().is_none(), "answered at once, before the running call ended");
    assert_eq!(pool.stats().unwrap().queued, 0);
    assert_eq!(pool.stats().unwrap().calls_failed, failed + 1, "counted once, as failed");
    // A running call is cancelled too, in steps (see tests/cancel.rs): the sleep is cut short.
    assert!(running.cancel(), "a running call is cancelled");
    assert!(matches!(running.wait(), Err(Error::Cancelled)));
    assert!(!queued.cancel(), "a call that is done is not");
    assert_eq!(pool.call("recorded", json!({})).unwrap(), json!([]), "the cancelled call never ran");
    pool.shutdown().unwrap();
}

#[test]
fn a_dropped_handle_detaches_its_call_which_still_runs() {
    let pool = common::builder(1).build().unwrap();
    drop(pool.submit("record", json!({"value": "detached"})).unwrap());
    assert!(common::wait_until(Duration::from_secs(5), || {
        pool.call("recorded", json!({})).unwrap() == json!(["detached"])
    }));
    pool.shutdown().unwrap();
}

#[test]
fn map_keeps_calls_in_flight_and_yields_in_order() {
    let pool = common::builder(2).build().unwrap();
    let args = (0..40).map(|i| json!({"value": i, "delay": if i % 3 == 0 { 0.02 } else { 0.0 }}));
    let results: Vec<Value> = pool.map("tag", args, 4).map(Result::unwrap).collect();
    assert_eq!(results.len(), 40);
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r["value"], json!(i), "in the order of the arguments: {r}");
    }
    pool.shutdown().unwrap();
}

#[test]
fn dropping_a_map_early_cancels_the_calls_not_started() {
    let pool = common::builder(1).build().unwrap();
    {
        let mut results = pool.map("record", (0..20).map(|i| json!({"value": i})), 8);
        assert_eq!(results.next().unwrap().unwrap(), json!(1));
    }
    // The one worker took a few more in order; the rest never ran.
    let ran = pool.call("recorded", json!({})).unwrap();
    assert!(ran.as_array().unwrap().len() < 20, "{ran}");
    let again = pool.call_with("recorded", json!({}), CallOptions::new()).unwrap();
    assert_eq!(again, ran, "nothing else ran after the drop");
    pool.shutdown().unwrap();
}

#[test]
fn submitted_calls_run_side_by_side() {
    let pool = common::builder(2).build().unwrap();
    let a = pool.submit("sleep", json!({"seconds": 1.0})).unwrap();
    let b = pool.submit("sleep", json!({"seconds": 1.0})).unwrap();
    // Both workers busy at once: the two calls overlap.
    let both = common::wait_until(Duration::from_secs(5), || {
        pool.stats().unwrap().workers.iter().all(|w| w.in_flight == 1)
    });
    assert!(both, "the second call waited for the first");
    a.wait().unwrap();
    b.wait().unwrap();
    // And a map keeps its calls in flight on both.
    std::thread::scope(|s| {
        let mapped = s.spawn(|| pool.map("sleep", (0..4).map(|_| json!({"seconds": 0.5})), 2).count());
        let both = common::wait_until(Duration::from_secs(5), || {
            pool.stats().unwrap().workers.iter().all(|w| w.in_flight == 1)
        });
        assert!(both, "map ran one call at a time");
        assert_eq!(mapped.join().unwrap(), 4);
    });
    pool.shutdown().unwrap();
}

#[test]
fn a_map_gives_one_outcome_per_argument_in_order_even_when_the_pool_stops() {
    let pool = common::builder(1).build().unwrap();
    let mut results = pool.map("sleep", (0..4).map(|_| json!({"seconds": 0.3})), 2);
    let mut outcomes = vec![results.next().unwrap()];
    pool.shutdown().unwrap();
    outcomes.extend(results);
    assert_eq!(outcomes.len(), 4, "{outcomes:?}");
    assert_eq!(outcomes[0].as_ref().unwrap(), &json!(0.3));
    // The call running at the shutdown may finish in its grace period; the rest are refused.
    assert!(matches!(outcomes[3], Err(Error::ShuttingDown)), "{outcomes:?}");
    let first_err = outcomes.iter().position(Result::is_err).unwrap();
    assert!(outcomes[first_err..].iter().all(Result::is_err), "in order: {outcomes:?}");
}

#[test]
fn map_never_runs_more_than_in_flight_calls_at_once() {
    let pool = common::builder(2).build().unwrap();
    let most = std::thread::scope(|s| {
        let mapped = s.spawn(|| pool.map("sleep", (0..4).map(|_| json!({"seconds": 0.2})), 1).count());
        let mut most = 0;
        while !mapped.is_finished() {
            let running: usize = pool.stats().unwrap().workers.iter().map(|w| w.in_flight).sum();
            most = most.max(running);
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(mapped.join().unwrap(), 4);
        most
    });
    assert_eq!(most, 1, "in_flight 1 means one call at a time");
    pool.shutdown().unwrap();
}

#[test]
fn cancels_racing_the_queue_never_lose_a_worker() {
    // Calls are submitted and cancelled at every moment of their way to a worker while
    // another thread keeps the worker busy: afterwards every slot is free and calls flow.
    let pool = common::builder(1).queue_timeout(Duration::from_secs(2)).build().unwrap();
    let pad = "x".repeat(1500);
    let end = std::time::Instant::now() + Duration::from_secs(3);
    std::thread::scope(|s| {
        s.spawn(|| {
            while std::time::Instant::now() < end {
                pool.call("add", json!([1, 2])).unwrap();
            }
        });
        let mut spin = 0u64;
        while std::time::Instant::now() < end {
            let p = pool.submit("length", json!({"data": pad})).unwrap();
            spin = (spin * 31 + 7) % 200;
            let until = std::time::Instant::now() + Duration::from_micros(spin);
            while std::time::Instant::now() < until {}
            // A cancel that came too late (the call was done, or finished before it heeded
            // the cancel) leaves the call's own result.
            let cancelled = p.cancel();
            match p.wait() {
                Ok(v) => assert_eq!(v, json!(1500)),
                Err(Error::Cancelled) => assert!(cancelled),
                Err(e) => panic!("{e}"),
            }
        }
    });
    assert!(common::wait_until(Duration::from_secs(5), || pool.stats().unwrap().workers[0].in_flight == 0));
    assert_eq!(pool.call("add", json!([2, 2])).unwrap(), json!(4));
    let stats = pool.stats().unwrap();
    assert_eq!((stats.crashes, stats.queued), (0, 0));
    pool.shutdown().unwrap();
}
