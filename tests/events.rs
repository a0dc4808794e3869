//! Events: what is announced, in order, off the caller's and dispatcher's threads, and a slow
//! callback never stalls calls.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::bounded;
use serde_json::json;
use snakepit::{Error, Event};

fn collector() -> (Arc<Mutex<Vec<Event>>>, impl Fn(&Event) + Send + Sync + 'static) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    (events, move |e: &Event| sink.lock().unwrap().push(e.clone()))
}

#[test]
fn workers_and_calls_are_announced() {
    let (events, sink) = collector();
    let pool = common::builder(1).name("ev").max_queue(0).on_event(sink).build().unwrap();
    let pid = common::worker_pids(&pool)[0];
    pool.call("add", json!([1, 2])).unwrap();
    let _ = pool.call("boom", json!({})).unwrap_err();
    // max_queue(0): a call arriving while the only worker is busy is refused.
    std::thread::scope(|s| {
        let busy = s.spawn(|| pool.call("sleep", json!({"seconds": 0.5})));
        assert!(
            common::wait_until(Duration::from_secs(5), || pool.stats().unwrap().workers[0].in_flight == 1)
        );
        assert!(matches!(pool.call("add", json!([1, 1])), Err(Error::QueueFull { max_queue: 0 })));
        busy.join().unwrap().unwrap();
    });
    // A crash: announced as a death, then a restart.
    assert!(matches!(pool.call("exit_now", json!({"code": 4})), Err(Error::WorkerDied { .. })));
    assert!(common::settled(&pool));
    let new_pid = common::worker_pids(&pool)[0];
    pool.shutdown().unwrap();

    let events = events.lock().unwrap();
    assert!(matches!(&events[0], Event::WorkerStarted { pool, pid: p, .. } if pool == "ev" && *p == pid));
    let completed: Vec<(&str, bool)> = events
        .iter()
        .filter_map(|e| match e {
            Event::CallCompleted { command, ok, execution, .. } => {
                assert!(*execution > Duration::ZERO);
                Some((command.as_str(), *ok))
            }
            _ => None,
        })
        .collect();
    assert_eq!(completed, vec![("add", true), ("boom", false), ("sleep", true), ("exit_now", false)]);
    assert!(events.iter().any(|e| matches!(e, Event::QueueFull { max_queue: 0, .. })));
    assert!(events.iter().any(|e| matches!(e,
        Event::WorkerDied { pid: p, exit: snakepit::ExitKind::Code(4), calls_lost: 1, .. } if *p == pid)));
    assert!(events.iter().any(|e| matches!(e, Event::WorkerRestarted { pid: p, .. } if *p == new_pid)));
    assert!(events.iter().any(|e| matches!(e, Event::WorkerStarted { pid: p, .. } if *p == new_pid)));
    // Events serialise for logs and dashboards.
    let v = serde_json::to_value(&events[0]).unwrap();
    assert_eq!(v["event"], json!("worker_started"));
}

#[test]
fn a_slow_callback_never_stalls_calls() {
    let (release_tx, release_rx) = bounded::<()>(0);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    let pool = common::builder(1)
        .on_event(move |e| {
            // The callback runs on the pool's event thread, never a caller's.
            let name = std::thread::current().name().unwrap_or("").to_string();
            sink.lock().unwrap().push((name, e.clone()));
            // Blocks until the test lets it go (bounded, in case the test fails first).
            let _ = release_rx.recv_timeout(Duration::from_secs(20));
        })
        .build()
        .unwrap();
    // The callback is stuck on the first event (WorkerStarted) while 200 calls go through.
    for i in 0..200 {
        assert_eq!(pool.call("add", json!([i, 1])).unwrap(), json!(i + 1));
    }
    assert_eq!(seen.lock().unwrap().len(), 1, "the callback is still on its first event");
    // Let it go: the events queued meanwhile are delivered, in order.
    let drain =
        std::thread::spawn(move || while release_tx.send_timeout((), Duration::from_secs(2)).is_ok() {});
    assert!(common::wait_until(Duration::from_secs(20), || seen.lock().unwrap().len() == 201));
    let seen = seen.lock().unwrap();
    assert!(seen.iter().all(|(thread, _)| thread.starts_with("sp-evt-")), "{:?}", seen[0].0);
    assert!(matches!(seen[0].1, Event::WorkerStarted { .. }));
    assert!(seen[1..].iter().all(|(_, e)| matches!(e, Event::CallCompleted { ok: true, .. })));
    drop(seen);
    assert_eq!(pool.stats().unwrap().events_dropped, 0);
    pool.shutdown().unwrap();
    drain.join().unwrap();
}

#[test]
fn degradation_and_recovery_are_announced_with_visible_backoff() {
    let flag = std::env::temp_dir().join(format!("snakepit-evflaky-{}", std::process::id()));
    let _ = std::fs::remove_file(&flag);
    let (events, sink) = collector();
    let pool = common::flaky_builder(&flag, (Duration::from_millis(50), Duration::from_millis(200)))
        .degraded_after(2)
        .on_event(sink)
        .build()
        .unwrap();
    std::fs::write(&flag, b"fail").unwrap();
    assert!(matches!(pool.call("exit_now", json!({})), Err(Error::WorkerDied { .. })));
    assert!(common::wait_until(Duration::from_secs(20), || pool.stats().unwrap().startup_failures >= 4));
    std::fs::remove_file(&flag).unwrap();
    assert!(common::settled(&pool));
    pool.shutdown().unwrap();

    let events = events.lock().unwrap();
    let retries: Vec<(u32, Duration)> = events
        .iter()
        .filter_map(|e| match e {
            Event::WorkerStartFailed { attempt, retry_in, error, .. } => {
                assert!(error.contains("flag file"), "{error}");
                Some((*attempt, *retry_in))
            }
            _ => None,
        })
        .collect();
    assert!(retries.len() >= 4, "{retries:?}");
    // The backoff doubles from 50 ms and is capped at 200 ms.
    let delays: Vec<u64> = retries.iter().take(4).map(|(_, d)| d.as_millis() as u64).collect();
    assert_eq!(delays, vec![50, 100, 200, 200]);
    assert_eq!(retries.iter().map(|(a, _)| *a).take(4).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    let degraded = events.iter().position(|e| matches!(e, Event::PoolDegraded { .. })).expect("PoolDegraded");
    let recovered =
        events.iter().position(|e| matches!(e, Event::PoolRecovered { .. })).expect("PoolRecovered");
    assert!(degraded < recovered);
    assert_eq!(
        events.iter().filter(|e| matches!(e, Event::PoolDegraded { .. })).count(),
        1,
        "announced once"
    );
}
