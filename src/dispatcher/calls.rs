//! Calls: admission, the FIFO queue, dispatch to the least-loaded worker, completion, and
//! call deadlines.

use std::cmp::Reverse;
use std::sync::atomic::Ordering;
use std::time::Instant;

use serde_json::Value;

use super::{Dispatcher, Pending, Phase, Timer};
use crate::error::{Error, Result, TimeoutKind};
use crate::events::Event;
use crate::worker::{ReplyTx, WorkerId};

use super::Call;

impl Dispatcher {
    pub(super) fn on_call(&mut self, call: Call, reply: ReplyTx) {
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
            log::warn!("[{}] queue full ({max_queue} calls waiting); call refused", self.cfg.name);
            if self.emitter.enabled() {
                self.emitter.emit(Event::QueueFull { pool: self.cfg.name.clone(), max_queue });
            }
            return self.answer(reply, Err(Error::QueueFull { max_queue }));
        }
        self.timers.push(Reverse((call.queue_deadline, Timer::Call(id))));
        let dispatched = call.enqueued;
        self.calls.insert(id, Pending { call, reply: Some(reply), worker: None, dispatched });
        self.queue.push_back(id);
        self.queued += 1;
        self.counters.queue_high_water = self.counters.queue_high_water.max(self.queued);
    }

    /// The least-loaded worker with room, preferring the one that has served least.
    pub(super) fn pick_worker(&self) -> Option<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.has_room())
            .min_by_key(|(_, s)| (s.running(), s.served))
            .map(|(i, _)| i)
    }

    fn start_call(&mut self, id: u64, slot: usize) {
        let now = Instant::now();
        let Some(p) = self.calls.get_mut(&id) else { return };
        if now >= p.call.queue_deadline {
            // Its time ran out before a worker took it (the caller has already given up):
            // answer it as a queue time-out rather than spend, and then kill, a worker on it.
            let reply = p.reply.take();
            self.calls.remove(&id);
            if let Some(reply) = reply {
                self.answer(reply, Err(Error::Timeout(TimeoutKind::Queue)));
            }
            return;
        }
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
        if self.slots[slot].limits.max_requests.is_some() {
            self.check_due(slot, now);
        }
    }

    pub(super) fn dispatch_queued(&mut self) {
        while self.queued > 0 {
            let Some(&id) = self.queue.front() else { break };
            if !self.calls.get(&id).is_some_and(|p| p.worker.is_none()) {
                self.queue.pop_front(); // answered while queued (timed out)
                continue;
            }
            let Some(slot) = self.pick_worker() else { break };
            self.queue.pop_front();
            self.queued -= 1;
            self.start_call(id, slot);
        }
    }

    /// Sends a call its one answer and counts it.
    pub(super) fn answer(&mut self, reply: ReplyTx, result: Result<Value>) {
        match &result {
            Ok(_) => self.counters.ok += 1,
            Err(Error::Timeout(_)) => {
                self.counters.failed += 1;
                self.counters.timeouts += 1;
            }
            Err(_) => self.counters.failed += 1,
        }
        // The caller may have stopped waiting (its own deadline); that is fine.
        let _ = reply.send(result);
    }

    /// Answers an in-flight call from the dispatcher's side (time-out, crash, shutdown), unless
    /// the worker's reader delivered its reply first. True if this answered it.
    pub(super) fn answer_in_flight(&mut self, slot: usize, call: u64, err: Error) -> bool {
        let pending = self.calls.remove(&call);
        let Some(reply) = self.slots[slot].worker.take_reply(call) else { return false };
        if let Some(p) = pending {
            self.call_completed(&p, false);
        }
        self.answer(reply, Err(err));
        true
    }

    fn call_completed(&mut self, p: &Pending, ok: bool) {
        let execution = p.dispatched.elapsed();
        self.counters.execution.record(execution);
        if self.emitter.enabled() {
            self.emitter.emit(Event::CallCompleted {
                pool: self.cfg.name.clone(),
                command: p.call.command.clone(),
                queue_wait: p.dispatched.saturating_duration_since(p.call.enqueued),
                execution,
                ok,
            });
        }
    }

    /// A call finished on a worker (its reply already delivered by the worker's reader, unless
    /// the dispatcher had answered it first).
    pub(super) fn on_completed(&mut self, worker: WorkerId, call: u64, ok: bool, answered: bool) {
        let Some(i) = self.slot_index(worker) else { return };
        let s = &mut self.slots[i];
        let Some(pos) = s.in_flight.iter().position(|&c| c == call) else {
            // A reply to a call this worker does not hold (a call that timed out stays in
            // `in_flight` until its reply comes, or its worker is killed), so a violation.
            return self.protocol_violation(i, format!("reply to call {call} it does not hold"));
        };
        s.in_flight.swap_remove(pos);
        s.served += 1;
        s.delivered_seen += 1;
        if !ok {
            s.errors += 1;
        }
        if answered {
            if let Some(p) = self.calls.remove(&call) {
                self.call_completed(&p, ok);
            }
            if ok {
                self.counters.ok += 1;
            } else {
                self.counters.failed += 1;
            }
        }
        self.after_call(i);
        self.dispatch_queued();
    }

    pub(super) fn call_timer(&mut self, id: u64, now: Instant) {
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
                let command = p.call.command.clone();
                let Some(i) = self.slot_index(wid) else { return };
                // If the reader has just delivered the reply, the call was in time after all.
                if !self.answer_in_flight(i, id, Error::Timeout(TimeoutKind::Call)) {
                    return;
                }
                if self.cfg.kills_on_timeout() {
                    log::warn!(
                        "[{}] call {id} `{command}` timed out on worker {wid}; killing the worker",
                        self.cfg.name
                    );
                    // A busy Python process cannot be interrupted; its capacity comes back
                    // with the replacement. Calls it runs alongside fail as collateral.
                    self.slots[i].collateral = true;
                    self.kill(i);
                } else {
                    // Thread profile: its co-tenants keep running; the call's thread (and its
                    // slot) stays busy until the Python function returns.
                    log::warn!(
                        "[{}] call {id} `{command}` timed out on worker {wid}; its thread stays busy until it returns",
                        self.cfg.name
                    );
                    // A draining worker left with only such calls is not worth waiting for.
                    self.stop_if_drained(i);
                }
            }
            _ => {}
        }
    }

    pub(super) fn fail_queued(&mut self, err: impl Fn() -> Error) {
        while let Some(id) = self.queue.pop_front() {
            if let Some(reply) = self.calls.remove(&id).and_then(|p| p.reply) {
                self.answer(reply, Err(err()));
            }
        }
        self.queued = 0;
    }
}
