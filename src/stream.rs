//! Streams: a command that is a Python generator sends its items one by one
//! ([`Pool::stream`](crate::Pool::stream)), with credit-based backpressure; and where a call's
//! progress reports go.
//!
//! The consumer's thread owns the stream's call, as a blocking call's thread owns its call: it
//! holds the lease on the worker, reads the chunks (itself on a process worker; through the
//! worker's monitor on a thread worker), and grants credit as it takes them. The worker sends
//! at most `window` chunks that were not granted back, so neither side holds more than the
//! window, however slow the consumer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::binary::Payload;
use crate::call::{Calls, Prepared};
use crate::dispatcher::{Effects, Lease, Return};
use crate::error::{Error, Result, TimeoutKind};
use crate::events::Event;
use crate::protocol::Progress;
use crate::worker::{Conn, Exchange, KillReason};

/// How many chunks a stream may have in flight unless its options say otherwise.
pub(crate) const DEFAULT_WINDOW: u32 = 32;

/// Where a call's progress reports go (see
/// [`CallOptions::on_progress`](crate::CallOptions::on_progress)).
#[derive(Clone)]
pub(crate) struct ProgressSink(Arc<dyn Fn(&Progress) + Send + Sync>);

impl ProgressSink {
    pub(crate) fn new(f: impl Fn(&Progress) + Send + Sync + 'static) -> Self {
        ProgressSink(Arc::new(f))
    }

    /// Hands `progress` to the callback. A callback that panics is logged and left behind:
    /// it runs on a thread that holds a worker (or reads all of a worker's replies).
    pub(crate) fn call(&self, progress: &Progress) {
        let f = &self.0;
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(progress))).is_err() {
            log::error!("a progress callback panicked; the report was dropped");
        }
    }
}

impl std::fmt::Debug for ProgressSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProgressSink")
    }
}

/// The items of a streaming call, as they come ([`Pool::stream`](crate::Pool::stream)): each
/// `Ok(chunk)`, until the command returns (the iterator ends) or fails (its error is the last
/// item). A command that is not a generator gives its result as the one chunk.
///
/// The whole deadline (the call's `timeout`) and the time allowed between two chunks
/// (`chunk_timeout`) both apply, and end the stream with `Timeout`; they are looked at as the
/// stream is iterated, so a stream that is kept but not iterated holds its worker (paused in
/// its `yield`) until it is dropped. Dropping the stream before
/// its end cancels the call: the generator is closed at its next `yield` (its `finally` runs),
/// or interrupted, or its worker replaced, each `cancel_grace` apart.
#[must_use = "a stream does nothing unless iterated; dropping it cancels the call"]
pub struct Stream {
    calls: Arc<Calls>,
    command: String,
    p: Prepared,
    /// The lease on the worker, until the stream ends.
    lease: Option<Lease<Arc<Conn>>>,
    /// Thread profile: the chunks and end the monitor hands over.
    rx: Option<Receiver<Exchange>>,
    window: u32,
    /// Chunks handed out since credit was last granted.
    taken: u32,
    chunk_timeout: Option<Duration>,
    started: Instant,
    returned: Option<Value>,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("command", &self.command)
            .field("id", &self.p.id)
            .finish_non_exhaustive()
    }
}

impl Stream {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        calls: Arc<Calls>,
        command: &str,
        p: Prepared,
        lease: Lease<Arc<Conn>>,
        rx: Option<Receiver<Exchange>>,
        window: u32,
        chunk_timeout: Option<Duration>,
        started: Instant,
    ) -> Stream {
        Stream {
            calls,
            command: command.to_string(),
            p,
            lease: Some(lease),
            rx,
            window,
            taken: 0,
            chunk_timeout,
            started,
            returned: None,
        }
    }

    /// What the generator returned (`return value` inside it), once the stream has ended
    /// well; `None` before.
    pub fn returned(&self) -> Option<&Value> {
        self.returned.as_ref()
    }

    /// Whether the stream has ended (the iterator gives nothing more).
    pub fn is_done(&self) -> bool {
        self.lease.is_none()
    }

    /// The call's id (as in log lines).
    pub fn id(&self) -> u64 {
        self.p.id
    }

    /// Thread profile: the end of a stream the monitor has finished with (after the chunks
    /// still queued, which nobody takes now).
    fn take_end(&self) -> Exchange {
        let Some(rx) = &self.rx else { return Exchange::Died };
        loop {
            match rx.try_recv() {
                Ok(Exchange::Chunk(_) | Exchange::BadChunk(_)) => {}
                Ok(end) => return end,
                Err(_) => return Exchange::Died, // the worker ended with no reply
            }
        }
    }

    /// Ends the stream with `exchange`'s outcome: gives the lease back (or follows up on a
    /// call still running) and records the outcome. Returns the item to hand out, if any.
    fn end(&mut self, exchange: Exchange, timed: TimeoutKind) -> Option<Result<Payload>> {
        let lease = self.lease.take()?;
        let conn = lease.conn.clone();
        let id = self.p.id;
        let (how, result) = match exchange {
            Exchange::Reply(Ok(value)) => {
                self.returned = Some(value.into_value());
                (Some(Return::Done), Ok(Payload::default()))
            }
            Exchange::Reply(Err(e)) => (Some(Return::Done), Err(e)),
            // The generator goes on: it is cancelled, as for a dropped stream.
            Exchange::TimedOut { .. } | Exchange::BadChunk(_) => {
                let is_bad_chunk = matches!(exchange, Exchange::BadChunk(_));
                let err = match exchange {
                    Exchange::BadChunk(err) => err,
                    _ => Error::timeout(timed),
                };
                log::warn!("[{}] stream {id} `{}`: {err}", self.calls.config().name, self.command);
                if !conn.stream_abandon(id) {
                    // Its end came just now: a time-out gives way to it, but a chunk that could
                    // not be decoded still fails the stream (it is not whole).
                    match (self.take_end(), is_bad_chunk) {
                        (Exchange::Reply(_), true) => (Some(Return::Done), Err(err)),
                        (end, _) => {
                            self.lease = Some(lease);
                            return self.end(end, timed);
                        }
                    }
                } else {
                    (None, Err(err))
                }
            }
            Exchange::Died => (Some(Return::Died), Err(conn.death_error(self.p.deadline))),
            Exchange::Broken(e) => {
                conn.mark_broken(e.duplicate());
                (Some(Return::Kill(KillReason::Protocol)), Err(e))
            }
            other => {
                let e = Error::Protocol(format!("stream {id}: unexpected {other:?}"));
                conn.mark_broken(e.duplicate());
                (Some(Return::Kill(KillReason::Protocol)), Err(e))
            }
        };
        let result = result.map_err(|e| e.in_call(&self.command, self.p.timeout, self.p.timeout));
        self.record(lease, how, &result, KillReason::CallTimeout);
        match result {
            Ok(_) => None,
            Err(e) => Some(Err(e)),
        }
    }

    /// Records the stream's one outcome and gives its lease back with `how`, or (`None`)
    /// follows up on its call, which still runs, with `reason`.
    fn record(
        &self,
        lease: Lease<Arc<Conn>>,
        how: Option<Return>,
        result: &Result<Payload>,
        reason: KillReason,
    ) {
        let shared = self.calls.shared();
        let queue_wait = self.started.saturating_duration_since(self.p.enqueued);
        let execution = self.started.elapsed();
        let conn = lease.conn.clone();
        let mut fx = Effects::default();
        match how {
            Some(how) => {
                shared.board.lock().give_back(lease, how, Some((result, queue_wait, execution)), &mut fx)
            }
            None => {
                shared.board.lock().record_call(lease.worker, result, queue_wait, execution);
                self.calls.follow_up(lease, self.p.id, reason);
            }
        }
        shared.apply(fx);
        conn.flush_posted();
        if shared.emitter.enabled() {
            shared.emitter.emit(Event::CallCompleted {
                pool: self.calls.config().name.clone(),
                command: self.command.clone(),
                queue_wait,
                execution,
                ok: result.is_ok(),
                session: None,
            });
        }
    }
}

impl Stream {
    /// The next chunk deserialised into `T`, or the stream's error; `None` at its end. Like
    /// [`Pool::call_as`](crate::Pool::call_as), this takes the bytes and arrays in a chunk
    /// without their inline (base64) form.
    pub fn next_as<T: DeserializeOwned>(&mut self) -> Option<Result<T>> {
        self.next_payload().map(|chunk| chunk.and_then(Payload::deserialize))
    }

    fn next_payload(&mut self) -> Option<Result<Payload>> {
        let conn = self.lease.as_ref()?.conn.clone();
        let id = self.p.id;
        if Instant::now() >= self.p.deadline {
            // Chunks may be waiting, but the whole stream's time is up.
            let timed_out = Exchange::TimedOut { running: true, corrupt: false, stack: None };
            return self.end(timed_out, TimeoutKind::Call);
        }
        // The chunks handed out so far were taken: grant them back, half a window at a time.
        if self.taken >= (self.window / 2).max(1) && conn.credit(id, self.taken, self.p.deadline) {
            self.taken = 0;
        }
        let now = Instant::now();
        let (until, timed) = match self.chunk_timeout.and_then(|t| now.checked_add(t)) {
            Some(at) if at < self.p.deadline => (at, TimeoutKind::Chunk),
            _ => (self.p.deadline, TimeoutKind::Call),
        };
        match conn.stream_next(id, self.rx.as_ref(), until, self.p.progress.as_ref()) {
            Exchange::Chunk(value) => {
                self.taken += 1;
                Some(Ok(value))
            }
            other => self.end(other, timed),
        }
    }
}

impl Iterator for Stream {
    type Item = Result<Value>;

    /// The next chunk (its bytes and arrays in their inline form; see [`Stream::next_as`]).
    fn next(&mut self) -> Option<Result<Value>> {
        self.next_payload().map(|chunk| chunk.map(Payload::into_value))
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let Some(lease) = self.lease.take() else { return };
        let id = self.p.id;
        let conn = lease.conn.clone();
        if conn.threaded() && !conn.stream_abandon(id) {
            // It ended just now: its end is waiting here.
            self.lease = Some(lease);
            let end = self.take_end();
            let _ = self.end(end, TimeoutKind::Call);
            return;
        }
        log::debug!(
            "[{}] stream {id} `{}` dropped before its end: cancelled",
            self.calls.config().name,
            self.command
        );
        self.record(lease, None, &Err(Error::Cancelled), KillReason::Cancel);
    }
}
