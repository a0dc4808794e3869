//! One owner per call: every call has exactly one outcome, and the pool's counters and events
//! agree with what the callers got, even when replies and deadlines arrive at the same moment.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use snakepit::{CallOptions, Error, Event, Pool, Profile, TimeoutKind};

/// What callers got, by kind.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Seen {
    ok: u64,
    python: u64,
    call_timeouts: u64,
    queue_timeouts: u64,
    other: u64,
}

impl Seen {
    fn count(&mut self, result: &Result<serde_json::Value, Error>) {
        match result {
            Ok(_) => self.ok += 1,
            Err(Error::Python(_)) => self.python += 1,
            Err(Error::Timeout { kind: TimeoutKind::Call, .. }) => self.call_timeouts += 1,
            Err(Error::Timeout { kind: TimeoutKind::Queue, .. }) => self.queue_timeouts += 1,
            Err(other) => {
                eprintln!("unexpected outcome: {other:?}");
                self.other += 1;
            }
        }
    }

    fn add(&mut self, o: Seen) {
        self.ok += o.ok;
        self.python += o.python;
        self.call_timeouts += o.call_timeouts;
        self.queue_timeouts += o.queue_timeouts;
        self.other += o.other;
    }

    fn total(&self) -> u64 {
        self.ok + self.python + self.call_timeouts + self.queue_timeouts + self.other
    }

    fn timeouts(&self) -> u64 {
        self.call_timeouts + self.queue_timeouts
    }
}

/// Counts `CallCompleted` events, and those of them with `ok`.
fn completed_counter() -> (Arc<(AtomicU64, AtomicU64)>, impl Fn(&Event) + Send + Sync + 'static) {
    let counts = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    let sink = counts.clone();
    let callback = move |e: &Event| {
        if let Event::CallCompleted { ok, .. } = e {
            sink.0.fetch_add(1, Ordering::SeqCst);
            if *ok {
                sink.1.fetch_add(1, Ordering::SeqCst);
            }
        }
    };
    (counts, callback)
}

#[test]
fn under_deadline_pressure_every_call_has_one_outcome_and_the_counters_agree_with_the_callers() {
    // Pins: a reply that arrives as its call's deadline passes is owned twice. Callers get
    // Timeout(Call) from their own wait while the reader delivers the reply into a channel
    // nobody reads and counts it ok (calls_ok overcounted), and when the dispatcher's
    // time-out loses the race to the reader, the call's CallCompleted event is never emitted
    // (~1-2% of events missing).
    let (completed, on_event) = completed_counter();
    let pool = Pool::builder()
        .size(1)
        .adapter("snakepit.demo")
        .profile(Profile::Thread)
        .threads_per_worker(32)
        .startup_timeout(Duration::from_secs(20))
        .on_event(on_event)
        .build()
        .unwrap();
    let pids = common::worker_pids(&pool);
    const CALLERS: u64 = 8;
    const CALLS: u64 = 300;
    let mut seen = Seen::default();
    std::thread::scope(|s| {
        let callers: Vec<_> = (0..CALLERS)
            .map(|t| {
                let pool = &pool;
                s.spawn(move || {
                    let mut draw =
                        common::Draw(0x9e37_79b9_7f4a_7c15 ^ (t + 1).wrapping_mul(0x1234_5678_9abc_def1));
                    let mut seen = Seen::default();
                    for _ in 0..CALLS {
                        // The call sleeps 3 ms; its deadline falls 3.0 to 4.5 ms after it is made.
                        let timeout = draw.micros(3000, 4500);
                        let result = pool.call_with(
                            "slow",
                            json!({"seconds": 0.003}),
                            CallOptions::new().timeout(timeout),
                        );
                        seen.count(&result);
                    }
                    seen
                })
            })
            .collect();
        for c in callers {
            seen.add(c.join().unwrap());
        }
    });
    eprintln!("callers saw {seen:?}");
    assert_eq!(seen.total(), CALLERS * CALLS);
    assert_eq!(seen.other, 0, "only Ok and time-outs are possible here: {seen:?}");

    // Every call has returned, so every call must already be counted, once.
    let stats = pool.stats().unwrap();
    // Every call that reached a worker is announced exactly once, with the outcome its caller
    // got. Events are delivered on the event thread: wait for them (bounded), then shut down,
    // which delivers whatever is left, so nothing extra can still arrive.
    let expected = seen.ok + seen.call_timeouts;
    common::wait_until(Duration::from_secs(10), || completed.0.load(Ordering::SeqCst) >= expected);
    pool.shutdown().unwrap();
    let events = (completed.0.load(Ordering::SeqCst), completed.1.load(Ordering::SeqCst));
    let mut wrong = Vec::new();
    if stats.calls_ok != seen.ok {
        wrong.push(format!("calls_ok {} but callers got {} Ok", stats.calls_ok, seen.ok));
    }
    if stats.timeouts != seen.timeouts() {
        wrong.push(format!("timeouts {} but callers got {} time-outs", stats.timeouts, seen.timeouts()));
    }
    if stats.calls_ok + stats.calls_failed != CALLERS * CALLS {
        wrong.push(format!(
            "calls_ok + calls_failed = {} for {} calls",
            stats.calls_ok + stats.calls_failed,
            CALLERS * CALLS
        ));
    }
    if events.0 != expected {
        wrong.push(format!("{} CallCompleted events for {expected} calls that reached a worker", events.0));
    }
    if events.1 != seen.ok {
        wrong.push(format!("{} CallCompleted events with ok for {} Ok calls", events.1, seen.ok));
    }
    assert!(wrong.is_empty(), "callers saw {seen:?}, but:\n{}", wrong.join("\n"));
    common::assert_gone(&pids, Duration::from_secs(5));
}

#[test]
fn a_process_pool_counts_each_call_as_its_caller_saw_it_by_the_time_it_returns() {
    // Pins: the same single ownership on the process profile, with ok calls, Python
    // exceptions and time-outs (some far past the call's work, some on the edge of it): a
    // call that has returned is already counted in stats(), exactly as its caller saw it,
    // and announced once. Today a reply racing its deadline is counted ok while its caller
    // got Timeout(Call), and its CallCompleted event can go missing.
    let (completed, on_event) = completed_counter();
    let pool = common::builder(2).on_event(on_event).build().unwrap();
    let mut all_pids = common::worker_pids(&pool);
    let mut seen = Seen::default();
    // How long a 20 ms call takes here, end to end: the edge calls' deadlines are drawn
    // around it, so their replies and deadlines keep arriving together on any machine.
    let mut round_trips: Vec<Duration> = (0..15)
        .map(|_| {
            let started = Instant::now();
            let result = pool.call("sleep", json!({"seconds": 0.02}));
            let took = started.elapsed();
            seen.count(&result);
            result.unwrap();
            took
        })
        .collect();
    round_trips.sort();
    let typical = round_trips[round_trips.len() / 2].as_micros() as u64;
    let mut draw = common::Draw(0x5eed_5eed_1234_5678);
    for i in 0..240u64 {
        if i % 6 >= 4 {
            // An edge call goes straight to a ready worker, not into the queue behind a
            // replacement's start-up.
            assert!(common::settled(&pool), "the pool is back to full size");
        }
        let result = match i % 6 {
            0 | 3 => pool.call("add", json!([i, 1])),
            1 => pool.call("boom", json!({"message": format!("boom {i}")})),
            // Far past its deadline: a sure Timeout(Call).
            2 => pool.call_with(
                "sleep",
                json!({"seconds": 5}),
                CallOptions::new().timeout(Duration::from_millis(50)),
            ),
            // On the edge: the reply and the deadline arrive together.
            _ => pool.call_with(
                "sleep",
                json!({"seconds": 0.02}),
                CallOptions::new().timeout(draw.micros(typical.saturating_sub(800).max(1000), typical + 800)),
            ),
        };
        match (&result, i % 6) {
            (Ok(v), 0 | 3) => assert_eq!(v, &json!(i + 1)),
            (Err(Error::Python(e)), 1) => assert_eq!(e.message, format!("boom {i}")),
            (Err(Error::Timeout { kind: TimeoutKind::Call, .. }), 2) => {}
            (Ok(_) | Err(Error::Timeout { .. }), 4 | 5) => {}
            // A fresh replacement may not be ready yet for a short call: a queue time-out.
            (Err(Error::Timeout { kind: TimeoutKind::Queue, .. }), _) => {}
            (other, _) => panic!("call {i}: unexpected {other:?}"),
        }
        seen.count(&result);
        // The call has returned: the counters already include it.
        let stats = pool.stats().unwrap();
        assert_eq!(
            (stats.calls_ok, stats.calls_failed, stats.timeouts),
            (seen.ok, seen.total() - seen.ok, seen.timeouts()),
            "after call {i}: (calls_ok, calls_failed, timeouts) against what callers saw, {seen:?}"
        );
        for p in common::worker_pids(&pool) {
            if !all_pids.contains(&p) {
                all_pids.push(p);
            }
        }
    }
    eprintln!("callers saw {seen:?}");
    assert_eq!(seen.other, 0);

    let expected = seen.ok + seen.python + seen.call_timeouts;
    common::wait_until(Duration::from_secs(10), || completed.0.load(Ordering::SeqCst) >= expected);
    pool.shutdown().unwrap();
    assert_eq!(
        completed.0.load(Ordering::SeqCst),
        expected,
        "CallCompleted events against the calls that reached a worker ({seen:?})"
    );
    assert_eq!(completed.1.load(Ordering::SeqCst), seen.ok, "CallCompleted with ok against the callers' Ok");
    common::assert_gone(&all_pids, Duration::from_secs(5));
}
