//! The housekeeper thread (`sp-keep-<pool>`), started only when a pool checks memory or health:
//! every tick it reads the workers' process-tree memory from `/proc` (one scan for all of them)
//! and pings idle workers, and orders the dispatcher to recycle or kill the ones that fail.
//! Ages (`ttl`) are the dispatcher's own timers.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError};

use crate::config::PoolConfig;
use crate::dispatcher::{Effects, Lease, RecycleOrder, Request, Return, Shared};
use crate::policy::{over_hard_memory, should_recycle, Policy, RecycleReason};
use crate::proc::ProcessTree;
use crate::protocol::{self, Msg};
use crate::worker::{Exchange, KillReason, Looks, Sending, WorkerId};

/// Ping ids start here, far from call ids.
const FIRST_PING: u64 = 1 << 62;

/// Whether a pool needs the housekeeper, and how often it wakes.
pub(crate) fn tick(cfg: &PoolConfig) -> Option<Duration> {
    let p = &cfg.policy;
    let memory = (p.max_memory.is_some() || p.max_memory_hard.is_some()).then_some(cfg.reaper_interval);
    match (memory, cfg.health_interval) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The thread's body; ends when `stop` is signalled or dropped, or the dispatcher is gone.
pub(crate) fn run(cfg: Arc<PoolConfig>, shared: Arc<Shared>, tick: Duration, stop: Receiver<()>) {
    let mut pinged: HashMap<WorkerId, Instant> = HashMap::new();
    let mut next_ping = FIRST_PING;
    loop {
        match stop.recv_timeout(tick) {
            Err(RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        let p = &cfg.policy;
        if (p.max_memory.is_some() || p.max_memory_hard.is_some()) && !check_memory(p, &shared) {
            return;
        }
        if let Some(interval) = cfg.health_interval {
            check_health(&cfg, &shared, interval, &mut pinged, &mut next_ping, &stop);
        }
    }
}

/// Reads every worker's tree memory in one `/proc` scan and orders what is due. False once
/// the dispatcher is gone.
fn check_memory(policy: &Policy, shared: &Shared) -> bool {
    let (tx, rx) = bounded(1);
    if shared.requests.send(Request::Facts(tx)).is_err() {
        return false;
    }
    let Ok(workers) = rx.recv_timeout(Duration::from_secs(10)) else { return false };
    let tree = ProcessTree::scan();
    let now = Instant::now();
    for mut w in workers {
        w.rss = if w.root == w.pid { tree.rss(w.pid) } else { tree.rss_below(w.root) };
        let kill = over_hard_memory(&w, policy);
        let reason = if kill { Some(RecycleReason::Memory) } else { should_recycle(&w, now) };
        // Only memory is decided here; the call side and the dispatcher's timers do the rest.
        if reason == Some(RecycleReason::Memory) {
            let order = RecycleOrder { worker: w.id, reason: RecycleReason::Memory, kill, rss: w.rss };
            if shared.requests.send(Request::Recycle(order)).is_err() {
                return false;
            }
        }
    }
    true
}

/// Pings each worker that is due: process workers only while idle (a busy one cannot answer,
/// and its call's deadline covers it), thread workers at any time (their reading loop answers
/// even while every thread is busy). A worker that does not answer within `health_timeout` is
/// killed and replaced.
fn check_health(
    cfg: &PoolConfig,
    shared: &Shared,
    interval: Duration,
    pinged: &mut HashMap<WorkerId, Instant>,
    next_ping: &mut u64,
    stop: &Receiver<()>,
) {
    let conns = shared.board.lock().open_conns();
    pinged.retain(|id, _| conns.iter().any(|(w, _, _)| w == id));
    for (id, conn, idle) in conns {
        if !stop.is_empty() {
            return;
        }
        let now = Instant::now();
        let last = *pinged.entry(id).or_insert(now);
        if now < last + interval {
            continue;
        }
        let threaded = cfg.capacity() > 1;
        let lease: Option<Lease<_>> = if threaded {
            None
        } else if idle {
            match shared.board.lock().take_idle(id) {
                Some(l) => Some(l),
                None => continue,
            }
        } else {
            continue;
        };
        pinged.insert(id, now);
        *next_ping += 1;
        let frame = protocol::Frame::from(
            protocol::encode_frame(&Msg::Ping { id: *next_ping }, cfg.max_frame_size).unwrap_or_default(),
        );
        let how = match conn.exchange(
            &frame,
            *next_ping,
            now + cfg.health_timeout,
            Sending::Ping,
            Looks::default(),
        ) {
            Exchange::Reply(Ok(_)) => Return::Done,
            // Found dead: a crash, which its monitor reports; not a failed health check.
            Exchange::NotSent { dead: true } => Return::Dead,
            Exchange::NotSent { dead: false } => Return::Unusable,
            _ => Return::Kill(KillReason::HealthCheck),
        };
        let mut fx = Effects::default();
        match lease {
            Some(l) => shared.board.lock().give_back(l, how, None, &mut fx),
            None if how == Return::Kill(KillReason::HealthCheck) => {
                fx.notices.push(crate::dispatcher::Notice::Kill(id, KillReason::HealthCheck))
            }
            None => {}
        }
        shared.apply(fx);
    }
}
