//! The per-pool dispatcher: the one thread (`sp-disp-<pool>`) that owns the workers' lives.
//!
//! Calls do not pass through it. A caller takes a lease on a ready worker from the shared
//! [`Board`](board::Board) (or waits there, in order), runs its call on the worker itself and
//! gives the lease back; the dispatcher only hears of what it must act on ([`Notice`]s: a
//! worker due for recycling, drained, wedged, to be killed). It owns everything else: spawning
//! (so the parent-death signal is tied to a thread that lives as long as the pool), readiness,
//! exits and restarts with backoff, recycling make before break, TTL timers, degradation and
//! shutdown.
//!
//! It is fed by two channels in one `select!`: requests (notices, stats, shutdown, recycling
//! orders) and events from the workers' monitor threads. Timers live in a heap; every method
//! that depends on time takes `now`, so the unit tests drive it with fake workers and a made-up
//! clock. The work is split by subject: `board.rs` (the call side's shared state),
//! `lifecycle.rs` (start, ready, exit, backoff), `recycle.rs` (recycling, draining) and
//! `shutdown.rs` (stopping workers and the pool).

mod board;
mod lifecycle;
mod recycle;
mod shutdown;
#[cfg(test)]
mod tests;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crossbeam_channel::{select, unbounded, Receiver, Sender};
use parking_lot::Mutex;

use crate::cancel::CancelStep;
use crate::config::PoolConfig;
use crate::error::Result;
use crate::events::{Emitter, Event};
use crate::policy::{Backoff, Limits, RecycleReason, WorkerFacts};
use crate::stats::{PoolStats, Recycles, WorkerState, WorkerStats};
use crate::worker::{Conn, KillReason, SpawnSpec, Worker, WorkerEvent, WorkerId};

pub(crate) use board::{Admit, Board, Effects, Gate, Lease, Notice, Return, Route};
pub(crate) use shutdown::ShutdownReport;

/// How often frames posted to a busy worker are retried.
const FLUSH_RETRY: Duration = Duration::from_millis(10);

/// What callers, the pool and the housekeeper send the dispatcher.
pub(crate) enum Request {
    /// Something the call side saw that the dispatcher must act on.
    Notice(Notice),
    Stats(Sender<PoolStats>),
    Shutdown(Sender<ShutdownReport>),
    /// The housekeeper asks for the facts its memory decision needs.
    Facts(Sender<Vec<WorkerFacts>>),
    /// The housekeeper orders a recycle (memory) or a kill (hard memory, failed health check).
    Recycle(RecycleOrder),
    /// `Pool::recycle_worker`: answered once the worker is replaced (or could not be).
    RecycleWorker {
        worker: WorkerId,
        reply: Sender<Result<()>>,
    },
    /// A session with an idle time-out exists: end the idle ones on a timer.
    WatchSessions,
    /// Frames posted to these workers (sessions' ends) wait for room in their pipes: retry.
    FlushPosted(Vec<WorkerId>),
}

/// What the housekeeper orders.
#[derive(Debug)]
pub(crate) struct RecycleOrder {
    pub(crate) worker: WorkerId,
    pub(crate) reason: RecycleReason,
    /// Kill now instead of draining (hard memory ceiling, failed health check).
    pub(crate) kill: bool,
    pub(crate) rss: Option<u64>,
}

/// What the call side and the dispatcher share: the board under its lock, the way to the
/// dispatcher, and the event emitter.
pub(crate) struct Shared {
    pub(crate) name: String,
    pub(crate) board: Mutex<Board<Arc<Conn>>>,
    pub(crate) requests: Sender<Request>,
    pub(crate) emitter: Emitter,
    pub(crate) sessions: crate::session::Sessions,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("name", &self.name).finish_non_exhaustive()
    }
}

impl Shared {
    /// Carries out what a board operation left to do, once its lock is released: hands leases
    /// to waiting callers and passes notices to the dispatcher.
    ///
    /// Handing over, the thread that freed a process worker first writes the waiting call's
    /// frame itself (when it is small enough for one atomic pipe write and the call is still in
    /// time), so the worker starts on it while that caller is still waking up: one wake-up
    /// fewer between two calls on a busy worker.
    pub(crate) fn apply(&self, fx: Effects<Arc<Conn>>) {
        for h in fx.handoffs {
            let mut lease = h.lease;
            if let Some(frame) = &h.frame {
                lease.sent = Instant::now() < h.by && lease.conn.send_now(frame);
            }
            if let Err(lease) = h.to.send(lease) {
                // Its caller is gone (a waiter handed a lease always takes it, unless its
                // thread died): a call written for nobody means the worker must go.
                let how = if lease.sent { Return::Kill(KillReason::Protocol) } else { Return::Done };
                let mut more = Effects::default();
                self.board.lock().give_back(lease, how, None, &mut more);
                self.apply(more);
            }
        }
        for n in fx.notices {
            if n == Notice::QueueFull {
                let max_queue = self.board.lock().queued();
                log::warn!("[{}] queue full ({max_queue} calls waiting); call refused", self.name);
                if self.emitter.enabled() {
                    self.emitter.emit(Event::QueueFull { pool: self.name.clone(), max_queue });
                }
            } else {
                // A dispatcher that is gone has nothing left to act on.
                let _ = self.requests.send(Request::Notice(n));
            }
        }
    }

    /// A step of cancelling call `call` on `worker` was taken: an event, if anyone listens.
    pub(crate) fn cancel_step(&self, worker: WorkerId, call: u64, step: CancelStep) {
        if self.emitter.enabled() {
            self.emitter.emit(Event::CallCancel { pool: self.name.clone(), worker, call, step });
        }
    }

    /// A reply came for a call whose caller had given up: its slot is free again.
    fn late_reply(&self, worker: WorkerId) {
        let mut fx = Effects::default();
        self.board.lock().late_reply(worker, &mut fx);
        self.apply(fx);
    }
}

/// How the dispatcher starts a worker: the seam its unit tests replace with fake workers.
pub(crate) trait Launch: Send {
    fn launch(&mut self, id: WorkerId, events: Sender<WorkerEvent>, shared: &Arc<Shared>) -> Result<Worker>;
    /// The interpreter the workers run (with the launcher, if any), named in start-up errors.
    fn interpreter(&self) -> String;
}

/// Starts real Python processes.
pub(crate) struct Spawner(pub(crate) SpawnSpec);

impl Launch for Spawner {
    fn launch(&mut self, id: WorkerId, events: Sender<WorkerEvent>, shared: &Arc<Shared>) -> Result<Worker> {
        let shared: Weak<Shared> = Arc::downgrade(shared);
        let for_steps = shared.clone();
        let on_late = Box::new(move || {
            if let Some(s) = shared.upgrade() {
                s.late_reply(id);
            }
        });
        let on_step = Box::new(move |call, step| {
            if let Some(s) = for_steps.upgrade() {
                s.cancel_step(id, call, step);
            }
        });
        Worker::spawn(id, &self.0, events, on_late, on_step)
    }

    fn interpreter(&self) -> String {
        let python = self.0.python.display().to_string();
        match self.0.launcher.is_empty() {
            true => python,
            false => format!("{} {python}", self.0.launcher.join(" ")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    /// A starting worker's ready deadline.
    Startup(WorkerId),
    /// A worker's age limit (`ttl` after jitter).
    Ttl(WorkerId),
    /// A stopping worker's next escalation (SIGTERM, then SIGKILL).
    Escalate(WorkerId),
    /// A thread worker whose slots were all held by timed-out calls: replace it if they still
    /// are.
    Wedged(WorkerId),
    /// Something to re-check then (a restart after backoff, a recycle retry, the end of the
    /// shutdown grace).
    Wake,
    /// End the sessions idle past their time-out.
    Sessions,
    /// A retired worker's strict sessions had `session_drain` to end: close it now.
    SessionDrain(WorkerId),
    /// Retry writing the frames posted to a worker.
    FlushPosted(WorkerId),
}

/// Why a worker was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// By `build()`.
    Initial,
    /// To bring the pool back to size after a worker died or failed to start.
    Restart,
    /// To replace a worker being recycled.
    Replaces(WorkerId),
}

/// Where a worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Life {
    /// Spawned, not yet ready.
    Starting,
    /// Taking calls.
    Ready,
    /// Replaced (or the pool is stopping): finishing its calls, taking no new ones.
    Draining,
    /// Asked to stop, then forced, step by step.
    Stopping(Stop),
}

/// How far stopping a worker has gone, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stop {
    /// Sent `shutdown` and EOF.
    Asked,
    /// Sent SIGTERM.
    Terminated,
    /// Sent SIGKILL (through the keeper, if it has one).
    Killed,
    /// Sent SIGKILL to the whole process group: the keeper did not end in time.
    Forced,
}

impl Life {
    fn state(self) -> WorkerState {
        match self {
            Life::Starting => WorkerState::Starting,
            Life::Ready => WorkerState::Ready,
            Life::Draining => WorkerState::Draining,
            Life::Stopping(_) => WorkerState::Stopping,
        }
    }
}

/// A worker being replaced: make before break.
struct Recycle {
    reason: RecycleReason,
    replacement: WorkerId,
    rss: Option<u64>,
    /// `Pool::recycle_worker` callers waiting for the outcome.
    waiters: Vec<Sender<Result<()>>>,
}

struct Slot {
    worker: Worker,
    life: Life,
    origin: Origin,
    spawned: Instant,
    ready_at: Option<Instant>,
    limits: Limits,
    recycle: Option<Recycle>,
    /// A recycle that is due but has not started (another held the turn, or the last
    /// replacement failed and this is when to try again).
    pending: Option<(RecycleReason, Instant)>,
}

impl Slot {
    fn pid(&self) -> u32 {
        self.worker.conn.worker_pid()
    }
}

/// Counts the dispatcher keeps (the call outcomes are on the board).
#[derive(Default)]
struct Counts {
    crashes: u64,
    restarts: u64,
    recycles: Recycles,
}

enum Phase {
    /// `build()` is waiting for every worker's `ready`.
    Starting(Sender<Result<()>>),
    Running,
    ShuttingDown {
        grace_end: Instant,
        replies: Vec<Sender<ShutdownReport>>,
        report: ShutdownReport,
    },
}

pub(crate) struct Dispatcher {
    cfg: Arc<PoolConfig>,
    shared: Arc<Shared>,
    launch: Box<dyn Launch>,
    requests: Receiver<Request>,
    events_tx: Sender<WorkerEvent>,
    events: Receiver<WorkerEvent>,
    phase: Phase,
    slots: BTreeMap<WorkerId, Slot>,
    next_worker: WorkerId,
    timers: BinaryHeap<Reverse<(Instant, Timer)>>,
    counts: Counts,
    /// Failed starts in a row.
    starts: Backoff,
    /// Workers in a row that died while idle soon after getting ready.
    idle_crashes: Backoff,
    last_startup_error: Option<String>,
    degraded_announced: bool,
    next_spawn: Instant,
    /// The wake-up already scheduled for `next_spawn`.
    spawn_wake: Option<Instant>,
    /// Workers that have exited, until their monitor threads have ended and are joined.
    exited: Vec<Worker>,
    /// The CPU-bound-on-a-GIL warning has been logged.
    warned_gil: bool,
}

/// How long every slot of a thread worker must stay held by timed-out calls before it is
/// replaced: calls that overran their deadline by a little return soon and free their slots.
const WEDGE_GRACE: Duration = Duration::from_secs(1);

/// A worker that dies while idle within this time of getting ready counts towards restart
/// backoff (a crash loop); one that dies during a call does not: that was the call's doing.
const QUICK_CRASH: Duration = Duration::from_secs(1);

impl Dispatcher {
    pub(crate) fn new(
        cfg: Arc<PoolConfig>,
        shared: Arc<Shared>,
        launch: Box<dyn Launch>,
        requests: Receiver<Request>,
        started: Sender<Result<()>>,
        now: Instant,
    ) -> Self {
        let (events_tx, events) = unbounded();
        Dispatcher {
            starts: Backoff::new(cfg.restart_backoff),
            idle_crashes: Backoff::new(cfg.restart_backoff),
            cfg,
            shared,
            launch,
            requests,
            events_tx,
            events,
            phase: Phase::Starting(started),
            slots: BTreeMap::new(),
            next_worker: 0,
            timers: BinaryHeap::new(),
            counts: Counts::default(),
            last_startup_error: None,
            degraded_announced: false,
            next_spawn: now,
            spawn_wake: None,
            exited: Vec::new(),
            warned_gil: false,
        }
    }

    /// The thread's body: runs until the pool has shut down and every worker is reaped.
    pub(crate) fn run(mut self) {
        self.start(Instant::now());
        loop {
            self.maintain(Instant::now());
            if self.finished() {
                break;
            }
            let timeout = match self.timers.peek() {
                Some(Reverse((at, _))) => at.saturating_duration_since(Instant::now()),
                None => Duration::from_secs(3600),
            };
            select! {
                recv(self.events) -> ev => {
                    if let Ok(ev) = ev {
                        self.on_worker_event(ev, Instant::now());
                    }
                }
                recv(self.requests) -> req => {
                    if let Ok(req) = req {
                        self.on_request(req, Instant::now());
                    }
                }
                default(timeout) => {}
            }
            // Handle whatever else is already waiting before looking at timers.
            while let Ok(ev) = self.events.try_recv() {
                self.on_worker_event(ev, Instant::now());
            }
            self.fire_timers(Instant::now());
            self.join_exited();
        }
        self.finish();
    }

    /// Spawns the pool's first workers.
    fn start(&mut self, now: Instant) {
        for _ in 0..self.cfg.size {
            if let Err(e) = self.spawn_worker(Origin::Initial, now) {
                self.fail_start(e, now);
                break;
            }
        }
    }

    /// Joins the monitor threads of exited workers that have ended.
    fn join_exited(&mut self) {
        if self.exited.iter().any(Worker::finished) {
            let (done, waiting): (Vec<Worker>, Vec<Worker>) =
                std::mem::take(&mut self.exited).into_iter().partition(Worker::finished);
            done.into_iter().for_each(Worker::join);
            self.exited = waiting;
        }
    }

    fn on_request(&mut self, req: Request, now: Instant) {
        match req {
            Request::Notice(n) => self.on_notice(n, now),
            Request::Stats(reply) => {
                let _ = reply.send(self.snapshot(now));
            }
            Request::Shutdown(reply) => match &mut self.phase {
                Phase::ShuttingDown { replies, .. } => replies.push(reply),
                _ => self.begin_shutdown(Some(reply), now),
            },
            Request::Facts(reply) => {
                // Draining workers too: the hard memory ceiling applies to them.
                let board = self.shared.board.lock();
                let facts = self
                    .slots
                    .iter()
                    .filter(|(_, s)| matches!(s.life, Life::Ready | Life::Draining))
                    .map(|(&id, s)| WorkerFacts {
                        id,
                        pid: s.pid(),
                        root: if s.worker.conn.has_keeper() { s.worker.conn.pid } else { s.pid() },
                        spawned: s.spawned,
                        assigned: board.seat(id).map_or(0, board::Seat::assigned),
                        limits: s.limits,
                        rss: None,
                    })
                    .collect();
                drop(board);
                let _ = reply.send(facts);
            }
            Request::Recycle(order) => self.on_order(order, now),
            Request::RecycleWorker { worker, reply } => match self.slots.get(&worker) {
                Some(s) if s.life == Life::Ready => {
                    self.recycle(worker, RecycleReason::Manual, None, Some(reply), now);
                }
                _ => {
                    let _ = reply.send(Err(crate::Error::UnknownWorker { worker }));
                }
            },
            Request::FlushPosted(workers) => {
                for id in workers {
                    self.schedule(now + FLUSH_RETRY, Timer::FlushPosted(id));
                }
            }
            Request::WatchSessions => {
                if let Some(at) = crate::session::expire(&self.shared, now) {
                    self.schedule(at, Timer::Sessions);
                }
            }
        }
    }

    fn on_worker_event(&mut self, ev: WorkerEvent, now: Instant) {
        match ev {
            WorkerEvent::Frame(id, msg) => self.on_frame(id, msg, now),
            WorkerEvent::Broken(id, err) => {
                if let Some(s) = self.slots.get(&id) {
                    s.worker.conn.mark_broken(err);
                    self.kill(id, crate::worker::KillReason::Protocol, now);
                }
            }
            WorkerEvent::Exited(id, exit) => self.on_exit(id, exit, now),
        }
    }

    fn schedule(&mut self, at: Instant, timer: Timer) {
        self.timers.push(Reverse((at, timer)));
    }

    fn fire_timers(&mut self, now: Instant) {
        while let Some(Reverse((at, timer))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            match timer {
                Timer::Startup(id) => self.startup_timer(id, now),
                Timer::Ttl(id) => {
                    if self.slots.get(&id).is_some_and(|s| s.life == Life::Ready) {
                        self.recycle(id, RecycleReason::Ttl, None, None, now);
                    }
                }
                Timer::Escalate(id) => self.escalate(id, now),
                Timer::Wedged(id) => {
                    if self.shared.board.lock().still_wedged(id) {
                        log::warn!(
                            "[{}] worker {id}: every call slot has been held by a timed-out call for {WEDGE_GRACE:?}; \
                             replacing it",
                            self.cfg.name
                        );
                        self.recycle(id, RecycleReason::Wedged, None, None, now);
                    }
                }
                Timer::Wake => self.grace_timer(now),
                Timer::Sessions => {
                    if let Some(at) = crate::session::expire(&self.shared, now) {
                        self.schedule(at, Timer::Sessions);
                    }
                }
                Timer::SessionDrain(id) => self.session_drain_over(id, now),
                Timer::FlushPosted(id) => {
                    let done = self.slots.get(&id).map_or(true, |s| s.worker.conn.flush_posted());
                    if !done {
                        self.schedule(now + FLUSH_RETRY, Timer::FlushPosted(id));
                    }
                }
            }
        }
    }

    fn snapshot(&self, now: Instant) -> PoolStats {
        // `/proc` is read before the board is locked: callers never wait on it.
        let rss: Vec<Option<u64>> = self.slots.values().map(|s| crate::proc::rss_bytes(s.pid())).collect();
        let sessions = self.shared.sessions.counts();
        let board = self.shared.board.lock();
        let c = &board.counters;
        PoolStats {
            sessions,
            name: self.cfg.name.clone(),
            size: self.cfg.size,
            ready_workers: self.slots.values().filter(|s| s.life == Life::Ready).count(),
            degraded: self.is_degraded(),
            calls_ok: c.ok,
            calls_failed: c.failed,
            queued: board.queued(),
            queue_high_water: c.queue_high_water,
            timeouts: c.timeouts,
            crashes: self.counts.crashes,
            restarts: self.counts.restarts,
            recycles: self.counts.recycles.clone(),
            startup_failures: self.starts.failures(),
            events_dropped: self.shared.emitter.dropped(),
            queue_wait: c.queue_wait.latency(),
            execution: c.execution.latency(),
            workers: self
                .slots
                .iter()
                .zip(rss)
                .map(|((&id, s), rss_bytes)| {
                    let seat = board.seat(id);
                    WorkerStats {
                        id,
                        pid: s.pid(),
                        // Dead already, though its exit is still on its way here.
                        state: if s.worker.conn.has_exited() {
                            WorkerState::Stopping
                        } else {
                            s.life.state()
                        },
                        in_flight: seat.map_or(0, |x| x.busy),
                        capacity: self.cfg.capacity(),
                        calls_served: seat.map_or(0, |x| x.served),
                        errors: seat.map_or(0, |x| x.errors),
                        age_ms: now.saturating_duration_since(s.spawned).as_millis() as u64,
                        rss_bytes,
                        max_requests: s.limits.max_requests,
                        recycle_in_ms: s
                            .limits
                            .ttl
                            .map(|ttl| (s.spawned + ttl).saturating_duration_since(now).as_millis() as u64),
                        recycling: s.recycle.as_ref().map(|r| r.reason),
                        sessions: seat.map_or(0, |x| x.sessions),
                    }
                })
                .collect(),
        }
    }
}
