//! Python exceptions, unserialisable results and stray output are contained to their call.

mod common;

use std::time::Duration;

use serde_json::json;
use snakepit::Error;

fn python_error(err: Error) -> snakepit::RemoteError {
    match err {
        Error::Python(e) => e,
        other => panic!("expected a Python exception, got {other:?}"),
    }
}

#[test]
fn an_exception_comes_back_with_type_message_and_traceback() {
    let pool = common::builder(1).build().unwrap();
    let pid = common::worker_pids(&pool);
    let e = python_error(pool.call("boom", json!({"message": "it broke"})).unwrap_err());
    assert_eq!(e.error_type, "ValueError");
    assert_eq!(e.message, "it broke");
    assert!(e.traceback.contains("Traceback"), "{}", e.traceback);
    assert!(e.traceback.contains("in boom"), "the traceback names the function: {}", e.traceback);
    // The same worker keeps serving.
    assert_eq!(pool.call("add", json!([2, 2])).unwrap(), json!(4));
    assert_eq!(common::worker_pids(&pool), pid);
    pool.shutdown().unwrap();
}

#[test]
fn unserialisable_results_are_errors_and_the_worker_survives() {
    let pool = common::builder(1).build().unwrap();
    let pid = common::worker_pids(&pool);
    let e = python_error(pool.call("make_set", json!({})).unwrap_err());
    assert_eq!(e.error_type, "TypeError");
    assert!(e.message.contains("make_set"), "{}", e.message);
    let e = python_error(pool.call("nan", json!({})).unwrap_err());
    assert_eq!(e.error_type, "ValueError");
    assert_eq!(pool.call("add", json!([1, 2])).unwrap(), json!(3));
    assert_eq!(common::worker_pids(&pool), pid);
    assert_eq!(pool.stats().unwrap().crashes, 0);
    pool.shutdown().unwrap();
}

#[test]
fn print_and_writes_to_fd_1_do_not_corrupt_the_stream() {
    let pool = common::builder(1).build().unwrap();
    let pid = common::worker_pids(&pool);
    for _ in 0..20 {
        assert_eq!(pool.call("noisy", json!({})).unwrap(), json!("clean"));
    }
    assert_eq!(pool.call("add", json!([1, 2])).unwrap(), json!(3));
    assert_eq!(common::worker_pids(&pool), pid, "the worker was never replaced");
    pool.shutdown().unwrap();
}

#[test]
fn an_exception_message_that_is_not_valid_utf8_still_comes_back() {
    let pool = common::builder(1).build().unwrap();
    let e = python_error(pool.call("surrogate", json!({})).unwrap_err());
    assert_eq!(e.error_type, "ValueError");
    assert!(e.message.starts_with("bad ") && e.message.contains("udcff"), "{}", e.message);
    pool.shutdown().unwrap();
}

#[test]
fn nesting_too_deep_fails_only_the_call() {
    let pool = common::builder(1).build().unwrap();
    let pid = common::worker_pids(&pool);
    // A result deeper than the host's decoder takes: that call fails, the worker stays.
    let err = pool.call("deep", json!({"levels": 300})).unwrap_err();
    assert!(matches!(&err, Error::Protocol(m) if m.contains("could not be decoded")), "{err:?}");
    assert_eq!(pool.call("deep", json!({"levels": 3})).unwrap(), json!([[[[]]]]));
    // Arguments that deep are refused before they are sent.
    let mut args = json!(0);
    for _ in 0..150 {
        args = json!([args]);
    }
    assert!(matches!(pool.call("echo", json!([args])), Err(Error::InvalidArgs(_))));
    assert_eq!(common::worker_pids(&pool), pid);
    pool.shutdown().unwrap();
}

#[test]
fn frames_over_the_limit_are_refused_on_both_sides() {
    let pool = common::builder(1).max_frame_size(64 * 1024).build().unwrap();
    let pid = common::worker_pids(&pool);
    // Too large to send: refused before it reaches the worker.
    let data = "y".repeat(100 * 1024);
    match pool.call("length", json!({ "data": data })).unwrap_err() {
        Error::FrameTooLarge { size, max } => assert!(size > 100 * 1024 && max == 64 * 1024),
        other => panic!("expected FrameTooLarge, got {other:?}"),
    }
    // Too large to return: the worker refuses and says so.
    let e = python_error(pool.call("big", json!({"n": 100 * 1024})).unwrap_err());
    assert_eq!(e.error_type, "FrameTooLarge");
    // Just under the limit both ways is fine.
    assert_eq!(pool.call("length", json!({"data": "z".repeat(60 * 1024)})).unwrap(), json!(60 * 1024));
    assert_eq!(pool.call("big", json!({"n": 60 * 1024})).unwrap().as_str().unwrap().len(), 60 * 1024);
    assert_eq!(common::worker_pids(&pool), pid);
    pool.shutdown().unwrap();
}

#[test]
fn a_megabyte_payload_round_trips() {
    let pool = common::builder(1).build().unwrap();
    let data: String = (0..1_000_000).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    let back = pool.call("echo", json!({ "data": data })).unwrap();
    assert_eq!(back["data"].as_str().unwrap(), data);
    pool.shutdown().unwrap();
}

#[test]
fn a_call_that_writes_more_to_stderr_than_a_pipe_holds_still_returns() {
    // The worker's stderr is drained while its call runs: 1 MB of stderr (far more than the
    // 64 KiB a pipe holds) written during one call must not block the worker until its
    // deadline, and the last lines reach the stderr tail.
    let pool = common::builder(1).request_timeout(Duration::from_secs(20)).build().unwrap();
    let pids = common::worker_pids(&pool);
    for _ in 0..3 {
        assert_eq!(pool.call("chatter", json!({"lines": 10_000})).unwrap(), json!(10_000));
    }
    assert_eq!(common::worker_pids(&pool), pids, "never replaced");
    pool.shutdown().unwrap();
    common::assert_gone(&pids, Duration::from_secs(5));
}

/// This process's resident memory, from /proc.
fn own_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    kib * 1024
}

#[test]
fn a_worker_that_floods_stderr_without_newlines_does_not_grow_the_host() {
    // 200 MiB of stderr with no newline: the host keeps at most one capped line of it.
    let pool = common::builder(1).request_timeout(Duration::from_secs(60)).build().unwrap();
    let pids = common::worker_pids(&pool);
    let before = own_rss();
    assert_eq!(pool.call("flood_stderr", json!({"mb": 200})).unwrap(), json!(200));
    let grown = own_rss().saturating_sub(before);
    assert!(grown < 32 << 20, "the host grew by {} MiB reading 200 MiB of stderr", grown >> 20);
    assert_eq!(pool.call("add", json!([1, 2])).unwrap(), json!(3));
    pool.shutdown().unwrap();
    common::assert_gone(&pids, Duration::from_secs(5));
}
