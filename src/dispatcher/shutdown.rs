//! Stopping workers (asked, then SIGTERM, then SIGKILL) and shutting the pool down within its
//! grace period.

use std::cmp::Reverse;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use super::{Dispatcher, Phase, Timer};
use crate::error::{Error, TimeoutKind};
use crate::protocol::{self, Msg};
use crate::stats::WorkerState;
use crate::sys;
use crate::worker::WorkerId;

/// How long a worker asked to stop may take before SIGTERM, and again before SIGKILL.
pub(crate) const STOP_ESCALATION: Duration = Duration::from_secs(1);

// How far stopping a worker has gone, in order.
/// Not asked to stop.
pub(super) const RUNNING: u8 = 0;
/// Sent `shutdown` and EOF.
const ASKED: u8 = 1;
/// Sent SIGTERM.
const TERMINATED: u8 = 2;
/// Sent SIGKILL.
const KILLED: u8 = 3;

/// What went wrong during shutdown.
#[derive(Debug, Default)]
pub(crate) struct ShutdownReport {
    /// In-flight calls failed because the grace period ended.
    pub(crate) calls_cut: usize,
    /// Workers that had to be signalled because they did not exit when asked.
    pub(crate) forced: usize,
}

impl Dispatcher {
    pub(super) fn finished(&self) -> bool {
        matches!(self.phase, Phase::ShuttingDown { .. }) && self.slots.is_empty()
    }

    pub(super) fn finish(&mut self) {
        self.emitter.close();
        // The last workers' threads end within moments of their exit, unless a grandchild that
        // escaped the process group holds a pipe: then they are left to end on their own.
        let end = Instant::now() + STOP_ESCALATION;
        while !self.exited.is_empty() && Instant::now() < end {
            self.join_exited();
            std::thread::sleep(Duration::from_millis(1));
        }
        self.join_exited();
        if !self.exited.is_empty() {
            log::warn!(
                "[{}] {} exited workers' output threads are still held open (by an escaped child?); not waiting",
                self.cfg.name,
                self.exited.len()
            );
        }
        if let Phase::ShuttingDown { reply, report, .. } = &mut self.phase {
            let report = std::mem::take(report);
            log::info!("[{}] pool stopped", self.cfg.name);
            if let Some(reply) = reply.take() {
                let _ = reply.send(report);
            }
        }
    }

    /// Kills a worker now (its calls fail when its exit is reported).
    pub(super) fn kill(&mut self, i: usize) {
        let s = &mut self.slots[i];
        let was_ready = s.state == WorkerState::Ready;
        s.state = WorkerState::Stopping;
        if s.escalation < KILLED {
            s.escalation = KILLED;
            s.worker.close_stdin();
            s.worker.signal(sys::SIGKILL);
        }
        if was_ready {
            // If it was a ready replacement, its old worker must not wait for it.
            self.replacement_lost(i);
        }
    }

    /// Asks an idle worker to exit: a `shutdown` frame, then EOF; escalates on a timer.
    pub(super) fn stop(&mut self, i: usize) {
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

    pub(super) fn escalate(&mut self, wid: WorkerId, now: Instant) {
        let Some(i) = self.slot_index(wid) else { return };
        let s = &mut self.slots[i];
        if s.escalation >= KILLED {
            return;
        }
        let (signal, next) =
            if s.escalation == ASKED { (sys::SIGTERM, TERMINATED) } else { (sys::SIGKILL, KILLED) };
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

    pub(super) fn begin_shutdown(&mut self, reply: Option<Sender<ShutdownReport>>) {
        let grace_end = Instant::now() + self.cfg.shutdown_timeout;
        log::info!("[{}] pool shutting down", self.cfg.name);
        if let Phase::Starting(started) = &self.phase {
            let _ = started.send(Err(Error::ShuttingDown));
        }
        self.phase = Phase::ShuttingDown { grace_end, reply, report: ShutdownReport::default() };
        self.fail_queued(|| Error::ShuttingDown);
        self.timers.push(Reverse((grace_end, Timer::Wake)));
        for i in 0..self.slots.len() {
            if let Some(r) = self.slots[i].recycle.take() {
                for w in r.waiters {
                    let _ = w.send(Err(Error::ShuttingDown));
                }
            }
            match self.slots[i].state {
                WorkerState::Starting => self.kill(i),
                _ if self.slots[i].in_flight.is_empty() => self.stop(i),
                _ => {}
            }
        }
    }

    /// At the end of the grace period, cut the calls still running and stop their workers.
    pub(super) fn grace_timer(&mut self, now: Instant) {
        let Phase::ShuttingDown { grace_end, .. } = self.phase else { return };
        if now < grace_end {
            return;
        }
        let (mut cut, mut forced) = (0, 0);
        for i in 0..self.slots.len() {
            let calls = std::mem::take(&mut self.slots[i].in_flight);
            if calls.is_empty() {
                self.stop(i);
                continue;
            }
            for call in calls {
                if self.answer_in_flight(i, call, Error::Timeout(TimeoutKind::Shutdown)) {
                    cut += 1;
                }
            }
            // Still busy with the calls just cut: it cannot take a `shutdown` frame now.
            if self.slots[i].escalation < KILLED {
                forced += 1;
                self.kill(i);
            }
        }
        if let Phase::ShuttingDown { report, .. } = &mut self.phase {
            report.calls_cut += cut;
            report.forced += forced;
        }
    }
}
