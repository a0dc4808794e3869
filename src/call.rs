//! How one call runs, from its arguments to its one outcome: shared by [`Pool`](crate::Pool)
//! and [`Session`](crate::Session).
//!
//! A call is owned by its caller from start to end: it takes a lease on a worker (or waits for
//! one, in order), exchanges the frames with the worker itself, and records the one outcome on
//! the board as it gives the lease back. The dispatcher is not on the path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::config::{PoolConfig, Profile};
use crate::dispatcher::{Admit, Effects, Lease, Return, Route, Shared};
use crate::error::{Error, Result, TimeoutKind};
use crate::events::Event;
use crate::mailbox::Missed;
use crate::pending::Ticket;
use crate::pool::CallOptions;
use crate::protocol;
use crate::session::{self, CallSession, Loss};
use crate::worker::{Conn, Exchange, KillReason, Looks, Sending, WorkerId};

/// The largest frame a freeing caller writes for the next waiting call: one atomic pipe write
/// (`PIPE_BUF`), which a non-blocking pipe takes whole or not at all.
const PREWRITE_MAX: usize = 4096;
/// How long a caller whose queue deadline passed just as a lease was handed to it waits for
/// that lease to arrive (the handing thread is between two lines of code).
const HANDOFF_WAIT: Duration = Duration::from_secs(1);

/// How long before a running call's deadline its worker's Python stacks are taken (a tenth of
/// its timeout if that is shorter).
const STACK_LEAD: Duration = Duration::from_millis(100);
/// Calls with shorter timeouts get no stacks: a deadline of a few milliseconds is a deadline
/// race, not a hang, and taking stacks at that rate would cost the worker more than its calls.
const STACK_MIN_TIMEOUT: Duration = Duration::from_millis(100);

/// How deep a call's arguments may nest: well within what both sides' JSON decoders take.
const MAX_ARGS_DEPTH: usize = 100;

/// What every call of a pool needs: its settings, the board, the call ids.
#[derive(Debug)]
pub(crate) struct Calls {
    config: Arc<PoolConfig>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
}

/// A call ready to run: its frame and deadlines.
struct Prepared {
    id: u64,
    frame: Arc<Vec<u8>>,
    enqueued: Instant,
    queue_deadline: Instant,
    deadline: Instant,
    timeout: Duration,
    queue_timeout: Duration,
    /// Its session's id.
    session: Option<u64>,
}

/// Why a routed call could not run, before the session (if any) turns it into its error.
enum Refused {
    /// The worker it was routed to is gone (or stopping).
    Gone(WorkerId, Loss),
    /// The worker it was routed to has no room now.
    Busy(WorkerId),
    Other(Error),
}

impl From<Error> for Refused {
    fn from(e: Error) -> Self {
        Refused::Other(e)
    }
}

impl Calls {
    pub(crate) fn new(config: Arc<PoolConfig>, shared: Arc<Shared>) -> Self {
        Calls { config, shared, next_id: AtomicU64::new(1) }
    }

    pub(crate) fn config(&self) -> &PoolConfig {
        &self.config
    }

    pub(crate) fn shared(&self) -> &Shared {
        &self.shared
    }

    /// A call on any worker (or only on `worker`), with no session.
    pub(crate) fn call(
        &self,
        command: &str,
        args: Value,
        options: CallOptions,
        worker: Option<WorkerId>,
    ) -> Result<Value> {
        let p = self.prepare(command, &args, &options, None)?;
        let route = worker.map_or(Route::Any, Route::Only);
        self.run_tracked(command, &p, route, &mut None, None).map_err(|refused| match refused {
            Refused::Gone(worker, _) | Refused::Busy(worker) => Error::UnknownWorker { worker },
            Refused::Other(e) => e.in_call(command, p.timeout, p.queue_timeout),
        })
    }

    /// A submitted call, run by a runner thread: `ticket` lets its handle cancel it while it
    /// waits in the queue.
    pub(crate) fn call_pending(
        &self,
        command: &str,
        args: Value,
        options: CallOptions,
        since: Instant,
        ticket: &Ticket,
    ) -> Result<Value> {
        let mut p = self.prepare(command, &args, &options, None)?;
        // Its deadline runs from its submission, not from when a runner took it.
        let waited = p.enqueued.saturating_duration_since(since);
        p.enqueued = since;
        p.deadline = p.deadline.checked_sub(waited).unwrap_or(since);
        p.queue_deadline = p.queue_deadline.checked_sub(waited).unwrap_or(since);
        self.run_tracked(command, &p, Route::Any, &mut None, Some(ticket)).map_err(|refused| match refused {
            Refused::Gone(worker, _) | Refused::Busy(worker) => Error::UnknownWorker { worker },
            Refused::Other(e) => e.in_call(command, p.timeout, p.queue_timeout),
        })
    }

    /// A call in a session: routed by its affinity, carrying its id and context.
    pub(crate) fn call_in_session(
        &self,
        command: &str,
        args: Value,
        options: CallOptions,
        s: &CallSession<'_>,
    ) -> Result<Value> {
        let p = self.prepare(command, &args, &options, Some(s))?;
        let route = match session::begin_call(&self.shared, s) {
            Ok(route) => route,
            Err(e) => {
                // Refused before the board saw it (the session ended, or lost its worker):
                // counted like the board's own refusals.
                self.shared.board.lock().record(&Err(e.duplicate()));
                return Err(e);
            }
        };
        let mut ran_on = None;
        let result = self.run_tracked(command, &p, route, &mut ran_on, None);
        session::end_call(&self.shared, s, ran_on);
        result.map_err(|refused| match refused {
            Refused::Gone(worker, reason) => {
                session::lost(&self.shared, s, worker, reason);
                Error::SessionLost { session: s.core.id, worker, reason }
            }
            Refused::Busy(worker) => Error::SessionBusy { session: s.core.id, worker },
            Refused::Other(e) => e.in_call(command, p.timeout, p.queue_timeout),
        })
    }

    /// Checks the arguments and options and encodes the call's frame.
    fn prepare(
        &self,
        command: &str,
        args: &Value,
        options: &CallOptions,
        session: Option<&CallSession<'_>>,
    ) -> Result<Prepared> {
        if !matches!(args, Value::Object(_) | Value::Array(_) | Value::Null) {
            return Err(Error::InvalidArgs(format!(
                "args must be a JSON object, array or null, found {}",
                protocol::json_kind(args)
            )));
        }
        if depth(args) > MAX_ARGS_DEPTH {
            return Err(Error::InvalidArgs(format!("args nest deeper than {MAX_ARGS_DEPTH} levels")));
        }
        let timeout = options.timeout.unwrap_or(self.config.request_timeout);
        if timeout.is_zero() {
            return Err(Error::config("CallOptions::timeout", "must be greater than zero"));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let session_id = session.map(|s| s.core.id);
        let session = session.map(|s| (s.tag(), s.context.as_ref()));
        let frame =
            protocol::encode_call(id, command, args, session, self.config.max_frame_size).map_err(|e| {
                match protocol::as_too_large(&e) {
                    Some(t) => Error::FrameTooLarge { size: t.size, max: t.max },
                    None => Error::Io(e),
                }
            })?;
        let enqueued = Instant::now();
        let far = enqueued + Duration::from_secs(100 * 365 * 24 * 3600);
        let deadline = enqueued.checked_add(timeout).unwrap_or(far).min(far);
        let queue_deadline = match self.config.queue_timeout {
            Some(q) => deadline.min(enqueued.checked_add(q).unwrap_or(far)),
            None => deadline,
        };
        let queue_timeout = self.config.queue_timeout.map_or(timeout, |q| q.min(timeout));
        Ok(Prepared {
            id,
            frame: Arc::new(frame),
            enqueued,
            queue_deadline,
            deadline,
            timeout,
            queue_timeout,
            session: session_id,
        })
    }

    /// Runs an admitted call to its one outcome; `ran_on`: the worker that ran it.
    fn run_tracked(
        &self,
        command: &str,
        p: &Prepared,
        route: Route,
        ran_on: &mut Option<WorkerId>,
        ticket: Option<&Ticket>,
    ) -> Result<Value, Refused> {
        // A worker found dead (or untrustworthy) at checkout never saw the call: try another,
        // until the call's queue deadline (each such worker is closed, so none is tried twice).
        loop {
            let lease = self.lease(command, p, route, ticket)?;
            let started = Instant::now();
            if !lease.sent && started >= p.queue_deadline {
                // Its time ran out before a worker took it: a queue time-out, which costs no
                // worker (writing it now would only get the worker killed).
                let mut fx = Effects::default();
                let mut board = self.shared.board.lock();
                board.give_back(lease, Return::Done, None, &mut fx);
                board.record_queue_timeout();
                drop(board);
                self.shared.apply(fx);
                return Err(Error::timeout(TimeoutKind::Queue).into());
            }
            let what = Sending::Call { sent: lease.sent };
            let worker = lease.worker;
            // Shortly before the deadline, a call still running has its worker's stacks taken,
            // so that its time-out can say where Python was.
            let lead = (p.timeout / 10).min(STACK_LEAD);
            let slow_log = |stack: &str| {
                log::warn!(
                    "[{}] call {} `{command}` on worker {worker} still running after slow_call_log ({:?}):\n{stack}",
                    self.config.name,
                    p.id,
                    self.config.slow_call_log.unwrap_or_default(),
                );
            };
            let looks = Looks {
                slow: self.config.slow_call_log.and_then(|t| started.checked_add(t)),
                last: (p.timeout >= STACK_MIN_TIMEOUT).then(|| p.deadline.checked_sub(lead)).flatten(),
                on_slow: Some(&slow_log),
                ..Looks::default()
            };
            let exchange = lease.conn.exchange(&p.frame, p.id, p.deadline, what, looks);
            if let Some(result) = self.finish(lease, exchange, p, command, started) {
                *ran_on = Some(worker);
                return result.map_err(Refused::Other);
            }
        }
    }

    /// Takes a lease on a worker `route` allows: at once if one is free and nobody waits for
    /// it, else in order, until the call's queue deadline. Refusals and queue time-outs are
    /// counted here. A waiting call leaves its frame, so that the caller who frees a process
    /// worker can write it on its behalf (the lease then comes `sent`).
    fn lease(
        &self,
        command: &str,
        p: &Prepared,
        route: Route,
        ticket: Option<&Ticket>,
    ) -> Result<Lease<Arc<Conn>>, Refused> {
        let prewrite = (self.config.profile == Profile::Process && p.frame.len() <= PREWRITE_MAX)
            .then(|| p.frame.clone());
        let mut fx = Effects::default();
        let admit = || self.shared.board.lock().admit(command, prewrite, p.queue_deadline, route, &mut fx);
        let admitted = match ticket {
            Some(t) => t.admit(admit),
            None => admit(),
        };
        self.shared.apply(fx);
        let (rx, place) = match admitted? {
            Admit::Run(lease) => return Ok(lease),
            Admit::Wait(rx, place) => (rx, place),
            Admit::Gone(loss) => {
                let w = routed_to(route);
                return Err(Refused::Gone(
                    w,
                    loss.unwrap_or_else(|| session::lost_worker_reason(&self.shared, w, p.deadline)),
                ));
            }
            Admit::Busy => return Err(Refused::Busy(routed_to(route))),
        };
        let handed = match rx.recv_deadline(p.queue_deadline) {
            Ok(lease) => {
                if let Some(t) = ticket {
                    t.leased();
                }
                return Ok(lease);
            }
            Err(Missed::Timeout) => {
                if self.shared.board.lock().withdraw(place) {
                    return Err(Error::timeout(TimeoutKind::Queue).into());
                }
                // A lease was handed to us just as the deadline passed; it is on its way.
                rx.recv_deadline(Instant::now() + HANDOFF_WAIT).ok()
            }
            Err(Missed::Closed) => None,
        };
        match handed {
            Some(lease) => {
                if let Some(t) = ticket {
                    t.leased();
                }
                Ok(lease)
            }
            None if ticket.is_some_and(Ticket::cancelled) => Err(Error::Cancelled.into()),
            None => {
                let mut board = self.shared.board.lock();
                if let Route::Only(w) = route {
                    if board.gate_open() && !board.takes_routed(w) {
                        // Its worker stopped taking calls while it waited.
                        let loss = board.loss_of(w);
                        board.record(&Err(Error::UnknownWorker { worker: w }));
                        drop(board);
                        let loss =
                            loss.unwrap_or_else(|| session::lost_worker_reason(&self.shared, w, p.deadline));
                        return Err(Refused::Gone(w, loss));
                    }
                }
                // The queue was emptied (shutdown, or the pool is degraded).
                let err = match board.dropped_for.clone() {
                    crate::dispatcher::Gate::Degraded(last_error) => Error::Degraded { last_error },
                    _ => Error::ShuttingDown,
                };
                board.record(&Err(err.duplicate()));
                Err(err.into())
            }
        }
    }

    /// Turns an exchange into the call's one outcome, records it as the lease goes back, and
    /// announces it. `None`: the call never reached the worker; run it elsewhere.
    fn finish(
        &self,
        lease: Lease<Arc<Conn>>,
        exchange: Exchange,
        p: &Prepared,
        command: &str,
        started: Instant,
    ) -> Option<Result<Value>> {
        let (id, enqueued, deadline) = (p.id, p.enqueued, p.deadline);
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
            Exchange::TimedOut { running, corrupt, stack } => {
                let how = if corrupt || (running && self.config.kills_on_timeout()) {
                    // Thread profile: its other calls die with it (collateral).
                    conn.mark_killed(KillReason::CallTimeout);
                    Return::Kill(KillReason::CallTimeout)
                } else if running && self.config.profile == Profile::Thread {
                    Return::Abandoned
                } else {
                    Return::Done
                };
                match p.session {
                    Some(session) => log::warn!(
                        "[{}] call {id} `{command}` of session {session} timed out on worker {}",
                        self.config.name,
                        lease.worker
                    ),
                    None => log::warn!(
                        "[{}] call {id} `{command}` timed out on worker {}",
                        self.config.name,
                        lease.worker
                    ),
                }
                if let Some(stack) = &stack {
                    log::warn!("[{}] call {id} `{command}`: where Python was:\n{stack}", self.config.name);
                }
                (how, Err(Error::call_timeout(stack)))
            }
            Exchange::Died => {
                let err = conn.death_error(deadline);
                if let Error::WorkerDied { exit, killed_by, .. } = &err {
                    // Its sessions learn why from the board, before the dispatcher hears of it.
                    let loss = killed_by.map_or(Loss::Died { exit: *exit }, Loss::Killed);
                    self.shared.board.lock().mark_lost(lease.worker, loss);
                }
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
        conn.flush_posted(); // what was posted while the call ran (sessions' ends)
        if self.shared.emitter.enabled() {
            self.shared.emitter.emit(Event::CallCompleted {
                pool: self.config.name.clone(),
                command: command.to_string(),
                queue_wait,
                execution,
                ok: result.is_ok(),
                session: p.session,
            });
        }
        Some(result)
    }
}

fn routed_to(route: Route) -> WorkerId {
    match route {
        Route::Only(w) | Route::OnlyNow(w) | Route::Prefer(w) => w,
        Route::Any => unreachable!("only a routed call is refused for its worker"),
    }
}

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
}
