//! Recycling by request count, age, memory and by hand: make before break, no call lost, no
//! capacity lost, nothing left behind.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::json;
use snakepit::{Error, Event, KilledBy, RecycleReason};

fn pid_of(v: &serde_json::Value) -> u32 {
    v.as_u64().unwrap() as u32
}

#[test]
fn max_requests_is_exact_and_no_call_is_lost() {
    let pool = common::builder(2).max_requests(50).jitter(0.0).build().unwrap();
    let served: Mutex<HashMap<u32, u64>> = Mutex::new(HashMap::new());
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                for _ in 0..250 {
                    let pid = pid_of(&pool.call("pid", json!({})).expect("no call fails"));
                    *served.lock().unwrap().entry(pid).or_default() += 1;
                }
            });
        }
    });
    let served = served.into_inner().unwrap();
    assert_eq!(served.values().sum::<u64>(), 2000);
    assert!(served.values().all(|&n| n <= 50), "a worker served more than 50: {served:?}");
    assert!(common::settled(&pool));
    let stats = pool.stats().unwrap();
    let live: HashSet<u32> = stats.workers.iter().map(|w| w.pid).collect();
    let retired: Vec<u32> = served.keys().copied().filter(|p| !live.contains(p)).collect();
    // Each retired worker served between three quarters of its limit (its replacement starts
    // then, and it retires once that is ready) and the limit, and each was counted.
    assert!(retired.iter().all(|p| (37..=50).contains(&served[p])), "{served:?}");
    assert_eq!(stats.recycles.max_requests, retired.len() as u64);
    assert!(retired.len() >= 36, "2000 calls / 50 per worker, minus the live ones: {}", retired.len());
    assert_eq!((stats.calls_failed, stats.crashes, stats.restarts), (0, 0, 0));
    pool.shutdown().unwrap();
    let all: Vec<u32> = served.keys().copied().collect();
    common::assert_gone(&all, Duration::from_secs(5));
}

#[test]
fn max_requests_with_jitter_stays_within_limit_plus_jitter() {
    let pool = common::builder(2).max_requests(20).jitter(0.5).build().unwrap();
    let mut served: HashMap<u32, u64> = HashMap::new();
    for _ in 0..400 {
        *served.entry(pid_of(&pool.call("pid", json!({})).unwrap())).or_default() += 1;
    }
    assert!(served.values().all(|&n| n < 30), "limit 20 plus at most 50%: {served:?}");
    // Jitter spreads the limits: the retired workers did not all serve the same number.
    let counts: HashSet<u64> = served.values().copied().collect();
    assert!(counts.len() > 1, "{served:?}");
    pool.shutdown().unwrap();
}

#[test]
fn ttl_recycles_under_load_without_failures_or_lost_capacity() {
    let pool = common::builder(2)
        .ttl(Duration::from_millis(300))
        .reaper_interval(Duration::from_millis(20))
        .build()
        .unwrap();
    let first = common::worker_pids(&pool);
    let stop = AtomicBool::new(false);
    let low_water = Mutex::new(usize::MAX);
    let pids: Mutex<HashSet<u32>> = Mutex::new(HashSet::new());
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let r = pool.call("tag", json!({"value": 1, "delay": 0.005})).expect("no call fails");
                    pids.lock().unwrap().insert(pid_of(&r["pid"]));
                }
            });
        }
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let ready = pool.stats().unwrap().ready_workers;
                let mut low = low_water.lock().unwrap();
                *low = (*low).min(ready);
                drop(low);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        std::thread::sleep(Duration::from_millis(2500));
        stop.store(true, Ordering::Relaxed);
    });
    let stats = pool.stats().unwrap();
    assert_eq!(stats.calls_failed, 0);
    assert!(stats.recycles.ttl >= 2, "{:?}", stats.recycles);
    assert!(*low_water.lock().unwrap() >= 2, "ready workers dropped below the pool size");
    let pids = pids.into_inner().unwrap();
    assert!(pids.len() > 2, "workers were replaced: {pids:?}");
    assert!(first.iter().any(|p| !common::worker_pids(&pool).contains(p)));
    pool.shutdown().unwrap();
    common::assert_gone(&pids.into_iter().collect::<Vec<_>>(), Duration::from_secs(5));
}

#[test]
fn a_long_call_outlives_its_workers_ttl_then_the_worker_is_replaced() {
    let pool = common::builder(1)
        .ttl(Duration::from_millis(200))
        .reaper_interval(Duration::from_millis(20))
        .build()
        .unwrap();
    let old = common::worker_pids(&pool)[0];
    let r = pool.call("tag", json!({"value": "long", "delay": 1.0})).unwrap();
    assert_eq!((r["value"].as_str(), pid_of(&r["pid"])), (Some("long"), old), "the call completed normally");
    assert!(common::wait_until(Duration::from_secs(10), || !common::worker_pids(&pool).contains(&old)));
    common::assert_gone(&[old], Duration::from_secs(5));
    assert!(pool.stats().unwrap().recycles.ttl >= 1);
    let new = pid_of(&pool.call("pid", json!({})).unwrap());
    assert_ne!(new, old);
    pool.shutdown().unwrap();
}

#[test]
fn max_memory_recycles_a_worker_whose_process_tree_grows() {
    let events = std::sync::Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let pool = common::builder(1)
        .max_memory(80 << 20)
        .jitter(0.0)
        .reaper_interval(Duration::from_millis(50))
        .on_event(move |e| sink.lock().unwrap().push(e.clone()))
        .build()
        .unwrap();
    // The worker stays small; a child it started holds the memory.
    let old = common::worker_pids(&pool)[0];
    let child = pool.call("hog_child", json!({"mb": 120})).unwrap().as_u64().unwrap() as u32;
    assert!(common::wait_until(Duration::from_secs(20), || pool.stats().unwrap().recycles.memory >= 1));
    assert!(common::wait_until(Duration::from_secs(10), || !common::worker_pids(&pool).contains(&old)));
    // Recycling killed the old worker's whole group, child included.
    common::assert_gone(&[old, child], Duration::from_secs(5));
    assert_ne!(pid_of(&pool.call("pid", json!({})).unwrap()), old);
    let recycled = events.lock().unwrap().iter().find_map(|e| match e {
        Event::WorkerRecycled { reason: RecycleReason::Memory, pid, rss_bytes, .. } => {
            Some((*pid, *rss_bytes))
        }
        _ => None,
    });
    let (pid, rss) = recycled.expect("a WorkerRecycled event with reason Memory");
    assert_eq!(pid, old);
    assert!(rss.unwrap() > 80 << 20, "{rss:?}");
    pool.shutdown().unwrap();
}

#[test]
fn the_hard_memory_ceiling_kills_at_once() {
    let pool = common::builder(1)
        .max_memory_hard(80 << 20)
        .reaper_interval(Duration::from_millis(50))
        .build()
        .unwrap();
    let old = common::worker_pids(&pool)[0];
    // The reaper may kill the worker while the call is still filling memory: that is the
    // hard ceiling working, and the call then fails as the worker died.
    match pool.call("hog", json!({"mb": 120})) {
        Ok(v) => assert_eq!(v, json!(120)),
        Err(Error::WorkerDied { pid, .. }) => assert_eq!(pid, old),
        Err(other) => panic!("unexpected {other:?}"),
    }
    assert!(common::wait_until(Duration::from_secs(20), || pool.stats().unwrap().recycles.memory == 1));
    common::assert_gone(&[old], Duration::from_secs(5));
    assert!(common::settled(&pool));
    assert_ne!(pid_of(&pool.call("pid", json!({})).unwrap()), old);
    pool.shutdown().unwrap();
}

#[test]
fn a_call_on_a_worker_killed_at_the_memory_ceiling_says_the_pool_killed_it() {
    // Not to be mistaken for the kernel's OOM killer: the error says the pool did it, and why.
    let pool = common::builder(1)
        .max_memory_hard(80 << 20)
        .reaper_interval(Duration::from_millis(50))
        .build()
        .unwrap();
    let old = common::worker_pids(&pool)[0];
    let err = pool.call("hog_and_wait", json!({"mb": 120, "seconds": 30})).unwrap_err();
    match &err {
        Error::WorkerDied { pid, killed_by: Some(KilledBy::MemoryLimit), collateral: false, .. } => {
            assert_eq!(*pid, old)
        }
        other => panic!("expected WorkerDied killed by the memory limit, got {other:?}"),
    }
    assert!(err.to_string().contains("killed by the pool: its memory passed max_memory_hard"), "{err}");
    pool.shutdown().unwrap();
    common::assert_gone(&[old], Duration::from_secs(5));
}

#[test]
fn recycle_all_is_a_rolling_restart_that_loses_no_call() {
    let pool = common::builder(2).build().unwrap();
    let before = common::worker_pids(&pool);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let load = s.spawn(|| {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                pool.call("add", json!([n, 1])).expect("no call fails during a rolling restart");
                n += 1;
            }
            n
        });
        pool.recycle_all().unwrap();
        stop.store(true, Ordering::Relaxed);
        assert!(load.join().unwrap() > 0);
    });
    assert!(common::settled(&pool));
    let after = common::worker_pids(&pool);
    assert!(after.iter().all(|p| !before.contains(p)), "{before:?} -> {after:?}");
    let stats = pool.stats().unwrap();
    assert_eq!((stats.recycles.manual, stats.calls_failed), (2, 0));
    common::assert_gone(&before, Duration::from_secs(5));
    assert!(matches!(pool.recycle_worker(9999), Err(Error::UnknownWorker { worker: 9999 })));
    pool.shutdown().unwrap();
    common::assert_gone(&after, Duration::from_secs(5));
}

#[test]
fn a_replacement_that_cannot_start_leaves_the_old_worker_serving() {
    let flag = std::env::temp_dir().join(format!("snakepit-norepl-{}", std::process::id()));
    let _ = std::fs::remove_file(&flag);
    let pool = common::flaky_builder(&flag, (Duration::from_millis(50), Duration::from_millis(200)))
        .build()
        .unwrap();
    let old = common::worker_pids(&pool)[0];
    std::fs::write(&flag, b"fail").unwrap();
    let id = pool.stats().unwrap().workers[0].id;
    match pool.recycle_worker(id).unwrap_err() {
        Error::Startup { message, .. } => assert!(message.contains("flag file"), "{message}"),
        other => panic!("expected the replacement's start-up error, got {other:?}"),
    }
    assert_eq!(pid_of(&pool.call("pid", json!({})).unwrap()), old, "the old worker still serves");
    let stats = pool.stats().unwrap();
    assert_eq!((stats.ready_workers, stats.recycles.manual, stats.degraded), (1, 0, false));
    // Once a start can succeed again, the same worker can be recycled.
    std::fs::remove_file(&flag).unwrap();
    pool.recycle_worker(id).unwrap();
    assert_ne!(pid_of(&pool.call("pid", json!({})).unwrap()), old);
    pool.shutdown().unwrap();
    common::assert_gone(&[old], Duration::from_secs(5));
}

#[test]
fn max_concurrent_recycles_bounds_how_many_are_replaced_at_once() {
    let pool = common::builder(3)
        .ttl(Duration::from_millis(200))
        .jitter(0.0)
        .max_concurrent_recycles(1)
        .reaper_interval(Duration::from_millis(10))
        .build()
        .unwrap();
    let mut most = 0;
    let mut samples = 0;
    let end = std::time::Instant::now() + Duration::from_millis(2000);
    while std::time::Instant::now() < end {
        let s = pool.stats().unwrap();
        // All three reach their ttl together; only one at a time is being replaced.
        most = most.max(s.workers.iter().filter(|w| w.recycling.is_some()).count());
        assert!(s.ready_workers >= 3, "capacity never drops: {:?}", s.workers);
        samples += 1;
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(samples > 100);
    assert_eq!(most, 1, "one recycle at a time");
    assert!(pool.stats().unwrap().recycles.ttl >= 3);
    pool.shutdown().unwrap();
}

#[test]
fn replacements_killed_for_time_outs_never_shrink_or_grow_the_pool() {
    // Small budgets and calls that overrun their deadline: replacements get killed while their
    // old workers are still around. The pool must keep serving at its size.
    let pool = common::builder(1).max_requests(3).jitter(0.0).build().unwrap();
    let short = snakepit::CallOptions::new().timeout(Duration::from_millis(150));
    for i in 0..12 {
        if i % 3 == 2 {
            let late = pool.call_with("sleep", json!({"seconds": 5}), short.clone());
            assert!(matches!(late, Err(Error::Timeout { .. })), "{late:?}");
        } else {
            assert_eq!(pool.call("add", json!([i, 1])).unwrap(), json!(i + 1), "call {i}");
        }
        let live = pool
            .stats()
            .unwrap()
            .workers
            .iter()
            .filter(|w| w.state != snakepit::WorkerState::Stopping)
            .count();
        // Size 1 plus one replacement, plus the worker before it if its timed-out command is
        // still being asked to stop (it serves no call meanwhile).
        assert!(live <= 3, "size 1 plus two at most, found {live}");
    }
    assert!(common::settled(&pool), "back to exactly one ready worker");
    for i in 0..5 {
        assert_eq!(pool.call("add", json!([i, 1])).unwrap(), json!(i + 1));
    }
    pool.shutdown().unwrap();
}

#[test]
fn an_orphan_of_the_workers_tree_counts_toward_its_memory() {
    // A helper whose parent exited is adopted by the worker's keeper, not by the worker: it is
    // still the worker's, and the hard ceiling must see it (and kill it with the worker).
    let pool = common::builder(1)
        .max_memory_hard(80 << 20)
        .reaper_interval(Duration::from_millis(50))
        .build()
        .unwrap();
    let old = common::worker_pids(&pool)[0];
    let hog = pool.call("orphan_hog", json!({"mb": 150})).unwrap().as_u64().unwrap() as u32;
    assert_ne!(common::parent_of(hog), Some(old), "an orphan, not the worker's child");
    let gone = common::wait_until(Duration::from_secs(10), || !common::alive(hog));
    if !gone {
        let _ = std::process::Command::new("kill").args(["-9", &hog.to_string()]).status();
    }
    assert!(gone, "a 150 MiB orphan escaped max_memory_hard (80 MiB)");
    assert!(common::wait_until(Duration::from_secs(10), || pool.stats().unwrap().recycles.memory == 1));
    common::assert_gone(&[old], Duration::from_secs(5));
    pool.shutdown().unwrap();
}
