//! Sessions: state kept in one worker across calls, in every affinity mode, from several
//! threads; their end frees the Python state; limits, stats and events.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use snakepit::{Affinity, CallOptions, Error, Event, Pool, PoolBuilder, SessionEnd, SessionOptions};

fn builder(size: usize) -> PoolBuilder {
    common::builder(size).adapter("session_adapter")
}

/// Points on y = 3x + 2, for fitting.
fn points() -> Value {
    json!((0..10).map(|x| [x, 3 * x + 2]).collect::<Vec<_>>())
}

/// The live session states each worker reports, by worker id.
fn live_states(pool: &Pool) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for w in pool.stats().unwrap().workers {
        let info = pool.call_on(w.id, "info", json!({}), CallOptions::new()).unwrap();
        out.push((w.id, info["sessions"].as_u64().expect("info reports its live sessions")));
    }
    out
}

/// Four threads, each with its own session on a pool of 3: fit once, then 25 predictions each.
/// Returns (correct answers, errors, fail-fast refusals retried).
fn fit_and_predict(pool: &Pool, affinity: Affinity) -> (usize, Vec<String>, usize) {
    let results = Mutex::new((0, Vec::new(), 0));
    std::thread::scope(|scope| {
        for t in 0..4 {
            let results = &results;
            scope.spawn(move || {
                // The training points travel in the context too: a prefer session that lands
                // on a worker without the model refits from them.
                let options = SessionOptions::new().affinity(affinity).context(json!({"points": points()}));
                let session = pool.session_with(options).unwrap();
                let mut tries = 0;
                loop {
                    match session.call("fit", json!({"points": points()})) {
                        Err(Error::SessionBusy { .. }) if tries < 1000 => {
                            tries += 1;
                            results.lock().unwrap().2 += 1;
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        Err(e) => panic!("fit: {e}"),
                        Ok(_) => break,
                    }
                }
                for i in 0..25 {
                    let x = t * 100 + i;
                    let mut tries = 0;
                    let answer = loop {
                        match session.call("predict", json!({"x": x})) {
                            Err(Error::SessionBusy { .. }) if tries < 1000 => {
                                tries += 1;
                                results.lock().unwrap().2 += 1;
                                std::thread::sleep(Duration::from_millis(1));
                            }
                            other => break other,
                        }
                    };
                    let mut r = results.lock().unwrap();
                    match answer {
                        Ok(v) if (v.as_f64().unwrap() - (3 * x + 2) as f64).abs() < 1e-9 => r.0 += 1,
                        Ok(v) => r.1.push(format!("x={x}: {v}")),
                        Err(e) => r.1.push(format!("x={x}: {e}")),
                    }
                }
            });
        }
    });
    results.into_inner().unwrap()
}

#[test]
fn without_a_session_the_model_is_on_one_worker_only() {
    // What a new user saw: calls go to the least-loaded worker, and most find no model.
    let pool = builder(3).build().unwrap();
    let pids = common::worker_pids(&pool);
    pool.call("fit", json!({"points": points()})).unwrap();
    let errors = (0..9).filter(|&x| pool.call("predict", json!({"x": x})).is_err()).count();
    assert!(errors > 0, "some calls reached a worker without the model");
    pool.shutdown().unwrap();
    common::assert_gone(&pids, Duration::from_secs(5));
}

#[test]
fn fit_then_predict_from_four_threads_is_right_in_every_mode() {
    let pool = builder(3).build().unwrap();
    let pids = common::worker_pids(&pool);
    for affinity in [Affinity::Strict, Affinity::Prefer, Affinity::StrictFailFast] {
        let (correct, errors, _busy) = fit_and_predict(&pool, affinity);
        assert_eq!((correct, errors), (100, Vec::<String>::new()), "{affinity:?}");
    }
    // Every session was dropped: every worker freed every state.
    assert!(
        common::wait_until(Duration::from_secs(5), || live_states(&pool).iter().all(|&(_, n)| n == 0)),
        "{:?}",
        live_states(&pool)
    );
    let stats = pool.stats().unwrap();
    assert_eq!((stats.sessions.live, stats.sessions.closed), (0, 12));
    pool.shutdown().unwrap();
    common::assert_gone(&pids, Duration::from_secs(5));
}

#[test]
fn one_strict_session_shared_by_threads_keeps_its_worker() {
    let pool = builder(3).profile(snakepit::Profile::Thread).threads_per_worker(4).build().unwrap();
    let pids = common::worker_pids(&pool);
    let session = Arc::new(pool.session().unwrap());
    let fitted = session.call("fit", json!({"points": points()})).unwrap();
    let worker_pid = fitted["pid"].as_u64().unwrap();
    std::thread::scope(|scope| {
        for t in 0..4 {
            let session = session.clone();
            scope.spawn(move || {
                for i in 0..10 {
                    let x = t * 10 + i;
                    let y = session.call("predict", json!({"x": x, "delay": 0.002})).unwrap();
                    assert_eq!(y.as_f64().unwrap(), (3 * x + 2) as f64);
                }
            });
        }
    });
    let state = session.call("state", json!({})).unwrap();
    assert_eq!(state["pid"].as_u64(), Some(worker_pid), "every call ran on the session's worker");
    assert_eq!(state["calls"], json!(42), "fit, 40 predictions and this call");
    assert_eq!(state["id"], json!(session.id().to_string()));
    assert_eq!(session.info().calls, 42);
    drop(session);
    pool.shutdown().unwrap();
    common::assert_gone(&pids, Duration::from_secs(5));
}

#[test]
fn a_fail_fast_session_is_refused_at_once_while_its_worker_is_busy() {
    let pool = builder(2).build().unwrap();
    let session = pool.session_with(SessionOptions::new().affinity(Affinity::StrictFailFast)).unwrap();
    let worker = session.worker().expect("bound at once");
    std::thread::scope(|scope| {
        let busy = scope.spawn(|| pool.call_on(worker, "sleep", json!({"seconds": 1.0}), CallOptions::new()));
        assert!(common::wait_until(Duration::from_secs(5), || {
            pool.stats().unwrap().workers.iter().any(|w| w.id == worker && w.in_flight == 1)
        }));
        match session.call("state", json!({})) {
            Err(Error::SessionBusy { session: s, worker: w }) => assert_eq!((s, w), (session.id(), worker)),
            other => panic!("expected SessionBusy, got {other:?}"),
        }
        busy.join().unwrap().unwrap();
    });
    assert_eq!(session.call("state", json!({})).unwrap()["calls"], json!(1), "the refused call never ran");
    drop(session);
    pool.shutdown().unwrap();
}

#[test]
fn ending_a_session_frees_its_state_and_runs_the_end_hook() {
    let dir = std::env::temp_dir().join(format!("snakepit-session-end-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("ended.log");
    let _ = std::fs::remove_file(&log);
    let events = Arc::new(Mutex::new(Vec::new()));
    let seen = events.clone();
    let pool = builder(1)
        .env("SESSION_END_LOG", log.to_str().unwrap())
        .on_event(move |e| seen.lock().unwrap().push(e.clone()))
        .build()
        .unwrap();
    let (a, b) = (pool.session().unwrap(), pool.session().unwrap());
    a.call("fit", json!({"points": points()})).unwrap();
    b.call("fit", json!({"points": points()})).unwrap();
    assert_eq!(live_states(&pool)[0].1, 2);
    let a_id = a.id();
    a.close();
    assert!(common::wait_until(Duration::from_secs(5), || live_states(&pool)[0].1 == 1));
    // The hooks run on a thread of their own in the worker.
    assert!(common::wait_until(Duration::from_secs(5), || std::fs::read_to_string(&log)
        .is_ok_and(|t| !t.is_empty())));
    let ended = std::fs::read_to_string(&log).unwrap();
    assert!(ended.starts_with(&format!("{a_id} ")) && ended.trim_end().ends_with(" True"), "{ended}");
    // The other session's state is untouched.
    assert_eq!(b.call("predict", json!({"x": 1})).unwrap(), json!(5.0));
    drop(b);
    assert!(common::wait_until(Duration::from_secs(5), || live_states(&pool)[0].1 == 0));
    pool.shutdown().unwrap();
    let events = events.lock().unwrap();
    let started = events.iter().filter(|e| matches!(e, Event::SessionStarted { .. })).count();
    let closed =
        events.iter().filter(|e| matches!(e, Event::SessionEnded { reason: SessionEnd::Closed, .. })).count();
    assert_eq!((started, closed), (2, 2));
    assert!(events.iter().any(|e| matches!(e, Event::CallCompleted { session: Some(s), .. } if *s == a_id)));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_idle_session_expires_and_its_state_is_freed() {
    let pool = builder(1).session_ttl(Duration::from_millis(300)).build().unwrap();
    let session = pool.session().unwrap();
    session.call("fit", json!({"points": points()})).unwrap();
    // Calls keep it alive past its time-out.
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(150));
        session.call("predict", json!({"x": 1})).unwrap();
    }
    assert_eq!(live_states(&pool)[0].1, 1);
    assert!(common::wait_until(Duration::from_secs(5), || live_states(&pool)[0].1 == 0), "freed by expiry");
    match session.call("predict", json!({"x": 1})) {
        Err(Error::SessionClosed { reason: SessionEnd::Expired, session: s }) => assert_eq!(s, session.id()),
        other => panic!("expected SessionClosed(Expired), got {other:?}"),
    }
    let stats = pool.stats().unwrap();
    assert_eq!((stats.sessions.live, stats.sessions.expired), (0, 1));
    drop(session);
    assert_eq!(pool.stats().unwrap().sessions.closed, 0, "an expired session is not closed again");
    pool.shutdown().unwrap();
}

#[test]
fn the_session_limit_is_a_clear_error_and_closing_makes_room() {
    let pool = builder(1).max_sessions(2).build().unwrap();
    let a = pool.session().unwrap();
    let _b = pool.session().unwrap();
    match pool.session() {
        Err(e @ Error::TooManySessions { max_sessions: 2 }) => {
            assert!(e.to_string().contains("max_sessions"))
        }
        other => panic!("expected TooManySessions, got {other:?}"),
    }
    drop(a);
    let c = pool.session().unwrap();
    assert_eq!(pool.sessions().len(), 2);
    assert_eq!(pool.sessions().last().unwrap().id, c.id());
    pool.shutdown().unwrap();
}

#[test]
fn a_context_travels_with_every_call_and_can_change() {
    let pool = builder(1).build().unwrap();
    let session = pool.session_with(SessionOptions::new().context(json!({"v": 1}))).unwrap();
    assert_eq!(session.call("state", json!({})).unwrap()["context"], json!({"v": 1}));
    session.set_context(Some(json!({"v": 2})));
    assert_eq!(session.call("state", json!({})).unwrap()["context"], json!({"v": 2}));
    session.set_context(None);
    assert_eq!(session.call("state", json!({})).unwrap()["context"], Value::Null);
    // A call without a session gets a throwaway store.
    let plain = pool.call("state", json!({})).unwrap();
    assert_eq!((plain["id"].clone(), plain["fresh"].clone()), (Value::Null, json!(true)));
    drop(session);
    pool.shutdown().unwrap();
}

#[test]
fn sessions_spread_over_the_workers_and_calls_after_shutdown_fail_cleanly() {
    let pool = builder(3).build().unwrap();
    let sessions: Vec<_> = (0..6).map(|_| pool.session().unwrap()).collect();
    let mut per_worker = std::collections::HashMap::new();
    for s in &sessions {
        *per_worker.entry(s.worker().unwrap()).or_insert(0) += 1;
    }
    assert_eq!(per_worker.values().copied().collect::<Vec<_>>(), vec![2, 2, 2], "{per_worker:?}");
    assert!(pool.stats().unwrap().workers.iter().all(|w| w.sessions == 2));
    pool.shutdown().unwrap();
    assert!(matches!(sessions[0].call("state", json!({})), Err(Error::ShuttingDown)));
    assert!(matches!(pool.session(), Err(Error::ShuttingDown)));
}
