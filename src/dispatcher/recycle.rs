//! Recycling, make before break (by age, calls served, memory, or by hand), and idle health
//! checks.

use std::cmp::Reverse;
use std::time::Instant;

use crossbeam_channel::Sender;

use super::{Dispatcher, Origin, Phase, Recycle, Timer};
use crate::error::{Error, Result};
use crate::events::Event;
use crate::protocol::{self, Msg};
use crate::reaper::{self, RecycleReason};
use crate::stats::WorkerState;
use crate::worker::WorkerId;

impl Dispatcher {
    // ---- recycling ------------------------------------------------------------------------

    /// Checks a worker against its limits (all but memory, which the reaper reads).
    pub(super) fn check_due(&mut self, i: usize, now: Instant) {
        if let Some(reason) = reaper::should_recycle(&self.slots[i].facts(), now) {
            self.recycle(i, reason, None, false, None);
        }
    }

    /// Starts recycling worker `i`: make before break. `kill` (health check, hard memory
    /// ceiling) kills it at once instead, and the pool restarts a worker in its place.
    pub(super) fn recycle(
        &mut self,
        i: usize,
        reason: RecycleReason,
        rss: Option<u64>,
        kill: bool,
        waiter: Option<Sender<Result<()>>>,
    ) {
        if !matches!(self.phase, Phase::Running) {
            if let Some(w) = waiter {
                let _ = w.send(Err(Error::ShuttingDown));
            }
            return;
        }
        if kill {
            let s = &self.slots[i];
            if s.escalation == super::shutdown::RUNNING && s.state != WorkerState::Starting {
                self.retired(i, reason, rss);
                self.kill(i);
            }
            return;
        }
        let s = &mut self.slots[i];
        if s.state != WorkerState::Ready {
            return;
        }
        if let Some(r) = &mut s.recycle {
            r.waiters.extend(waiter);
            return;
        }
        if waiter.is_none() {
            // Automatic recycles wait for their turn and for any backoff after a failed one.
            let now = Instant::now();
            if s.retry_recycle.is_some_and(|t| now < t) {
                return;
            }
            let busy = self.slots.iter().filter(|s| s.recycle.is_some()).count();
            if busy >= self.cfg.max_concurrent_recycles {
                return;
            }
        }
        let old = self.slots[i].worker.id;
        match self.spawn_worker(Origin::Replaces(old)) {
            Ok(replacement) => {
                log::debug!(
                    "[{}] recycling worker {old} ({reason}): replacement {replacement} starting",
                    self.cfg.name
                );
                let waiters = waiter.into_iter().collect();
                self.slots[i].recycle = Some(Recycle { reason, replacement, rss, waiters });
            }
            Err(e) => {
                if let Some(w) = waiter {
                    let _ = w.send(Err(e.duplicate()));
                }
                self.recycle_failed(old, &e);
                self.note_startup_failure(&e);
            }
        }
    }

    /// Retires worker `i` if its replacement is ready: it takes no new calls, finishes the ones
    /// it has, and is then stopped.
    pub(super) fn try_finish_recycle(&mut self, i: usize) {
        let s = &self.slots[i];
        let Some(r) = &s.recycle else { return };
        if s.state != WorkerState::Ready {
            return;
        }
        let replacement_ready =
            self.slot_index(r.replacement).is_some_and(|j| self.slots[j].state == WorkerState::Ready);
        if !replacement_ready {
            return;
        }
        let r = self.slots[i].recycle.take().expect("checked");
        self.retired(i, r.reason, r.rss);
        for w in r.waiters {
            let _ = w.send(Ok(()));
        }
        self.slots[i].state = WorkerState::Draining;
        self.stop_if_drained(i);
        // Let the next worker that is due take its turn.
        let now = Instant::now();
        for j in 0..self.slots.len() {
            if self.slots[j].state == WorkerState::Ready && self.slots[j].recycle.is_none() {
                self.check_due(j, now);
            }
        }
    }

    /// Stops a draining worker once nobody waits for its calls any more: when it has none, or
    /// (thread profile) only calls that were already answered with a time-out, whose threads
    /// may never return.
    pub(super) fn stop_if_drained(&mut self, i: usize) {
        let s = &self.slots[i];
        if s.state != WorkerState::Draining {
            return;
        }
        if s.in_flight.is_empty() {
            self.stop(i);
        } else if s.in_flight.iter().all(|c| !self.calls.contains_key(c)) {
            log::warn!(
                "[{}] worker {} (pid {}) is draining with only timed-out calls left; killing it",
                self.cfg.name,
                s.worker.id,
                s.worker.pid
            );
            self.kill(i);
        }
    }

    /// A replacement worker was lost (it died or was killed) before its old worker retired: the
    /// old worker keeps serving, and is checked again at once (it may be spent, and would
    /// otherwise never be given a call or be replaced).
    pub(super) fn replacement_lost(&mut self, replacement: usize) {
        let Origin::Replaces(old) = self.slots[replacement].origin else { return };
        let id = self.slots[replacement].worker.id;
        let Some(o) = self.slot_index(old) else { return };
        if !self.slots[o].recycle.as_ref().is_some_and(|r| r.replacement == id) {
            return;
        }
        let r = self.slots[o].recycle.take().expect("checked");
        for w in r.waiters {
            let message = format!("replacement worker {id} was lost before it took over");
            let _ = w.send(Err(Error::Startup { message, error: None }));
        }
        self.slots[o].retry_recycle = Some(Instant::now());
    }

    /// Counts, logs and announces a recycled worker.
    fn retired(&mut self, i: usize, reason: RecycleReason, rss: Option<u64>) {
        let s = &self.slots[i];
        // The reaper read the whole tree for memory recycles; otherwise the worker's own.
        let rss = rss.or_else(|| crate::stats::rss_bytes(s.worker.pid));
        let age = s.spawned.elapsed();
        log::info!(
            "[{}] worker {} (pid {}) recycled: {reason} (age {age:?}, {} calls)",
            self.cfg.name,
            s.worker.id,
            s.worker.pid,
            s.served
        );
        self.counters.recycles.add(reason);
        if self.emitter.enabled() {
            self.emitter.emit(Event::WorkerRecycled {
                pool: self.cfg.name.clone(),
                worker: s.worker.id,
                pid: s.worker.pid,
                reason,
                age,
                calls_served: s.served,
                rss_bytes: rss,
            });
        }
    }

    /// The replacement for `old` could not start: `old` keeps serving; try again later.
    pub(super) fn recycle_failed(&mut self, old: WorkerId, err: &Error) {
        let Some(o) = self.slot_index(old) else { return };
        let retry = self.cfg.restart_backoff.0.saturating_mul(1 << self.startup_failures.min(10));
        let retry = retry.min(self.cfg.restart_backoff.1);
        let s = &mut self.slots[o];
        log::warn!(
            "[{}] replacement for worker {old} failed to start; it keeps serving, retry in {retry:?}: {err}",
            self.cfg.name
        );
        s.retry_recycle = Some(Instant::now() + retry);
        if let Some(r) = s.recycle.take() {
            for w in r.waiters {
                let _ = w.send(Err(err.duplicate()));
            }
        }
        self.timers.push(Reverse((Instant::now() + retry, Timer::Wake)));
    }

    /// After a call: a draining worker with nothing left to wait for is stopped; a spent one may
    /// retire.
    pub(super) fn after_call(&mut self, i: usize) {
        let s = &self.slots[i];
        if s.in_flight.is_empty() && matches!(self.phase, Phase::ShuttingDown { .. }) {
            return self.stop(i);
        }
        if s.state == WorkerState::Draining {
            return self.stop_if_drained(i);
        }
        if s.recycle.is_some() {
            self.try_finish_recycle(i);
        } else if s.retry_recycle.is_some() && s.state == WorkerState::Ready {
            self.check_due(i, Instant::now());
        }
    }

    // ---- health checks ------------------------------------------------------------------

    pub(super) fn health_timer(&mut self, wid: WorkerId, now: Instant) {
        let Some(interval) = self.cfg.health_interval else { return };
        let Some(i) = self.slot_index(wid) else { return };
        let s = &mut self.slots[i];
        if s.state != WorkerState::Ready || s.ping.is_some() {
            return;
        }
        if !s.in_flight.is_empty() && s.capacity == 1 {
            // Only idle process workers are pinged: a busy one cannot answer until its call
            // returns, and the call's own deadline covers that case. A thread worker's reading
            // loop answers even while every thread is busy.
            self.timers.push(Reverse((now + interval, Timer::Health(wid))));
            return;
        }
        self.next_ping += 1;
        let ping = self.next_ping;
        let Ok(frame) = protocol::encode_frame(&Msg::Ping { id: ping }, self.cfg.max_frame_size) else {
            return;
        };
        s.ping = Some(ping);
        s.worker.send(frame);
        self.timers.push(Reverse((now + self.cfg.health_timeout, Timer::HealthDeadline(wid, ping))));
    }

    pub(super) fn on_pong(&mut self, i: usize, id: u64) {
        let s = &mut self.slots[i];
        if s.ping != Some(id) {
            return;
        }
        s.ping = None;
        if let Some(interval) = self.cfg.health_interval {
            let wid = s.worker.id;
            self.timers.push(Reverse((Instant::now() + interval, Timer::Health(wid))));
        }
        self.dispatch_queued();
    }

    pub(super) fn health_deadline(&mut self, wid: WorkerId, ping: u64) {
        let Some(i) = self.slot_index(wid) else { return };
        if self.slots[i].ping != Some(ping) {
            return;
        }
        log::warn!(
            "[{}] worker {wid} (pid {}) did not answer a ping within {:?}; killing it",
            self.cfg.name,
            self.slots[i].worker.pid,
            self.cfg.health_timeout
        );
        self.recycle(i, RecycleReason::HealthCheck, None, true, None);
    }
}
