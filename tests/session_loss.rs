//! Every way a session can lose its worker, and what each affinity sees: a strict session
//! fails with `SessionLost` (naming why) on that call and every later one; a prefer session
//! moves to another worker, where its state is fresh, and a `SessionLost { moved: true }`
//! event says so. Recycling keeps a strict session on its retired worker for `session_drain`
//! (less if it ends sooner); a prefer session has no drain.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use snakepit::{
    Affinity, CallOptions, Error, Event, ExitKind, KilledBy, Loss, Pool, PoolBuilder, RecycleReason, Session,
    SessionOptions, TimeoutKind, WorkerState,
};

/// Every event of a pool, in order.
type Events = Arc<Mutex<Vec<Event>>>;

/// A pool of `size` on `session_adapter` whose events are recorded.
fn recorded(size: usize) -> (PoolBuilder, Events) {
    let events: Events = Arc::default();
    let sink = events.clone();
    let builder = common::builder(size)
        .adapter("session_adapter")
        .on_event(move |e| sink.lock().unwrap().push(e.clone()));
    (builder, events)
}

/// Points on y = 3x + 2, for fitting.
fn points() -> Value {
    json!((0..10).map(|x| [x, 3 * x + 2]).collect::<Vec<_>>())
}

/// A prefer session that keeps its training points in its context, so it can refit anywhere.
fn prefer(pool: &Pool) -> Session {
    let options = SessionOptions::new().affinity(Affinity::Prefer).context(json!({"points": points()}));
    pool.session_with(options).unwrap()
}

/// The pid of worker `id`, while the pool has it.
fn pid_of(pool: &Pool, id: u64) -> Option<u32> {
    pool.stats().unwrap().workers.iter().find(|w| w.id == id).map(|w| w.pid)
}

/// The pid of the worker a session is bound to.
fn session_pid(pool: &Pool, session: &Session) -> u32 {
    pid_of(pool, session.worker().expect("bound")).expect("its worker is in the pool")
}

/// SIGKILL through the `kill` command, so the tests need no unsafe code.
fn kill_9(pid: u32) {
    let status = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    assert!(status.success(), "kill -9 {pid}");
}

/// Waits until the pool has seen its worker with `pid` go (it is no longer in `stats()`), so
/// that a test sees the state after the dispatcher handled it (the calls right after a loss
/// are tested on their own, at the end).
fn wait_until_pool_forgets(pool: &Pool, pid: u32) {
    assert!(
        common::wait_until(Duration::from_secs(10), || !common::worker_pids(pool).contains(&pid)),
        "the pool still lists worker pid {pid}"
    );
}

/// Asserts that the call fails with `SessionLost` for `session` on `worker`, with `reason`.
fn assert_lost(result: Result<Value, Error>, session: &Session, worker: u64, reason: Loss) {
    match result {
        Err(Error::SessionLost { session: s, worker: w, reason: r }) => {
            assert_eq!((s, w, r), (session.id(), worker, reason))
        }
        other => panic!("expected SessionLost({reason:?}) on worker {worker}, got {other:?}"),
    }
}

/// A strict session that lost its worker: this call and every later one fail the same way.
fn assert_lost_for_good(session: &Session, worker: u64, reason: Loss) {
    assert_lost(session.call("predict", json!({"x": 1})), session, worker, reason);
    assert_lost(session.call("state", json!({})), session, worker, reason);
    assert_lost(session.call("fit", json!({"points": points()})), session, worker, reason);
    assert_eq!(session.info().lost, Some(reason));
}

/// A prefer session whose worker (pid `old`) is gone: its next call runs elsewhere, on a fresh
/// store without the model, and a prediction refits from the context. Returns the new pid.
fn assert_moved_fresh(session: &Session, old: u32) -> u32 {
    let state = session.call("state", json!({})).unwrap();
    let pid = state["pid"].as_u64().unwrap() as u32;
    assert_ne!(pid, old, "it ran on another worker");
    assert_eq!(state["fresh"], json!(true), "{state}");
    assert!(!state["keys"].as_array().unwrap().contains(&json!("model")), "{state}");
    assert_eq!(session.call("predict", json!({"x": 7})).unwrap(), json!(23.0), "refitted from its context");
    pid
}

/// Waits for the `SessionLost` event of `session` and returns its (worker, reason, moved).
fn lost_event(events: &Events, session: &Session) -> (u64, Loss, bool) {
    let find = || {
        events.lock().unwrap().iter().find_map(|e| match e {
            Event::SessionLost { session: s, worker, reason, moved, .. } if *s == session.id() => {
                Some((*worker, *reason, *moved))
            }
            _ => None,
        })
    };
    assert!(common::wait_until(Duration::from_secs(5), || find().is_some()), "no SessionLost event");
    find().unwrap()
}

/// Why worker `id` was recycled, once the event has come.
fn recycled(events: &Events, id: u64) -> Option<RecycleReason> {
    let find = || {
        events.lock().unwrap().iter().find_map(|e| match e {
            Event::WorkerRecycled { worker, reason, .. } if *worker == id => Some(*reason),
            _ => None,
        })
    };
    common::wait_until(Duration::from_secs(5), || find().is_some());
    find()
}

/// Every worker pid the pool started (the initial workers, restarts and replacements).
fn started_pids(events: &Events) -> Vec<u32> {
    let pids: Vec<u32> = events
        .lock()
        .unwrap()
        .iter()
        .filter_map(|e| match e {
            Event::WorkerStarted { pid, .. } => Some(*pid),
            _ => None,
        })
        .collect();
    assert!(!pids.is_empty());
    pids
}

/// Shuts the pool down and proves every worker it ever started is gone.
fn shut_down(pool: Pool, events: &Events) {
    pool.shutdown().unwrap();
    common::assert_gone(&started_pids(events), Duration::from_secs(5));
}

/// A strict and a prefer session on the same worker (the board puts both on its first worker
/// when neither has run a call yet).
fn strict_and_prefer(pool: &Pool) -> (Session, Session) {
    let p = prefer(pool);
    let s = pool.session().unwrap();
    assert_eq!(s.worker(), p.worker(), "both sessions on one worker");
    s.call("fit", json!({"points": points()})).unwrap();
    p.call("fit", json!({"points": points()})).unwrap();
    (s, p)
}

// ---- the worker dies or is killed ----------------------------------------------------------

#[test]
fn sigkill_from_outside_loses_a_strict_session_and_moves_a_prefer_one() {
    let (builder, events) = recorded(2);
    let pool = builder.build().unwrap();
    let (s, p) = strict_and_prefer(&pool);
    let worker = s.worker().unwrap();
    let pid = session_pid(&pool, &s);
    kill_9(pid);
    wait_until_pool_forgets(&pool, pid);

    assert_lost_for_good(&s, worker, Loss::Died { exit: ExitKind::Signal(9) });
    let new_pid = assert_moved_fresh(&p, pid);
    assert_ne!(p.worker(), Some(worker), "it moved");
    assert_eq!(p.call("state", json!({})).unwrap()["pid"], json!(new_pid), "and stays where it moved");

    let died = Loss::Died { exit: ExitKind::Signal(9) };
    assert_eq!(lost_event(&events, &s), (worker, died, false));
    assert_eq!(lost_event(&events, &p), (worker, died, true));
    assert!(common::settled(&pool));
    let stats = pool.stats().unwrap();
    assert_eq!((stats.sessions.lost, stats.sessions.live, stats.crashes), (2, 2, 1));
    drop((s, p));
    shut_down(pool, &events);
}

#[test]
fn os_exit_in_a_session_call_fails_that_call_then_loses_or_moves_the_session() {
    let (builder, events) = recorded(2);
    let pool = builder.build().unwrap();
    let died = Loss::Died { exit: ExitKind::Code(13) };

    // Strict: the call that exits fails with the worker's death, every later one as lost.
    let s = pool.session().unwrap();
    s.call("fit", json!({"points": points()})).unwrap();
    let (worker, pid) = (s.worker().unwrap(), session_pid(&pool, &s));
    match s.call("exit_now", json!({"code": 13})) {
        Err(Error::WorkerDied { pid: p, exit: ExitKind::Code(13), .. }) => assert_eq!(p, pid),
        other => panic!("expected WorkerDied with exit code 13, got {other:?}"),
    }
    wait_until_pool_forgets(&pool, pid);
    assert_lost_for_good(&s, worker, died);
    assert_eq!(lost_event(&events, &s), (worker, died, false));

    // Prefer: the same, then the session carries on elsewhere.
    assert!(common::settled(&pool));
    let p = prefer(&pool);
    p.call("fit", json!({"points": points()})).unwrap();
    let (worker, pid) = (p.worker().unwrap(), session_pid(&pool, &p));
    assert!(matches!(p.call("exit_now", json!({"code": 13})), Err(Error::WorkerDied { .. })));
    wait_until_pool_forgets(&pool, pid);
    assert_moved_fresh(&p, pid);
    assert_eq!(lost_event(&events, &p), (worker, died, true));
    assert_eq!(pool.stats().unwrap().sessions.lost, 2);
    drop((s, p));
    shut_down(pool, &events);
}

#[test]
fn a_session_call_that_times_out_gets_its_worker_killed_and_the_session_lost_or_moved() {
    let (builder, events) = recorded(2);
    let pool = builder.build().unwrap();
    let one_second = CallOptions::new().timeout(Duration::from_secs(1));
    let killed = Loss::Killed(KilledBy::CallTimeout);

    let s = pool.session().unwrap();
    s.call("fit", json!({"points": points()})).unwrap();
    let (worker, pid) = (s.worker().unwrap(), session_pid(&pool, &s));
    // A command that stops when asked keeps the session's worker, and its state.
    let late = s.call_with("sleep", json!({"seconds": 30}), one_second.clone());
    assert!(matches!(late, Err(Error::Timeout { kind: TimeoutKind::Call, .. })), "{late:?}");
    assert_eq!(s.call("predict", json!({"x": 2})).unwrap(), json!(8.0));
    assert_eq!(session_pid(&pool, &s), pid);
    // One that does not is killed once the cancel's steps are over.
    let late = s.call_with("deaf_sleep", json!({"seconds": 30}), one_second.clone());
    assert!(matches!(late, Err(Error::Timeout { kind: TimeoutKind::Call, .. })), "{late:?}");
    wait_until_pool_forgets(&pool, pid);
    assert_lost_for_good(&s, worker, killed);
    assert_eq!(lost_event(&events, &s), (worker, killed, false));

    assert!(common::settled(&pool));
    let p = prefer(&pool);
    p.call("fit", json!({"points": points()})).unwrap();
    let (worker, pid) = (p.worker().unwrap(), session_pid(&pool, &p));
    let late = p.call_with("deaf_sleep", json!({"seconds": 30}), one_second);
    assert!(matches!(late, Err(Error::Timeout { kind: TimeoutKind::Call, .. })), "{late:?}");
    wait_until_pool_forgets(&pool, pid);
    assert_moved_fresh(&p, pid);
    assert_eq!(lost_event(&events, &p), (worker, killed, true));
    let stats = pool.stats().unwrap();
    assert_eq!((stats.sessions.lost, stats.timeouts), (2, 3), "one time-out cost no worker");
    drop((s, p));
    shut_down(pool, &events);
}

// ---- the pool recycles the worker -----------------------------------------------------------

/// A strict session on the only worker of a pool that recycles it: `poke` drives the
/// recycling (calls for `max_requests`, nothing for `ttl`, a memory hog), then the session is
/// served by its retired worker during the drain, keeps its state there, and is lost for
/// `reason` once the drain is over.
fn strict_session_is_drained_then_lost(
    builder: PoolBuilder,
    events: &Events,
    reason: RecycleReason,
    poke: impl Fn(&Session),
) {
    let pool = builder.session_drain(Duration::from_secs(2)).build().unwrap();
    let s = pool.session().unwrap();
    s.call("fit", json!({"points": points()})).unwrap();
    let (worker, pid) = (s.worker().unwrap(), session_pid(&pool, &s));
    // The worker was retired after the start of the look before the one that saw it draining.
    let (mut previous, mut this) = (Instant::now(), Instant::now());
    assert!(
        common::wait_until(Duration::from_secs(20), || {
            (previous, this) = (this, Instant::now());
            poke(&s);
            pool.stats().unwrap().workers.iter().any(|w| w.id == worker && w.state == WorkerState::Draining)
        }),
        "the worker was not recycled"
    );
    let retired_after = previous;

    // During the drain: the same process, with the session's state, serves the session alone.
    let state = s.call("state", json!({})).unwrap();
    assert_eq!(state["pid"], json!(pid), "served by its retired worker");
    assert_eq!(
        (state["fresh"].clone(), s.call("predict", json!({"x": 2})).unwrap()),
        (json!(false), json!(8.0))
    );
    let stats = pool.stats().unwrap();
    let old = stats.workers.iter().find(|w| w.id == worker).expect("still in the pool");
    assert_eq!((old.state, old.sessions), (WorkerState::Draining, 1));
    let plain = pool.call("pid", json!({})).unwrap();
    assert_ne!(plain, json!(pid), "other calls go to the replacement");

    // After the drain, not before: it stops, and the session learns why.
    common::assert_gone(&[pid], Duration::from_secs(10));
    let held = retired_after.elapsed();
    assert!(held >= Duration::from_secs(2), "stopped {held:?} after it was retired, within the drain");
    wait_until_pool_forgets(&pool, pid);
    assert_lost_for_good(&s, worker, Loss::Recycled(reason));
    assert_eq!(lost_event(events, &s), (worker, Loss::Recycled(reason), false));
    assert_eq!(recycled(events, worker), Some(reason));
    drop(s);
    shut_down(pool, events);
}

/// A prefer session on the only worker of a pool that recycles it: it moves as soon as the
/// worker is retired, to a fresh store, and the retired worker stops at once (a prefer
/// session holds no worker; the 20 s `session_drain` is not waited for).
fn prefer_session_moves_at_once(
    builder: PoolBuilder,
    events: &Events,
    reason: RecycleReason,
    poke: impl Fn(&Session),
) {
    let pool = builder.session_drain(Duration::from_secs(20)).build().unwrap();
    let p = prefer(&pool);
    p.call("fit", json!({"points": points()})).unwrap();
    let (worker, pid) = (p.worker().unwrap(), session_pid(&pool, &p));
    // Until a call of it runs on another worker: that call sees a fresh store.
    let mut moved = None;
    assert!(
        common::wait_until(Duration::from_secs(20), || {
            poke(&p);
            let state = p.call("state", json!({})).unwrap();
            let here = state["pid"].as_u64().unwrap() as u32 != pid;
            if here {
                moved = Some(state);
            }
            here
        }),
        "the session never left its worker"
    );
    let state = moved.unwrap();
    assert_eq!(state["fresh"], json!(true), "{state}");
    assert!(!state["keys"].as_array().unwrap().contains(&json!("model")), "{state}");
    assert_eq!(p.call("predict", json!({"x": 7})).unwrap(), json!(23.0), "refitted from its context");
    common::assert_gone(&[pid], Duration::from_secs(5));
    wait_until_pool_forgets(&pool, pid);
    // The move is recorded by the first call that finds the old worker retired.
    p.call("state", json!({})).unwrap();
    assert_eq!(lost_event(events, &p), (worker, Loss::Recycled(reason), true));
    assert_eq!(recycled(events, worker), Some(reason));
    drop(p);
    shut_down(pool, events);
}

/// One call of the session: what uses up a `max_requests` budget.
fn one_call(session: &Session) {
    session.call("state", json!({})).unwrap();
}

/// Nothing but a short wait: time, or the check's own calls, do it.
fn nothing(_: &Session) {
    std::thread::sleep(Duration::from_millis(20));
}

/// Keeps 64 MiB in the session's state, the first time only.
fn hog_once() -> impl Fn(&Session) {
    let done = std::cell::Cell::new(false);
    move |session| {
        if !done.replace(true) {
            assert_eq!(session.call("hog", json!({"mb": 64})).unwrap(), json!(64));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn by_calls() -> (PoolBuilder, Events) {
    let (builder, events) = recorded(1);
    (builder.max_requests(4).jitter(0.0), events)
}

fn by_age() -> (PoolBuilder, Events) {
    let (builder, events) = recorded(1);
    (builder.ttl(Duration::from_millis(800)).jitter(0.0), events)
}

fn by_memory() -> (PoolBuilder, Events) {
    // An idle worker's tree is about 12 MiB; 64 MiB of ballast puts it well past 40.
    let (builder, events) = recorded(1);
    (builder.max_memory(40 << 20).jitter(0.0).reaper_interval(Duration::from_millis(50)), events)
}

#[test]
fn max_requests_keeps_a_strict_session_on_its_retired_worker_for_the_drain_then_loses_it() {
    let (builder, events) = by_calls();
    strict_session_is_drained_then_lost(builder, &events, RecycleReason::MaxRequests, one_call);
}

#[test]
fn max_requests_moves_a_prefer_session_at_once() {
    let (builder, events) = by_calls();
    // The check's own calls use up the budget.
    prefer_session_moves_at_once(builder, &events, RecycleReason::MaxRequests, nothing);
}

#[test]
fn closing_the_only_strict_session_of_a_retired_worker_stops_it_before_the_drain_ends() {
    let (builder, events) = by_calls();
    let pool = builder.session_drain(Duration::from_secs(20)).build().unwrap();
    let s = pool.session().unwrap();
    let pid = session_pid(&pool, &s);
    assert!(common::wait_until(Duration::from_secs(20), || {
        one_call(&s);
        pool.stats().unwrap().recycles.max_requests == 1
    }));
    assert_eq!(s.call("state", json!({})).unwrap()["pid"], json!(pid), "held by its session");
    assert!(common::alive(pid));
    s.close();
    // Well before the 20 s drain.
    common::assert_gone(&[pid], Duration::from_secs(5));
    assert!(common::settled(&pool));
    assert_eq!(pool.stats().unwrap().sessions.lost, 0, "a closed session is not lost");
    shut_down(pool, &events);
}

#[test]
fn ttl_keeps_a_strict_session_on_its_retired_worker_for_the_drain_then_loses_it() {
    let (builder, events) = by_age();
    strict_session_is_drained_then_lost(builder, &events, RecycleReason::Ttl, nothing);
}

#[test]
fn ttl_moves_a_prefer_session_at_once() {
    let (builder, events) = by_age();
    prefer_session_moves_at_once(builder, &events, RecycleReason::Ttl, nothing);
}

#[test]
fn memory_keeps_a_strict_session_on_its_retired_worker_for_the_drain_then_loses_it() {
    let (builder, events) = by_memory();
    strict_session_is_drained_then_lost(builder, &events, RecycleReason::Memory, hog_once());
}

#[test]
fn memory_moves_a_prefer_session_at_once() {
    let (builder, events) = by_memory();
    prefer_session_moves_at_once(builder, &events, RecycleReason::Memory, hog_once());
}

// ---- races: a call right after the loss, a prefer session beside a strict one -------------

#[test]
fn a_strict_session_that_calls_at_once_after_losing_its_worker_learns_why() {
    let (builder, events) = recorded(1);
    let pool = builder.build().unwrap();
    for _ in 0..5 {
        let s = pool.session().unwrap();
        let worker = s.worker().unwrap();
        assert!(matches!(s.call("exit_now", json!({"code": 13})), Err(Error::WorkerDied { .. })));
        assert_lost(s.call("state", json!({})), &s, worker, Loss::Died { exit: ExitKind::Code(13) });
        assert!(common::settled(&pool));
        let s = pool.session().unwrap();
        let worker = s.worker().unwrap();
        let short = CallOptions::new().timeout(Duration::from_millis(300));
        assert!(matches!(
            s.call_with("deaf_sleep", json!({"seconds": 30}), short),
            Err(Error::Timeout { .. })
        ));
        assert_lost(s.call("state", json!({})), &s, worker, Loss::Killed(KilledBy::CallTimeout));
        assert!(common::settled(&pool));
    }
    shut_down(pool, &events);
}

#[test]
fn a_prefer_session_sharing_a_retired_worker_with_a_strict_session_moves_at_once() {
    let (builder, events) = recorded(2);
    let pool = builder.session_drain(Duration::from_secs(20)).build().unwrap();
    let (s, p) = strict_and_prefer(&pool);
    let (worker, pid) = (s.worker().unwrap(), session_pid(&pool, &s));
    pool.recycle_worker(worker).unwrap();
    assert!(common::wait_until(Duration::from_secs(5), || {
        pool.stats().unwrap().workers.iter().any(|w| w.id == worker && w.state == WorkerState::Draining)
    }));
    assert_eq!(s.call("state", json!({})).unwrap()["pid"], json!(pid), "the strict session is drained");
    let pids: std::collections::HashSet<u64> =
        (0..6).map(|_| p.call("state", json!({})).unwrap()["pid"].as_u64().unwrap()).collect();
    assert!(!pids.contains(&u64::from(pid)));
    assert_eq!(pids.len(), 1, "its calls stay on the worker it moved to: {pids:?}");
    assert_eq!(lost_event(&events, &p), (worker, Loss::Recycled(RecycleReason::Manual), true));
    drop((s, p));
    shut_down(pool, &events);
}
