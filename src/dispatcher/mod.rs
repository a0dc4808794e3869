//! The per-pool loop. One thread owns the pool's state: the workers and their capacity
//! counters, the FIFO queue, every call's deadline, restarts with backoff, recycling, health
//! checks and shutdown.
//!
//! It is fed by two channels, one `select!`: requests (from callers and the reaper) and events
//! from the worker threads. Timers live in a heap; stale entries are skipped. The work is
//! split by subject: `calls.rs` (queue, dispatch, completion, deadlines), `lifecycle.rs`
//! (start, ready, exit, backoff), `recycle.rs` (recycling and health checks) and `shutdown.rs`
//! (stopping workers and the pool).

mod calls;
mod lifecycle;
mod recycle;
mod shutdown;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, unbounded, Receiver, Sender};

use crate::config::PoolConfig;
use crate::error::{Error, Result};
use crate::events::Emitter;
use crate::protocol::Msg;
use crate::reaper::{Limits, RecycleOrder, RecycleReason, WorkerFacts};
use crate::stats::{PoolStats, Recycles, Window, WorkerState, WorkerStats};
use crate::worker::{ReplyTx, SpawnSpec, Worker, WorkerEvent, WorkerId};

pub(crate) use shutdown::{ShutdownReport, STOP_ESCALATION};

/// What callers and the reaper send the dispatcher.
pub(crate) enum Request {
    /// A call and where its one answer goes.
    Call(Call, ReplyTx),
    Stats(Sender<PoolStats>),
    Shutdown(Sender<ShutdownReport>),
    /// The reaper asks for the facts its decision needs.
    Facts(Sender<Vec<WorkerFacts>>),
    /// The reaper orders a recycle.
    Recycle(RecycleOrder),
    /// `Pool::recycle_worker`: answered once the worker is replaced (or could not be).
    RecycleWorker {
        worker: WorkerId,
        reply: Sender<Result<()>>,
    },
}

/// One call on its way to a worker. The frame is encoded by the calling thread.
pub(crate) struct Call {
    pub(crate) id: u64,
    pub(crate) command: String,
    pub(crate) frame: Vec<u8>,
    pub(crate) enqueued: Instant,
    pub(crate) queue_deadline: Instant,
    pub(crate) deadline: Instant,
    /// Set when the call is handed to a worker, so a caller whose own wait ends at the
    /// deadline knows which kind of time-out it was.
    pub(crate) started: Arc<AtomicBool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    /// A call's queue deadline or whole deadline.
    Call(u64),
    /// A starting worker's ready deadline.
    Startup(WorkerId),
    /// A stopping worker's next escalation (SIGTERM, then SIGKILL).
    Escalate(WorkerId),
    /// Time to ping a worker if it is idle.
    Health(WorkerId),
    /// The answer to ping `.1` is due.
    HealthDeadline(WorkerId, u64),
    /// Something to re-check then (a restart after backoff, the end of the shutdown grace).
    Wake,
}

struct Pending {
    call: Call,
    /// The caller's channel while the call is queued; handed to the worker at dispatch.
    reply: Option<ReplyTx>,
    /// `None` while queued.
    worker: Option<WorkerId>,
    dispatched: Instant,
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
    state: WorkerState,
    capacity: usize,
    in_flight: Vec<u64>,
    served: u64,
    errors: u64,
    spawned: Instant,
    origin: Origin,
    limits: Limits,
    recycle: Option<Recycle>,
    /// After a failed replacement, the earliest time to try recycling it again.
    retry_recycle: Option<Instant>,
    /// The id of an unanswered health ping.
    ping: Option<u64>,
    /// Set when the worker was killed for breaking the protocol: its calls fail with this.
    broken: Option<Error>,
    /// How far stopping it has gone: RUNNING, ASKED, TERMINATED or KILLED.
    escalation: u8,
    /// Killed because one of its calls overran its deadline: its other calls are collateral.
    collateral: bool,
    /// Completions heard of that the reader had delivered (compare `Worker::delivered`).
    delivered_seen: u64,
    /// When it sent `ready`.
    ready_at: Option<Instant>,
}

impl Slot {
    /// Calls given to it so far: finished plus in flight.
    fn assigned(&self) -> u64 {
        self.served + self.in_flight.len() as u64
    }

    /// Whether it has been given its last call (`max_requests` is exact).
    fn spent(&self) -> bool {
        self.limits.max_requests.is_some_and(|limit| self.assigned() >= limit)
    }

    /// Calls still running on it: those in flight less those whose replies its reader has
    /// already delivered (the reader answers the caller before it tells the dispatcher, so a
    /// caller may call again before the dispatcher has heard; the worker is free by then).
    fn running(&self) -> usize {
        let unheard = self.worker.delivered().saturating_sub(self.delivered_seen) as usize;
        self.in_flight.len().saturating_sub(unheard)
    }

    /// Whether it can take another call now.
    fn has_room(&self) -> bool {
        self.state == WorkerState::Ready
            && self.running() < self.capacity
            // A process worker answers a ping only between calls; a thread worker at once.
            && (self.ping.is_none() || self.capacity > 1)
            && !self.spent()
    }

    fn facts(&self) -> WorkerFacts {
        WorkerFacts {
            id: self.worker.id,
            pid: self.worker.pid,
            spawned: self.spawned,
            assigned: self.assigned(),
            limits: self.limits,
            rss: None,
        }
    }
}

#[derive(Default)]
struct Counters {
    ok: u64,
    failed: u64,
    timeouts: u64,
    crashes: u64,
    restarts: u64,
    recycles: Recycles,
    queue_high_water: usize,
    queue_wait: Window,
    execution: Window,
}

enum Phase {
    /// `build()` is waiting for every worker's `ready`.
    Starting(Sender<Result<()>>),
    Running,
    ShuttingDown {
        grace_end: Instant,
        reply: Option<Sender<ShutdownReport>>,
        report: ShutdownReport,
    },
}

pub(crate) struct Dispatcher {
    cfg: Arc<PoolConfig>,
    spec: SpawnSpec,
    requests: Receiver<Request>,
    events_tx: Sender<WorkerEvent>,
    events: Receiver<WorkerEvent>,
    emitter: Emitter,
    phase: Phase,
    slots: Vec<Slot>,
    next_worker: WorkerId,
    next_ping: u64,
    queue: VecDeque<u64>,
    queued: usize,
    calls: HashMap<u64, Pending>,
    timers: BinaryHeap<Reverse<(Instant, Timer)>>,
    commands: Option<HashSet<String>>,
    counters: Counters,
    startup_failures: u32,
    last_startup_error: Option<String>,
    degraded_announced: bool,
    next_spawn: Instant,
    /// The wake-up already scheduled for `next_spawn`.
    spawn_wake: Option<Instant>,
    /// Workers that have exited, until their threads have ended and are joined.
    exited: Vec<Worker>,
    /// The CPU-bound-on-a-GIL warning has been logged.
    warned_gil: bool,
    /// Workers in a row that died soon after getting ready.
    quick_crashes: u32,
}

impl Dispatcher {
    pub(crate) fn new(
        cfg: Arc<PoolConfig>,
        spec: SpawnSpec,
        requests: Receiver<Request>,
        emitter: Emitter,
        started: Sender<Result<()>>,
    ) -> Self {
        let (events_tx, events) = unbounded();
        Dispatcher {
            cfg,
            spec,
            requests,
            events_tx,
            events,
            emitter,
            phase: Phase::Starting(started),
            slots: Vec::new(),
            next_worker: 0,
            next_ping: 0,
            queue: VecDeque::new(),
            queued: 0,
            calls: HashMap::new(),
            timers: BinaryHeap::new(),
            commands: None,
            counters: Counters::default(),
            startup_failures: 0,
            last_startup_error: None,
            degraded_announced: false,
            next_spawn: Instant::now(),
            spawn_wake: None,
            exited: Vec::new(),
            warned_gil: false,
            quick_crashes: 0,
        }
    }

    /// The thread's body: runs until the pool has shut down and every worker is reaped.
    pub(crate) fn run(mut self) {
        for _ in 0..self.cfg.size {
            if let Err(e) = self.spawn_worker(Origin::Initial) {
                self.fail_start(e);
                break;
            }
        }
        loop {
            self.maintain();
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
                        self.on_event(ev);
                    }
                }
                recv(self.requests) -> req => match req {
                    Ok(req) => self.on_request(req),
                    // Every handle to the pool is gone: stop as if asked.
                    Err(_) => {
                        if !matches!(self.phase, Phase::ShuttingDown { .. }) {
                            self.begin_shutdown(None);
                        }
                        // Stop selecting on a channel that is always ready.
                        self.requests = crossbeam_channel::never();
                    }
                },
                default(timeout) => {}
            }
            // Handle whatever else is already waiting before looking at timers.
            while let Ok(ev) = self.events.try_recv() {
                self.on_event(ev);
            }
            self.fire_timers();
            self.join_exited();
        }
        self.finish();
    }

    /// Joins the threads of exited workers that have ended.
    fn join_exited(&mut self) {
        if self.exited.iter().any(Worker::finished) {
            let (done, waiting): (Vec<Worker>, Vec<Worker>) =
                std::mem::take(&mut self.exited).into_iter().partition(Worker::finished);
            done.into_iter().for_each(Worker::join);
            self.exited = waiting;
        }
    }

    fn on_request(&mut self, req: Request) {
        match req {
            Request::Call(call, reply) => self.on_call(call, reply),
            Request::Stats(reply) => {
                // A snapshot reflects what its asker has seen: replies already delivered and
                // deadlines already passed.
                self.catch_up();
                self.fire_timers();
                let _ = reply.send(self.snapshot());
            }
            Request::Shutdown(reply) => match &mut self.phase {
                Phase::ShuttingDown { reply: slot, .. } => {
                    if slot.is_none() {
                        *slot = Some(reply);
                    }
                }
                _ => self.begin_shutdown(Some(reply)),
            },
            Request::Facts(reply) => {
                // Draining and recycling workers too: the hard memory ceiling applies to them
                // (other orders for them are ignored).
                let facts = self
                    .slots
                    .iter()
                    .filter(|s| matches!(s.state, WorkerState::Ready | WorkerState::Draining))
                    .map(Slot::facts)
                    .collect();
                let _ = reply.send(facts);
            }
            Request::Recycle(order) => {
                if let Some(i) = self.slot_index(order.worker) {
                    self.recycle(i, order.reason, order.rss, order.kill, None);
                }
            }
            Request::RecycleWorker { worker, reply } => match self.slot_index(worker) {
                Some(i) if self.slots[i].state == WorkerState::Ready => {
                    self.recycle(i, RecycleReason::Manual, None, false, Some(reply));
                }
                _ => {
                    let _ = reply.send(Err(Error::UnknownWorker { worker }));
                }
            },
        }
    }

    /// Hears every completion whose reply a caller may already hold (the stdout reader
    /// answers the caller before it tells the dispatcher), so a snapshot counts every call its
    /// asker has seen finish. Bounded: a reader is at most one channel send behind.
    fn catch_up(&mut self) {
        let end = Instant::now() + Duration::from_millis(100);
        while self.slots.iter().any(|s| s.worker.delivered() > s.delivered_seen) {
            match self.events.recv_deadline(end) {
                Ok(ev) => self.on_event(ev),
                Err(_) => break,
            }
        }
    }

    fn slot_index(&self, id: WorkerId) -> Option<usize> {
        self.slots.iter().position(|s| s.worker.id == id)
    }

    fn on_event(&mut self, ev: WorkerEvent) {
        match ev {
            WorkerEvent::Completed { worker, call, ok, answered } => {
                self.on_completed(worker, call, ok, answered)
            }
            WorkerEvent::Frame(id, msg) => {
                let Some(i) = self.slot_index(id) else { return };
                match msg {
                    Msg::Ready { info } => self.on_ready(i, info),
                    Msg::StartupError { error } => {
                        let adapter = self.spec.adapter.as_deref().unwrap_or("(none)");
                        let message = format!("adapter `{adapter}`: {}", error.message);
                        self.startup_failed(i, Error::Startup { message, error: Some(error) });
                    }
                    Msg::Pong { id } => self.on_pong(i, id),
                    other => self.protocol_violation(i, format!("unexpected message from worker: {other:?}")),
                }
            }
            WorkerEvent::Broken(id, err) => {
                let Some(i) = self.slot_index(id) else { return };
                let s = &mut self.slots[i];
                log::warn!(
                    "[{}] worker {id} (pid {}) broke the protocol: {err}",
                    self.cfg.name,
                    s.worker.pid
                );
                s.broken = Some(err);
                self.kill(i);
            }
            WorkerEvent::Exited(id, exit) => self.on_exit(id, exit),
        }
    }

    fn protocol_violation(&mut self, i: usize, why: String) {
        let s = &mut self.slots[i];
        log::warn!("[{}] worker {} (pid {}): {why}", self.cfg.name, s.worker.id, s.worker.pid);
        s.broken = Some(Error::Protocol(why));
        self.kill(i);
    }

    fn fire_timers(&mut self) {
        // Most call timers go stale (the call finished first). Drop them in one pass once they
        // outnumber the live ones, so the heap stays proportional to the calls in the pool.
        if self.timers.len() > 2 * (self.calls.len() + self.slots.len()) + 64 {
            let calls = &self.calls;
            self.timers.retain(|Reverse((_, t))| match t {
                Timer::Call(id) => calls.contains_key(id),
                _ => true,
            });
        }
        let now = Instant::now();
        while let Some(Reverse((at, timer))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            match timer {
                Timer::Call(id) => self.call_timer(id, now),
                Timer::Startup(wid) => self.startup_timer(wid),
                Timer::Escalate(wid) => self.escalate(wid, now),
                Timer::Health(wid) => self.health_timer(wid, now),
                Timer::HealthDeadline(wid, ping) => self.health_deadline(wid, ping),
                Timer::Wake => self.grace_timer(now),
            }
        }
    }

    fn snapshot(&self) -> PoolStats {
        let c = &self.counters;
        let now = Instant::now();
        PoolStats {
            name: self.cfg.name.clone(),
            size: self.cfg.size,
            ready_workers: self.slots.iter().filter(|s| s.state == WorkerState::Ready).count(),
            degraded: self.is_degraded(),
            calls_ok: c.ok,
            calls_failed: c.failed,
            queued: self.queued,
            queue_high_water: c.queue_high_water,
            timeouts: c.timeouts,
            crashes: c.crashes,
            restarts: c.restarts,
            recycles: c.recycles.clone(),
            startup_failures: self.startup_failures,
            events_dropped: self.emitter.dropped,
            queue_wait: c.queue_wait.latency(),
            execution: c.execution.latency(),
            workers: self
                .slots
                .iter()
                .map(|s| WorkerStats {
                    id: s.worker.id,
                    pid: s.worker.pid,
                    state: s.state,
                    in_flight: s.in_flight.len(),
                    capacity: s.capacity,
                    calls_served: s.served,
                    errors: s.errors,
                    age_ms: now.saturating_duration_since(s.spawned).as_millis() as u64,
                    rss_bytes: crate::stats::rss_bytes(s.worker.pid),
                    max_requests: s.limits.max_requests,
                    recycle_in_ms: s
                        .limits
                        .ttl
                        .map(|ttl| (s.spawned + ttl).saturating_duration_since(now).as_millis() as u64),
                    recycling: s.recycle.as_ref().map(|r| r.reason),
                })
                .collect(),
        }
    }
}
