//! Stopping workers (asked, then SIGTERM, then SIGKILL, `stop_timeout` apart) and shutting the
//! pool down within its grace period.

use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use super::board::Gate;
use super::{Dispatcher, Life, Phase, Stop, Timer};
use crate::error::Error;
use crate::protocol::{self, Msg};
use crate::sys;
use crate::worker::{KillReason, WorkerId};

/// How long the dispatcher may wait for a caller that is writing to a worker's stdin before it
/// stops the worker with a signal instead of EOF.
const STDIN_WAIT: Duration = Duration::from_millis(50);

/// What happened during shutdown.
#[derive(Debug, Default)]
pub(crate) struct ShutdownReport {
    /// In-flight calls cut because the grace period ended.
    pub(crate) calls_cut: usize,
    /// Workers that had to be signalled because they did not exit when asked.
    pub(crate) forced: usize,
}

impl Dispatcher {
    pub(super) fn finished(&self) -> bool {
        matches!(self.phase, Phase::ShuttingDown { .. }) && self.slots.is_empty()
    }

    pub(super) fn finish(&mut self) {
        self.shared.emitter.close();
        // The monitors end within moments of their workers' exits (they stop waiting for
        // stderr after a short drain, even if an escaped descendant holds it).
        let end = Instant::now() + Duration::from_secs(2);
        while !self.exited.is_empty() && Instant::now() < end {
            self.join_exited();
            std::thread::sleep(Duration::from_millis(1));
        }
        self.join_exited();
        if !self.exited.is_empty() {
            log::warn!(
                "[{}] {} workers' monitor threads did not end; not waiting",
                self.cfg.name,
                self.exited.len()
            );
        }
        if let Phase::ShuttingDown { replies, report, .. } = &mut self.phase {
            log::info!("[{}] pool stopped", self.cfg.name);
            for reply in replies.drain(..) {
                let _ = reply.send(ShutdownReport { calls_cut: report.calls_cut, forced: report.forced });
            }
        }
    }

    /// Kills a worker now; callers running calls on it see it die, and learn `reason`.
    pub(super) fn kill(&mut self, id: WorkerId, reason: KillReason, now: Instant) {
        let Some(s) = self.slots.get_mut(&id) else { return };
        let was_ready = s.life == Life::Ready;
        if matches!(s.life, Life::Stopping(stop) if stop >= Stop::Killed) {
            return;
        }
        s.life = Life::Stopping(Stop::Killed);
        s.worker.conn.mark_killed(reason);
        self.shared.board.lock().mark_lost(id, crate::session::Loss::Killed(reason));
        s.worker.conn.signal(sys::SIGKILL);
        let (origin, keeper) = (s.origin, s.worker.conn.has_keeper());
        if keeper {
            self.schedule(now + self.cfg.stop_timeout, Timer::Escalate(id));
        }
        self.shared.board.lock().close(id);
        if was_ready {
            // If it was a ready replacement, its old worker must not wait for it.
            self.replacement_lost(id, origin, now);
        }
    }

    /// Asks an idle worker to exit: a `shutdown` frame, then EOF; escalates on a timer.
    pub(super) fn stop(&mut self, id: WorkerId, now: Instant) {
        let Some(s) = self.slots.get_mut(&id) else { return };
        if matches!(s.life, Life::Stopping(_)) {
            return;
        }
        s.life = Life::Stopping(Stop::Asked);
        let frame = protocol::encode_frame(&Msg::Shutdown, self.cfg.max_frame_size).unwrap_or_default();
        if !s.worker.conn.ask_to_stop(&frame, STDIN_WAIT) {
            s.worker.conn.signal(sys::SIGTERM);
            s.life = Life::Stopping(Stop::Terminated);
        }
        self.shared.board.lock().close(id);
        self.schedule(now + self.cfg.stop_timeout, Timer::Escalate(id));
    }

    pub(super) fn escalate(&mut self, id: WorkerId, now: Instant) {
        let Some(s) = self.slots.get_mut(&id) else { return };
        let (signal, next) = match s.life {
            Life::Stopping(Stop::Asked) => (sys::SIGTERM, Stop::Terminated),
            Life::Stopping(Stop::Terminated) => (sys::SIGKILL, Stop::Killed),
            Life::Stopping(Stop::Killed) if s.worker.conn.has_keeper() => {
                log::warn!(
                    "[{}] worker {id}'s keeper (pid {}) did not end within stop_timeout ({:?}) of a kill; \
                     killing its process group",
                    self.cfg.name,
                    s.worker.conn.pid,
                    self.cfg.stop_timeout
                );
                s.worker.conn.force_kill();
                s.life = Life::Stopping(Stop::Forced);
                return;
            }
            _ => return,
        };
        log::warn!(
            "[{}] worker {id} (pid {}) did not exit within stop_timeout ({:?}); sending signal {signal}",
            self.cfg.name,
            s.pid(),
            self.cfg.stop_timeout
        );
        s.worker.conn.signal(signal);
        s.life = Life::Stopping(next);
        self.schedule(now + self.cfg.stop_timeout, Timer::Escalate(id));
        if let Phase::ShuttingDown { report, .. } = &mut self.phase {
            if next == Stop::Terminated {
                report.forced += 1;
            }
        }
    }

    pub(super) fn begin_shutdown(&mut self, reply: Option<Sender<ShutdownReport>>, now: Instant) {
        let grace_end = now + self.cfg.shutdown_timeout;
        log::info!("[{}] pool shutting down", self.cfg.name);
        if let Phase::Starting(started) = &self.phase {
            let _ = started.send(Err(Error::ShuttingDown));
        }
        self.phase = Phase::ShuttingDown {
            grace_end,
            replies: reply.into_iter().collect(),
            report: Default::default(),
        };
        {
            let mut board = self.shared.board.lock();
            board.gate = Gate::Closed;
            board.drop_waiters();
        }
        self.schedule(grace_end, Timer::Wake);
        let ids: Vec<WorkerId> = self.slots.keys().copied().collect();
        for id in ids {
            let s = self.slots.get_mut(&id).expect("listed");
            if let Some(r) = s.recycle.take() {
                for w in r.waiters {
                    let _ = w.send(Err(Error::ShuttingDown));
                }
            }
            match s.life {
                Life::Starting => self.kill(id, KillReason::Startup, now),
                Life::Ready | Life::Draining => {
                    s.life = Life::Draining;
                    self.stop_if_drained(id, now);
                }
                Life::Stopping(_) => {}
            }
        }
    }

    /// At the end of the grace period, cut the calls still running and kill their workers.
    pub(super) fn grace_timer(&mut self, now: Instant) {
        let Phase::ShuttingDown { grace_end, .. } = self.phase else { return };
        if now < grace_end {
            return;
        }
        let mut cut = 0;
        let ids: Vec<WorkerId> = self.slots.keys().copied().collect();
        for id in ids {
            if self.slots[&id].life != Life::Draining {
                continue;
            }
            let (busy, abandoned) = self.shared.board.lock().close(id);
            cut += busy - abandoned;
            self.kill(id, KillReason::Shutdown, now);
        }
        if let Phase::ShuttingDown { report, .. } = &mut self.phase {
            report.calls_cut += cut;
        }
    }
}
