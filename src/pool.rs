//! [`Pool`]: start-up, the blocking calls, stats, and shutdown.

use std::ffi::OsString;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, RecvTimeoutError, Sender};
use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::config::{PoolBuilder, PoolConfig, Profile};
use crate::dispatcher::{Call, Dispatcher, Request, STOP_ESCALATION};
use crate::error::{Error, Result, TimeoutKind};
use crate::events::Emitter;
use crate::stats::PoolStats;
use crate::worker::SpawnSpec;
use crate::{embed, protocol, python, reaper};

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
    requests: Sender<Request>,
    next_id: AtomicU64,
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
        let (started_tx, started_rx) = bounded(1);
        let dispatcher = Dispatcher::new(config.clone(), spec, requests_rx, emitter, started_tx);
        threads.dispatcher = Some(
            std::thread::Builder::new()
                .name(thread_name("sp-disp-", &config.name))
                .spawn(move || dispatcher.run())
                .map_err(spawn_err("dispatcher thread"))?,
        );
        let pool = Pool { config, requests, next_id: AtomicU64::new(1), threads: Mutex::new(threads) };
        match started_rx.recv_timeout(pool.config.startup_timeout + DISPATCHER_SLACK) {
            Ok(Ok(())) => {}
            // The dispatcher has killed the workers; dropping the pool joins its threads.
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(Error::Timeout(TimeoutKind::Startup)),
        }
        pool.start_reaper()?;
        Ok(pool)
    }
}

fn thread_name(prefix: &str, pool: &str) -> String {
    // Linux keeps 15 bytes of a thread's name.
    format!("{prefix}{pool}").chars().take(15).collect()
}

/// The pool's threads besides the workers' own, joined at shutdown.
#[derive(Default)]
struct Threads {
    dispatcher: Option<JoinHandle<()>>,
    /// The reaper and the channel whose closing stops it.
    reaper: Option<(JoinHandle<()>, Sender<()>)>,
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
    /// with `Timeout(Call)` and its worker is killed and replaced.
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
        let now = Instant::now();
        let far = now + Duration::from_secs(100 * 365 * 24 * 3600);
        let deadline = now.checked_add(timeout).unwrap_or(far).min(far);
        let queue_deadline = match self.config.queue_timeout {
            Some(q) => deadline.min(now.checked_add(q).unwrap_or(far)),
            None => deadline,
        };
        let (reply, answer) = bounded(1);
        let started = Arc::new(AtomicBool::new(false));
        let call = Call {
            id,
            command: command.to_string(),
            frame,
            enqueued: now,
            queue_deadline,
            deadline,
            started: started.clone(),
        };
        self.requests.send(Request::Call(call, reply)).map_err(|_| Error::ShuttingDown)?;
        match answer.recv_deadline(deadline) {
            Ok(result) => result,
            Err(RecvTimeoutError::Timeout) => answer.try_recv().unwrap_or_else(|_| {
                let kind =
                    if started.load(Ordering::Acquire) { TimeoutKind::Call } else { TimeoutKind::Queue };
                Err(Error::Timeout(kind))
            }),
            Err(RecvTimeoutError::Disconnected) => Err(Error::ShuttingDown),
        }
    }

    /// A snapshot of the pool and each of its workers.
    pub fn stats(&self) -> Result<PoolStats> {
        let (tx, rx) = bounded(1);
        self.requests.send(Request::Stats(tx)).map_err(|_| Error::ShuttingDown)?;
        rx.recv_timeout(DISPATCHER_SLACK).map_err(|_| Error::ShuttingDown)
    }

    /// Replaces worker `id` (see [`WorkerStats::id`](crate::WorkerStats::id)) with a fresh
    /// one, make before break: the replacement starts and must be ready before the worker stops
    /// taking calls; its calls in flight then finish. Returns once the replacement is ready
    /// and the worker is draining. `UnknownWorker` if no ready worker has that id; the start-up
    /// error if the replacement cannot start (the worker then keeps serving).
    pub fn recycle_worker(&self, id: u64) -> Result<()> {
        let (tx, rx) = bounded(1);
        self.requests
            .send(Request::RecycleWorker { worker: id, reply: tx })
            .map_err(|_| Error::ShuttingDown)?;
        let bound = self.config.startup_timeout + DISPATCHER_SLACK;
        rx.recv_timeout(bound).unwrap_or(Err(Error::Timeout(TimeoutKind::Startup)))
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

    fn start_reaper(&self) -> Result<()> {
        let p = &self.config.policy;
        if p.ttl.is_none() && p.max_memory.is_none() && p.max_memory_hard.is_none() {
            return Ok(()); // max_requests alone is enforced by the dispatcher at each call
        }
        let (stop_tx, stop_rx) = bounded::<()>(0);
        let (policy, interval) = (p.clone(), self.config.reaper_interval);
        let (ask, order) = (self.requests.clone(), self.requests.clone());
        let handle = std::thread::Builder::new()
            .name(thread_name("sp-reap-", &self.config.name))
            .spawn(move || {
                reaper::run(
                    policy,
                    interval,
                    |tx| ask.send(Request::Facts(tx)).is_ok(),
                    |o| order.send(Request::Recycle(o)).is_ok(),
                    stop_rx,
                )
            })
            .map_err(|source| Error::Spawn { program: "reaper thread".into(), source })?;
        self.threads.lock().reaper = Some((handle, stop_tx));
        Ok(())
    }

    /// Stops the pool: new calls are refused, queued calls fail with `ShuttingDown`, in-flight
    /// calls get `shutdown_timeout` to finish (then fail with `Timeout(Shutdown)`), workers are
    /// sent `shutdown` and EOF, then SIGTERM and SIGKILL to their process groups if they do not
    /// exit, and every thread is joined. Returns `Err(Timeout(Shutdown))` if calls were cut or
    /// workers had to be forced. Calling it again does nothing.
    pub fn shutdown(&self) -> Result<()> {
        let mut threads = std::mem::take(&mut *self.threads.lock());
        if let Some((handle, stop)) = threads.reaper.take() {
            drop(stop);
            let _ = handle.join();
        }
        let Some(dispatcher) = threads.dispatcher.take() else { return Ok(()) };
        let (tx, rx) = bounded(1);
        let mut result = Ok(());
        if self.requests.send(Request::Shutdown(tx)).is_ok() {
            let bound = self.config.shutdown_timeout + 3 * STOP_ESCALATION + DISPATCHER_SLACK;
            match rx.recv_timeout(bound) {
                Ok(report) if report.calls_cut > 0 || report.forced > 0 => {
                    log::warn!(
                        "[{}] shutdown: {} calls cut at the end of the grace period, {} workers forced",
                        self.config.name,
                        report.calls_cut,
                        report.forced
                    );
                    result = Err(Error::Timeout(TimeoutKind::Shutdown));
                }
                Ok(_) => {}
                Err(_) => {
                    log::error!(
                        "[{}] shutdown: the dispatcher did not finish within {bound:?}",
                        self.config.name
                    );
                    return Err(Error::Timeout(TimeoutKind::Shutdown));
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
