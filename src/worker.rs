//! One Python worker process: spawning it, the connection ([`Conn`]) that a call's owner uses to
//! exchange frames with it, and its one monitor thread.
//!
//! Who touches what:
//!
//! - **The call's owner** (the calling thread, holding a lease on the worker) writes the call's
//!   frame and, in the process profile, reads the reply itself, with the call's deadline, by
//!   polling the worker's stdout and its process file descriptor together. Nothing else reads a
//!   process worker's stdout once it is ready.
//! - **The monitor thread** (`sp-w<id>-<pool>`) reads the `ready` frame, forwards stderr lines to
//!   `log`, and sees the process exit through its pidfd (never through EOF, which a descendant
//!   holding the pipe would delay). In the thread profile it also reads every reply and hands
//!   it to the call waiting for it. When the process exits it reaps it, records how it ended,
//!   and tells the dispatcher.
//! - **The dispatcher** signals the worker's process group and asks it to stop.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};
use parking_lot::Mutex;
use serde_json::Value;

use crate::binary::Payload;
use crate::cancel::{CancelFile, CancelStep, CancelToken, Ladder, Step};
use crate::error::{Error, ExitKind, Result, TimeoutKind};
use crate::mailbox::{mailbox, Address, Mailbox, Missed};
use crate::protocol::{self, Frame, FrameBuf, Msg, Progress, RawFrame};
use crate::stream::ProgressSink;
use crate::sys;

/// A worker's number within its pool (not its pid).
pub(crate) type WorkerId = u64;

/// The worker's entry point. `-c` puts the current directory first on `sys.path`; it is
/// removed before anything is imported.
const BOOTSTRAP: &str =
    "import sys; sys.path.pop(0); from snakepit.worker import main; sys.exit(main(sys.argv[1:]))";

/// What the keeper takes as "kill the worker and everything below it now" (see
/// `python/snakepit/_keeper.py`, `KILL_SIGNAL`).
const KEEPER_KILL: i32 = sys::SIGUSR1;

/// The most a write to a pipe takes all or nothing.
const PIPE_BUF: usize = 4096;

/// The signal on which a worker writes its Python stacks (`faulthandler.register`).
const STACK_SIGNAL: i32 = sys::SIGUSR2;
/// The longest a caller waits for a worker's stacks.
const STACK_WAIT: Duration = Duration::from_millis(200);

/// The file a worker writes its stacks to: created by the pool, opened by the worker by name,
/// then unlinked (at `ready`, or at exit) so that only the two open descriptors remain.
struct StackFile {
    file: Mutex<File>,
    path: Mutex<Option<PathBuf>>,
    /// The worker said it handles [`STACK_SIGNAL`] (whose default action ends a process).
    ready: AtomicBool,
    /// The last stacks taken, and when they were asked for: calls that time out together share
    /// one dump.
    last: Mutex<Option<(Instant, String)>>,
}

/// A new, empty file under the temporary folder, unique to this process, for a worker to
/// share with the pool (`kind` ends its name).
pub(crate) fn temp_file(kind: &str) -> io::Result<(File, PathBuf)> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("snakepit-{}-{n}.{kind}", std::process::id()));
    let file = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path)?;
    Ok((file, path))
}

impl StackFile {
    /// A new, empty file under the temporary folder, unique to this process.
    fn create() -> io::Result<StackFile> {
        let (file, path) = temp_file("stack")?;
        Ok(StackFile {
            file: Mutex::new(file),
            path: Mutex::new(Some(path)),
            ready: AtomicBool::new(false),
            last: Mutex::new(None),
        })
    }

    fn path(&self) -> Option<PathBuf> {
        self.path.lock().clone()
    }

    fn unlink(&self) {
        if let Some(path) = self.path.lock().take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Drop for StackFile {
    fn drop(&mut self) {
        self.unlink();
    }
}

/// How many lines of a worker's stderr are kept for error reports.
const STDERR_LINES: usize = 20;
/// The longest stderr line kept; the rest of a longer line is dropped as it arrives, so a
/// worker that writes without newlines cannot grow the host's memory.
const STDERR_LINE_MAX: usize = 2000;
/// How long the monitor waits for the last stderr lines after the process exited.
const STDERR_DRAIN: Duration = Duration::from_millis(100);
/// How long the end of a worker's output may come before its exit does (they are not
/// reported together); past that, a worker that closed its output and lives on is broken.
const EXIT_AFTER_EOF: Duration = Duration::from_millis(500);
/// How long a caller that saw its worker die waits for the monitor to record how it ended.
const EXIT_REPORT_WAIT: Duration = Duration::from_secs(1);

/// What the monitor threads tell the dispatcher.
#[derive(Debug)]
pub(crate) enum WorkerEvent {
    /// `ready`, `startup_error`, or (never in practice) another well-formed frame.
    Frame(WorkerId, Msg),
    /// The worker broke the protocol; the monitor stopped reading. The dispatcher kills it.
    Broken(WorkerId, Error),
    /// The process exited and was reaped. Always the last event of a worker.
    Exited(WorkerId, ExitKind),
}

/// Why the pool killed a worker: recorded before the signal, so that the calls it was running
/// are answered with the right error.
pub(crate) use crate::error::KilledBy as KillReason;

/// What a call's owner watches while it waits for the reply, besides the reply and the
/// deadline: when to take its worker's Python stacks (each at most once, and only while the
/// call still runs: `slow` for the slow-call log, logged while the call goes on; `last`
/// shortly before the deadline, for the time-out's error), a handle's cancel and the steps of
/// a cancel under way, and where progress reports go.
#[derive(Default)]
pub(crate) struct Looks<'a> {
    pub(crate) slow: Option<Instant>,
    pub(crate) last: Option<Instant>,
    /// What to do with the stacks taken at `slow`.
    pub(crate) on_slow: Option<&'a dyn Fn(&str)>,
    /// The stacks taken at `last`.
    pub(crate) stack: Option<String>,
    /// A handle's cancel request.
    pub(crate) cancel: Option<&'a CancelToken>,
    /// The time between a cancel's steps.
    pub(crate) grace: Duration,
    /// A cancel under way.
    pub(crate) ladder: Option<Ladder>,
    /// Whether a cancel that is not heeded takes the stacks before giving up (a caller waits
    /// to be told where Python was).
    pub(crate) stack_on_give_up: bool,
    /// Where the call's progress reports go.
    pub(crate) progress: Option<&'a ProgressSink>,
}

impl Looks<'_> {
    /// When to wake next: the earliest look or cancel step still to come before `deadline`,
    /// else `deadline`.
    fn wake(&self, deadline: Instant) -> Instant {
        [self.slow, self.last, self.ladder.map(|l| l.next_at)]
            .into_iter()
            .flatten()
            .filter(|&at| at < deadline)
            .min()
            .unwrap_or(deadline)
    }

    /// Whether a requested cancel has not been acted on yet.
    fn cancel_pending(&self) -> bool {
        self.ladder.is_none() && self.cancel.is_some_and(CancelToken::requested)
    }

    /// Takes the cancel steps that are due for call `id`: `Some` once the command has had
    /// every step's grace and still runs.
    fn steps(&mut self, conn: &Conn, id: u64) -> Option<Exchange> {
        let now = Instant::now();
        if self.cancel_pending() {
            conn.cancel_step(id, 1, now + self.grace);
            self.ladder = Some(Ladder::asked(now, self.grace));
        }
        match self.ladder.as_mut()?.due(now)? {
            Step::Interrupt => {
                conn.cancel_step(id, 2, now + self.grace);
                None
            }
            Step::GiveUp => {
                let stack = if self.stack_on_give_up { conn.capture_stack(now + STACK_WAIT) } else { None };
                Some(Exchange::Unheeded { stack })
            }
        }
    }

    /// Takes the looks that are due.
    fn take_due(&mut self, conn: &Conn, deadline: Instant) {
        let now = Instant::now();
        if self.slow.is_some_and(|at| at <= now) {
            self.slow = None;
            if let (Some(stack), Some(log)) = (conn.capture_stack(deadline), self.on_slow) {
                log(&stack);
            }
        }
        if self.last.is_some_and(|at| at <= now) {
            self.last = None;
            self.stack = conn.capture_stack(deadline);
        }
    }
}

/// How a call's exchange of frames with a worker ended.
#[derive(Debug)]
pub(crate) enum Exchange {
    /// The worker answered: the command's result or its Python exception (or a reply that could
    /// not be decoded, which fails only this call).
    Reply(Result<Payload>),
    /// The frame never reached the worker, so the call can run elsewhere; the worker cannot be
    /// trusted with another. `dead`: it has exited (or is exiting); else it wrote unasked while
    /// idle.
    NotSent { dead: bool },
    /// The deadline passed. `running`: the frame reached the worker, which is still busy with
    /// it. `corrupt`: the deadline passed part-way through writing the frame. `stack`: the
    /// Python stacks of the worker's threads shortly before the deadline, if they were taken.
    TimedOut { running: bool, corrupt: bool, stack: Option<String> },
    /// The worker died (or was killed) before answering.
    Died,
    /// The worker broke the protocol while answering.
    Broken(Error),
    /// A chunk of the stream `id` (streams only).
    Chunk(Payload),
    /// A chunk of the stream `id` that could not be decoded (nested too deep, a number out of
    /// range): the frames are still in step, but the stream cannot go on.
    BadChunk(Error),
    /// The call was cancelled and did not stop through every step of the cancel; it still
    /// runs. `stack`: where Python was, if it was asked for.
    Unheeded { stack: Option<String> },
}

/// What an exchange sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sending {
    /// A call; `sent`: its frame was already written (by [`Conn::send_now`]).
    Call { sent: bool },
    /// A health ping: it holds no call slot.
    Ping,
}

/// How to start a worker; the same for every worker of a pool.
#[derive(Debug, Clone)]
pub(crate) struct SpawnSpec {
    pub(crate) pool: String,
    pub(crate) python: PathBuf,
    pub(crate) adapter: Option<String>,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) python_path: OsString,
    pub(crate) max_frame: usize,
    pub(crate) args: Vec<String>,
    /// A command prefix; empty for none.
    pub(crate) launcher: Vec<String>,
    /// Threads per worker in the thread profile; 0 in the process profile.
    pub(crate) threads: usize,
    pub(crate) allow_unsafe_threads: bool,
    /// The init command and its arguments as JSON text.
    pub(crate) init: Option<(String, String)>,
}

/// Whether a launcher runs its command through a remote shell (`ssh`, by the program's file
/// name): then every argument the pool adds is quoted, and the pool's environment is passed on
/// the command line.
fn is_remote_shell(program: &str) -> bool {
    std::path::Path::new(program).file_name().is_some_and(|n| n == "ssh")
}

/// `arg` quoted for a POSIX shell: in single quotes, each `'` written as `'\''`.
fn shell_quote(arg: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c);
    if !arg.is_empty() && arg.chars().all(safe) {
        return arg.to_string();
    }
    format!("'{}'", arg.replace('\'', "'\\''"))
}

/// The level of a worker's stderr line and its text: a line the worker tagged (a Python log
/// record or warning, see `python/snakepit/_logbridge.py`) keeps its level; any other line
/// (`print`, a C library) is `debug`.
fn log_level(line: &str) -> (log::Level, &str) {
    let tagged = line.strip_prefix("\u{1e}snakepit:").and_then(|rest| rest.split_once('\u{1e}'));
    let Some((name, text)) = tagged else { return (log::Level::Debug, line) };
    let level = match name {
        "CRITICAL" | "ERROR" => log::Level::Error,
        "WARNING" => log::Level::Warn,
        "INFO" => log::Level::Info,
        "DEBUG" => log::Level::Debug,
        _ => log::Level::Trace,
    };
    (level, text)
}

/// The name of a thread of the pool: what differs first, as Linux keeps only 15 bytes.
pub(crate) fn thread_name(kind: &str, pool: &str) -> String {
    format!("sp-{kind}-{pool}").chars().take(15).collect()
}

/// A worker's stdout and the bytes read from it that do not yet make a whole frame.
struct Reader {
    file: File,
    buf: FrameBuf,
}

/// Thread profile: the calls waiting for replies, by id.
#[derive(Default)]
struct Waiting {
    replies: HashMap<u64, Address<Result<Payload>>>,
    /// Streams: their chunks, then their end (as the exchange that ends them).
    streams: HashMap<u64, Sender<Exchange>>,
    /// Where the progress reports of calls waiting here go.
    progress: HashMap<u64, ProgressSink>,
    /// Exchanges whose callers gave up at their deadline, and whether each holds a call slot,
    /// which its late reply frees.
    abandoned: HashMap<u64, bool>,
    /// Set once the worker can answer nothing more (it exited or broke the protocol).
    closed: bool,
}

/// The connection to one worker process, shared by the dispatcher, the monitor thread and the
/// callers holding leases on it.
pub(crate) struct Conn {
    pub(crate) id: WorkerId,
    /// The process we started: the worker's keeper (see `python/snakepit/_keeper.py`), or the
    /// launcher. It leads the process group, and its exit is the worker's.
    pub(crate) pid: u32,
    /// Whether `pid` is the keeper itself (no launcher between us), which kills the worker and
    /// everything below it when sent [`KEEPER_KILL`].
    keeper: bool,
    /// The Python worker's own pid, from its `ready` frame; 0 until then, and under a launcher
    /// (where it may be a pid on another machine).
    worker_pid: AtomicU32,
    /// Where the worker writes its Python stacks when sent [`STACK_SIGNAL`] (Python's
    /// `faulthandler`); none under a launcher.
    stacks: Option<StackFile>,
    /// Process profile: where the pool names the call to cancel (see [`CancelFile`]); none
    /// under a launcher.
    cancels: Option<CancelFile>,
    /// The worker said it raises `Cancelled` on SIGINT when its cancel file asks (only then is
    /// it ever sent one).
    cancel_signal: AtomicBool,
    /// Reports each cancel step taken (to the pool's events).
    on_step: Option<Box<dyn Fn(u64, CancelStep) + Send + Sync>>,
    /// Readable when the thread waiting for a process worker's reply has something else to
    /// look at (a cancel request): an eventfd it polls with the worker's stdout.
    nudge: OwnedFd,
    max_frame: usize,
    /// Our end of its stdin, non-blocking; `None` once closed.
    stdin: Mutex<Option<File>>,
    /// Frames posted to go ahead of the next one written (see [`Conn::post`]); written only
    /// under `stdin`'s lock.
    outbox: Mutex<VecDeque<Vec<u8>>>,
    /// Frames in `outbox`, read without its lock.
    posted: AtomicUsize,
    /// Our end of its stdout, non-blocking.
    stdout: Mutex<Reader>,
    stdout_fd: RawFd,
    /// Readable once the process has exited (a pidfd; a pipe in tests).
    exit_fd: OwnedFd,
    threaded: bool,
    waiting: Mutex<Waiting>,
    /// Set by the monitor once the process has exited.
    exited: AtomicBool,
    /// How it ended, once the monitor has reaped it.
    exit: Mutex<Option<ExitKind>>,
    /// Disconnected once `exit` is recorded: every holder of a clone can wait for that.
    reported: Receiver<()>,
    stderr_tail: Mutex<VecDeque<String>>,
    killed: Mutex<Option<KillReason>>,
    broken: Mutex<Option<Error>>,
    /// Set (under the lock) once the process is reaped; signals are sent under the same lock
    /// only while it is false, so a reused pid is never signalled.
    reaped: Mutex<bool>,
}

impl Conn {
    #[allow(clippy::too_many_arguments)]
    fn new(
        id: WorkerId,
        pid: u32,
        max_frame: usize,
        stdin: File,
        stdout: File,
        exit_fd: OwnedFd,
        nudge: OwnedFd,
        threaded: bool,
        reported: Receiver<()>,
    ) -> Conn {
        Conn {
            id,
            pid,
            keeper: false,
            worker_pid: AtomicU32::new(0),
            stacks: None,
            cancels: None,
            cancel_signal: AtomicBool::new(false),
            on_step: None,
            nudge,
            max_frame,
            stdin: Mutex::new(Some(stdin)),
            outbox: Mutex::new(VecDeque::new()),
            posted: AtomicUsize::new(0),
            stdout_fd: stdout.as_raw_fd(),
            stdout: Mutex::new(Reader { file: stdout, buf: FrameBuf::default() }),
            exit_fd,
            threaded,
            waiting: Mutex::new(Waiting::default()),
            exited: AtomicBool::new(false),
            exit: Mutex::new(None),
            reported,
            stderr_tail: Mutex::new(VecDeque::with_capacity(STDERR_LINES)),
            killed: Mutex::new(None),
            broken: Mutex::new(None),
            reaped: Mutex::new(false),
        }
    }

    /// Runs one exchange: writes `frame` (a call or a ping) and waits for the reply to `id`,
    /// never past `deadline`.
    /// `look`: when to take the worker's Python stacks if the call still runs (see [`Looks`],
    /// [`Conn::capture_stack`]).
    pub(crate) fn exchange(
        &self,
        frame: &Frame,
        id: u64,
        deadline: Instant,
        what: Sending,
        look: Looks<'_>,
    ) -> Exchange {
        if self.threaded {
            self.exchange_threaded(frame, id, deadline, what == Sending::Ping, look)
        } else if what == (Sending::Call { sent: true }) {
            self.read_reply(&mut self.stdout.lock(), id, deadline, &mut { look })
        } else {
            self.exchange_alone(frame, id, deadline, look)
        }
    }

    /// Process profile: writes a call's frame for the caller the worker is being handed to, if
    /// the worker is idle and alive and the pipe takes the whole frame in one write at once.
    /// False if nothing was written (the caller then writes it itself).
    pub(crate) fn send_now(&self, frame: &Frame) -> bool {
        let Some(frame) = frame.plain().filter(|f| !self.threaded && f.len() <= 4096) else { return false };
        let Some(mut out) = self.stdout.try_lock() else { return false };
        if self.fitness(&mut out).is_some() {
            return false;
        }
        let Some(stdin) = self.stdin.try_lock() else { return false };
        let Some(file) = stdin.as_ref() else { return false };
        // A write of at most PIPE_BUF bytes to a non-blocking pipe is all or nothing.
        self.flush_outbox(file) && matches!((&*file).write(frame), Ok(n) if n == frame.len())
    }

    /// `None` if the process is alive and has written nothing since its last reply; else
    /// `Some(dead)`: it has exited or closed its output (`true`), or wrote unasked (`false`).
    fn fitness(&self, out: &mut Reader) -> Option<bool> {
        let mut fds = [
            sys::poll_entry(out.file.as_raw_fd(), sys::POLLIN),
            sys::poll_entry(self.exit_fd.as_raw_fd(), sys::POLLIN),
        ];
        match sys::poll(&mut fds, Some(Instant::now())) {
            Ok(0) if out.buf.is_empty() => None,
            Ok(0) => Some(false),
            Ok(_) if fds[1].revents != 0 => Some(true),
            // Readable: bytes (written unasked), or the end of its output (it is exiting).
            Ok(_) => {
                let Reader { file, buf } = out;
                Some(!matches!((&*file).read(buf.spare()), Ok(n) if n > 0))
            }
            Err(_) => Some(true),
        }
    }

    /// Whether the process exits by `deadline` (or already has).
    fn exits_by(&self, deadline: Instant) -> bool {
        let mut fds = [sys::poll_entry(self.exit_fd.as_raw_fd(), sys::POLLIN)];
        sys::poll(&mut fds, Some(deadline)).is_ok_and(|n| n > 0)
    }

    /// Process profile: the caller holds the only lease, and reads the reply itself.
    fn exchange_alone(&self, frame: &Frame, id: u64, deadline: Instant, look: Looks<'_>) -> Exchange {
        let mut out = self.stdout.lock();
        if let Some(unsent) = self.send_alone(&mut out, frame, deadline) {
            return unsent;
        }
        self.read_reply(&mut out, id, deadline, &mut { look })
    }

    /// Process profile: writes a call's frame to the idle worker whose stdout `out` is;
    /// `Some` with how the exchange ended if it did not start.
    fn send_alone(&self, out: &mut Reader, frame: &Frame, deadline: Instant) -> Option<Exchange> {
        // A worker that died, or wrote something unasked, while idle is noticed here, before
        // the call is written, so it costs the call nothing.
        if let Some(dead) = self.fitness(out) {
            return Some(Exchange::NotSent { dead });
        }
        match self.write(frame, deadline) {
            Written::All => None,
            Written::Nothing => Some(Exchange::NotSent { dead: true }),
            Written::Late { partial } => {
                Some(Exchange::TimedOut { running: true, corrupt: partial, stack: None })
            }
        }
    }

    /// Writes a whole frame (after any posted ones), waiting for room in the pipe until
    /// `deadline`.
    fn write(&self, frame: &Frame, deadline: Instant) -> Written {
        let Some(mut stdin) = self.stdin.try_lock_until(deadline) else {
            return Written::Late { partial: false };
        };
        let Some(file) = stdin.as_ref() else { return Written::Nothing };
        let written = self.write_locked(file, frame, deadline);
        if written == (Written::Late { partial: true }) {
            // Half a frame is in the pipe and nothing may follow it: the worker is done for.
            // Closing our end here, under the lock, makes the callers waiting to write find it
            // gone, so their calls run on another worker instead of being appended to the half
            // frame (a large one takes long to write, so several may be waiting).
            self.mark_killed(KillReason::CallTimeout);
            *stdin = None;
        }
        written
    }

    /// [`Conn::write`] under stdin's lock.
    fn write_locked(&self, file: &File, frame: &Frame, deadline: Instant) -> Written {
        // Posted frames go first, whole: a frame is never cut by another.
        while !self.flush_outbox(file) {
            let Some(posted) = self.outbox.lock().pop_front() else { break };
            self.posted.fetch_sub(1, Ordering::AcqRel);
            match self.write_until(file, [&posted[..]], deadline) {
                Written::All => {}
                // Not written in time, it leaves a part-written frame, like a call's own.
                Written::Late { partial } => return Written::Late { partial },
                Written::Nothing => return Written::Nothing,
            }
        }
        let written = self.write_until(file, frame.parts(), deadline);
        if written == Written::All {
            self.flush_outbox(file); // posted while this frame was written
        }
        written
    }

    /// Posts a frame that needs no reply and fits one atomic pipe write (a session's end):
    /// written now if the pipe is free and takes it, else ahead of (or just after) the next
    /// frame written to this worker, or by [`Conn::flush_posted`]. False if it is still
    /// waiting.
    pub(crate) fn post(&self, frame: &[u8]) -> bool {
        debug_assert!(frame.len() <= PIPE_BUF);
        self.outbox.lock().push_back(frame.to_vec());
        self.posted.fetch_add(1, Ordering::AcqRel);
        self.flush_posted()
    }

    /// Writes what the pipe takes now of the posted frames, unless another thread is writing
    /// to the worker (it writes them); true if none is left.
    pub(crate) fn flush_posted(&self) -> bool {
        if self.posted.load(Ordering::Acquire) == 0 {
            return true;
        }
        match self.stdin.try_lock() {
            Some(stdin) => match stdin.as_ref() {
                Some(file) => self.flush_outbox(file),
                None => true, // closed: nothing will ever read them
            },
            None => false,
        }
    }

    /// Writes the posted frames the pipe takes now, each whole (at most `PIPE_BUF` bytes, so
    /// a non-blocking write takes it all or nothing); true if none is left. Under stdin's lock.
    fn flush_outbox(&self, file: &File) -> bool {
        let mut outbox = self.outbox.lock();
        while let Some(frame) = outbox.front() {
            match (&*file).write(frame) {
                Ok(n) if n == frame.len() => {
                    outbox.pop_front();
                    self.posted.fetch_sub(1, Ordering::AcqRel);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                _ => return false,
            }
        }
        true
    }

    /// Writes the `parts` of a frame, one after another, waiting for room in the pipe until
    /// `deadline`.
    fn write_until<'a>(
        &self,
        file: &File,
        parts: impl IntoIterator<Item = &'a [u8]>,
        deadline: Instant,
    ) -> Written {
        let mut written = 0;
        for part in parts {
            match self.write_part(file, part, deadline, written > 0) {
                Ok(()) => written += part.len(),
                Err(failed) => return failed,
            }
        }
        Written::All
    }

    /// Writes one part of a frame; `started`: earlier parts were written.
    fn write_part(
        &self,
        file: &File,
        part: &[u8],
        deadline: Instant,
        started: bool,
    ) -> std::result::Result<(), Written> {
        let mut done = 0;
        while done < part.len() {
            match (&*file).write(&part[done..]) {
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let mut fds = [
                        sys::poll_entry(file.as_raw_fd(), sys::POLLOUT),
                        sys::poll_entry(self.exit_fd.as_raw_fd(), sys::POLLIN),
                    ];
                    match sys::poll(&mut fds, Some(deadline)) {
                        Ok(0) => return Err(Written::Late { partial: started || done > 0 }),
                        Ok(_) if fds[1].revents != 0 => return Err(Written::Nothing),
                        Ok(_) => {}
                        Err(_) => return Err(Written::Nothing),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // EPIPE: nothing reads the pipe any more; a part-written frame never ran.
                Err(_) => return Err(Written::Nothing),
            }
        }
        Ok(())
    }

    /// Process profile: reads until the reply to `id` (or, for a stream, its next chunk), the
    /// process's exit, or the deadline, taking the looks and cancel steps as they fall due.
    fn read_reply(&self, out: &mut Reader, id: u64, deadline: Instant, look: &mut Looks<'_>) -> Exchange {
        let mut dead = false;
        loop {
            match out.buf.next_frame(self.max_frame) {
                Ok(Some(frame)) => match progress_of(frame.json) {
                    Some((of, progress)) => {
                        if let (true, Some(sink), Some(progress)) = (of == id, look.progress, progress) {
                            sink.call(&progress);
                        }
                        continue;
                    }
                    None => return reply_from(frame, id),
                },
                Ok(None) => {}
                Err(e) => return Exchange::Broken(frame_error(self.id, e)),
            }
            if !dead {
                if let Some(gave_up) = look.steps(self, id) {
                    return gave_up;
                }
                let mut fds = [
                    sys::poll_entry(out.file.as_raw_fd(), sys::POLLIN),
                    sys::poll_entry(self.exit_fd.as_raw_fd(), sys::POLLIN),
                    sys::poll_entry(self.nudge.as_raw_fd(), sys::POLLIN),
                ];
                let wake = look.wake(deadline);
                match sys::poll(&mut fds, Some(wake)) {
                    Ok(0) if wake < deadline => {
                        look.take_due(self, deadline);
                        continue;
                    }
                    Ok(0) => {
                        return Exchange::TimedOut { running: true, corrupt: false, stack: look.stack.take() }
                    }
                    Ok(_) if fds[0].revents == 0 && fds[1].revents == 0 => {
                        sys::eventfd_clear(self.nudge.as_raw_fd()); // a cancel to look at
                        continue;
                    }
                    Ok(_) => dead = fds[0].revents == 0 && fds[1].revents != 0,
                    Err(e) => return Exchange::Broken(Error::Protocol(format!("polling worker: {e}"))),
                }
            }
            let Reader { file, buf } = &mut *out;
            match (&*file).read(buf.spare()) {
                // The end of its output: it is exiting, or it closed its output and lives on,
                // which breaks the protocol (it could never answer again).
                Ok(0) if dead || self.exits_by(deadline.min(Instant::now() + EXIT_AFTER_EOF)) => {
                    return Exchange::Died
                }
                Ok(0) => {
                    let err = Error::Protocol("the worker closed its output but is still running".into());
                    return Exchange::Broken(err);
                }
                Ok(n) => buf.filled(n),
                // The process has exited and nothing more is in the pipe (a descendant may still
                // hold it open, so no EOF comes).
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && dead => return Exchange::Died,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Exchange::Broken(Error::Protocol(format!("worker {} stdout: {e}", self.id)))
                }
            }
        }
    }

    /// Thread profile: many calls at once; the monitor thread reads the replies.
    fn exchange_threaded(
        &self,
        frame: &Frame,
        id: u64,
        deadline: Instant,
        ping: bool,
        mut look: Looks<'_>,
    ) -> Exchange {
        let (tx, rx) = mailbox();
        {
            let mut w = self.waiting.lock();
            if w.closed {
                return Exchange::NotSent { dead: true };
            }
            w.replies.insert(id, tx);
            if let Some(sink) = look.progress {
                w.progress.insert(id, sink.clone());
            }
        }
        let unsent = match self.write(frame, deadline) {
            Written::All => None,
            Written::Nothing => Some(Exchange::NotSent { dead: true }),
            Written::Late { partial } => {
                Some(Exchange::TimedOut { running: false, corrupt: partial, stack: None })
            }
        };
        if let Some(unsent) = unsent {
            let mut w = self.waiting.lock();
            w.replies.remove(&id);
            w.progress.remove(&id);
            return unsent;
        }
        loop {
            if let Some(gave_up) = look.steps(self, id) {
                return self.stop_waiting(id, !ping, &rx, gave_up);
            }
            let wake = look.wake(deadline);
            let asked = look.cancel.filter(|_| look.ladder.is_none());
            match rx.recv_until(wake, || asked.is_some_and(CancelToken::requested)) {
                Ok(reply) => {
                    if look.progress.is_some() {
                        self.waiting.lock().progress.remove(&id);
                    }
                    return Exchange::Reply(reply);
                }
                Err(Missed::Closed) => return self.ended(),
                Err(Missed::Timeout) if Instant::now() >= deadline => {
                    let timed_out =
                        Exchange::TimedOut { running: true, corrupt: false, stack: look.stack.take() };
                    return self.stop_waiting(id, !ping, &rx, timed_out);
                }
                Err(Missed::Timeout) => look.take_due(self, deadline),
            }
        }
    }

    /// Thread profile: the owner of call `id` stops waiting for its reply, which `outcome`
    /// stands for; the call still runs, and (if `slot`) holds its slot until its late reply
    /// comes. Unless the reply came just now: then that is the outcome.
    fn stop_waiting(
        &self,
        id: u64,
        slot: bool,
        rx: &Mailbox<Result<Payload>>,
        outcome: Exchange,
    ) -> Exchange {
        // Whoever removes the entry decides: the monitor (with the reply) or this caller.
        let mut w = self.waiting.lock();
        w.progress.remove(&id);
        if w.replies.remove(&id).is_some() {
            w.abandoned.insert(id, slot);
            return outcome;
        }
        drop(w);
        match rx.try_recv() {
            Ok(reply) => Exchange::Reply(reply),
            Err(_) => self.ended(),
        }
    }

    /// Why a thread worker stopped answering: it broke the protocol, or it died.
    fn ended(&self) -> Exchange {
        match &*self.broken.lock() {
            Some(e) => Exchange::Broken(e.duplicate()),
            None => Exchange::Died,
        }
    }

    /// The error for a call whose worker died, once the monitor has recorded how (waiting at
    /// most until `deadline`, and a second at most).
    pub(crate) fn death_error(&self, deadline: Instant) -> Error {
        let bound = deadline.min(Instant::now() + EXIT_REPORT_WAIT);
        let _ = self.reported.recv_deadline(bound);
        let killed = *self.killed.lock();
        if killed == Some(KillReason::Shutdown) {
            return Error::timeout(TimeoutKind::Shutdown);
        }
        if killed == Some(KillReason::Protocol) {
            if let Some(e) = &*self.broken.lock() {
                return e.duplicate();
            }
        }
        Error::WorkerDied {
            pid: self.worker_pid(),
            exit: self.exit.lock().unwrap_or(ExitKind::Unknown),
            stderr: self.stderr_tail(),
            collateral: killed == Some(KillReason::CallTimeout),
            killed_by: killed,
        }
    }

    /// Records why the pool is about to kill the worker (the first reason stands).
    pub(crate) fn mark_killed(&self, reason: KillReason) {
        self.killed.lock().get_or_insert(reason);
    }

    /// Why the pool killed the worker, if it did.
    pub(crate) fn killed(&self) -> Option<KillReason> {
        *self.killed.lock()
    }

    /// Records that the worker broke the protocol; its waiting calls fail with `err`.
    pub(crate) fn mark_broken(&self, err: Error) {
        self.broken.lock().get_or_insert(err);
        self.mark_killed(KillReason::Protocol);
        self.close_waiting();
    }

    /// Whether the process has exited.
    pub(crate) fn has_exited(&self) -> bool {
        self.exited.load(Ordering::Acquire)
    }

    /// Sends `signal` to the worker's process group unless the worker is already reaped. A
    /// SIGKILL goes to the keeper as [`KEEPER_KILL`] instead, so that it takes down the daemons
    /// the worker started too (a SIGKILL to the group would kill the keeper with the worker,
    /// and such daemons, which left the group, would outlive both); [`Conn::force_kill`] is
    /// the last resort if the keeper does not end.
    pub(crate) fn signal(&self, signal: i32) {
        let reaped = self.reaped.lock();
        if !*reaped {
            let sent = if signal == sys::SIGKILL && self.keeper {
                sys::kill(self.pid, KEEPER_KILL)
            } else {
                sys::kill_group(self.pid, signal)
            };
            if let Err(e) = sent {
                log::warn!("worker {} (pid {}): signal {signal} failed: {e}", self.id, self.pid);
            }
        }
    }

    /// SIGKILL to the whole process group, keeper included, unless the worker is reaped.
    pub(crate) fn force_kill(&self) {
        let reaped = self.reaped.lock();
        if !*reaped {
            if let Err(e) = sys::kill_group(self.pid, sys::SIGKILL) {
                log::warn!("worker {} (pid {}): SIGKILL failed: {e}", self.id, self.pid);
            }
        }
    }

    /// Whether a kill goes through the keeper, which needs a moment (see [`Conn::signal`]).
    pub(crate) fn has_keeper(&self) -> bool {
        self.keeper
    }

    /// Records the Python worker's pid from its `ready` frame, if it is the keeper's child
    /// (checked in `/proc`, so a wrong pid is never signalled or measured), whether it writes
    /// its stacks on [`STACK_SIGNAL`] and whether it takes SIGINT as a cancel (only then is it
    /// ever sent one). The shared files' names are removed now: both sides have them open.
    pub(crate) fn set_worker_pid(&self, pid: u32, stack_dumps: bool, cancel_signal: bool) {
        if self.keeper && crate::proc::parent_of(pid) == Some(self.pid) {
            self.worker_pid.store(pid, Ordering::Release);
        }
        if let Some(s) = &self.stacks {
            s.unlink();
            s.ready.store(stack_dumps, Ordering::Release);
        }
        if let Some(c) = &self.cancels {
            c.unlink();
            self.cancel_signal.store(cancel_signal, Ordering::Release);
        }
    }

    /// Wakes the thread waiting for this process worker's reply, to look at its cancel.
    pub(crate) fn nudge(&self) {
        sys::eventfd_add(self.nudge.as_raw_fd());
    }

    /// Takes a step of cancelling call `id` (see `cancel.rs`): 1 asks, 2 interrupts. A thread
    /// worker's reading loop gets a `cancel` frame. A process worker's main thread is busy with
    /// the command, so the call and step go in its cancel file (which `snakepit.cancelled()`
    /// reads), with SIGINT for step 2; it also gets the frame, which it reads only while a
    /// stream waits for credit (and ignores once the call is over). Writing the frame waits
    /// for room in the pipe until `deadline` at most.
    pub(crate) fn cancel_step(&self, id: u64, step: u8, deadline: Instant) {
        let told = if step >= 2 { CancelStep::Interrupted } else { CancelStep::Asked };
        log::debug!("worker {}: call {id}: cancel {told:?}", self.id);
        self.step_taken(id, told);
        if !self.threaded {
            if let Some(file) = &self.cancels {
                file.write(id, step);
                let pid = self.worker_pid.load(Ordering::Acquire);
                if step >= 2 && pid != 0 && self.cancel_signal.load(Ordering::Acquire) {
                    let reaped = self.reaped.lock();
                    if !*reaped {
                        let _ = sys::kill_main_thread(pid, sys::SIGINT);
                    }
                }
            }
        }
        let _ = self.write(&Frame::from(protocol::encode_cancel(id, step >= 2)), deadline);
    }

    /// Reports a cancel step of call `id`.
    pub(crate) fn step_taken(&self, id: u64, step: CancelStep) {
        if let Some(report) = &self.on_step {
            report(id, step);
        }
    }

    /// Whether the worker serves several calls at once (the thread profile).
    pub(crate) fn threaded(&self) -> bool {
        self.threaded
    }

    /// Whether a call it runs can be told to stop: always on a thread worker (through its
    /// reading loop); on a process worker only with a cancel file (not under a launcher).
    pub(crate) fn can_cancel(&self) -> bool {
        self.threaded || self.cancels.is_some()
    }

    /// Thread profile: whether call `id` was given up on by its caller and still runs.
    pub(crate) fn is_abandoned(&self, id: u64) -> bool {
        self.waiting.lock().abandoned.contains_key(&id)
    }

    /// Process profile: waits for call `id`, whose cancel is under way (`ladder`), to end,
    /// taking the cancel's remaining steps: its reply (of whatever kind), the worker's death,
    /// or `Unheeded` once the last step's grace is over. Chunks the call still sends (a stream
    /// stopping) are skipped.
    pub(crate) fn await_end(&self, id: u64, ladder: Ladder, grace: Duration) -> Exchange {
        let mut look = Looks { ladder: Some(ladder), grace, ..Looks::default() };
        // The ladder ends first; this only bounds a clock that misbehaves (from now: the task
        // may have started late).
        let deadline = ladder.next_at.max(Instant::now()) + 3 * grace + Duration::from_secs(1);
        let mut out = self.stdout.lock();
        loop {
            match self.read_reply(&mut out, id, deadline, &mut look) {
                Exchange::Chunk(_) | Exchange::BadChunk(_) => {}
                other => return other,
            }
        }
    }

    /// Starts stream `id`: writes its call frame (unless it was `sent` already). The thread
    /// profile's monitor hands its chunks and end to the returned receiver; a process worker's
    /// are read by [`Conn::stream_next`]. `Err`: how the exchange ended before it began.
    pub(crate) fn open_stream(
        &self,
        frame: &Frame,
        id: u64,
        deadline: Instant,
        sent: bool,
        progress: Option<&ProgressSink>,
    ) -> std::result::Result<Option<Receiver<Exchange>>, Exchange> {
        if !self.threaded {
            if sent {
                return Ok(None);
            }
            return match self.send_alone(&mut self.stdout.lock(), frame, deadline) {
                None => Ok(None),
                Some(unsent) => Err(unsent),
            };
        }
        let (tx, rx) = crossbeam_channel::unbounded();
        {
            let mut w = self.waiting.lock();
            if w.closed {
                return Err(Exchange::NotSent { dead: true });
            }
            w.streams.insert(id, tx);
            if let Some(sink) = progress {
                w.progress.insert(id, sink.clone());
            }
        }
        let unsent = match self.write(frame, deadline) {
            Written::All => return Ok(Some(rx)),
            Written::Nothing => Exchange::NotSent { dead: true },
            Written::Late { partial } => Exchange::TimedOut { running: false, corrupt: partial, stack: None },
        };
        let mut w = self.waiting.lock();
        w.streams.remove(&id);
        w.progress.remove(&id);
        Err(unsent)
    }

    /// The next chunk of stream `id`, or its end, waiting until `until` at most.
    pub(crate) fn stream_next(
        &self,
        id: u64,
        rx: Option<&Receiver<Exchange>>,
        until: Instant,
        progress: Option<&ProgressSink>,
    ) -> Exchange {
        let Some(rx) = rx else {
            let mut look = Looks { progress, ..Looks::default() };
            return self.read_reply(&mut self.stdout.lock(), id, until, &mut look);
        };
        match rx.recv_deadline(until) {
            Ok(next) => next,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                Exchange::TimedOut { running: true, corrupt: false, stack: None }
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => self.ended(),
        }
    }

    /// Thread profile: the consumer of stream `id` gives up on it while it runs; it keeps its
    /// slot until its late end comes. False if its end has already come (or the worker ended):
    /// it no longer runs. (A process worker's stream is followed up by its lease's holder.)
    pub(crate) fn stream_abandon(&self, id: u64) -> bool {
        if !self.threaded {
            return true;
        }
        let mut w = self.waiting.lock();
        w.progress.remove(&id);
        if w.streams.remove(&id).is_some() {
            w.abandoned.insert(id, true);
            return true;
        }
        false
    }

    /// Grants stream `id` `n` more chunks; false if the frame could not be written by
    /// `deadline` (the worker is gone, or not reading).
    pub(crate) fn credit(&self, id: u64, n: u32, deadline: Instant) -> bool {
        self.write(&Frame::from(protocol::encode_credit(id, n)), deadline) == Written::All
    }

    /// Where the worker's Python code is now: its main thread is sent [`STACK_SIGNAL`]. A
    /// process worker runs its call there, and Python's `faulthandler` writes that thread's
    /// stack from its C signal handler (so even while the command holds the GIL in a long C
    /// call); a thread worker's handler writes the stack of every call thread. Waits a moment
    /// for the text, never past `deadline`. `None` without a stack file, or if nothing came.
    pub(crate) fn capture_stack(&self, deadline: Instant) -> Option<String> {
        let asked = Instant::now();
        let stacks = self.stacks.as_ref()?;
        let pid = self.worker_pid.load(Ordering::Acquire);
        if pid == 0 || !stacks.ready.load(Ordering::Acquire) || self.has_exited() {
            return None;
        }
        // Another call of the worker may be taking them (thread profile): not past `deadline`,
        // and a dump it asked for after this call asked serves this call too.
        let mut file = stacks.file.try_lock_until(deadline)?;
        if let Some((at, text)) = &*stacks.last.lock() {
            if *at >= asked {
                return Some(text.clone());
            }
        }
        let mut text = Vec::new();
        let _ = file.read_to_end(&mut text); // an earlier dump nobody waited for
        text.clear();
        let signalled = Instant::now();
        {
            let reaped = self.reaped.lock();
            // The main thread: it runs the command in the process profile, and the thread
            // profile's handler runs there.
            if *reaped || sys::kill_main_thread(pid, STACK_SIGNAL).is_err() {
                return None;
            }
        }
        // The dump is written at once, in a few writes: read until it stops growing.
        let end = deadline.min(Instant::now() + STACK_WAIT);
        let mut quiet = 0;
        while Instant::now() < end && quiet < 3 {
            std::thread::sleep(Duration::from_millis(5));
            match file.read_to_end(&mut text) {
                Ok(0) if !text.is_empty() => quiet += 1,
                Ok(_) => quiet = 0,
                Err(_) => break,
            }
        }
        let text = String::from_utf8_lossy(&text).trim_end().to_string();
        if text.is_empty() {
            return None;
        }
        *stacks.last.lock() = Some((signalled, text.clone()));
        Some(text)
    }

    /// The Python worker's pid: the one its commands see as `os.getpid()`, whose memory is
    /// measured. The process we started until the worker is ready, and under a launcher.
    pub(crate) fn worker_pid(&self) -> u32 {
        match self.worker_pid.load(Ordering::Acquire) {
            0 => self.pid,
            pid => pid,
        }
    }

    /// Asks the worker to exit: a `shutdown` frame if the pipe takes it at once, then EOF. Gives
    /// up (false) if a caller holds the pipe for longer than `wait`.
    pub(crate) fn ask_to_stop(&self, frame: &[u8], wait: Duration) -> bool {
        let end = Instant::now() + wait;
        let Some(mut stdin) = self.stdin.try_lock_until(end) else { return false };
        if let Some(file) = stdin.as_ref() {
            // The posted frames first (sessions' ends, whose hooks should run), within `wait`.
            let mut flushed = self.flush_outbox(file);
            while !flushed && Instant::now() < end {
                let mut fds = [sys::poll_entry(file.as_raw_fd(), sys::POLLOUT)];
                if sys::poll(&mut fds, Some(end)).is_ok_and(|n| n > 0) {
                    flushed = self.flush_outbox(file);
                } else {
                    break;
                }
            }
            if !flushed {
                log::debug!(
                    "worker {}: {} session ends not delivered before it stops",
                    self.id,
                    self.posted.load(Ordering::Acquire)
                );
            }
            // A frame the pipe cannot take whole is not sent; EOF alone stops the worker too.
            let mut fds = [sys::poll_entry(file.as_raw_fd(), sys::POLLOUT)];
            if sys::poll(&mut fds, Some(Instant::now())).is_ok_and(|n| n > 0) && frame.len() <= PIPE_BUF {
                let _ = (&*file).write(frame);
            }
        }
        *stdin = None;
        true
    }

    /// Keeps `line` among the last lines reported with the worker's death.
    fn remember(&self, line: String) {
        let mut tail = self.stderr_tail.lock();
        while tail.len() >= STDERR_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    }

    /// The last lines the worker wrote to stderr, oldest first.
    pub(crate) fn stderr_tail(&self) -> Vec<String> {
        self.stderr_tail.lock().iter().cloned().collect()
    }

    /// Thread profile: hands a reply to its call. A reply to a call whose caller gave up frees
    /// that call's slot (`late` returns true); a reply to no call at all is a violation.
    fn deliver(&self, id: u64, reply: Result<Payload>) -> Delivery {
        let mut w = self.waiting.lock();
        if let Some(tx) = w.replies.remove(&id) {
            // Sent under the lock: a caller that finds its entry gone finds its reply here.
            let _ = tx.send(reply);
            Delivery::Answered
        } else if let Some(tx) = w.streams.remove(&id) {
            w.progress.remove(&id);
            let _ = tx.send(Exchange::Reply(reply));
            Delivery::Answered
        } else if let Some(slot) = w.abandoned.remove(&id) {
            Delivery::Late { slot }
        } else {
            Delivery::Unknown
        }
    }

    /// Thread profile: hands a chunk (or a chunk that could not be decoded) to its stream; one
    /// of a stream whose consumer gave up is dropped.
    fn deliver_stream(&self, id: u64, chunk: Exchange) -> Delivery {
        let w = self.waiting.lock();
        if let Some(tx) = w.streams.get(&id) {
            let _ = tx.send(chunk);
            Delivery::Answered
        } else if w.abandoned.contains_key(&id) {
            Delivery::Late { slot: false }
        } else {
            Delivery::Unknown
        }
    }

    /// No more replies will come: every waiting call learns it at once.
    fn close_waiting(&self) {
        let mut w = self.waiting.lock();
        w.closed = true;
        w.replies.clear();
        w.streams.clear();
        w.progress.clear();
    }
}

#[derive(PartialEq, Eq)]
enum Written {
    All,
    /// Nothing the worker could act on was written (it is dead, or its stdin is closed).
    Nothing,
    /// The deadline passed; `partial`: part of the frame is in the pipe.
    Late {
        partial: bool,
    },
}

enum Delivery {
    Answered,
    Late { slot: bool },
    Unknown,
}

/// The exchange's outcome from one frame read while waiting for the reply to `id` (or the next
/// chunk of stream `id`).
fn reply_from(frame: RawFrame<'_>, id: u64) -> Exchange {
    let payload = frame.json;
    match protocol::decode(payload) {
        Ok(Msg::Result { id: got, value }) if got == id => {
            Exchange::Reply(received(value, frame.attachments))
        }
        Ok(Msg::Error { id: got, error }) if got == id => Exchange::Reply(Err(remote_error(error))),
        Ok(Msg::Chunk { id: got, value }) if got == id => match received(value, frame.attachments) {
            Ok(chunk) => Exchange::Chunk(chunk),
            Err(e) => Exchange::BadChunk(e),
        },
        Ok(Msg::Pong { id: got }) if got == id => Exchange::Reply(Ok(Value::Null.into())),
        Ok(other) => Exchange::Broken(Error::Protocol(format!("expected the reply to {id}, got {other:?}"))),
        // A well-framed reply that cannot be decoded (say, nested deeper than the decoder
        // allows) fails only its own call; the stream is still in step.
        Err(e) if protocol::reply_id(payload) == Some(id) => {
            Exchange::Reply(Err(Error::Protocol(format!("the reply could not be decoded: {e}"))))
        }
        Err(e) if protocol::chunk_id(payload) == Some(id) => {
            Exchange::BadChunk(Error::Protocol(format!("a chunk could not be decoded: {e}")))
        }
        Err(e) => Exchange::Broken(Error::Protocol(e.to_string())),
    }
}

/// A reply's (or chunk's) value with the attachments its frame brought, once its references to
/// them are checked: a bad one fails only its call (the frames are still in step).
fn received(value: Value, attachments: Vec<crate::binary::Bytes>) -> Result<Payload> {
    let payload = Payload { value, attachments };
    if !payload.attachments.is_empty() {
        if let Err(e) = payload.check() {
            return Err(Error::Protocol(format!("the reply could not be decoded: {e}")));
        }
    }
    Ok(payload)
}

/// A progress report's call and content, if `payload` is one (told by its opening, so other
/// frames pay one comparison).
/// A report that cannot be decoded (a number out of range) is dropped: it is `(id, None)`.
fn progress_of(payload: &[u8]) -> Option<(u64, Option<Progress>)> {
    if !payload.starts_with(br#"{"type":"progress","id":"#) {
        return None;
    }
    match protocol::decode(payload) {
        Ok(Msg::Progress { id, done, total, message }) => Some((id, Some(Progress { done, total, message }))),
        _ => {
            log::debug!("dropped a progress report that could not be decoded");
            Some((0, None))
        }
    }
}

/// The error a worker's error reply stands for: `Cancelled` when the command stopped because
/// it was cancelled.
pub(crate) fn remote_error(error: crate::error::RemoteError) -> Error {
    if error.error_type == "Cancelled" {
        Error::Cancelled
    } else {
        Error::Python(error)
    }
}

fn frame_error(worker: WorkerId, e: io::Error) -> Error {
    match protocol::as_too_large(&e) {
        Some(t) => Error::FrameTooLarge { size: t.size, max: t.max },
        None => Error::Protocol(format!("worker {worker} stdout: {e}")),
    }
}

/// A running worker process, as the dispatcher holds it.
pub(crate) struct Worker {
    pub(crate) conn: Arc<Conn>,
    monitor: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts the process and its monitor thread. Must be called from a thread that lives as
    /// long as the worker (the dispatcher): Linux delivers the worker's parent-death signal
    /// when the thread that spawned it exits. `on_late` runs (on the monitor thread) when a
    /// reply comes for a call whose caller gave up, which frees that call's slot.
    pub(crate) fn spawn(
        id: WorkerId,
        spec: &SpawnSpec,
        events: Sender<WorkerEvent>,
        on_late: Box<dyn Fn() + Send>,
        on_step: Box<dyn Fn(u64, CancelStep) + Send + Sync>,
    ) -> Result<Worker> {
        let mut cmd = Command::new(spec.launcher.first().map_or(spec.python.as_os_str(), |p| p.as_ref()));
        if let Some((_, rest)) = spec.launcher.split_first() {
            cmd.args(rest);
        }
        let remote = spec.launcher.first().is_some_and(|p| is_remote_shell(p));
        let mut line: Vec<OsString> = Vec::new();
        if remote {
            // The remote side gets no environment from us: say it on the command line.
            line.push("env".into());
            let mut path = OsString::from("PYTHONPATH=");
            path.push(&spec.python_path);
            line.push(path);
            line.extend(spec.env.iter().map(|(k, v)| OsString::from(format!("{k}={v}"))));
        }
        if !spec.launcher.is_empty() {
            line.push(spec.python.clone().into_os_string());
        }
        // Like `python -m snakepit`, but without the current directory on `sys.path`, where a
        // folder named `snakepit` would shadow the embedded package.
        line.extend(["-c", BOOTSTRAP].map(OsString::from));
        if let Some(adapter) = &spec.adapter {
            line.extend(["--adapter", adapter].map(OsString::from));
        }
        if spec.launcher.is_empty() {
            // Under a launcher (ssh, a container's exec) the worker's parent is not us.
            line.extend(["--parent-pid".to_string(), std::process::id().to_string()].map(OsString::from));
        }
        line.push("--keeper".into());
        // Local workers only: under a launcher the file would be on the other side.
        let stacks = if spec.launcher.is_empty() { StackFile::create().ok() } else { None };
        if let Some(path) = stacks.as_ref().and_then(StackFile::path) {
            line.extend([OsString::from("--stack-file"), path.into_os_string()]);
        }
        // Process profile: a busy worker reads no frames, so its cancels go through a file.
        let cancels =
            if spec.launcher.is_empty() && spec.threads == 0 { CancelFile::create().ok() } else { None };
        if let Some(path) = cancels.as_ref().and_then(CancelFile::path) {
            line.extend([OsString::from("--cancel-file"), path.into_os_string()]);
        }
        for (flag, value) in [
            ("--max-frame-size", spec.max_frame.to_string()),
            ("--worker-id", id.to_string()),
            ("--pool", spec.pool.clone()),
        ] {
            line.extend([flag.into(), value.into()]);
        }
        if spec.threads > 0 {
            line.extend(["--threads".to_string(), spec.threads.to_string()].map(OsString::from));
            if spec.allow_unsafe_threads {
                line.push("--allow-unsafe-threads".into());
            }
        }
        if let Some((command, args)) = &spec.init {
            line.extend(["--init", command, "--init-args", args].map(OsString::from));
        }
        if !spec.args.is_empty() {
            line.push("--".into());
            line.extend(spec.args.iter().map(OsString::from));
        }
        if remote {
            // ssh joins its arguments with spaces and the remote shell splits them again:
            // quote each one so it arrives as it was.
            line = line.iter().map(|a| shell_quote(&a.to_string_lossy()).into()).collect();
        }
        cmd.args(&line);
        cmd.env("PYTHONPATH", &spec.python_path)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Each worker leads its own process group, so signals reach its children too.
            .process_group(0);
        let program = spec.launcher.first().cloned().unwrap_or_else(|| spec.python.display().to_string());
        let mut child = cmd.spawn().map_err(|source| Error::Spawn { program, source })?;
        let pid = child.id();
        log::debug!("[{}] worker {id} spawned (pid {pid})", spec.pool);

        let stdin = File::from(OwnedFd::from(child.stdin.take().expect("stdin is piped")));
        let stdout = File::from(OwnedFd::from(child.stdout.take().expect("stdout is piped")));
        let stderr = File::from(OwnedFd::from(child.stderr.take().expect("stderr is piped")));
        let setup = (|| -> io::Result<(OwnedFd, OwnedFd)> {
            // Non-blocking: a write never waits on a worker that stopped reading, and a read
            // never waits past a deadline.
            for fd in [stdin.as_raw_fd(), stdout.as_raw_fd(), stderr.as_raw_fd()] {
                sys::set_nonblocking(fd)?;
            }
            Ok((sys::pidfd_open(pid)?, sys::eventfd()?))
        })();
        let (exit_fd, nudge) = match setup {
            Ok(fds) => fds,
            Err(source) => {
                let _ = sys::kill_group(pid, sys::SIGKILL);
                let _ = child.wait();
                return Err(Error::Spawn { program: format!("pidfd for worker {id}"), source });
            }
        };
        let (report, reported) = bounded::<()>(0);
        let mut conn =
            Conn::new(id, pid, spec.max_frame, stdin, stdout, exit_fd, nudge, spec.threads > 0, reported);
        conn.keeper = spec.launcher.is_empty();
        conn.stacks = stacks;
        conn.cancels = cancels;
        conn.on_step = Some(on_step);
        let conn = Arc::new(conn);
        let monitor = Monitor {
            conn: conn.clone(),
            child: Some(child),
            stderr: Some(stderr),
            line: Vec::new(),
            events,
            pool: spec.pool.clone(),
            on_late,
            report: Some(report),
            synced: false,
        };
        let handle = std::thread::Builder::new()
            .name(thread_name(&format!("w{id}"), &spec.pool))
            .spawn(move || monitor.run());
        match handle {
            Ok(h) => Ok(Worker { conn, monitor: Some(h) }),
            Err(source) => {
                // The monitor (and the child handle) went with the failed spawn; kill the group.
                // The zombie waits for our own exit in this out-of-threads case.
                let _ = sys::kill_group(pid, sys::SIGKILL);
                Err(Error::Spawn { program: format!("monitor thread for worker {id}"), source })
            }
        }
    }

    /// A worker with no process behind it, for the dispatcher's unit tests: `exit` closing (the
    /// returned write end dropped) stands for the process exiting.
    #[cfg(test)]
    pub(crate) fn fake(id: WorkerId, threaded: bool, keeper: bool) -> (Worker, OwnedFd) {
        let (stdin_r, stdin_w) = sys::pipe().unwrap();
        let (stdout_r, _stdout_w) = sys::pipe().unwrap();
        let (exit_r, exit_w) = sys::pipe().unwrap();
        std::mem::forget(stdin_r);
        std::mem::forget(_stdout_w);
        let (_report, reported) = bounded::<()>(0);
        std::mem::forget(_report);
        let conn = Conn::new(
            id,
            u32::MAX,
            protocol::DEFAULT_MAX_FRAME,
            File::from(stdin_w),
            File::from(stdout_r),
            exit_r,
            sys::eventfd().unwrap(),
            threaded,
            reported,
        );
        *conn.reaped.lock() = true; // never signal a real process
        let mut conn = conn;
        conn.keeper = keeper;
        (Worker { conn: Arc::new(conn), monitor: None }, exit_w)
    }

    /// Whether the monitor thread has ended (joining will not block).
    pub(crate) fn finished(&self) -> bool {
        self.monitor.as_ref().map_or(true, |t| t.is_finished())
    }

    /// Joins the monitor thread; blocks unless [`finished`](Worker::finished).
    pub(crate) fn join(mut self) {
        if let Some(t) = self.monitor.take() {
            let _ = t.join();
        }
    }
}

/// The monitor thread's state.
struct Monitor {
    conn: Arc<Conn>,
    child: Option<Child>,
    stderr: Option<File>,
    /// The stderr line being read.
    line: Vec<u8>,
    events: Sender<WorkerEvent>,
    pool: String,
    on_late: Box<dyn Fn() + Send>,
    /// Dropped once the exit is recorded.
    report: Option<Sender<()>>,
    /// The first frame has been found (text the interpreter printed before it is skipped).
    synced: bool,
}

impl Monitor {
    fn run(mut self) {
        let conn = self.conn.clone();
        // The process profile's stdout is read here only until `ready`; then it belongs to the
        // calls.
        let mut reading = true;
        loop {
            let mut fds = vec![sys::poll_entry(conn.exit_fd.as_raw_fd(), sys::POLLIN)];
            let err_at = self.stderr.as_ref().map(|f| {
                fds.push(sys::poll_entry(f.as_raw_fd(), sys::POLLIN));
                fds.len() - 1
            });
            // Never the stdout lock here: a caller holds it for a whole call (process profile),
            // and this thread must keep draining stderr and watching the exit meanwhile.
            let out_fd = conn.stdout_fd;
            let out_at = reading.then(|| {
                fds.push(sys::poll_entry(out_fd, sys::POLLIN));
                fds.len() - 1
            });
            if sys::poll(&mut fds, None).is_err() {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            // Output first: a reply written just before the exit is still delivered.
            if out_at.is_some_and(|i| fds[i].revents != 0) {
                reading = self.read_stdout();
            }
            if err_at.is_some_and(|i| fds[i].revents != 0) && !self.read_stderr() {
                self.stderr = None;
            }
            if fds[0].revents != 0 {
                break;
            }
        }
        self.exited();
    }

    /// Reads what stdout has; false once it is no longer this thread's to read.
    fn read_stdout(&mut self) -> bool {
        let conn = self.conn.clone();
        let mut out = conn.stdout.lock();
        loop {
            let Reader { file, buf } = &mut *out;
            match (&*file).read(buf.spare()) {
                Ok(0) => {
                    drop(out);
                    // Its output ends because it is exiting (the exit is reported with the
                    // calls' errors); a worker that closes its output and lives on is broken.
                    let exiting = conn.exits_by(Instant::now() + EXIT_AFTER_EOF);
                    if conn.threaded && !exiting {
                        self.broken(Error::Protocol("the worker closed its output".into()));
                    }
                    return false;
                }
                Ok(n) => buf.filled(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) => {
                    drop(out);
                    self.broken(Error::Protocol(format!("worker {} stdout: {e}", conn.id)));
                    return false;
                }
            }
            if !self.synced {
                // Until the first frame, anything else on stdout was printed by the interpreter
                // before the worker took stdout over: skip it, and say so.
                let held = out.buf.held();
                let (skip, found) = match protocol::first_frame_at(held) {
                    Some(at) => (at, true),
                    // A frame's opening may straddle two reads: keep the tail.
                    None => (held.len().saturating_sub(32), false),
                };
                if skip > 0 {
                    let text = String::from_utf8_lossy(&held[..skip.min(STDERR_LINE_MAX)]).into_owned();
                    log::warn!(
                        "[{}] worker {}: the interpreter wrote {skip} bytes to stdout before the worker started \
                         (a sitecustomize module or .pth file that prints?); skipped: {:?}",
                        self.pool,
                        conn.id,
                        text.trim_end()
                    );
                    conn.remember(format!("(printed to stdout at start-up) {}", text.trim_end()));
                    out.buf.skip(skip);
                }
                if !found {
                    continue;
                }
                self.synced = true;
            }
            loop {
                let frame = match out.buf.next_frame(conn.max_frame) {
                    Ok(Some(RawFrame { json: payload, attachments })) => match protocol::decode(payload) {
                        Ok(msg) => Ok((msg, attachments)),
                        // Well framed but not decodable (nested too deep, a number out of
                        // range): it fails only its call; a progress report is dropped.
                        Err(e) => match (protocol::reply_id(payload), protocol::chunk_id(payload)) {
                            (Some(id), _) => {
                                let err = Error::Protocol(format!("the reply could not be decoded: {e}"));
                                Err((Some((id, false)), err))
                            }
                            (_, Some(id)) => {
                                let err = Error::Protocol(format!("a chunk could not be decoded: {e}"));
                                Err((Some((id, true)), err))
                            }
                            _ if progress_of(payload).is_some() => continue,
                            _ => Err((None, Error::Protocol(e.to_string()))),
                        },
                    },
                    Ok(None) => break,
                    Err(e) => Err((None, frame_error(conn.id, e))),
                };
                let keep = match frame {
                    Ok((msg, attachments)) => self.on_frame(msg, attachments),
                    Err((Some((id, false)), err)) if conn.threaded => self.on_reply(id, Err(err)),
                    Err((Some((id, true)), err)) if conn.threaded => {
                        match conn.deliver_stream(id, Exchange::BadChunk(err)) {
                            Delivery::Unknown => {
                                self.broken(Error::Protocol(format!("chunk of stream {id} it does not run")));
                                false
                            }
                            _ => true,
                        }
                    }
                    Err((_, err)) => {
                        drop(out);
                        self.broken(err);
                        return false;
                    }
                };
                if !keep {
                    return false;
                }
            }
        }
    }

    /// Handles one frame; false when this thread stops reading stdout.
    fn on_frame(&mut self, msg: Msg, attachments: Vec<crate::binary::Bytes>) -> bool {
        let conn = &self.conn;
        log::trace!("[{}] worker {} -> {msg:?}", self.pool, conn.id);
        match msg {
            Msg::Result { id, value } if conn.threaded => self.on_reply(id, received(value, attachments)),
            Msg::Error { id, error } if conn.threaded => self.on_reply(id, Err(remote_error(error))),
            Msg::Chunk { id, value } if conn.threaded => {
                let chunk = match received(value, attachments) {
                    Ok(chunk) => Exchange::Chunk(chunk),
                    Err(e) => Exchange::BadChunk(e),
                };
                match conn.deliver_stream(id, chunk) {
                    Delivery::Unknown => {
                        self.broken(Error::Protocol(format!("chunk of stream {id} it does not run")));
                        false
                    }
                    _ => true,
                }
            }
            Msg::Progress { id, done, total, message } if conn.threaded => {
                // Late reports (of a call whose caller gave up) are dropped.
                let sink = conn.waiting.lock().progress.get(&id).cloned();
                if let Some(sink) = sink {
                    sink.call(&Progress { done, total, message });
                }
                true
            }
            Msg::Pong { id } if conn.threaded => self.on_reply(id, Ok(Value::Null.into())),
            msg @ (Msg::Ready { .. } | Msg::StartupError { .. }) => {
                let _ = self.events.send(WorkerEvent::Frame(conn.id, msg));
                conn.threaded
            }
            other => {
                self.broken(Error::Protocol(format!("unexpected message from worker: {other:?}")));
                false
            }
        }
    }

    fn on_reply(&mut self, id: u64, reply: Result<Payload>) -> bool {
        match self.conn.deliver(id, reply) {
            Delivery::Answered => true,
            Delivery::Late { slot } => {
                if slot {
                    (self.on_late)();
                }
                true
            }
            Delivery::Unknown => {
                self.broken(Error::Protocol(format!("reply to call {id} it does not hold")));
                false
            }
        }
    }

    fn broken(&mut self, err: Error) {
        log::warn!(
            "[{}] worker {} (pid {}) broke the protocol: {err}",
            self.pool,
            self.conn.id,
            self.conn.worker_pid()
        );
        self.conn.mark_broken(err.duplicate());
        let _ = self.events.send(WorkerEvent::Broken(self.conn.id, err));
    }

    /// Reads what stderr has; false at its end.
    fn read_stderr(&mut self) -> bool {
        let Some(file) = self.stderr.as_ref() else { return false };
        let mut chunk = [0u8; 8192];
        loop {
            match (&*file).read(&mut chunk) {
                Ok(0) => {
                    if !self.line.is_empty() {
                        let line = std::mem::take(&mut self.line);
                        self.stderr_line(&line);
                    }
                    return false;
                }
                Ok(n) => {
                    for piece in chunk[..n].split_inclusive(|&b| b == b'\n') {
                        let room = (STDERR_LINE_MAX + 1).saturating_sub(self.line.len());
                        self.line.extend_from_slice(&piece[..piece.len().min(room)]);
                        if piece.ends_with(b"\n") {
                            let line = std::mem::take(&mut self.line);
                            self.stderr_line(&line);
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(_) => return false,
            }
        }
    }

    fn stderr_line(&self, bytes: &[u8]) {
        let text = String::from_utf8_lossy(bytes);
        let mut text = text.trim_end_matches(['\n', '\r']).to_string();
        if text.len() > STDERR_LINE_MAX {
            let mut cut = STDERR_LINE_MAX;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
        }
        let (level, line) = log_level(&text);
        log::log!(target: "snakepit::python", level, "[{}] worker {}: {line}", self.pool, self.conn.id);
        let line = line.to_string();
        self.conn.remember(line);
    }

    /// The process has exited: kill what is left of its group, reap it, take its last stderr
    /// lines, record how it ended, and tell the dispatcher.
    fn exited(mut self) {
        let conn = self.conn.clone();
        conn.exited.store(true, Ordering::Release);
        if let Some(s) = &conn.stacks {
            s.unlink(); // a worker that never got ready
        }
        let status = {
            let mut reaped = conn.reaped.lock();
            // The leader is a zombie, so its group id cannot have been reused: safe to signal.
            let _ = sys::kill_group(conn.pid, sys::SIGKILL);
            let status = self.child.take().map(|mut c| c.wait());
            *reaped = true;
            status
        };
        let exit = match status {
            Some(Ok(s)) => match (s.code(), s.signal()) {
                (Some(c), _) => ExitKind::Code(c),
                (None, Some(sig)) => ExitKind::Signal(sig),
                _ => ExitKind::Unknown,
            },
            _ => ExitKind::Unknown,
        };
        // The last lines, unless a descendant that escaped the group keeps stderr open.
        let end = Instant::now() + STDERR_DRAIN;
        while let Some(fd) = self.stderr.as_ref().map(AsRawFd::as_raw_fd) {
            let mut fds = [sys::poll_entry(fd as RawFd, sys::POLLIN)];
            if !sys::poll(&mut fds, Some(end)).is_ok_and(|n| n > 0) || !self.read_stderr() {
                break;
            }
        }
        self.stderr = None;
        *conn.exit.lock() = Some(exit);
        conn.close_waiting();
        self.report = None;
        let _ = self.events.send(WorkerEvent::Exited(conn.id, exit));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tagged_stderr_lines_keep_their_python_level() {
        assert_eq!(log_level("\u{1e}snakepit:WARNING\u{1e}careful"), (log::Level::Warn, "careful"));
        assert_eq!(log_level("\u{1e}snakepit:CRITICAL\u{1e}x"), (log::Level::Error, "x"));
        assert_eq!(log_level("\u{1e}snakepit:INFO\u{1e}"), (log::Level::Info, ""));
        assert_eq!(log_level("\u{1e}snakepit:LEVEL 5\u{1e}y"), (log::Level::Trace, "y"));
        assert_eq!(log_level("plain print"), (log::Level::Debug, "plain print"));
        assert_eq!(
            log_level("\u{1e}snakepit:WARNING no end"),
            (log::Level::Debug, "\u{1e}snakepit:WARNING no end")
        );
    }

    #[test]
    fn shell_quoting_survives_a_shell() {
        let args = ["plain", "two words", "it's", "$HOME `x` \"q\" \\ ;|&<>*?[]", "", "a=b c"];
        let line: Vec<String> = args.iter().map(|a| shell_quote(a)).collect();
        assert_eq!(line[0], "plain", "safe arguments stay readable");
        let script = format!("printf '[%s]' {}", line.join(" "));
        let out = Command::new("sh").args(["-c", &script]).output().unwrap();
        let want: String = args.iter().map(|a| format!("[{a}]")).collect();
        assert_eq!(String::from_utf8_lossy(&out.stdout), want);
        assert!(is_remote_shell("/usr/bin/ssh") && is_remote_shell("ssh") && !is_remote_shell("nice"));
    }
}
