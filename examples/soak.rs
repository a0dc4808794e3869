//! The soak test: `cargo run --release --example soak -- --calls 1000000 --threads 8`.
//!
//! Drives `--calls` calls (default 1,000,000) from `--threads` caller threads (default 8)
//! through real pools with faults planned by the callers, and checks that every call got
//! exactly the outcome its own request asked for and that the pool left nothing behind.
//!
//! Each caller draws, from its own deterministic PRNG (xorshift64*, seeded from `--seed` and
//! its index), what each call does: echo a unique token with a random padding (command
//! `mirror`, most calls; some pads larger than a pipe's atomic write, some with escapes and
//! non-ASCII, a few with a short nap), raise a `ValueError` carrying the token
//! (`--error-ppm`, 2%), crash the worker with `os._exit(code)` after writing the token to
//! stderr (`--crash-ppm`, 0.05%), sleep far past a short per-call deadline (`--hang-ppm`,
//! 0.02%; deadline `--hang-ms`, 250 ms), or echo after a nap of 0 to 4 ms under a deadline of
//! 1 to 5 ms, so that reply and deadline race (`--race-ppm`, 0.1%). Workers are recycled after
//! about `--max-requests` calls (500, with 20% jitter).
//!
//! The calls are split over up to three phases, each on its own pool (`--phases`, default all):
//! `process` (half the calls; `--size` workers, one call each), `thread` (a quarter; size/2
//! workers of 4 threads, a timed-out call's thread runs on) and `thread-kill` (a quarter; the
//! same with `kill_on_timeout`). A call counts as a mismatch unless it got:
//!
//! - a planned echo: `Ok` with exactly its own token and padding (a reply meant for another
//!   call is counted as misdelivered);
//! - a planned raise: `Err(Python)`, `ValueError`, with its own token as the message;
//! - a planned crash: `Err(WorkerDied)` with no `killed_by`; in the process profile not
//!   collateral, with its own exit code and its token among the stderr lines;
//! - a planned hang: `Err(Timeout(Call))`, or `Err(Timeout(Queue))` if it never got a worker
//!   before its short deadline;
//! - a planned race: `Ok` with exactly its own token, `Err(Timeout(Call))` or
//!   `Err(Timeout(Queue))`;
//! - thread profiles only, for any call: `WorkerDied` with no `killed_by` because a co-tenant
//!   crashed its worker (its pid must be one that a planned crash also reported), or, with
//!   `kill_on_timeout`, `WorkerDied { collateral: true, killed_by: Some(CallTimeout) }`.
//!
//! Any call that returns more than 5 s after its deadline is a mismatch too. After each phase:
//! `stats()` must agree with what the callers saw (`calls_ok`, `calls_failed`, `timeouts`; in
//! the process profile `crashes` equals the planned crashes), every call that reached a worker
//! must have had its `CallCompleted` event, `shutdown()` must return `Ok`, no worker the pool
//! started may be alive, and this process's open file descriptors (`/proc/self/fd`), threads
//! (`/proc/self/task`) and child processes (`/proc/*/stat` with our pid as parent, zombies
//! counted apart) must be back to their counts from before the first pool was built (waiting
//! up to 10 s for them to settle). A summary goes to stdout, ending with a `soak-json:` line;
//! the exit code is 0 when everything held, 1 on any mismatch or leak, 2 on bad arguments,
//! 3 when the watchdog fired (the time budget, `--budget-secs`, ran out, or a call outlived its
//! deadline by a minute). Progress goes to stderr every `--progress-secs` (10).
//!
//! The adapter is written at run time to `$TMPDIR/snakepit-soak-<pid>/` and removed at the end.
//! `RUST_LOG=warn` shows the library's log (a warning per time-out and crash).

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use snakepit::{CallOptions, Error, Event, ExitKind, KilledBy, Pool, Profile, TimeoutKind};

/// The adapter the workers serve, written to a temporary folder at run time.
const ADAPTER: &str = r#""""Adapter for the soak example: mirror (echo), raise, crash, hang."""
import os
import sys
import time

import snakepit

SNAKEPIT_THREAD_SAFE = True


@snakepit.command
def mirror(token, pad="", nap=0.0):
    if nap:
        time.sleep(nap)
    return {"token": token, "pad": pad}


@snakepit.command
def fail(token):
    raise ValueError(token)


@snakepit.command
def crash(token, code):
    sys.stderr.write("soak crash %s\n" % token)
    sys.stderr.flush()
    os._exit(code)


@snakepit.command
def hang(token, seconds):
    time.sleep(seconds)
    return {"token": token, "late": True}
"#;

/// The deadline of every call but the planned hangs (the pool's `request_timeout`).
const CALL_DEADLINE: Duration = Duration::from_secs(30);
/// How long past its deadline a call may return before it counts as late.
const LATE_SLACK: Duration = Duration::from_secs(5);
/// How long past its deadline a call may stay in flight before the watchdog ends the run.
const STUCK_AFTER: Duration = Duration::from_secs(60);
/// How long the census may take to settle back to the baseline after a shutdown.
const SETTLE: Duration = Duration::from_secs(10);
/// Mismatch descriptions kept per caller thread.
const SAMPLES: usize = 10;

// ---------------------------------------------------------------------------------------------
// Options

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Process,
    Thread,
    ThreadKill,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Process => "process",
            Phase::Thread => "thread",
            Phase::ThreadKill => "thread-kill",
        }
    }

    fn threaded(self) -> bool {
        self != Phase::Process
    }

    /// The phase's share of the calls, out of the sum over the phases run.
    fn weight(self) -> u64 {
        match self {
            Phase::Process => 2,
            Phase::Thread | Phase::ThreadKill => 1,
        }
    }
}

#[derive(Debug, Clone)]
struct Opts {
    calls: u64,
    threads: usize,
    size: usize,
    phases: Vec<Phase>,
    seed: u64,
    error_ppm: u64,
    crash_ppm: u64,
    hang_ppm: u64,
    race_ppm: u64,
    hang_deadline: Duration,
    max_requests: u64,
    jitter: f64,
    budget: Duration,
    progress: Duration,
}

const USAGE: &str = "usage: soak [--calls N] [--threads T] [--size S] [--phases process,thread,thread-kill]
            [--seed X] [--error-ppm P] [--crash-ppm P] [--hang-ppm P] [--race-ppm P]
            [--hang-ms MS]
            [--max-requests N] [--jitter F] [--budget-secs S] [--progress-secs S]";

fn parse_args() -> Result<Opts, String> {
    let mut o = Opts {
        calls: 1_000_000,
        threads: 8,
        size: 4,
        phases: vec![Phase::Process, Phase::Thread, Phase::ThreadKill],
        seed: 0x005e_ed0f_5a4e_u64,
        error_ppm: 20_000,
        crash_ppm: 500,
        hang_ppm: 200,
        race_ppm: 1000,
        hang_deadline: Duration::from_millis(250),
        max_requests: 500,
        jitter: 0.2,
        budget: Duration::ZERO,
        progress: Duration::from_secs(10),
    };
    let mut budget = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "-h" || flag == "--help" {
            return Err(String::new());
        }
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let int = |v: &str| v.replace('_', "").parse::<u64>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--calls" => o.calls = int(&value)?,
            "--threads" => o.threads = int(&value)? as usize,
            "--size" => o.size = int(&value)? as usize,
            "--seed" => o.seed = int(&value)?,
            "--error-ppm" => o.error_ppm = int(&value)?,
            "--crash-ppm" => o.crash_ppm = int(&value)?,
            "--hang-ppm" => o.hang_ppm = int(&value)?,
            "--race-ppm" => o.race_ppm = int(&value)?,
            "--hang-ms" => o.hang_deadline = Duration::from_millis(int(&value)?),
            "--max-requests" => o.max_requests = int(&value)?,
            "--jitter" => o.jitter = value.parse().map_err(|e| format!("{flag} {value}: {e}"))?,
            "--budget-secs" => budget = Some(Duration::from_secs(int(&value)?)),
            "--progress-secs" => o.progress = Duration::from_secs(int(&value)?.max(1)),
            "--phases" => {
                o.phases = value
                    .split(',')
                    .map(|p| match p.trim() {
                        "process" => Ok(Phase::Process),
                        "thread" => Ok(Phase::Thread),
                        "thread-kill" => Ok(Phase::ThreadKill),
                        other => Err(format!("unknown phase {other:?}")),
                    })
                    .collect::<Result<_, _>>()?;
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if o.calls == 0 || o.threads == 0 || o.size == 0 || o.phases.is_empty() {
        return Err("--calls, --threads, --size and --phases must be positive".into());
    }
    if o.error_ppm + o.crash_ppm + o.hang_ppm + o.race_ppm > 1_000_000 {
        return Err("the fault rates add up to more than 1,000,000 ppm".into());
    }
    if o.hang_deadline.is_zero() {
        return Err("--hang-ms must be positive".into());
    }
    // Generous: ten minutes plus 5 ms a call (a 2-core machine does well over 1,000 calls/s).
    o.budget = budget.unwrap_or(Duration::from_secs(600) + Duration::from_millis(o.calls.saturating_mul(5)));
    Ok(o)
}

// ---------------------------------------------------------------------------------------------
// The plan of a call

/// xorshift64*, seeded through splitmix64: deterministic per caller, no crates.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        Rng(if z == 0 { 1 } else { z })
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What a call asks its worker to do.
#[derive(Debug)]
enum Plan {
    Echo {
        pad: String,
        nap_ms: u64,
    },
    Raise,
    Crash {
        code: i32,
    },
    Hang,
    /// A mirror call napping `nap_us` with a deadline of `deadline_us`, about the same: its
    /// reply and its deadline race.
    Race {
        nap_us: u64,
        deadline_us: u64,
    },
}

impl Plan {
    fn kind(&self) -> &'static str {
        match self {
            Plan::Echo { .. } => "echo",
            Plan::Raise => "raise",
            Plan::Crash { .. } => "crash",
            Plan::Hang => "hang",
            Plan::Race { .. } => "race",
        }
    }
}

/// Characters a padding is made of: plain, JSON escapes, and multi-byte UTF-8.
const PAD_CHARS: &[char] = &[
    'a', 'b', 'c', 'x', 'y', 'z', '0', '7', ' ', '-', '"', '\\', '\n', '\t', '/', 'é', 'ß', '€', '🐍',
    '\u{1}',
];

fn plan(rng: &mut Rng, o: &Opts) -> Plan {
    let r = rng.below(1_000_000);
    if r < o.crash_ppm {
        return Plan::Crash { code: 3 + rng.below(120) as i32 };
    }
    if r < o.crash_ppm + o.hang_ppm {
        return Plan::Hang;
    }
    if r < o.crash_ppm + o.hang_ppm + o.error_ppm {
        return Plan::Raise;
    }
    if r < o.crash_ppm + o.hang_ppm + o.error_ppm + o.race_ppm {
        return Plan::Race { nap_us: rng.below(4000), deadline_us: 1000 + rng.below(4000) };
    }
    // Most pads are short; 1 in 10 is up to 4 KB, 1 in 1,000 is 4 to 100 KB (larger than one
    // atomic pipe write, so it cannot be written on a waiting call's behalf).
    let size = match rng.below(1000) {
        0 => 4096 + rng.below(96 * 1024),
        1..=100 => rng.below(4096),
        _ => rng.below(48),
    } as usize;
    let pad: String = if size > 256 {
        // Long pads: a random run repeated, cheap to build.
        let unit: String = (0..64).map(|_| PAD_CHARS[rng.below(PAD_CHARS.len() as u64) as usize]).collect();
        unit.chars().cycle().take(size).collect()
    } else {
        (0..size).map(|_| PAD_CHARS[rng.below(PAD_CHARS.len() as u64) as usize]).collect()
    };
    let nap_ms = if rng.below(200) == 0 { 1 + rng.below(3) } else { 0 };
    Plan::Echo { pad, nap_ms }
}

// ---------------------------------------------------------------------------------------------
// What the callers saw

#[derive(Debug, Default, Clone)]
struct Tally {
    planned_echo: u64,
    planned_raise: u64,
    planned_crash: u64,
    planned_hang: u64,
    planned_race: u64,
    // Outcomes as planned.
    echoed: u64,
    raised: u64,
    crashed: u64,
    /// Thread profiles: a planned crash whose worker died with another exit code (another
    /// planned crash on the same worker got there first).
    crashed_by_other: u64,
    hang_call: u64,
    hang_queue: u64,
    /// Planned races: `Ok` with their own reply, `Timeout(Call)`, `Timeout(Queue)`.
    race_ok: u64,
    race_call: u64,
    race_queue: u64,
    /// `WorkerDied { collateral: true }`, thread-kill only.
    collateral: u64,
    /// Of those, calls that were not planned hangs themselves.
    collateral_not_hang: u64,
    /// `WorkerDied` on a call that did not crash its worker, thread profiles only.
    cotenant: u64,
    // Raw results, for the comparison with `stats()`.
    results_ok: u64,
    results_err: u64,
    results_timeout: u64,
    results_queue_timeout: u64,
    // Faults.
    mismatches: u64,
    misdelivered: u64,
    late: u64,
    max_echo_latency: Duration,
    crash_pids: Vec<u32>,
    cotenant_pids: Vec<u32>,
    samples: Vec<String>,
}

impl Tally {
    fn total(&self) -> u64 {
        self.planned_echo + self.planned_raise + self.planned_crash + self.planned_hang + self.planned_race
    }

    fn add(&mut self, o: Tally) {
        self.planned_echo += o.planned_echo;
        self.planned_raise += o.planned_raise;
        self.planned_crash += o.planned_crash;
        self.planned_hang += o.planned_hang;
        self.planned_race += o.planned_race;
        self.echoed += o.echoed;
        self.raised += o.raised;
        self.crashed += o.crashed;
        self.crashed_by_other += o.crashed_by_other;
        self.hang_call += o.hang_call;
        self.hang_queue += o.hang_queue;
        self.race_ok += o.race_ok;
        self.race_call += o.race_call;
        self.race_queue += o.race_queue;
        self.collateral += o.collateral;
        self.collateral_not_hang += o.collateral_not_hang;
        self.cotenant += o.cotenant;
        self.results_ok += o.results_ok;
        self.results_err += o.results_err;
        self.results_timeout += o.results_timeout;
        self.results_queue_timeout += o.results_queue_timeout;
        self.mismatches += o.mismatches;
        self.misdelivered += o.misdelivered;
        self.late += o.late;
        self.max_echo_latency = self.max_echo_latency.max(o.max_echo_latency);
        self.crash_pids.extend(o.crash_pids);
        self.cotenant_pids.extend(o.cotenant_pids);
        self.samples.extend(o.samples);
    }

    fn mismatch(&mut self, what: String) {
        self.mismatches += 1;
        if self.samples.len() < SAMPLES {
            self.samples.push(what);
        }
    }
}

/// A result, shortened for a mismatch report (pads can be 100 KB).
fn brief(result: &Result<Value, Error>) -> String {
    let mut s = match result {
        Ok(v) => format!("Ok({v})"),
        Err(e) => format!("Err({e:?})"),
    };
    if s.len() > 300 {
        let mut cut = 300;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Progress and the watchdog

/// A call in flight: its index, plan kind, start and deadline.
type InFlight = (u64, &'static str, Instant, Duration);

/// What the watchdog reads: progress, and each caller's call in flight.
struct Progress {
    started: Instant,
    phase: Mutex<String>,
    done: AtomicU64,
    phase_calls: AtomicU64,
    /// Per caller: (call index, plan kind, started, deadline) of the call in flight.
    inflight: Vec<Mutex<Option<InFlight>>>,
    finished: AtomicBool,
}

fn set_phase(p: &Progress, what: String) {
    *p.phase.lock().unwrap() = what;
}

/// Ends the run from the watchdog: removes the adapter folder, exits with code 3 (the workers
/// exit by themselves when their parent is gone).
fn give_up() -> ! {
    let _ = std::fs::remove_dir_all(adapter_dir());
    std::process::exit(3);
}

fn watchdog(p: Arc<Progress>, budget: Duration, every: Duration) {
    let mut last_print = Instant::now();
    let mut last_done = 0;
    loop {
        std::thread::sleep(Duration::from_millis(250));
        if p.finished.load(Ordering::SeqCst) {
            return;
        }
        let now = Instant::now();
        let phase = p.phase.lock().unwrap().clone();
        let done = p.done.load(Ordering::Relaxed);
        for (t, slot) in p.inflight.iter().enumerate() {
            if let Some((i, kind, started, deadline)) = *slot.lock().unwrap() {
                if now.duration_since(started) > deadline + STUCK_AFTER {
                    eprintln!(
                        "soak: WATCHDOG: phase {phase}: caller {t}'s call {i} ({kind}, deadline {deadline:?}) \
                         has been in flight for {:?}: a call outlived its deadline",
                        now.duration_since(started)
                    );
                    give_up();
                }
            }
        }
        if p.started.elapsed() > budget {
            eprintln!("soak: WATCHDOG: time budget of {budget:?} spent in phase {phase} after {done} calls");
            give_up();
        }
        if now.duration_since(last_print) >= every {
            let rate = done.saturating_sub(last_done) as f64 / now.duration_since(last_print).as_secs_f64();
            eprintln!(
                "soak: [{:>6.0} s] {phase}: {done}/{} calls, {rate:.0} calls/s",
                p.started.elapsed().as_secs_f64(),
                p.phase_calls.load(Ordering::Relaxed)
            );
            last_print = now;
            last_done = done;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The census of this process

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Census {
    fds: usize,
    threads: usize,
    children: usize,
    zombies: usize,
}

fn count_dir(path: &str) -> usize {
    std::fs::read_dir(path).map(|d| d.count()).unwrap_or(usize::MAX)
}

fn census() -> Census {
    let me = std::process::id();
    let (mut children, mut zombies) = (0, 0);
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
            // After the command name (in parentheses, may hold anything): state, ppid, ...
            let mut rest = stat.rsplit(')').next().unwrap_or("").split_whitespace();
            let state = rest.next().unwrap_or("");
            let ppid: u32 = rest.next().and_then(|p| p.parse().ok()).unwrap_or(0);
            if ppid == me {
                if state == "Z" {
                    zombies += 1;
                } else {
                    children += 1;
                }
            }
        }
    }
    Census { fds: count_dir("/proc/self/fd"), threads: count_dir("/proc/self/task"), children, zombies }
}

/// Whether `pid` is a live (not zombie) snakepit worker.
fn worker_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    if stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z') {
        return false;
    }
    // The pid may have been reused by an unrelated process over a long run.
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains("snakepit"))
        .unwrap_or(false)
}

// ---------------------------------------------------------------------------------------------
// One phase

/// What the event callback saw.
#[derive(Default)]
struct Events {
    completed: AtomicU64,
    completed_ok: AtomicU64,
    died: AtomicU64,
    recycled: AtomicU64,
    started_pids: Mutex<Vec<u32>>,
}

struct PhaseReport {
    text: String,
    json: Value,
    failures: Vec<String>,
    tally: Tally,
    elapsed: Duration,
}

fn run_phase(
    phase: Phase,
    calls: u64,
    o: &Opts,
    adapter_dir: &Path,
    progress: &Progress,
    baseline: Census,
) -> PhaseReport {
    let mut failures = Vec::new();
    let mut text = String::new();
    let events = Arc::new(Events::default());
    let sink = events.clone();
    let (size, threads_per_worker) = if phase.threaded() { ((o.size / 2).max(1), 4) } else { (o.size, 1) };
    let hang_seconds = if phase.threaded() { 1.0 } else { 30.0 };
    set_phase(progress, format!("{}: building", phase.name()));
    progress.done.store(0, Ordering::Relaxed);
    progress.phase_calls.store(calls, Ordering::Relaxed);

    let mut builder = Pool::builder()
        .name(format!("soak-{}", phase.name()))
        .size(size)
        .python_path(adapter_dir)
        .adapter("soak_adapter")
        .startup_timeout(Duration::from_secs(60))
        .request_timeout(CALL_DEADLINE)
        .max_requests(o.max_requests)
        .jitter(o.jitter)
        .on_event(move |e| match e {
            Event::CallCompleted { ok, .. } => {
                sink.completed.fetch_add(1, Ordering::Relaxed);
                if *ok {
                    sink.completed_ok.fetch_add(1, Ordering::Relaxed);
                }
            }
            Event::WorkerStarted { pid, .. } => sink.started_pids.lock().unwrap().push(*pid),
            Event::WorkerDied { .. } => {
                sink.died.fetch_add(1, Ordering::Relaxed);
            }
            Event::WorkerRecycled { .. } => {
                sink.recycled.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        });
    if phase.threaded() {
        builder = builder
            .profile(Profile::Thread)
            .threads_per_worker(threads_per_worker)
            .kill_on_timeout(phase == Phase::ThreadKill);
    }
    let built = Instant::now();
    let pool = match builder.build() {
        Ok(pool) => pool,
        Err(e) => {
            failures.push(format!("build failed: {e}"));
            let _ = writeln!(text, "phase {}: FAILED      build failed: {e}", phase.name());
            return PhaseReport {
                text,
                json: json!({}),
                failures,
                tally: Tally::default(),
                elapsed: Duration::ZERO,
            };
        }
    };
    let build_time = built.elapsed();
    set_phase(progress, format!("{}: calling", phase.name()));

    let started = Instant::now();
    let mut tally = Tally::default();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..o.threads)
            .map(|t| {
                let share = calls / o.threads as u64 + u64::from((t as u64) < calls % o.threads as u64);
                let pool = &pool;
                let seed =
                    o.seed ^ (t as u64 + 1).wrapping_mul(0x1234_5678_9abc_def1) ^ ((phase as u64) << 56);
                std::thread::Builder::new()
                    .name(format!("soak-caller-{t}"))
                    .spawn_scoped(s, move || caller(phase, t, share, seed, hang_seconds, pool, o, progress))
                    .expect("spawn a caller thread")
            })
            .collect();
        for h in handles {
            match h.join() {
                Ok(t) => tally.add(t),
                Err(_) => failures.push("a caller thread panicked".into()),
            }
        }
    });
    let elapsed = started.elapsed();
    set_phase(progress, format!("{}: checking", phase.name()));

    // Every call has returned: each must already be counted, once.
    let stats = match pool.stats() {
        Ok(s) => Some(s),
        Err(e) => {
            failures.push(format!("stats() failed: {e}"));
            None
        }
    };
    set_phase(progress, format!("{}: shutting down", phase.name()));
    let stopping = Instant::now();
    let shutdown = pool.shutdown();
    let shutdown_time = stopping.elapsed();
    if let Err(e) = &shutdown {
        failures.push(format!("shutdown() returned {e:?}"));
    }
    drop(pool);
    set_phase(progress, format!("{}: census", phase.name()));

    // Accounting.
    let total = tally.total();
    if total != calls {
        failures.push(format!("{total} calls planned, {calls} asked for"));
    }
    if tally.results_ok + tally.results_err != calls {
        failures.push(format!("{} results for {calls} calls", tally.results_ok + tally.results_err));
    }
    if tally.mismatches > 0 {
        failures.push(format!("{} mismatched outcomes", tally.mismatches));
    }
    // A co-tenant death must be one that a planned crash reported (the calls a time-out kill
    // takes down are marked collateral).
    let crash_pids: BTreeSet<u32> = tally.crash_pids.iter().copied().collect();
    let unexplained: BTreeSet<u32> =
        tally.cotenant_pids.iter().copied().filter(|p| !crash_pids.contains(p)).collect();
    if !unexplained.is_empty() {
        failures.push(format!(
            "calls failed with WorkerDied (not collateral) on workers no planned crash took down: pids {unexplained:?}"
        ));
    }
    let completed = events.completed.load(Ordering::SeqCst);
    let completed_ok = events.completed_ok.load(Ordering::SeqCst);
    let reached = calls - tally.results_queue_timeout;
    if let Some(st) = &stats {
        let mut check = |what: &str, pool: u64, callers: u64| {
            if pool != callers {
                failures.push(format!("stats.{what} = {pool}, but the callers saw {callers}"));
            }
        };
        check("calls_ok", st.calls_ok, tally.results_ok);
        check("calls_failed", st.calls_failed, tally.results_err);
        check("timeouts", st.timeouts, tally.results_timeout);
        if phase == Phase::Process {
            check("crashes", st.crashes, tally.crashed);
        }
        if st.events_dropped == 0 {
            if completed != reached {
                failures.push(format!(
                    "{completed} CallCompleted events for {reached} calls that reached a worker"
                ));
            }
            if completed_ok != tally.results_ok {
                failures
                    .push(format!("{completed_ok} CallCompleted events with ok for {} Ok", tally.results_ok));
            }
        } else if completed > reached || completed + st.events_dropped < reached {
            failures.push(format!(
                "{completed} CallCompleted events (+{} dropped) for {reached} calls that reached a worker",
                st.events_dropped
            ));
        }
    }

    // Nothing left behind.
    let started_pids = events.started_pids.lock().unwrap().clone();
    let settling = Instant::now();
    let mut after = census();
    let mut alive: Vec<u32> = started_pids.iter().copied().filter(|&p| worker_alive(p)).collect();
    while (after != baseline || !alive.is_empty()) && settling.elapsed() < SETTLE {
        std::thread::sleep(Duration::from_millis(50));
        after = census();
        alive = started_pids.iter().copied().filter(|&p| worker_alive(p)).collect();
    }
    let settle_time = settling.elapsed();
    for (what, before, now) in [
        ("open file descriptors", baseline.fds, after.fds),
        ("threads", baseline.threads, after.threads),
        ("child processes", baseline.children, after.children),
        ("zombie children", baseline.zombies, after.zombies),
    ] {
        if before != now {
            failures
                .push(format!("{what}: {before} before the pool, {now} after (waited {settle_time:.1?})"));
        }
    }
    if !alive.is_empty() {
        failures.push(format!("workers still alive after shutdown: {alive:?}"));
    }

    // The report.
    let rate = calls as f64 / elapsed.as_secs_f64();
    let profile = if phase.threaded() {
        format!(
            "{size} workers x {threads_per_worker} threads{}",
            if phase == Phase::ThreadKill { ", kill_on_timeout" } else { "" }
        )
    } else {
        format!("{size} workers, process profile")
    };
    let _ = writeln!(
        text,
        "phase {}: {calls} calls from {} threads in {:.1} s = {rate:.0} calls/s ({profile}; max_requests {} + {:.0}% jitter; built in {build_time:.2?})",
        phase.name(),
        o.threads,
        elapsed.as_secs_f64(),
        o.max_requests,
        o.jitter * 100.0
    );
    let t = &tally;
    let _ = writeln!(
        text,
        "  planned     echo {}  raise {}  crash {}  hang {}  race {}",
        t.planned_echo, t.planned_raise, t.planned_crash, t.planned_hang, t.planned_race
    );
    let _ = writeln!(
        text,
        "  outcomes    echoed {}  raised {}  crashed {} (of which worker already dying: {})  hang->Timeout(Call) {}  hang->Timeout(Queue) {}  race->Ok {} race->Timeout(Call) {} race->Timeout(Queue) {}  collateral {} (on calls not hanging: {})  co-tenant deaths {}",
        t.echoed, t.raised, t.crashed, t.crashed_by_other, t.hang_call, t.hang_queue, t.race_ok, t.race_call, t.race_queue, t.collateral, t.collateral_not_hang, t.cotenant
    );
    let _ = writeln!(
        text,
        "  mismatches  {} (misdelivered replies {}, late returns {}); slowest echo {:.1?}",
        t.mismatches, t.misdelivered, t.late, t.max_echo_latency
    );
    for sample in t.samples.iter().take(SAMPLES * 2) {
        let _ = writeln!(text, "    mismatch: {sample}");
    }
    if t.mismatches > (SAMPLES * 2) as u64 {
        let _ = writeln!(text, "    ... and {} more", t.mismatches - (SAMPLES * 2) as u64);
    }
    if let Some(st) = &stats {
        let _ = writeln!(
            text,
            "  stats       calls_ok {} (callers {})  calls_failed {} (callers {})  timeouts {} (callers {})  crashes {}  restarts {}  recycles {} (max_requests {})  queue_high_water {}  events_dropped {}",
            st.calls_ok,
            t.results_ok,
            st.calls_failed,
            t.results_err,
            st.timeouts,
            t.results_timeout,
            st.crashes,
            st.restarts,
            st.recycles.total(),
            st.recycles.max_requests,
            st.queue_high_water,
            st.events_dropped
        );
    }
    let _ = writeln!(
        text,
        "  events      CallCompleted {completed} (expected {reached}), ok {completed_ok}; WorkerStarted {}  WorkerDied {}  WorkerRecycled {}",
        started_pids.len(),
        events.died.load(Ordering::SeqCst),
        events.recycled.load(Ordering::SeqCst)
    );
    let _ = writeln!(
        text,
        "  shutdown    {} in {shutdown_time:.2?}",
        if shutdown.is_ok() { "Ok".to_string() } else { format!("{shutdown:?}") }
    );
    let _ = writeln!(
        text,
        "  census      fds {} -> {}  threads {} -> {}  children {} -> {}  zombies {} -> {}  (settled in {settle_time:.2?}); workers alive {}/{}",
        baseline.fds,
        after.fds,
        baseline.threads,
        after.threads,
        baseline.children,
        after.children,
        baseline.zombies,
        after.zombies,
        alive.len(),
        started_pids.len()
    );
    for f in &failures {
        let _ = writeln!(text, "  FAILED      {f}");
    }
    let _ = writeln!(text, "  result      {}", if failures.is_empty() { "PASS" } else { "FAIL" });

    let json = json!({
        "phase": phase.name(),
        "calls": calls,
        "seconds": elapsed.as_secs_f64(),
        "calls_per_second": rate,
        "planned": {"echo": t.planned_echo, "raise": t.planned_raise, "crash": t.planned_crash, "hang": t.planned_hang, "race": t.planned_race},
        "outcomes": {
            "echoed": t.echoed, "raised": t.raised, "crashed": t.crashed, "crashed_by_other": t.crashed_by_other,
            "hang_call": t.hang_call, "hang_queue": t.hang_queue,
            "race_ok": t.race_ok, "race_call": t.race_call, "race_queue": t.race_queue, "collateral": t.collateral, "collateral_not_hang": t.collateral_not_hang, "cotenant": t.cotenant,
        },
        "mismatches": t.mismatches,
        "misdelivered": t.misdelivered,
        "late": t.late,
        "stats": stats.as_ref().map(|st| json!({
            "calls_ok": st.calls_ok, "calls_failed": st.calls_failed, "timeouts": st.timeouts,
            "crashes": st.crashes, "restarts": st.restarts, "recycles": st.recycles.total(),
            "recycles_max_requests": st.recycles.max_requests, "events_dropped": st.events_dropped,
        })),
        "shutdown_ok": shutdown.is_ok(),
        "census_before": {"fds": baseline.fds, "threads": baseline.threads, "children": baseline.children, "zombies": baseline.zombies},
        "census_after": {"fds": after.fds, "threads": after.threads, "children": after.children, "zombies": after.zombies},
        "workers_started": started_pids.len(),
        "workers_alive": alive.len(),
        "failures": failures,
    });
    PhaseReport { text, json, failures, tally, elapsed }
}

/// One caller thread: `calls` calls, each planned, made, and checked against its plan.
#[allow(clippy::too_many_arguments)]
fn caller(
    phase: Phase,
    t: usize,
    calls: u64,
    seed: u64,
    hang_seconds: f64,
    pool: &Pool,
    o: &Opts,
    progress: &Progress,
) -> Tally {
    let mut rng = Rng::new(seed);
    let mut tally = Tally::default();
    for i in 0..calls {
        let plan = plan(&mut rng, o);
        let token = format!("{}-{t}-{i}-{:016x}", phase.name(), rng.next());
        let (command, args, deadline) = match &plan {
            Plan::Echo { pad, nap_ms } => {
                tally.planned_echo += 1;
                let args = if *nap_ms > 0 {
                    json!({"token": token, "pad": pad, "nap": *nap_ms as f64 / 1000.0})
                } else {
                    json!({"token": token, "pad": pad})
                };
                ("mirror", args, CALL_DEADLINE)
            }
            Plan::Raise => {
                tally.planned_raise += 1;
                ("fail", json!({ "token": token }), CALL_DEADLINE)
            }
            Plan::Crash { code } => {
                tally.planned_crash += 1;
                ("crash", json!({"token": token, "code": code}), CALL_DEADLINE)
            }
            Plan::Hang => {
                tally.planned_hang += 1;
                ("hang", json!({"token": token, "seconds": hang_seconds}), o.hang_deadline)
            }
            Plan::Race { nap_us, deadline_us } => {
                tally.planned_race += 1;
                let args = json!({"token": token, "pad": "", "nap": *nap_us as f64 / 1e6});
                ("mirror", args, Duration::from_micros(*deadline_us))
            }
        };
        let begun = Instant::now();
        *progress.inflight[t].lock().unwrap() = Some((i, plan.kind(), begun, deadline));
        let result = if deadline == CALL_DEADLINE {
            pool.call(command, args)
        } else {
            pool.call_with(command, args, CallOptions::new().timeout(deadline))
        };
        let took = begun.elapsed();
        *progress.inflight[t].lock().unwrap() = None;
        progress.done.fetch_add(1, Ordering::Relaxed);

        match &result {
            Ok(_) => tally.results_ok += 1,
            Err(e) => {
                tally.results_err += 1;
                if let Error::Timeout { kind, .. } = e {
                    tally.results_timeout += 1;
                    if *kind == TimeoutKind::Queue {
                        tally.results_queue_timeout += 1;
                    }
                }
            }
        }
        let here = format!("{} caller {t} call {i} ({}, token {token})", phase.name(), plan.kind());
        if took > deadline + LATE_SLACK {
            tally.late += 1;
            tally.mismatch(format!("{here}: returned {took:.2?} after it was made, deadline {deadline:?}"));
        }
        match (&plan, &result) {
            (Plan::Echo { pad, .. }, Ok(v)) => {
                if v.get("token").and_then(Value::as_str) == Some(token.as_str())
                    && v.get("pad").and_then(Value::as_str) == Some(pad.as_str())
                    && v.as_object().map_or(0, |m| m.len()) == 2
                {
                    tally.echoed += 1;
                    tally.max_echo_latency = tally.max_echo_latency.max(took);
                } else {
                    if v.get("token").is_some_and(|x| x.as_str() != Some(token.as_str())) {
                        tally.misdelivered += 1;
                    }
                    tally.mismatch(format!("{here}: got {}", brief(&result)));
                }
            }
            (Plan::Raise, Err(Error::Python(e))) if e.error_type == "ValueError" && e.message == token => {
                tally.raised += 1;
            }
            (
                Plan::Crash { code },
                Err(Error::WorkerDied { pid, exit, stderr, collateral, killed_by, .. }),
            ) => {
                let own_exit = *exit == ExitKind::Code(*code) && killed_by.is_none();
                let own_stderr = stderr.iter().any(|l| l.contains(&token));
                if !phase.threaded() {
                    if !*collateral && own_exit && own_stderr {
                        tally.crashed += 1;
                    } else {
                        tally.mismatch(format!(
                            "{here}: WorkerDied pid {pid} {exit:?} (expected exit code {code}), collateral {collateral}, killed_by {killed_by:?}, own stderr line {}: {stderr:?}",
                            if own_stderr { "present" } else { "MISSING" }
                        ));
                    }
                } else if *collateral {
                    if phase == Phase::ThreadKill {
                        tally.collateral += 1;
                        tally.collateral_not_hang += 1;
                    } else {
                        tally.mismatch(format!(
                            "{here}: collateral WorkerDied without kill_on_timeout: {}",
                            brief(&result)
                        ));
                    }
                } else if killed_by.is_some() {
                    tally.mismatch(format!(
                        "{here}: not collateral, but killed by the pool: {}",
                        brief(&result)
                    ));
                } else {
                    tally.crashed += 1;
                    tally.crash_pids.push(*pid);
                    if !own_exit {
                        tally.crashed_by_other += 1;
                    }
                }
            }
            (Plan::Hang, Err(Error::Timeout { kind: TimeoutKind::Call, .. })) => tally.hang_call += 1,
            (Plan::Hang, Err(Error::Timeout { kind: TimeoutKind::Queue, .. })) => tally.hang_queue += 1,
            (Plan::Race { .. }, Ok(v)) => {
                if v.get("token").and_then(Value::as_str) == Some(token.as_str())
                    && v.get("pad").and_then(Value::as_str) == Some("")
                    && v.as_object().map_or(0, |m| m.len()) == 2
                {
                    tally.race_ok += 1;
                } else {
                    if v.get("token").is_some_and(|x| x.as_str() != Some(token.as_str())) {
                        tally.misdelivered += 1;
                    }
                    tally.mismatch(format!("{here}: got {}", brief(&result)));
                }
            }
            (Plan::Race { .. }, Err(Error::Timeout { kind: TimeoutKind::Call, .. })) => tally.race_call += 1,
            (Plan::Race { .. }, Err(Error::Timeout { kind: TimeoutKind::Queue, .. })) => {
                tally.race_queue += 1
            }
            (_, Err(Error::WorkerDied { collateral: true, killed_by, .. })) if phase == Phase::ThreadKill => {
                if *killed_by != Some(KilledBy::CallTimeout) {
                    tally.mismatch(format!(
                        "{here}: collateral, but not killed for a time-out: {}",
                        brief(&result)
                    ));
                }
                tally.collateral += 1;
                if !matches!(plan, Plan::Hang) {
                    tally.collateral_not_hang += 1;
                }
            }
            (_, Err(Error::WorkerDied { collateral: false, pid, killed_by: None, .. }))
                if phase.threaded() =>
            {
                tally.cotenant += 1;
                tally.cotenant_pids.push(*pid);
            }
            _ => tally.mismatch(format!("{here}: got {}", brief(&result))),
        }
    }
    tally
}

// ---------------------------------------------------------------------------------------------

fn adapter_dir() -> PathBuf {
    std::env::temp_dir().join(format!("snakepit-soak-{}", std::process::id()))
}

fn write_adapter() -> std::io::Result<PathBuf> {
    let dir = adapter_dir();
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("soak_adapter.py"), ADAPTER)?;
    Ok(dir)
}

fn main() {
    env_logger::init();
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("soak: {e}");
            }
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    };
    let adapter_dir = match write_adapter() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("soak: cannot write the adapter: {e}");
            std::process::exit(1);
        }
    };
    let progress = Arc::new(Progress {
        started: Instant::now(),
        phase: Mutex::new("starting".into()),
        done: AtomicU64::new(0),
        phase_calls: AtomicU64::new(0),
        inflight: (0..o.threads).map(|_| Mutex::new(None)).collect(),
        finished: AtomicBool::new(false),
    });
    let dog = {
        let p = progress.clone();
        let (budget, every) = (o.budget, o.progress);
        std::thread::Builder::new().name("soak-watchdog".into()).spawn(move || watchdog(p, budget, every))
    };
    if let Err(e) = dog {
        eprintln!("soak: cannot start the watchdog: {e}");
        std::process::exit(1);
    }
    // Taken with the watchdog running and before any pool exists: what must be back after each.
    let baseline = census();
    println!(
        "soak: {} calls from {} threads, phases {}, seed {:#x}, faults: raise {} ppm, crash {} ppm, hang {} ppm (deadline {:?}), race {} ppm; budget {:?}",
        o.calls,
        o.threads,
        o.phases.iter().map(|p| p.name()).collect::<Vec<_>>().join(","),
        o.seed,
        o.error_ppm,
        o.crash_ppm,
        o.hang_ppm,
        o.hang_deadline,
        o.race_ppm,
        o.budget
    );

    let weights: u64 = o.phases.iter().map(|p| p.weight()).sum();
    let mut left = o.calls;
    let mut reports = Vec::new();
    for (k, &phase) in o.phases.iter().enumerate() {
        let calls = if k + 1 == o.phases.len() { left } else { o.calls * phase.weight() / weights };
        left -= calls;
        if calls == 0 {
            continue;
        }
        let report = run_phase(phase, calls, &o, &adapter_dir, &progress, baseline);
        print!("{}", report.text);
        reports.push(report);
    }
    progress.finished.store(true, Ordering::SeqCst);
    let _ = std::fs::remove_dir_all(&adapter_dir);

    let mut all = Tally::default();
    let mut seconds = 0.0;
    let mut failures = 0;
    for r in &reports {
        all.add(r.tally.clone());
        seconds += r.elapsed.as_secs_f64();
        failures += r.failures.len();
    }
    let last = census();
    let pass = failures == 0;
    println!(
        "soak: {} calls in {seconds:.1} s of calling = {:.0} calls/s; echoed {} raised {} crashed {} hang timeouts {}+{} (call+queue) races ok/call/queue {}/{}/{} collateral {} co-tenant {}; mismatches {} (misdelivered {}, late {}); census fds {} -> {} threads {} -> {} children {} -> {}; {} in {:.1} s",
        all.total(),
        all.total() as f64 / seconds.max(1e-9),
        all.echoed,
        all.raised,
        all.crashed,
        all.hang_call,
        all.hang_queue,
        all.race_ok,
        all.race_call,
        all.race_queue,
        all.collateral,
        all.cotenant,
        all.mismatches,
        all.misdelivered,
        all.late,
        baseline.fds,
        last.fds,
        baseline.threads,
        last.threads,
        baseline.children,
        last.children,
        if pass { "PASS" } else { "FAIL" },
        progress.started.elapsed().as_secs_f64()
    );
    let summary = json!({
        "pass": pass,
        "calls": all.total(),
        "mismatches": all.mismatches,
        "misdelivered": all.misdelivered,
        "phases": reports.iter().map(|r| r.json.clone()).collect::<Vec<_>>(),
    });
    println!("soak-json: {summary}");
    std::process::exit(if pass { 0 } else { 1 });
}
