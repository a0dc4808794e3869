//! Sessions at the edges: ends posted to a busy worker, a session opened on a worker about to
//! be replaced, a prefer session visiting another worker, refusals in the counters.

mod common;

use std::time::Duration;

use serde_json::json;
use snakepit::{Affinity, CallOptions, Error, SessionOptions};

fn builder(size: usize) -> snakepit::PoolBuilder {
    common::builder(size).adapter("session_adapter")
}

fn lines(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |t| t.lines().count())
}

#[test]
fn ends_posted_while_the_worker_is_busy_all_arrive_even_at_shutdown() {
    let dir = std::env::temp_dir().join(format!("snakepit-ends-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("ended.log");
    let _ = std::fs::remove_file(&log);
    let pool = builder(1).env("SESSION_END_LOG", log.to_str().unwrap()).build().unwrap();
    let pid = common::worker_pids(&pool)[0];
    // More ends than the pipe holds (64 KiB at ~40 bytes each), all while the worker sleeps.
    let sessions: Vec<_> = (0..3000)
        .map(|_| {
            let s = pool.session().unwrap();
            s.call("state", json!({})).unwrap();
            s
        })
        .collect();
    std::thread::scope(|scope| {
        let busy = scope.spawn(|| pool.call("sleep", json!({"seconds": 1.0})));
        assert!(
            common::wait_until(Duration::from_secs(5), || pool.stats().unwrap().workers[0].in_flight == 1)
        );
        drop(sessions);
        busy.join().unwrap().unwrap();
    });
    // Without another call: the pool delivers what waited once the worker reads again.
    assert!(
        common::wait_until(Duration::from_secs(10), || lines(&log) == 3000),
        "hooks ran for {} of 3000 sessions",
        lines(&log)
    );
    let info = pool.call("info", json!({})).unwrap();
    assert_eq!(info["sessions"], json!(0));
    // And ends posted just before a shutdown are delivered before the worker stops.
    let more: Vec<_> = (0..2000)
        .map(|_| {
            let s = pool.session().unwrap();
            s.call("state", json!({})).unwrap();
            s
        })
        .collect();
    std::thread::scope(|scope| {
        let busy = scope.spawn(|| pool.call("sleep", json!({"seconds": 0.5})));
        assert!(
            common::wait_until(Duration::from_secs(5), || pool.stats().unwrap().workers[0].in_flight == 1)
        );
        drop(more);
        busy.join().unwrap().unwrap();
    });
    pool.shutdown().unwrap();
    common::assert_gone(&[pid], Duration::from_secs(5));
    assert_eq!(lines(&log), 5000, "every end reached the worker before it stopped");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_session_opened_as_its_worker_is_spent_binds_to_another() {
    let pool =
        builder(2).max_requests(8).jitter(0.0).session_drain(Duration::from_millis(300)).build().unwrap();
    // Worker A ends up with fewer sessions than B (which would draw a new one to it), then
    // with its budget nearly spent: due for replacement.
    let (first, second) = (pool.session().unwrap(), pool.session().unwrap());
    let (a, b) = (first.worker().unwrap(), second.worker().unwrap());
    assert_ne!(a, b);
    drop(first);
    for _ in 0..7 {
        pool.call_on(a, "pid", json!({}), CallOptions::new()).unwrap();
    }
    let s = pool.session().unwrap();
    assert_eq!(s.worker(), Some(b), "not the worker about to be replaced");
    s.call("fit", json!({"points": [[0, 1], [1, 3], [2, 5]]})).unwrap();
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(s.call("predict", json!({"x": 3})).unwrap(), json!(7.0), "still there, not lost");
    drop((s, second));
    pool.shutdown().unwrap();
}

#[test]
fn a_prefer_session_visiting_another_worker_never_finds_stale_state_there() {
    let pool = builder(2).build().unwrap();
    let s = pool.session_with(SessionOptions::new().affinity(Affinity::Prefer)).unwrap();
    let home = s.worker().unwrap();
    let away_visit = |s: &snakepit::Session| {
        std::thread::scope(|scope| {
            let busy =
                scope.spawn(|| pool.call_on(home, "sleep", json!({"seconds": 0.5}), CallOptions::new()));
            assert!(common::wait_until(Duration::from_secs(5), || {
                pool.stats().unwrap().workers.iter().any(|w| w.id == home && w.in_flight == 1)
            }));
            let state = s.call("state", json!({})).unwrap();
            busy.join().unwrap().unwrap();
            state
        })
    };
    let at_home = s.call("state", json!({})).unwrap();
    let first = away_visit(&s);
    assert_ne!(first["pid"], at_home["pid"], "it ran on the other worker");
    assert_eq!(first["fresh"], json!(true));
    // Two more calls at home, then away again: the away store must not be the old one.
    s.call("state", json!({})).unwrap();
    s.call("state", json!({})).unwrap();
    let second = away_visit(&s);
    assert_eq!((second["fresh"].clone(), second["calls"].clone()), (json!(true), json!(1)), "{second}");
    assert_eq!(s.worker(), Some(home), "a visit is not a move");
    drop(s);
    pool.shutdown().unwrap();
}

#[test]
fn every_refused_session_call_is_counted_as_failed() {
    let pool = builder(2).build().unwrap();
    let s = pool.session().unwrap();
    s.call("state", json!({})).unwrap();
    let pid = s.call("state", json!({})).unwrap()["pid"].as_u64().unwrap();
    std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    assert!(
        common::wait_until(Duration::from_secs(10), || !common::worker_pids(&pool).contains(&(pid as u32)))
    );
    let before = pool.stats().unwrap().calls_failed;
    for _ in 0..5 {
        assert!(matches!(s.call("state", json!({})), Err(Error::SessionLost { .. })));
    }
    assert_eq!(pool.stats().unwrap().calls_failed - before, 5);
    drop(s);
    pool.shutdown().unwrap();
}
