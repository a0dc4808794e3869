//! Calls that run in the background: [`PendingCall`] handles, `map` over many arguments, and
//! the pool's runner threads (`sp-run-<pool>`) that run them.
//!
//! A submitted call is run by a runner thread exactly as a blocking call is (it takes a lease,
//! exchanges the frames, gives the lease back); its one outcome goes to the handle through a
//! crossbeam channel, so one thread can wait on many calls, of several pools, with `select!`.
//! A call can be cancelled while it has not reached a worker: it is taken out of the queue at
//! once and answered `Cancelled`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, RecvTimeoutError, Sender, TryRecvError};
use parking_lot::Mutex;
use serde_json::Value;

use crate::binary::Payload;
use crate::call::Calls;
use crate::cancel::CancelToken;
use crate::dispatcher::Admit;
use crate::error::{Error, Result};
use crate::pool::CallOptions;
use crate::protocol::Progress;
use crate::worker::thread_name;

/// Where a submitted call is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Not taken by a runner yet.
    Submitted,
    /// Taken by a runner, not yet in the queue or on a worker.
    Taken,
    /// Waiting in the pool's queue, at this place.
    Queued(u64),
    /// On a worker (or on its way to one): it runs to its outcome.
    Running,
    /// Answered (or cancelled).
    Done,
}

/// What the handle and the runner share about one call.
#[derive(Debug)]
pub(crate) struct Ticket {
    state: Mutex<(Stage, Option<Sender<Result<Value>>>)>,
    /// A cancel of the call while it runs.
    pub(crate) cancel: CancelToken,
    /// Its last progress report.
    pub(crate) progress: Mutex<Option<Progress>>,
}

impl Ticket {
    /// The runner takes the call: false if it was cancelled first.
    fn start(&self) -> bool {
        let mut st = self.state.lock();
        if st.0 != Stage::Submitted {
            return false;
        }
        st.0 = Stage::Taken;
        true
    }

    /// Lets the call in with `admit` (the board's), unless it was cancelled first; records
    /// where it went under the same lock that `cancel()` takes, so that a cancel sees either a
    /// call not yet admitted or its place in the queue, never a call in between.
    pub(crate) fn admit<T>(&self, admit: impl FnOnce() -> Result<Admit<T>>) -> Result<Admit<T>> {
        let mut st = self.state.lock();
        if st.0 == Stage::Done {
            return Err(Error::Cancelled); // counted by the cancel
        }
        let admitted = admit()?;
        st.0 = match &admitted {
            Admit::Wait(_, place) => Stage::Queued(*place),
            _ => Stage::Running,
        };
        Ok(admitted)
    }

    /// The call left the queue with a lease: it runs to its outcome from here.
    pub(crate) fn leased(&self) {
        let mut st = self.state.lock();
        if matches!(st.0, Stage::Queued(_)) {
            st.0 = Stage::Running;
        }
    }

    /// Whether the call was cancelled (what a runner that found its queue place gone asks).
    pub(crate) fn cancelled(&self) -> bool {
        let st = self.state.lock();
        st.0 == Stage::Done && st.1.is_none()
    }

    /// Delivers the call's one outcome (dropped if the handle is gone: the call was detached).
    fn finish(&self, result: Result<Value>) {
        let sender = {
            let mut st = self.state.lock();
            st.0 = Stage::Done;
            st.1.take()
        };
        if let Some(tx) = sender {
            let _ = tx.send(result);
        }
    }
}

/// Work for a runner: a submitted call, or a task of the pool's (following up on a call whose
/// caller was answered while its worker still runs it).
type Job = Box<dyn FnOnce() + Send>;

/// Jobs not taken by a runner yet, and runners waiting for one: a runner is started whenever
/// the first outnumber the second, so that jobs run at once, side by side.
#[derive(Default)]
struct Load {
    waiting_jobs: usize,
    idle_runners: usize,
}

/// Threads of a pool that run jobs (`sp-<kind>-<pool>`), started as jobs need them, up to a
/// limit; jobs beyond it wait for a free thread. Joined at shutdown.
pub(crate) struct Runners {
    kind: &'static str,
    name: String,
    jobs: Mutex<Option<Sender<Job>>>,
    queue: Receiver<Job>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    load: Arc<Mutex<Load>>,
    max: usize,
}

impl std::fmt::Debug for Runners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runners").field("threads", &self.threads.lock().len()).finish_non_exhaustive()
    }
}

impl Runners {
    pub(crate) fn new(kind: &'static str, pool: &str, max: usize) -> Runners {
        let (jobs, queue) = unbounded();
        Runners {
            kind,
            name: pool.to_string(),
            jobs: Mutex::new(Some(jobs)),
            queue,
            threads: Mutex::new(Vec::new()),
            load: Arc::default(),
            max: max.max(1),
        }
    }

    /// Submits a call; its outcome comes through the returned handle. Its deadline runs from
    /// now.
    pub(crate) fn submit(
        &self,
        calls: &Arc<Calls>,
        command: &str,
        args: Value,
        options: CallOptions,
    ) -> Result<PendingCall> {
        let (tx, rx) = bounded(1);
        let ticket = Arc::new(Ticket {
            state: Mutex::new((Stage::Submitted, Some(tx))),
            cancel: CancelToken::default(),
            progress: Mutex::new(None),
        });
        let since = Instant::now();
        let (job_calls, job_ticket, command) = (calls.clone(), ticket.clone(), command.to_string());
        let job = Box::new(move || {
            if job_ticket.start() {
                // Whatever happens (a panicking logger, say), the call gets its one outcome.
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    job_calls
                        .call_pending(&command, args.into(), options, since, &job_ticket)
                        .map(Payload::into_value)
                }));
                let result = result.unwrap_or_else(|_| {
                    Err(Error::Io(std::io::Error::new(
                        std::io::ErrorKind::Other,
                        "the runner thread panicked",
                    )))
                });
                job_ticket.finish(result);
            }
        });
        match self.run(job) {
            Ok(()) => Ok(PendingCall { rx, ticket, calls: calls.clone() }),
            Err(Some(e)) => Err(e),
            Err(None) => Err(Error::ShuttingDown),
        }
    }

    /// Runs `task` on a runner; false (and it is dropped) once the runners are stopped or none
    /// can be started.
    pub(crate) fn spawn(&self, task: impl FnOnce() + Send + 'static) -> bool {
        self.run(Box::new(task)).is_ok()
    }

    /// Queues `job` and starts a runner for it if none is idle. `Err(None)` once stopped;
    /// `Err(Some(spawn error))` if no runner could be started and none exists.
    fn run(&self, job: Job) -> std::result::Result<(), Option<Error>> {
        let start_one = {
            let jobs = self.jobs.lock();
            let Some(jobs) = jobs.as_ref() else { return Err(None) };
            let mut load = self.load.lock();
            if jobs.send(job).is_err() {
                return Err(None);
            }
            load.waiting_jobs += 1;
            let short = load.waiting_jobs > load.idle_runners;
            if short {
                load.idle_runners += 1; // the runner about to start
            }
            short
        };
        if !start_one {
            return Ok(());
        }
        let mut threads = self.threads.lock();
        if threads.len() >= self.max {
            self.load.lock().idle_runners -= 1; // it waits for a runner to be free
            return Ok(());
        }
        let (queue, load) = (self.queue.clone(), self.load.clone());
        let spawned = std::thread::Builder::new().name(thread_name(self.kind, &self.name)).spawn(move || {
            for job in queue.iter() {
                {
                    let mut load = load.lock();
                    load.waiting_jobs -= 1;
                    load.idle_runners -= 1;
                }
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                load.lock().idle_runners += 1;
            }
        });
        match spawned {
            Ok(h) => threads.push(h),
            Err(e) => {
                // The job waits for a runner that is free; with none at all, it has no one.
                self.load.lock().idle_runners -= 1;
                if threads.is_empty() {
                    // Take it back out: nobody would ever run it.
                    if let Ok(job) = self.queue.try_recv() {
                        self.load.lock().waiting_jobs -= 1;
                        drop(job);
                    }
                    return Err(Some(Error::Spawn { program: "runner thread".into(), source: e }));
                }
            }
        }
        Ok(())
    }

    /// No more jobs are taken; the runners finish the ones they have (which end fast once the
    /// pool is shut down) and are joined.
    pub(crate) fn stop(&self) {
        self.jobs.lock().take();
        // Joined without the lock: a job may still be starting a job of another pool of runners.
        let threads = std::mem::take(&mut *self.threads.lock());
        for handle in threads {
            let _ = handle.join();
        }
    }
}

/// A call running in the background ([`Pool::submit`](crate::Pool::submit)). Its outcome is
/// handed out once. Dropping the handle detaches the call: it still runs, and its result is
/// discarded (and counted in `stats()` like any other).
#[derive(Debug)]
pub struct PendingCall {
    rx: Receiver<Result<Value>>,
    ticket: Arc<Ticket>,
    calls: Arc<Calls>,
}

impl PendingCall {
    /// Blocks until the call's outcome.
    pub fn wait(self) -> Result<Value> {
        self.rx.recv().unwrap_or(Err(Error::ShuttingDown))
    }

    /// The call's outcome if it comes within `timeout`; `None` if it is still running (or was
    /// already handed out).
    pub fn wait_timeout(&self, timeout: Duration) -> Option<Result<Value>> {
        match self.rx.recv_timeout(timeout) {
            Ok(result) => Some(result),
            Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => None,
        }
    }

    /// The call's outcome if it has come; `None` if not yet (or already handed out).
    pub fn try_result(&self) -> Option<Result<Value>> {
        match self.rx.try_recv() {
            Ok(result) => Some(result),
            Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => None,
        }
    }

    /// The channel the outcome arrives on, to wait on many calls (of several pools) at once
    /// with `crossbeam_channel::select!` or `Select`.
    pub fn receiver(&self) -> &Receiver<Result<Value>> {
        &self.rx
    }

    /// The last progress the command reported (`snakepit.progress(done, total, message)`), if
    /// any yet.
    pub fn progress(&self) -> Option<Progress> {
        self.ticket.progress.lock().clone()
    }

    /// Cancels the call. One still in the queue leaves it at once, never runs, and its outcome
    /// is `Err(Cancelled)`. One that runs is cancelled in steps, each `cancel_grace` apart: the
    /// command is asked (`snakepit.cancelled()`), then interrupted (`snakepit.Cancelled` is
    /// raised in it), then given up on (a process worker is killed and replaced). Its outcome
    /// is `Err(Cancelled)` once it stops, unless it finished first: then it is its result.
    /// False if the call is already done.
    pub fn cancel(&self) -> bool {
        self.cancel_where(true)
    }

    /// Cancels the call if it has not reached a worker yet (a call that runs goes on).
    pub(crate) fn cancel_queued(&self) -> bool {
        self.cancel_where(false)
    }

    fn cancel_where(&self, running_too: bool) -> bool {
        let mut st = self.ticket.state.lock();
        match st.0 {
            // Not on the board (yet): counted as failed here, as a queued call is by the board.
            Stage::Submitted | Stage::Taken => {
                self.calls.shared().board.lock().record_failure(&Error::Cancelled)
            }
            Stage::Queued(place) => {
                if !self.calls.shared().board.lock().withdraw_cancelled(place) {
                    // A worker was handed to it just now: it is about to run.
                    if !running_too {
                        return false;
                    }
                    drop(st);
                    self.ticket.cancel.request(); // seen as soon as its exchange starts
                    return true;
                }
            }
            Stage::Running if !running_too => return false,
            Stage::Running => {
                drop(st);
                self.ticket.cancel.request();
                return true;
            }
            Stage::Done => return false,
        }
        st.0 = Stage::Done;
        if let Some(tx) = st.1.take() {
            let _ = tx.send(Err(Error::Cancelled));
        }
        true
    }
}

/// The outcomes of a `map`, one per argument, in the order of the arguments
/// ([`Pool::map`](crate::Pool::map)).
pub struct MapResults<'p, I: Iterator<Item = Value>> {
    pool: &'p crate::Pool,
    command: String,
    args: I,
    in_flight: usize,
    /// Submitted calls, or the error of a submit that failed, in argument order.
    pending: VecDeque<Result<PendingCall>>,
}

impl<'p, I: Iterator<Item = Value>> MapResults<'p, I> {
    pub(crate) fn new(pool: &'p crate::Pool, command: &str, args: I, in_flight: usize) -> Self {
        MapResults {
            pool,
            command: command.to_string(),
            args,
            in_flight: in_flight.max(1),
            pending: VecDeque::new(),
        }
    }

    fn fill(&mut self) {
        while self.pending.len() < self.in_flight {
            let Some(args) = self.args.next() else { break };
            self.pending.push_back(self.pool.submit_with(&self.command, args, CallOptions::default()));
        }
    }
}

impl<I: Iterator<Item = Value>> Iterator for MapResults<'_, I> {
    type Item = Result<Value>;

    fn next(&mut self) -> Option<Result<Value>> {
        // `in_flight` submitted, the first of them waited for.
        self.fill();
        let first = self.pending.pop_front()?;
        Some(first.and_then(PendingCall::wait))
    }
}

impl<I: Iterator<Item = Value>> Drop for MapResults<'_, I> {
    fn drop(&mut self) {
        // Calls not run yet are cancelled; the running ones are detached.
        for p in self.pending.iter().flatten() {
            p.cancel_queued();
        }
    }
}

/// The outcomes of a `map_unordered`, each with the index of its argument, in the order the
/// calls end ([`Pool::map_unordered`](crate::Pool::map_unordered)).
pub struct MapUnordered<'p, I: Iterator<Item = Value>> {
    pool: &'p crate::Pool,
    command: String,
    args: I,
    next_index: usize,
    in_flight: usize,
    /// Submitted calls with their indexes.
    running: Vec<(usize, PendingCall)>,
    /// Outcomes known at submission (a submit that failed).
    ready: VecDeque<(usize, Result<Value>)>,
}

impl<'p, I: Iterator<Item = Value>> MapUnordered<'p, I> {
    pub(crate) fn new(pool: &'p crate::Pool, command: &str, args: I, in_flight: usize) -> Self {
        MapUnordered {
            pool,
            command: command.to_string(),
            args,
            next_index: 0,
            in_flight: in_flight.max(1),
            running: Vec::new(),
            ready: VecDeque::new(),
        }
    }

    fn fill(&mut self) {
        while self.running.len() + self.ready.len() < self.in_flight {
            let Some(args) = self.args.next() else { break };
            let index = self.next_index;
            self.next_index += 1;
            match self.pool.submit_with(&self.command, args, CallOptions::default()) {
                Ok(call) => self.running.push((index, call)),
                Err(e) => self.ready.push_back((index, Err(e))),
            }
        }
    }
}

impl<I: Iterator<Item = Value>> Iterator for MapUnordered<'_, I> {
    type Item = (usize, Result<Value>);

    fn next(&mut self) -> Option<(usize, Result<Value>)> {
        self.fill();
        if let Some(done) = self.ready.pop_front() {
            return Some(done);
        }
        if self.running.is_empty() {
            return None;
        }
        let mut select = crossbeam_channel::Select::new();
        for (_, call) in &self.running {
            select.recv(call.receiver());
        }
        let op = select.select();
        let at = op.index();
        let result = op.recv(self.running[at].1.receiver()).unwrap_or(Err(Error::ShuttingDown));
        let (index, _) = self.running.swap_remove(at);
        Some((index, result))
    }
}

impl<I: Iterator<Item = Value>> Drop for MapUnordered<'_, I> {
    fn drop(&mut self) {
        // As for `map`: calls not run yet are cancelled; the running ones are detached.
        for (_, call) in &self.running {
            call.cancel_queued();
        }
    }
}
