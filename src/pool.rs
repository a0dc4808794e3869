//! [`Pool`]: start-up, the blocking calls (run by [`crate::call`]), sessions, stats, and
//! shutdown.

use std::ffi::OsString;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Sender};
use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::binary::Payload;
use crate::call::Calls;
use crate::config::{PoolBuilder, PoolConfig, Profile};
use crate::dispatcher::{Board, Dispatcher, Request, Shared, Spawner};
use crate::error::{Error, Result, TimeoutKind};
use crate::events::Emitter;
use crate::pending::{MapResults, MapUnordered, PendingCall};
use crate::protocol::Progress;
use crate::session::{Session, SessionInfo, SessionOptions, Sessions};
use crate::stats::PoolStats;
use crate::stream::{ProgressSink, Stream};
use crate::worker::{thread_name, SpawnSpec};
use crate::{embed, housekeeper, python};

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
    /// Streams: how many chunks the worker may send before the consumer has taken them.
    /// Defaults to 32.
    pub window: Option<u32>,
    /// Streams: the longest wait for the next chunk. Defaults to none (the whole deadline
    /// only).
    pub chunk_timeout: Option<Duration>,
    pub(crate) on_progress: Option<ProgressSink>,
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
    /// Streams: how many chunks may be in flight between the generator and the consumer (at
    /// least 1). The generator pauses in its `yield` once that many are not taken yet.
    pub fn window(mut self, chunks: u32) -> Self {
        self.window = Some(chunks.max(1));
        self
    }
    /// Streams: ends the stream with `Timeout` (kind `Chunk`) if no chunk comes for this long.
    pub fn chunk_timeout(mut self, timeout: Duration) -> Self {
        self.chunk_timeout = Some(timeout);
        self
    }
    /// Calls `f` with each progress report of the command (`snakepit.progress(done, total,
    /// message)`, at most 20 a second). It runs on the pool's thread that reads the worker's
    /// frames (the caller's own, or the worker's monitor): keep it short, for example store the
    /// report or send it on a channel.
    pub fn on_progress(mut self, f: impl Fn(&Progress) + Send + Sync + 'static) -> Self {
        self.on_progress = Some(ProgressSink::new(f));
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
    calls: Arc<Calls>,
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
            sessions: Sessions::default(),
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
        let calls = Arc::new(Calls::new(config.clone(), shared.clone()));
        let pool = Pool { config, shared, calls, threads: Mutex::new(threads) };
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
        init: config.init.as_ref().map(|(command, args)| (command.clone(), args.to_string())),
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
    ///
    /// Bytes and arrays in the result come back in their inline JSON form (base64, see
    /// [`Bytes`](crate::Bytes)); [`call_as`](Pool::call_as) takes them without that cost.
    pub fn call(&self, command: &str, args: Value) -> Result<Value> {
        self.call_with(command, args, CallOptions::default())
    }

    /// [`call`](Pool::call) with serde on both sides: `args` is serialised, the result is
    /// deserialised into `R`.
    ///
    /// This is also the way to move bytes and arrays: each [`Bytes`](crate::Bytes) and
    /// [`Array`](crate::Array) in `args` or `R` travels as raw bytes beside the JSON (a
    /// Python `bytes` or numpy `ndarray`), with no JSON or base64 encoding and no copy of its
    /// data on this side but the one read from the pipe.
    ///
    /// ```no_run
    /// use snakepit::{Array, Bytes};
    /// # let pool = snakepit::Pool::builder().build()?;
    /// let x = Array::from_vec(vec![0.5f32; 6], [2, 3])?;
    /// let y: Array = pool.call_as("double", &(x,))?; // `def double(x): return x * 2`
    /// assert_eq!(y.as_slice::<f32>()?, &[1.0; 6]);
    /// let png: Bytes = pool.call_as("thumbnail", &("cat.jpg", 64))?;
    /// # Ok::<(), snakepit::Error>(())
    /// ```
    pub fn call_as<A: Serialize + ?Sized, R: DeserializeOwned>(&self, command: &str, args: &A) -> Result<R> {
        self.call_as_with(command, args, CallOptions::default())
    }

    /// [`call_as`](Pool::call_as) with per-call options.
    pub fn call_as_with<A: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        command: &str,
        args: &A,
        options: CallOptions,
    ) -> Result<R> {
        let args = Payload::from_serialize(args)?;
        self.calls.call(command, args, options, None)?.deserialize()
    }

    /// [`call`](Pool::call) with per-call options.
    ///
    /// Blocks until the call returns exactly one result, never past its deadline. A call that
    /// is still queued at its deadline fails with `Timeout(Queue)`; one that is running fails
    /// with `Timeout(Call)` and its worker is killed and replaced (in the thread profile, its
    /// thread is left to finish unless `kill_on_timeout` is set).
    pub fn call_with(&self, command: &str, args: Value, options: CallOptions) -> Result<Value> {
        self.calls.call(command, args.into(), options, None).map(Payload::into_value)
    }

    /// Runs `command` on worker `worker` (see [`WorkerStats::id`](crate::WorkerStats::id)),
    /// waiting in the queue for it; for tools and tests. `UnknownWorker` if no worker with that
    /// id takes calls (or it stops taking them while the call waits).
    pub fn call_on(&self, worker: u64, command: &str, args: Value, options: CallOptions) -> Result<Value> {
        self.calls.call(command, args.into(), options, Some(worker)).map(Payload::into_value)
    }

    /// Runs `command` once on every ready worker, at once, and returns each worker's result, by
    /// worker id: for example, to reload a model everywhere after deploying new weights.
    /// Workers that start later do not run it (use [`PoolBuilder::init`] for that).
    pub fn broadcast(
        &self,
        command: &str,
        args: Value,
        options: CallOptions,
    ) -> Result<Vec<(u64, Result<Value>)>> {
        let workers = self.calls.shared().board.lock().open_workers();
        if workers.is_empty() {
            if let Some(e) = self.calls.shared().board.lock().refusal() {
                return Err(e);
            }
        }
        let name = thread_name("bcast", &self.config.name);
        let results = std::thread::scope(|scope| {
            let handles: Vec<_> = workers
                .iter()
                .map(|&w| {
                    let (args, options) = (args.clone(), options.clone());
                    let call = move || self.call_on(w, command, args, options);
                    (w, std::thread::Builder::new().name(name.clone()).spawn_scoped(scope, call))
                })
                .collect();
            handles
                .into_iter()
                .map(|(w, h)| {
                    let result = match h {
                        Ok(h) => h.join().unwrap_or_else(|_| {
                            Err(Error::Io(std::io::Error::new(
                                std::io::ErrorKind::Other,
                                "the broadcast thread panicked",
                            )))
                        }),
                        Err(source) => Err(Error::Spawn { program: "broadcast thread".into(), source }),
                    };
                    (w, result)
                })
                .collect::<Vec<_>>()
        });
        Ok(results)
    }

    /// Starts `command` in the background and returns a handle on it at once (see
    /// [`PendingCall`]): wait on it, poll it, select over many, or cancel it while it is queued.
    pub fn submit(&self, command: &str, args: Value) -> Result<PendingCall> {
        self.submit_with(command, args, CallOptions::default())
    }

    /// [`submit`](Pool::submit) with per-call options (its deadline runs from now).
    pub fn submit_with(&self, command: &str, args: Value, options: CallOptions) -> Result<PendingCall> {
        self.calls.runners().submit(&self.calls, command, args, options)
    }

    /// Runs `command` as a stream: the items a generator command yields, as they come (see
    /// [`Stream`]). Backpressure is built in: the generator pauses once 32 chunks are not taken
    /// yet.
    ///
    /// ```no_run
    /// # let pool = snakepit::Pool::builder().build()?;
    /// for chunk in pool.stream("tokens", serde_json::json!({"text": "a b c"}))? {
    ///     println!("{}", chunk?);
    /// }
    /// # Ok::<(), snakepit::Error>(())
    /// ```
    pub fn stream(&self, command: &str, args: Value) -> Result<Stream> {
        self.calls.stream(command, args.into(), CallOptions::default())
    }

    /// [`stream`](Pool::stream) with per-call options: `window`, `chunk_timeout`, `timeout`
    /// (the whole stream's), `on_progress`.
    pub fn stream_with(&self, command: &str, args: Value, options: CallOptions) -> Result<Stream> {
        self.calls.stream(command, args.into(), options)
    }

    /// Runs `command` once per item of `args`, keeping up to `in_flight` calls running at
    /// once, and yields the outcomes in the order of `args`. Dropping the iterator cancels the
    /// calls not started yet.
    pub fn map<I: IntoIterator<Item = Value>>(
        &self,
        command: &str,
        args: I,
        in_flight: usize,
    ) -> MapResults<'_, I::IntoIter> {
        MapResults::new(self, command, args.into_iter(), in_flight)
    }

    /// Like [`map`](Pool::map), but yields each outcome as soon as its call ends, with the
    /// index of its argument: `(index, outcome)`. A slow call holds up no other outcome.
    pub fn map_unordered<I: IntoIterator<Item = Value>>(
        &self,
        command: &str,
        args: I,
        in_flight: usize,
    ) -> MapUnordered<'_, I::IntoIter> {
        MapUnordered::new(self, command, args.into_iter(), in_flight)
    }

    /// Opens a strict session: its calls all run on one worker, where a command declared
    /// `@snakepit.command(session=True)` finds the session's state. See [`Session`].
    pub fn session(&self) -> Result<Session> {
        self.session_with(SessionOptions::default())
    }

    /// Opens a session with options (affinity, idle time-out, context). `TooManySessions` past
    /// the pool's `max_sessions`.
    pub fn session_with(&self, options: SessionOptions) -> Result<Session> {
        Session::open(self.calls.clone(), options)
    }

    /// Snapshots of the live sessions, by id.
    pub fn sessions(&self) -> Vec<SessionInfo> {
        self.calls.shared().sessions.infos()
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
        // Submitted calls still running have their answers by now (ShuttingDown at worst).
        self.calls.stop_threads();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Pool>();
    }
}
