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

use crate::binary::Payload;
use crate::cancel::{CancelStep, Ladder, Step};
use crate::pending::Runners;
use crate::pool::CallOptions;
use crate::protocol::{self, Frame, Progress};
use crate::session::{self, CallSession, Loss};
use crate::stream::{ProgressSink, Stream, DEFAULT_WINDOW};
use crate::worker::{Conn, Exchange, KillReason, Looks, Sending, WorkerId};
use parking_lot::Mutex;

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
    /// The threads that run submitted calls (`sp-run-<pool>`).
    runners: Runners,
    /// The threads that follow up on calls whose callers were answered while their workers
    /// still run them (`sp-fol-<pool>`): apart from the runners, so that a follow-up (which
    /// may hold the worker the queued calls wait for) never waits behind submitted calls.
    followers: Runners,
}

/// A call ready to run: its frame and deadlines.
pub(crate) struct Prepared {
    pub(crate) id: u64,
    pub(crate) frame: Arc<Frame>,
    pub(crate) enqueued: Instant,
    pub(crate) queue_deadline: Instant,
    pub(crate) deadline: Instant,
    pub(crate) timeout: Duration,
    pub(crate) queue_timeout: Duration,
    /// Its session's id.
    pub(crate) session: Option<u64>,
    /// Where its progress reports go.
    pub(crate) progress: Option<ProgressSink>,
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
        // Enough runners for every worker slot and a full queue behind them, within reason.
        let slots = config.size * config.capacity();
        let runners = Runners::new("run", &config.name, (slots * 4).clamp(64, 1024));
        // A follow-up per call slot at most, and each ends within two cancel graces.
        let followers = Runners::new("fol", &config.name, (slots * 2).clamp(8, 1024));
        Calls { config, shared, next_id: AtomicU64::new(1), runners, followers }
    }

    pub(crate) fn runners(&self) -> &Runners {
        &self.runners
    }

    /// Joins the runner threads, then the follow-ups (which the runners' calls may start).
    pub(crate) fn stop_threads(&self) {
        self.runners.stop();
        self.followers.stop();
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
        args: Payload,
        options: CallOptions,
        worker: Option<WorkerId>,
    ) -> Result<Payload> {
        let p = self.prepare(command, &args, &options, None, None)?;
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
        args: Payload,
        options: CallOptions,
        since: Instant,
        ticket: &Arc<Ticket>,
    ) -> Result<Payload> {
        let mut p = self.prepare(command, &args, &options, None, None)?;
        // Its last progress is kept for its handle, and passed on.
        let (ticket_arc, user_sink) = (ticket.clone(), p.progress.take());
        p.progress = Some(ProgressSink::new(move |progress: &Progress| {
            *ticket_arc.progress.lock() = Some(progress.clone());
            if let Some(sink) = &user_sink {
                sink.call(progress);
            }
        }));
        // Its deadline runs from its submission, not from when a runner took it.
        let waited = p.enqueued.saturating_duration_since(since);
        p.enqueued = since;
        p.deadline = p.deadline.checked_sub(waited).unwrap_or(since);
        p.queue_deadline = p.queue_deadline.checked_sub(waited).unwrap_or(since);
        self.run_tracked(command, &p, Route::Any, &mut None, Some(&**ticket)).map_err(|refused| match refused
        {
            Refused::Gone(worker, _) | Refused::Busy(worker) => Error::UnknownWorker { worker },
            Refused::Other(e) => e.in_call(command, p.timeout, p.queue_timeout),
        })
    }

    /// A call in a session: routed by its affinity, carrying its id and context.
    pub(crate) fn call_in_session(
        &self,
        command: &str,
        args: Payload,
        options: CallOptions,
        s: &CallSession<'_>,
    ) -> Result<Payload> {
        let p = self.prepare(command, &args, &options, Some(s), None)?;
        let route = match session::begin_call(&self.shared, s) {
            Ok(route) => route,
            Err(e) => {
                // Refused before the board saw it (the session ended, or lost its worker):
                // counted like the board's own refusals.
                self.shared.board.lock().record_failure(&e);
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

    /// Starts a streaming call (see [`Stream`]).
    pub(crate) fn stream(
        self: &Arc<Self>,
        command: &str,
        args: Payload,
        options: CallOptions,
    ) -> Result<Stream> {
        let window = options.window.unwrap_or(DEFAULT_WINDOW).max(1);
        let p = self.prepare(command, &args, &options, None, Some(window))?;
        let named = |e: Error| e.in_call(command, p.timeout, p.queue_timeout);
        loop {
            let lease = match self.lease(command, &p, Route::Any, None) {
                Ok(lease) => lease,
                Err(Refused::Other(e)) => return Err(named(e)),
                Err(Refused::Gone(worker, _) | Refused::Busy(worker)) => {
                    return Err(Error::UnknownWorker { worker })
                }
            };
            let started = Instant::now();
            let conn = lease.conn.clone();
            let how = if !lease.sent && started >= p.queue_deadline {
                // As for a call: its time ran out before a worker took it.
                Err((Return::Done, Error::timeout(TimeoutKind::Queue)))
            } else {
                match conn.open_stream(&p.frame, p.id, p.deadline, lease.sent, p.progress.as_ref()) {
                    Ok(rx) => {
                        let chunk_timeout = options.chunk_timeout;
                        return Ok(Stream::new(
                            self.clone(),
                            command,
                            p,
                            lease,
                            rx,
                            window,
                            chunk_timeout,
                            started,
                        ));
                    }
                    Err(Exchange::NotSent { dead }) => Ok(if dead { Return::Dead } else { Return::Unusable }),
                    Err(Exchange::TimedOut { corrupt: true, .. }) => {
                        // Late, part-way through its frame: the worker cannot be trusted.
                        conn.mark_killed(KillReason::CallTimeout);
                        Err((Return::Kill(KillReason::CallTimeout), Error::timeout(TimeoutKind::Call)))
                    }
                    // Late before any of its frame was written: the worker never saw it.
                    Err(_) => Err((Return::Done, Error::timeout(TimeoutKind::Call))),
                }
            };
            let mut fx = Effects::default();
            let mut board = self.shared.board.lock();
            match how {
                // It never reached the worker: try another.
                Ok(how) => board.give_back(lease, how, None, &mut fx),
                Err((how, e)) => {
                    board.give_back(lease, how, None, &mut fx);
                    board.record_failure(&e);
                    drop(board);
                    self.shared.apply(fx);
                    return Err(named(e));
                }
            }
            drop(board);
            self.shared.apply(fx);
        }
    }

    /// Checks the arguments and options and encodes the call's frame; `window`: a stream's.
    pub(crate) fn prepare(
        &self,
        command: &str,
        args: &Payload,
        options: &CallOptions,
        session: Option<&CallSession<'_>>,
        window: Option<u32>,
    ) -> Result<Prepared> {
        if !matches!(args.value, Value::Object(_) | Value::Array(_) | Value::Null) {
            return Err(Error::InvalidArgs(format!(
                "args must be a JSON object, array or null, found {}",
                protocol::json_kind(&args.value)
            )));
        }
        if depth(&args.value) > MAX_ARGS_DEPTH {
            return Err(Error::InvalidArgs(format!("args nest deeper than {MAX_ARGS_DEPTH} levels")));
        }
        let timeout = options.timeout.unwrap_or(self.config.request_timeout);
        if timeout.is_zero() {
            return Err(Error::config("CallOptions::timeout", "must be greater than zero"));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let session_id = session.map(|s| s.core.id);
        let session = session.map(|s| (s.tag(), s.context.as_ref()));
        let frame = protocol::encode_call(id, command, args, session, window, self.config.max_frame_size)
            .map_err(|e| match protocol::as_too_large(&e) {
                Some(t) => Error::FrameTooLarge { size: t.size, max: t.max },
                // More binary values than a frame carries.
                None => Error::InvalidArgs(e.to_string()),
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
            progress: options.on_progress.clone(),
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
    ) -> Result<Payload, Refused> {
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
            let cancel = ticket.map(|t| &t.cancel);
            let looks = Looks {
                slow: self.config.slow_call_log.and_then(|t| started.checked_add(t)),
                last: (p.timeout >= STACK_MIN_TIMEOUT).then(|| p.deadline.checked_sub(lead)).flatten(),
                on_slow: Some(&slow_log),
                cancel,
                grace: self.config.cancel_grace,
                stack_on_give_up: true,
                progress: p.progress.as_ref(),
                ..Looks::default()
            };
            if let Some(token) = cancel {
                token.attach(&lease.conn);
            }
            let exchange = lease.conn.exchange(&p.frame, p.id, p.deadline, what, looks);
            if let Some(token) = cancel {
                token.detach();
            }
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
                        board.record_failure(&Error::UnknownWorker { worker: w });
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
                board.record_failure(&err);
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
    ) -> Option<Result<Payload>> {
        let (id, enqueued, deadline) = (p.id, p.enqueued, p.deadline);
        let conn = lease.conn.clone();
        let (how, result) = match exchange {
            Exchange::Reply(result) => (Some(Return::Done), result),
            Exchange::NotSent { dead } => {
                let how = if dead { Return::Dead } else { Return::Unusable };
                let mut fx = Effects::default();
                self.shared.board.lock().give_back(lease, how, None, &mut fx);
                self.shared.apply(fx);
                return None;
            }
            Exchange::TimedOut { running, corrupt, stack } => {
                let how = if corrupt {
                    conn.mark_killed(KillReason::CallTimeout);
                    Some(Return::Kill(KillReason::CallTimeout))
                } else if running {
                    // Its command is asked to stop, and followed up on: a command that lets go
                    // in time costs no worker.
                    None
                } else {
                    Some(Return::Done)
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
            Exchange::Unheeded { stack } => {
                log::warn!(
                    "[{}] call {id} `{command}` on worker {} did not stop when cancelled{}",
                    self.config.name,
                    lease.worker,
                    stack.as_ref().map_or(String::new(), |s| format!("; where Python was:\n{s}"))
                );
                (Some(self.give_up(&conn, id, KillReason::Cancel)), Err(Error::Cancelled))
            }
            Exchange::Died => {
                let err = conn.death_error(deadline);
                if let Error::WorkerDied { exit, killed_by, .. } = &err {
                    // Its sessions learn why from the board, before the dispatcher hears of it.
                    let loss = killed_by.map_or(Loss::Died { exit: *exit }, Loss::Killed);
                    self.shared.board.lock().mark_lost(lease.worker, loss);
                }
                (Some(Return::Died), Err(err))
            }
            Exchange::Broken(err) => {
                conn.mark_broken(err.duplicate());
                (Some(Return::Kill(KillReason::Protocol)), Err(err))
            }
            Exchange::Chunk(_) | Exchange::BadChunk(_) => {
                let err = Error::Protocol(format!("a chunk answered call {id}, which is not a stream"));
                conn.mark_broken(err.duplicate());
                (Some(Return::Kill(KillReason::Protocol)), Err(err))
            }
        };
        let ended = Instant::now();
        let (queue_wait, execution) = (started.saturating_duration_since(enqueued), ended - started);
        let mut fx = Effects::default();
        match how {
            Some(how) => self.shared.board.lock().give_back(
                lease,
                how,
                Some((&result, queue_wait, execution)),
                &mut fx,
            ),
            None => {
                self.shared.board.lock().record_call(lease.worker, &result, queue_wait, execution);
                self.follow_up(lease, id, KillReason::CallTimeout);
            }
        }
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

impl Calls {
    /// What becomes of a worker whose command did not stop through every step of a cancel:
    /// a process worker is killed; a thread worker's call keeps its slot until it ends
    /// (parked by the exchange), unless the pool kills on time-outs.
    fn give_up(&self, conn: &Conn, id: u64, reason: KillReason) -> Return {
        conn.step_taken(id, CancelStep::GaveUp);
        if conn.threaded() && !self.config.kills_on_timeout() {
            Return::Abandoned
        } else {
            conn.mark_killed(reason);
            Return::Kill(reason)
        }
    }

    /// Follows up on call `id`, whose caller was answered (its deadline passed, or its stream
    /// was dropped) while its worker still runs it: the command is asked to stop now, then
    /// interrupted, then given up on with `reason`, each `cancel_grace` apart (see
    /// `cancel.rs`). A process worker's lease stays out until its command stops, and is then
    /// given back by a runner; a thread worker's call was parked as abandoned by the exchange,
    /// and its slot is freed by its late reply.
    pub(crate) fn follow_up(&self, lease: Lease<Arc<Conn>>, id: u64, reason: KillReason) {
        let conn = lease.conn.clone();
        let grace = self.config.cancel_grace;
        let now = Instant::now();
        let give_back = |lease, how| {
            let mut fx = Effects::default();
            self.shared.board.lock().release(lease, how, &mut fx);
            self.shared.apply(fx);
        };
        if !conn.can_cancel() {
            // Under a launcher a busy process worker cannot be told to stop.
            conn.mark_killed(reason);
            return give_back(lease, Return::Kill(reason));
        }
        conn.cancel_step(id, 1, now + grace);
        let ladder = Ladder::asked(now, grace);
        let shared = self.shared.clone();
        if conn.threaded() {
            let worker = lease.worker;
            give_back(lease, Return::Abandoned);
            let kills = self.config.kills_on_timeout();
            let task_conn = conn.clone();
            let task_shared = shared.clone();
            let spawned = self
                .followers
                .spawn(move || escalate_parked(&task_shared, &task_conn, worker, id, ladder, kills, reason));
            if !spawned && kills {
                // The pool is stopping: no time to wait for the command.
                conn.mark_killed(reason);
                let mut fx = Effects::default();
                shared.board.lock().kill(worker, reason, &mut fx);
                shared.apply(fx);
            }
            return;
        }
        let held = Arc::new(Mutex::new(Some(lease)));
        let task_held = held.clone();
        let spawned = self.followers.spawn(move || {
            let Some(lease) = task_held.lock().take() else { return };
            let conn = lease.conn.clone();
            let how = match conn.await_end(id, ladder, grace) {
                Exchange::Reply(_) => Return::Done,
                Exchange::Died => Return::Died,
                Exchange::Broken(e) => {
                    conn.mark_broken(e);
                    Return::Kill(KillReason::Protocol)
                }
                _ => {
                    log::warn!("[{}] worker {}: call {id} did not stop when cancelled", shared.name, conn.id);
                    conn.step_taken(id, CancelStep::GaveUp);
                    conn.mark_killed(reason);
                    Return::Kill(reason)
                }
            };
            let mut fx = Effects::default();
            shared.board.lock().release(lease, how, &mut fx);
            shared.apply(fx);
            conn.flush_posted();
        });
        if !spawned {
            // The pool is stopping: no time to wait for the command.
            if let Some(lease) = held.lock().take() {
                conn.mark_killed(reason);
                give_back(lease, Return::Kill(reason));
            }
        }
    }
}

/// Thread profile: takes the remaining steps of cancelling call `id`, parked as abandoned on
/// `worker`, for as long as it still runs; at the end, kills the worker if `kills`.
fn escalate_parked(
    shared: &Shared,
    conn: &Conn,
    worker: WorkerId,
    id: u64,
    mut ladder: Ladder,
    kills: bool,
    reason: KillReason,
) {
    loop {
        let now = Instant::now();
        if now < ladder.next_at {
            std::thread::sleep(ladder.next_at - now);
            continue;
        }
        if !conn.is_abandoned(id) || conn.has_exited() {
            return; // it stopped (its late reply came), or its worker is gone
        }
        match ladder.due(now) {
            Some(Step::Interrupt) => conn.cancel_step(id, 2, ladder.next_at),
            Some(Step::GiveUp) => {
                conn.step_taken(id, CancelStep::GaveUp);
                if kills {
                    log::warn!("[{}] worker {worker}: call {id} did not stop when cancelled", shared.name);
                    conn.mark_killed(reason);
                    let mut fx = Effects::default();
                    shared.board.lock().kill(worker, reason, &mut fx);
                    shared.apply(fx);
                }
                return;
            }
            None => {}
        }
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
