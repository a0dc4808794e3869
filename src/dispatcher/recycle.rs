//! Recycling, make before break (by age, calls served, memory, a wedged thread worker, or by
//! hand), and what the call side tells the dispatcher.

use std::time::Instant;

use crossbeam_channel::Sender;

use super::board::{Effects, Notice};
use super::{Dispatcher, Life, Origin, Phase, Recycle, RecycleOrder, Timer};
use crate::error::{Error, Result};
use crate::events::Event;
use crate::policy::RecycleReason;
use crate::session::Loss;
use crate::worker::{KillReason, WorkerId};

impl Dispatcher {
    pub(super) fn on_notice(&mut self, notice: Notice, now: Instant) {
        match notice {
            Notice::Due(id) => self.recycle(id, RecycleReason::MaxRequests, None, None, now),
            Notice::Wedged(id) => self.schedule(now + super::WEDGE_GRACE, Timer::Wedged(id)),
            Notice::Drained(id) => self.stop_if_drained(id, now),
            Notice::Kill(id, KillReason::HealthCheck) => {
                let order =
                    RecycleOrder { worker: id, reason: RecycleReason::HealthCheck, kill: true, rss: None };
                self.on_order(order, now);
            }
            Notice::Kill(id, reason) => {
                if reason == KillReason::CallTimeout {
                    log::warn!(
                        "[{}] worker {id}: a call overran its deadline; killing the worker",
                        self.cfg.name
                    );
                }
                self.kill(id, reason, now);
            }
            Notice::Unusable(id) => {
                if let Some(s) = self.slots.get(&id) {
                    let err = Error::Protocol("the worker wrote to its output while idle".into());
                    log::warn!("[{}] worker {id}: {err}; killing it", self.cfg.name);
                    s.worker.conn.mark_broken(err);
                    self.kill(id, KillReason::Protocol, now);
                }
            }
            Notice::QueueFull => {}
        }
    }

    /// The housekeeper's orders: recycle for memory, or kill at once.
    pub(super) fn on_order(&mut self, order: RecycleOrder, now: Instant) {
        let Some(s) = self.slots.get(&order.worker) else { return };
        if !order.kill {
            if s.life == Life::Ready {
                self.recycle(order.worker, order.reason, order.rss, None, now);
            }
            return;
        }
        if !matches!(s.life, Life::Ready | Life::Draining) {
            return;
        }
        let why = if order.reason == RecycleReason::HealthCheck {
            format!("did not answer a health check within {:?}", self.cfg.health_timeout)
        } else {
            format!("its memory passed max_memory_hard ({} bytes)", order.rss.unwrap_or(0))
        };
        log::warn!("[{}] worker {} (pid {}) {why}; killing it", self.cfg.name, order.worker, s.pid());
        self.retired(order.worker, order.reason, order.rss, now);
        let reason = if order.reason == RecycleReason::HealthCheck {
            KillReason::HealthCheck
        } else {
            KillReason::MemoryLimit
        };
        self.kill(order.worker, reason, now);
    }

    /// Starts replacing worker `id`: a replacement is spawned now, and `id` is retired once it
    /// is ready. Waits for its turn (`max_concurrent_recycles`) and for the backoff after a
    /// failed replacement; `waiter` hears the outcome.
    pub(super) fn recycle(
        &mut self,
        id: WorkerId,
        reason: RecycleReason,
        rss: Option<u64>,
        waiter: Option<Sender<Result<()>>>,
        now: Instant,
    ) {
        if !matches!(self.phase, Phase::Running) {
            if let Some(w) = waiter {
                let _ = w.send(Err(Error::ShuttingDown));
            }
            return;
        }
        let Some(s) = self.slots.get_mut(&id) else { return };
        if s.life != Life::Ready {
            return;
        }
        if let Some(r) = &mut s.recycle {
            r.waiters.extend(waiter);
            return;
        }
        if waiter.is_none() {
            let retry_at = s.pending.map_or(now, |(_, at)| at);
            let busy = self.slots.values().filter(|s| s.recycle.is_some()).count();
            if now < retry_at || busy >= self.cfg.max_concurrent_recycles {
                // Not now: `maintain` tries again once the turn or the backoff allows.
                let s = self.slots.get_mut(&id).expect("checked");
                s.pending = Some((s.pending.map_or(reason, |(r, _)| r), retry_at));
                if now < retry_at {
                    self.schedule(retry_at, Timer::Wake);
                }
                return;
            }
        }
        match self.spawn_worker(Origin::Replaces(id), now) {
            Ok(replacement) => {
                log::debug!(
                    "[{}] recycling worker {id} ({reason}): replacement {replacement} starting",
                    self.cfg.name
                );
                self.shared.board.lock().mark_retiring(id);
                let s = self.slots.get_mut(&id).expect("checked");
                s.pending = None;
                s.recycle = Some(Recycle { reason, replacement, rss, waiters: waiter.into_iter().collect() });
            }
            Err(e) => {
                if let Some(w) = waiter {
                    let _ = w.send(Err(e.duplicate()));
                }
                if let Some(s) = self.slots.get_mut(&id) {
                    s.pending = Some((reason, now));
                }
                self.recycle_failed(id, &e, now);
                self.note_startup_failure(&e, now);
            }
        }
    }

    /// Retires worker `old` if its replacement is ready: it takes no new calls, finishes the
    /// ones it has, and is then stopped.
    pub(super) fn try_finish_recycle(&mut self, old: WorkerId, now: Instant) {
        let Some(s) = self.slots.get(&old) else { return };
        let Some(r) = &s.recycle else { return };
        if s.life != Life::Ready || self.slots.get(&r.replacement).map(|x| x.life) != Some(Life::Ready) {
            return;
        }
        let s = self.slots.get_mut(&old).expect("checked");
        let r = s.recycle.take().expect("checked");
        s.life = Life::Draining;
        self.retired(old, r.reason, r.rss, now);
        let mut fx = Effects::default();
        let pinned = self.shared.board.lock().retire(old, Loss::Recycled(r.reason), &mut fx);
        self.shared.apply(fx);
        // Answered once it takes no new call (`recycle_worker` promises that).
        for w in r.waiters {
            let _ = w.send(Ok(()));
        }
        if pinned {
            // Its strict sessions keep it until they end, or for `session_drain` at most.
            log::info!(
                "[{}] worker {old} keeps serving its strict sessions for up to {:?}",
                self.cfg.name,
                self.cfg.session_drain
            );
            self.schedule(now + self.cfg.session_drain, Timer::SessionDrain(old));
        } else {
            self.stop_if_drained(old, now);
        }
    }

    /// A retired worker's strict sessions had their time: it takes no more of their calls
    /// (they fail with `SessionLost`), and stops once its calls are done.
    pub(super) fn session_drain_over(&mut self, id: WorkerId, now: Instant) {
        if self.slots.get(&id).is_some_and(|s| s.life == Life::Draining) {
            self.stop_if_drained(id, now);
        }
    }

    /// Stops a closed worker once nobody waits for its calls any more: when it has none, or
    /// (thread profile) only calls that were already answered with a time-out, whose threads
    /// may never return (then it is killed).
    pub(super) fn stop_if_drained(&mut self, id: WorkerId, now: Instant) {
        let Some(s) = self.slots.get(&id) else { return };
        if s.life != Life::Draining {
            return;
        }
        let (busy, abandoned) = self.shared.board.lock().close(id);
        if busy == 0 {
            self.stop(id, now);
        } else if busy == abandoned {
            log::warn!(
                "[{}] worker {id} (pid {}) is draining with only timed-out calls left; killing it",
                self.cfg.name,
                s.pid()
            );
            self.kill(id, KillReason::Wedged, now);
        }
    }

    /// A replacement worker (`id`, started as `origin`) was lost before its old worker retired:
    /// the old worker keeps serving and tries again after a backoff.
    pub(super) fn replacement_lost(&mut self, id: WorkerId, origin: Origin, now: Instant) {
        let Origin::Replaces(old) = origin else { return };
        let Some(o) = self.slots.get_mut(&old) else { return };
        if !o.recycle.as_ref().is_some_and(|r| r.replacement == id) {
            return;
        }
        let r = o.recycle.take().expect("checked");
        for w in r.waiters {
            let message = format!("replacement worker {id} was lost before it took over");
            let _ = w.send(Err(Error::Startup { message, error: None }));
        }
        o.pending = Some((r.reason, now));
    }

    /// Counts, logs and announces a recycled worker.
    fn retired(&mut self, id: WorkerId, reason: RecycleReason, rss: Option<u64>, now: Instant) {
        let Some(s) = self.slots.get(&id) else { return };
        // The housekeeper read the whole tree for memory recycles; otherwise the worker's own.
        let rss = rss.or_else(|| crate::proc::rss_bytes(s.pid()));
        let age = now.saturating_duration_since(s.spawned);
        let served = self.shared.board.lock().seat(id).map_or(0, |x| x.served);
        log::info!(
            "[{}] worker {id} (pid {}) recycled: {reason} (age {age:?}, {served} calls)",
            self.cfg.name,
            s.pid()
        );
        self.counts.recycles.add(reason);
        if self.shared.emitter.enabled() {
            self.shared.emitter.emit(Event::WorkerRecycled {
                pool: self.cfg.name.clone(),
                worker: id,
                pid: s.pid(),
                reason,
                age,
                calls_served: served,
                rss_bytes: rss,
            });
        }
    }

    /// The replacement for `old` could not start: `old` keeps serving; try again after the
    /// start backoff.
    pub(super) fn recycle_failed(&mut self, old: WorkerId, err: &Error, now: Instant) {
        let retry = self.starts.delay().max(self.cfg.restart_backoff.0);
        let Some(s) = self.slots.get_mut(&old) else { return };
        log::warn!(
            "[{}] replacement for worker {old} failed to start; it keeps serving, retry in {retry:?}: {err}",
            self.cfg.name
        );
        let reason = s.recycle.as_ref().map(|r| r.reason).or(s.pending.map(|p| p.0));
        if let Some(r) = s.recycle.take() {
            for w in r.waiters {
                let _ = w.send(Err(err.duplicate()));
            }
        }
        if let Some(reason) = reason {
            s.pending = Some((reason, now + retry));
        }
        self.schedule(now + retry, Timer::Wake);
    }
}
