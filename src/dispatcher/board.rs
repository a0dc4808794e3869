//! The call side's shared state: the ready workers and their free capacity, the FIFO queue of
//! callers waiting for one, and the counters that record every call's one outcome.
//!
//! Pure: no threads, no I/O, no clock (times are passed in). It lives under one mutex shared by
//! the callers and the dispatcher and is held only for these decisions, never across I/O. A
//! caller takes a [`Lease`] on a worker here (or waits for one, in order), runs its call on the
//! worker itself, and gives the lease back with what happened; a worker freed while callers
//! wait goes straight to the first of them. What the dispatcher must act on comes back as
//! [`Notice`]s; everything else never wakes it.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::binary::Payload;
use crate::error::{Error, Result, TimeoutKind};
use crate::mailbox::{mailbox, Address, Mailbox};
use crate::protocol::Frame;
use crate::session::Loss;
use crate::stats::Window;
use crate::worker::{KillReason, WorkerId};

/// The right to run one call on one worker. Given back with [`Board::give_back`].
#[derive(Debug)]
pub(crate) struct Lease<T> {
    pub(crate) worker: WorkerId,
    pub(crate) conn: T,
    /// The call's frame was already written to the worker by the thread that handed the lease
    /// over (see [`Handoff`]).
    pub(crate) sent: bool,
}

/// A lease on its way to a waiting caller. The thread that freed the worker delivers it once
/// the board's lock is released, and may first write the waiting call's `frame` itself, so the
/// worker starts on it while the waiting caller is still waking up.
#[derive(Debug)]
pub(crate) struct Handoff<T> {
    pub(crate) lease: Lease<T>,
    pub(crate) to: Address<Lease<T>>,
    pub(crate) frame: Option<Arc<Frame>>,
    /// The waiting call's queue deadline: past it, its frame is not written.
    pub(crate) by: Instant,
}

/// What a board operation leaves to do once its lock is released.
#[derive(Debug)]
pub(crate) struct Effects<T> {
    pub(crate) notices: Vec<Notice>,
    pub(crate) handoffs: Vec<Handoff<T>>,
}

impl<T> Default for Effects<T> {
    fn default() -> Self {
        Effects { notices: Vec::new(), handoffs: Vec::new() }
    }
}

/// What the dispatcher must act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Notice {
    /// The worker reached the early point of its `max_requests` budget: start its replacement.
    Due(WorkerId),
    /// A closed worker has no call left that anyone waits for: stop it (or kill it, if calls
    /// that timed out still hold its slots).
    Drained(WorkerId),
    /// Thread profile: every slot of the worker is held by a call that timed out.
    Wedged(WorkerId),
    /// Kill the worker.
    Kill(WorkerId, KillReason),
    /// The worker could not take a call (it died, or wrote unasked, while idle).
    Unusable(WorkerId),
    /// A call was refused because the queue was full.
    QueueFull,
}

/// How a lease comes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Return {
    /// The call finished (well or not); the worker can take another.
    Done,
    /// Thread profile: the call timed out but its thread still runs; it keeps its slot until
    /// its reply comes ([`Board::late_reply`]).
    Abandoned,
    /// The worker died during the call.
    Died,
    /// The worker must be killed.
    Kill(KillReason),
    /// The call never reached the worker, which has exited (or is exiting).
    Dead,
    /// The call never reached the worker, which wrote unasked while idle: it must be killed.
    Unusable,
}

/// Whether calls are let in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Gate {
    Open,
    /// No worker can start and none is ready: calls fail fast.
    Degraded(String),
    Closed,
}

/// Which workers a call may run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// The least-loaded worker with room.
    Any,
    /// Only this worker: wait for it, in order (a strict session, `call_on`, a broadcast).
    Only(WorkerId),
    /// Only this worker, and only if it has room now (a strict fail-fast session).
    OnlyNow(WorkerId),
    /// This worker if it has room now, else any (a prefer session).
    Prefer(WorkerId),
}

/// What a caller gets when it asks for a worker.
pub(crate) enum Admit<T> {
    /// A worker is free.
    Run(Lease<T>),
    /// Every worker is busy: wait on the receiver for a lease, in order; `u64` names the place
    /// in the queue, for [`Board::withdraw`].
    Wait(Mailbox<Lease<T>>, u64),
    /// The worker the call was routed to takes no calls any more (or never existed): why, if
    /// the pool knows.
    Gone(Option<Loss>),
    /// The worker the call was routed to has no room now ([`Route::OnlyNow`]).
    Busy,
}

/// Outcome counters and latency windows, for `stats()`.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) ok: u64,
    pub(crate) failed: u64,
    pub(crate) timeouts: u64,
    pub(crate) queue_high_water: usize,
    pub(crate) queue_wait: Window,
    pub(crate) execution: Window,
}

/// One worker as the call side sees it.
#[derive(Debug)]
pub(crate) struct Seat<T> {
    pub(crate) id: WorkerId,
    conn: T,
    capacity: usize,
    /// Leases out, abandoned ones included.
    pub(crate) busy: usize,
    /// Thread profile: slots held by calls that timed out and have not returned.
    pub(crate) abandoned: usize,
    /// Thread profile: late replies that came before their calls were given back as
    /// abandoned (the caller gave up, then the reply came, then the caller reached the board).
    early_replies: usize,
    /// Calls given to it so far.
    assigned: u64,
    pub(crate) served: u64,
    pub(crate) errors: u64,
    /// Its `max_requests` after jitter.
    limit: Option<u64>,
    /// Takes new calls.
    open: bool,
    told_due: bool,
    told_wedged: bool,
    /// Calls whose callers saw it die under them (so its death was a call's doing).
    pub(crate) lost: usize,
    /// Strict sessions bound to it.
    pub(crate) sessions: usize,
    /// Retired, but still taking the calls of its strict sessions until they end (or the
    /// dispatcher's `session_drain` runs out).
    session_only: bool,
    /// Why it stopped taking calls, once it has; what its sessions are told.
    loss: Option<Loss>,
    /// Its replacement is starting (or its `max_requests` budget is nearly spent): new
    /// sessions go elsewhere if they can.
    retiring: bool,
}

impl<T> Seat<T> {
    fn has_room(&self) -> bool {
        self.open && self.busy < self.capacity && self.limit.map_or(true, |l| self.assigned < l)
    }

    /// Whether it takes calls routed to it alone (a retired worker: only its strict
    /// sessions').
    fn targetable(&self) -> bool {
        self.open || self.session_only
    }

    /// Room for a call routed to it: within `max_requests` while open; a retired worker
    /// serves its strict sessions past it, for `session_drain` at most.
    fn has_room_for_routed(&self) -> bool {
        self.busy < self.capacity && (self.session_only || self.has_room())
    }

    /// Whether it has been given its last call (`max_requests` is exact).
    #[cfg(test)]
    pub(crate) fn spent(&self) -> bool {
        self.limit.is_some_and(|l| self.assigned >= l)
    }

    /// Calls given to it: finished plus running.
    pub(crate) fn assigned(&self) -> u64 {
        self.assigned
    }
}

struct Waiter<T> {
    place: u64,
    tx: Address<Lease<T>>,
    frame: Option<Arc<Frame>>,
    by: Instant,
    /// The one worker it waits for; `None`: any.
    only: Option<WorkerId>,
}

/// How many workers' losses the board remembers after they are gone, for the sessions that
/// were bound to them and have not called since.
const LOSSES_KEPT: usize = 1024;

/// See the module docs.
pub(crate) struct Board<T> {
    seats: Vec<Seat<T>>,
    waiters: VecDeque<Waiter<T>>,
    /// Waiters that take any worker.
    waiting_for_any: usize,
    /// Why the workers that are gone stopped taking calls, newest last.
    losses: VecDeque<(WorkerId, Loss)>,
    next_place: u64,
    max_queue: usize,
    pub(crate) gate: Gate,
    /// The gate as it was when the queue was last emptied: what the callers it dropped read.
    pub(crate) dropped_for: Gate,
    /// The commands the workers serve, once the first is ready.
    pub(crate) commands: Option<HashSet<String>>,
    pub(crate) counters: Counters,
}

impl<T: Clone> Board<T> {
    pub(crate) fn new(max_queue: usize) -> Self {
        Board {
            seats: Vec::new(),
            waiters: VecDeque::new(),
            waiting_for_any: 0,
            losses: VecDeque::new(),
            next_place: 0,
            max_queue,
            gate: Gate::Open,
            dropped_for: Gate::Closed,
            commands: None,
            counters: Counters::default(),
        }
    }

    /// Lets a call in: a lease on the least-loaded worker with room (of those `route` allows),
    /// else a place in the queue, else (refused, and counted as failed) why not. A waiting
    /// call leaves its `frame` (if it may be written by another thread) and its queue deadline
    /// `by`.
    pub(crate) fn admit(
        &mut self,
        command: &str,
        frame: Option<Arc<Frame>>,
        by: Instant,
        route: Route,
        fx: &mut Effects<T>,
    ) -> Result<Admit<T>> {
        let refused = self.refusal().or_else(|| {
            let commands = self.commands.as_ref()?;
            if commands.contains(command) {
                return None;
            }
            let mut known: Vec<String> = commands.iter().cloned().collect();
            known.sort();
            Some(Error::UnknownCommand { command: command.to_string(), known })
        });
        if let Some(e) = refused {
            self.counters.failed += 1;
            return Err(e);
        }
        // A free worker has no waiter that could take it (each release serves the queue), so
        // a call runs at once wherever its route finds room.
        let only = match route {
            Route::Any => None,
            Route::Prefer(w) => {
                if let Some(lease) = self.pick_this(w, false, &mut fx.notices) {
                    return Ok(Admit::Run(lease));
                }
                None
            }
            Route::Only(w) | Route::OnlyNow(w) => {
                if !self.seat(w).is_some_and(Seat::targetable) {
                    self.counters.failed += 1;
                    return Ok(Admit::Gone(self.loss_of(w)));
                }
                if let Some(lease) = self.pick_this(w, true, &mut fx.notices) {
                    return Ok(Admit::Run(lease));
                }
                if matches!(route, Route::OnlyNow(_)) {
                    self.counters.failed += 1;
                    return Ok(Admit::Busy);
                }
                Some(w)
            }
        };
        if only.is_none() && self.waiting_for_any == 0 {
            if let Some(lease) = self.pick(&mut fx.notices) {
                return Ok(Admit::Run(lease));
            }
        }
        if self.waiters.len() >= self.max_queue {
            self.counters.failed += 1;
            fx.notices.push(Notice::QueueFull);
            return Err(Error::QueueFull { max_queue: self.max_queue });
        }
        let (tx, rx) = mailbox();
        let place = self.next_place;
        self.next_place += 1;
        self.waiters.push_back(Waiter { place, tx, frame, by, only });
        if only.is_none() {
            self.waiting_for_any += 1;
        }
        self.counters.queue_high_water = self.counters.queue_high_water.max(self.waiters.len());
        Ok(Admit::Wait(rx, place))
    }

    /// A lease on the least-loaded worker with room, preferring the one that has served least.
    fn pick(&mut self, notices: &mut Vec<Notice>) -> Option<Lease<T>> {
        let seat = self.seats.iter_mut().filter(|s| s.has_room()).min_by_key(|s| (s.busy, s.served))?;
        Some(Self::lease_on(seat, notices))
    }

    /// A lease on worker `id` if it has room: for any call (`routed` false), or for a call
    /// routed to it alone.
    fn pick_this(&mut self, id: WorkerId, routed: bool, notices: &mut Vec<Notice>) -> Option<Lease<T>> {
        let seat = self.seat_mut(id)?;
        let room = if routed { seat.has_room_for_routed() } else { seat.has_room() };
        room.then(|| Self::lease_on(seat, notices))
    }

    fn lease_on(seat: &mut Seat<T>, notices: &mut Vec<Notice>) -> Lease<T> {
        seat.busy += 1;
        seat.assigned += 1;
        if let Some(limit) = seat.limit {
            // A quarter of the budget early, so the replacement is usually ready in time.
            if !seat.told_due && seat.assigned + limit / 4 >= limit {
                seat.told_due = true;
                notices.push(Notice::Due(seat.id));
            }
        }
        Lease { worker: seat.id, conn: seat.conn.clone(), sent: false }
    }

    /// Hands free capacity to waiting callers, first come first served (delivered by the
    /// caller of the board once its lock is released).
    fn serve_waiters(&mut self, fx: &mut Effects<T>) {
        let mut i = 0;
        while i < self.waiters.len() {
            let lease = match self.waiters[i].only {
                None => self.pick(&mut fx.notices),
                Some(w) => self.pick_this(w, true, &mut fx.notices),
            };
            let Some(lease) = lease else {
                // Waiters for other workers behind this one may still be served.
                i += 1;
                continue;
            };
            let w = self.waiters.remove(i).expect("in range");
            if w.only.is_none() {
                self.waiting_for_any -= 1;
            }
            fx.handoffs.push(Handoff { lease, to: w.tx, frame: w.frame, by: w.by });
        }
    }

    /// A waiting caller's deadline passed: true if it was still waiting (it is removed and
    /// its time-out counted); false if a lease (or the queue's end) reached it first.
    pub(crate) fn withdraw(&mut self, place: u64) -> bool {
        let Some(i) = self.waiters.iter().position(|w| w.place == place) else { return false };
        if self.waiters.remove(i).is_some_and(|w| w.only.is_none()) {
            self.waiting_for_any -= 1;
        }
        self.counters.failed += 1;
        self.counters.timeouts += 1;
        true
    }

    /// A waiting caller's call was cancelled: true if it was still waiting (it is removed, and
    /// counted as failed); false if a lease reached it first.
    pub(crate) fn withdraw_cancelled(&mut self, place: u64) -> bool {
        let Some(i) = self.waiters.iter().position(|w| w.place == place) else { return false };
        if self.waiters.remove(i).is_some_and(|w| w.only.is_none()) {
            self.waiting_for_any -= 1;
        }
        self.counters.failed += 1;
        true
    }

    /// Gives a lease back with how its call went, and records the call's one outcome:
    /// `result` with its queue wait and execution time (`None` for a lease that ran no call).
    pub(crate) fn give_back(
        &mut self,
        lease: Lease<T>,
        how: Return,
        outcome: Option<(&Result<Payload>, Duration, Duration)>,
        fx: &mut Effects<T>,
    ) {
        match outcome {
            Some((result, queue_wait, execution)) => {
                self.record_call(lease.worker, result, queue_wait, execution)
            }
            None => {
                if let Some(seat) = self.seat_mut(lease.worker) {
                    seat.assigned -= 1;
                }
            }
        }
        self.release(lease, how, fx);
    }

    /// Counts the outcome of a call that ran on `worker` (its lease may come back later, with
    /// [`Board::release`]: a call whose caller was answered while its worker still runs it).
    pub(crate) fn record_call(
        &mut self,
        worker: WorkerId,
        result: &Result<Payload>,
        queue_wait: Duration,
        execution: Duration,
    ) {
        self.record(result);
        self.counters.queue_wait.record(queue_wait);
        self.counters.execution.record(execution);
        if let Some(seat) = self.seat_mut(worker) {
            seat.served += 1;
            if result.is_err() {
                seat.errors += 1;
            }
        }
    }

    /// Takes back the lease of a call already counted ([`Board::record_call`]).
    pub(crate) fn release(&mut self, lease: Lease<T>, how: Return, fx: &mut Effects<T>) {
        let Some(seat) = self.seat_mut(lease.worker) else { return };
        match how {
            Return::Done => seat.busy -= 1,
            // Its reply already came: the slot is free.
            Return::Abandoned if seat.early_replies > 0 => {
                seat.early_replies -= 1;
                seat.busy -= 1;
            }
            Return::Abandoned => {
                seat.abandoned += 1;
                if seat.abandoned >= seat.capacity && seat.open && !seat.told_wedged {
                    seat.told_wedged = true;
                    fx.notices.push(Notice::Wedged(seat.id));
                }
            }
            Return::Died => {
                seat.busy -= 1;
                seat.open = false;
                seat.lost += 1;
            }
            Return::Kill(reason) => {
                seat.busy -= 1;
                seat.open = false;
                seat.loss.get_or_insert(Loss::Killed(reason));
                fx.notices.push(Notice::Kill(seat.id, reason));
            }
            Return::Dead => {
                seat.busy -= 1;
                seat.open = false;
            }
            Return::Unusable => {
                seat.busy -= 1;
                seat.open = false;
                fx.notices.push(Notice::Unusable(seat.id));
            }
        }
        self.after_release(lease.worker, fx);
    }

    /// The worker must be killed, though no lease on it comes back (a call abandoned by its
    /// caller did not stop when cancelled).
    pub(crate) fn kill(&mut self, worker: WorkerId, reason: KillReason, fx: &mut Effects<T>) {
        let Some(seat) = self.seat_mut(worker) else { return };
        if seat.open {
            seat.open = false;
            seat.loss.get_or_insert(Loss::Killed(reason));
            fx.notices.push(Notice::Kill(worker, reason));
        }
    }

    /// Counts a call's outcome (one that never got a lease is counted where it was refused).
    pub(crate) fn record(&mut self, result: &Result<Payload>) {
        match result {
            Ok(_) => self.counters.ok += 1,
            Err(e) => self.record_failure(e),
        }
    }

    /// Counts a call that failed with `e`.
    pub(crate) fn record_failure(&mut self, e: &Error) {
        self.counters.failed += 1;
        if matches!(e, Error::Timeout { .. }) {
            self.counters.timeouts += 1;
        }
    }

    /// Counts a queue time-out of a caller that a lease reached just too late.
    pub(crate) fn record_queue_timeout(&mut self) {
        self.record_failure(&Error::timeout(TimeoutKind::Queue));
    }

    /// Thread profile: the reply of a call whose caller gave up has come, so its slot is free.
    pub(crate) fn late_reply(&mut self, worker: WorkerId, fx: &mut Effects<T>) {
        let Some(seat) = self.seat_mut(worker) else { return };
        if seat.abandoned == 0 {
            // Its caller has not given the lease back yet; it will find the slot free.
            seat.early_replies += 1;
            return;
        }
        seat.abandoned -= 1;
        seat.busy -= 1;
        self.after_release(worker, fx);
    }

    fn after_release(&mut self, worker: WorkerId, fx: &mut Effects<T>) {
        let Some(seat) = self.seat_mut(worker) else { return };
        if !seat.targetable() && seat.busy == seat.abandoned {
            fx.notices.push(Notice::Drained(worker));
        } else if seat.targetable() {
            self.serve_waiters(fx);
        }
    }

    // ---- sessions -----------------------------------------------------------------------------

    /// The worker a new session goes to: an open one that is not about to be replaced if there
    /// is one, with the fewest strict sessions, then the least loaded. `strict`: it counts the session until [`Board::unbind`].
    pub(crate) fn bind(&mut self, strict: bool) -> Option<WorkerId> {
        let seat = self
            .seats
            .iter_mut()
            .filter(|s| s.open)
            .min_by_key(|s| (s.retiring || s.told_due, s.sessions, s.busy, s.served))?;
        if strict {
            seat.sessions += 1;
        }
        Some(seat.id)
    }

    /// Binds a strict session to worker `id` (a session moving there).
    pub(crate) fn bind_to(&mut self, id: WorkerId) {
        if let Some(seat) = self.seat_mut(id) {
            seat.sessions += 1;
        }
    }

    /// A strict session bound to worker `id` ended. A retired worker whose last session this
    /// was stops taking calls, and is drained.
    pub(crate) fn unbind(&mut self, id: WorkerId, fx: &mut Effects<T>) {
        let Some(seat) = self.seat_mut(id) else { return };
        seat.sessions = seat.sessions.saturating_sub(1);
        if seat.session_only && seat.sessions == 0 {
            seat.session_only = false;
            self.drop_waiters_for(id);
            self.after_release(id, fx);
        }
    }

    /// Worker `id` is about to be replaced: new sessions go elsewhere if they can.
    pub(crate) fn mark_retiring(&mut self, id: WorkerId) {
        if let Some(seat) = self.seat_mut(id) {
            seat.retiring = true;
        }
    }

    /// Whether worker `id` still suits a session that has not run a call yet.
    pub(crate) fn suits_new_session(&self, id: WorkerId) -> bool {
        self.seat(id).is_some_and(|s| s.open && !s.retiring && !s.told_due)
    }

    /// Whether worker `id` takes calls routed to it.
    pub(crate) fn takes_routed(&self, id: WorkerId) -> bool {
        self.seat(id).is_some_and(Seat::targetable)
    }

    /// Whether worker `id` takes calls that any worker could run (it is not retired or lost).
    pub(crate) fn takes_any(&self, id: WorkerId) -> bool {
        self.seat(id).is_some_and(|s| s.open)
    }

    /// Records why worker `id` stops taking calls (the first reason stands).
    pub(crate) fn mark_lost(&mut self, id: WorkerId, loss: Loss) {
        if let Some(seat) = self.seat_mut(id) {
            seat.loss.get_or_insert(loss);
        }
    }

    /// Why worker `id` stopped taking calls, if it has and the board still knows.
    pub(crate) fn loss_of(&self, id: WorkerId) -> Option<Loss> {
        match self.seat(id) {
            Some(seat) => seat.loss,
            None => self.losses.iter().rev().find(|(w, _)| *w == id).map(|(_, l)| *l),
        }
    }

    /// The connection to worker `id`, while it is on the board.
    pub(crate) fn conn_of(&self, id: WorkerId) -> Option<T> {
        self.seat(id).map(|s| s.conn.clone())
    }

    /// Fails the callers waiting for worker `id` alone: each sees its mailbox closed.
    fn drop_waiters_for(&mut self, id: WorkerId) {
        self.waiters.retain(|w| w.only != Some(id));
    }

    // ---- the dispatcher's side ----------------------------------------------------------------

    /// A worker is ready: it takes calls from now on, the queue's first.
    pub(crate) fn add(
        &mut self,
        id: WorkerId,
        conn: T,
        capacity: usize,
        limit: Option<u64>,
        fx: &mut Effects<T>,
    ) {
        self.seats.push(Seat {
            id,
            conn,
            capacity,
            busy: 0,
            abandoned: 0,
            early_replies: 0,
            assigned: 0,
            served: 0,
            errors: 0,
            limit,
            open: true,
            told_due: false,
            told_wedged: false,
            lost: 0,
            sessions: 0,
            session_only: false,
            loss: None,
            retiring: false,
        });
        self.serve_waiters(fx);
    }

    /// A replaced worker takes no new calls. If strict sessions are bound to it, it still takes
    /// theirs (true: the dispatcher closes it after `session_drain`); else it is drained.
    pub(crate) fn retire(&mut self, id: WorkerId, loss: Loss, fx: &mut Effects<T>) -> bool {
        let Some(s) = self.seat_mut(id) else { return false };
        s.open = false;
        s.loss.get_or_insert(loss);
        s.session_only = s.sessions > 0;
        if s.session_only {
            // Its sessions' calls that waited for it past `max_requests` run now.
            self.serve_waiters(fx);
            return true;
        }
        false
    }

    /// The worker takes no new calls. Returns (calls running, of which abandoned).
    pub(crate) fn close(&mut self, id: WorkerId) -> (usize, usize) {
        let closed = match self.seat_mut(id) {
            Some(s) => {
                s.open = false;
                s.session_only = false;
                (s.busy, s.abandoned)
            }
            None => (0, 0),
        };
        self.drop_waiters_for(id);
        closed
    }

    /// Forgets a worker that exited; its seat as it was then. `loss`: why, unless the board
    /// already knows.
    pub(crate) fn remove(&mut self, id: WorkerId, loss: Loss) -> Option<Seat<T>> {
        let i = self.seats.iter().position(|s| s.id == id)?;
        let seat = self.seats.remove(i);
        self.drop_waiters_for(id);
        if self.losses.len() == LOSSES_KEPT {
            self.losses.pop_front();
        }
        self.losses.push_back((id, seat.loss.unwrap_or(loss)));
        Some(seat)
    }

    /// Whether every slot of the worker is still held by a call that timed out; if not, a
    /// later wedge is told again.
    pub(crate) fn still_wedged(&mut self, id: WorkerId) -> bool {
        let Some(s) = self.seat_mut(id) else { return false };
        let wedged = s.open && s.abandoned >= s.capacity;
        s.told_wedged = wedged;
        wedged
    }

    /// Takes a process worker that is idle (for a health check), unless callers wait for it.
    pub(crate) fn take_idle(&mut self, id: WorkerId) -> Option<Lease<T>> {
        if self.waiting_for_any > 0 || self.waiters.iter().any(|w| w.only == Some(id)) {
            return None;
        }
        let s = self.seat_mut(id).filter(|s| s.open && s.busy == 0)?;
        s.busy += 1;
        s.assigned += 1; // undone when it comes back with no call run
        Some(Lease { worker: id, conn: s.conn.clone(), sent: false })
    }

    /// Fails every waiting caller: each sees its mailbox closed and reads why in
    /// `dropped_for` (the gate now, which may have opened again by the time it looks).
    pub(crate) fn drop_waiters(&mut self) {
        self.dropped_for = self.gate.clone();
        self.waiters.clear();
        self.waiting_for_any = 0;
    }

    /// Why calls are refused now, if they are.
    pub(crate) fn refusal(&self) -> Option<Error> {
        match &self.gate {
            Gate::Open => None,
            Gate::Closed => Some(Error::ShuttingDown),
            Gate::Degraded(last_error) => Some(Error::Degraded { last_error: last_error.clone() }),
        }
    }

    pub(crate) fn gate_open(&self) -> bool {
        self.gate == Gate::Open
    }

    /// The workers that take calls now, by id.
    pub(crate) fn open_workers(&self) -> Vec<WorkerId> {
        let mut ids: Vec<WorkerId> = self.seats.iter().filter(|s| s.open).map(|s| s.id).collect();
        ids.sort_unstable();
        ids
    }

    /// Callers waiting now.
    pub(crate) fn queued(&self) -> usize {
        self.waiters.len()
    }

    pub(crate) fn seat(&self, id: WorkerId) -> Option<&Seat<T>> {
        self.seats.iter().find(|s| s.id == id)
    }

    fn seat_mut(&mut self, id: WorkerId) -> Option<&mut Seat<T>> {
        self.seats.iter_mut().find(|s| s.id == id)
    }

    /// The connections of the open workers, for health checks.
    pub(crate) fn open_conns(&self) -> Vec<(WorkerId, T, bool)> {
        self.seats.iter().filter(|s| s.open).map(|s| (s.id, s.conn.clone(), s.busy == 0)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Fx = Effects<&'static str>;

    fn board(seats: &[(WorkerId, usize, Option<u64>)]) -> Board<&'static str> {
        let mut b = Board::new(2);
        b.commands = Some(["echo".to_string()].into_iter().collect());
        for &(id, cap, limit) in seats {
            b.add(id, "conn", cap, limit, &mut Fx::default());
        }
        b
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    fn admit(b: &mut Board<&'static str>, fx: &mut Fx) -> Result<Admit<&'static str>> {
        b.admit("echo", None, far(), Route::Any, fx)
    }

    fn run(b: &mut Board<&'static str>) -> Lease<&'static str> {
        match admit(b, &mut Fx::default()) {
            Ok(Admit::Run(l)) => l,
            Ok(_) => panic!("not run"),
            Err(e) => panic!("{e}"),
        }
    }

    fn routed(b: &mut Board<&'static str>, route: Route) -> Admit<&'static str> {
        b.admit("echo", None, far(), route, &mut Fx::default()).expect("admitted")
    }

    fn give(b: &mut Board<&'static str>, lease: Lease<&'static str>) {
        let mut fx = Fx::default();
        b.give_back(lease, Return::Done, Some((&ok(), Q, Q)), &mut fx);
        deliver(fx);
    }

    #[test]
    fn a_routed_call_waits_for_its_worker_while_others_run_elsewhere() {
        let mut b = board(&[(1, 1, None), (2, 1, None)]);
        let on1 = match routed(&mut b, Route::Only(1)) {
            Admit::Run(l) => l,
            _ => panic!("worker 1 is free"),
        };
        assert_eq!(on1.worker, 1);
        // Worker 1 is busy: the next call for it waits, and fail-fast is refused at once.
        let Admit::Wait(for1, _) = routed(&mut b, Route::Only(1)) else { panic!("queued") };
        assert!(matches!(routed(&mut b, Route::OnlyNow(1)), Admit::Busy));
        // A call for any worker is not held up by it: worker 2 is free.
        let any = run(&mut b);
        assert_eq!(any.worker, 2);
        // A prefer call for the busy worker 1 queues for any (none free now).
        let Admit::Wait(pref, _) = routed(&mut b, Route::Prefer(1)) else { panic!("queued") };
        // Worker 2 frees: only the waiter that takes any worker can have it.
        give(&mut b, any);
        assert!(for1.try_recv().is_err());
        assert_eq!(pref.try_recv().expect("the prefer call ran on worker 2").worker, 2);
        // Worker 1 frees: its own waiter gets it.
        give(&mut b, on1);
        assert_eq!(for1.try_recv().expect("its worker").worker, 1);
        assert_eq!(b.counters.failed, 1, "the fail-fast refusal counts as failed");
    }

    #[test]
    fn a_routed_call_for_a_gone_worker_learns_why_and_its_waiters_are_dropped() {
        let mut b = board(&[(1, 1, None), (2, 1, None)]);
        let on1 = run(&mut b);
        let Admit::Wait(waiting, _) = routed(&mut b, Route::Only(on1.worker)) else { panic!("queued") };
        let w = on1.worker;
        b.mark_lost(w, Loss::Killed(KillReason::MemoryLimit));
        b.close(w);
        assert!(waiting.try_recv().is_err() && !b.takes_routed(w), "dropped, not served");
        match routed(&mut b, Route::Only(w)) {
            Admit::Gone(Some(Loss::Killed(KillReason::MemoryLimit))) => {}
            _ => panic!("gone, with the first reason"),
        }
        b.give_back(on1, Return::Died, Some((&ok(), Q, Q)), &mut Fx::default());
        b.remove(w, Loss::Died { exit: crate::ExitKind::Signal(9) });
        assert_eq!(b.loss_of(w), Some(Loss::Killed(KillReason::MemoryLimit)), "remembered after removal");
        assert!(matches!(routed(&mut b, Route::Only(99)), Admit::Gone(None)), "never existed");
    }

    #[test]
    fn a_retired_worker_serves_its_strict_sessions_until_the_last_ends() {
        let mut b = board(&[(1, 1, Some(2)), (2, 1, None)]);
        assert_eq!(b.bind(true), Some(1), "the fewest sessions, then the least loaded");
        assert_eq!(b.bind(false), Some(2), "a prefer session is not counted, but spreads by load");
        assert_eq!(b.bind(true), Some(2));
        // Open, it keeps max_requests (2) exactly, routed calls included: the third waits.
        for _ in 0..2 {
            let Admit::Run(l) = routed(&mut b, Route::Only(1)) else { panic!("within the budget") };
            give(&mut b, l);
        }
        let Admit::Wait(third, _) = routed(&mut b, Route::Only(1)) else { panic!("past the budget: waits") };
        let mut fx = Fx::default();
        assert!(
            b.retire(1, Loss::Recycled(crate::RecycleReason::MaxRequests), &mut fx),
            "a session holds it"
        );
        assert_eq!(fx.handoffs.len(), 1, "retired, it serves its session's waiting call");
        deliver(fx);
        give(&mut b, third.try_recv().expect("handed over"));
        // New calls for any worker go elsewhere; its session's calls still run there, past
        // max_requests (2) too.
        for _ in 0..3 {
            let l = match routed(&mut b, Route::Only(1)) {
                Admit::Run(l) => l,
                _ => panic!("its session's call runs"),
            };
            give(&mut b, l);
        }
        assert_eq!(run(&mut b).worker, 2);
        let mut fx = Fx::default();
        b.unbind(1, &mut fx);
        assert_eq!(fx.notices, [Notice::Drained(1)], "the last session ended: drain it");
        assert!(matches!(routed(&mut b, Route::Only(1)), Admit::Gone(Some(Loss::Recycled(_)))));
    }

    fn wait(b: &mut Board<&'static str>) -> (Mailbox<Lease<&'static str>>, u64) {
        match admit(b, &mut Fx::default()) {
            Ok(Admit::Wait(rx, place)) => (rx, place),
            _ => panic!("not queued"),
        }
    }

    /// Does what the thread that released the lock does: hands the leases over.
    fn deliver(fx: Fx) -> Vec<Notice> {
        for h in fx.handoffs {
            let _ = h.to.send(h.lease);
        }
        fx.notices
    }

    fn ok() -> Result<Payload> {
        Ok(Payload::default())
    }

    const Q: Duration = Duration::from_micros(1);

    #[test]
    fn calls_go_to_the_least_loaded_worker_then_queue_in_order_up_to_max_queue() {
        let mut b = board(&[(1, 2, None), (2, 1, None)]);
        let a = run(&mut b);
        let c = run(&mut b);
        assert_ne!(a.worker, c.worker, "spread over the workers");
        let d = run(&mut b);
        assert_eq!(d.worker, 1, "worker 1 has a second slot");
        let (first, _) = wait(&mut b);
        let (second, _) = wait(&mut b);
        let mut fx = Fx::default();
        assert!(matches!(admit(&mut b, &mut fx), Err(Error::QueueFull { max_queue: 2 })));
        assert_eq!(fx.notices, [Notice::QueueFull]);
        // A freed slot goes to the first waiter, then the next one to the second.
        let mut fx = Fx::default();
        b.give_back(c, Return::Done, Some((&ok(), Q, Q)), &mut fx);
        deliver(fx);
        assert!(first.try_recv().is_ok() && second.try_recv().is_err());
        let mut fx = Fx::default();
        b.give_back(a, Return::Done, Some((&ok(), Q, Q)), &mut fx);
        deliver(fx);
        assert!(second.try_recv().is_ok());
        assert_eq!((b.counters.ok, b.counters.failed, b.counters.queue_high_water), (2, 1, 2));
    }

    #[test]
    fn a_handoff_carries_the_waiting_calls_frame_and_deadline() {
        let mut b = board(&[(1, 1, None)]);
        let a = run(&mut b);
        let frame = Arc::new(Frame::from(vec![1, 2, 3]));
        let by = far();
        let Ok(Admit::Wait(_rx, _)) =
            b.admit("echo", Some(frame.clone()), by, Route::Any, &mut Fx::default())
        else {
            panic!()
        };
        let mut fx = Fx::default();
        b.give_back(a, Return::Done, Some((&ok(), Q, Q)), &mut fx);
        let h = fx.handoffs.pop().expect("one handoff");
        assert_eq!((h.frame, h.by, h.lease.worker, h.lease.sent), (Some(frame), by, 1, false));
        assert_eq!(b.seat(1).unwrap().busy, 1, "the worker is the waiter's now");
    }

    #[test]
    fn a_waiter_that_gave_up_in_time_is_removed_and_its_time_out_counted_once() {
        let mut b = board(&[(1, 1, None)]);
        let a = run(&mut b);
        let (_gone, place) = wait(&mut b);
        let (next, _) = wait(&mut b);
        assert!(b.withdraw(place));
        assert!(!b.withdraw(place), "withdrawn once");
        let mut fx = Fx::default();
        b.give_back(a, Return::Done, Some((&ok(), Q, Q)), &mut fx);
        deliver(fx);
        let lease = next.try_recv().expect("the next waiter got the worker");
        assert_eq!(b.seat(1).unwrap().busy, 1);
        assert_eq!((b.counters.timeouts, b.counters.failed), (1, 1));
        // A lease that reached a caller after its deadline comes back unused.
        b.give_back(lease, Return::Done, None, &mut Fx::default());
        assert_eq!((b.seat(1).unwrap().busy, b.seat(1).unwrap().assigned()), (0, 1));
    }

    #[test]
    fn a_waiter_too_late_to_withdraw_still_gets_its_lease() {
        let mut b = board(&[(1, 1, None)]);
        let a = run(&mut b);
        let (rx, place) = wait(&mut b);
        let mut fx = Fx::default();
        b.give_back(a, Return::Done, Some((&ok(), Q, Q)), &mut fx);
        // The waiter's deadline passes now, after the handoff was decided but before delivery.
        assert!(!b.withdraw(place), "already handed the worker");
        deliver(fx);
        assert!(rx.try_recv().is_ok(), "the lease is not lost");
    }

    #[test]
    fn max_requests_is_exact_and_due_is_told_a_quarter_early_once() {
        let mut b = board(&[(1, 1, Some(8))]);
        let mut notices = Vec::new();
        for i in 1..=8 {
            let mut fx = Fx::default();
            let Ok(Admit::Run(l)) = admit(&mut b, &mut fx) else { panic!("call {i}") };
            b.give_back(l, Return::Done, Some((&ok(), Q, Q)), &mut fx);
            notices.extend(deliver(fx));
            let due = notices.contains(&Notice::Due(1));
            assert_eq!(due, i >= 6, "call {i}");
        }
        assert_eq!(notices.iter().filter(|n| **n == Notice::Due(1)).count(), 1);
        assert!(b.seat(1).unwrap().spent());
        assert!(matches!(admit(&mut b, &mut Fx::default()), Ok(Admit::Wait(..))), "never a ninth call");
    }

    #[test]
    fn refusals_name_their_reason_and_count_as_failed() {
        let mut b = board(&[(1, 1, None)]);
        let err = b.admit("nope", None, far(), Route::Any, &mut Fx::default()).err().unwrap();
        assert!(matches!(&err, Error::UnknownCommand { known, .. } if known == &["echo"]), "{err}");
        b.gate = Gate::Degraded("boom".into());
        assert!(matches!(admit(&mut b, &mut Fx::default()), Err(Error::Degraded { .. })));
        b.gate = Gate::Closed;
        assert!(matches!(admit(&mut b, &mut Fx::default()), Err(Error::ShuttingDown)));
        assert_eq!(b.counters.failed, 3);
    }

    #[test]
    fn abandoned_calls_hold_their_slots_until_their_late_replies_and_a_full_worker_is_wedged() {
        let mut b = board(&[(1, 2, None)]);
        let (x, y) = (run(&mut b), run(&mut b));
        let timeout = Err(Error::timeout(TimeoutKind::Call));
        let mut fx = Fx::default();
        b.give_back(x, Return::Abandoned, Some((&timeout, Q, Q)), &mut fx);
        assert!(fx.notices.is_empty());
        assert!(matches!(admit(&mut b, &mut fx), Ok(Admit::Wait(..))), "its slot is still taken");
        b.drop_waiters();
        let mut fx = Fx::default();
        b.give_back(y, Return::Abandoned, Some((&timeout, Q, Q)), &mut fx);
        assert_eq!(fx.notices, [Notice::Wedged(1)]);
        b.late_reply(1, &mut Fx::default());
        assert_eq!((b.seat(1).unwrap().busy, b.seat(1).unwrap().abandoned), (1, 1));
        // Closed with only abandoned calls left: drained when the last reply frees a slot.
        assert_eq!(b.close(1), (1, 1));
        let mut fx = Fx::default();
        b.late_reply(1, &mut fx);
        assert_eq!(fx.notices, [Notice::Drained(1)]);
        assert_eq!(b.counters.timeouts, 2);
    }

    #[test]
    fn a_late_reply_that_comes_before_its_call_is_given_back_frees_the_slot_once() {
        let mut b = board(&[(1, 1, None)]);
        let x = run(&mut b);
        // The caller gave up; the reply came before the caller reached the board.
        b.late_reply(1, &mut Fx::default());
        let timeout = Err(Error::timeout(TimeoutKind::Call));
        b.give_back(x, Return::Abandoned, Some((&timeout, Q, Q)), &mut Fx::default());
        let seat = b.seat(1).unwrap();
        assert_eq!((seat.busy, seat.abandoned), (0, 0), "no slot leaked");
        let y = run(&mut b);
        b.give_back(y, Return::Abandoned, Some((&timeout, Q, Q)), &mut Fx::default());
        assert_eq!(b.seat(1).unwrap().abandoned, 1, "the next abandoned call holds its slot");
    }

    #[test]
    fn a_call_counted_before_its_lease_comes_back_holds_the_worker_until_then() {
        // A timed-out call whose command is still being asked to stop: its caller is answered
        // (and counted) at once, its worker is free only once the command has let go.
        let mut b = board(&[(1, 1, None)]);
        let x = run(&mut b);
        let timeout = Err(Error::timeout(TimeoutKind::Call));
        b.record_call(1, &timeout, Q, Q);
        assert_eq!((b.counters.timeouts, b.seat(1).unwrap().served), (1, 1), "counted once");
        assert!(matches!(admit(&mut b, &mut Fx::default()), Ok(Admit::Wait(..))), "still busy");
        let mut fx = Fx::default();
        b.release(x, Return::Done, &mut fx);
        assert_eq!(fx.handoffs.len(), 1, "the waiting call gets the worker it let go of");
        let seat = b.seat(1).unwrap();
        assert_eq!((seat.served, seat.assigned(), seat.errors), (1, 2, 1), "nothing counted twice");
    }

    #[test]
    fn killing_a_worker_without_a_lease_closes_it_and_tells_the_dispatcher_once() {
        let mut b = board(&[(1, 2, None)]);
        let _parked = run(&mut b);
        let mut fx = Fx::default();
        b.kill(1, KillReason::Cancel, &mut fx);
        b.kill(1, KillReason::Cancel, &mut fx);
        assert_eq!(fx.notices, [Notice::Kill(1, KillReason::Cancel)]);
        assert_eq!(b.loss_of(1), Some(Loss::Killed(KillReason::Cancel)));
        assert!(!b.seat(1).unwrap().open);
        b.kill(9, KillReason::Cancel, &mut fx); // a worker already gone: nothing
        assert_eq!(fx.notices.len(), 1);
    }

    #[test]
    fn a_closed_worker_is_drained_when_its_last_call_returns() {
        let mut b = board(&[(1, 1, None), (2, 1, None)]);
        let a = run(&mut b);
        let worker = a.worker;
        assert_eq!(b.close(worker), (1, 0));
        let mut fx = Fx::default();
        b.give_back(a, Return::Done, Some((&ok(), Q, Q)), &mut fx);
        assert_eq!(fx.notices, [Notice::Drained(worker)]);
        assert_ne!(run(&mut b).worker, worker, "a closed worker gets no call");
    }

    #[test]
    fn a_worker_that_died_in_a_call_is_marked_so_and_gets_no_more_calls() {
        let mut b = board(&[(1, 1, None)]);
        let a = run(&mut b);
        let died = Err(Error::Protocol("x".into()));
        b.give_back(a, Return::Died, Some((&died, Q, Q)), &mut Fx::default());
        assert_eq!(b.seat(1).unwrap().lost, 1);
        assert!(matches!(admit(&mut b, &mut Fx::default()), Ok(Admit::Wait(..))));
        let seat = b.remove(1, Loss::Unknown).unwrap();
        assert_eq!((seat.served, seat.errors, seat.busy), (1, 1, 0));
    }

    #[test]
    fn a_kill_or_an_unusable_worker_is_told_to_the_dispatcher_and_closes_the_worker() {
        let mut b = board(&[(1, 1, None), (2, 1, None)]);
        let (x, y) = (run(&mut b), run(&mut b));
        let mut fx = Fx::default();
        let timeout = Err(Error::timeout(TimeoutKind::Call));
        b.give_back(x, Return::Kill(KillReason::CallTimeout), Some((&timeout, Q, Q)), &mut fx);
        b.give_back(y, Return::Unusable, None, &mut fx);
        assert!(fx.notices.contains(&Notice::Kill(1, KillReason::CallTimeout)));
        assert!(fx.notices.contains(&Notice::Unusable(2)));
        let mut b2 = board(&[(3, 1, None)]);
        let z = run(&mut b2);
        let mut fx2 = Fx::default();
        b2.give_back(z, Return::Dead, None, &mut fx2);
        let told = fx2.notices.iter().any(|n| matches!(n, Notice::Kill(..) | Notice::Unusable(_)));
        assert!(!told, "a dead worker's exit is reported by its monitor, not by the call side");
        assert!(matches!(admit(&mut b2, &mut Fx::default()), Ok(Admit::Wait(..))));
        assert!(matches!(admit(&mut b, &mut Fx::default()), Ok(Admit::Wait(..))), "both closed");
        assert_eq!(b.seat(2).unwrap().assigned(), 0, "the unusable worker ran no call");
    }

    #[test]
    fn an_idle_worker_can_be_taken_for_a_health_check_only_when_nobody_waits() {
        let mut b = board(&[(1, 1, None)]);
        let lease = b.take_idle(1).expect("idle");
        assert!(b.take_idle(1).is_none(), "busy now");
        let (rx, _) = wait(&mut b);
        let mut fx = Fx::default();
        b.give_back(lease, Return::Done, None, &mut fx);
        deliver(fx);
        let _call = rx.try_recv().expect("the waiting call got it");
        assert_eq!(b.seat(1).unwrap().assigned(), 1, "the health check is not a call");
        let (_rx, _) = wait(&mut b);
        assert!(b.take_idle(1).is_none(), "a caller waits");
    }
}
