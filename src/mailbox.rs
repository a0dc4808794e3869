//! A one-shot hand-over between two threads that never spins: how a waiting caller receives
//! its lease, and (thread profile) its reply.
//!
//! A channel would do, but crossbeam's spins and yields before it sleeps; with more callers
//! than cores that spinning took a fifth of the CPU of a busy pool (measured with `perf`).
//! Here the receiver parks its thread and the sender unparks it. Dropping the sending end
//! without sending closes the mailbox, as dropping a channel's sender disconnects it.

use std::sync::Arc;
use std::thread::Thread;
use std::time::Instant;

use parking_lot::Mutex;

enum State<T> {
    Empty,
    Full(T),
    Closed,
}

struct Inner<T> {
    state: Mutex<State<T>>,
    /// The receiving thread.
    thread: Thread,
}

/// The receiving end; it belongs to the thread that made it.
pub(crate) struct Mailbox<T> {
    inner: Arc<Inner<T>>,
}

/// The sending end: sends at most once.
pub(crate) struct Address<T> {
    inner: Option<Arc<Inner<T>>>,
}

/// Why nothing was received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Missed {
    /// The deadline passed.
    Timeout,
    /// The sending end was dropped without sending.
    Closed,
}

/// A mailbox whose receiver is the calling thread.
pub(crate) fn mailbox<T>() -> (Address<T>, Mailbox<T>) {
    let inner = Arc::new(Inner { state: Mutex::new(State::Empty), thread: std::thread::current() });
    (Address { inner: Some(inner.clone()) }, Mailbox { inner })
}

impl<T> std::fmt::Debug for Address<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Address")
    }
}

impl<T> Address<T> {
    /// Delivers `value` and wakes the receiver. Gives it back if the receiver is gone.
    pub(crate) fn send(mut self, value: T) -> Result<(), T> {
        let inner = self.inner.take().expect("sends once");
        if Arc::strong_count(&inner) == 1 {
            return Err(value);
        }
        *inner.state.lock() = State::Full(value);
        inner.thread.unpark();
        Ok(())
    }
}

impl<T> Drop for Address<T> {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            *inner.state.lock() = State::Closed;
            inner.thread.unpark();
        }
    }
}

impl<T> Mailbox<T> {
    /// Waits (parked) for the value until `deadline`.
    pub(crate) fn recv_deadline(&self, deadline: Instant) -> Result<T, Missed> {
        self.recv_until(deadline, || false)
    }

    /// Waits (parked) for the value until `deadline`, or until `stop()` is true (looked at
    /// whenever the thread is unparked): then `Missed::Timeout`.
    pub(crate) fn recv_until(&self, deadline: Instant, stop: impl Fn() -> bool) -> Result<T, Missed> {
        loop {
            if let Some(got) = self.take() {
                return got;
            }
            let now = Instant::now();
            if now >= deadline || stop() {
                return Err(Missed::Timeout);
            }
            // Wakes early on an unpark (or spuriously); the loop looks again.
            std::thread::park_timeout(deadline - now);
        }
    }

    /// The value if it is there now.
    pub(crate) fn try_recv(&self) -> Result<T, Missed> {
        self.take().unwrap_or(Err(Missed::Timeout))
    }

    fn take(&self) -> Option<Result<T, Missed>> {
        let mut state = self.inner.state.lock();
        match std::mem::replace(&mut *state, State::Empty) {
            State::Empty => None,
            State::Full(value) => Some(Ok(value)),
            State::Closed => {
                *state = State::Closed;
                Some(Err(Missed::Closed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_value_sent_from_another_thread_wakes_the_receiver() {
        let (to, mb) = mailbox();
        let t = std::thread::spawn(move || to.send(7).unwrap());
        assert_eq!(mb.recv_deadline(Instant::now() + Duration::from_secs(10)), Ok(7));
        t.join().unwrap();
        assert_eq!(mb.try_recv(), Err(Missed::Timeout), "taken once");
    }

    #[test]
    fn nothing_sent_times_out_and_a_dropped_address_closes() {
        let (to, mb) = mailbox::<u8>();
        let start = Instant::now();
        assert_eq!(mb.recv_deadline(start + Duration::from_millis(20)), Err(Missed::Timeout));
        assert!(start.elapsed() >= Duration::from_millis(20));
        drop(to);
        assert_eq!(mb.recv_deadline(Instant::now() + Duration::from_secs(10)), Err(Missed::Closed));
    }

    #[test]
    fn sending_to_a_receiver_that_is_gone_gives_the_value_back() {
        let (to, mb) = mailbox();
        drop(mb);
        assert_eq!(to.send("lease"), Err("lease"));
    }
}
