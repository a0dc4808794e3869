//! Typed events about a pool's workers and calls, and the thread that hands them to the user's
//! callback, off the dispatcher's hot path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, Sender, TrySendError};
use parking_lot::RwLock;
use serde::Serialize;

use crate::cancel::CancelStep;
use crate::error::ExitKind;
use crate::policy::RecycleReason;

/// How many events may wait for a slow callback before new ones are dropped (and counted).
const BACKLOG: usize = 4096;

/// Something that happened in a pool. Every event names its pool.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Event {
    /// A worker sent `ready`.
    WorkerStarted {
        /// The pool.
        pool: String,
        /// The worker's number within the pool.
        worker: u64,
        /// Its process id.
        pid: u32,
        /// From spawn to `ready`.
        startup: Duration,
    },
    /// A worker failed to start (import error, early exit, no `ready` in time).
    WorkerStartFailed {
        /// The pool.
        pool: String,
        /// What went wrong.
        error: String,
        /// Start-up failures in a row, this one included.
        attempt: u32,
        /// How long until the next start is tried.
        retry_in: Duration,
    },
    /// A worker was recycled: drained and stopped after its replacement was ready (or killed,
    /// for `HealthCheck` and the hard memory ceiling).
    WorkerRecycled {
        /// The pool.
        pool: String,
        /// The worker recycled.
        worker: u64,
        /// Its process id.
        pid: u32,
        /// Why.
        reason: RecycleReason,
        /// Its age.
        age: Duration,
        /// Calls it served.
        calls_served: u64,
        /// Its process tree's resident memory, if read.
        rss_bytes: Option<u64>,
    },
    /// A worker died without being asked to stop.
    WorkerDied {
        /// The pool.
        pool: String,
        /// The worker.
        worker: u64,
        /// Its process id.
        pid: u32,
        /// How it ended.
        exit: ExitKind,
        /// Calls that failed with it.
        calls_lost: usize,
    },
    /// A worker that replaces one that died (or was killed) is ready.
    WorkerRestarted {
        /// The pool.
        pool: String,
        /// The new worker.
        worker: u64,
        /// Its process id.
        pid: u32,
    },
    /// A call that reached a worker finished, well or not.
    CallCompleted {
        /// The pool.
        pool: String,
        /// The command.
        command: String,
        /// Time from the call to a worker taking it.
        queue_wait: Duration,
        /// Time on the worker.
        execution: Duration,
        /// Whether it returned `Ok`.
        ok: bool,
        /// The session it ran in, if any.
        session: Option<u64>,
    },
    /// A step of cancelling a call that runs (see
    /// [`PoolBuilder::cancel_grace`](crate::PoolBuilder::cancel_grace)): explicitly, or because
    /// its deadline passed or its stream was dropped.
    CallCancel {
        /// The pool.
        pool: String,
        /// The worker running the call.
        worker: u64,
        /// The call's id (as in log lines).
        call: u64,
        /// The step taken.
        step: CancelStep,
    },
    /// A session was opened.
    SessionStarted {
        /// The pool.
        pool: String,
        /// The session's id.
        session: u64,
        /// The worker it is bound to (`None` if none was ready; it binds at its first call).
        worker: Option<u64>,
        /// How its calls find its worker.
        affinity: crate::session::Affinity,
    },
    /// A session ended: closed by its owner, or idle past its time-out. The workers that ran
    /// its calls are told to free its state.
    SessionEnded {
        /// The pool.
        pool: String,
        /// The session's id.
        session: u64,
        /// Why.
        reason: crate::session::SessionEnd,
        /// Calls made through it.
        calls: u64,
    },
    /// A session's worker was lost. A strict session fails from now on (`moved` false); a
    /// prefer session moved to another worker, with fresh state there (`moved` true).
    SessionLost {
        /// The pool.
        pool: String,
        /// The session's id.
        session: u64,
        /// The worker it lost.
        worker: u64,
        /// Why the worker was lost.
        reason: crate::session::Loss,
        /// Whether the session moved to another worker.
        moved: bool,
    },
    /// A call was refused because the queue was full.
    QueueFull {
        /// The pool.
        pool: String,
        /// The pool's `max_queue`.
        max_queue: usize,
    },
    /// Workers keep failing to start and none is ready: calls fail fast.
    PoolDegraded {
        /// The pool.
        pool: String,
        /// The last start-up error.
        last_error: String,
    },
    /// A worker started again after the pool was degraded.
    PoolRecovered {
        /// The pool.
        pool: String,
    },
}

/// The user's callback, shared with the event thread.
#[derive(Clone)]
pub(crate) struct EventHandler(Arc<dyn Fn(&Event) + Send + Sync>);

impl EventHandler {
    pub(crate) fn new(f: impl Fn(&Event) + Send + Sync + 'static) -> Self {
        EventHandler(Arc::new(f))
    }
}

impl std::fmt::Debug for EventHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventHandler")
    }
}

/// The pool's end: a bounded channel to the event thread, or nothing when no callback is set
/// (then events are not even built). Shared by the dispatcher and the callers, who emit
/// `CallCompleted` themselves.
#[derive(Default)]
pub(crate) struct Emitter {
    tx: RwLock<Option<Sender<Event>>>,
    enabled: bool,
    dropped: AtomicU64,
}

impl Emitter {
    /// Starts the event thread for `handler`, if there is one.
    pub(crate) fn start(
        pool: &str,
        handler: Option<EventHandler>,
    ) -> std::io::Result<(Emitter, Option<JoinHandle<()>>)> {
        let Some(handler) = handler else { return Ok((Emitter::default(), None)) };
        let (tx, rx) = bounded::<Event>(BACKLOG);
        let pool = pool.to_string();
        let handle =
            std::thread::Builder::new().name(crate::worker::thread_name("evt", &pool)).spawn(move || {
                for event in rx.iter() {
                    let call = std::panic::AssertUnwindSafe(|| (handler.0)(&event));
                    if std::panic::catch_unwind(call).is_err() {
                        log::error!("[{pool}] the on_event callback panicked on {event:?}");
                    }
                }
            })?;
        Ok((Emitter { tx: RwLock::new(Some(tx)), enabled: true, dropped: AtomicU64::new(0) }, Some(handle)))
    }

    /// Whether anyone listens (so the caller can skip building an event).
    pub(crate) fn enabled(&self) -> bool {
        self.enabled
    }

    /// Hands an event to the event thread without ever blocking.
    pub(crate) fn emit(&self, event: Event) {
        if let Some(tx) = &*self.tx.read() {
            if let Err(TrySendError::Full(_)) = tx.try_send(event) {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Events dropped because the callback fell behind.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Closes the channel: the event thread delivers what is left and ends.
    pub(crate) fn close(&self) {
        *self.tx.write() = None;
    }
}
