//! Workers' lives: start, ready, exit, restarts with backoff, and degradation.

use std::time::Instant;

use super::board::{Effects, Gate};
use super::{Dispatcher, Life, Origin, Phase, Slot, Timer, QUICK_CRASH};
use crate::error::{Error, ExitKind, Result, TimeoutKind};
use crate::events::Event;
use crate::protocol::{Msg, WorkerInfo, PROTOCOL_VERSION};
use crate::worker::{KillReason, WorkerId};

impl Dispatcher {
    pub(super) fn spawn_worker(&mut self, origin: Origin, now: Instant) -> Result<WorkerId> {
        let id = self.next_worker;
        self.next_worker += 1;
        let worker = self.launch.launch(id, self.events_tx.clone(), &self.shared)?;
        self.schedule(now + self.cfg.startup_timeout, Timer::Startup(id));
        // Each worker draws its own jitter, so workers started together part ways.
        let seed = u64::from(worker.conn.pid) ^ id.rotate_left(32) ^ spawn_salt();
        let limits = self.cfg.policy.limits(seed);
        let slot = Slot {
            worker,
            life: Life::Starting,
            origin,
            spawned: now,
            ready_at: None,
            limits,
            recycle: None,
            pending: None,
        };
        self.slots.insert(id, slot);
        Ok(id)
    }

    /// Keeps the pool at its size: spawns replacements once any backoff has passed, and starts
    /// recycles that are due but were waiting for their turn. A worker being drained or stopped
    /// no longer counts; a replacement being started for a recycle does, so recycling never
    /// starts an extra worker here.
    pub(super) fn maintain(&mut self, now: Instant) {
        if !matches!(self.phase, Phase::Running) {
            return;
        }
        let due: Vec<_> = self
            .slots
            .iter()
            .filter(|(_, s)| s.life == Life::Ready && s.recycle.is_none())
            .filter_map(|(&id, s)| s.pending.filter(|&(_, at)| now >= at).map(|(reason, _)| (id, reason)))
            .collect();
        for (id, reason) in due {
            self.recycle(id, reason, None, None, now);
        }
        let live = self
            .slots
            .values()
            .filter(|s| matches!(s.life, Life::Starting | Life::Ready) && s.recycle.is_none())
            .count();
        for _ in live..self.cfg.size {
            if now < self.next_spawn {
                // One wake-up per backoff, not one per loop pass.
                if self.spawn_wake != Some(self.next_spawn) {
                    self.spawn_wake = Some(self.next_spawn);
                    self.schedule(self.next_spawn, Timer::Wake);
                }
                return;
            }
            self.counts.restarts += 1;
            if let Err(e) = self.spawn_worker(Origin::Restart, now) {
                self.note_startup_failure(&e, now);
            }
        }
    }

    pub(super) fn on_frame(&mut self, id: WorkerId, msg: Msg, now: Instant) {
        if !self.slots.contains_key(&id) {
            return;
        }
        match msg {
            Msg::Ready { info } => self.on_ready(id, info, now),
            Msg::StartupError { error } => {
                let adapter = self.launch_adapter();
                let python = self.launch.interpreter();
                let message = format!("adapter `{adapter}` (python {python}): {}", error.message);
                self.startup_failed(id, Error::Startup { message, error: Some(error) }, now);
            }
            other => {
                let err = Error::Protocol(format!("unexpected message from worker: {other:?}"));
                self.slots[&id].worker.conn.mark_broken(err);
                self.kill(id, KillReason::Protocol, now);
            }
        }
    }

    fn launch_adapter(&self) -> &str {
        self.cfg.adapter.as_deref().unwrap_or("(none)")
    }

    fn on_ready(&mut self, id: WorkerId, info: WorkerInfo, now: Instant) {
        let s = self.slots.get_mut(&id).expect("checked");
        match s.life {
            Life::Starting => {}
            Life::Ready => {
                s.worker.conn.mark_broken(Error::Protocol("sent `ready` twice".into()));
                return self.kill(id, KillReason::Protocol, now);
            }
            _ => return, // killed while starting (shutdown)
        }
        if info.protocol_version != PROTOCOL_VERSION {
            let message = format!(
                "worker speaks protocol {}, the library speaks {PROTOCOL_VERSION}",
                info.protocol_version
            );
            return self.startup_failed(id, Error::Startup { message, error: None }, now);
        }
        s.worker.conn.set_worker_pid(info.pid, info.stack_dumps, info.cancel_signal);
        s.life = Life::Ready;
        s.ready_at = Some(now);
        let (pid, startup, origin, limits, conn) =
            (s.pid(), now.saturating_duration_since(s.spawned), s.origin, s.limits, s.worker.conn.clone());
        log::debug!(
            "[{}] worker {id} (pid {pid}) ready in {startup:?} (python {})",
            self.cfg.name,
            info.python_version
        );
        self.starts.reset();
        if self.cfg.capacity() > 1 && info.gil_enabled && !info.cpu_bound.is_empty() && !self.warned_gil {
            self.warned_gil = true;
            log::warn!(
                "[{}] thread profile on a Python whose GIL is on: CPU-bound commands ({}) will not run in \
                 parallel; use the process profile for them, or a free-threaded Python (3.13t or later)",
                self.cfg.name,
                info.cpu_bound.join(", ")
            );
        }
        if let Some(ttl) = limits.ttl {
            self.schedule(now + ttl, Timer::Ttl(id));
        }
        if self.shared.emitter.enabled() {
            let pool = self.cfg.name.clone();
            self.shared.emitter.emit(Event::WorkerStarted { pool: pool.clone(), worker: id, pid, startup });
            if origin == Origin::Restart {
                self.shared.emitter.emit(Event::WorkerRestarted { pool, worker: id, pid });
            }
        }
        if self.degraded_announced {
            self.degraded_announced = false;
            log::info!("[{}] pool recovered: worker {id} started", self.cfg.name);
            if self.shared.emitter.enabled() {
                self.shared.emitter.emit(Event::PoolRecovered { pool: self.cfg.name.clone() });
            }
        }
        // Not yet on the board while `build()` waits: the pool opens with all its workers.
        if !matches!(self.phase, Phase::Starting(_)) {
            let mut fx = Effects::default();
            {
                let mut board = self.shared.board.lock();
                if board.gate != Gate::Closed {
                    board.gate = Gate::Open;
                }
                board.commands = Some(info.commands.into_iter().collect());
                board.add(id, conn, self.cfg.capacity(), limits.max_requests, &mut fx);
            }
            self.shared.apply(fx);
        } else {
            self.shared.board.lock().commands = Some(info.commands.into_iter().collect());
        }
        if let Phase::Starting(reply) = &self.phase {
            let all_ready = self.slots.values().all(|s| s.life == Life::Ready);
            if all_ready && self.slots.len() == self.cfg.size {
                let mut fx = Effects::default();
                {
                    let mut board = self.shared.board.lock();
                    for (&id, s) in &self.slots {
                        let max = s.limits.max_requests;
                        board.add(id, s.worker.conn.clone(), self.cfg.capacity(), max, &mut fx);
                    }
                }
                self.shared.apply(fx);
                // Only now: a call made the moment `build()` returns finds every worker.
                let _ = reply.send(Ok(()));
                self.phase = Phase::Running;
                log::info!("[{}] pool started with {} workers", self.cfg.name, self.cfg.size);
            }
        }
        if let Origin::Replaces(old) = origin {
            self.try_finish_recycle(old, now);
        }
    }

    pub(super) fn on_exit(&mut self, id: WorkerId, exit: ExitKind, now: Instant) {
        let Some(mut s) = self.slots.remove(&id) else { return };
        let seat = self.shared.board.lock().remove(id, crate::session::Loss::Died { exit });
        // Calls it took down: those whose callers already saw it die, and those still running.
        let running = seat.as_ref().map_or(0, |x| x.busy - x.abandoned + x.lost);
        let in_call = running > 0;
        let pid = s.pid();
        let killed = s.worker.conn.killed();
        if matches!(self.phase, Phase::Starting(_)) && s.life != Life::Starting {
            // A worker lost while `build()` waits for the others: the build fails with why.
            let err = s.worker.conn.death_error(now);
            self.fail_start(err, now);
        }
        match s.life {
            Life::Starting if killed.is_none() => {
                let last = s.worker.conn.stderr_tail().last().cloned().unwrap_or_default();
                let python = self.launch.interpreter();
                let message = format!("worker (python {python}) exited before it was ready ({exit}): {last}");
                self.startup_error(s.origin, Error::Startup { message, error: None }, now);
            }
            Life::Ready | Life::Draining if killed.is_none() => {
                // Nobody asked it to stop.
                self.counts.crashes += 1;
                log::warn!("[{}] worker {id} (pid {pid}) died: {exit}; {running} calls lost", self.cfg.name);
                if in_call {
                    // A crash during a call is that call's doing: restart at once.
                    self.idle_crashes.reset();
                } else {
                    self.idle_crash(s.ready_at, now);
                }
                if self.shared.emitter.enabled() {
                    let pool = self.cfg.name.clone();
                    self.shared.emitter.emit(Event::WorkerDied {
                        pool,
                        worker: id,
                        pid,
                        exit,
                        calls_lost: running,
                    });
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
        if s.life != Life::Starting {
            // A ready replacement that died before its old worker retired. (One that never got
            // ready was handled above, as a start-up failure, with backoff.)
            self.replacement_lost(id, s.origin, now);
        }
        // Its monitor thread ends on its own now; the dispatcher never waits for it here.
        self.exited.push(s.worker);
        self.check_degraded(now);
    }

    pub(super) fn startup_timer(&mut self, id: WorkerId, now: Instant) {
        if self.slots.get(&id).map(|s| s.life) != Some(Life::Starting) {
            return;
        }
        let message = format!("worker {id} sent no `ready` within {:?}", self.cfg.startup_timeout);
        log::warn!("[{}] {message}", self.cfg.name);
        let err = match self.phase {
            Phase::Starting(_) => Error::timeout(TimeoutKind::Startup),
            _ => Error::Startup { message, error: None },
        };
        self.startup_failed(id, err, now);
    }

    /// A worker failed before `ready`: kill it and count the failure.
    pub(super) fn startup_failed(&mut self, id: WorkerId, err: Error, now: Instant) {
        let Some(origin) = self.slots.get(&id).map(|s| s.origin) else { return };
        // Killed, its exit is not counted again.
        self.kill(id, KillReason::Startup, now);
        self.startup_error(origin, err, now);
    }

    /// During `build()` a start-up failure fails the build; later it counts towards backoff
    /// and degradation, and a failed replacement leaves the old worker serving.
    fn startup_error(&mut self, origin: Origin, err: Error, now: Instant) {
        match self.phase {
            Phase::Starting(_) => self.fail_start(err, now),
            Phase::Running => {
                if let Origin::Replaces(old) = origin {
                    self.recycle_failed(old, &err, now);
                }
                self.note_startup_failure(&err, now);
            }
            Phase::ShuttingDown { .. } => {}
        }
    }

    pub(super) fn note_startup_failure(&mut self, err: &Error, now: Instant) {
        let delay = self.starts.fail();
        self.last_startup_error = Some(err.to_string());
        self.next_spawn = self.next_spawn.max(now + delay);
        self.schedule(self.next_spawn, Timer::Wake);
        log::warn!(
            "[{}] worker failed to start ({} in a row, next try in {delay:?}): {err}",
            self.cfg.name,
            self.starts.failures()
        );
        if self.shared.emitter.enabled() {
            self.shared.emitter.emit(Event::WorkerStartFailed {
                pool: self.cfg.name.clone(),
                error: err.to_string(),
                attempt: self.starts.failures(),
                retry_in: delay,
            });
        }
        self.check_degraded(now);
    }

    /// Opens the degraded gate (calls fail fast) once starts keep failing and no worker is
    /// ready.
    fn check_degraded(&mut self, _now: Instant) {
        if !matches!(self.phase, Phase::Running) || !self.is_degraded() {
            return;
        }
        let last_error = self.last_startup_error.clone().unwrap_or_default();
        {
            let mut board = self.shared.board.lock();
            board.gate = Gate::Degraded(last_error.clone());
            board.drop_waiters();
        }
        if !self.degraded_announced {
            self.degraded_announced = true;
            log::error!("[{}] pool degraded: no worker ready; failing calls fast", self.cfg.name);
            if self.shared.emitter.enabled() {
                let pool = self.cfg.name.clone();
                self.shared.emitter.emit(Event::PoolDegraded { pool, last_error });
            }
        }
    }

    /// A worker that dies while idle soon after it got ready, again and again (an adapter
    /// whose background thread crashes it, say), is restarted with the same capped backoff as
    /// one that fails to start, instead of at once every time.
    fn idle_crash(&mut self, ready_at: Option<Instant>, now: Instant) {
        let quick = ready_at.is_some_and(|t| now.saturating_duration_since(t) < QUICK_CRASH);
        if !quick {
            self.idle_crashes.reset();
            return;
        }
        let delay = self.idle_crashes.fail();
        self.next_spawn = self.next_spawn.max(now + delay);
        log::warn!(
            "[{}] {} workers in a row died idle within {QUICK_CRASH:?} of starting; next start in {delay:?}",
            self.cfg.name,
            self.idle_crashes.failures()
        );
    }

    pub(super) fn is_degraded(&self) -> bool {
        self.starts.failures() >= self.cfg.degraded_after
            && !self.slots.values().any(|s| s.life == Life::Ready)
    }

    /// `build()` fails: report the error, stop every worker, and wind down.
    pub(super) fn fail_start(&mut self, err: Error, now: Instant) {
        let Phase::Starting(reply) = std::mem::replace(
            &mut self.phase,
            Phase::ShuttingDown {
                grace_end: now,
                replies: Vec::new(),
                report: super::ShutdownReport::default(),
            },
        ) else {
            return;
        };
        self.shared.board.lock().gate = Gate::Closed;
        log::error!("[{}] pool failed to start: {err}", self.cfg.name);
        let _ = reply.send(Err(err));
        let ids: Vec<WorkerId> = self.slots.keys().copied().collect();
        for id in ids {
            self.kill(id, KillReason::Startup, now);
        }
    }
}

/// A per-process random-ish value, so pools in different processes draw different jitter.
fn spawn_salt() -> u64 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    (t as u64) ^ u64::from(std::process::id()).rotate_left(17)
}
