//! # snakepit
//!
//! Pools of long-lived Python worker processes for ordinary blocking Rust programs. A call
//! goes to a warm Python process and comes back as a plain `Result`; crashes and hangs are
//! contained to the call that caused them, and every call gets exactly one answer.
//!
//! ## Quick start
//!
//! ```no_run
//! use serde_json::json;
//! use snakepit::Pool;
//!
//! # fn main() -> Result<(), snakepit::Error> {
//! // `snakepit.demo` ships with the crate; your own adapter is any importable module
//! // (see `python_path`) whose functions carry `@snakepit.command`.
//! let pool = Pool::builder().size(2).adapter("snakepit.demo").build()?;
//! let n = pool.call("word_count", json!({"text": "a warm python answers"}))?;
//! assert_eq!(n, json!(4));
//! let v: Vec<f64> = pool.call_as("embed", &json!({"text": "hello"}))?;
//! println!("{v:?}");
//! pool.shutdown()?;
//! # Ok(())
//! # }
//! ```
//!
//! An adapter is a Python module:
//!
//! ```python
//! import snakepit
//!
//! @snakepit.command
//! def add(a, b):
//!     return a + b
//! ```
//!
//! ## What is inside
//!
//! - [`Pool`]: workers, a FIFO queue, per-call deadlines, crash and hang containment, restarts
//!   with backoff, [`Pool::stats`], and recycling by age, calls served and memory
//!   ([`PoolBuilder::ttl`], [`PoolBuilder::max_requests`], [`PoolBuilder::max_memory`]), make
//!   before break, with typed [`Event`]s for a callback ([`PoolBuilder::on_event`]).
//! - [`Session`]: calls with affinity to one worker, whose Python state lives there
//!   ([`Pool::session`]); [`PoolBuilder::init`], [`Pool::broadcast`], [`Pool::call_on`].
//! - [`PendingCall`]: calls in the background ([`Pool::submit`], [`Pool::map`],
//!   [`Pool::map_unordered`]), waited on together with `crossbeam_channel::select!`.
//! - Cancelling ([`PendingCall::cancel`]): a queued call at once; a running one in steps
//!   ([`CancelStep`]: asked, interrupted, given up, [`PoolBuilder::cancel_grace`] apart), which
//!   deadlines take too, so a command that honours them keeps its worker.
//! - [`Stream`]: a generator command's items as they come ([`Pool::stream`]), with
//!   credit-based backpressure; progress reports ([`CallOptions::on_progress`]).
//! - A call that times out says where Python was ([`Error::Timeout`]'s `stack`).
//! - [`Profile`]: one call at a time per process, or many per process on threads.
//! - [`PoolSet`] and [`Config`]: several named pools, from code or a JSON file.
//! - [`python::inspect`]: which interpreter, free-threaded or not, and which profile fits.
//!
//! ## Shutdown
//!
//! [`Pool::shutdown`] (and `Drop`) refuses new calls, fails queued ones with
//! [`Error::ShuttingDown`], gives in-flight calls `shutdown_timeout` to finish, then stops the
//! workers (a `shutdown` frame and EOF, then SIGTERM and SIGKILL) and joins every thread. No
//! process or thread outlives a pool: each worker runs under a keeper process that kills
//! whatever the worker started, daemons included, however the worker ends. Workers also exit
//! on their own if the Rust process dies.
//!
//! ## Logging
//!
//! The library logs through the `log` crate and never installs a logger. Worker stderr lines
//! are logged under the target `snakepit::python`: an adapter's `logging` records and
//! `warnings` at their own level, anything else it prints at `debug`.
#![deny(unsafe_code)]
#![warn(missing_docs)]

mod binary;
mod call;
mod cancel;
mod compat;
mod config;
mod config_file;
mod dispatcher;
mod embed;
mod error;
mod events;
mod housekeeper;
mod mailbox;
mod pending;
mod policy;
mod pool;
mod pool_set;
mod proc;
mod protocol;
pub mod python;
mod session;
mod stats;
mod stream;
mod sys;
mod worker;

pub use binary::{Array, Bytes, DType, Element};
pub use cancel::CancelStep;
pub use compat::ThreadSafety;
pub use config::{PoolBuilder, PoolConfig, Profile};
pub use config_file::{Config, POOL_KEYS};
pub use error::{Error, ExitKind, KilledBy, RemoteError, Result, TimeoutKind};
pub use events::Event;
pub use pending::{MapResults, MapUnordered, PendingCall};
pub use policy::RecycleReason;
pub use pool::{CallOptions, Pool};
pub use pool_set::{PoolSet, PoolSetBuilder, DEFAULT_POOL};
pub use protocol::{Progress, WorkerInfo};
pub use session::{Affinity, Loss, Session, SessionCounts, SessionEnd, SessionInfo, SessionOptions};
pub use stats::{Latency, PoolStats, Recycles, WorkerState, WorkerStats};
pub use stream::Stream;

/// The README's Rust examples, compiled as doctests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeExamples;
