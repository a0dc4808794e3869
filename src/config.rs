//! A pool's settings ([`PoolConfig`]) and the builder that sets and validates them.

use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::protocol::DEFAULT_MAX_FRAME;

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
    pub(crate) restart_backoff: (Duration, Duration),
    pub(crate) degraded_after: u32,
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
            restart_backoff: (Duration::from_millis(100), Duration::from_secs(10)),
            degraded_after: 3,
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
    /// The first and the largest delay before restarting a worker that failed to start.
    pub fn restart_backoff(&self) -> (Duration, Duration) {
        self.restart_backoff
    }
    /// How many start-up failures in a row make the pool degraded.
    pub fn degraded_after(&self) -> u32 {
        self.degraded_after
    }

    /// Checks every setting; the first problem names its setting.
    pub(crate) fn validate(&self) -> Result<()> {
        let valid_name =
            |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !valid_name(&self.name) {
            return Err(Error::config(
                "name",
                format!("{:?} must be non-empty ASCII letters, digits, '_' or '-'", self.name),
            ));
        }
        if self.size == 0 || self.size > 1024 {
            return Err(Error::config("size", format!("must be between 1 and 1024, found {}", self.size)));
        }
        if let Some(adapter) = &self.adapter {
            let ident = |p: &str| {
                p.chars().next().is_some_and(|c| c.is_alphabetic() || c == '_')
                    && p.chars().all(|c| c.is_alphanumeric() || c == '_')
            };
            if !adapter.split('.').all(ident) {
                return Err(Error::config("adapter", format!("{adapter:?} is not a Python module name")));
            }
        }
        for (k, v) in &self.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                return Err(Error::config("env", format!("{k:?} is not a valid environment variable")));
            }
        }
        for (setting, d) in [
            ("startup_timeout", self.startup_timeout),
            ("request_timeout", self.request_timeout),
            ("shutdown_timeout", self.shutdown_timeout),
            ("restart_backoff", self.restart_backoff.0),
        ] {
            if d.is_zero() {
                return Err(Error::config(setting, "must be greater than zero"));
            }
        }
        if self.queue_timeout.is_some_and(|d| d.is_zero()) {
            return Err(Error::config("queue_timeout", "must be greater than zero"));
        }
        if self.restart_backoff.1 < self.restart_backoff.0 {
            return Err(Error::config("restart_backoff", "the largest delay is smaller than the first"));
        }
        if self.max_frame_size < 1024 || self.max_frame_size > u32::MAX as usize {
            return Err(Error::config(
                "max_frame_size",
                format!("must be between 1024 and {} bytes, found {}", u32::MAX, self.max_frame_size),
            ));
        }
        if self.degraded_after == 0 {
            return Err(Error::config("degraded_after", "must be at least 1"));
        }
        Ok(())
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
    /// Puts a folder on the workers' `PYTHONPATH` (ahead of the embedded package), e.g. where
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
    }
}
