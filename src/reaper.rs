//! Recycling: the policy, the pure decision [`should_recycle`], per-worker jitter, the
//! process-tree memory reading, and the reaper thread that puts them together.
//!
//! The reaper never touches a worker. Every `reaper_interval` it asks the dispatcher for the
//! workers' facts, reads their memory from `/proc`, decides, and sends the dispatcher
//! `Recycle` requests; the dispatcher carries them out make-before-break.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};
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
}

impl std::fmt::Display for RecycleReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RecycleReason::Ttl => "ttl",
            RecycleReason::MaxRequests => "max_requests",
            RecycleReason::Memory => "memory",
            RecycleReason::HealthCheck => "health_check",
            RecycleReason::Manual => "manual",
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
    pub(crate) spawned: Instant,
    /// Calls given to it so far (finished plus in flight).
    pub(crate) assigned: u64,
    pub(crate) limits: Limits,
    /// Resident memory of its whole process tree, when read.
    pub(crate) rss: Option<u64>,
}

/// Whether (and why) a worker should be recycled now. Pure: the reaper and the dispatcher
/// call it, and unit tests call it directly.
///
/// `max_requests` fires a quarter of the budget early, so the replacement can be ready before
/// the worker is spent (the worker retires as soon as it is); the dispatcher never gives a
/// worker more calls than its limit, which is what makes the limit exact.
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

/// Resident memory of `pid` and all its descendants, from `/proc`. `None` if the process is
/// gone.
pub(crate) fn tree_rss(pid: u32) -> Option<u64> {
    let mut total = crate::stats::rss_bytes(pid)?;
    let children = children_map();
    let mut stack = vec![pid];
    let mut seen = HashSet::new();
    while let Some(p) = stack.pop() {
        for &c in children.get(&p).map(Vec::as_slice).unwrap_or(&[]) {
            if seen.insert(c) {
                total += crate::stats::rss_bytes(c).unwrap_or(0);
                stack.push(c);
            }
        }
    }
    Some(total)
}

/// parent pid -> child pids, for every process in `/proc`.
fn children_map() -> HashMap<u32, Vec<u32>> {
    let mut map: HashMap<u32, Vec<u32>> = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return map };
    for entry in dir.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // The command name may hold spaces and parentheses: fields start after the last ')'.
        let ppid = stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().nth(1)?.parse().ok());
        if let Some(ppid) = ppid {
            map.entry(ppid).or_default().push(pid);
        }
    }
    map
}

/// What the reaper sends the dispatcher.
#[derive(Debug)]
pub(crate) struct RecycleOrder {
    pub(crate) worker: u64,
    pub(crate) reason: RecycleReason,
    /// Past the hard memory ceiling: kill now instead of draining.
    pub(crate) kill: bool,
    pub(crate) rss: Option<u64>,
}

/// The reaper thread's body: every `interval`, ask for the workers' facts with `ask`, read
/// their memory when the policy needs it, and send an order for each worker due. Ends when the
/// dispatcher stops answering (the pool is shutting down) or `stop` is signalled.
pub(crate) fn run(
    policy: Policy,
    interval: Duration,
    ask: impl Fn(Sender<Vec<WorkerFacts>>) -> bool,
    order: impl Fn(RecycleOrder) -> bool,
    stop: Receiver<()>,
) {
    let needs_memory = policy.max_memory.is_some() || policy.max_memory_hard.is_some();
    loop {
        match stop.recv_timeout(interval) {
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        let (tx, rx) = bounded(1);
        if !ask(tx) {
            return;
        }
        let Ok(workers) = rx.recv_timeout(Duration::from_secs(10)) else { return };
        let now = Instant::now();
        for mut w in workers {
            if needs_memory {
                w.rss = tree_rss(w.pid);
            }
            let kill = over_hard_memory(&w, &policy);
            let reason = if kill { Some(RecycleReason::Memory) } else { should_recycle(&w, now) };
            if let Some(reason) = reason {
                if !order(RecycleOrder { worker: w.id, reason, kill, rss: w.rss }) {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(limits: Limits) -> WorkerFacts {
        WorkerFacts { id: 1, pid: 1, spawned: Instant::now(), assigned: 0, limits, rss: None }
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
    fn tree_rss_counts_children() {
        let me = std::process::id();
        let own = crate::stats::rss_bytes(me).unwrap();
        let mut child = std::process::Command::new("sleep").arg("5").spawn().unwrap();
        let tree = tree_rss(me).unwrap();
        let _ = child.kill();
        let _ = child.wait();
        assert!(tree > own, "tree {tree} vs own {own}");
        assert_eq!(tree_rss(u32::MAX), None);
    }
}
