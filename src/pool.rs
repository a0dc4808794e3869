//! [`Pool`]: start-up, the blocking calls, stats, and shutdown.
//!
//! A call is owned by its caller from start to end: it takes a lease on a worker (or waits for
//! one, in order), exchanges the frames with the worker itself, and records the one outcome on
//! the board as it gives the lease back. The dispatcher is not on the path.

use std::ffi::OsString;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Sender};
use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::config::{PoolBuilder, PoolConfig, Profile};
use crate::dispatcher::{Admit, Board, Dispatcher, Effects, Lease, Request, Return, Shared, Spawner};
use crate::error::{Error, Result, TimeoutKind};
use crate::events::{Emitter, Event};
use crate::mailbox::Missed;
use crate::stats::PoolStats;
use crate::worker::{thread_name, Conn, Exchange, KillReason, Sending, SpawnSpec};
use crate::{embed, housekeeper, protocol, python};

/// The largest frame a freeing caller writes for the next waiting call: one atomic pipe write
/// (`PIPE_BUF`), which a non-blocking pipe takes whole or not at all.
const PREWRITE_MAX: usize = 4096;
/// How long a caller whose queue deadline passed just as a lease was handed to it waits for
/// that lease to arrive (the handing thread is between two lines of code).
const HANDOFF_WAIT: Duration = Duration::from_secs(1);

/// How much longer than its own limits the pool waits for the dispatcher before giving up on
/// it (it enforces those limits itself; this only guards against a wedged thread).
const DISPATCHER_SLACK: Duration = Duration::from_secs(10);

/// Options for one call, for [`Pool::call_with`].
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct CallOptions {
    /// The call's whole deadline (queue wait plus execution). Defaults to the pool's
    /// `request_timeout`.
    pub timeout: Option<Duration>,
}

impl CallOptions {
    /// Options with every default.
    pub fn new() -> Self {
        Self::default()
    }
    /// Sets the call's whole deadline, replacing the pool's `request_timeout` for this call.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
}

/// A pool of Python worker processes. `Send + Sync`: share it with `Arc` or scoped threads.
///
/// Dropping the pool shuts it down (see [`Pool::shutdown`]); no worker process or thread
/// outlives it.
pub struct Pool {
    config: Arc<PoolConfig>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    /// Held for the whole of a shutdown, so a second `shutdown()` returns only when the pool is
    /// down.
    threads: Mutex<Threads>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("name", &self.config.name).field("size", &self.config.size).finish()
    }
}

impl PoolBuilder {
    /// Validates the settings, starts every worker at once, and returns when all have sent
    /// `ready`. If any fails, the others are killed and the error says why (with the Python
    /// traceback when the adapter failed to import).
    pub fn build(self) -> Result<Pool> {
        let config = Arc::new(self.config);
        config.validate()?;
        let spec = spawn_spec(&config)?;
        let spawn_err = |what: &str| {
            let what = what.to_string();
            move |source| Error::Spawn { program: what, source }
        };
        let (emitter, events) =
            Emitter::start(&config.name, config.on_event.clone()).map_err(spawn_err("event thread"))?;
        let mut threads = Threads { events, ..Threads::default() };
        let (requests, requests_rx) = unbounded();
        let shared = Arc::new(Shared {
            name: config.name.clone(),
            board: parking_lot::Mutex::new(Board::new(config.max_queue)),
            requests,
            emitter,
        });
        let (started_tx, started_rx) = bounded(1);
        let dispatcher = Dispatcher::new(
            config.clone(),
            shared.clone(),
            Box::new(Spawner(spec)),
            requests_rx,
            started_tx,
            Instant::now(),
        );
        threads.dispatcher = Some(
            std::thread::Builder::new()
                .name(thread_name("disp", &config.name))
                .spawn(move || dispatcher.run())
                .map_err(spawn_err("dispatcher thread"))?,
        );
        let pool = Pool { config, shared, next_id: AtomicU64::new(1), threads: Mutex::new(threads) };
        match started_rx.recv_timeout(pool.config.startup_timeout + DISPATCHER_SLACK) {
            Ok(Ok(())) => {}
            // The dispatcher has killed the workers; dropping the pool joins its threads.
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(Error::timeout(TimeoutKind::Startup)),
        }
        pool.start_housekeeper()?;
        Ok(pool)
    }
}

/// The pool's threads besides the workers' own, joined at shutdown.
#[derive(Default)]
struct Threads {
    dispatcher: Option<JoinHandle<()>>,
    /// The housekeeper and the channel whose closing stops it.
    housekeeper: Option<(JoinHandle<()>, Sender<()>)>,
    events: Option<JoinHandle<()>>,
}

/// Resolves the interpreter and the embedded package, and assembles the workers' command.
fn spawn_spec(config: &PoolConfig) -> Result<SpawnSpec> {
    let package = embed::package_dir()?;
    let python = if config.launcher.is_empty() {
        let python = python::resolve(config.python.as_deref())?;
        embed::precompile(&python, &package);
        python.executable
    } else {
        // The interpreter runs wherever the launcher puts it: pass it on as given.
        config.python.clone().unwrap_or_else(|| std::path::PathBuf::from("python3"))
    };
    // The embedded package goes first so the worker always speaks this library's protocol;
    // then the pool's folders, then a PYTHONPATH from the pool's env or inherited.
    let mut parts = vec![package];
    parts.extend(config.python_path.iter().cloned());
    let user_path = config
        .env
        .iter()
        .rev()
        .find(|(k, _)| k == "PYTHONPATH")
        .map(|(_, v)| OsString::from(v))
        .or_else(|| std::env::var_os("PYTHONPATH"));
    if let Some(p) = user_path {
        parts.extend(std::env::split_paths(&p));
    }
    let python_path = std::env::join_paths(parts)
        .map_err(|e| Error::config("python_path", format!("cannot join folders into PYTHONPATH: {e}")))?;
    Ok(SpawnSpec {
        pool: config.name.clone(),
        python,
        adapter: config.adapter.clone(),
        env: default_env(config)
            .chain(config.env.iter().filter(|(k, _)| k != "PYTHONPATH").cloned())
            .collect(),
        python_path,
        max_frame: config.max_frame_size,
        args: config.args.clone(),
        launcher: config.launcher.clone(),
        threads: if config.profile == Profile::Thread { config.threads_per_worker } else { 0 },
        allow_unsafe_threads: config.allow_unsafe_threads,
    })
}

/// Variables set in every worker before the pool's own `env` (which overrides them). In the
/// process profile, numeric libraries get one thread each: N worker processes each starting a
/// BLAS thread per core would oversubscribe the machine N times.
fn default_env(config: &PoolConfig) -> impl Iterator<Item = (String, String)> {
    const ONE_THREAD: [&str; 5] = [
        "OPENBLAS_NUM_THREADS",
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "NUMEXPR_NUM_THREADS",
        "VECLIB_MAXIMUM_THREADS",
    ];
    let vars: &[&str] = if config.profile == Profile::Process { &ONE_THREAD } else { &[] };
    vars.iter().map(|k| (k.to_string(), "1".to_string()))
}

impl Pool {
    /// A builder with every setting at its default.
    pub fn builder() -> PoolBuilder {
        PoolBuilder::default()
    }

    /// The pool's settings.
    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Runs `command` on a worker with `args` (a JSON object of keyword arguments, an array of
    /// positional arguments, or null) and returns what it returned.
    pub fn call(&self, command: &str, args: Value) -> Result<Value> {
        self.call_with(command, args, CallOptions::default())
    }

    /// [`call`](Pool::call) with serde on both sides: `args` is serialised, the result is
    /// deserialised into `R`.
    pub fn call_as<A: Serialize + ?Sized, R: DeserializeOwned>(&self, command: &str, args: &A) -> Result<R> {
        let args = serde_json::to_value(args)?;
        let value = self.call(command, args)?;
        Ok(serde_json::from_value(value)?)
    }

    /// [`call`](Pool::call) with per-call options.
    ///
    /// Blocks until the call returns exactly one result, never past its deadline. A call that
    /// is still queued at its deadline fails with `Timeout(Queue)`; one that is running fails
    /// with `Timeout(Call)` and its worker is killed and replaced (in the thread profile, its
    /// thread is left to finish unless `kill_on_timeout` is set).
    pub fn call_with(&self, command: &str, args: Value, options: CallOptions) -> Result<Value> {
        if !matches!(args, Value::Object(_) | Value::Array(_) | Value::Null) {
            return Err(Error::InvalidArgs(format!(
                "args must be a JSON object, array or null, found {}",
                protocol::json_kind(&args)
            )));
        }
        if depth(&args) > MAX_ARGS_DEPTH {
            return Err(Error::InvalidArgs(format!("args nest deeper than {MAX_ARGS_DEPTH} levels")));
        }
        let timeout = options.timeout.unwrap_or(self.config.request_timeout);
        if timeout.is_zero() {
            return Err(Error::config("CallOptions::timeout", "must be greater than zero"));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = protocol::encode_call(id, command, &args, self.config.max_frame_size).map_err(|e| {
            match protocol::as_too_large(&e) {
                Some(t) => Error::FrameTooLarge { size: t.size, max: t.max },
                None => Error::Io(e),
            }
        })?;
        let frame = Arc::new(frame);
        let enqueued = Instant::now();
        let far = enqueued + Duration::from_secs(100 * 365 * 24 * 3600);
        let deadline = enqueued.checked_add(timeout).unwrap_or(far).min(far);
        let queue_deadline = match self.config.queue_timeout {
            Some(q) => deadline.min(enqueued.checked_add(q).unwrap_or(far)),
            None => deadline,
        };
        let queue_timeout = self.config.queue_timeout.map_or(timeout, |q| q.min(timeout));
        self.run(command, id, &frame, enqueued, (queue_deadline, deadline))
            .map_err(|e| e.in_call(command, timeout, queue_timeout))
    }

    /// Runs an admitted call to its one outcome.
    fn run(
        &self,
        command: &str,
        id: u64,
        frame: &Arc<Vec<u8>>,
        enqueued: Instant,
        (queue_deadline, deadline): (Instant, Instant),
    ) -> Result<Value> {
        // A worker found dead (or untrustworthy) at checkout never saw the call: try another,
        // until the call's queue deadline (each such worker is closed, so none is tried twice).
        loop {
            let lease = self.lease(command, frame, queue_deadline)?;
            let started = Instant::now();
            if !lease.sent && started >= queue_deadline {
                // Its time ran out before a worker took it: a queue time-out, which costs no
                // worker (writing it now would only get the worker killed).
                let mut fx = Effects::default();
                let mut board = self.shared.board.lock();
                board.give_back(lease, Return::Done, None, &mut fx);
                board.record_queue_timeout();
                drop(board);
                self.shared.apply(fx);
                return Err(Error::timeout(TimeoutKind::Queue));
            }
            let what = Sending::Call { sent: lease.sent };
            let exchange = lease.conn.exchange(frame, id, deadline, what);
            if let Some(result) = self.finish(lease, exchange, (id, command), enqueued, started, deadline) {
                return result;
            }
        }
    }

    /// Takes a lease on a worker: at once if one is free and nobody waits, else in order, until
    /// `queue_deadline`. Refusals and queue time-outs are counted here. A waiting call leaves
    /// its frame, so that the caller who frees a process worker can write it on its behalf (the
    /// lease then comes `sent`).
    fn lease(
        &self,
        command: &str,
        frame: &Arc<Vec<u8>>,
        queue_deadline: Instant,
    ) -> Result<Lease<Arc<Conn>>> {
        let prewrite =
            (self.config.profile == Profile::Process && frame.len() <= PREWRITE_MAX).then(|| frame.clone());
        let mut fx = Effects::default();
        let admitted = self.shared.board.lock().admit(command, prewrite, queue_deadline, &mut fx);
        self.shared.apply(fx);
        let (rx, place) = match admitted? {
            Admit::Run(lease) => return Ok(lease),
            Admit::Wait(rx, place) => (rx, place),
        };
        let handed = match rx.recv_deadline(queue_deadline) {
            Ok(lease) => return Ok(lease),
            Err(Missed::Timeout) => {
                if self.shared.board.lock().withdraw(place) {
                    return Err(Error::timeout(TimeoutKind::Queue));
                }
                // A lease was handed to us just as the deadline passed; it is on its way.
                rx.recv_deadline(Instant::now() + HANDOFF_WAIT).ok()
            }
            Err(Missed::Closed) => None,
        };
        match handed {
            Some(lease) => Ok(lease),
            None => {
                // The queue was emptied (shutdown, or the pool is degraded).
                let mut board = self.shared.board.lock();
                let err = match board.dropped_for.clone() {
                    crate::dispatcher::Gate::Degraded(last_error) => Error::Degraded { last_error },
                    _ => Error::ShuttingDown,
                };
                board.record(&Err(err.duplicate()));
                Err(err)
            }
        }
    }

    /// Turns an exchange into the call's one outcome, records it as the lease goes back, and
    /// announces it. `None`: the call never reached the worker; run it elsewhere.
    fn finish(
        &self,
        lease: Lease<Arc<Conn>>,
        exchange: Exchange,
        (id, command): (u64, &str),
        enqueued: Instant,
        started: Instant,
        deadline: Instant,
    ) -> Option<Result<Value>> {
        let conn = lease.conn.clone();
        let (how, result) = match exchange {
            Exchange::Reply(result) => (Return::Done, result),
            Exchange::NotSent { dead } => {
                let how = if dead { Return::Dead } else { Return::Unusable };
                let mut fx = Effects::default();
                self.shared.board.lock().give_back(lease, how, None, &mut fx);
                self.shared.apply(fx);
                return None;
            }
            Exchange::TimedOut { running, corrupt } => {
                let how = if corrupt || (running && self.config.kills_on_timeout()) {
                    // Thread profile: its other calls die with it (collateral).
                    conn.mark_killed(KillReason::CallTimeout);
                    Return::Kill(KillReason::CallTimeout)
                } else if running && self.config.profile == Profile::Thread {
                    Return::Abandoned
                } else {
                    Return::Done
                };
                log::warn!(
                    "[{}] call {id} `{command}` timed out on worker {}",
                    self.config.name,
                    lease.worker
                );
                (how, Err(Error::timeout(TimeoutKind::Call)))
            }
            Exchange::Died => {
                let err = conn.death_error(deadline);
                (Return::Died, Err(err))
            }
            Exchange::Broken(err) => {
                conn.mark_broken(err.duplicate());
                (Return::Kill(KillReason::Protocol), Err(err))
            }
        };
        let ended = Instant::now();
        let (queue_wait, execution) = (started.saturating_duration_since(enqueued), ended - started);
        let mut fx = Effects::default();
        self.shared.board.lock().give_back(lease, how, Some((&result, queue_wait, execution)), &mut fx);
        self.shared.apply(fx);
        if self.shared.emitter.enabled() {
            self.shared.emitter.emit(Event::CallCompleted {
                pool: self.config.name.clone(),
                command: command.to_string(),
                queue_wait,
                execution,
                ok: result.is_ok(),
            });
        }
        Some(result)
    }

    /// A snapshot of the pool and each of its workers.
    pub fn stats(&self) -> Result<PoolStats> {
        let (tx, rx) = bounded(1);
        self.shared.requests.send(Request::Stats(tx)).map_err(|_| Error::ShuttingDown)?;
        rx.recv_timeout(DISPATCHER_SLACK).map_err(|_| Error::ShuttingDown)
    }

    /// Replaces worker `id` (see [`WorkerStats::id`](crate::WorkerStats::id)) with a fresh
    /// one, make before break: the replacement starts and must be ready before the worker stops
    /// taking calls; its calls in flight then finish. Returns once the replacement is ready
    /// and the worker is draining. `UnknownWorker` if no ready worker has that id; the start-up
    /// error if the replacement cannot start (the worker then keeps serving).
    pub fn recycle_worker(&self, id: u64) -> Result<()> {
        let (tx, rx) = bounded(1);
        self.shared
            .requests
            .send(Request::RecycleWorker { worker: id, reply: tx })
            .map_err(|_| Error::ShuttingDown)?;
        let bound = self.config.startup_timeout + DISPATCHER_SLACK;
        rx.recv_timeout(bound).unwrap_or(Err(Error::timeout(TimeoutKind::Startup)))
    }

    /// A rolling restart (e.g. after deploying new Python code): recycles every worker that is
    /// ready now, one at a time, each make before break. Returns the first error.
    pub fn recycle_all(&self) -> Result<()> {
        let ids: Vec<u64> = self
            .stats()?
            .workers
            .iter()
            .filter(|w| w.state == crate::WorkerState::Ready)
            .map(|w| w.id)
            .collect();
        for id in ids {
            match self.recycle_worker(id) {
                // It died or was recycled meanwhile: it is already fresh.
                Ok(()) | Err(Error::UnknownWorker { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn start_housekeeper(&self) -> Result<()> {
        let Some(tick) = housekeeper::tick(&self.config) else { return Ok(()) };
        let (stop_tx, stop_rx) = bounded::<()>(0);
        let (cfg, shared) = (self.config.clone(), self.shared.clone());
        let handle = std::thread::Builder::new()
            .name(thread_name("keep", &self.config.name))
            .spawn(move || housekeeper::run(cfg, shared, tick, stop_rx))
            .map_err(|source| Error::Spawn { program: "housekeeper thread".into(), source })?;
        self.threads.lock().housekeeper = Some((handle, stop_tx));
        Ok(())
    }

    /// Stops the pool: new calls are refused, queued calls fail with `ShuttingDown`, in-flight
    /// calls get `shutdown_timeout` to finish (then fail with `Timeout(Shutdown)`), workers are
    /// sent `shutdown` and EOF, then SIGTERM and SIGKILL (`stop_timeout` apart) to their process
    /// groups if they do not exit, and every thread is joined. Returns `Err(Timeout(Shutdown))`
    /// if calls were cut; a worker that had to be forced is only logged. Calling it again, from
    /// any thread, returns once the pool is down.
    pub fn shutdown(&self) -> Result<()> {
        let mut threads = self.threads.lock();
        if let Some((handle, stop)) = threads.housekeeper.take() {
            drop(stop);
            let _ = handle.join();
        }
        let Some(dispatcher) = threads.dispatcher.take() else { return Ok(()) };
        let (tx, rx) = bounded(1);
        let mut result = Ok(());
        if self.shared.requests.send(Request::Shutdown(tx)).is_ok() {
            let bound = self.config.shutdown_timeout + 3 * self.config.stop_timeout + DISPATCHER_SLACK;
            match rx.recv_timeout(bound) {
                Ok(report) => {
                    if report.forced > 0 {
                        log::warn!(
                            "[{}] shutdown: {} workers did not exit within stop_timeout ({:?}) and were signalled",
                            self.config.name,
                            report.forced,
                            self.config.stop_timeout
                        );
                    }
                    if report.calls_cut > 0 {
                        log::warn!(
                            "[{}] shutdown: {} calls cut at the end of the grace period",
                            self.config.name,
                            report.calls_cut
                        );
                        result = Err(Error::timeout(TimeoutKind::Shutdown));
                    }
                }
                Err(_) => {
                    log::error!(
                        "[{}] shutdown: the dispatcher did not finish within {bound:?}",
                        self.config.name
                    );
                    return Err(Error::timeout(TimeoutKind::Shutdown));
                }
            }
        }
        let _ = dispatcher.join();
        if let Some(events) = threads.events.take() {
            // The event thread delivers what is queued, then ends; a callback stuck for good
            // is left behind rather than hanging the shutdown.
            let end = Instant::now() + DISPATCHER_SLACK;
            while !events.is_finished() && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(2));
            }
            if events.is_finished() {
                let _ = events.join();
            } else {
                log::error!(
                    "[{}] shutdown: the on_event callback did not return; left running",
                    self.config.name
                );
            }
        }
        result
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            log::warn!("[{}] shutdown on drop: {e}", self.config.name);
        }
    }
}

/// How deep a call's arguments may nest: well within what both sides' JSON decoders take.
const MAX_ARGS_DEPTH: usize = 100;

/// The nesting depth of a JSON value (a scalar is 0), without recursion.
fn depth(v: &Value) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(v, 0usize)];
    while let Some((v, d)) = stack.pop() {
        deepest = deepest.max(d);
        match v {
            Value::Array(items) => stack.extend(items.iter().map(|x| (x, d + 1))),
            Value::Object(map) => stack.extend(map.values().map(|x| (x, d + 1))),
            _ => {}
        }
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_counts_nesting() {
        assert_eq!(depth(&serde_json::json!(1)), 0);
        assert_eq!(depth(&serde_json::json!({"a": [1, {"b": []}]})), 3);
        let mut deep = serde_json::json!(0);
        for _ in 0..1000 {
            deep = serde_json::json!([deep]);
        }
        assert_eq!(depth(&deep), 1000);
    }

    #[test]
    fn pool_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Pool>();
    }
}
