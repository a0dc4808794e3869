//! Sessions: calls with affinity to one worker, where their Python state lives.
//!
//! A [`Session`] is bound to a worker when it is created (the open worker with the fewest
//! strict sessions). Its calls carry its id, so a command declared
//! `@snakepit.command(session=True)` gets that session's store in the worker. How a call finds
//! its worker depends on the [`Affinity`]; what happens when the worker is lost is never
//! silent: a strict session fails with [`Error::SessionLost`] from then on, a prefer session
//! moves (and the command sees fresh state). Ending a session (dropping it, [`Session::close`],
//! or its idle time-out, enforced by the dispatcher) tells every worker that ran its calls to
//! free its state.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::binary::Payload;
use crate::call::Calls;
use crate::dispatcher::{Effects, Request, Shared};
use crate::error::{ExitKind, KilledBy, Result};
use crate::events::Event;
use crate::policy::RecycleReason;
use crate::pool::CallOptions;
use crate::protocol;
use crate::worker::WorkerId;

/// How long a prefer session that moved waits to learn why its worker was lost.
const MOVE_LOOK: Duration = Duration::from_millis(50);

/// The shortest time between two scans for idle sessions.
const TICK: Duration = Duration::from_millis(20);

/// How a session's calls find its worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Affinity {
    /// Always the session's worker: a call waits in the queue for it. If the worker is lost,
    /// every later call fails with [`Error::SessionLost`](crate::Error::SessionLost).
    #[default]
    Strict,
    /// The session's worker, or [`Error::SessionBusy`](crate::Error::SessionBusy) at once if
    /// it has no room now. Lost like [`Affinity::Strict`].
    StrictFailFast,
    /// The session's worker when it has room, else any worker (whose store for the session is
    /// fresh: the command sees `session.fresh`). If the worker is lost, the session moves to
    /// the worker its next call runs on.
    Prefer,
}

impl Affinity {
    fn strict(self) -> bool {
        self != Affinity::Prefer
    }
}

/// Why a session's worker stopped serving it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Loss {
    /// The worker exited on its own: a crash, `os._exit`, a kill from outside the pool.
    Died {
        /// How it ended.
        exit: ExitKind,
    },
    /// The pool killed it.
    Killed(KilledBy),
    /// The pool replaced it, and its strict sessions did not end within `session_drain`.
    Recycled(RecycleReason),
    /// The pool no longer knows (the worker went long ago).
    Unknown,
}

impl std::fmt::Display for Loss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Loss::Died { exit } => write!(f, "its worker died ({exit})"),
            Loss::Killed(why) => write!(f, "the pool killed its worker: {why}"),
            Loss::Recycled(why) => {
                write!(f, "its worker was recycled ({why}) and the session drain time ran out")
            }
            Loss::Unknown => f.write_str("its worker is gone"),
        }
    }
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum SessionEnd {
    /// Closed by its owner ([`Session::close`] or dropped).
    Closed,
    /// It was idle for longer than its idle time-out.
    Expired,
}

impl std::fmt::Display for SessionEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SessionEnd::Closed => "closed",
            SessionEnd::Expired => "expired (idle time-out)",
        })
    }
}

/// Options for [`Pool::session_with`](crate::Pool::session_with).
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct SessionOptions {
    /// How its calls find its worker.
    pub affinity: Affinity,
    /// Ends the session after this long without a call; defaults to the pool's `session_ttl`.
    pub idle_ttl: Option<Duration>,
    /// A JSON value sent with each of its calls (`session.context` in Python): state that must
    /// survive the loss of a worker lives here, on the host.
    pub context: Option<Value>,
}

impl SessionOptions {
    /// Options with every default (a strict session, the pool's idle time-out, no context).
    pub fn new() -> Self {
        Self::default()
    }
    /// Sets how its calls find its worker.
    pub fn affinity(mut self, affinity: Affinity) -> Self {
        self.affinity = affinity;
        self
    }
    /// Ends the session after `ttl` without a call.
    pub fn idle_ttl(mut self, ttl: Duration) -> Self {
        self.idle_ttl = Some(ttl);
        self
    }
    /// A JSON value sent with each of its calls.
    pub fn context(mut self, context: Value) -> Self {
        self.context = Some(context);
        self
    }
}

/// A snapshot of one session.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct SessionInfo {
    /// Its id, unique within the pool.
    pub id: u64,
    /// How its calls find its worker.
    pub affinity: Affinity,
    /// The worker it is bound to (`None` until one was ready to take it).
    pub worker: Option<u64>,
    /// When it was created.
    pub started: SystemTime,
    /// Time since its last call began or ended (0 while a call runs).
    pub idle: Duration,
    /// Calls made through it.
    pub calls: u64,
    /// Why its worker was lost, for a strict session that lost it.
    pub lost: Option<Loss>,
}

/// What a session's calls change; under one lock, taken twice per call.
#[derive(Debug)]
struct State {
    worker: Option<WorkerId>,
    /// Counted in the worker's strict sessions on the board (until unbound).
    bound: bool,
    lost: Option<Loss>,
    ended: Option<SessionEnd>,
    /// Every worker that ran one of its calls: each is told when it ends.
    touched: Vec<WorkerId>,
    last_active: Instant,
    in_flight: usize,
    calls: u64,
}

/// A session as the pool keeps it; shared by its handle and the pool's table.
#[derive(Debug)]
pub(crate) struct SessionCore {
    pub(crate) id: u64,
    /// The id as the worker sees it.
    tag: String,
    affinity: Affinity,
    idle_ttl: Option<Duration>,
    started: SystemTime,
    state: Mutex<State>,
    context: Mutex<Option<Value>>,
}

/// What a call carries for its session.
pub(crate) struct CallSession<'a> {
    pub(crate) core: &'a SessionCore,
    pub(crate) context: Option<Value>,
}

impl CallSession<'_> {
    pub(crate) fn tag(&self) -> &str {
        &self.core.tag
    }
}

/// The pool's sessions: live ones by id, and counts.
#[derive(Debug, Default)]
pub(crate) struct Sessions {
    table: Mutex<HashMap<u64, Arc<SessionCore>>>,
    next_id: AtomicU64,
    expired: AtomicU64,
    lost: AtomicU64,
    closed: AtomicU64,
    /// The dispatcher has been asked to watch idle time-outs.
    watched: AtomicBool,
}

/// Session counts, for `stats()`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
#[non_exhaustive]
pub struct SessionCounts {
    /// Sessions open now.
    pub live: usize,
    /// Sessions closed by their owners so far.
    pub closed: u64,
    /// Sessions ended by their idle time-out so far.
    pub expired: u64,
    /// Times a session lost its worker (a strict session fails from then on; a prefer
    /// session moves).
    pub lost: u64,
}

impl Sessions {
    pub(crate) fn counts(&self) -> SessionCounts {
        SessionCounts {
            live: self.table.lock().len(),
            closed: self.closed.load(Ordering::Relaxed),
            expired: self.expired.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
        }
    }

    /// Snapshots of the live sessions, by id.
    pub(crate) fn infos(&self) -> Vec<SessionInfo> {
        let cores: Vec<Arc<SessionCore>> = self.table.lock().values().cloned().collect();
        let mut infos: Vec<SessionInfo> = cores.iter().map(|c| c.info()).collect();
        infos.sort_by_key(|i| i.id);
        infos
    }
}

impl SessionCore {
    fn info(&self) -> SessionInfo {
        let st = self.state.lock();
        SessionInfo {
            id: self.id,
            affinity: self.affinity,
            worker: st.worker,
            started: self.started,
            idle: if st.in_flight > 0 { Duration::ZERO } else { st.last_active.elapsed() },
            calls: st.calls,
            lost: st.lost,
        }
    }
}

/// A handle on a session of a pool. `Send + Sync`: its calls may come from several threads
/// (in the strict modes they queue for its worker). Dropping it closes the session.
#[derive(Debug)]
pub struct Session {
    calls: Arc<Calls>,
    core: Arc<SessionCore>,
}

impl Session {
    /// Opens a session (see [`Pool::session_with`](crate::Pool::session_with)).
    pub(crate) fn open(calls: Arc<Calls>, options: SessionOptions) -> Result<Session> {
        let shared = calls.shared();
        let config = calls.config();
        let sessions = &shared.sessions;
        let idle_ttl = options.idle_ttl.or(config.session_ttl);
        if idle_ttl.is_some_and(|t| t.is_zero()) {
            return Err(crate::Error::config("SessionOptions::idle_ttl", "must be greater than zero"));
        }
        let strict = options.affinity.strict();
        let mut table = sessions.table.lock();
        if table.len() >= config.max_sessions {
            return Err(crate::Error::TooManySessions { max_sessions: config.max_sessions });
        }
        let worker = {
            let mut board = shared.board.lock();
            if let Some(e) = board.refusal() {
                return Err(e);
            }
            board.bind(strict)
        };
        let id = sessions.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let core = Arc::new(SessionCore {
            id,
            tag: id.to_string(),
            affinity: options.affinity,
            idle_ttl,
            started: SystemTime::now(),
            state: Mutex::new(State {
                worker,
                bound: worker.is_some() && strict,
                lost: None,
                ended: None,
                touched: Vec::new(),
                last_active: Instant::now(),
                in_flight: 0,
                calls: 0,
            }),
            context: Mutex::new(options.context),
        });
        table.insert(id, core.clone());
        drop(table);
        if idle_ttl.is_some() && !sessions.watched.swap(true, Ordering::AcqRel) {
            let _ = shared.requests.send(Request::WatchSessions);
        }
        log::debug!("[{}] session {id} started on worker {worker:?} ({:?})", shared.name, options.affinity);
        if shared.emitter.enabled() {
            shared.emitter.emit(Event::SessionStarted {
                pool: shared.name.clone(),
                session: id,
                worker,
                affinity: options.affinity,
            });
        }
        Ok(Session { calls, core })
    }

    /// Its id, unique within the pool (what the worker, the events and the logs show).
    pub fn id(&self) -> u64 {
        self.core.id
    }

    /// The worker it is bound to now.
    pub fn worker(&self) -> Option<u64> {
        self.core.state.lock().worker
    }

    /// A snapshot of it.
    pub fn info(&self) -> SessionInfo {
        self.core.info()
    }

    /// Replaces the JSON value sent with each of its calls (`None`: none).
    pub fn set_context(&self, context: Option<Value>) {
        *self.core.context.lock() = context;
    }

    /// The JSON value sent with each of its calls.
    pub fn context(&self) -> Option<Value> {
        self.core.context.lock().clone()
    }

    /// Runs `command` in this session (see [`Pool::call`](crate::Pool::call)).
    pub fn call(&self, command: &str, args: Value) -> Result<Value> {
        self.call_with(command, args, CallOptions::default())
    }

    /// [`call`](Session::call) with serde on both sides.
    /// Bytes and arrays travel as raw bytes, as with [`Pool::call_as`](crate::Pool::call_as).
    pub fn call_as<A: Serialize + ?Sized, R: DeserializeOwned>(&self, command: &str, args: &A) -> Result<R> {
        self.call_as_with(command, args, CallOptions::default())
    }

    /// [`call_as`](Session::call_as) with per-call options.
    pub fn call_as_with<A: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        command: &str,
        args: &A,
        options: CallOptions,
    ) -> Result<R> {
        self.run(command, Payload::from_serialize(args)?, options)?.deserialize()
    }

    /// [`call`](Session::call) with per-call options.
    pub fn call_with(&self, command: &str, args: Value, options: CallOptions) -> Result<Value> {
        self.run(command, args.into(), options).map(Payload::into_value)
    }

    fn run(&self, command: &str, args: Payload, options: CallOptions) -> Result<Payload> {
        let core = &*self.core;
        let context = core.context.lock().clone();
        self.calls.call_in_session(command, args, options, &CallSession { core, context })
    }

    /// Ends the session: the workers that ran its calls free its state (running the adapter's
    /// `@snakepit.on_session_end` hooks). Dropping the handle does the same.
    pub fn close(self) {
        // Drop does it.
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        end(self.calls.shared(), &self.core, SessionEnd::Closed);
    }
}

// ---- the call path's side -------------------------------------------------------------------

/// How a session's call is routed, decided as it starts; `Err` if it cannot run.
pub(crate) fn begin_call(shared: &Shared, s: &CallSession<'_>) -> Result<crate::dispatcher::Route> {
    use crate::dispatcher::Route;
    let core = s.core;
    let mut st = core.state.lock();
    if let Some(reason) = st.ended {
        return Err(crate::Error::SessionClosed { session: core.id, reason });
    }
    if let (Some(reason), Some(worker)) = (st.lost, st.worker) {
        return Err(crate::Error::SessionLost { session: core.id, worker, reason });
    }
    if st.touched.is_empty() && st.in_flight == 0 {
        // No call has run (or runs) yet, so no state can be lost: a session whose worker went
        // (or is about to be replaced) before its first call is bound again, quietly.
        if let Some(w) = st.worker {
            let mut board = shared.board.lock();
            if !board.suits_new_session(w) {
                let mut fx = Effects::default();
                if st.bound {
                    board.unbind(w, &mut fx);
                }
                st.worker = board.bind(core.affinity.strict());
                st.bound = st.worker.is_some() && core.affinity.strict();
                drop(board);
                shared.apply(fx);
            }
        }
    }
    st.in_flight += 1;
    st.calls += 1;
    st.last_active = Instant::now();
    Ok(match (st.worker, core.affinity) {
        (None, _) => Route::Any,
        (Some(w), Affinity::Strict) => Route::Only(w),
        (Some(w), Affinity::StrictFailFast) => Route::OnlyNow(w),
        (Some(w), Affinity::Prefer) => Route::Prefer(w),
    })
}

/// A session's call ended (`ran_on`: the worker it ran on, if it reached one).
pub(crate) fn end_call(shared: &Shared, s: &CallSession<'_>, ran_on: Option<WorkerId>) {
    let core = s.core;
    let mut moved = None;
    // A worker whose state for the session must go at once: one a prefer session visited while
    // its own worker was busy (so that a later visit finds it fresh, not stale), or one that
    // ran a call of a session that ended meanwhile.
    let mut forget = None;
    {
        let mut st = core.state.lock();
        st.in_flight -= 1;
        st.last_active = Instant::now();
        let Some(w) = ran_on else { return };
        match st.worker {
            None => {
                // Bound now: no worker was open when it was created.
                st.worker = Some(w);
                if core.affinity.strict() {
                    st.bound = true;
                    shared.board.lock().bind_to(w);
                }
            }
            Some(home) if home != w && core.affinity == Affinity::Prefer => {
                // Ran elsewhere: it moves only if its worker is lost (or retired: a prefer
                // session's calls can never run there again).
                let board = shared.board.lock();
                if board.takes_any(home) {
                    forget = Some(w);
                } else {
                    moved = Some((home, board.loss_of(home)));
                    st.worker = Some(w);
                }
            }
            _ => {}
        }
        if st.ended.is_some() {
            forget = Some(w);
        } else if forget.is_none() && !st.touched.contains(&w) {
            st.touched.push(w);
        }
    }
    if let Some(w) = forget {
        post_end(shared, core, &[w]);
    }
    if let Some((old, reason)) = moved {
        // The call that found the move has its result: a short look only.
        let reason = reason.unwrap_or_else(|| lost_worker_reason(shared, old, Instant::now() + MOVE_LOOK));
        announce_loss(shared, core, old, reason, true);
    }
}

/// A strict session's worker is gone: every later call fails with `SessionLost`.
pub(crate) fn lost(shared: &Shared, s: &CallSession<'_>, worker: WorkerId, reason: Loss) {
    let core = s.core;
    let unbind = {
        let mut st = core.state.lock();
        if st.lost.is_some() {
            return;
        }
        st.lost = Some(reason);
        std::mem::take(&mut st.bound)
    };
    if unbind {
        let mut fx = Effects::default();
        shared.board.lock().unbind(worker, &mut fx);
        shared.apply(fx);
    }
    announce_loss(shared, core, worker, reason, false);
}

/// Why worker `id` was lost, when the board does not know yet (the dispatcher has not heard of
/// its exit): from its connection, which records how it ended (waiting for that until `by` at
/// most, so never past the deadline of the call that asks).
pub(crate) fn lost_worker_reason(shared: &Shared, id: WorkerId, by: Instant) -> Loss {
    let conn = shared.board.lock().conn_of(id);
    match conn.map(|c| c.death_error(by)) {
        Some(crate::Error::WorkerDied { killed_by: Some(why), .. }) => Loss::Killed(why),
        Some(crate::Error::WorkerDied { exit, .. }) => Loss::Died { exit },
        _ => Loss::Unknown,
    }
}

fn announce_loss(shared: &Shared, core: &SessionCore, worker: WorkerId, reason: Loss, moved: bool) {
    shared.sessions.lost.fetch_add(1, Ordering::Relaxed);
    if moved {
        log::info!("[{}] session {} moved off worker {worker}: {reason}", shared.name, core.id);
    } else {
        log::warn!("[{}] session {} lost: {reason}", shared.name, core.id);
    }
    if shared.emitter.enabled() {
        shared.emitter.emit(Event::SessionLost {
            pool: shared.name.clone(),
            session: core.id,
            worker,
            reason,
            moved,
        });
    }
}

// ---- ending ---------------------------------------------------------------------------------

/// Ends a session (once): out of the table, off its worker's count, and every worker that ran
/// its calls told to free its state.
pub(crate) fn end(shared: &Shared, core: &SessionCore, reason: SessionEnd) {
    end_if(shared, core, reason, |_| true);
}

/// [`end`], if `still` holds under the same lock that marks it ended (a call may have begun
/// since the caller looked).
fn end_if(shared: &Shared, core: &SessionCore, reason: SessionEnd, still: impl Fn(&State) -> bool) {
    let (bound_to, touched, calls) = {
        let mut st = core.state.lock();
        if st.ended.is_some() || !still(&st) {
            return;
        }
        st.ended = Some(reason);
        let bound_to = if std::mem::take(&mut st.bound) { st.worker } else { None };
        (bound_to, std::mem::take(&mut st.touched), st.calls)
    };
    shared.sessions.table.lock().remove(&core.id);
    match reason {
        SessionEnd::Closed => shared.sessions.closed.fetch_add(1, Ordering::Relaxed),
        SessionEnd::Expired => shared.sessions.expired.fetch_add(1, Ordering::Relaxed),
    };
    let mut fx = Effects::default();
    {
        let mut board = shared.board.lock();
        if let Some(w) = bound_to {
            board.unbind(w, &mut fx);
        }
    }
    shared.apply(fx);
    post_end(shared, core, &touched);
    log::debug!("[{}] session {} ended: {reason} ({calls} calls)", shared.name, core.id);
    if shared.emitter.enabled() {
        shared.emitter.emit(Event::SessionEnded {
            pool: shared.name.clone(),
            session: core.id,
            reason,
            calls,
        });
    }
}

/// Tells `workers` that the session ended, so they free its state. A worker whose pipe is
/// full (it is busy) gets it with its next frame, or when the dispatcher retries.
fn post_end(shared: &Shared, core: &SessionCore, workers: &[WorkerId]) {
    let conns: Vec<_> = {
        let board = shared.board.lock();
        workers.iter().filter_map(|&w| Some((w, board.conn_of(w)?))).collect()
    };
    if conns.is_empty() {
        return;
    }
    let frame = match protocol::encode_end_session(&core.tag) {
        Ok(frame) => frame,
        Err(e) => return log::warn!("[{}] session {}: cannot encode its end: {e}", shared.name, core.id),
    };
    let waiting: Vec<WorkerId> = conns.into_iter().filter(|(_, c)| !c.post(&frame)).map(|(w, _)| w).collect();
    if !waiting.is_empty() {
        let _ = shared.requests.send(Request::FlushPosted(waiting));
    }
}

/// Ends the sessions idle past their time-out (run by the dispatcher). Returns when to look
/// again, or `None` when no live session has a time-out.
pub(crate) fn expire(shared: &Shared, now: Instant) -> Option<Instant> {
    let cores: Vec<Arc<SessionCore>> =
        shared.sessions.table.lock().values().filter(|c| c.idle_ttl.is_some()).cloned().collect();
    let mut next: Option<Instant> = None;
    for core in cores {
        let ttl = core.idle_ttl.expect("filtered");
        let due = {
            let st = core.state.lock();
            if st.in_flight > 0 {
                Some(now + ttl)
            } else {
                let at = st.last_active + ttl;
                (at > now).then_some(at)
            }
        };
        match due {
            // Not sooner than TICK: a scan costs every session a lock.
            Some(at) => next = Some(next.map_or(at, |n| n.min(at)).max(now + TICK)),
            None => end_if(shared, &core, SessionEnd::Expired, |st| {
                st.in_flight == 0 && st.last_active + ttl <= now
            }),
        }
    }
    if next.is_none() {
        shared.sessions.watched.store(false, Ordering::Release);
        // A session created since the scan asked for watching again; or it will.
        if shared.sessions.table.lock().values().any(|c| c.idle_ttl.is_some())
            && !shared.sessions.watched.swap(true, Ordering::AcqRel)
        {
            return Some(now + Duration::from_millis(10));
        }
    }
    next
}
