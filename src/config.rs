//! A pool's settings ([`PoolConfig`]) and the builder that sets and validates them.

use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::events::{Event, EventHandler};
use crate::policy::Policy;
use crate::protocol::DEFAULT_MAX_FRAME;

/// The longest any duration setting may be.
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// How a pool's workers run calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Profile {
    /// One call at a time per worker process. The right choice for CPU-bound Python on an
    /// interpreter with a GIL, and for code that is not thread-safe.
    #[default]
    Process,
    /// Up to `threads_per_worker` calls at once in each worker process, on a thread pool. The
    /// right choice for I/O-bound commands on any Python, and for CPU-bound ones on a
    /// free-threaded Python (3.13t and later). Commands must be declared thread-safe.
    Thread,
}

/// Every setting of one pool. Built with [`Pool::builder`](crate::Pool::builder); read back
/// with the getters (for example from [`Pool::config`](crate::Pool::config)).
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub(crate) name: String,
    pub(crate) size: usize,
    pub(crate) adapter: Option<String>,
    pub(crate) python: Option<PathBuf>,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) python_path: Vec<PathBuf>,
    pub(crate) startup_timeout: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) queue_timeout: Option<Duration>,
    pub(crate) max_queue: usize,
    pub(crate) max_frame_size: usize,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) stop_timeout: Duration,
    pub(crate) cancel_grace: Duration,
    pub(crate) restart_backoff: (Duration, Duration),
    pub(crate) degraded_after: u32,
    pub(crate) policy: Policy,
    pub(crate) max_concurrent_recycles: usize,
    pub(crate) health_interval: Option<Duration>,
    pub(crate) health_timeout: Duration,
    pub(crate) reaper_interval: Duration,
    pub(crate) on_event: Option<EventHandler>,
    pub(crate) args: Vec<String>,
    pub(crate) launcher: Vec<String>,
    pub(crate) profile: Profile,
    pub(crate) threads_per_worker: usize,
    pub(crate) allow_unsafe_threads: bool,
    pub(crate) kill_on_timeout: bool,
    pub(crate) session_ttl: Option<Duration>,
    pub(crate) max_sessions: usize,
    pub(crate) session_drain: Duration,
    /// A command each worker runs before it counts as ready, with its arguments.
    pub(crate) init: Option<(String, serde_json::Value)>,
    pub(crate) slow_call_log: Option<Duration>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            name: "default".to_string(),
            size: std::thread::available_parallelism().map_or(1, |n| n.get()),
            adapter: None,
            python: None,
            env: Vec::new(),
            python_path: Vec::new(),
            startup_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(30),
            queue_timeout: None,
            max_queue: 1024,
            max_frame_size: DEFAULT_MAX_FRAME,
            shutdown_timeout: Duration::from_secs(5),
            stop_timeout: Duration::from_secs(5),
            cancel_grace: Duration::from_millis(250),
            restart_backoff: (Duration::from_millis(100), Duration::from_secs(10)),
            degraded_after: 3,
            policy: Policy::default(),
            max_concurrent_recycles: 1,
            health_interval: None,
            health_timeout: Duration::from_secs(5),
            reaper_interval: Duration::from_secs(1),
            on_event: None,
            args: Vec::new(),
            launcher: Vec::new(),
            profile: Profile::Process,
            threads_per_worker: 8,
            allow_unsafe_threads: false,
            kill_on_timeout: false,
            session_ttl: None,
            max_sessions: 100_000,
            session_drain: Duration::from_secs(30),
            init: None,
            slow_call_log: None,
        }
    }
}

impl PoolConfig {
    /// The pool's name, used in logs, thread names and stats.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// How many worker processes the pool keeps.
    pub fn size(&self) -> usize {
        self.size
    }
    /// The Python module whose commands the workers serve, if any.
    pub fn adapter(&self) -> Option<&str> {
        self.adapter.as_deref()
    }
    /// The interpreter that was asked for, before resolution.
    pub fn python(&self) -> Option<&std::path::Path> {
        self.python.as_deref()
    }
    /// Extra environment variables for the workers.
    pub fn env(&self) -> &[(String, String)] {
        &self.env
    }
    /// Folders put on the workers' `PYTHONPATH`, before the embedded package.
    pub fn python_path(&self) -> &[PathBuf] {
        &self.python_path
    }
    /// How long a worker may take to send `ready`.
    pub fn startup_timeout(&self) -> Duration {
        self.startup_timeout
    }
    /// A call's whole deadline (queue wait plus execution) unless the call sets its own.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }
    /// The longest a call may wait in the queue, if shorter than its whole deadline.
    pub fn queue_timeout(&self) -> Option<Duration> {
        self.queue_timeout
    }
    /// How many calls may wait for a worker before new calls get `QueueFull`.
    pub fn max_queue(&self) -> usize {
        self.max_queue
    }
    /// The largest frame either side may send, in bytes.
    pub fn max_frame_size(&self) -> usize {
        self.max_frame_size
    }
    /// The grace period in-flight calls get at shutdown.
    pub fn shutdown_timeout(&self) -> Duration {
        self.shutdown_timeout
    }
    /// How long a worker asked to stop may take before SIGTERM, and again before SIGKILL.
    pub fn stop_timeout(&self) -> Duration {
        self.stop_timeout
    }
    /// How long a cancelled (or timed-out) call that still runs has at each step of its
    /// cancel: asked, then interrupted, then given up on.
    pub fn cancel_grace(&self) -> Duration {
        self.cancel_grace
    }
    /// The first and the largest delay before restarting a worker that failed to start.
    pub fn restart_backoff(&self) -> (Duration, Duration) {
        self.restart_backoff
    }
    /// How many start-up failures in a row make the pool degraded.
    pub fn degraded_after(&self) -> u32 {
        self.degraded_after
    }
    /// The maximum age of a worker before it is recycled, if any.
    pub fn ttl(&self) -> Option<Duration> {
        self.policy.ttl
    }
    /// How many calls a worker serves before it is recycled, if limited.
    pub fn max_requests(&self) -> Option<u64> {
        self.policy.max_requests
    }
    /// The resident memory of a worker's process tree above which it is recycled, if any.
    pub fn max_memory(&self) -> Option<u64> {
        self.policy.max_memory
    }
    /// The memory above which a worker is killed at once instead of drained, if any.
    pub fn max_memory_hard(&self) -> Option<u64> {
        self.policy.max_memory_hard
    }
    /// The largest fraction added to each recycling limit, drawn per worker.
    pub fn jitter(&self) -> f64 {
        self.policy.jitter
    }
    /// How many workers of the pool may be recycled at once.
    pub fn max_concurrent_recycles(&self) -> usize {
        self.max_concurrent_recycles
    }
    /// How often an idle worker is pinged, if health checks are on.
    pub fn health_interval(&self) -> Option<Duration> {
        self.health_interval
    }
    /// How long a pinged worker has to answer.
    pub fn health_timeout(&self) -> Duration {
        self.health_timeout
    }
    /// How often the housekeeper reads the workers' memory.
    pub fn reaper_interval(&self) -> Duration {
        self.reaper_interval
    }
    /// Extra arguments for the adapter.
    pub fn args(&self) -> &[String] {
        &self.args
    }
    /// The command prefix the workers run under; empty for none.
    pub fn launcher(&self) -> &[String] {
        &self.launcher
    }
    /// How workers run calls.
    pub fn profile(&self) -> Profile {
        self.profile
    }
    /// Calls each worker runs at once in the thread profile.
    pub fn threads_per_worker(&self) -> usize {
        self.threads_per_worker
    }
    /// Whether the thread profile may run commands not declared thread-safe.
    pub fn allow_unsafe_threads(&self) -> bool {
        self.allow_unsafe_threads
    }
    /// Whether a call past its deadline kills its worker (always in the process profile).
    pub fn kills_on_timeout(&self) -> bool {
        self.profile == Profile::Process || self.kill_on_timeout
    }
    /// How many calls one worker runs at once: 1, or `threads_per_worker` in the thread profile.
    pub fn capacity(&self) -> usize {
        match self.profile {
            Profile::Process => 1,
            Profile::Thread => self.threads_per_worker,
        }
    }

    /// Checks every setting; the first problem names its setting.
    pub(crate) fn validate(&self) -> Result<()> {
        match self.problems().into_iter().next() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Every problem with the settings, each an `Error::Config` naming its setting.
    pub(crate) fn problems(&self) -> Vec<Error> {
        let mut problems = Vec::new();
        let valid_name =
            |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !valid_name(&self.name) {
            problems.push(Error::config(
                "name",
                format!("{:?} must be non-empty ASCII letters, digits, '_' or '-'", self.name),
            ));
        }
        if self.size == 0 || self.size > 1024 {
            problems.push(Error::config("size", format!("must be between 1 and 1024, found {}", self.size)));
        }
        if let Some(adapter) = &self.adapter {
            let ident = |p: &str| {
                p.chars().next().is_some_and(|c| c.is_alphabetic() || c == '_')
                    && p.chars().all(|c| c.is_alphanumeric() || c == '_')
            };
            if !adapter.split('.').all(ident) {
                problems.push(Error::config("adapter", format!("{adapter:?} is not a Python module name")));
            }
        }
        for (k, v) in &self.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                problems.push(Error::config("env", format!("{k:?} is not a valid environment variable")));
            }
        }
        for (setting, d) in [
            ("startup_timeout", self.startup_timeout),
            ("request_timeout", self.request_timeout),
            ("shutdown_timeout", self.shutdown_timeout),
            ("stop_timeout", self.stop_timeout),
            ("cancel_grace", self.cancel_grace),
            ("restart_backoff", self.restart_backoff.0),
        ] {
            if d.is_zero() {
                problems.push(Error::config(setting, "must be greater than zero"));
            }
        }
        if self.queue_timeout.is_some_and(|d| d.is_zero()) {
            problems.push(Error::config("queue_timeout", "must be greater than zero"));
        }
        if self.slow_call_log.is_some_and(|d| d.is_zero()) {
            problems.push(Error::config("slow_call_log", "must be greater than zero"));
        }
        if self.session_ttl.is_some_and(|d| d.is_zero()) {
            problems.push(Error::config("session_ttl", "must be greater than zero"));
        }
        if self.max_sessions == 0 {
            problems.push(Error::config("max_sessions", "must be at least 1"));
        }
        if let Some((command, args)) = &self.init {
            if command.is_empty() {
                problems.push(Error::config("init", "the command name is empty"));
            }
            if !matches!(
                args,
                serde_json::Value::Object(_) | serde_json::Value::Array(_) | serde_json::Value::Null
            ) {
                problems.push(Error::config("init", "args must be a JSON object, array or null"));
            }
        }
        if self.restart_backoff.1 < self.restart_backoff.0 {
            problems.push(Error::config("restart_backoff", "the largest delay is smaller than the first"));
        }
        if self.max_frame_size < 1024 || self.max_frame_size > u32::MAX as usize {
            problems.push(Error::config(
                "max_frame_size",
                format!("must be between 1024 and {} bytes, found {}", u32::MAX, self.max_frame_size),
            ));
        }
        if self.degraded_after == 0 {
            problems.push(Error::config("degraded_after", "must be at least 1"));
        }
        let p = &self.policy;
        if p.ttl.is_some_and(|d| d.is_zero()) {
            problems.push(Error::config("ttl", "must be greater than zero"));
        }
        if p.max_requests == Some(0) {
            problems.push(Error::config("max_requests", "must be at least 1"));
        }
        if p.max_memory == Some(0) {
            problems.push(Error::config("max_memory", "must be greater than zero"));
        }
        if p.max_memory_hard == Some(0) {
            problems.push(Error::config("max_memory_hard", "must be greater than zero"));
        }
        if let (Some(soft), Some(hard)) = (p.max_memory, p.max_memory_hard) {
            if hard < soft {
                problems.push(Error::config("max_memory_hard", "is below max_memory"));
            }
        }
        if !(0.0..=1.0).contains(&p.jitter) {
            problems.push(Error::config("jitter", format!("must be between 0 and 1, found {}", p.jitter)));
        }
        if !self.launcher.is_empty() && self.launcher[0].is_empty() {
            problems.push(Error::config("launcher", "the program (first element) is empty"));
        }
        if self.args.iter().chain(&self.launcher).any(|a| a.contains('\0')) {
            problems.push(Error::config("args", "an argument contains a NUL byte"));
        }
        if self.threads_per_worker == 0 || self.threads_per_worker > 1024 {
            problems.push(Error::config(
                "threads_per_worker",
                format!("must be between 1 and 1024, found {}", self.threads_per_worker),
            ));
        }
        if self.max_concurrent_recycles == 0 {
            problems.push(Error::config("max_concurrent_recycles", "must be at least 1"));
        }
        for (setting, d) in [
            ("health_interval", self.health_interval.unwrap_or(Duration::MAX)),
            ("health_timeout", self.health_timeout),
            ("reaper_interval", self.reaper_interval),
        ] {
            if d.is_zero() {
                problems.push(Error::config(setting, "must be greater than zero"));
            }
        }
        // Deadlines are instants in the future; a year is far beyond any sensible setting and
        // keeps `now + setting` from overflowing.
        for (setting, d) in [
            ("startup_timeout", Some(self.startup_timeout)),
            ("request_timeout", Some(self.request_timeout)),
            ("queue_timeout", self.queue_timeout),
            ("shutdown_timeout", Some(self.shutdown_timeout)),
            ("stop_timeout", Some(self.stop_timeout)),
            ("cancel_grace", Some(self.cancel_grace)),
            ("restart_backoff", Some(self.restart_backoff.1)),
            ("ttl", p.ttl),
            ("health_interval", self.health_interval),
            ("health_timeout", Some(self.health_timeout)),
            ("reaper_interval", Some(self.reaper_interval)),
        ] {
            if d.is_some_and(|d| d > MAX_DURATION) {
                problems.push(Error::config(setting, "must be at most a year"));
            }
        }
        problems
    }
}

/// Sets up a [`Pool`](crate::Pool); every setter takes and returns the builder.
#[derive(Debug, Clone, Default)]
#[must_use = "a builder does nothing until build() is called"]
pub struct PoolBuilder {
    pub(crate) config: PoolConfig,
}

impl PoolBuilder {
    /// The pool's name, used in logs, thread names and stats: ASCII letters, digits, `_`, `-`.
    /// Defaults to `"default"`.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.config.name = name.into();
        self
    }
    /// How many worker processes to keep (1 to 1024). Defaults to the number of CPUs.
    pub fn size(mut self, size: usize) -> Self {
        self.config.size = size;
        self
    }
    /// The importable Python module whose `@snakepit.command` functions the workers serve.
    /// Defaults to none: only the built-ins `ping`, `echo` and `info`.
    pub fn adapter(mut self, module: impl Into<String>) -> Self {
        self.config.adapter = Some(module.into());
        self
    }
    /// The Python interpreter. Defaults to `$SNAKEPIT_PYTHON`, else `python3` on `PATH`;
    /// either way it is resolved once to the real executable (`sys.executable`).
    pub fn python(mut self, python: impl Into<PathBuf>) -> Self {
        self.config.python = Some(python.into());
        self
    }
    /// Sets an environment variable in every worker. Defaults to none beyond the parent's.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.env.push((key.into(), value.into()));
        self
    }
    /// Puts a folder on the workers' `PYTHONPATH` (after the embedded package), e.g. where
    /// your adapter lives. Defaults to none.
    pub fn python_path(mut self, dir: impl Into<PathBuf>) -> Self {
        self.config.python_path.push(dir.into());
        self
    }
    /// How long a worker may take from spawn to `ready`. Defaults to 30 s.
    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.config.startup_timeout = timeout;
        self
    }
    /// A call's deadline, covering queue wait and execution; a call still running then fails
    /// with `Timeout(Call)` and its worker is replaced. Defaults to 30 s.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.config.request_timeout = timeout;
        self
    }
    /// The longest a call may wait in the queue before `Timeout(Queue)`. Defaults to the
    /// call's whole deadline.
    pub fn queue_timeout(mut self, timeout: Duration) -> Self {
        self.config.queue_timeout = Some(timeout);
        self
    }
    /// How many calls may wait for a free worker; more get `QueueFull` at once (0: never
    /// queue). Defaults to 1024.
    pub fn max_queue(mut self, max: usize) -> Self {
        self.config.max_queue = max;
        self
    }
    /// The largest frame either side may send, checked before allocating. Defaults to 64 MiB.
    pub fn max_frame_size(mut self, bytes: usize) -> Self {
        self.config.max_frame_size = bytes;
        self
    }
    /// The grace period in-flight calls get at shutdown before workers are stopped by force.
    /// Defaults to 5 s.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.config.shutdown_timeout = timeout;
        self
    }
    /// How long a worker asked to stop (a `shutdown` frame and EOF, when the pool shuts down or
    /// a recycled worker has drained) may take to exit before it is sent SIGTERM, and the same
    /// again before SIGKILL. A worker that needs longer is not an error for `shutdown()` unless
    /// a call was cut. Defaults to 5 s.
    pub fn stop_timeout(mut self, timeout: Duration) -> Self {
        self.config.stop_timeout = timeout;
        self
    }
    /// How long a call that is cancelled while it runs (by [`PendingCall::cancel`], its
    /// deadline, or a [`Stream`] dropped mid-way) has at each step of the cancel: it is first
    /// asked (`snakepit.cancelled()` turns true; a stream's generator is closed at its next
    /// `yield`), then interrupted (`snakepit.Cancelled` is raised in the command), and then
    /// given up on: a process worker is killed and replaced, a thread worker's call keeps its
    /// slot until it ends (or the worker is killed, with `kill_on_timeout`). A command that lets
    /// go in time costs no worker. Defaults to 250 ms.
    ///
    /// [`PendingCall::cancel`]: crate::PendingCall::cancel
    /// [`Stream`]: crate::Stream
    pub fn cancel_grace(mut self, grace: Duration) -> Self {
        self.config.cancel_grace = grace;
        self
    }
    /// The delay before restarting a worker that failed to start, doubling from `first` up to
    /// `max` while failures continue. Defaults to 100 ms and 10 s.
    pub fn restart_backoff(mut self, first: Duration, max: Duration) -> Self {
        self.config.restart_backoff = (first, max);
        self
    }
    /// How many start-up failures in a row make the pool degraded: with no worker ready, calls
    /// then fail fast with the last start-up error. Defaults to 3.
    pub fn degraded_after(mut self, failures: u32) -> Self {
        self.config.degraded_after = failures;
        self
    }
    /// Recycles a worker once it is this old (plus its jitter), after draining its calls.
    /// Defaults to off.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.config.policy.ttl = Some(ttl);
        self
    }
    /// Recycles a worker after this many calls (plus its jitter); it is never given more, but
    /// for the calls of its strict sessions while it drains (see `session_drain`).
    /// Defaults to off.
    pub fn max_requests(mut self, calls: u64) -> Self {
        self.config.policy.max_requests = Some(calls);
        self
    }
    /// Recycles a worker, after draining it, once the resident memory of its whole process tree
    /// (read from `/proc` by the pool) passes this many bytes (plus its jitter). Defaults to off.
    pub fn max_memory(mut self, bytes: u64) -> Self {
        self.config.policy.max_memory = Some(bytes);
        self
    }
    /// Kills a worker at once, failing its calls, when its process tree's memory passes this
    /// many bytes. Defaults to off.
    pub fn max_memory_hard(mut self, bytes: u64) -> Self {
        self.config.policy.max_memory_hard = Some(bytes);
        self
    }
    /// The largest fraction (0 to 1) added to `ttl`, `max_requests` and `max_memory`, drawn
    /// once per worker, so workers started together do not recycle together. Defaults to 0.1.
    pub fn jitter(mut self, fraction: f64) -> Self {
        self.config.policy.jitter = fraction;
        self
    }
    /// How many workers may be recycled at once. Defaults to 1.
    pub fn max_concurrent_recycles(mut self, n: usize) -> Self {
        self.config.max_concurrent_recycles = n;
        self
    }
    /// Pings each idle worker this often; one that does not answer within `health_timeout` is
    /// killed and replaced. Defaults to off.
    pub fn health_interval(mut self, interval: Duration) -> Self {
        self.config.health_interval = Some(interval);
        self
    }
    /// How long a pinged worker has to answer. Defaults to 5 s.
    pub fn health_timeout(mut self, timeout: Duration) -> Self {
        self.config.health_timeout = timeout;
        self
    }
    /// How often the housekeeper thread reads the workers' process-tree memory from `/proc`
    /// (only when `max_memory` or `max_memory_hard` is set; ages are exact timers). Defaults
    /// to 1 s.
    pub fn reaper_interval(mut self, interval: Duration) -> Self {
        self.config.reaper_interval = interval;
        self
    }
    /// Receives every [`Event`] of the pool. The callback runs on the pool's own event thread
    /// (`sp-evt-<pool>`), one event at a time in order, never on a caller's thread or the
    /// dispatcher's; a slow callback delays only later events. If it falls more than 4096
    /// events behind, further events are dropped and counted in `stats().events_dropped`.
    /// Defaults to none.
    pub fn on_event(mut self, callback: impl Fn(&Event) + Send + Sync + 'static) -> Self {
        self.config.on_event = Some(EventHandler::new(callback));
        self
    }
    /// Extra arguments for the adapter, after the worker's own: the adapter reads them as
    /// `snakepit.ARGS`. Defaults to none.
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.config.args.extend(args.into_iter().map(Into::into));
        self
    }
    /// A command prefix the workers run under: `launcher... python -m snakepit ...`, e.g.
    /// `["nice", "-n", "10"]`, `["taskset", "-c", "1"]`, or `["ssh", "host"]` for a worker on
    /// another machine (the protocol is only stdin/stdout). With a launcher the interpreter is
    /// not resolved locally (`python` is passed as given, default `python3`) and the worker
    /// does not check that its parent is this process; over `ssh`, the `snakepit` package and
    /// the adapter must be importable on the far side, and `env` does not travel. Defaults to
    /// none.
    pub fn launcher<I: IntoIterator<Item = S>, S: Into<String>>(mut self, command: I) -> Self {
        self.config.launcher = command.into_iter().map(Into::into).collect();
        self
    }
    /// How workers run calls: [`Profile::Process`] (one call at a time per process) or
    /// [`Profile::Thread`] (`threads_per_worker` at once per process). Defaults to `Process`.
    pub fn profile(mut self, profile: Profile) -> Self {
        self.config.profile = profile;
        self
    }
    /// Calls each worker runs at once in the thread profile (1 to 1024). Defaults to 8.
    pub fn threads_per_worker(mut self, threads: usize) -> Self {
        self.config.threads_per_worker = threads;
        self
    }
    /// Lets the thread profile run commands not declared thread-safe (with
    /// `@snakepit.command(thread_safe=True)` or `SNAKEPIT_THREAD_SAFE = True` in the adapter);
    /// otherwise such an adapter fails at start-up, naming them. Defaults to false.
    pub fn allow_unsafe_threads(mut self, allow: bool) -> Self {
        self.config.allow_unsafe_threads = allow;
        self
    }
    /// In the thread profile, kill a worker whose call overran its deadline (its other calls
    /// then fail with `WorkerDied { collateral: true }`) instead of leaving that call's thread
    /// busy until the Python function returns. The process profile always kills. Defaults to
    /// false.
    pub fn kill_on_timeout(mut self, kill: bool) -> Self {
        self.config.kill_on_timeout = kill;
        self
    }
    /// Ends sessions after this long without a call, unless a session sets its own idle
    /// time-out. Defaults to none: a session lives until it is closed or dropped.
    pub fn session_ttl(mut self, ttl: Duration) -> Self {
        self.config.session_ttl = Some(ttl);
        self
    }
    /// The most sessions open at once; past it, opening one fails with `TooManySessions`.
    /// Defaults to 100 000.
    pub fn max_sessions(mut self, max: usize) -> Self {
        self.config.max_sessions = max;
        self
    }
    /// How long a worker being recycled keeps serving the strict sessions bound to it (they may
    /// end meanwhile) before they are lost. Its replacement takes every other call at once.
    /// Defaults to 30 s.
    pub fn session_drain(mut self, drain: Duration) -> Self {
        self.config.session_drain = drain;
        self
    }
    /// A command every worker runs once before it counts as ready: the first workers,
    /// restarts and recycling replacements alike (like `multiprocessing.Pool`'s initializer).
    /// `args` as for a call. Its failure is a start-up failure, with the Python traceback.
    pub fn init(mut self, command: &str, args: serde_json::Value) -> Self {
        self.config.init = Some((command.to_string(), args));
        self
    }
    /// Logs (`warn`) the Python stacks of the worker of any call still running after this
    /// long, without stopping it (like PHP-FPM's slowlog). Defaults to off.
    pub fn slow_call_log(mut self, threshold: Duration) -> Self {
        self.config.slow_call_log = Some(threshold);
        self
    }
    /// The settings as they stand.
    pub fn config(&self) -> &PoolConfig {
        &self.config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err_setting(b: PoolBuilder) -> String {
        match b.config.validate() {
            Err(Error::Config { setting, .. }) => setting,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_valid() {
        PoolBuilder::default().config.validate().unwrap();
        PoolBuilder::default().adapter("pkg.mod_1").config.validate().unwrap();
    }

    #[test]
    fn each_bad_setting_is_named() {
        let b = PoolBuilder::default;
        assert_eq!(err_setting(b().size(0)), "size");
        assert_eq!(err_setting(b().name("")), "name");
        assert_eq!(err_setting(b().name("a b")), "name");
        assert_eq!(err_setting(b().adapter("1abc")), "adapter");
        assert_eq!(err_setting(b().adapter("a..b")), "adapter");
        assert_eq!(err_setting(b().adapter("a-b")), "adapter");
        assert_eq!(err_setting(b().env("A=B", "1")), "env");
        assert_eq!(err_setting(b().env("", "1")), "env");
        assert_eq!(err_setting(b().request_timeout(Duration::ZERO)), "request_timeout");
        assert_eq!(err_setting(b().startup_timeout(Duration::ZERO)), "startup_timeout");
        assert_eq!(err_setting(b().queue_timeout(Duration::ZERO)), "queue_timeout");
        assert_eq!(err_setting(b().max_frame_size(10)), "max_frame_size");
        assert_eq!(
            err_setting(b().restart_backoff(Duration::from_secs(2), Duration::from_secs(1))),
            "restart_backoff"
        );
        assert_eq!(err_setting(b().degraded_after(0)), "degraded_after");
        assert_eq!(err_setting(b().ttl(Duration::ZERO)), "ttl");
        assert_eq!(err_setting(b().max_requests(0)), "max_requests");
        assert_eq!(err_setting(b().max_memory(0)), "max_memory");
        assert_eq!(err_setting(b().max_memory(100).max_memory_hard(50)), "max_memory_hard");
        assert_eq!(err_setting(b().jitter(1.5)), "jitter");
        assert_eq!(err_setting(b().jitter(f64::NAN)), "jitter");
        assert_eq!(err_setting(b().max_concurrent_recycles(0)), "max_concurrent_recycles");
        assert_eq!(err_setting(b().health_interval(Duration::ZERO)), "health_interval");
        assert_eq!(err_setting(b().reaper_interval(Duration::ZERO)), "reaper_interval");
        assert_eq!(err_setting(b().startup_timeout(Duration::MAX)), "startup_timeout");
        assert_eq!(err_setting(b().shutdown_timeout(Duration::MAX)), "shutdown_timeout");
        assert_eq!(err_setting(b().ttl(Duration::MAX)), "ttl");
        assert_eq!(err_setting(b().session_ttl(Duration::ZERO)), "session_ttl");
        assert_eq!(err_setting(b().max_sessions(0)), "max_sessions");
        assert_eq!(err_setting(b().init("", serde_json::Value::Null)), "init");
        assert_eq!(err_setting(b().init("load", serde_json::json!(3))), "init");
    }
}
