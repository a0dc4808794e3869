//! A call that times out says where Python was: the stacks of its worker's threads, taken
//! shortly before the deadline (Python's `faulthandler`, on a signal from the pool).

mod common;

use std::time::Duration;

use serde_json::json;
use snakepit::{CallOptions, Error, Pool, Profile, TimeoutKind};

fn timed_out_stack(pool: &Pool, command: &str, args: serde_json::Value, timeout: Duration) -> String {
    match pool.call_with(command, args, CallOptions::new().timeout(timeout)) {
        Err(e @ Error::Timeout { kind: TimeoutKind::Call, .. }) => {
            let Error::Timeout { stack, .. } = &e else { unreachable!() };
            let stack = stack.clone().unwrap_or_else(|| panic!("no stack in {e}"));
            assert!(e.to_string().contains(&stack), "the message shows it: {e}");
            stack
        }
        other => panic!("expected Timeout(Call), got {other:?}"),
    }
}

#[test]
fn a_process_worker_that_times_out_shows_the_function_it_was_in() {
    let pool = common::builder(1).build().unwrap();
    let pids = common::worker_pids(&pool);
    let stack = timed_out_stack(&pool, "ponder", json!({"seconds": 30}), Duration::from_secs(1));
    assert!(stack.contains("deep_in_thought") && stack.contains("basic_adapter.py"), "{stack}");
    // The worker was killed for the time-out (process profile); the pool goes on.
    assert!(common::settled(&pool));
    assert_eq!(pool.call("add", json!([1, 2])).unwrap(), json!(3));
    let all: Vec<u32> = [pids, common::worker_pids(&pool)].concat();
    pool.shutdown().unwrap();
    common::assert_gone(&all, Duration::from_secs(5));
}

#[test]
fn a_worker_holding_the_gil_in_c_code_still_shows_its_stack() {
    let pool = common::builder(1).build().unwrap();
    let stack = timed_out_stack(&pool, "gil_hog", json!({}), Duration::from_secs(1));
    assert!(stack.contains("gil_hog"), "{stack}");
    pool.shutdown().unwrap();
}

#[test]
fn a_thread_worker_shows_every_thread_and_keeps_serving() {
    let pool = common::builder(1)
        .profile(Profile::Thread)
        .threads_per_worker(4)
        .allow_unsafe_threads(true)
        .build()
        .unwrap();
    let pid = common::worker_pids(&pool)[0];
    let stack = timed_out_stack(&pool, "ponder", json!({"seconds": 3}), Duration::from_millis(500));
    assert!(stack.contains("deep_in_thought"), "{stack}");
    assert!(
        stack.matches("Thread 0x").count() + stack.matches("thread 0x").count() >= 2,
        "all threads: {stack}"
    );
    // Not killed (thread profile): the same worker answers.
    assert_eq!(pool.call("pid", json!({})).unwrap(), json!(pid));
    pool.shutdown().unwrap();
    common::assert_gone(&[pid], Duration::from_secs(5));
}

#[test]
fn a_call_that_finishes_after_its_stack_was_taken_is_answered_and_the_worker_lives() {
    // The stacks are taken 100 ms before the deadline; this call ends 50 ms after that.
    let pool = common::builder(1).build().unwrap();
    let pid = common::worker_pids(&pool)[0];
    let done = pool.call_with(
        "ponder",
        json!({"seconds": 1.85}),
        CallOptions::new().timeout(Duration::from_secs(2)),
    );
    assert_eq!(done.unwrap(), json!(1.85));
    assert_eq!(common::worker_pids(&pool), vec![pid], "the signal did not hurt it");
    assert_eq!(pool.call("pid", json!({})).unwrap(), json!(pid));
    pool.shutdown().unwrap();
}

#[test]
fn taking_stacks_of_a_worker_whose_other_threads_run_python_never_hurts_it() {
    // faulthandler would walk every thread's frames while they change (and could crash); only
    // the main thread, where the call runs, is dumped. The slow-call log takes a stack during
    // every one of these calls.
    let pool = common::builder(1).slow_call_log(Duration::from_millis(20)).build().unwrap();
    let pid = common::worker_pids(&pool)[0];
    assert_eq!(pool.call("spinners", json!({"n": 3})).unwrap(), json!(3));
    for _ in 0..30 {
        assert_eq!(pool.call("ponder", json!({"seconds": 0.06})).unwrap(), json!(0.06));
    }
    assert_eq!(common::worker_pids(&pool), vec![pid], "the worker lived");
    assert_eq!(pool.stats().unwrap().crashes, 0);
    pool.shutdown().unwrap();
    common::assert_gone(&[pid], Duration::from_secs(5));
}

#[test]
fn a_thread_worker_asked_for_its_stacks_many_times_at_once_keeps_serving() {
    // Every call is "slow" (1 ms): each asks for the stacks, often while a dump is running.
    let pool = common::builder(1)
        .profile(Profile::Thread)
        .threads_per_worker(8)
        .allow_unsafe_threads(true)
        .slow_call_log(Duration::from_millis(1))
        .build()
        .unwrap();
    let pid = common::worker_pids(&pool)[0];
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                for _ in 0..40 {
                    assert_eq!(pool.call("ponder", json!({"seconds": 0.01})).unwrap(), json!(0.01));
                }
            });
        }
    });
    assert_eq!(common::worker_pids(&pool), vec![pid], "the worker lived");
    pool.shutdown().unwrap();
    common::assert_gone(&[pid], Duration::from_secs(5));
}

#[test]
fn an_adapter_that_resets_the_stack_signal_at_import_still_gives_stacks_and_lives() {
    let pool = common::builder(1)
        .adapter("sigusr2_adapter")
        .slow_call_log(Duration::from_millis(50))
        .build()
        .unwrap();
    let pid = common::worker_pids(&pool)[0];
    // The slow-call log signals this call's worker; it must live and answer.
    assert_eq!(pool.call("ponder", json!({"seconds": 0.3})).unwrap(), json!(0.3));
    assert_eq!(common::worker_pids(&pool), vec![pid]);
    let stack = timed_out_stack(&pool, "ponder", json!({"seconds": 30}), Duration::from_secs(1));
    assert!(stack.contains("deep_in_thought"), "{stack}");
    pool.shutdown().unwrap();
}

#[test]
fn calls_of_a_thread_worker_that_time_out_together_share_one_dump() {
    let pool = common::builder(1)
        .profile(Profile::Thread)
        .threads_per_worker(16)
        .allow_unsafe_threads(true)
        .build()
        .unwrap();
    let stacks: Vec<String> = std::thread::scope(|s| {
        let calls: Vec<_> = (0..16)
            .map(|_| {
                s.spawn(|| timed_out_stack(&pool, "ponder", json!({"seconds": 3}), Duration::from_secs(1)))
            })
            .collect();
        calls.into_iter().map(|c| c.join().unwrap()).collect()
    });
    assert!(stacks.iter().all(|s| s.contains("deep_in_thought")), "every time-out carries a stack");
    pool.shutdown().unwrap();
}
