//! Adversarial review of the call engine (commit 2329f19): each test reproduces a defect
//! found in review, against real Python processes. Every wait is bounded; every test that
//! starts workers checks they are gone after shutdown. Line numbers in the comments are those
//! of 2329f19 (the functions named are unchanged since, up to b595d7c's mailbox).

mod common;

use std::time::{Duration, Instant};

use serde_json::json;
use snakepit::{CallOptions, Error, Pool, PoolBuilder, Profile, TimeoutKind};

fn review(size: usize) -> PoolBuilder {
    // RUST_LOG=snakepit=warn shows the pool's own account of what happened.
    let _ = env_logger::builder().is_test(true).try_init();
    common::builder(size).adapter("review_adapter")
}

fn all_pids(pool: &Pool, into: &mut Vec<u32>) {
    for p in common::worker_pids(pool) {
        if !into.contains(&p) {
            into.push(p);
        }
    }
}

// ---- 1. Thread profile: a late reply racing its caller's time-out leaks a slot for good -----
//
// worker.rs:351-354: at its deadline the caller moves its id from `replies` to `abandoned`
// under the `waiting` lock and releases it; only later does pool.rs finish() take the board's
// lock and count the slot abandoned (board.rs:300, `seat.abandoned += 1`). If the reply arrives
// in between, the monitor (worker.rs:455 `abandoned.remove` -> Delivery::Late -> on_late ->
// board.rs:346) finds `seat.abandoned == 0` and does nothing. The caller's give_back then
// counts the slot abandoned, and no reply will ever free it: `busy` stays up for the life of
// the worker (capacity lost, in_flight wrong in stats), and enough of these wedge a healthy
// worker (recycled as Wedged) or get it killed instead of stopped when it drains.

#[test]
fn thread_profile_late_replies_racing_time_outs_give_every_slot_back() {
    const THREADS: usize = 16;
    const CALLERS: u64 = 6;
    const CALLS: u64 = 400;
    let pool = review(1).profile(Profile::Thread).threads_per_worker(THREADS).build().unwrap();
    let mut pids = common::worker_pids(&pool);
    let mut call_timeouts = 0u64;
    std::thread::scope(|s| {
        let callers: Vec<_> = (0..CALLERS)
            .map(|t| {
                let pool = &pool;
                s.spawn(move || {
                    let mut draw =
                        common::Draw(0x9e37_79b9_7f4a_7c15 ^ (t + 1).wrapping_mul(0x1234_5678_9abc_def1));
                    let mut timeouts = 0u64;
                    for _ in 0..CALLS {
                        // Sleeps 2 ms; the deadline falls 2.0 to 3.5 ms after the call is made, so
                        // replies and deadlines keep arriving together.
                        let r = pool.call_with(
                            "nap",
                            json!({"seconds": 0.002}),
                            CallOptions::new().timeout(draw.micros(2000, 3500)),
                        );
                        match r {
                            Ok(_) | Err(Error::Timeout { kind: TimeoutKind::Queue, .. }) => {}
                            Err(Error::Timeout { kind: TimeoutKind::Call, .. }) => timeouts += 1,
                            Err(e) => panic!("unexpected {e:?}"),
                        }
                    }
                    timeouts
                })
            })
            .collect();
        for c in callers {
            call_timeouts += c.join().unwrap();
        }
    });
    all_pids(&pool, &mut pids);
    // Every nap has long returned (2 ms each): every slot must be free again.
    let free = common::wait_until(Duration::from_secs(5), || {
        pool.stats().unwrap().workers.iter().all(|w| w.in_flight == 0)
    });
    let stats = pool.stats().unwrap();
    let stuck: Vec<(u64, usize)> = stats.workers.iter().map(|w| (w.id, w.in_flight)).collect();
    let wedged = stats.recycles.wedged;
    all_pids(&pool, &mut pids);
    pool.shutdown().unwrap();
    common::assert_gone(&pids, Duration::from_secs(5));
    eprintln!(
        "{call_timeouts} call time-outs; (worker, in_flight) after all calls: {stuck:?}; wedged {wedged}"
    );
    assert!(
        free && wedged == 0,
        "no call is running, yet slots are held: (worker, in_flight) {stuck:?}, wedged recycles {wedged} \
         ({call_timeouts} call time-outs)"
    );
}

// ---- 2. Process profile: a worker whose output ends while it lives on is never replaced ------
//
// worker.rs read_reply: `Ok(0)` on stdout (EOF) returns Exchange::Died without checking the
// process exited. pool.rs finish() gives the lease back as Return::Died, which only closes the
// seat (board.rs:307-311: `open = false`, no Notice); after_release's Drained notice is ignored
// for a worker that is not Draining (recycle.rs stop_if_drained). Nothing tells the dispatcher
// to kill it: the process lives on, its slot stays Life::Ready (so `maintain` starts no
// replacement and stats() still counts it ready), and the pool has lost that worker for good;
// with size(1) every later call times out in the queue. In the thread profile the monitor
// catches the same thing (EOF while not exiting -> broken -> killed), so only the process
// profile leaks.

#[test]
fn a_process_worker_whose_output_ends_while_it_lives_is_replaced() {
    let pool = review(1).build().unwrap();
    let mut pids = common::worker_pids(&pool);
    let first = pids[0];
    let severed = pool.call_with("sever", json!({}), CallOptions::new().timeout(Duration::from_secs(5)));
    assert!(severed.is_err(), "its reply went nowhere: {severed:?}");
    all_pids(&pool, &mut pids);
    // The pool must notice the worker is useless and replace it.
    let next = pool.call_with("pid", json!({}), CallOptions::new().timeout(Duration::from_secs(6)));
    all_pids(&pool, &mut pids);
    let stats = pool.stats().unwrap();
    let first_still_listed = stats.workers.iter().any(|w| w.pid == first);
    let first_alive = common::alive(first);
    pool.shutdown().unwrap();
    common::assert_gone(&pids, Duration::from_secs(5));
    assert!(
        matches!(next, Ok(ref v) if v.as_u64() != Some(u64::from(first))),
        "the call after the worker's output ended must run on a replacement, got {next:?} \
         (the severing call got {severed:?}; old worker {first} alive: {first_alive}, still listed: \
         {first_still_listed}, ready_workers {})",
        stats.ready_workers
    );
}

// ---- 3. An idle crash seen first by a caller is taken for a protocol violation --------------
//
// A process worker that dies while idle is noticed by whoever looks first. When it is the next
// caller (worker.rs exchange_alone: `idle_and_alive` false -> Exchange::NotSent; pool.rs
// finish -> Return::Unusable -> Notice::Unusable), the dispatcher decides (recycle.rs
// on_notice, Notice::Unusable) by `conn.has_exited()`, a flag the monitor thread sets only
// once it gets round to the exit (worker.rs Monitor::exited). If the monitor is behind (here:
// still going through a burst of stderr lines written just before the death), the dead worker
// is declared to have "written to its output while idle", marked broken and killed with
// KillReason::Protocol; on_exit (lifecycle.rs, `killed.is_none()` guard) then counts no crash,
// emits no WorkerDied event and applies no idle-crash backoff.

#[test]
fn an_idle_crash_noticed_by_a_caller_is_counted_as_a_crash() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let died_events = Arc::new(AtomicU64::new(0));
    let sink = died_events.clone();
    let pool = review(1)
        .restart_backoff(Duration::from_millis(1), Duration::from_millis(2))
        .on_event(move |e| {
            if matches!(e, snakepit::Event::WorkerDied { .. }) {
                sink.fetch_add(1, Ordering::SeqCst);
            }
        })
        .build()
        .unwrap();
    let mut pids = common::worker_pids(&pool);
    // Rounds until enough deaths fell between two calls (those are the ones at risk), bounded.
    let (mut rounds, mut in_call) = (0u64, 0u64);
    while rounds - in_call < 8 && rounds < 80 {
        let round = rounds;
        rounds += 1;
        let victim = pool.call("die_soon", json!({"delay": 0.02})).unwrap().as_u64().unwrap();
        // Calls back to back until one runs on the replacement (bounded).
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            assert!(Instant::now() < end, "round {round}: no replacement within 10 s");
            match pool.call_with("pid", json!({}), CallOptions::new().timeout(Duration::from_secs(5))) {
                Ok(v) if v.as_u64() != Some(victim) => break,
                Ok(_) => {}
                Err(Error::WorkerDied { .. }) => in_call += 1,
                Err(e) => panic!("round {round}: unexpected {e:?}"),
            }
            // Longer than the process takes to be torn down once it calls _exit (a call made
            // meanwhile dies with it), far shorter than the monitor takes to go through the
            // burst: the next call most likely finds the worker dead before the monitor does.
            std::thread::sleep(Duration::from_millis(3));
        }
        all_pids(&pool, &mut pids);
    }
    common::wait_until(Duration::from_secs(5), || pool.stats().unwrap().crashes >= rounds);
    let stats = pool.stats().unwrap();
    pool.shutdown().unwrap();
    common::assert_gone(&pids, Duration::from_secs(5));
    let events = died_events.load(Ordering::SeqCst);
    eprintln!(
        "{rounds} deaths ({in_call} during a call): crashes {}, WorkerDied events {events}",
        stats.crashes
    );
    assert!(
        stats.crashes == rounds && events == rounds,
        "{rounds} workers died on their own ({in_call} of them during a call), but stats().crashes is {} \
         and {events} WorkerDied events were emitted",
        stats.crashes
    );
}

// ---- 4. A call whose retries run out returns an uncounted Timeout(Queue) early -------------
//
// pool.rs call_with retries a call whose worker was found unusable at checkout
// (Exchange::NotSent) at most `size + 2` times, then returns `Err(Timeout(Queue))`: before its
// queue deadline, and without recording it (every other way out of call_with is counted, in
// admit/withdraw/finish/record_queue_timeout). stats() then disagrees with what the caller got
// (calls_ok + calls_failed misses it, timeouts too) and no CallCompleted is emitted.

#[test]
fn a_call_whose_retries_run_out_is_counted_and_answered_by_its_deadline_rules() {
    let pool = review(1).env("REVIEW_STRAY_AFTER_READY", "1").build().unwrap();
    let mut pids = common::worker_pids(&pool);
    let started = Instant::now();
    let timeout = Duration::from_secs(5);
    let result = pool.call_with("pid", json!({}), CallOptions::new().timeout(timeout));
    let took = started.elapsed();
    all_pids(&pool, &mut pids);
    let stats = pool.stats().unwrap();
    pool.shutdown().unwrap();
    common::assert_gone(&pids, Duration::from_secs(5));
    eprintln!(
        "got {result:?} after {took:?}; calls_ok {} calls_failed {} timeouts {}",
        stats.calls_ok, stats.calls_failed, stats.timeouts
    );
    // Whatever the call got, stats() must have counted it; and a queue time-out means its
    // deadline passed while it waited.
    let mut wrong = Vec::new();
    if stats.calls_ok + stats.calls_failed != 1 {
        wrong.push(format!(
            "one call returned, but calls_ok {} + calls_failed {} (timeouts {})",
            stats.calls_ok, stats.calls_failed, stats.timeouts
        ));
    }
    if matches!(result, Err(Error::Timeout { kind: TimeoutKind::Queue, .. })) && took < timeout {
        wrong.push(format!("Timeout(Queue) after {took:?}, before its {timeout:?} deadline"));
    }
    assert!(wrong.is_empty(), "the call got {result:?}:\n{}", wrong.join("\n"));
}
