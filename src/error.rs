//! The one error type of the crate, and the Python exception as data.

use std::fmt;
use std::io;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong, as something a caller can act on.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// A setting is invalid; `setting` names it.
    Config {
        /// The builder setting (or configuration key) at fault.
        setting: String,
        /// What is wrong with it.
        message: String,
    },
    /// No Python interpreter could be found or run.
    PythonNotFound {
        /// Every place that was tried, in order, with why it failed.
        searched: Vec<String>,
    },
    /// A worker process could not be started by the operating system.
    Spawn {
        /// The program that was started.
        program: String,
        /// The operating system's error.
        source: io::Error,
    },
    /// A worker started but failed before it was ready (for example, the adapter failed to
    /// import). `error` carries the Python exception when the worker could report one.
    Startup {
        /// What went wrong, in one line.
        message: String,
        /// The Python exception that caused it, if the worker sent one.
        error: Option<RemoteError>,
    },
    /// The worker or the host broke the wire protocol.
    Protocol(String),
    /// A frame is larger than the pool's `max_frame_size`.
    FrameTooLarge {
        /// The size of the frame in bytes.
        size: usize,
        /// The limit in bytes.
        max: usize,
    },
    /// A deadline passed.
    #[non_exhaustive]
    Timeout {
        /// Which deadline.
        kind: TimeoutKind,
        /// The command, for a call's time-out.
        command: Option<String>,
        /// The deadline that passed (the call's timeout, or its queue timeout), for a call.
        after: Option<Duration>,
        /// For a call that was running: the Python stack of every thread of its worker, taken
        /// shortly before the deadline (`faulthandler`'s text; local workers only).
        stack: Option<String>,
    },
    /// The Python command raised an exception.
    Python(RemoteError),
    /// The worker process running the call died.
    #[non_exhaustive]
    WorkerDied {
        /// The worker's process id.
        pid: u32,
        /// How it ended.
        exit: ExitKind,
        /// The last lines the worker wrote to stderr.
        stderr: Vec<String>,
        /// True when this call did nothing wrong: the worker was killed because another call
        /// it was running at the same time (thread profile) overran its deadline.
        collateral: bool,
        /// Why the pool itself killed the worker, if it did (so a `Signal(9)` here is not
        /// mistaken for the kernel's OOM killer); `None` when it died on its own.
        killed_by: Option<KilledBy>,
    },
    /// The pool's queue is full; the call was not queued.
    QueueFull {
        /// The pool's `max_queue`.
        max_queue: usize,
    },
    /// The pool cannot start workers and has none ready; the call failed fast.
    Degraded {
        /// The last start-up failure.
        last_error: String,
    },
    /// The pool is shutting down or shut down; the call was not run.
    ShuttingDown,
    /// The command is not one the workers' adapter provides.
    UnknownCommand {
        /// The command that was asked for.
        command: String,
        /// The commands the workers provide.
        known: Vec<String>,
    },
    /// The call's arguments are not a JSON object, array or null, or hold more bytes and array
    /// values than one frame carries.
    InvalidArgs(String),
    /// An [`Array`](crate::Array) is not what was asked of it: its elements asked for as
    /// another type, or a shape that does not match its data. (Inside `call_as`, the same
    /// problems of a received value are `Json` errors, as serde reports them.)
    Binary(String),
    /// A configuration file has problems; each names its place, e.g.
    /// `pools[1].max_requests: expected a positive integer, found -3`.
    ConfigFile {
        /// Every problem found, in file order.
        problems: Vec<String>,
    },
    /// A pool set has no pool of this name.
    UnknownPool {
        /// The name asked for.
        name: String,
        /// The names that exist.
        known: Vec<String>,
    },
    /// No ready worker has this id (it may have been recycled or died).
    UnknownWorker {
        /// The id asked for.
        worker: u64,
    },
    /// A strict session's worker was lost (it died, the pool killed it, or it was recycled
    /// and the session outlived `session_drain`): its Python state is gone, and every call of
    /// the session fails with this. Open a new session.
    SessionLost {
        /// The session.
        session: u64,
        /// The worker it was bound to.
        worker: u64,
        /// Why the worker was lost.
        reason: crate::session::Loss,
    },
    /// A strict fail-fast session's worker had no room for the call.
    SessionBusy {
        /// The session.
        session: u64,
        /// Its worker.
        worker: u64,
    },
    /// The session has ended (closed, or idle past its time-out).
    SessionClosed {
        /// The session.
        session: u64,
        /// Why it ended.
        reason: crate::session::SessionEnd,
    },
    /// The call was cancelled ([`PendingCall::cancel`](crate::PendingCall::cancel)): before it
    /// reached a worker (it never ran), or while it ran (the command stopped, or was stopped).
    /// Also what a command that raises `snakepit.Cancelled` itself returns.
    Cancelled,
    /// The pool already has `max_sessions` sessions open.
    TooManySessions {
        /// The pool's `max_sessions`.
        max_sessions: usize,
    },
    /// An I/O error outside a worker (for example, writing the embedded package).
    Io(io::Error),
    /// Arguments could not be serialised or a result could not be deserialised.
    Json(serde_json::Error),
}

/// Which deadline passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub enum TimeoutKind {
    /// The call waited in the queue until its queue deadline (or its whole deadline) passed.
    Queue,
    /// The call was running on a worker when its deadline passed; the worker was killed.
    Call,
    /// A worker did not send `ready` within `startup_timeout`.
    Startup,
    /// A stream sent no chunk within its `chunk_timeout`.
    Chunk,
    /// The pool's shutdown grace period ended before the call finished.
    Shutdown,
}

/// Why the pool killed a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum KilledBy {
    /// A call on it overran its deadline (in the thread profile with `kill_on_timeout`, the
    /// other calls it ran fail as collateral).
    CallTimeout,
    /// Its process tree's memory passed `max_memory_hard`.
    MemoryLimit,
    /// It did not answer a health check within `health_timeout`.
    HealthCheck,
    /// It broke the wire protocol.
    Protocol,
    /// Thread profile: every call slot was held by a call that timed out; it was replaced,
    /// then killed.
    Wedged,
    /// It failed to start, or the pool stopped while it started.
    Startup,
    /// A call on it was cancelled (or its stream dropped) and went on through every step of
    /// the cancel (`cancel_grace`).
    Cancel,
    /// The shutdown grace period ended while it ran calls.
    Shutdown,
}

impl fmt::Display for KilledBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KilledBy::CallTimeout => "a call overran its deadline",
            KilledBy::MemoryLimit => "its memory passed max_memory_hard",
            KilledBy::HealthCheck => "it did not answer a health check",
            KilledBy::Protocol => "it broke the protocol",
            KilledBy::Wedged => "every call slot was held by a timed-out call",
            KilledBy::Startup => "it failed to start",
            KilledBy::Cancel => "a cancelled call did not stop",
            KilledBy::Shutdown => "the shutdown grace period ended",
        })
    }
}

/// How a worker process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ExitKind {
    /// It exited with this code.
    Code(i32),
    /// It was killed by this signal.
    Signal(i32),
    /// Its status could not be read.
    Unknown,
}

/// A Python exception, as data: its type, message and formatted traceback.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RemoteError {
    /// The exception's type, e.g. `ValueError` or `mymodule.MyError`.
    #[serde(rename = "type")]
    pub error_type: String,
    /// `str(exception)`.
    pub message: String,
    /// The formatted traceback, empty if there is none.
    #[serde(default)]
    pub traceback: String,
    /// The command that raised it (set by the pool; not part of the wire format).
    #[serde(skip)]
    pub command: Option<String>,
}

impl fmt::Display for TimeoutKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TimeoutKind::Queue => "waiting in the queue",
            TimeoutKind::Call => "running the call",
            TimeoutKind::Startup => "starting a worker",
            TimeoutKind::Shutdown => "shutting down",
            TimeoutKind::Chunk => "waiting for the next chunk",
        })
    }
}

impl fmt::Display for ExitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitKind::Code(c) => write!(f, "exit code {c}"),
            ExitKind::Signal(s) => write!(f, "signal {s}"),
            ExitKind::Unknown => f.write_str("unknown status"),
        }
    }
}

impl fmt::Display for RemoteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.error_type, self.message)
    }
}

impl std::error::Error for RemoteError {}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config { setting, message } => {
                write!(f, "invalid setting `{setting}`: {message}")
            }
            Error::PythonNotFound { searched } => {
                write!(f, "python interpreter not found: tried {}", searched.join("; "))
            }
            Error::Spawn { program, source } => write!(f, "spawning `{program}`: {source}"),
            Error::Startup { message, error } => match error {
                Some(e) if !e.traceback.is_empty() => {
                    write!(f, "worker start-up: {message}\n{}", e.traceback)
                }
                _ => write!(f, "worker start-up: {message}"),
            },
            Error::Protocol(m) => write!(f, "protocol violation: {m}"),
            Error::FrameTooLarge { size, max } => {
                write!(f, "frame too large: {size} bytes exceeds max_frame_size {max}")
            }
            Error::Timeout { kind, command, after, stack } => {
                write!(f, "timed out: {kind}")?;
                match (command, after) {
                    (Some(c), Some(a)) => write!(f, " (`{c}`, deadline {a:?})")?,
                    (Some(c), None) => write!(f, " (`{c}`)")?,
                    _ => {}
                }
                match stack {
                    Some(stack) => write!(f, "; where Python was:\n{stack}"),
                    None => Ok(()),
                }
            }
            Error::Python(e) => match &e.command {
                Some(c) => write!(f, "python exception in `{c}`: {e}"),
                None => write!(f, "python exception: {e}"),
            },
            Error::WorkerDied { pid, exit, stderr, collateral, killed_by } => {
                write!(f, "worker died: pid {pid}, {exit}")?;
                if *collateral {
                    f.write_str(", killed for another call's time-out")?;
                } else if let Some(why) = killed_by {
                    write!(f, ", killed by the pool: {why}")?;
                }
                if let Some(last) = stderr.last() {
                    write!(f, " (last stderr line: {last})")?;
                }
                Ok(())
            }
            Error::QueueFull { max_queue } => {
                write!(f, "queue full: {max_queue} calls already waiting")
            }
            Error::Degraded { last_error } => {
                write!(f, "pool degraded: no worker can start: {last_error}")
            }
            Error::ShuttingDown => f.write_str("pool shutting down"),
            Error::UnknownCommand { command, known } => {
                write!(f, "unknown command `{command}`: known commands are {}", known.join(", "))
            }
            Error::InvalidArgs(m) => write!(f, "invalid arguments: {m}"),
            Error::Binary(m) => write!(f, "binary value: {m}"),
            Error::ConfigFile { problems } => {
                let n = problems.len();
                write!(f, "invalid configuration ({n} problem{}):", if n == 1 { "" } else { "s" })?;
                for p in problems {
                    write!(f, "\n  {p}")?;
                }
                Ok(())
            }
            Error::UnknownPool { name, known } => {
                write!(f, "unknown pool `{name}`: the pools are {}", known.join(", "))
            }
            Error::UnknownWorker { worker } => write!(f, "unknown worker: no ready worker {worker}"),
            Error::SessionLost { session, worker, reason } => {
                write!(f, "session {session} lost on worker {worker}: {reason}; its state is gone")
            }
            Error::SessionBusy { session, worker } => {
                write!(f, "session {session} busy: its worker {worker} has no room now")
            }
            Error::SessionClosed { session, reason } => write!(f, "session {session} has ended: {reason}"),
            Error::TooManySessions { max_sessions } => {
                write!(f, "too many sessions: the pool's max_sessions ({max_sessions}) are open")
            }
            Error::Cancelled => f.write_str("cancelled"),
            Error::Io(e) => write!(f, "i/o: {e}"),
            Error::Json(e) => write!(f, "json: {e}"),
        }
    }
}

/// Every message says all it knows in its `Display` (what a program prints), so `source()` is
/// `None`: returning the inner error too would print its text twice in an error chain
/// (`anyhow`'s `{:#}`, `eyre`). The inner errors stay reachable through the variants' fields.
impl std::error::Error for Error {}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::Json(e)
    }
}

impl Error {
    /// A time-out of `kind`, before the call it belongs to is known.
    pub(crate) fn timeout(kind: TimeoutKind) -> Self {
        Error::Timeout { kind, command: None, after: None, stack: None }
    }

    /// A running call's time-out, with its worker's stacks if they were taken.
    pub(crate) fn call_timeout(stack: Option<String>) -> Self {
        Error::Timeout { kind: TimeoutKind::Call, command: None, after: None, stack }
    }

    /// Which deadline passed, if this is a time-out.
    pub fn timeout_kind(&self) -> Option<TimeoutKind> {
        match self {
            Error::Timeout { kind, .. } => Some(*kind),
            _ => None,
        }
    }

    /// Names the call an error belongs to: the command in time-outs and Python exceptions, and
    /// the deadline that passed (`timeout`, or `queue_timeout` for a time-out in the queue).
    pub(crate) fn in_call(self, name: &str, timeout: Duration, queue_timeout: Duration) -> Self {
        match self {
            Error::Timeout { kind, command: None, stack, .. } if kind != TimeoutKind::Startup => {
                let after = if kind == TimeoutKind::Queue { queue_timeout } else { timeout };
                Error::Timeout { kind, command: Some(name.to_string()), after: Some(after), stack }
            }
            Error::Python(mut e) => {
                e.command.get_or_insert_with(|| name.to_string());
                Error::Python(e)
            }
            other => other,
        }
    }

    /// Shorthand for [`Error::Config`].
    pub(crate) fn config(setting: &str, message: impl Into<String>) -> Self {
        Error::Config { setting: setting.to_string(), message: message.into() }
    }

    /// A copy for fanning one failure out to several callers. `io::Error` and
    /// `serde_json::Error` are not `Clone`; their copies keep kind and message.
    pub(crate) fn duplicate(&self) -> Error {
        match self {
            Error::Config { setting, message } => {
                Error::Config { setting: setting.clone(), message: message.clone() }
            }
            Error::PythonNotFound { searched } => Error::PythonNotFound { searched: searched.clone() },
            Error::Spawn { program, source } => Error::Spawn {
                program: program.clone(),
                source: io::Error::new(source.kind(), source.to_string()),
            },
            Error::Startup { message, error } => {
                Error::Startup { message: message.clone(), error: error.clone() }
            }
            Error::Protocol(m) => Error::Protocol(m.clone()),
            Error::FrameTooLarge { size, max } => Error::FrameTooLarge { size: *size, max: *max },
            Error::Timeout { kind, command, after, stack } => {
                Error::Timeout { kind: *kind, command: command.clone(), after: *after, stack: stack.clone() }
            }
            Error::Python(e) => Error::Python(e.clone()),
            Error::WorkerDied { pid, exit, stderr, collateral, killed_by } => Error::WorkerDied {
                pid: *pid,
                exit: *exit,
                stderr: stderr.clone(),
                collateral: *collateral,
                killed_by: *killed_by,
            },
            Error::QueueFull { max_queue } => Error::QueueFull { max_queue: *max_queue },
            Error::Degraded { last_error } => Error::Degraded { last_error: last_error.clone() },
            Error::ShuttingDown => Error::ShuttingDown,
            Error::UnknownCommand { command, known } => {
                Error::UnknownCommand { command: command.clone(), known: known.clone() }
            }
            Error::InvalidArgs(m) => Error::InvalidArgs(m.clone()),
            Error::Binary(m) => Error::Binary(m.clone()),
            Error::UnknownWorker { worker } => Error::UnknownWorker { worker: *worker },
            Error::SessionLost { session, worker, reason } => {
                Error::SessionLost { session: *session, worker: *worker, reason: *reason }
            }
            Error::SessionBusy { session, worker } => {
                Error::SessionBusy { session: *session, worker: *worker }
            }
            Error::SessionClosed { session, reason } => {
                Error::SessionClosed { session: *session, reason: *reason }
            }
            Error::TooManySessions { max_sessions } => Error::TooManySessions { max_sessions: *max_sessions },
            Error::Cancelled => Error::Cancelled,
            Error::ConfigFile { problems } => Error::ConfigFile { problems: problems.clone() },
            Error::UnknownPool { name, known } => {
                Error::UnknownPool { name: name.clone(), known: known.clone() }
            }
            Error::Io(e) => Error::Io(io::Error::new(e.kind(), e.to_string())),
            Error::Json(e) => Error::Io(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_context_then_detail() {
        let e = Error::WorkerDied {
            pid: 42,
            exit: ExitKind::Signal(9),
            stderr: vec!["boom".into()],
            collateral: false,
            killed_by: None,
        };
        assert_eq!(e.to_string(), "worker died: pid 42, signal 9 (last stderr line: boom)");
        let e = Error::WorkerDied {
            pid: 42,
            exit: ExitKind::Signal(9),
            stderr: vec![],
            collateral: false,
            killed_by: Some(KilledBy::MemoryLimit),
        };
        assert_eq!(
            e.to_string(),
            "worker died: pid 42, signal 9, killed by the pool: its memory passed max_memory_hard"
        );
        assert_eq!(Error::timeout(TimeoutKind::Queue).to_string(), "timed out: waiting in the queue");
        let call =
            Error::timeout(TimeoutKind::Call).in_call("embed", Duration::from_millis(50), Duration::ZERO);
        assert_eq!(call.to_string(), "timed out: running the call (`embed`, deadline 50ms)");
        assert_eq!(call.timeout_kind(), Some(TimeoutKind::Call));
        let queued = Error::timeout(TimeoutKind::Queue).in_call(
            "embed",
            Duration::from_secs(1),
            Duration::from_millis(5),
        );
        assert_eq!(queued.to_string(), "timed out: waiting in the queue (`embed`, deadline 5ms)");
        let remote = RemoteError {
            error_type: "ValueError".into(),
            message: "bad".into(),
            traceback: String::new(),
            command: None,
        };
        let e = Error::Python(remote).in_call("fit", Duration::ZERO, Duration::ZERO);
        assert_eq!(e.to_string(), "python exception in `fit`: ValueError: bad");
        let e = Error::config("size", "must be at least 1");
        assert_eq!(e.to_string(), "invalid setting `size`: must be at least 1");
    }

    /// The messages of an error chain, as `anyhow`'s `{:#}` prints them.
    fn chain(e: &(dyn std::error::Error + 'static)) -> Vec<String> {
        let mut out = vec![e.to_string()];
        let mut next = e.source();
        while let Some(s) = next {
            out.push(s.to_string());
            next = s.source();
        }
        out
    }

    #[test]
    fn an_error_chain_says_each_thing_once() {
        let remote = RemoteError {
            error_type: "ValueError".into(),
            message: "bad".into(),
            traceback: String::new(),
            command: None,
        };
        let e = Error::Python(remote.clone());
        assert_eq!(chain(&e), ["python exception: ValueError: bad"]);
        assert!(matches!(e.duplicate(), Error::Python(r) if r == remote));
        let io = Error::Io(io::Error::new(io::ErrorKind::NotFound, "no cache folder"));
        assert_eq!(chain(&io), ["i/o: no cache folder"]);
        let spawn =
            Error::Spawn { program: "python3".into(), source: io::Error::from(io::ErrorKind::NotFound) };
        assert_eq!(chain(&spawn).len(), 1);
        assert!(chain(&spawn)[0].starts_with("spawning `python3`: "), "{:?}", chain(&spawn));
    }
}
