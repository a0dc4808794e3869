//! What to recycle and when: the policy, the pure decision [`should_recycle`], per-worker
//! jitter, and the one backoff used for restarts. Pure: no threads, no processes, no clock of
//! its own (every decision takes `now`).

use std::time::{Duration, Instant};

use serde::Serialize;

/// Why a worker is recycled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RecycleReason {
    /// It reached its maximum age (`ttl` plus its jitter).
    Ttl,
    /// It was given its last call (`max_requests` plus its jitter).
    MaxRequests,
    /// Its process tree's resident memory passed `max_memory` (or `max_memory_hard`).
    Memory,
    /// It did not answer an idle `ping` within `health_timeout`.
    HealthCheck,
    /// [`Pool::recycle_worker`](crate::Pool::recycle_worker) or
    /// [`Pool::recycle_all`](crate::Pool::recycle_all).
    Manual,
    /// Thread profile: every call slot of the worker is held by a call that already timed out
    /// and has not returned, so it can take no call at all.
    Wedged,
}

impl std::fmt::Display for RecycleReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RecycleReason::Ttl => "ttl",
            RecycleReason::MaxRequests => "max_requests",
            RecycleReason::Memory => "memory",
            RecycleReason::HealthCheck => "health_check",
            RecycleReason::Manual => "manual",
            RecycleReason::Wedged => "wedged",
        })
    }
}

/// A pool's recycling policy; every limit is off unless set.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Policy {
    pub(crate) ttl: Option<Duration>,
    pub(crate) max_requests: Option<u64>,
    pub(crate) max_memory: Option<u64>,
    pub(crate) max_memory_hard: Option<u64>,
    /// The largest fraction added to each limit, drawn per worker (0.1 = up to 10% more).
    pub(crate) jitter: f64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy { ttl: None, max_requests: None, max_memory: None, max_memory_hard: None, jitter: 0.1 }
    }
}

/// One worker's limits after its jitter, fixed when it starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Limits {
    pub(crate) ttl: Option<Duration>,
    pub(crate) max_requests: Option<u64>,
    pub(crate) max_memory: Option<u64>,
}

impl Policy {
    /// Draws a worker's limits: each limit grows by its own uniform fraction in
    /// `[0, jitter)`, so workers started together do not recycle together.
    pub(crate) fn limits(&self, seed: u64) -> Limits {
        let mut rng = XorShift::new(seed);
        let mut grow = |x: f64| x * (1.0 + self.jitter * rng.next_f64());
        Limits {
            ttl: self.ttl.map(|t| Duration::from_secs_f64(grow(t.as_secs_f64()))),
            max_requests: self.max_requests.map(|n| grow(n as f64).floor() as u64),
            max_memory: self.max_memory.map(|m| grow(m as f64) as u64),
        }
    }
}

/// What the decision needs to know about one worker.
#[derive(Debug, Clone)]
pub(crate) struct WorkerFacts {
    pub(crate) id: u64,
    pub(crate) pid: u32,
    /// Where its process tree is measured from: its keeper, whose adopted orphans belong to
    /// the worker too (the worker itself without a keeper).
    pub(crate) root: u32,
    pub(crate) spawned: Instant,
    /// Calls given to it so far (finished plus in flight).
    pub(crate) assigned: u64,
    pub(crate) limits: Limits,
    /// Resident memory of its whole process tree, when read.
    pub(crate) rss: Option<u64>,
}

/// Whether (and why) a worker should be recycled now. Pure: the call side (at each call), the
/// dispatcher (TTL) and the housekeeper (memory) call it, and unit tests call it directly.
///
/// `max_requests` fires a quarter of the budget early, so the replacement can be ready before
/// the worker is spent (the worker retires as soon as it is); the board never gives an open
/// worker more calls than its limit, which is what makes the limit exact (a retired worker
/// still serves its strict sessions for `session_drain`).
pub(crate) fn should_recycle(w: &WorkerFacts, now: Instant) -> Option<RecycleReason> {
    if let (Some(limit), Some(rss)) = (w.limits.max_memory, w.rss) {
        if rss > limit {
            return Some(RecycleReason::Memory);
        }
    }
    if let Some(limit) = w.limits.max_requests {
        let lead = limit / 4;
        if w.assigned + lead >= limit {
            return Some(RecycleReason::MaxRequests);
        }
    }
    if let Some(ttl) = w.limits.ttl {
        if now.saturating_duration_since(w.spawned) >= ttl {
            return Some(RecycleReason::Ttl);
        }
    }
    None
}

/// Whether a worker's memory is past the hard ceiling, where it is killed instead of drained.
pub(crate) fn over_hard_memory(w: &WorkerFacts, policy: &Policy) -> bool {
    matches!((policy.max_memory_hard, w.rss), (Some(hard), Some(rss)) if rss > hard)
}

/// A tiny xorshift generator: jitter needs spread, not cryptographic quality.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        // splitmix64 of the seed, so nearby seeds give unrelated streams; never zero.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        XorShift((z ^ (z >> 31)) | 1)
    }
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Capped exponential backoff: `first`, doubling with each failure in a row, never above
/// `max`. The one formula for restarts after failed starts, idle crash loops and failed
/// recycles.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Backoff {
    first: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub(crate) fn new((first, max): (Duration, Duration)) -> Self {
        Backoff { first, max, failures: 0 }
    }

    /// Counts one more failure in a row and returns the delay before the next try.
    pub(crate) fn fail(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.delay()
    }

    /// The delay for the failures counted so far (zero when there are none).
    pub(crate) fn delay(&self) -> Duration {
        match self.failures {
            0 => Duration::ZERO,
            n => self.first.saturating_mul(1 << (n - 1).min(20)).min(self.max),
        }
    }

    /// Failures in a row so far.
    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }

    /// A success: the next failure starts from `first` again.
    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn facts(limits: Limits) -> WorkerFacts {
        WorkerFacts { id: 1, pid: 1, root: 1, spawned: Instant::now(), assigned: 0, limits, rss: None }
    }

    const NO_LIMITS: Limits = Limits { ttl: None, max_requests: None, max_memory: None };

    #[test]
    fn nothing_fires_without_limits() {
        let mut w = facts(NO_LIMITS);
        w.assigned = 1_000_000;
        w.rss = Some(u64::MAX);
        assert_eq!(should_recycle(&w, Instant::now() + Duration::from_secs(86400)), None);
    }

    #[test]
    fn each_limit_fires_at_its_threshold() {
        let now = Instant::now();
        let mut w = facts(Limits { ttl: Some(Duration::from_secs(10)), ..NO_LIMITS });
        w.spawned = now;
        assert_eq!(should_recycle(&w, now + Duration::from_millis(9999)), None);
        assert_eq!(should_recycle(&w, now + Duration::from_secs(10)), Some(RecycleReason::Ttl));

        // A quarter of the budget early, so the replacement can be ready in time.
        let mut w = facts(Limits { max_requests: Some(100), ..NO_LIMITS });
        w.assigned = 74;
        assert_eq!(should_recycle(&w, now), None);
        w.assigned = 75;
        assert_eq!(should_recycle(&w, now), Some(RecycleReason::MaxRequests));
        w.assigned = 100;
        assert_eq!(should_recycle(&w, now), Some(RecycleReason::MaxRequests));
        // A budget under four calls fires when spent.
        let mut w = facts(Limits { max_requests: Some(2), ..NO_LIMITS });
        w.assigned = 1;
        assert_eq!(should_recycle(&w, now), None);
        w.assigned = 2;
        assert_eq!(should_recycle(&w, now), Some(RecycleReason::MaxRequests));

        let mut w = facts(Limits { max_memory: Some(100), ..NO_LIMITS });
        assert_eq!(should_recycle(&w, now), None, "unknown memory never fires");
        w.rss = Some(100);
        assert_eq!(should_recycle(&w, now), None);
        w.rss = Some(101);
        assert_eq!(should_recycle(&w, now), Some(RecycleReason::Memory));
    }

    #[test]
    fn memory_wins_over_the_other_reasons() {
        let now = Instant::now();
        let mut w = facts(Limits { ttl: Some(Duration::ZERO), max_requests: Some(4), max_memory: Some(1) });
        w.assigned = 5;
        w.rss = Some(2);
        assert_eq!(should_recycle(&w, now), Some(RecycleReason::Memory));
        w.rss = Some(1);
        assert_eq!(should_recycle(&w, now), Some(RecycleReason::MaxRequests));
    }

    #[test]
    fn hard_memory_ceiling() {
        let policy = Policy { max_memory_hard: Some(1000), ..Policy::default() };
        let mut w = facts(NO_LIMITS);
        assert!(!over_hard_memory(&w, &policy));
        w.rss = Some(1000);
        assert!(!over_hard_memory(&w, &policy));
        w.rss = Some(1001);
        assert!(over_hard_memory(&w, &policy));
        assert!(!over_hard_memory(&w, &Policy::default()));
    }

    #[test]
    fn jitter_spreads_limits_over_the_whole_range() {
        let policy = Policy {
            ttl: Some(Duration::from_secs(100)),
            max_requests: Some(1000),
            max_memory: Some(1 << 30),
            jitter: 0.1,
            ..Policy::default()
        };
        let draws: Vec<Limits> = (0..2000u64).map(|seed| policy.limits(seed)).collect();
        let reqs: Vec<u64> = draws.iter().map(|l| l.max_requests.unwrap()).collect();
        assert!(reqs.iter().all(|&r| (1000..1100).contains(&r)), "within [limit, limit + 10%)");
        let mean = reqs.iter().sum::<u64>() as f64 / reqs.len() as f64;
        assert!((1045.0..1055.0).contains(&mean), "uniform: mean {mean}");
        // Every tenth of the range is used, roughly evenly.
        let mut buckets = [0usize; 10];
        for &r in &reqs {
            buckets[((r - 1000) / 10) as usize] += 1;
        }
        assert!(buckets.iter().all(|&b| (120..280).contains(&b)), "{buckets:?}");
        let ttls: HashSet<u128> = draws.iter().map(|l| l.ttl.unwrap().as_millis()).collect();
        assert!(ttls.len() > 1500, "ttl draws differ between workers");
        assert!(draws.iter().all(|l| {
            let t = l.ttl.unwrap();
            t >= Duration::from_secs(100) && t < Duration::from_secs(110)
        }));
        // The three limits of one worker are drawn independently.
        let same = draws
            .iter()
            .filter(|l| {
                let r = (l.max_requests.unwrap() - 1000) / 10;
                let t = (l.ttl.unwrap().as_secs_f64() - 100.0) as u64;
                r == t
            })
            .count();
        assert!(same < 400, "{same} of 2000 fell in the same tenth");
    }

    #[test]
    fn zero_jitter_keeps_limits_exact() {
        let policy = Policy { max_requests: Some(50), jitter: 0.0, ..Policy::default() };
        assert!((0..100).all(|s| policy.limits(s).max_requests == Some(50)));
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_and_resets() {
        let mut b = Backoff::new((Duration::from_millis(100), Duration::from_secs(1)));
        assert_eq!(b.delay(), Duration::ZERO);
        let delays: Vec<u64> = (0..6).map(|_| b.fail().as_millis() as u64).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.failures(), 6);
        b.reset();
        assert_eq!((b.failures(), b.delay()), (0, Duration::ZERO));
        assert_eq!(b.fail(), Duration::from_millis(100));
        let mut many = Backoff::new((Duration::from_secs(1), Duration::from_secs(3600)));
        for _ in 0..100 {
            many.fail();
        }
        assert_eq!(many.delay(), Duration::from_secs(3600), "no overflow after many failures");
    }
}
