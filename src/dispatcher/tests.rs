//! The dispatcher's decisions, unit-tested through its seam: fake workers (no process behind
//! them; see `Worker::fake`), events injected as the monitor threads would send them, and a
//! made-up clock. Each test runs in milliseconds.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use parking_lot::Mutex;

use super::*;
use crate::config::{PoolBuilder, Profile};
use crate::error::ExitKind;
use crate::protocol::{Msg, WorkerInfo, PROTOCOL_VERSION};
use crate::worker::KillReason;

/// Launches fake workers and keeps the ends that stand for their processes.
#[derive(Clone, Default)]
struct FakeLaunch {
    threaded: bool,
    /// The fake workers stand for ones run under a keeper (kills go through it).
    keeper: bool,
    exits: Arc<Mutex<HashMap<WorkerId, OwnedFd>>>,
    launched: Arc<Mutex<Vec<WorkerId>>>,
}

impl Launch for FakeLaunch {
    fn launch(
        &mut self,
        id: WorkerId,
        _events: Sender<WorkerEvent>,
        _shared: &Arc<Shared>,
    ) -> Result<Worker> {
        let (worker, exit) = Worker::fake(id, self.threaded, self.keeper);
        self.exits.lock().insert(id, exit);
        self.launched.lock().push(id);
        Ok(worker)
    }

    fn interpreter(&self) -> String {
        "fake".into()
    }
}

struct Harness {
    d: Dispatcher,
    launch: FakeLaunch,
    started: Receiver<Result<()>>,
    _requests: Sender<Request>,
    t0: Instant,
}

fn harness(builder: PoolBuilder) -> Harness {
    harness_with(builder, false)
}

fn harness_with(builder: PoolBuilder, keeper: bool) -> Harness {
    let cfg = Arc::new(builder.config);
    let (requests, requests_rx) = unbounded();
    let shared = Arc::new(Shared {
        name: cfg.name.clone(),
        board: Mutex::new(Board::new(cfg.max_queue)),
        requests: requests.clone(),
        emitter: Emitter::default(),
        sessions: Default::default(),
    });
    let launch = FakeLaunch { threaded: cfg.capacity() > 1, keeper, ..FakeLaunch::default() };
    let (started_tx, started) = bounded(1);
    let t0 = Instant::now();
    let mut d = Dispatcher::new(cfg, shared, Box::new(launch.clone()), requests_rx, started_tx, t0);
    d.start(t0);
    Harness { d, launch, started, _requests: requests, t0 }
}

fn info() -> WorkerInfo {
    WorkerInfo {
        pid: 1,
        python_version: "3.11.7".into(),
        implementation: "cpython".into(),
        free_threaded: false,
        gil_enabled: true,
        protocol_version: PROTOCOL_VERSION,
        cancel_signal: false,
        commands: vec!["echo".into()],
        cpu_bound: vec![],
        stack_dumps: false,
    }
}

impl Harness {
    fn at(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms)
    }

    fn ready(&mut self, id: WorkerId, ms: u64) {
        let now = self.at(ms);
        self.d.on_worker_event(WorkerEvent::Frame(id, Msg::Ready { info: info() }), now);
    }

    /// The process behind worker `id` exits; the monitor would report it like this.
    fn exit(&mut self, id: WorkerId, ms: u64) {
        self.launch.exits.lock().remove(&id);
        let now = self.at(ms);
        self.d.on_worker_event(WorkerEvent::Exited(id, ExitKind::Code(1)), now);
        self.d.maintain(now);
    }

    fn life(&self, id: WorkerId) -> Option<Life> {
        self.d.slots.get(&id).map(|s| s.life)
    }

    fn killed(&self, id: WorkerId) -> Option<KillReason> {
        self.d.slots.get(&id).and_then(|s| s.worker.conn.killed())
    }

    /// A lease as a caller takes it; what the board tells the dispatcher is delivered.
    fn lease(&mut self) -> Lease<Arc<Conn>> {
        let mut fx = Effects::default();
        let far = self.t0 + Duration::from_secs(3600);
        let admitted = self.d.shared.board.lock().admit("echo", None, far, super::Route::Any, &mut fx);
        let now = self.t0;
        for n in fx.notices {
            self.d.on_notice(n, now);
        }
        match admitted {
            Ok(Admit::Run(l)) => l,
            _ => panic!("no worker free"),
        }
    }

    fn give_back(&mut self, lease: Lease<Arc<Conn>>, how: Return, ms: u64) {
        let mut fx = Effects::default();
        let result = Ok(crate::binary::Payload::default());
        let q = Duration::from_micros(1);
        self.d.shared.board.lock().give_back(lease, how, Some((&result, q, q)), &mut fx);
        let now = self.at(ms);
        for n in fx.notices {
            self.d.on_notice(n, now);
        }
        self.d.maintain(now);
    }

    fn launched(&self) -> Vec<WorkerId> {
        self.launch.launched.lock().clone()
    }
}

fn pool(size: usize) -> PoolBuilder {
    crate::Pool::builder().size(size).restart_backoff(Duration::from_millis(100), Duration::from_secs(10))
}

#[test]
fn build_succeeds_only_when_every_worker_is_ready_and_then_opens_the_board() {
    let mut h = harness(pool(2));
    h.ready(0, 10);
    assert!(h.started.try_recv().is_err(), "one of two is not enough");
    assert!(h.d.shared.board.lock().seat(0).is_none(), "calls wait for the whole pool");
    h.ready(1, 20);
    assert!(matches!(h.started.try_recv(), Ok(Ok(()))));
    let board = h.d.shared.board.lock();
    assert!(board.seat(0).is_some() && board.seat(1).is_some());
}

#[test]
fn a_crash_during_a_call_is_restarted_at_once_but_idle_crashes_right_after_ready_back_off() {
    let mut h = harness(pool(1));
    h.ready(0, 10);
    // Died under a call 5 ms after getting ready: the call's doing, not a crash loop.
    let lease = h.lease();
    h.give_back(lease, Return::Died, 15);
    h.exit(0, 15);
    assert_eq!(h.launched(), [0, 1], "replaced at once");
    assert_eq!(h.d.counts.crashes, 1);
    h.ready(1, 50);
    let lease = h.lease();
    h.give_back(lease, Return::Died, 55);
    h.exit(1, 55);
    assert_eq!(h.launched(), [0, 1, 2], "again at once: no backoff for crashes in calls");
    // Dying idle right after ready is a crash loop: the next start waits for the backoff.
    h.ready(2, 100);
    h.exit(2, 110);
    assert_eq!(h.launched(), [0, 1, 2], "backing off");
    h.d.maintain(h.at(209));
    assert_eq!(h.launched(), [0, 1, 2]);
    h.d.maintain(h.at(211));
    assert_eq!(h.launched(), [0, 1, 2, 3], "started after 100 ms");
    assert_eq!(h.d.counts.crashes, 3);
}

#[test]
fn max_requests_starts_the_replacement_early_and_retires_the_old_worker_once_drained() {
    let mut h = harness(pool(1).max_requests(4).jitter(0.0));
    h.ready(0, 10);
    for i in 0..3 {
        let lease = h.lease();
        h.give_back(lease, Return::Done, 20 + i);
    }
    assert_eq!(h.launched(), [0, 1], "the replacement starts a quarter of the budget early");
    let last = h.lease();
    assert!(h.d.shared.board.lock().seat(0).is_some_and(|s| s.busy == 1));
    // Ready while the old worker still runs its last call: the old one drains, then stops.
    h.ready(1, 30);
    assert_eq!(h.life(0), Some(Life::Draining));
    assert_eq!(h.d.counts.recycles.max_requests, 1);
    h.give_back(last, Return::Done, 40);
    assert_eq!(h.life(0), Some(Life::Stopping(Stop::Asked)), "asked to stop, not killed");
    assert_eq!(h.killed(0), None);
    // It does not exit: SIGTERM after stop_timeout, then SIGKILL.
    let stop = h.d.cfg.stop_timeout;
    h.d.fire_timers(h.at(40) + stop);
    assert_eq!(h.life(0), Some(Life::Stopping(Stop::Terminated)));
    h.d.fire_timers(h.at(40) + stop * 2);
    assert_eq!(h.life(0), Some(Life::Stopping(Stop::Killed)));
    h.exit(0, 50);
    assert_eq!(h.d.counts.crashes, 0, "a recycled worker's exit is no crash");
    assert_eq!(h.launched(), [0, 1], "no extra worker");
}

#[test]
fn a_queued_call_gets_the_replacement_when_the_old_worker_is_spent() {
    let mut h = harness(pool(1).max_requests(1).jitter(0.0));
    h.ready(0, 10);
    let only = h.lease();
    let far = h.at(3_600_000);
    let mut fx = Effects::default();
    let Ok(Admit::Wait(rx, _)) = h.d.shared.board.lock().admit("echo", None, far, super::Route::Any, &mut fx)
    else {
        panic!("the spent worker takes no second call")
    };
    for n in fx.notices {
        h.d.on_notice(n, h.at(11));
    }
    h.give_back(only, Return::Done, 12);
    assert!(rx.try_recv().is_err(), "still waiting for the replacement");
    h.ready(1, 20);
    // The board handed the new worker to the waiting call when it was added.
    let handed = h.d.shared.board.lock().seat(1).map(|s| s.busy);
    assert_eq!(handed, Some(1));
    assert_eq!(rx.try_recv().expect("the waiting call got a lease").worker, 1);
}

#[test]
fn a_wedged_thread_worker_is_replaced_make_before_break_then_killed() {
    let mut h = harness(pool(1).profile(Profile::Thread).threads_per_worker(2));
    h.ready(0, 10);
    let (a, b) = (h.lease(), h.lease());
    h.give_back(a, Return::Abandoned, 20);
    assert_eq!(h.launched(), [0]);
    h.give_back(b, Return::Abandoned, 21);
    assert_eq!(h.launched(), [0], "calls that just overran may still return");
    h.d.fire_timers(h.at(21) + WEDGE_GRACE);
    assert_eq!(h.launched(), [0, 1], "a replacement for the wedged worker");
    assert_eq!(h.life(0), Some(Life::Ready), "it keeps its place until the replacement is ready");
    h.ready(1, 30);
    assert_eq!(h.killed(0), Some(KillReason::Wedged), "only timed-out calls were left on it");
    assert_eq!(h.d.counts.recycles.wedged, 1);
}

#[test]
fn a_thread_worker_whose_timed_out_calls_return_within_the_grace_is_kept() {
    let mut h = harness(pool(1).profile(Profile::Thread).threads_per_worker(2));
    h.ready(0, 10);
    let (a, b) = (h.lease(), h.lease());
    h.give_back(a, Return::Abandoned, 20);
    h.give_back(b, Return::Abandoned, 21);
    // One of the two returns late, within the grace: the worker can take a call again.
    h.d.shared.board.lock().late_reply(0, &mut Effects::default());
    h.d.fire_timers(h.at(21) + WEDGE_GRACE);
    assert_eq!(h.launched(), [0], "not replaced");
    assert_eq!(h.d.counts.recycles.wedged, 0);
    // Wedged again later: told again, and replaced once the grace passes.
    let c = h.lease();
    h.give_back(c, Return::Abandoned, 2000);
    h.d.fire_timers(h.at(2000) + WEDGE_GRACE);
    assert_eq!(h.launched(), [0, 1]);
}

#[test]
fn a_start_that_times_out_is_killed_and_counted_toward_degradation() {
    let mut h = harness(pool(1).degraded_after(2).startup_timeout(Duration::from_millis(500)));
    h.ready(0, 10);
    h.exit(0, 20); // died idle right after ready: restarted after the crash backoff
    h.d.maintain(h.at(1000));
    let id = *h.launched().last().unwrap();
    h.d.fire_timers(h.at(1000) + Duration::from_millis(500));
    assert_eq!(h.killed(id), Some(KillReason::Startup));
    assert_eq!(h.d.starts.failures(), 1);
    h.exit(id, 1600);
    h.d.maintain(h.at(3000));
    let id = *h.launched().last().unwrap();
    h.d.fire_timers(h.at(3000) + Duration::from_millis(500));
    assert_eq!(h.d.starts.failures(), 2);
    assert!(matches!(h.d.shared.board.lock().gate, Gate::Degraded(_)), "fails calls fast now");
    h.exit(id, 3600);
    h.d.maintain(h.at(10_000));
    let id = *h.launched().last().unwrap();
    h.ready(id, 10_100);
    assert_eq!(h.d.shared.board.lock().gate, Gate::Open, "recovered");
}

#[test]
fn shutdown_asked_twice_answers_both_once_the_last_worker_is_gone() {
    let mut h = harness(pool(2).shutdown_timeout(Duration::from_millis(100)));
    h.ready(0, 10);
    h.ready(1, 10);
    let busy = h.lease();
    let (tx1, rx1) = bounded(1);
    let (tx2, rx2) = bounded(1);
    h.d.on_request(Request::Shutdown(tx1), h.at(20));
    h.d.on_request(Request::Shutdown(tx2), h.at(21));
    assert_eq!(h.d.shared.board.lock().gate, Gate::Closed);
    let (idle, running) = if busy.worker == 0 { (1, 0) } else { (0, 1) };
    assert_eq!(h.life(idle), Some(Life::Stopping(Stop::Asked)));
    assert_eq!(h.life(running), Some(Life::Draining), "its call gets the grace period");
    // The grace period ends with the call still running: it is cut, its worker killed.
    h.d.fire_timers(h.at(20) + Duration::from_millis(100));
    assert_eq!(h.killed(running), Some(KillReason::Shutdown));
    h.exit(idle, 130);
    assert!(!h.d.finished());
    h.exit(running, 140);
    assert!(h.d.finished());
    h.d.finish();
    for rx in [rx1, rx2] {
        let report = rx.try_recv().expect("both askers are answered");
        assert_eq!((report.calls_cut, report.forced), (1, 0));
    }
    drop(busy);
}

#[test]
fn a_worker_killed_for_a_time_out_is_not_a_crash_and_is_replaced_at_once() {
    let mut h = harness(pool(1));
    h.ready(0, 10);
    let lease = h.lease();
    h.give_back(lease, Return::Kill(KillReason::CallTimeout), 20);
    assert_eq!(h.killed(0), Some(KillReason::CallTimeout));
    assert_eq!(h.launched(), [0, 1], "its replacement starts with no backoff");
    h.exit(0, 30);
    assert_eq!(h.d.counts.crashes, 0);
}

#[test]
fn a_kill_through_the_keeper_is_forced_on_the_group_if_the_keeper_does_not_end() {
    let mut h = harness_with(pool(1).stop_timeout(Duration::from_millis(500)), true);
    h.ready(0, 10);
    h.d.kill(0, KillReason::MemoryLimit, h.at(20));
    assert_eq!(h.life(0), Some(Life::Stopping(Stop::Killed)));
    h.d.fire_timers(h.at(519));
    assert_eq!(h.life(0), Some(Life::Stopping(Stop::Killed)), "the keeper has stop_timeout");
    h.d.fire_timers(h.at(520));
    assert_eq!(h.life(0), Some(Life::Stopping(Stop::Forced)), "then the whole group gets SIGKILL");
    // Without a keeper, SIGKILL went to the group at once: nothing to escalate.
    let mut h = harness(pool(1).stop_timeout(Duration::from_millis(500)));
    h.ready(0, 10);
    h.d.kill(0, KillReason::MemoryLimit, h.at(20));
    h.d.fire_timers(h.at(600));
    assert_eq!(h.life(0), Some(Life::Stopping(Stop::Killed)));
}

#[test]
fn a_recycled_worker_serves_its_strict_sessions_until_the_drain_time_then_stops() {
    let mut h = harness(pool(2).max_requests(4).jitter(0.0).session_drain(Duration::from_millis(300)));
    h.ready(0, 10);
    h.ready(1, 10);
    // A strict session bound to worker 0, which then spends its budget.
    assert_eq!(h.d.shared.board.lock().bind(true), Some(0));
    for i in 0..4 {
        let mut fx = Effects::default();
        let far = h.at(3_600_000);
        let admitted = h.d.shared.board.lock().admit("echo", None, far, Route::Only(0), &mut fx);
        for n in fx.notices {
            h.d.on_notice(n, h.at(20 + i));
        }
        let Ok(Admit::Run(lease)) = admitted else { panic!("within the budget") };
        h.give_back(lease, Return::Done, 20 + i);
    }
    assert_eq!(h.launched(), [0, 1, 2], "its replacement started");
    h.ready(2, 40);
    assert_eq!(h.life(0), Some(Life::Draining));
    {
        let board = h.d.shared.board.lock();
        assert!(board.takes_routed(0) && !board.takes_any(0), "its session's calls only");
    }
    h.d.fire_timers(h.at(339));
    assert!(h.d.shared.board.lock().takes_routed(0), "for session_drain");
    h.d.fire_timers(h.at(340));
    assert!(!h.d.shared.board.lock().takes_routed(0), "then no more");
    assert_eq!(
        h.d.shared.board.lock().loss_of(0),
        Some(crate::session::Loss::Recycled(RecycleReason::MaxRequests))
    );
    assert_eq!(h.life(0), Some(Life::Stopping(Stop::Asked)), "and it stops");
}

#[test]
fn a_recycled_worker_whose_last_strict_session_ends_stops_before_the_drain_time() {
    let mut h = harness(pool(1).session_drain(Duration::from_secs(30)));
    h.ready(0, 10);
    assert_eq!(h.d.shared.board.lock().bind(true), Some(0));
    let (tx, _rx) = bounded(1);
    h.d.recycle(0, RecycleReason::Manual, None, Some(tx), h.at(20));
    h.ready(1, 30);
    assert_eq!(h.life(0), Some(Life::Draining));
    let mut fx = Effects::default();
    h.d.shared.board.lock().unbind(0, &mut fx);
    for n in fx.notices {
        h.d.on_notice(n, h.at(40));
    }
    assert_eq!(h.life(0), Some(Life::Stopping(Stop::Asked)), "stopped at once, not after 30 s");
}
