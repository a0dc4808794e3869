//! The thread profile: one Python process serving many calls at once.

mod common;

use std::time::Duration;

use serde_json::json;
use snakepit::{CallOptions, Error, Pool, PoolSet, Profile, TimeoutKind};

fn thread_pool(size: usize, threads: usize) -> snakepit::PoolBuilder {
    common::builder(size).adapter("thread_adapter").profile(Profile::Thread).threads_per_worker(threads)
}

#[test]
fn one_worker_runs_up_to_its_threads_at_once_and_a_fifth_call_waits() {
    let pool = thread_pool(1, 4).build().unwrap();
    assert_eq!(pool.stats().unwrap().workers[0].capacity, 4);
    let pool = &pool;
    std::thread::scope(|s| {
        let calls: Vec<_> =
            (0..4).map(|i| s.spawn(move || pool_call(pool, json!({"seconds": 0.3, "tag": i})))).collect();
        assert!(
            common::wait_until(Duration::from_secs(5), || pool.stats().unwrap().workers[0].in_flight == 4)
        );
        // All four threads are busy: the fifth call queues in the pool.
        let fifth = s.spawn(move || pool_call(pool, json!({"seconds": 0.01, "tag": 4})));
        assert!(common::wait_until(Duration::from_secs(5), || pool.stats().unwrap().queued == 1));
        for c in calls {
            c.join().unwrap();
        }
        fifth.join().unwrap();
    });
    assert_eq!(pool.call("peak", json!({})).unwrap(), json!(4), "exactly four ran at once");
    let pids = common::worker_pids(pool);
    pool.shutdown().unwrap();
    common::assert_gone(&pids, Duration::from_secs(5));
}

fn pool_call(pool: &Pool, args: serde_json::Value) -> serde_json::Value {
    pool.call("nap", args).unwrap()
}

#[test]
fn out_of_order_replies_reach_the_right_callers() {
    let pool = thread_pool(2, 8).build().unwrap();
    std::thread::scope(|s| {
        for t in 0..16 {
            let pool = &pool;
            s.spawn(move || {
                for i in 0..200 {
                    let tag = format!("{t}-{i}");
                    assert_eq!(pool.call("jitter_tag", json!({ "tag": tag })).unwrap(), json!(tag));
                }
            });
        }
    });
    let s = pool.stats().unwrap();
    assert_eq!((s.calls_ok, s.calls_failed), (3200, 0));
    pool.shutdown().unwrap();
}

#[test]
fn killing_a_thread_worker_fails_every_call_it_held_and_the_pool_recovers() {
    let pool = thread_pool(1, 4).build().unwrap();
    let pid = common::worker_pids(&pool)[0];
    let pool = &pool;
    std::thread::scope(|s| {
        let calls: Vec<_> =
            (0..4).map(|i| s.spawn(move || pool.call("nap", json!({"seconds": 5, "tag": i})))).collect();
        assert!(
            common::wait_until(Duration::from_secs(5), || pool.stats().unwrap().workers[0].in_flight == 4)
        );
        assert!(std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap()
            .success());
        for c in calls {
            match c.join().unwrap().unwrap_err() {
                Error::WorkerDied { pid: p, collateral: false, .. } => assert_eq!(p, pid),
                other => panic!("expected WorkerDied, got {other:?}"),
            }
        }
    });
    assert!(common::settled(pool));
    assert_ne!(pool.call("pid", json!({})).unwrap(), json!(pid));
    pool.shutdown().unwrap();
    common::assert_gone(&[pid], Duration::from_secs(5));
}

#[test]
fn commands_not_declared_thread_safe_refuse_to_start() {
    let err = common::builder(1).profile(Profile::Thread).build().unwrap_err();
    match &err {
        Error::Startup { error: Some(remote), .. } => {
            assert_eq!(remote.error_type, "ThreadSafetyError");
            for name in ["add", "boom", "pid"] {
                assert!(remote.message.contains(name), "{}", remote.message);
            }
        }
        other => panic!("expected a start-up error, got {other:?}"),
    }
    // Allowed explicitly, the same adapter runs threaded.
    let pool = common::builder(1).profile(Profile::Thread).allow_unsafe_threads(true).build().unwrap();
    assert_eq!(pool.call("add", json!([1, 2])).unwrap(), json!(3));
    pool.shutdown().unwrap();
}

#[test]
fn a_timed_out_call_does_not_kill_its_co_tenants() {
    let pool = thread_pool(1, 4).build().unwrap();
    let pid = common::worker_pids(&pool)[0];
    std::thread::scope(|s| {
        let neighbour = s.spawn(|| pool.call("nap", json!({"seconds": 0.6, "tag": "n"})));
        let late = pool.call_with(
            "nap",
            json!({"seconds": 1.0}),
            CallOptions::new().timeout(Duration::from_millis(200)),
        );
        assert!(matches!(late, Err(Error::Timeout { kind: TimeoutKind::Call, .. })), "{late:?}");
        // The timed-out call's thread is still busy: its slot stays taken until it returns.
        assert!(pool.stats().unwrap().workers[0].in_flight >= 1);
        assert_eq!(neighbour.join().unwrap().unwrap()["tag"], json!("n"), "the co-tenant finished");
    });
    assert!(common::wait_until(Duration::from_secs(5), || pool.stats().unwrap().workers[0].in_flight == 0));
    assert_eq!(common::worker_pids(&pool), vec![pid], "the worker was not killed");
    pool.shutdown().unwrap();
}

#[test]
fn kill_on_timeout_fails_co_tenants_as_collateral() {
    let pool = thread_pool(1, 4).kill_on_timeout(true).build().unwrap();
    let pid = common::worker_pids(&pool)[0];
    std::thread::scope(|s| {
        let neighbour = s.spawn(|| pool.call("nap", json!({"seconds": 3.0, "tag": "n"})));
        assert!(
            common::wait_until(Duration::from_secs(5), || pool.stats().unwrap().workers[0].in_flight == 1)
        );
        let late = pool.call_with(
            "nap",
            json!({"seconds": 3.0}),
            CallOptions::new().timeout(Duration::from_millis(200)),
        );
        assert!(matches!(late, Err(Error::Timeout { kind: TimeoutKind::Call, .. })), "{late:?}");
        match neighbour.join().unwrap().unwrap_err() {
            Error::WorkerDied { collateral: true, .. } => {}
            other => panic!("expected collateral WorkerDied, got {other:?}"),
        }
    });
    common::assert_gone(&[pid], Duration::from_secs(5));
    pool.shutdown().unwrap();
}

#[test]
fn a_busy_thread_worker_still_answers_health_pings() {
    let pool = thread_pool(1, 2)
        .health_interval(Duration::from_millis(50))
        .health_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let pid = common::worker_pids(&pool)[0];
    std::thread::scope(|s| {
        let a = s.spawn(|| pool.call("nap", json!({"seconds": 1.0})));
        let b = s.spawn(|| pool.call("nap", json!({"seconds": 1.0})));
        assert!(a.join().unwrap().is_ok() && b.join().unwrap().is_ok());
    });
    assert_eq!(pool.stats().unwrap().recycles.health_check, 0);
    assert_eq!(common::worker_pids(&pool), vec![pid]);
    pool.shutdown().unwrap();
}

#[test]
fn process_and_thread_pools_side_by_side() {
    let set = PoolSet::builder()
        .pool(common::builder(2).name("proc"))
        .pool(thread_pool(1, 8).name("threads"))
        .build()
        .unwrap();
    let stats = set.stats().unwrap();
    assert_eq!(stats["proc"].workers[0].capacity, 1);
    assert_eq!(stats["threads"].workers[0].capacity, 8);
    // Numeric libraries get one thread per process worker; the pool's env still wins.
    assert_eq!(set.call("proc", "getenv", json!({"name": "OPENBLAS_NUM_THREADS"})).unwrap(), json!("1"));
    assert_eq!(set.call("proc", "getenv", json!({"name": "OMP_NUM_THREADS"})).unwrap(), json!("1"));
    std::thread::scope(|s| {
        for i in 0..8 {
            let set = &set;
            s.spawn(move || {
                assert_eq!(set.call("proc", "add", json!([i, 1])).unwrap(), json!(i + 1));
                assert_eq!(set.call("threads", "jitter_tag", json!({"tag": i})).unwrap(), json!(i));
            });
        }
    });
    drop(set);
    let own = Pool::builder()
        .size(1)
        .python_path(common::fixtures())
        .adapter("basic_adapter")
        .env("OMP_NUM_THREADS", "4")
        .build()
        .unwrap();
    assert_eq!(own.call("getenv", json!({"name": "OMP_NUM_THREADS"})).unwrap(), json!("4"));
    own.shutdown().unwrap();
}

#[test]
fn a_recycled_thread_worker_left_with_only_timed_out_calls_is_killed() {
    // Each round leaves a call running for a minute after its caller timed out; with ttl the
    // worker is recycled meanwhile. Nobody waits for those calls, so the draining worker must
    // not linger (processes would pile up, one per recycle).
    let pool = thread_pool(1, 4)
        .ttl(Duration::from_millis(300))
        .jitter(0.0)
        .reaper_interval(Duration::from_millis(20))
        .build()
        .unwrap();
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.extend(common::worker_pids(&pool));
        let late = pool.call_with(
            "nap",
            json!({"seconds": 60}),
            CallOptions::new().timeout(Duration::from_millis(100)),
        );
        assert!(matches!(late, Err(Error::Timeout { kind: TimeoutKind::Call, .. })), "{late:?}");
        std::thread::sleep(Duration::from_millis(400));
        let live = pool.stats().unwrap().workers.len();
        assert!(live <= 2, "a worker and at most its replacement, found {live}");
    }
    assert!(common::settled(&pool));
    let now = common::worker_pids(&pool);
    let gone: Vec<u32> = seen.into_iter().filter(|p| !now.contains(p)).collect();
    assert!(!gone.is_empty(), "workers were recycled");
    common::assert_gone(&gone, Duration::from_secs(5));
    assert!(pool.call("pid", json!({})).is_ok());
    pool.shutdown().unwrap();
}
