//! Streams: a generator command's items as they come, with credit-based backpressure, on both
//! profiles; dropping a stream closes its generator; progress reports reach the caller.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use snakepit::{CallOptions, Error, Pool, PoolBuilder, Profile, Progress, TimeoutKind};

fn builder(name: &str, profile: Profile) -> PoolBuilder {
    let b = Pool::builder()
        .name(name)
        .size(1)
        .python_path(common::fixtures())
        .adapter("stream_adapter")
        .startup_timeout(Duration::from_secs(20))
        .request_timeout(Duration::from_secs(30))
        .cancel_grace(Duration::from_millis(200));
    match profile {
        Profile::Thread => b.profile(Profile::Thread).threads_per_worker(4),
        _ => b,
    }
}

fn profiles() -> [(Profile, &'static str); 2] {
    [(Profile::Process, "process"), (Profile::Thread, "thread")]
}

fn temp(name: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("snakepit-streams-{}-{name}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

#[test]
fn a_generator_streams_its_items_in_order_then_its_return_value() {
    for (profile, name) in profiles() {
        let pool = builder(&format!("st-order-{name}"), profile).build().unwrap();
        let pids = common::worker_pids(&pool);
        let mut stream = pool.stream("count", json!({"n": 100, "returns": "all done"})).unwrap();
        let items: Vec<Value> = (&mut stream).map(|c| c.unwrap()).collect();
        assert_eq!(items, (0..100).map(Value::from).collect::<Vec<_>>(), "{name}");
        assert_eq!(stream.returned(), Some(&json!("all done")), "{name}");
        assert!(stream.is_done());
        // The worker serves on, and the stream counted as one call that succeeded.
        assert_eq!(pool.call("pid", Value::Null).unwrap(), json!(common::worker_pids(&pool)[0]));
        let stats = pool.stats().unwrap();
        assert_eq!((stats.calls_ok, stats.calls_failed), (2, 0), "{name}");
        pool.shutdown().unwrap();
        common::assert_gone(&pids, Duration::from_secs(5));
    }
}

#[test]
fn the_generator_is_never_more_than_a_window_ahead_of_a_slow_consumer() {
    for (profile, name) in profiles() {
        let pool = builder(&format!("st-window-{name}"), profile).build().unwrap();
        let pids = common::worker_pids(&pool);
        let record = temp(&format!("window-{name}"));
        let window = 8u64;
        let n = 100_000u64;
        let options = CallOptions::new().window(window as u32);
        let stream = pool
            .stream_with("produced", json!({"n": n, "record": record.to_str().unwrap()}), options)
            .unwrap();
        let mut taken = 0u64;
        let mut most_ahead = 0u64;
        for chunk in stream {
            assert_eq!(chunk.unwrap(), json!(taken));
            taken += 1;
            if taken % 10_000 == 0 || taken < 50 {
                // The consumer dawdles; the generator must pause once the window is used up.
                std::thread::sleep(Duration::from_millis(if taken < 50 { 5 } else { 50 }));
                let produced: u64 = std::fs::read_to_string(&record).unwrap().trim().parse().unwrap();
                most_ahead = most_ahead.max(produced - taken);
            }
        }
        assert_eq!(taken, n, "{name}");
        // Produced but not taken: the window, plus the one the generator is about to yield.
        assert!(most_ahead <= window + 1, "{name}: the generator ran {most_ahead} chunks ahead");
        assert!(most_ahead >= window / 2, "{name}: the consumer's sleeps let it fill the window");
        pool.shutdown().unwrap();
        common::assert_gone(&pids, Duration::from_secs(5));
        let _ = std::fs::remove_file(&record);
    }
}

#[test]
fn dropping_a_stream_midway_runs_the_generators_finally_and_keeps_the_worker() {
    for (profile, name) in profiles() {
        let pool = builder(&format!("st-drop-{name}"), profile).build().unwrap();
        let pids = common::worker_pids(&pool);
        let marker = temp(&format!("drop-{name}"));
        let args = json!({"n": 1_000_000, "marker": marker.to_str().unwrap()});
        let mut stream = pool.stream_with("count", args, CallOptions::new().window(4)).unwrap();
        assert_eq!(stream.next().unwrap().unwrap(), json!(0));
        assert_eq!(stream.next().unwrap().unwrap(), json!(1));
        drop(stream);
        assert!(
            common::wait_until(Duration::from_secs(5), || std::fs::read_to_string(&marker)
                .is_ok_and(|m| m == "closed")),
            "{name}: the generator's finally ran"
        );
        // The generator let go at its next yield: the worker was not replaced.
        assert_eq!(pool.call("pid", Value::Null).unwrap(), json!(pids[0]), "{name}");
        let stats = pool.stats().unwrap();
        assert_eq!(stats.calls_failed, 1, "{name}: the dropped stream counts as cancelled");
        pool.shutdown().unwrap();
        common::assert_gone(&pids, Duration::from_secs(5));
        let _ = std::fs::remove_file(&marker);
    }
}

#[test]
fn a_plain_command_streams_its_one_value_and_a_generator_refuses_a_plain_call() {
    for (profile, name) in profiles() {
        let pool = builder(&format!("st-plain-{name}"), profile).build().unwrap();
        let pids = common::worker_pids(&pool);
        let items: Vec<Value> =
            pool.stream("plain", json!({"value": [1, 2]})).unwrap().map(|c| c.unwrap()).collect();
        assert_eq!(items, vec![json!([1, 2])], "{name}");
        match pool.call("count", json!({"n": 3})) {
            Err(Error::Python(e)) => {
                assert_eq!(e.error_type, "TypeError", "{name}");
                assert!(e.message.contains("stream"), "{name}: says how to call it: {}", e.message);
            }
            other => panic!("{name}: expected a TypeError, got {other:?}"),
        }
        assert_eq!(pool.call("pid", Value::Null).unwrap(), json!(pids[0]), "{name}");
        pool.shutdown().unwrap();
        common::assert_gone(&pids, Duration::from_secs(5));
    }
}

#[test]
fn an_error_inside_the_generator_ends_the_stream_after_its_chunks() {
    for (profile, name) in profiles() {
        let pool = builder(&format!("st-fail-{name}"), profile).build().unwrap();
        let pids = common::worker_pids(&pool);
        let items: Vec<_> = pool.stream("fails_after", json!({"n": 3})).unwrap().collect();
        assert_eq!(items.len(), 4, "{name}: three chunks, then the error");
        assert_eq!(items[2].as_ref().unwrap(), &json!(2));
        match &items[3] {
            Err(Error::Python(e)) => {
                assert_eq!((e.error_type.as_str(), e.message.as_str()), ("ValueError", "failed after 3"))
            }
            other => panic!("{name}: {other:?}"),
        }
        assert_eq!(pool.stats().unwrap().calls_failed, 1);
        pool.shutdown().unwrap();
        common::assert_gone(&pids, Duration::from_secs(5));
    }
}

#[test]
fn a_chunk_that_comes_too_late_ends_the_stream_and_the_generator_is_closed() {
    for (profile, name) in profiles() {
        let pool = builder(&format!("st-late-{name}"), profile).build().unwrap();
        let pids = common::worker_pids(&pool);
        let marker = temp(&format!("late-{name}"));
        let args = json!({"n": 3, "delay": 5.0, "marker": marker.to_str().unwrap()});
        let options = CallOptions::new().chunk_timeout(Duration::from_millis(300));
        let mut stream = pool.stream_with("slow_chunks", args, options).unwrap();
        match stream.next() {
            Some(Err(e)) => assert_eq!(e.timeout_kind(), Some(TimeoutKind::Chunk), "{name}: {e}"),
            other => panic!("{name}: {other:?}"),
        }
        assert!(stream.next().is_none(), "{name}: the stream has ended");
        // Asked, then interrupted (the sleep is cut short) within the cancel grace: its
        // finally runs and the worker lives on.
        assert!(
            common::wait_until(Duration::from_secs(5), || std::fs::read_to_string(&marker).is_ok()),
            "{name}: the generator was closed"
        );
        if profile == Profile::Process {
            assert_eq!(pool.call("pid", Value::Null).unwrap(), json!(pids[0]), "{name}: the worker survived");
        }
        pool.shutdown().unwrap();
        common::assert_gone(&pids, Duration::from_secs(5));
        let _ = std::fs::remove_file(&marker);
    }
}

#[test]
fn a_thread_worker_runs_several_streams_at_once() {
    let pool = builder("st-many", Profile::Thread).build().unwrap();
    let pids = common::worker_pids(&pool);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let pool = &pool;
                s.spawn(move || {
                    let options = CallOptions::new().window(2);
                    let stream = pool.stream_with("count", json!({"n": 500, "returns": t}), options).unwrap();
                    let items: Vec<Value> = stream.map(|c| c.unwrap()).collect();
                    assert_eq!(items, (0..500).map(Value::from).collect::<Vec<_>>());
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    });
    assert_eq!(pool.stats().unwrap().calls_ok, 4);
    pool.shutdown().unwrap();
    common::assert_gone(&pids, Duration::from_secs(5));
}

#[test]
fn progress_reports_reach_the_callback_of_a_call_and_of_a_stream() {
    for (profile, name) in profiles() {
        let pool = builder(&format!("st-progress-{name}"), profile).build().unwrap();
        let pids = common::worker_pids(&pool);
        let seen: Arc<Mutex<Vec<Progress>>> = Arc::default();
        let sink = seen.clone();
        let options = CallOptions::new().on_progress(move |p| sink.lock().unwrap().push(p.clone()));
        // 10 reports 60 ms apart: each passes the worker's rate limit.
        assert_eq!(pool.call_with("reports", json!({"n": 10, "delay": 0.06}), options).unwrap(), json!(10));
        let got = seen.lock().unwrap().clone();
        assert_eq!(got.len(), 10, "{name}: {got:?}");
        assert_eq!((got[9].done, got[9].total), (10.0, Some(10.0)));
        assert_eq!(got[0].message.as_deref(), Some("step 1"));
        // Reports as fast as the command can make them are thinned out, but the last (done
        // == total) always comes.
        seen.lock().unwrap().clear();
        let sink = seen.clone();
        let options = CallOptions::new().on_progress(move |p| sink.lock().unwrap().push(p.clone()));
        let chunks = pool.stream_with("reports_streaming", json!({"n": 2000}), options).unwrap().count();
        assert_eq!(chunks, 2000);
        let got = seen.lock().unwrap().clone();
        assert!(got.len() < 2000 && !got.is_empty(), "{name}: rate-limited: {} reports", got.len());
        assert_eq!(got.last().unwrap().done, 2000.0, "{name}: the last report always comes");
        // A background call keeps its last report for its handle.
        let pending = pool.submit("reports", json!({"n": 3})).unwrap();
        let handle_progress = {
            let p = pending.wait_timeout(Duration::from_secs(10)).expect("done");
            assert_eq!(p.unwrap(), json!(3));
            pending.progress()
        };
        assert_eq!(handle_progress.map(|p| p.done), Some(3.0), "{name}");
        pool.shutdown().unwrap();
        common::assert_gone(&pids, Duration::from_secs(5));
    }
}

#[test]
fn the_whole_deadline_ends_a_stream_whose_consumer_is_slower_than_its_chunks() {
    for (profile, name) in profiles() {
        let pool = builder(&format!("st-slowc-{name}"), profile).build().unwrap();
        let pids = common::worker_pids(&pool);
        let options = CallOptions::new().timeout(Duration::from_millis(600)).window(4);
        let mut taken = 0;
        let mut last = None;
        for chunk in pool.stream_with("count", json!({"n": 1000}), options).unwrap() {
            match chunk {
                Ok(_) => taken += 1,
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(100)); // chunks are always waiting
        }
        let err = last.expect("the stream ended with its time-out");
        assert_eq!(err.timeout_kind(), Some(TimeoutKind::Call), "{name}: {err}");
        assert!(taken < 20, "{name}: {taken} chunks taken past a 600 ms deadline");
        assert_eq!(pool.call("pid", Value::Null).unwrap(), json!(pids[0]), "{name}: the generator let go");
        pool.shutdown().unwrap();
        common::assert_gone(&pids, Duration::from_secs(5));
    }
}

#[test]
fn a_chunk_or_report_the_host_cannot_decode_fails_only_its_call() {
    for (profile, name) in profiles() {
        let pool = builder(&format!("st-undec-{name}"), profile).build().unwrap();
        let pids = common::worker_pids(&pool);
        for pause in [Duration::ZERO, Duration::from_millis(300)] {
            // With a pause, the bad chunks and the stream's end have all come (on a thread
            // worker, queued for the consumer) before the consumer takes the bad one.
            let mut stream = pool.stream("deep_chunks", json!({"levels": 300})).unwrap();
            let mut items = vec![stream.next().unwrap()];
            std::thread::sleep(pause);
            items.extend(stream);
            assert_eq!(items[0].as_ref().unwrap(), &json!("fine"), "{name}");
            assert_eq!(items.len(), 2, "{name} {pause:?}: the stream ends at the chunk: {items:?}");
            assert!(matches!(&items[1], Err(Error::Protocol(m)) if m.contains("chunk")), "{name}: {items:?}");
        }
        let options = CallOptions::new().on_progress(|_| {});
        assert_eq!(
            pool.call_with("huge_progress", Value::Null, options).unwrap(),
            json!("answered"),
            "{name}"
        );
        assert_eq!(pool.call("pid", Value::Null).unwrap(), json!(pids[0]), "{name}: the same worker");
        pool.shutdown().unwrap();
        common::assert_gone(&pids, Duration::from_secs(5));
    }
}

#[test]
fn a_progress_callback_that_panics_costs_nothing_but_its_reports() {
    for (profile, name) in profiles() {
        let pool = builder(&format!("st-panic-{name}"), profile).build().unwrap();
        let pids = common::worker_pids(&pool);
        for _ in 0..3 {
            let options = CallOptions::new().on_progress(|_| panic!("a careless callback"));
            assert_eq!(pool.call_with("reports", json!({"n": 3}), options).unwrap(), json!(3), "{name}");
        }
        let stats = pool.stats().unwrap();
        assert_eq!((stats.calls_ok, stats.workers[0].in_flight), (3, 0), "{name}");
        assert_eq!(pool.call("pid", Value::Null).unwrap(), json!(pids[0]), "{name}");
        pool.shutdown().unwrap();
        common::assert_gone(&pids, Duration::from_secs(5));
    }
}
