//! The per-pool loop. One thread owns the pool's state: the workers and their capacity
//! counters, the FIFO queue, every call's deadline, restarts with backoff, and shutdown.
//!
//! It is fed by two channels, one `select!`: requests from callers (calls, stats, shutdown)
//! and events from the worker threads. Timers live in a heap; stale entries are skipped.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, unbounded, Receiver, Sender};
use serde_json::Value;

use crate::config::PoolConfig;
use crate::error::{Error, ExitKind, Result, TimeoutKind};
use crate::protocol::{self, Msg, PROTOCOL_VERSION};
use crate::stats::{self, PoolStats, Window, WorkerState, WorkerStats};
use crate::sys;
use crate::worker::{ReplyTx, SpawnSpec, Worker, WorkerEvent, WorkerId};

/// How long a worker asked to stop may take before SIGTERM, and again before SIGKILL.
pub(crate) const STOP_ESCALATION: Duration = Duration::from_secs(1);

// How far stopping a worker has gone, in order.
const RUNNING: u8 = 0;
/// Sent `shutdown` and EOF.
const ASKED: u8 = 1;
/// Sent SIGTERM.
const TERMINATED: u8 = 2;
/// Sent SIGKILL.
const KILLED: u8 = 3;

/// What callers send the dispatcher.
pub(crate) enum Request {
    /// A call and where its one answer goes.
    Call(Call, ReplyTx),
    Stats(Sender<PoolStats>),
    Shutdown(Sender<ShutdownReport>),
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

/// What went wrong during shutdown.
#[derive(Debug, Default)]
pub(crate) struct ShutdownReport {
    /// In-flight calls failed because the grace period ended.
    pub(crate) calls_cut: usize,
    /// Workers that had to be signalled because they did not exit when asked.
    pub(crate) forced: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    /// A call's queue deadline or whole deadline.
    Call(u64),
    /// A starting worker's ready deadline.
    Startup(WorkerId),
    /// A stopping worker's next escalation (SIGTERM, then SIGKILL).
    Escalate(WorkerId),
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

struct Slot {
    worker: Worker,
    state: WorkerState,
    capacity: usize,
    in_flight: Vec<u64>,
    served: u64,
    errors: u64,
    spawned: Instant,
    /// Set when the worker was killed for breaking the protocol: its calls fail with this.
    broken: Option<Error>,
    /// How far stopping it has gone: RUNNING, ASKED, TERMINATED or KILLED.
    escalation: u8,
}

#[derive(Default)]
struct Counters {
    ok: u64,
    failed: u64,
    timeouts: u64,
    crashes: u64,
    restarts: u64,
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
    phase: Phase,
    slots: Vec<Slot>,
    next_worker: WorkerId,
    queue: VecDeque<u64>,
    queued: usize,
    calls: HashMap<u64, Pending>,
    timers: BinaryHeap<Reverse<(Instant, Timer)>>,
    commands: Option<HashSet<String>>,
    counters: Counters,
    startup_failures: u32,
    last_startup_error: Option<String>,
    next_spawn: Instant,
}

impl Dispatcher {
    pub(crate) fn new(
        cfg: Arc<PoolConfig>,
        spec: SpawnSpec,
        requests: Receiver<Request>,
        started: Sender<Result<()>>,
    ) -> Self {
        let (events_tx, events) = unbounded();
        Dispatcher {
            cfg,
            spec,
            requests,
            events_tx,
            events,
            phase: Phase::Starting(started),
            slots: Vec::new(),
            next_worker: 0,
            queue: VecDeque::new(),
            queued: 0,
            calls: HashMap::new(),
            timers: BinaryHeap::new(),
            commands: None,
            counters: Counters::default(),
            startup_failures: 0,
            last_startup_error: None,
            next_spawn: Instant::now(),
        }
    }

    /// The thread's body: runs until the pool has shut down and every worker is reaped.
    pub(crate) fn run(mut self) {
        for _ in 0..self.cfg.size {
            if let Err(e) = self.spawn_worker() {
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
        }
        self.finish();
    }

    fn finished(&self) -> bool {
        matches!(self.phase, Phase::ShuttingDown { .. }) && self.slots.is_empty()
    }

    fn finish(&mut self) {
        if let Phase::ShuttingDown { reply, report, .. } = &mut self.phase {
            let report = std::mem::take(report);
            log::info!("[{}] pool stopped", self.cfg.name);
            if let Some(reply) = reply.take() {
                let _ = reply.send(report);
            }
        }
    }

    // ---- requests -------------------------------------------------------------------------

    fn on_request(&mut self, req: Request) {
        match req {
            Request::Call(call, reply) => self.on_call(call, reply),
            Request::Stats(reply) => {
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
        }
    }

    fn on_call(&mut self, call: Call, reply: ReplyTx) {
        if !matches!(self.phase, Phase::Running) {
            return self.answer(reply, Err(Error::ShuttingDown));
        }
        if let Some(commands) = &self.commands {
            if !commands.contains(&call.command) {
                let mut known: Vec<String> = commands.iter().cloned().collect();
                known.sort();
                let command = call.command.clone();
                return self.answer(reply, Err(Error::UnknownCommand { command, known }));
            }
        }
        if self.is_degraded() {
            let last_error = self.last_startup_error.clone().unwrap_or_default();
            return self.answer(reply, Err(Error::Degraded { last_error }));
        }
        let id = call.id;
        if self.queued == 0 {
            if let Some(i) = self.pick_worker() {
                let dispatched = call.enqueued;
                self.calls.insert(id, Pending { call, reply: Some(reply), worker: None, dispatched });
                return self.start_call(id, i);
            }
        }
        if self.queued >= self.cfg.max_queue {
            let max_queue = self.cfg.max_queue;
            return self.answer(reply, Err(Error::QueueFull { max_queue }));
        }
        self.timers.push(Reverse((call.queue_deadline, Timer::Call(id))));
        let dispatched = call.enqueued;
        self.calls.insert(id, Pending { call, reply: Some(reply), worker: None, dispatched });
        self.queue.push_back(id);
        self.queued += 1;
        self.counters.queue_high_water = self.counters.queue_high_water.max(self.queued);
    }

    /// The least-loaded ready worker with room, preferring the one that has served least.
    fn pick_worker(&self) -> Option<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.state == WorkerState::Ready && s.in_flight.len() < s.capacity)
            .min_by_key(|(_, s)| (s.in_flight.len(), s.served))
            .map(|(i, _)| i)
    }

    fn start_call(&mut self, id: u64, slot: usize) {
        let now = Instant::now();
        let Some(p) = self.calls.get_mut(&id) else {
            return;
        };
        let s = &mut self.slots[slot];
        p.worker = Some(s.worker.id);
        p.dispatched = now;
        p.call.started.store(true, Ordering::Release);
        self.counters.queue_wait.record(now.saturating_duration_since(p.call.enqueued));
        s.in_flight.push(id);
        if let Some(reply) = p.reply.take() {
            s.worker.expect_reply(id, reply);
        }
        // If the pipe is gone the worker is dying; its Exited event fails the call.
        s.worker.send(std::mem::take(&mut p.call.frame));
        self.timers.push(Reverse((p.call.deadline, Timer::Call(id))));
    }

    fn dispatch_queued(&mut self) {
        while self.queued > 0 {
            let Some(&id) = self.queue.front() else { break };
            if !self.calls.get(&id).is_some_and(|p| p.worker.is_none()) {
                self.queue.pop_front(); // answered while queued (timed out)
                continue;
            }
            let Some(slot) = self.pick_worker() else {
                break;
            };
            self.queue.pop_front();
            self.queued -= 1;
            self.start_call(id, slot);
        }
    }

    /// Sends a call its one answer and counts it.
    fn answer(&mut self, reply: ReplyTx, result: Result<Value>) {
        self.count(&result);
        // The caller may have stopped waiting (its own deadline); that is fine.
        let _ = reply.send(result);
    }

    fn count(&mut self, result: &Result<Value>) {
        match &result {
            Ok(_) => self.counters.ok += 1,
            Err(Error::Timeout(_)) => {
                self.counters.failed += 1;
                self.counters.timeouts += 1;
            }
            Err(_) => self.counters.failed += 1,
        }
    }

    // ---- worker events --------------------------------------------------------------------

    fn slot_index(&self, id: WorkerId) -> Option<usize> {
        self.slots.iter().position(|s| s.worker.id == id)
    }

    fn on_event(&mut self, ev: WorkerEvent) {
        match ev {
            WorkerEvent::Frame(id, msg) => self.on_frame(id, msg),
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
            WorkerEvent::Completed { worker, call, ok, answered } => {
                self.on_completed(worker, call, ok, answered)
            }
        }
    }

    fn on_frame(&mut self, id: WorkerId, msg: Msg) {
        let Some(i) = self.slot_index(id) else { return };
        match msg {
            Msg::Ready { info } => {
                let s = &mut self.slots[i];
                match s.state {
                    WorkerState::Starting => {}
                    WorkerState::Stopping => return, // killed while starting (shutdown)
                    WorkerState::Ready => return self.protocol_violation(i, "sent `ready` twice".into()),
                }
                if info.protocol_version != PROTOCOL_VERSION {
                    let msg = format!(
                        "worker speaks protocol {}, the library speaks {PROTOCOL_VERSION}",
                        info.protocol_version
                    );
                    return self.startup_failed(i, Error::Startup { message: msg, error: None });
                }
                s.state = WorkerState::Ready;
                log::debug!(
                    "[{}] worker {id} (pid {}) ready in {:?} (python {})",
                    self.cfg.name,
                    info.pid,
                    s.spawned.elapsed(),
                    info.python_version
                );
                if self.startup_failures >= self.cfg.degraded_after {
                    log::info!("[{}] pool recovered: worker {id} started", self.cfg.name);
                }
                self.startup_failures = 0;
                self.commands = Some(info.commands.into_iter().collect());
                if let Phase::Starting(reply) = &self.phase {
                    if self.slots.iter().all(|s| s.state == WorkerState::Ready)
                        && self.slots.len() == self.cfg.size
                    {
                        let _ = reply.send(Ok(()));
                        self.phase = Phase::Running;
                        log::info!("[{}] pool started with {} workers", self.cfg.name, self.cfg.size);
                    }
                }
                self.dispatch_queued();
            }
            Msg::StartupError { error } => {
                let adapter = self.spec.adapter.as_deref().unwrap_or("(none)");
                let message = format!("adapter `{adapter}`: {}", error.message);
                self.startup_failed(i, Error::Startup { message, error: Some(error) });
            }
            Msg::Pong { .. } => {}
            other => self.protocol_violation(i, format!("unexpected message from worker: {other:?}")),
        }
    }

    fn protocol_violation(&mut self, i: usize, why: String) {
        let s = &mut self.slots[i];
        log::warn!("[{}] worker {} (pid {}): {why}", self.cfg.name, s.worker.id, s.worker.pid);
        s.broken = Some(Error::Protocol(why));
        self.kill(i);
    }

    /// A call finished on a worker (its reply already delivered by the worker's reader, unless
    /// the dispatcher had answered it first).
    fn on_completed(&mut self, worker: WorkerId, call: u64, ok: bool, answered: bool) {
        let Some(i) = self.slot_index(worker) else { return };
        let s = &mut self.slots[i];
        let Some(pos) = s.in_flight.iter().position(|&c| c == call) else {
            // A reply to a call this worker does not hold: the calls it times out on are
            // never given back to it (it is killed), so this is a violation, not a race.
            return self.protocol_violation(i, format!("reply to call {call} it does not hold"));
        };
        s.in_flight.swap_remove(pos);
        s.served += 1;
        if !ok {
            s.errors += 1;
        }
        if answered {
            if let Some(p) = self.calls.remove(&call) {
                self.counters.execution.record(p.dispatched.elapsed());
            }
            if ok {
                self.counters.ok += 1;
            } else {
                self.counters.failed += 1;
            }
        }
        match self.phase {
            Phase::ShuttingDown { .. } => {
                if self.slots[i].in_flight.is_empty() {
                    self.stop(i);
                }
            }
            _ => self.dispatch_queued(),
        }
    }

    fn on_exit(&mut self, id: WorkerId, exit: ExitKind) {
        let Some(i) = self.slot_index(id) else { return };
        let mut s = self.slots.remove(i);
        let stderr = s.worker.stderr_tail();
        let pid = s.worker.pid;
        match s.state {
            WorkerState::Starting => {
                let last = stderr.last().cloned().unwrap_or_default();
                let message = format!("worker exited before it was ready ({exit}): {last}");
                self.startup_error(Error::Startup { message, error: None });
            }
            WorkerState::Ready if s.broken.is_none() => {
                self.counters.crashes += 1;
                log::warn!(
                    "[{}] worker {id} (pid {pid}) died: {exit}; {} calls lost",
                    self.cfg.name,
                    s.in_flight.len()
                );
            }
            _ => log::debug!("[{}] worker {id} (pid {pid}) exited: {exit}", self.cfg.name),
        }
        let broken = s.broken.take();
        for call in std::mem::take(&mut s.in_flight) {
            self.calls.remove(&call);
            if let Some(reply) = s.worker.take_reply(call) {
                let err = match &broken {
                    Some(e) => e.duplicate(),
                    None => Error::WorkerDied { pid, exit, stderr: stderr.clone() },
                };
                self.answer(reply, Err(err));
            }
        }
        s.worker.join();
        self.dispatch_queued();
    }

    // ---- worker lifecycle -----------------------------------------------------------------

    fn spawn_worker(&mut self) -> Result<()> {
        let id = self.next_worker;
        self.next_worker += 1;
        let worker = Worker::spawn(id, &self.spec, self.events_tx.clone())?;
        let now = Instant::now();
        self.timers.push(Reverse((now + self.cfg.startup_timeout, Timer::Startup(id))));
        self.slots.push(Slot {
            worker,
            state: WorkerState::Starting,
            capacity: 1,
            in_flight: Vec::new(),
            served: 0,
            errors: 0,
            spawned: now,
            broken: None,
            escalation: RUNNING,
        });
        Ok(())
    }

    /// Keeps the pool at its size: spawns replacements once any backoff has passed.
    fn maintain(&mut self) {
        if !matches!(self.phase, Phase::Running) {
            return;
        }
        let live = self.slots.iter().filter(|s| s.state != WorkerState::Stopping).count();
        for _ in live..self.cfg.size {
            if Instant::now() < self.next_spawn {
                self.timers.push(Reverse((self.next_spawn, Timer::Wake)));
                return;
            }
            self.counters.restarts += 1;
            if let Err(e) = self.spawn_worker() {
                self.note_startup_failure(&e);
            }
        }
    }

    /// A worker failed before `ready`: during `build()` that fails the build; later it counts
    /// towards backoff and degradation.
    fn startup_failed(&mut self, i: usize, err: Error) {
        self.kill(i);
        self.startup_error(err);
    }

    fn startup_error(&mut self, err: Error) {
        match self.phase {
            Phase::Starting(_) => self.fail_start(err),
            Phase::Running => self.note_startup_failure(&err),
            Phase::ShuttingDown { .. } => {}
        }
    }

    fn note_startup_failure(&mut self, err: &Error) {
        self.startup_failures += 1;
        self.last_startup_error = Some(err.to_string());
        let (first, max) = self.cfg.restart_backoff;
        let shift = (self.startup_failures - 1).min(20);
        let delay = first.saturating_mul(1 << shift).min(max);
        self.next_spawn = Instant::now() + delay;
        self.timers.push(Reverse((self.next_spawn, Timer::Wake)));
        log::warn!(
            "[{}] worker failed to start ({} in a row, next try in {delay:?}): {err}",
            self.cfg.name,
            self.startup_failures
        );
        if self.is_degraded() {
            log::error!("[{}] pool degraded: no worker ready; failing calls fast", self.cfg.name);
            let last_error = self.last_startup_error.clone().unwrap_or_default();
            self.fail_queued(|| Error::Degraded { last_error: last_error.clone() });
        }
    }

    fn is_degraded(&self) -> bool {
        self.startup_failures >= self.cfg.degraded_after
            && !self.slots.iter().any(|s| s.state == WorkerState::Ready)
    }

    /// `build()` fails: report the error, stop every worker, and wind down.
    fn fail_start(&mut self, err: Error) {
        let Phase::Starting(reply) = std::mem::replace(
            &mut self.phase,
            Phase::ShuttingDown { grace_end: Instant::now(), reply: None, report: ShutdownReport::default() },
        ) else {
            return;
        };
        log::error!("[{}] pool failed to start: {err}", self.cfg.name);
        let _ = reply.send(Err(err));
        for i in 0..self.slots.len() {
            self.kill(i);
        }
    }

    /// Kills a worker now (its calls fail when its exit is reported).
    fn kill(&mut self, i: usize) {
        let s = &mut self.slots[i];
        s.state = WorkerState::Stopping;
        if s.escalation < KILLED {
            s.escalation = KILLED;
            s.worker.close_stdin();
            s.worker.signal(sys::SIGKILL);
        }
    }

    /// Asks an idle worker to exit: a `shutdown` frame, then EOF; escalates on a timer.
    fn stop(&mut self, i: usize) {
        let s = &mut self.slots[i];
        if s.escalation != RUNNING {
            return;
        }
        s.state = WorkerState::Stopping;
        if let Ok(frame) = protocol::encode_frame(&Msg::Shutdown, self.cfg.max_frame_size) {
            s.worker.send(frame);
        }
        s.worker.close_stdin();
        s.escalation = ASKED;
        self.timers.push(Reverse((Instant::now() + STOP_ESCALATION, Timer::Escalate(s.worker.id))));
    }

    // ---- timers ---------------------------------------------------------------------------

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
                Timer::Startup(wid) => {
                    if let Some(i) = self.slot_index(wid) {
                        if self.slots[i].state == WorkerState::Starting {
                            let message =
                                format!("worker {wid} sent no `ready` within {:?}", self.cfg.startup_timeout);
                            log::warn!("[{}] {message}", self.cfg.name);
                            let err = match self.phase {
                                Phase::Starting(_) => Error::Timeout(TimeoutKind::Startup),
                                _ => Error::Startup { message, error: None },
                            };
                            self.startup_failed(i, err);
                        }
                    }
                }
                Timer::Escalate(wid) => {
                    if let Some(i) = self.slot_index(wid) {
                        let s = &mut self.slots[i];
                        let (signal, next) = if s.escalation == ASKED {
                            (sys::SIGTERM, TERMINATED)
                        } else {
                            (sys::SIGKILL, KILLED)
                        };
                        if s.escalation < KILLED {
                            log::warn!(
                                "[{}] worker {wid} (pid {}) did not exit when asked; sending signal {signal}",
                                self.cfg.name,
                                s.worker.pid
                            );
                            s.worker.signal(signal);
                            s.escalation = next;
                            self.timers.push(Reverse((now + STOP_ESCALATION, Timer::Escalate(wid))));
                            if let Phase::ShuttingDown { report, .. } = &mut self.phase {
                                if next == TERMINATED {
                                    report.forced += 1;
                                }
                            }
                        }
                    }
                }
                Timer::Wake => self.grace_timer(now),
            }
        }
    }

    fn call_timer(&mut self, id: u64, now: Instant) {
        let Some(p) = self.calls.get_mut(&id) else { return };
        match p.worker {
            None if now >= p.call.queue_deadline => {
                let reply = p.reply.take();
                let p = self.calls.remove(&id).expect("present");
                self.queued -= 1;
                log::warn!("[{}] call {id} `{}` timed out in the queue", self.cfg.name, p.call.command);
                if let Some(reply) = reply {
                    self.answer(reply, Err(Error::Timeout(TimeoutKind::Queue)));
                }
            }
            Some(wid) if now >= p.call.deadline => {
                let Some(i) = self.slot_index(wid) else { return };
                // If the reader has just delivered the reply, the call was in time after all.
                let Some(reply) = self.slots[i].worker.take_reply(id) else { return };
                let p = self.calls.remove(&id).expect("present");
                log::warn!(
                    "[{}] call {id} `{}` timed out on worker {wid}; killing the worker",
                    self.cfg.name,
                    p.call.command
                );
                self.answer(reply, Err(Error::Timeout(TimeoutKind::Call)));
                // A busy Python process cannot be interrupted; its capacity comes back with
                // the replacement.
                self.kill(i);
            }
            _ => {}
        }
    }

    // ---- shutdown -------------------------------------------------------------------------

    fn begin_shutdown(&mut self, reply: Option<Sender<ShutdownReport>>) {
        let grace_end = Instant::now() + self.cfg.shutdown_timeout;
        log::info!("[{}] pool shutting down", self.cfg.name);
        if let Phase::Starting(started) = &self.phase {
            let _ = started.send(Err(Error::ShuttingDown));
        }
        self.phase = Phase::ShuttingDown { grace_end, reply, report: ShutdownReport::default() };
        self.fail_queued(|| Error::ShuttingDown);
        self.timers.push(Reverse((grace_end, Timer::Wake)));
        for i in 0..self.slots.len() {
            match self.slots[i].state {
                WorkerState::Starting => self.kill(i),
                _ if self.slots[i].in_flight.is_empty() => self.stop(i),
                _ => {}
            }
        }
    }

    /// At the end of the grace period, cut the calls still running and stop their workers.
    fn grace_timer(&mut self, now: Instant) {
        let Phase::ShuttingDown { grace_end, .. } = self.phase else {
            return;
        };
        if now < grace_end {
            return;
        }
        let mut cut = 0;
        for i in 0..self.slots.len() {
            for call in std::mem::take(&mut self.slots[i].in_flight) {
                self.calls.remove(&call);
                if let Some(reply) = self.slots[i].worker.take_reply(call) {
                    cut += 1;
                    self.answer(reply, Err(Error::Timeout(TimeoutKind::Shutdown)));
                }
            }
            self.stop(i);
        }
        if let Phase::ShuttingDown { report, .. } = &mut self.phase {
            report.calls_cut += cut;
        }
    }

    fn fail_queued(&mut self, err: impl Fn() -> Error) {
        while let Some(id) = self.queue.pop_front() {
            if let Some(reply) = self.calls.remove(&id).and_then(|p| p.reply) {
                self.answer(reply, Err(err()));
            }
        }
        self.queued = 0;
    }

    // ---- stats ----------------------------------------------------------------------------

    fn snapshot(&self) -> PoolStats {
        let c = &self.counters;
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
            startup_failures: self.startup_failures,
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
                    age_ms: s.spawned.elapsed().as_millis() as u64,
                    rss_bytes: stats::rss_bytes(s.worker.pid),
                })
                .collect(),
        }
    }
}
