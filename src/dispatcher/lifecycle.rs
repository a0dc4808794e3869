//! Workers' lives: start, ready, exit, restarts with backoff, and degradation.

use std::cmp::Reverse;
use std::time::Instant;

use super::{Dispatcher, Origin, Phase, Slot, Timer};
use crate::error::{Error, ExitKind, Result, TimeoutKind};
use crate::events::Event;
use crate::protocol::{WorkerInfo, PROTOCOL_VERSION};
use crate::stats::WorkerState;
use crate::worker::{Worker, WorkerId};

/// A worker that dies within this time of getting ready counts towards restart backoff.
const QUICK_CRASH: std::time::Duration = std::time::Duration::from_secs(1);

impl Dispatcher {
    pub(super) fn spawn_worker(&mut self, origin: Origin) -> Result<WorkerId> {
        let id = self.next_worker;
        self.next_worker += 1;
        let worker = Worker::spawn(id, &self.spec, self.events_tx.clone())?;
        let now = Instant::now();
        self.timers.push(Reverse((now + self.cfg.startup_timeout, Timer::Startup(id))));
        // Each worker draws its own jitter, so workers started together part ways.
        let seed = u64::from(worker.pid) ^ id.rotate_left(32) ^ now.elapsed().as_nanos() as u64;
        let limits = self.cfg.policy.limits(seed ^ self.spawn_salt());
        self.slots.push(Slot {
            worker,
            state: WorkerState::Starting,
            capacity: self.cfg.capacity(),
            in_flight: Vec::new(),
            served: 0,
            errors: 0,
            spawned: now,
            origin,
            limits,
            recycle: None,
            retry_recycle: None,
            ping: None,
            broken: None,
            escalation: super::shutdown::RUNNING,
            collateral: false,
            delivered_seen: 0,
            ready_at: None,
        });
        Ok(id)
    }

    /// A per-process random-ish value, so pools in different processes draw different jitter.
    fn spawn_salt(&self) -> u64 {
        let t =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        (t as u64) ^ u64::from(std::process::id()).rotate_left(17)
    }

    /// Keeps the pool at its size: spawns replacements once any backoff has passed. A worker
    /// being drained or stopped no longer counts; a replacement being started for a recycle
    /// does, so recycling never starts an extra worker here.
    pub(super) fn maintain(&mut self) {
        if !matches!(self.phase, Phase::Running) {
            return;
        }
        let live = self
            .slots
            .iter()
            .filter(|s| matches!(s.state, WorkerState::Starting | WorkerState::Ready))
            .filter(|s| s.recycle.is_none())
            .count();
        // A worker whose replacement failed or was lost is tried again once its backoff is
        // over; a spent one (max_requests) that could not start its recycle earlier (another
        // recycle held the turn) tries again now.
        let now = Instant::now();
        for i in 0..self.slots.len() {
            let s = &self.slots[i];
            if s.state != WorkerState::Ready || s.recycle.is_some() {
                continue;
            }
            let retry_due = s.retry_recycle.is_some_and(|t| now >= t);
            if retry_due || (s.spent() && s.retry_recycle.is_none()) {
                self.slots[i].retry_recycle = None;
                self.check_due(i, now);
            }
        }
        for _ in live..self.cfg.size {
            if Instant::now() < self.next_spawn {
                // One wake-up per backoff, not one per loop pass.
                if self.spawn_wake != Some(self.next_spawn) {
                    self.spawn_wake = Some(self.next_spawn);
                    self.timers.push(Reverse((self.next_spawn, Timer::Wake)));
                }
                return;
            }
            self.counters.restarts += 1;
            if let Err(e) = self.spawn_worker(Origin::Restart) {
                self.note_startup_failure(&e);
            }
        }
    }

    pub(super) fn on_ready(&mut self, i: usize, info: WorkerInfo) {
        let s = &mut self.slots[i];
        match s.state {
            WorkerState::Starting => {}
            WorkerState::Ready => return self.protocol_violation(i, "sent `ready` twice".into()),
            _ => return, // killed while starting (shutdown)
        }
        if info.protocol_version != PROTOCOL_VERSION {
            let message = format!(
                "worker speaks protocol {}, the library speaks {PROTOCOL_VERSION}",
                info.protocol_version
            );
            return self.startup_failed(i, Error::Startup { message, error: None });
        }
        s.state = WorkerState::Ready;
        s.ready_at = Some(Instant::now());
        let (id, pid, startup, origin) = (s.worker.id, s.worker.pid, s.spawned.elapsed(), s.origin);
        log::debug!(
            "[{}] worker {id} (pid {pid}) ready in {startup:?} (python {})",
            self.cfg.name,
            info.python_version
        );
        self.startup_failures = 0;
        if self.cfg.capacity() > 1 && info.gil_enabled && !info.cpu_bound.is_empty() && !self.warned_gil {
            self.warned_gil = true;
            log::warn!(
                "[{}] thread profile on a Python whose GIL is on: CPU-bound commands ({}) will not run in \
                 parallel; use the process profile for them, or a free-threaded Python (3.13t or later)",
                self.cfg.name,
                info.cpu_bound.join(", ")
            );
        }
        self.commands = Some(info.commands.into_iter().collect());
        if self.emitter.enabled() {
            let pool = self.cfg.name.clone();
            self.emitter.emit(Event::WorkerStarted { pool: pool.clone(), worker: id, pid, startup });
            if origin == Origin::Restart {
                self.emitter.emit(Event::WorkerRestarted { pool, worker: id, pid });
            }
        }
        if self.degraded_announced {
            self.degraded_announced = false;
            log::info!("[{}] pool recovered: worker {id} started", self.cfg.name);
            if self.emitter.enabled() {
                self.emitter.emit(Event::PoolRecovered { pool: self.cfg.name.clone() });
            }
        }
        if let Some(interval) = self.cfg.health_interval {
            self.timers.push(Reverse((Instant::now() + interval, Timer::Health(id))));
        }
        if let Phase::Starting(reply) = &self.phase {
            let all_ready = self.slots.iter().all(|s| s.state == WorkerState::Ready);
            if all_ready && self.slots.len() == self.cfg.size {
                let _ = reply.send(Ok(()));
                self.phase = Phase::Running;
                log::info!("[{}] pool started with {} workers", self.cfg.name, self.cfg.size);
            }
        }
        if let Origin::Replaces(old) = origin {
            if let Some(o) = self.slot_index(old) {
                self.try_finish_recycle(o);
            }
        }
        self.dispatch_queued();
    }

    pub(super) fn on_exit(&mut self, id: WorkerId, exit: ExitKind) {
        let Some(i) = self.slot_index(id) else { return };
        let mut s = self.slots.remove(i);
        let stderr = s.worker.stderr_tail();
        let pid = s.worker.pid;
        let lost = s.in_flight.len();
        if matches!(self.phase, Phase::Starting(_)) && s.state != WorkerState::Starting {
            // A worker lost while `build()` waits for the others: the build fails with why.
            let err = match &s.broken {
                Some(e) => e.duplicate(),
                None => Error::WorkerDied { pid, exit, stderr: stderr.clone(), collateral: false },
            };
            self.fail_start(err);
        }
        match s.state {
            WorkerState::Starting => {
                let last = stderr.last().cloned().unwrap_or_default();
                let message = format!("worker exited before it was ready ({exit}): {last}");
                self.startup_error(s.origin, Error::Startup { message, error: None });
            }
            _ if s.escalation == super::shutdown::RUNNING => {
                // Nobody asked it to stop.
                self.counters.crashes += 1;
                log::warn!("[{}] worker {id} (pid {pid}) died: {exit}; {lost} calls lost", self.cfg.name);
                self.crash_backoff(s.ready_at);
                if self.emitter.enabled() {
                    let pool = self.cfg.name.clone();
                    self.emitter.emit(Event::WorkerDied { pool, worker: id, pid, exit, calls_lost: lost });
                }
            }
            _ => log::debug!("[{}] worker {id} (pid {pid}) exited: {exit}", self.cfg.name),
        }
        // A worker being recycled that dies anyway: its replacement is on the way.
        if let Some(r) = s.recycle.take() {
            for w in r.waiters {
                let _ = w.send(Ok(()));
            }
        }
        let broken = s.broken.take();
        let collateral = s.collateral;
        let was_starting = s.state == WorkerState::Starting;
        self.slots.insert(i, s);
        if !was_starting {
            // A ready replacement that died before its old worker retired. (One that never got
            // ready was handled above, as a start-up failure, with backoff.)
            self.replacement_lost(i);
        }
        for call in std::mem::take(&mut self.slots[i].in_flight) {
            let err = match &broken {
                Some(e) => e.duplicate(),
                None => Error::WorkerDied { pid, exit, stderr: stderr.clone(), collateral },
            };
            self.answer_in_flight(i, call, err);
        }
        // Its threads end on their own now; the dispatcher never waits for them here.
        let mut worker = self.slots.remove(i).worker;
        worker.release();
        self.exited.push(worker);
        self.dispatch_queued();
    }

    pub(super) fn startup_timer(&mut self, wid: WorkerId) {
        let Some(i) = self.slot_index(wid) else { return };
        if self.slots[i].state != WorkerState::Starting {
            return;
        }
        let message = format!("worker {wid} sent no `ready` within {:?}", self.cfg.startup_timeout);
        log::warn!("[{}] {message}", self.cfg.name);
        let err = match self.phase {
            Phase::Starting(_) => Error::Timeout(TimeoutKind::Startup),
            _ => Error::Startup { message, error: None },
        };
        self.startup_failed(i, err);
    }

    /// A worker failed before `ready`: kill it and count the failure.
    pub(super) fn startup_failed(&mut self, i: usize, err: Error) {
        // Killed, its exit is not counted again (it is no longer `Starting` then).
        self.kill(i);
        self.startup_error(self.slots[i].origin, err);
    }

    /// During `build()` a start-up failure fails the build; later it counts towards backoff
    /// and degradation, and a failed replacement leaves the old worker serving.
    fn startup_error(&mut self, origin: Origin, err: Error) {
        match self.phase {
            Phase::Starting(_) => self.fail_start(err),
            Phase::Running => {
                if let Origin::Replaces(old) = origin {
                    self.recycle_failed(old, &err);
                }
                self.note_startup_failure(&err);
            }
            Phase::ShuttingDown { .. } => {}
        }
    }

    pub(super) fn note_startup_failure(&mut self, err: &Error) {
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
        if self.emitter.enabled() {
            self.emitter.emit(Event::WorkerStartFailed {
                pool: self.cfg.name.clone(),
                error: err.to_string(),
                attempt: self.startup_failures,
                retry_in: delay,
            });
        }
        if self.is_degraded() {
            let last_error = self.last_startup_error.clone().unwrap_or_default();
            if !self.degraded_announced {
                self.degraded_announced = true;
                log::error!("[{}] pool degraded: no worker ready; failing calls fast", self.cfg.name);
                if self.emitter.enabled() {
                    let pool = self.cfg.name.clone();
                    self.emitter.emit(Event::PoolDegraded { pool, last_error: last_error.clone() });
                }
            }
            self.fail_queued(|| Error::Degraded { last_error: last_error.clone() });
        }
    }

    /// A worker that dies soon after it got ready, again and again (an adapter whose
    /// background thread crashes it, say), is restarted with the same capped backoff as one
    /// that fails to start, instead of at once every time.
    fn crash_backoff(&mut self, ready_at: Option<Instant>) {
        let quick = ready_at.is_some_and(|t| t.elapsed() < QUICK_CRASH);
        if !quick {
            self.quick_crashes = 0;
            return;
        }
        self.quick_crashes += 1;
        let (first, max) = self.cfg.restart_backoff;
        let delay = first.saturating_mul(1 << (self.quick_crashes - 1).min(20)).min(max);
        self.next_spawn = self.next_spawn.max(Instant::now() + delay);
        log::warn!(
            "[{}] {} workers in a row died within {QUICK_CRASH:?} of starting; next start in {delay:?}",
            self.cfg.name,
            self.quick_crashes
        );
    }

    pub(super) fn is_degraded(&self) -> bool {
        self.startup_failures >= self.cfg.degraded_after
            && !self.slots.iter().any(|s| s.state == WorkerState::Ready)
    }

    /// `build()` fails: report the error, stop every worker, and wind down.
    pub(super) fn fail_start(&mut self, err: Error) {
        let Phase::Starting(reply) = std::mem::replace(
            &mut self.phase,
            Phase::ShuttingDown {
                grace_end: Instant::now(),
                reply: None,
                report: super::ShutdownReport::default(),
            },
        ) else {
            return;
        };
        log::error!("[{}] pool failed to start: {err}", self.cfg.name);
        let _ = reply.send(Err(err));
        for i in 0..self.slots.len() {
            self.kill(i);
        }
    }
}
