//! One Python worker process: spawn, the stdin writer and stdout/stderr reader threads, signals
//! to its process group, and reaping.
//!
//! The dispatcher owns every [`Worker`] and decides everything; the threads here move bytes
//! and report [`WorkerEvent`]s. Two shortcuts keep a call's path short:
//!
//! - the dispatcher writes a frame straight into the worker's stdin pipe, which is in
//!   non-blocking mode; only what the pipe cannot take at once goes to the writer thread;
//! - the stdout reader hands a reply straight to the waiting caller, through the worker's
//!   table of waiting calls, and then tells the dispatcher. Whoever removes a call from that
//!   table (the reader with a reply, or the dispatcher with a time-out or a crash) is the one
//!   that answers it, so every call is answered exactly once.
//!
//! The stdout reader also reaps the process, after it has exited, so the pid (and process
//! group id) stays reserved until nothing can signal it any more.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, Sender};
use parking_lot::Mutex;
use serde_json::Value;

use crate::error::{Error, ExitKind, Result};
use crate::protocol::{self, Msg};
use crate::sys;

/// A worker's number within its pool (not its pid).
pub(crate) type WorkerId = u64;

/// The worker's entry point. `-c` puts the current directory first on `sys.path`; it is
/// removed before anything is imported.
const BOOTSTRAP: &str =
    "import sys; sys.path.pop(0); from snakepit.worker import main; sys.exit(main(sys.argv[1:]))";

/// How many lines of a worker's stderr are kept for error reports.
const STDERR_LINES: usize = 20;
/// The longest stderr line kept (the rest is cut).
const STDERR_LINE_MAX: usize = 2000;
/// How long the reaper waits for the last stderr lines after the process exited.
const STDERR_DRAIN: Duration = Duration::from_millis(300);

/// Where a call's one answer goes.
pub(crate) type ReplyTx = Sender<Result<Value>>;

/// What the worker threads tell the dispatcher.
#[derive(Debug)]
pub(crate) enum WorkerEvent {
    /// A call finished on the worker. `answered`: the reader delivered the reply (false when
    /// the dispatcher had already answered the call, e.g. with a time-out).
    Completed { worker: WorkerId, call: u64, ok: bool, answered: bool },
    /// Any other well-formed frame arrived on the worker's stdout.
    Frame(WorkerId, Msg),
    /// The worker broke the protocol; the reader stopped reading. The dispatcher kills it.
    Broken(WorkerId, Error),
    /// The process exited and was reaped. Always the last event of a worker.
    Exited(WorkerId, ExitKind),
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
}

/// A running worker process and its threads.
pub(crate) struct Worker {
    pub(crate) id: WorkerId,
    pub(crate) pid: u32,
    outbox: Arc<Mutex<Outbox>>,
    /// Rings the writer thread when the outbox holds bytes the pipe did not take at once.
    /// Dropping it ends the writer thread.
    doorbell: Option<Sender<()>>,
    waiting: Waiting,
    /// Calls whose replies the stdout reader has delivered, counted before the dispatcher
    /// hears of them.
    done: Arc<AtomicU64>,
    /// Set (under the lock) by the reaper once the process is reaped; signals are sent under
    /// the same lock only while it is false, so a reused pid is never signalled.
    reaped: Arc<Mutex<bool>>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Worker {
    /// Starts the process and its three threads. Must be called from a thread that lives as
    /// long as the worker (the dispatcher): Linux delivers the worker's parent-death signal
    /// when the thread that spawned it exits.
    pub(crate) fn spawn(id: WorkerId, spec: &SpawnSpec, events: Sender<WorkerEvent>) -> Result<Worker> {
        let mut cmd = match spec.launcher.split_first() {
            Some((program, rest)) => {
                let mut cmd = Command::new(program);
                cmd.args(rest).arg(&spec.python);
                cmd
            }
            None => Command::new(&spec.python),
        };
        // Like `python -m snakepit`, but without the current directory on `sys.path`, where a
        // folder named `snakepit` would shadow the embedded package.
        cmd.args(["-c", BOOTSTRAP]);
        if let Some(adapter) = &spec.adapter {
            cmd.args(["--adapter", adapter]);
        }
        if spec.launcher.is_empty() {
            // Under a launcher (ssh, a container's exec) the worker's parent is not us.
            cmd.arg("--parent-pid").arg(std::process::id().to_string());
        }
        cmd.arg("--max-frame-size")
            .arg(spec.max_frame.to_string())
            .arg("--worker-id")
            .arg(id.to_string())
            .arg("--pool")
            .arg(&spec.pool);
        if spec.threads > 0 {
            cmd.arg("--threads").arg(spec.threads.to_string());
            if spec.allow_unsafe_threads {
                cmd.arg("--allow-unsafe-threads");
            }
        }
        if !spec.args.is_empty() {
            cmd.arg("--").args(&spec.args);
        }
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

        let stdin = child.stdin.take().expect("stdin is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        // Without this a write could block the dispatcher on a worker that stopped reading.
        let nonblocking = sys::set_nonblocking(stdin.as_raw_fd());
        let outbox = Arc::new(Mutex::new(Outbox {
            pipe: Some(stdin),
            pending: VecDeque::new(),
            offset: 0,
            close_when_flushed: false,
        }));
        let waiting: Waiting = Arc::new(Mutex::new(HashMap::new()));
        let done = Arc::new(AtomicU64::new(0));
        let reaped = Arc::new(Mutex::new(false));
        let stderr_tail = Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_LINES)));
        let (doorbell, doorbell_rx) = bounded::<()>(1);
        let (stderr_done_tx, stderr_done_rx) = bounded::<()>(1);

        let mut worker = Worker {
            id,
            pid,
            outbox: outbox.clone(),
            doorbell: Some(doorbell),
            waiting: waiting.clone(),
            done: done.clone(),
            reaped: reaped.clone(),
            stderr_tail: stderr_tail.clone(),
            threads: Vec::new(),
        };
        let started = (|| -> io::Result<()> {
            nonblocking?;
            let pool = spec.pool.clone();
            worker.threads.push(
                thread::Builder::new()
                    .name(format!("sp-w{id}-err"))
                    .spawn(move || read_stderr(stderr, &pool, id, &stderr_tail, stderr_done_tx))?,
            );
            worker.threads.push(
                thread::Builder::new()
                    .name(format!("sp-w{id}-in"))
                    .spawn(move || write_stdin(&outbox, doorbell_rx))?,
            );
            let max = spec.max_frame;
            let reaper = Reaper { child, id, reaped, stderr_done: stderr_done_rx, events: events.clone() };
            worker.threads.push(
                thread::Builder::new()
                    .name(format!("sp-w{id}-out"))
                    .spawn(move || read_stdout(stdout, max, &waiting, done, reaper))?,
            );
            Ok(())
        })();
        if let Err(e) = started {
            // The thread that would reap the child never started. Kill the group; the threads
            // already running end on the closed pipes. (The child handle went with the failed
            // closure, so in this out-of-threads case the zombie waits for our own exit.)
            worker.close_stdin();
            worker.doorbell = None;
            let _ = sys::kill_group(pid, sys::SIGKILL);
            return Err(Error::Spawn { program: format!("thread for worker {id}"), source: e });
        }
        Ok(worker)
    }

    /// Sends a frame: straight into the pipe if it takes it all now, else the rest goes to the
    /// writer thread. Never blocks. False if the pipe is closed or broken (the worker is dying;
    /// its exit is reported separately).
    pub(crate) fn send(&self, frame: Vec<u8>) -> bool {
        let mut ob = self.outbox.lock();
        let Some(pipe) = ob.pipe.as_ref() else { return false };
        if ob.pending.is_empty() {
            match write_some(pipe, &frame) {
                Ok(n) if n == frame.len() => return true,
                Ok(n) => ob.offset = n,
                Err(_) => {
                    ob.pipe = None;
                    return false;
                }
            }
        }
        ob.pending.push_back(frame);
        drop(ob);
        self.ring();
        true
    }

    /// Closes the worker's stdin once the frames already sent are written; a worker reading
    /// EOF between frames exits with code 0.
    pub(crate) fn close_stdin(&mut self) {
        let mut ob = self.outbox.lock();
        if ob.pending.is_empty() {
            ob.pipe = None;
        } else {
            ob.close_when_flushed = true;
            drop(ob);
            self.ring();
        }
    }

    fn ring(&self) {
        if let Some(bell) = &self.doorbell {
            let _ = bell.try_send(());
        }
    }

    /// Registers where the answer to `call` goes, before its frame is sent.
    pub(crate) fn expect_reply(&self, call: u64, reply: ReplyTx) {
        self.waiting.lock().insert(call, reply);
    }

    /// How many replies the stdout reader has delivered so far.
    pub(crate) fn delivered(&self) -> u64 {
        self.done.load(Ordering::Acquire)
    }

    /// Takes the right to answer `call`. `None` if the reader already delivered its reply.
    pub(crate) fn take_reply(&self, call: u64) -> Option<ReplyTx> {
        self.waiting.lock().remove(&call)
    }

    /// Sends `signal` to the worker's process group unless the worker is already reaped.
    pub(crate) fn signal(&self, signal: i32) {
        let reaped = self.reaped.lock();
        if !*reaped {
            if let Err(e) = sys::kill_group(self.pid, signal) {
                log::warn!("worker {} (pid {}): signal {signal} failed: {e}", self.id, self.pid);
            }
        }
    }

    /// The last lines the worker wrote to stderr, oldest first.
    pub(crate) fn stderr_tail(&self) -> Vec<String> {
        self.stderr_tail.lock().iter().cloned().collect()
    }

    /// Lets the worker's threads end: closes stdin and stops the writer. Call after its
    /// `Exited` event; then join once [`finished`](Worker::finished).
    pub(crate) fn release(&mut self) {
        self.close_stdin();
        self.doorbell = None;
    }

    /// Whether every thread of the worker has ended (joining will not block). A grandchild that
    /// escaped the process group and still holds stderr keeps the stderr reader alive.
    pub(crate) fn finished(&self) -> bool {
        self.threads.iter().all(|t| t.is_finished())
    }

    /// Joins the worker's threads; blocks unless [`finished`](Worker::finished).
    pub(crate) fn join(mut self) {
        self.release();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// What the stdout reader needs to reap the process once its output ends.
struct Reaper {
    child: Child,
    id: WorkerId,
    reaped: Arc<Mutex<bool>>,
    stderr_done: Receiver<()>,
    events: Sender<WorkerEvent>,
}

impl Reaper {
    /// Waits for the process to exit, kills whatever is left of its group, reaps it, waits
    /// briefly for its last stderr lines, and reports the exit.
    fn reap(mut self) {
        let pid = self.child.id();
        let _ = sys::wait_exit_no_reap(pid);
        let status = {
            let mut reaped = self.reaped.lock();
            // The leader is a zombie, so its group id cannot have been reused: safe to signal.
            let _ = sys::kill_group(pid, sys::SIGKILL);
            let status = self.child.wait();
            *reaped = true;
            status
        };
        let exit = match status {
            Ok(s) => match (s.code(), s.signal()) {
                (Some(c), _) => ExitKind::Code(c),
                (None, Some(sig)) => ExitKind::Signal(sig),
                _ => ExitKind::Unknown,
            },
            Err(_) => ExitKind::Unknown,
        };
        let _ = self.stderr_done.recv_timeout(STDERR_DRAIN);
        let _ = self.events.send(WorkerEvent::Exited(self.id, exit));
    }
}

fn read_stdout(stdout: ChildStdout, max: usize, waiting: &Waiting, done: Arc<AtomicU64>, reaper: Reaper) {
    let id = reaper.id;
    let mut r = BufReader::with_capacity(64 * 1024, stdout);
    let mut buf = Vec::new();
    loop {
        let outcome = match protocol::read_frame_bytes(&mut r, &mut buf, max) {
            Ok(true) => match protocol::decode(&buf) {
                Ok(msg) => Ok(Some(msg)),
                // A well-framed reply that cannot be decoded (say, nested deeper than the
                // decoder allows) fails only its own call; the stream is still in step.
                Err(e) => match protocol::reply_id(&buf) {
                    Some(call) => {
                        let err = Error::Protocol(format!("the reply could not be decoded: {e}"));
                        if !deliver(waiting, &done, &reaper.events, id, call, Err(err)) {
                            break;
                        }
                        continue;
                    }
                    None => Err(e),
                },
            },
            Ok(false) => Ok(None),
            Err(e) => Err(e),
        };
        match outcome {
            Ok(Some(msg)) => {
                log::trace!("worker {id} -> {msg:?}");
                let sent = match msg {
                    Msg::Result { id: call, value } => {
                        deliver(waiting, &done, &reaper.events, id, call, Ok(value))
                    }
                    Msg::Error { id: call, error } => {
                        deliver(waiting, &done, &reaper.events, id, call, Err(Error::Python(error)))
                    }
                    other => reaper.events.send(WorkerEvent::Frame(id, other)).is_ok(),
                };
                if !sent {
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                let err = match protocol::as_too_large(&e) {
                    Some(t) => Error::FrameTooLarge { size: t.size, max: t.max },
                    None => Error::Protocol(format!("worker {id} stdout: {e}")),
                };
                let _ = reaper.events.send(WorkerEvent::Broken(id, err));
                break;
            }
        }
        // Give back memory held for one unusually large frame.
        if buf.capacity() > 1 << 20 {
            buf = Vec::new();
        }
    }
    drop(r);
    reaper.reap();
}

/// Hands a reply to its caller if the call is still waiting, then tells the dispatcher. The
/// caller first, for latency (measured: the other order costs a sequential caller ~40%); but
/// `done` is counted before either, so a caller that calls again before the dispatcher has heard
/// can see that this worker's capacity is already on its way back. False if the dispatcher is
/// gone.
fn deliver(
    waiting: &Waiting,
    done: &AtomicU64,
    events: &Sender<WorkerEvent>,
    worker: WorkerId,
    call: u64,
    result: Result<Value>,
) -> bool {
    let ok = result.is_ok();
    let reply = waiting.lock().remove(&call);
    let answered = reply.is_some();
    done.fetch_add(1, Ordering::Release);
    if let Some(reply) = reply {
        // The caller may have given up at its own deadline; that is fine.
        let _ = reply.send(result);
    }
    events.send(WorkerEvent::Completed { worker, call, ok, answered }).is_ok()
}

/// Calls on their way through one worker, by id.
type Waiting = Arc<Mutex<HashMap<u64, ReplyTx>>>;

/// The worker's stdin and the bytes it has not taken yet.
struct Outbox {
    /// `None` once closed (or broken).
    pipe: Option<ChildStdin>,
    pending: VecDeque<Vec<u8>>,
    /// How much of `pending.front()` is already written.
    offset: usize,
    close_when_flushed: bool,
}

/// One non-blocking write: how many bytes the pipe took (0 if it is full).
fn write_some(mut pipe: &ChildStdin, bytes: &[u8]) -> io::Result<usize> {
    loop {
        match pipe.write(bytes) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// The writer thread: finishes frames the pipe could not take at once. The lock is held only
/// for non-blocking writes; waiting for room happens outside it.
fn write_stdin(outbox: &Mutex<Outbox>, doorbell: Receiver<()>) {
    while doorbell.recv().is_ok() {
        loop {
            let mut ob = outbox.lock();
            let Outbox { pipe, pending, offset, close_when_flushed } = &mut *ob;
            let Some(p) = pipe.as_ref() else {
                pending.clear();
                break;
            };
            let Some(front) = pending.front() else {
                if *close_when_flushed {
                    *pipe = None;
                }
                break;
            };
            match write_some(p, &front[*offset..]) {
                Ok(0) => {
                    let fd = p.as_raw_fd();
                    drop(ob);
                    sys::wait_writable(fd, Duration::from_millis(100));
                }
                Ok(n) => {
                    *offset += n;
                    if *offset == front.len() {
                        pending.pop_front();
                        *offset = 0;
                    }
                }
                Err(_) => {
                    *pipe = None;
                    pending.clear();
                    break;
                }
            }
        }
    }
    // The dispatcher dropped the worker: close the pipe so the process reads EOF.
    outbox.lock().pipe = None;
}

fn read_stderr(
    stderr: ChildStderr,
    pool: &str,
    id: WorkerId,
    tail: &Mutex<VecDeque<String>>,
    done: Sender<()>,
) {
    let mut r = BufReader::new(stderr);
    let mut line = Vec::new();
    loop {
        line.clear();
        match r.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                let mut text = text.trim_end_matches(['\n', '\r']).to_string();
                if text.len() > STDERR_LINE_MAX {
                    let mut cut = STDERR_LINE_MAX;
                    while !text.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    text.truncate(cut);
                }
                log::debug!(target: "snakepit::python", "[{pool}] worker {id}: {text}");
                let mut tail = tail.lock();
                if tail.len() == STDERR_LINES {
                    tail.pop_front();
                }
                tail.push_back(text);
            }
        }
    }
    let _ = done.send(());
}
