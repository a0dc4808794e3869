//! Cancelling a call that is running: the request a handle makes, how the pool tells the
//! worker, and the steps from asking to killing.
//!
//! Every cancel takes the same steps, whatever started it (`PendingCall::cancel`, a deadline,
//! a stream dropped mid-way), each `cancel_grace` after the one before:
//! 1. **Ask.** The command sees `snakepit.cancelled()` turn true; a stream's generator is
//!    closed at its next `yield` (its `finally` runs).
//! 2. **Interrupt.** `snakepit.Cancelled` is raised in the command: on a process worker by
//!    SIGINT to its main thread, on a thread worker as an asynchronous exception in the call's
//!    thread.
//! 3. **Give up.** What a time-out did before: a process worker is killed and replaced; a
//!    thread worker keeps the call's slot until it ends (killed with `kill_on_timeout`).
//!
//! A worker whose command let go at step 1 or 2 answers `Cancelled` and keeps serving.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::Thread;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::worker::{temp_file, Conn};

/// A step of cancelling a running call, as [`Event::CallCancel`](crate::Event::CallCancel)
/// reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum CancelStep {
    /// The command was asked to stop (`snakepit.cancelled()` is true).
    Asked,
    /// `snakepit.Cancelled` was raised in the command.
    Interrupted,
    /// The command did not stop: its process worker is killed (a thread worker's call keeps
    /// its slot until it ends, or the worker is killed with `kill_on_timeout`).
    GaveUp,
}

/// Where a cancel is, between its steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ladder {
    /// The step taken last: 1 (asked) or 2 (interrupted).
    pub(crate) step: u8,
    /// When the next step is due.
    pub(crate) next_at: Instant,
    grace: Duration,
}

/// What a cancel does when its next step is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Interrupt the command.
    Interrupt,
    /// The command did not let go: give up on it.
    GiveUp,
}

impl Ladder {
    /// A cancel whose first step (asking) was taken at `now`.
    pub(crate) fn asked(now: Instant, grace: Duration) -> Ladder {
        Ladder { step: 1, next_at: now + grace, grace }
    }

    /// The step due at `now`, if one is; taking it moves the ladder on.
    pub(crate) fn due(&mut self, now: Instant) -> Option<Step> {
        if now < self.next_at {
            return None;
        }
        if self.step == 1 {
            self.step = 2;
            self.next_at = now + self.grace;
            Some(Step::Interrupt)
        } else {
            Some(Step::GiveUp)
        }
    }
}

/// A handle's request to cancel its running call, and how to wake the thread that runs it.
#[derive(Default)]
pub(crate) struct CancelToken {
    requested: AtomicBool,
    /// The worker the call runs on and the thread waiting for its reply, once it runs.
    waiter: Mutex<Option<(Arc<Conn>, Thread)>>,
}

impl std::fmt::Debug for CancelToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CancelToken").field("requested", &self.requested()).finish_non_exhaustive()
    }
}

impl CancelToken {
    /// Asks for the call to be cancelled, waking the thread that waits for its reply.
    pub(crate) fn request(&self) {
        self.requested.store(true, Ordering::Release);
        if let Some((conn, thread)) = &*self.waiter.lock() {
            conn.nudge();
            thread.unpark();
        }
    }

    /// Whether a cancel was asked for.
    pub(crate) fn requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// The calling thread waits for the call's reply from `conn` from now on.
    pub(crate) fn attach(&self, conn: &Arc<Conn>) {
        *self.waiter.lock() = Some((conn.clone(), std::thread::current()));
    }

    /// Nobody waits any more (the call ended).
    pub(crate) fn detach(&self) {
        self.waiter.lock().take();
    }
}

/// Process profile: the file through which a busy worker learns which call to cancel, and
/// how far (its main thread runs the command, so it reads no frames). The pool writes
/// `"<call id> <step>"`, padded to [`CancelFile::SIZE`] bytes, in place; the worker maps the
/// file, so `snakepit.cancelled()` costs it no system call, and its SIGINT handler raises
/// `Cancelled` only when the file names the call it runs: a signal that arrives after its call
/// ended interrupts nothing.
#[derive(Debug)]
pub(crate) struct CancelFile {
    file: File,
    path: Mutex<Option<PathBuf>>,
}

impl CancelFile {
    /// The file's fixed size.
    pub(crate) const SIZE: usize = 32;

    /// A new file under the temporary folder, naming no call.
    pub(crate) fn create() -> io::Result<CancelFile> {
        let (file, path) = temp_file("cancel")?;
        file.write_all_at(&[b' '; Self::SIZE], 0)?;
        Ok(CancelFile { file, path: Mutex::new(Some(path)) })
    }

    pub(crate) fn path(&self) -> Option<PathBuf> {
        self.path.lock().clone()
    }

    /// Removes the file's name (both sides have it open).
    pub(crate) fn unlink(&self) {
        if let Some(path) = self.path.lock().take() {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Names call `id` and the step it is at.
    pub(crate) fn write(&self, id: u64, step: u8) {
        let _ = self.file.write_all_at(&Self::record(id, step), 0);
    }

    /// The bytes that name call `id` at `step`.
    fn record(id: u64, step: u8) -> [u8; Self::SIZE] {
        let mut bytes = [b' '; Self::SIZE];
        let text = format!("{id} {step}");
        bytes[..text.len()].copy_from_slice(text.as_bytes());
        bytes
    }
}

impl Drop for CancelFile {
    fn drop(&mut self) {
        self.unlink();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ladder_asks_then_interrupts_then_gives_up_each_a_grace_apart() {
        let t0 = Instant::now();
        let grace = Duration::from_millis(100);
        let mut l = Ladder::asked(t0, grace);
        assert_eq!(l.due(t0 + Duration::from_millis(99)), None, "the command has its grace to stop");
        assert_eq!(l.due(t0 + grace), Some(Step::Interrupt));
        assert_eq!(l.next_at, t0 + 2 * grace);
        assert_eq!(l.due(t0 + Duration::from_millis(150)), None);
        assert_eq!(l.due(t0 + 2 * grace), Some(Step::GiveUp));
    }

    #[test]
    fn the_cancel_file_names_the_call_and_its_step_in_a_fixed_size() {
        assert_eq!(&CancelFile::record(42, 1)[..5], b"42 1 ");
        assert_eq!(CancelFile::record(u64::MAX, 2).len(), CancelFile::SIZE);
        let f = CancelFile::create().unwrap();
        let path = f.path().unwrap();
        f.write(7, 2);
        let text = std::fs::read(&path).unwrap();
        assert_eq!(text.len(), CancelFile::SIZE);
        assert_eq!(String::from_utf8(text).unwrap().trim_end(), "7 2");
        f.write(123456, 1);
        f.write(8, 1); // a shorter record leaves nothing of the longer one behind
        assert_eq!(std::fs::read_to_string(&path).unwrap().trim_end(), "8 1");
        drop(f);
        assert!(!path.exists(), "removed with its owner");
    }
}
