//! Plain snapshots of a pool's state, and the latency window they are computed from.

use std::collections::VecDeque;
use std::time::Duration;

use serde::Serialize;

use crate::policy::RecycleReason;

/// A snapshot of one pool, taken by the dispatcher at one instant.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct PoolStats {
    /// The pool's name.
    pub name: String,
    /// The configured number of workers.
    pub size: usize,
    /// Workers that are ready to take calls now.
    pub ready_workers: usize,
    /// Whether the pool is degraded (workers keep failing to start and none is ready).
    pub degraded: bool,
    /// Calls that returned `Ok`.
    pub calls_ok: u64,
    /// Calls that returned `Err` (Python exceptions, time-outs, crashes, refusals).
    pub calls_failed: u64,
    /// Calls waiting in the queue now.
    pub queued: usize,
    /// The most calls ever waiting at once.
    pub queue_high_water: usize,
    /// Calls that timed out (in the queue or running).
    pub timeouts: u64,
    /// Workers that died while ready or busy, without being asked to stop.
    pub crashes: u64,
    /// Workers started after the pool's initial start to replace ones that died or failed to
    /// start (replacements for recycled workers are counted in `recycles`).
    pub restarts: u64,
    /// Workers recycled, by reason.
    pub recycles: Recycles,
    /// Start-up failures in a row now (0 when the last start succeeded).
    pub startup_failures: u32,
    /// Events dropped because the `on_event` callback fell too far behind.
    pub events_dropped: u64,
    /// Time calls waited for a worker, over the most recent calls.
    pub queue_wait: Latency,
    /// Time calls spent on a worker, over the most recent calls.
    pub execution: Latency,
    /// Sessions live, closed, expired and lost.
    pub sessions: crate::session::SessionCounts,
    /// One entry per live worker.
    pub workers: Vec<WorkerStats>,
}

/// A snapshot of one worker.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct WorkerStats {
    /// The worker's number within the pool.
    pub id: u64,
    /// Its process id.
    pub pid: u32,
    /// What it is doing.
    pub state: WorkerState,
    /// Calls running on it now.
    pub in_flight: usize,
    /// How many calls it can run at once.
    pub capacity: usize,
    /// Calls it has finished.
    pub calls_served: u64,
    /// Calls it finished with a Python exception.
    pub errors: u64,
    /// Time since it was spawned, in milliseconds.
    pub age_ms: u64,
    /// Its resident memory from `/proc`, if readable.
    pub rss_bytes: Option<u64>,
    /// Its `max_requests` after jitter, if the pool sets one.
    pub max_requests: Option<u64>,
    /// Time until its `ttl` (after jitter) is reached, if the pool sets one.
    pub recycle_in_ms: Option<u64>,
    /// Why it is being replaced, while its replacement starts.
    pub recycling: Option<RecycleReason>,
    /// Strict sessions bound to it.
    pub sessions: usize,
}

/// Recycled workers, by reason.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Recycles {
    /// Reached their `ttl`.
    pub ttl: u64,
    /// Served their `max_requests`.
    pub max_requests: u64,
    /// Passed `max_memory` (or `max_memory_hard`).
    pub memory: u64,
    /// Failed a health check.
    pub health_check: u64,
    /// Asked for with `recycle_worker` or `recycle_all`.
    pub manual: u64,
    /// Thread profile: replaced because every call slot was held by a call that timed out.
    pub wedged: u64,
}

impl Recycles {
    pub(crate) fn add(&mut self, reason: RecycleReason) {
        match reason {
            RecycleReason::Ttl => self.ttl += 1,
            RecycleReason::MaxRequests => self.max_requests += 1,
            RecycleReason::Memory => self.memory += 1,
            RecycleReason::HealthCheck => self.health_check += 1,
            RecycleReason::Manual => self.manual += 1,
            RecycleReason::Wedged => self.wedged += 1,
        }
    }

    /// All recycles.
    pub fn total(&self) -> u64 {
        self.ttl + self.max_requests + self.memory + self.health_check + self.manual + self.wedged
    }
}

/// A worker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum WorkerState {
    /// Spawned, not yet ready.
    Starting,
    /// Taking calls.
    Ready,
    /// Recycled: finishing its calls, taking no new ones.
    Draining,
    /// Asked to stop or being killed; takes no new calls.
    Stopping,
}

/// Percentiles over a window of recent samples, in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
#[non_exhaustive]
pub struct Latency {
    /// How many samples the window holds.
    pub samples: usize,
    /// The median.
    pub p50_us: u64,
    /// The 99th percentile.
    pub p99_us: u64,
    /// The largest.
    pub max_us: u64,
}

/// The most recent `WINDOW` durations.
#[derive(Debug, Default)]
pub(crate) struct Window {
    samples: VecDeque<u32>,
}

impl Window {
    const WINDOW: usize = 1024;

    pub(crate) fn record(&mut self, d: Duration) {
        if self.samples.len() == Self::WINDOW {
            self.samples.pop_front();
        }
        self.samples.push_back(u32::try_from(d.as_micros()).unwrap_or(u32::MAX));
    }

    pub(crate) fn latency(&self) -> Latency {
        let mut v: Vec<u32> = self.samples.iter().copied().collect();
        if v.is_empty() {
            return Latency::default();
        }
        v.sort_unstable();
        let at = |q: f64| u64::from(v[((v.len() - 1) as f64 * q).round() as usize]);
        Latency { samples: v.len(), p50_us: at(0.5), p99_us: at(0.99), max_us: at(1.0) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_over_the_window() {
        let mut w = Window::default();
        assert_eq!(w.latency().samples, 0);
        for us in 1..=100u64 {
            w.record(Duration::from_micros(us));
        }
        let l = w.latency();
        assert_eq!((l.samples, l.p50_us, l.p99_us, l.max_us), (100, 51, 99, 100));
        for _ in 0..Window::WINDOW {
            w.record(Duration::from_micros(7));
        }
        let l = w.latency();
        assert_eq!((l.samples, l.p50_us, l.max_us), (Window::WINDOW, 7, 7));
    }
}
