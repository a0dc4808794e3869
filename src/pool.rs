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

use crate::config::{PoolBuilder, PoolConfig};
use crate::dispatcher::{Call, Dispatcher, Request};
use crate::error::{Error, Result, TimeoutKind};
use crate::stats::PoolStats;
use crate::worker::SpawnSpec;
use crate::{embed, protocol, python};

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
    dispatcher: Mutex<Option<JoinHandle<()>>>,
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
        let (requests, requests_rx) = unbounded();
        let (started_tx, started_rx) = bounded(1);
        let dispatcher = Dispatcher::new(config.clone(), spec, requests_rx, started_tx);
        let name: String = format!("sp-disp-{}", config.name).chars().take(15).collect();
        let handle = std::thread::Builder::new()
            .name(name)
            .spawn(move || dispatcher.run())
            .map_err(|source| Error::Spawn { program: "dispatcher thread".into(), source })?;
        let started = started_rx.recv_timeout(config.startup_timeout + DISPATCHER_SLACK);
        match started {
            Ok(Ok(())) => Ok(Pool {
                config,
                requests,
                next_id: AtomicU64::new(1),
                dispatcher: Mutex::new(Some(handle)),
            }),
            Ok(Err(e)) => {
                // The dispatcher has killed the workers; it ends once they are reaped.
                let _ = handle.join();
                Err(e)
            }
            Err(_) => {
                drop(requests); // the dispatcher winds down when it sees the pool is gone
                Err(Error::Timeout(TimeoutKind::Startup))
            }
        }
    }
}

/// Resolves the interpreter and the embedded package, and assembles the workers' command.
fn spawn_spec(config: &PoolConfig) -> Result<SpawnSpec> {
    let python = python::resolve(config.python.as_deref())?;
    let package = embed::package_dir()?;
    embed::precompile(&python, &package);
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
        python: python.executable,
        adapter: config.adapter.clone(),
        env: config.env.iter().filter(|(k, _)| k != "PYTHONPATH").cloned().collect(),
        python_path,
        max_frame: config.max_frame_size,
    })
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
                kind_of(&args)
            )));
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

    /// Stops the pool: new calls are refused, queued calls fail with `ShuttingDown`, in-flight
    /// calls get `shutdown_timeout` to finish (then fail with `Timeout(Shutdown)`), workers are
    /// sent `shutdown` and EOF, then SIGTERM and SIGKILL to their process groups if they do not
    /// exit, and every thread is joined. Returns `Err(Timeout(Shutdown))` if calls were cut or
    /// workers had to be forced. Calling it again does nothing.
    pub fn shutdown(&self) -> Result<()> {
        let Some(handle) = self.dispatcher.lock().take() else {
            return Ok(());
        };
        let (tx, rx) = bounded(1);
        if self.requests.send(Request::Shutdown(tx)).is_err() {
            let _ = handle.join();
            return Ok(());
        }
        let bound = self.config.shutdown_timeout + 3 * crate::dispatcher::STOP_ESCALATION + DISPATCHER_SLACK;
        match rx.recv_timeout(bound) {
            Ok(report) => {
                let _ = handle.join();
                if report.calls_cut > 0 || report.forced > 0 {
                    log::warn!(
                        "[{}] shutdown: {} calls cut at the end of the grace period, {} workers forced",
                        self.config.name,
                        report.calls_cut,
                        report.forced
                    );
                    return Err(Error::Timeout(TimeoutKind::Shutdown));
                }
                Ok(())
            }
            Err(_) => {
                log::error!(
                    "[{}] shutdown: the dispatcher did not finish within {bound:?}",
                    self.config.name
                );
                Err(Error::Timeout(TimeoutKind::Shutdown))
            }
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            log::warn!("[{}] shutdown on drop: {e}", self.config.name);
        }
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
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
