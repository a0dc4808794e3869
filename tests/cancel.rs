//! Cancelling a call that runs, step by step, on both profiles: the command is asked, then
//! interrupted, then given up on; a deadline takes the same steps. Each step is an event, and
//! a command that lets go in time costs no worker.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use snakepit::{CallOptions, CancelStep, Error, Event, Pool, PoolBuilder, Profile, TimeoutKind};

/// A one-worker pool on `stream_adapter` and the cancel steps its events report.
fn pool(name: &str, profile: Profile) -> (Pool, Arc<Mutex<Vec<CancelStep>>>) {
    let steps: Arc<Mutex<Vec<CancelStep>>> = Arc::default();
    let seen = steps.clone();
    let b = Pool::builder()
        .name(name)
        .size(1)
        .python_path(common::fixtures())
        .adapter("stream_adapter")
        .startup_timeout(Duration::from_secs(20))
        .cancel_grace(Duration::from_millis(300))
        .on_event(move |e| {
            if let Event::CallCancel { step, .. } = e {
                seen.lock().unwrap().push(*step);
            }
        });
    let b: PoolBuilder = match profile {
        Profile::Thread => b.profile(Profile::Thread).threads_per_worker(2),
        _ => b,
    };
    (b.build().unwrap(), steps)
}

fn profiles() -> [(Profile, &'static str); 2] {
    [(Profile::Process, "process"), (Profile::Thread, "thread")]
}

fn temp(name: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("snakepit-cancel-{}-{name}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

/// Waits until the pool's events have reported `n` steps (they are delivered on a thread of
/// their own).
fn steps_after(steps: &Mutex<Vec<CancelStep>>, n: usize) -> Vec<CancelStep> {
    common::wait_until(Duration::from_secs(5), || steps.lock().unwrap().len() >= n);
    std::thread::sleep(Duration::from_millis(100)); // and no more than that
    steps.lock().unwrap().clone()
}

#[test]
fn a_command_that_checks_cancelled_stops_at_the_first_step_and_keeps_its_worker() {
    for (profile, name) in profiles() {
        let (pool, steps) = pool(&format!("cx-coop-{name}"), profile);
        let pids = common::worker_pids(&pool);
        let marker = temp(&format!("coop-{name}"));
        let call =
            pool.submit("cooperative", json!({"seconds": 30, "marker": marker.to_str().unwrap()})).unwrap();
        std::thread::sleep(Duration::from_millis(200)); // it runs
        assert!(call.cancel(), "{name}");
        let outcome = call.wait_timeout(Duration::from_secs(10)).expect("an outcome");
        assert!(matches!(outcome, Err(Error::Cancelled)), "{name}: {outcome:?}");
        assert_eq!(std::fs::read_to_string(&marker).unwrap(), "saw cancel", "{name}");
        assert_eq!(steps_after(&steps, 1), vec![CancelStep::Asked], "{name}: no interrupt was needed");
        assert_eq!(pool.call("pid", Value::Null).unwrap(), json!(pids[0]), "{name}: same worker");
        let stats = pool.stats().unwrap();
        assert_eq!(stats.calls_failed, 1, "{name}");
        pool.shutdown().unwrap();
        common::assert_gone(&pids, Duration::from_secs(5));
        let _ = std::fs::remove_file(&marker);
    }
}

#[test]
fn a_command_that_never_checks_is_interrupted_and_keeps_its_worker() {
    for (profile, name) in profiles() {
        let (pool, steps) = pool(&format!("cx-intr-{name}"), profile);
        let pids = common::worker_pids(&pool);
        let marker = temp(&format!("intr-{name}"));
        let call = pool.submit("busy", json!({"seconds": 30, "marker": marker.to_str().unwrap()})).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert!(call.cancel());
        let outcome = call.wait_timeout(Duration::from_secs(10)).expect("an outcome");
        assert!(matches!(outcome, Err(Error::Cancelled)), "{name}: {outcome:?}");
        assert_eq!(std::fs::read_to_string(&marker).unwrap(), "interrupted", "{name}");
        assert_eq!(steps_after(&steps, 2), vec![CancelStep::Asked, CancelStep::Interrupted], "{name}");
        assert_eq!(pool.call("pid", Value::Null).unwrap(), json!(pids[0]), "{name}: same worker");
        pool.shutdown().unwrap();
        common::assert_gone(&pids, Duration::from_secs(5));
        let _ = std::fs::remove_file(&marker);
    }
}

#[test]
fn a_command_that_swallows_interrupts_is_given_up_on() {
    // Process: the worker is killed and replaced. Thread: the call keeps its slot until it
    // ends by itself; the worker serves on beside it.
    for (profile, name) in profiles() {
        let (pool, steps) = pool(&format!("cx-give-{name}"), profile);
        let pids = common::worker_pids(&pool);
        let call = pool.submit("stubborn", json!({"seconds": 3})).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert!(call.cancel());
        let outcome = call.wait_timeout(Duration::from_secs(10)).expect("an outcome");
        assert!(matches!(outcome, Err(Error::Cancelled)), "{name}: {outcome:?}");
        let expected = vec![CancelStep::Asked, CancelStep::Interrupted, CancelStep::GaveUp];
        assert_eq!(steps_after(&steps, 3), expected, "{name}");
        let pid_now = pool.call("pid", Value::Null).unwrap();
        match profile {
            Profile::Thread => assert_eq!(pid_now, json!(pids[0]), "{name}"),
            _ => {
                assert_ne!(pid_now, json!(pids[0]), "{name}: replaced");
                common::assert_gone(&pids, Duration::from_secs(5));
            }
        }
        let all = common::worker_pids(&pool);
        pool.shutdown().unwrap();
        common::assert_gone(&all, Duration::from_secs(10));
    }
}

#[test]
fn a_deadline_takes_the_same_steps_so_a_command_that_honours_it_keeps_its_worker() {
    for (profile, name) in profiles() {
        let (pool, steps) = pool(&format!("cx-dl-{name}"), profile);
        let pids = common::worker_pids(&pool);
        let options = CallOptions::new().timeout(Duration::from_millis(400));
        let err = pool.call_with("cooperative", json!({"seconds": 30}), options.clone()).unwrap_err();
        assert_eq!(err.timeout_kind(), Some(TimeoutKind::Call), "{name}: {err}");
        assert_eq!(steps_after(&steps, 1), vec![CancelStep::Asked], "{name}");
        // The command let go, so the same worker takes the next call.
        assert_eq!(pool.call("pid", Value::Null).unwrap(), json!(pids[0]), "{name}");
        let stats = pool.stats().unwrap();
        assert_eq!(stats.timeouts, 1, "{name}");
        assert!(stats.workers[0].pid == pids[0], "{name}: not replaced");
        // A command that holds on past every step: a process worker is replaced.
        let err = pool.call_with("stubborn", json!({"seconds": 4}), options).unwrap_err();
        assert_eq!(err.timeout_kind(), Some(TimeoutKind::Call), "{name}");
        if profile == Profile::Process {
            assert!(
                common::wait_until(Duration::from_secs(10), || common::worker_pids(&pool)
                    .first()
                    .is_some_and(|p| *p != pids[0])),
                "{name}: replaced after the grace"
            );
            common::assert_gone(&pids, Duration::from_secs(5));
        }
        let all = common::worker_pids(&pool);
        pool.shutdown().unwrap();
        common::assert_gone(&all, Duration::from_secs(10));
    }
}

#[test]
fn a_cancel_that_comes_after_the_result_changes_nothing() {
    for (profile, name) in profiles() {
        let (pool, steps) = pool(&format!("cx-late-{name}"), profile);
        let pids = common::worker_pids(&pool);
        for i in 0..200 {
            let call = pool.submit("plain", json!({"value": i})).unwrap();
            // Races the call's end: either it was cancelled, or its result is its own.
            call.cancel();
            match call.wait_timeout(Duration::from_secs(10)).expect("an outcome") {
                Ok(v) => assert_eq!(v, json!(i), "{name}"),
                Err(Error::Cancelled) => {}
                Err(e) => panic!("{name}: {e}"),
            }
        }
        // Every later call gets its own answer: no cancel meant for another call hit it.
        for i in 0..50 {
            assert_eq!(pool.call("plain", json!({"value": i})).unwrap(), json!(i), "{name}");
        }
        assert_eq!(common::worker_pids(&pool), pids, "{name}: no worker was lost");
        assert!(!steps.lock().unwrap().contains(&CancelStep::GaveUp), "{name}");
        pool.shutdown().unwrap();
        common::assert_gone(&pids, Duration::from_secs(5));
    }
}

#[test]
fn a_timed_out_call_is_followed_up_at_once_however_many_calls_are_submitted() {
    // The follow-up of a time-out holds the worker that every submitted call waits for: it
    // must not wait behind them for a thread.
    let (pool, _) = pool("cx-many", Profile::Process);
    let pids = common::worker_pids(&pool);
    let short = CallOptions::new().timeout(Duration::from_millis(300));
    let err = pool.call_with("cooperative", json!({"seconds": 30}), short).unwrap_err();
    assert_eq!(err.timeout_kind(), Some(TimeoutKind::Call));
    let long = CallOptions::new().timeout(Duration::from_secs(20));
    let calls: Vec<_> =
        (0..300).map(|i| pool.submit_with("plain", json!({"value": i}), long.clone()).unwrap()).collect();
    for (i, call) in calls.into_iter().enumerate() {
        assert_eq!(call.wait().unwrap(), json!(i));
    }
    assert_eq!(common::worker_pids(&pool), pids, "the command let go: same worker");
    pool.shutdown().unwrap();
    common::assert_gone(&pids, Duration::from_secs(5));
}
