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

use crate::call::Calls;
use crate::dispatcher::Admit;
use crate::error::{Error, Result};
use crate::pool::CallOptions;
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

/// A submitted call: its command, arguments, options, when it was submitted, and its ticket.
type Job = (String, Value, CallOptions, Instant, Arc<Ticket>);

/// Submitted calls not taken by a runner yet, and runners waiting for one: a runner is started
/// whenever the first outnumber the second, so that submitted calls run at once, side by side.
#[derive(Default)]
struct Load {
    waiting_jobs: usize,
    idle_runners: usize,
}

/// The runner threads of a pool, started as submitted calls need them, up to a limit; calls
/// beyond it wait for a free runner. Joined at shutdown.
pub(crate) struct Runners {
    jobs: Mutex<Option<Sender<Job>>>,
    queue: Receiver<Job>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    load: Arc<Mutex<Load>>,
    max: usize,
}

impl Runners {
    pub(crate) fn new(max: usize) -> Runners {
        let (jobs, queue) = unbounded();
        Runners {
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
        let ticket = Arc::new(Ticket { state: Mutex::new((Stage::Submitted, Some(tx))) });
        let job = (command.to_string(), args, options, Instant::now(), ticket.clone());
        let start_one = {
            let jobs = self.jobs.lock();
            let Some(jobs) = jobs.as_ref() else { return Err(Error::ShuttingDown) };
            let mut load = self.load.lock();
            if jobs.send(job).is_err() {
                return Err(Error::ShuttingDown);
            }
            load.waiting_jobs += 1;
            let short = load.waiting_jobs > load.idle_runners;
            if short {
                load.idle_runners += 1; // the runner about to start
            }
            short
        };
        let handle = PendingCall { rx, ticket: ticket.clone(), calls: calls.clone() };
        if !start_one {
            return Ok(handle);
        }
        let mut threads = self.threads.lock();
        if threads.len() >= self.max {
            self.load.lock().idle_runners -= 1; // it waits for a runner to be free
            return Ok(handle);
        }
        let (queue, load, runner_calls) = (self.queue.clone(), self.load.clone(), calls.clone());
        let spawned = std::thread::Builder::new()
            .name(thread_name("run", &calls.config().name))
            .spawn(move || run(&runner_calls, &queue, &load));
        match spawned {
            Ok(h) => threads.push(h),
            Err(e) => {
                // The call waits for a runner that is free; with none at all, it has no one.
                self.load.lock().idle_runners -= 1;
                if threads.is_empty() {
                    ticket.finish(Err(Error::Spawn { program: "runner thread".into(), source: e }));
                }
            }
        }
        Ok(handle)
    }

    /// No more calls are taken; the runners finish the ones they have (which end fast once the
    /// pool is shut down) and are joined.
    pub(crate) fn stop(&self) {
        self.jobs.lock().take();
        for handle in self.threads.lock().drain(..) {
            let _ = handle.join();
        }
    }
}

fn run(calls: &Calls, queue: &Receiver<Job>, load: &Mutex<Load>) {
    for (command, args, options, since, ticket) in queue.iter() {
        {
            let mut load = load.lock();
            load.waiting_jobs -= 1;
            load.idle_runners -= 1;
        }
        if ticket.start() {
            // Whatever happens (a panicking logger, say), the call gets its one outcome.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                calls.call_pending(&command, args, options, since, &ticket)
            }));
            let result = result.unwrap_or_else(|_| {
                Err(Error::Io(std::io::Error::new(std::io::ErrorKind::Other, "the runner thread panicked")))
            });
            ticket.finish(result);
        }
        load.lock().idle_runners += 1;
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

    /// Cancels the call if it has not reached a worker yet: it leaves the queue at once, never
    /// runs, and its outcome is `Err(Cancelled)`. False if it is already running (it then runs
    /// to its outcome) or done.
    pub fn cancel(&self) -> bool {
        let mut st = self.ticket.state.lock();
        match st.0 {
            // Not on the board (yet): counted as failed here, as a queued call is by the board.
            Stage::Submitted | Stage::Taken => {
                self.calls.shared().board.lock().record(&Err(Error::Cancelled))
            }
            Stage::Queued(place) => {
                if !self.calls.shared().board.lock().withdraw_cancelled(place) {
                    return false; // a worker was handed to it just now
                }
            }
            Stage::Running | Stage::Done => return false,
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
            p.cancel();
        }
    }
}
