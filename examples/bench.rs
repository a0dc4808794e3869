//! The benchmark, measured in one run: `cargo run --release --example bench`.
//!
//! Every figure is set beside a baseline measured in the same run, because absolute numbers
//! drift from machine to machine: a raw echo loop over pipes written without the library (the
//! floor), bare interpreter starts, and the pools a Python user would pick instead
//! (`concurrent.futures`, `multiprocessing`, a fresh `subprocess` per call). Each measurement is
//! warmed up, then taken several times; the table shows the median with min..max, the ratio to
//! the baseline, the target and whether it is met. The whole run takes about 70 s on 2 cores.
//!
//! The interpreter is `$SNAKEPIT_PYTHON`, else `python3` on `PATH`, resolved once to the real
//! executable (a pyenv shim would add ~50 ms to every raw start). `RUST_LOG=debug` shows the
//! library's own logging.

use std::collections::BTreeMap;
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::bounded;
use serde::Serialize;
use serde_json::{json, Value};
use snakepit::{Pool, Profile};

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

/// Timed runs per measurement (after warm-up); the median is reported.
const RUNS: usize = 5;
/// Sequential calls per latency run, and the calls warming each side up first.
const LATENCY_CALLS: usize = 10_000;
const LATENCY_WARMUP: usize = 2_000;
/// Length of one throughput run, and of the warm-up before the first.
const THROUGHPUT_RUN: Duration = Duration::from_secs(2);
const THROUGHPUT_WARMUP: Duration = Duration::from_millis(500);
/// Callers driving the 2-worker pool.
const CALLERS: usize = 8;
/// The large payload (bytes of one JSON string) and the round trips per run.
const PAYLOAD_BYTES: usize = 1_000_000;
const PAYLOAD_CALLS: usize = 40;
/// Pool sizes whose start-up is timed.
const START_SIZES: [usize; 2] = [4, 8];
/// Peer script settings: tasks per throughput run, calls per latency run, interpreters per
/// `subprocess` run.
const PEER_TASKS: usize = 10_000;
const PEER_CALLS: usize = 2_000;
const PEER_SPAWNS: usize = 20;
/// Bounds: the peer script, one child's exit, and the whole bench (then it exits; the pools'
/// workers die with it and the raw loops read EOF).
const PEER_TIMEOUT: Duration = Duration::from_secs(150);
const EXIT_WAIT: Duration = Duration::from_secs(5);
const BUDGET: Duration = Duration::from_secs(360);

/// The raw floor's worker: 4-byte big-endian length + JSON in, the same out, nothing else.
const ECHO_LOOP: &str = r#"
import json, os, struct
H = struct.Struct(">I")
rd = os.fdopen(0, "rb", 65536)
while True:
    h = rd.read(4)
    if len(h) < 4:
        break
    msg = json.loads(rd.read(H.unpack(h)[0]))
    data = json.dumps({"type": "result", "id": msg["id"], "value": msg["args"]}).encode()
    view = memoryview(H.pack(len(data)) + data)
    while view:
        view = view[os.write(1, view):]
"#;

/// What starting an interpreter costs at the least: start, write one byte, flush.
const BARE_START: &str = "import sys; sys.stdout.write('x'); sys.stdout.flush()";

/// The peers, as a Python user would write them. The task is `dict(x=1)`: an echo of the same
/// tiny arguments, and a builtin, so it pickles under any start method. Prints one JSON object.
const PEERS: &str = r#"
import concurrent.futures as cf
import json, multiprocessing as mp, subprocess, sys, time

def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]

def latency(call, n):
    xs = []
    for _ in range(n):
        t = time.perf_counter()
        assert call() == {"x": 1}
        xs.append(time.perf_counter() - t)
    return pct(xs, 0.5), pct(xs, 0.99)

def rate(submit_all, n):
    t = time.perf_counter()
    for f in submit_all(n):
        assert f() == {"x": 1}
    return n / (time.perf_counter() - t)

def measure(one, many, cfg):
    out = {"tput": [], "p50": [], "p99": []}
    for _ in range(cfg["warmup"]):
        one()
    rate(many, cfg["tasks"] // 4)
    for _ in range(cfg["runs"]):
        out["tput"].append(rate(many, cfg["tasks"]))
        p50, p99 = latency(one, cfg["calls"])
        out["p50"].append(p50)
        out["p99"].append(p99)
    return out

def main():
    cfg = json.loads(sys.argv[1])
    out = {"start_method": mp.get_start_method()}
    with cf.ProcessPoolExecutor(2) as ex:
        out["ppe"] = measure(
            lambda: ex.submit(dict, x=1).result(),
            lambda n: [f.result for f in [ex.submit(dict, x=1) for _ in range(n)]],
            cfg,
        )
    with mp.Pool(2) as pool:
        out["mp"] = measure(
            lambda: pool.apply(dict, (), {"x": 1}),
            lambda n: [r.get for r in [pool.apply_async(dict, (), {"x": 1}) for _ in range(n)]],
            cfg,
        )
    fresh = [sys.executable, "-c", "pass"]
    for _ in range(2):
        subprocess.run(fresh, check=True)
    out["fresh"] = []
    for _ in range(cfg["runs"]):
        t = time.perf_counter()
        for _ in range(cfg["spawns"]):
            subprocess.run(fresh, check=True)
        out["fresh"].append((time.perf_counter() - t) / cfg["spawns"])
    print(json.dumps(out))

if __name__ == "__main__":
    main()
"#;

fn main() -> BoxResult<()> {
    env_logger::init();
    start_watchdog(BUDGET)?;
    let began = Instant::now();
    let host = Host::probe()?;
    println!("# snakepit benchmark\n");
    println!(
        "{} · {} CPUs (nproc), {} · Linux {} · Python {} ({}) · snakepit {} · each figure: warm-up, \
         then {RUNS} runs, median (min..max)\n",
        host.date,
        host.cpus,
        host.cpu_model,
        host.kernel,
        host.python_version,
        host.python.display(),
        env!("CARGO_PKG_VERSION"),
    );
    let py = host.python.as_path();
    let mut figs = Figures::default();
    eprintln!("bench: a1/b1 sequential latency and the 1 MB echo ...");
    sequential(py, &mut figs)?;
    eprintln!("bench: a2/b2 throughput ...");
    throughput(py, &mut figs)?;
    eprintln!("bench: e thread profile ...");
    thread_profile(py, &mut figs)?;
    eprintln!("bench: d recycling ...");
    recycling(&mut figs)?;
    eprintln!("bench: b3 start-up ...");
    startup(py, &mut figs)?;
    eprintln!("bench: c peers (concurrent.futures, multiprocessing, subprocess) ...");
    peers(py, &mut figs)?;

    print!("{}", table(&rows(&figs)));
    println!("\n## How each figure was taken\n");
    for m in figs.all.values() {
        println!("- **{}** {}: {}. {}", m.key, m.label, show(m.spread, m.unit), m.how);
    }
    for note in &figs.notes {
        println!("- {note}");
    }
    println!("\ntotal bench time {:.1} s", began.elapsed().as_secs_f64());
    Ok(())
}

// ---- the table ---------------------------------------------------------------------------------

/// The table's rows: each library figure against the baselines it is judged by. Add rows here.
fn rows(f: &Figures) -> Vec<Row> {
    vec![
        Row::new(
            "b1 1 caller → pool(1), tiny echo, p50",
            f.get("b1.p50"),
            f.get("a1.p50"),
            Some(Target::AtMost(1.5)),
        ),
        Row::new("b1 1 caller → pool(1), tiny echo, p99", f.get("b1.p99"), f.get("a1.p99"), None),
        Row::new("b1 p50 vs ProcessPoolExecutor one at a time", f.get("b1.p50"), f.get("c1.p50"), None),
        Row::new("b1 p50 vs multiprocessing.Pool.apply", f.get("b1.p50"), f.get("c2.p50"), None),
        Row::new("b1 mean vs a fresh interpreter per call", f.get("b1.mean"), f.get("c3.mean"), None),
        Row::new(
            "b2 8 callers → pool(2), tiny echo",
            f.get("b2.tput"),
            f.get("c2.tput"),
            Some(Target::AtLeast(3.0)),
        ),
        Row::new(
            "b2 8 callers → pool(2), tiny echo",
            f.get("b2.tput"),
            f.get("a2.tput"),
            Some(Target::AtLeast(0.5)),
        ),
        Row::new("b2 vs ProcessPoolExecutor(2)", f.get("b2.tput"), f.get("c1.tput"), None),
        Row::new("b3 start-up, size(4).build()", f.get("b3.start4"), f.get("b3.bare4"), None),
        Row::new(
            "b3 start-up, size(8).build()",
            f.get("b3.start8"),
            f.get("b3.bare8"),
            Some(Target::AtMost(1.3)),
        ),
        Row::new("1 MB echo through pool(1)", f.get("b1.1mb"), f.get("a1.1mb"), None),
        Row::new(
            "e1 thread worker, 32 in flight",
            f.get("e1.pool"),
            f.get("e1.raw"),
            Some(Target::AtLeast(0.5)),
        ),
        Row::new("e2 I/O-bound (10 ms): thread vs process", f.get("e2.thread"), f.get("e2.process"), None),
        Row::new(
            "d1 max_requests(100), tiny echo, pool(2)",
            f.get("d1.on"),
            f.get("d1.off"),
            Some(Target::AtLeast(0.9)),
        ),
        Row::new(
            "d2 max_requests(100), 2 ms calls, pool(2)",
            f.get("d2.on"),
            f.get("d2.off"),
            Some(Target::AtLeast(0.9)),
        ),
    ]
}

/// What a ratio (figure / baseline) must be.
#[derive(Clone, Copy)]
enum Target {
    AtMost(f64),
    AtLeast(f64),
}

struct Row {
    what: String,
    figure: String,
    baseline: String,
    ratio: f64,
    target: Option<Target>,
}

impl Row {
    fn new(what: &str, figure: &Measure, baseline: &Measure, target: Option<Target>) -> Row {
        Row {
            what: what.to_string(),
            figure: show(figure.spread, figure.unit),
            baseline: format!(
                "{} {}: {}",
                baseline.key,
                baseline.label,
                show(baseline.spread, baseline.unit)
            ),
            ratio: figure.spread.median / baseline.spread.median,
            target,
        }
    }
}

/// Renders rows as a markdown table.
fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| what | figure | baseline (same run) | ratio | target | met? |\n|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let (target, met) = match r.target {
            None => ("—".to_string(), "—"),
            Some(Target::AtMost(t)) => (format!("≤ {t}x"), if r.ratio <= t { "yes" } else { "**no**" }),
            Some(Target::AtLeast(t)) => (format!("≥ {t}x"), if r.ratio >= t { "yes" } else { "**no**" }),
        };
        let ratio = if r.ratio < 0.01 { format!("{:.4}x", r.ratio) } else { format!("{:.2}x", r.ratio) };
        out += &format!("| {} | {} | {} | {ratio} | {target} | {met} |\n", r.what, r.figure, r.baseline);
    }
    out
}

// ---- figures -----------------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum Unit {
    Time,
    Rate,
    MBps,
}

#[derive(Clone, Copy)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

fn spread(xs: &[f64]) -> Spread {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    Spread { median: v[v.len() / 2], min: v[0], max: v[v.len() - 1] }
}

fn show(s: Spread, unit: Unit) -> String {
    let (scale, suffix, digits) = match unit {
        Unit::Time if s.median < 1e-3 => (1e6, " µs", 1),
        Unit::Time if s.median < 1.0 => (1e3, " ms", 1),
        Unit::Time => (1.0, " s", 2),
        Unit::Rate => (1e-3, "k/s", 1),
        Unit::MBps => (1.0, " MB/s", 0),
    };
    let (m, lo, hi) = (s.median * scale, s.min * scale, s.max * scale);
    format!("{m:.digits$}{suffix} ({lo:.digits$}..{hi:.digits$})")
}

/// One measurement: its runs summarised, and how it was taken.
struct Measure {
    key: &'static str,
    label: String,
    spread: Spread,
    unit: Unit,
    how: String,
}

#[derive(Default)]
struct Figures {
    all: BTreeMap<&'static str, Measure>,
    notes: Vec<String>,
}

impl Figures {
    fn add(&mut self, key: &'static str, label: &str, runs: &[f64], unit: Unit, how: impl Into<String>) {
        let m = Measure { key, label: label.to_string(), spread: spread(runs), unit, how: how.into() };
        self.all.insert(key, m);
    }

    fn get(&self, key: &str) -> &Measure {
        self.all.get(key).unwrap_or_else(|| panic!("no figure {key}"))
    }
}

/// p50, p99 and mean of one run's latencies, in seconds.
fn percentiles(mut xs: Vec<f64>) -> (f64, f64, f64) {
    xs.sort_by(f64::total_cmp);
    let at = |q: f64| xs[((q * xs.len() as f64) as usize).min(xs.len() - 1)];
    (at(0.5), at(0.99), xs.iter().sum::<f64>() / xs.len() as f64)
}

/// Times `n` sequential calls of `f`, one sample each.
fn time_calls(n: usize, mut f: impl FnMut() -> BoxResult<()>) -> BoxResult<Vec<f64>> {
    let mut xs = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f()?;
        xs.push(t.elapsed().as_secs_f64());
    }
    Ok(xs)
}

// ---- a1/b1: one sequential caller; the 1 MB payload --------------------------------------------

fn sequential(py: &Path, figs: &mut Figures) -> BoxResult<()> {
    let mut raw = RawEcho::spawn(py)?;
    let pool = Pool::builder().name("bench-b1").size(1).build()?;
    let tiny = json!({"x": 1});
    let echoed = pool.call("echo", tiny.clone())?;
    if echoed != tiny || raw.call(&tiny)? != tiny {
        return Err(format!("echo returned {echoed}, expected {tiny}").into());
    }
    for _ in 0..LATENCY_WARMUP {
        raw.call(&tiny)?;
        pool.call("echo", json!({"x": 1}))?;
    }
    let (raw_pids, pool_pids) = ([raw.child.id()], worker_pids(&pool)?);
    let (mut cpu_a, mut cpu_b) = (CpuTally::default(), CpuTally::default());
    // Interleaved (A B A B) so that drift hits both sides alike.
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        let before = Cpu::now(&raw_pids);
        a.push(percentiles(time_calls(LATENCY_CALLS, || raw.call(&tiny).map(drop))?));
        cpu_a.add(before, &raw_pids, LATENCY_CALLS as u64);
        let before = Cpu::now(&pool_pids);
        b.push(percentiles(time_calls(LATENCY_CALLS, || {
            pool.call("echo", json!({"x": 1})).map(drop).map_err(Into::into)
        })?));
        cpu_b.add(before, &pool_pids, LATENCY_CALLS as u64);
    }
    let how_a = format!(
        "Raw floor, no library: one `python -c` echo loop (4-byte length + JSON in, `json.loads`, \
         `json.dumps`, length + JSON out), one Rust thread writing the frame and reading the reply \
         on the same pipes; serde_json on the Rust side as in the library; {RUNS} runs of \
         {LATENCY_CALLS} calls after {LATENCY_WARMUP}, each call timed, percentile per run"
    );
    let how_b = "`Pool::builder().size(1).build()`, no adapter, one thread calling \
                 `pool.call(\"echo\", json!({\"x\": 1}))`; runs interleaved with a1, same counts";
    let col =
        |v: &[(f64, f64, f64)], i: usize| -> Vec<f64> { v.iter().map(|t| [t.0, t.1, t.2][i]).collect() };
    figs.add("a1.p50", "raw loop, 1 caller, p50", &col(&a, 0), Unit::Time, how_a.clone());
    figs.add("a1.p99", "raw loop, 1 caller, p99", &col(&a, 1), Unit::Time, "Same runs as a1 p50");
    figs.add("b1.p50", "pool(1), 1 caller, p50", &col(&b, 0), Unit::Time, how_b);
    figs.add("b1.p99", "pool(1), 1 caller, p99", &col(&b, 1), Unit::Time, "Same runs as b1 p50");
    figs.add("b1.mean", "pool(1), 1 caller, mean", &col(&b, 2), Unit::Time, "Same runs as b1 p50");
    let stats = pool.stats()?;
    figs.notes.push(format!(
        "b1 inside the pool (its own stats, last {} calls): queue wait (the caller's send → the \
         dispatcher writes the frame into the worker's pipe) p50 {} µs; execution (→ the reply \
         is back at the dispatcher, after the stdout reader handed it to the caller) p50 {} µs, \
         p99 {} µs, against a whole raw round trip (a1) of {:.0} µs; b1 in all: {:.0} µs.",
        stats.execution.samples,
        stats.queue_wait.p50_us,
        stats.execution.p50_us,
        stats.execution.p99_us,
        figs.get("a1.p50").spread.median * 1e6,
        figs.get("b1.p50").spread.median * 1e6,
    ));
    figs.notes.push(format!(
        "CPU per call over the timed runs (utime + stime from /proc, 10 ms ticks): a1 raw {}; b1 pool {}.",
        cpu_a.per_call(),
        cpu_b.per_call()
    ));

    // The 1 MB payload: the same two workers, one string of PAYLOAD_BYTES ASCII characters.
    let text: String = (0..PAYLOAD_BYTES).map(|i| (b'a' + (i % 26) as u8) as char).collect();
    let big = json!({ "data": text });
    let back = pool.call("echo", big.clone())?;
    if back != big || raw.call(&big)? != big {
        return Err("the 1 MB payload did not come back intact".into());
    }
    for _ in 0..3 {
        raw.call(&big)?;
        pool.call("echo", big.clone())?;
    }
    let (mut a, mut b) = (Vec::new(), Vec::new());
    let mbps = |xs: Vec<f64>| PAYLOAD_BYTES as f64 * xs.len() as f64 / xs.iter().sum::<f64>() / 1e6;
    for _ in 0..RUNS {
        a.push(mbps(time_calls(PAYLOAD_CALLS, || raw.call(&big).map(drop))?));
        // The clone is the caller's: `call` takes its arguments by value. Timed, as a user pays it.
        b.push(mbps(time_calls(PAYLOAD_CALLS, || {
            pool.call("echo", big.clone()).map(drop).map_err(Into::into)
        })?));
    }
    let how = format!(
        "{PAYLOAD_BYTES}-byte JSON string echoed, one sequential caller, MB/s = payload bytes / \
         round-trip time; {RUNS} interleaved runs of {PAYLOAD_CALLS} calls after 3"
    );
    figs.add("a1.1mb", "raw loop, 1 MB echo", &a, Unit::MBps, format!("{how}; same raw loop as a1"));
    figs.add(
        "b1.1mb",
        "pool(1), 1 MB echo",
        &b,
        Unit::MBps,
        format!("{how}; same pool as b1, including `big.clone()` per call"),
    );
    pool.shutdown()?;
    Ok(())
}

// ---- a2/b2: throughput with 2 workers -----------------------------------------------------------

fn throughput(py: &Path, figs: &mut Figures) -> BoxResult<()> {
    let mut raws = [RawEcho::spawn(py)?, RawEcho::spawn(py)?];
    let pool = Pool::builder().name("bench-b2").size(2).build()?;
    raw_rate(&mut raws, THROUGHPUT_WARMUP)?;
    pool_rate(&pool, THROUGHPUT_WARMUP, &ECHO)?;
    let raw_pids: Vec<u32> = raws.iter().map(|r| r.child.id()).collect();
    let pool_pids = worker_pids(&pool)?;
    let (mut cpu_a, mut cpu_b) = (CpuTally::default(), CpuTally::default());
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        let before = Cpu::now(&raw_pids);
        let (calls, secs) = raw_rate(&mut raws, THROUGHPUT_RUN)?;
        cpu_a.add(before, &raw_pids, calls);
        a.push(calls as f64 / secs);
        let before = Cpu::now(&pool_pids);
        let (calls, secs) = pool_rate(&pool, THROUGHPUT_RUN, &ECHO)?;
        cpu_b.add(before, &pool_pids, calls);
        b.push(calls as f64 / secs);
    }
    let secs = THROUGHPUT_RUN.as_secs_f64();
    figs.add(
        "a2.tput",
        "raw loops ×2, 1 sequential thread each",
        &a,
        Unit::Rate,
        format!(
            "Two raw echo loops (as a1), one Rust thread each calling back to back; round trips / \
             wall time over {secs} s; {RUNS} runs interleaved with b2 after a {:.1} s warm-up",
            THROUGHPUT_WARMUP.as_secs_f64()
        ),
    );
    figs.add(
        "b2.tput",
        "pool(2), 8 caller threads",
        &b,
        Unit::Rate,
        format!(
            "`size(2)` pool, {CALLERS} scoped threads each calling `echo` {{\"x\": 1}} back to back; \
             calls / wall time over {secs} s (until the last caller returns)"
        ),
    );
    let stats = pool.stats()?;
    figs.notes.push(format!(
        "b2 inside the pool (last {} calls): queue wait p50 {} µs, execution p50 {} µs / p99 {} µs, \
         queue high water {}.",
        stats.execution.samples,
        stats.queue_wait.p50_us,
        stats.execution.p50_us,
        stats.execution.p99_us,
        stats.queue_high_water
    ));
    figs.notes.push(format!(
        "CPU per call over the timed runs ({} CPUs): a2 raw {}; b2 pool {}.",
        thread::available_parallelism().map_or(1, |n| n.get()),
        cpu_a.per_call(),
        cpu_b.per_call()
    ));
    pool.shutdown()?;
    Ok(())
}

/// Round trips through the raw loops, one thread per loop, for `run`: (calls, seconds).
fn raw_rate(raws: &mut [RawEcho], run: Duration) -> BoxResult<(u64, f64)> {
    let start = Instant::now();
    let end = start + run;
    let tiny = json!({"x": 1});
    let counts: Vec<Result<u64, String>> = thread::scope(|s| {
        let handles: Vec<_> = raws
            .iter_mut()
            .map(|raw| {
                let tiny = &tiny;
                s.spawn(move || {
                    let mut n = 0u64;
                    while Instant::now() < end {
                        raw.call(tiny).map_err(|e| e.to_string())?;
                        n += 1;
                    }
                    Ok(n)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("raw caller panicked".into()))).collect()
    });
    let elapsed = start.elapsed().as_secs_f64();
    let total: u64 = counts.into_iter().collect::<Result<Vec<u64>, String>>()?.iter().sum();
    Ok((total, elapsed))
}

/// A command and its arguments, for [`pool_rate`].
struct Work {
    command: &'static str,
    args: fn() -> serde_json::Value,
}

const ECHO: Work = Work { command: "echo", args: || json!({"x": 1}) };
/// The demo adapter's `slow`: 2 ms of sleep per call, an I/O-ish workload.
const SLOW_2MS: Work = Work { command: "slow", args: || json!({"seconds": 0.002}) };

/// Calls `work` through `pool` from [`CALLERS`] threads, for `run`: (calls, seconds). Any
/// failed call fails the bench.
fn pool_rate(pool: &Pool, run: Duration, work: &Work) -> BoxResult<(u64, f64)> {
    callers_rate(pool, CALLERS, run, work)
}

/// Calls `work` through `pool` from `callers` threads, for `run`: (calls, seconds).
fn callers_rate(pool: &Pool, callers: usize, run: Duration, work: &Work) -> BoxResult<(u64, f64)> {
    let start = Instant::now();
    let end = start + run;
    let counts: Vec<Result<u64, String>> = thread::scope(|s| {
        let handles: Vec<_> = (0..callers)
            .map(|_| {
                s.spawn(move || {
                    let mut n = 0u64;
                    while Instant::now() < end {
                        pool.call(work.command, (work.args)()).map_err(|e| e.to_string())?;
                        n += 1;
                    }
                    Ok(n)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("pool caller panicked".into()))).collect()
    });
    let elapsed = start.elapsed().as_secs_f64();
    let total: u64 = counts.into_iter().collect::<Result<Vec<u64>, String>>()?.iter().sum();
    Ok((total, elapsed))
}

// ---- e: the thread profile -----------------------------------------------------------------------

/// Requests kept in flight for the pipelined figures.
const IN_FLIGHT: usize = 32;

/// e1: one thread-profile worker with 32 calls in flight vs a raw loop fed 32 at a time;
/// e2: an I/O-bound workload (10 ms sleeps) on one thread worker with 16 threads vs 2 process
/// workers, with each side's memory.
fn thread_profile(py: &Path, figs: &mut Figures) -> BoxResult<()> {
    let mut raw = RawEcho::spawn(py)?;
    let pool = Pool::builder()
        .name("bench-e1")
        .size(1)
        .profile(Profile::Thread)
        .threads_per_worker(IN_FLIGHT)
        .build()?;
    raw_pipelined(&mut raw, THROUGHPUT_WARMUP)?;
    callers_rate(&pool, IN_FLIGHT, THROUGHPUT_WARMUP, &ECHO)?;
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        a.push(raw_pipelined(&mut raw, THROUGHPUT_RUN)?);
        let (calls, secs) = callers_rate(&pool, IN_FLIGHT, THROUGHPUT_RUN, &ECHO)?;
        b.push(calls as f64 / secs);
    }
    pool.shutdown()?;
    figs.add(
        "e1.raw",
        "raw loop, 32 requests in flight",
        &a,
        Unit::Rate,
        "One raw echo loop (as a1); a Rust writer thread keeps 32 requests in flight while a reader \
         thread takes the replies",
    );
    figs.add(
        "e1.pool",
        "thread profile, 1 worker × 32 threads, 32 callers",
        &b,
        Unit::Rate,
        "`size(1).profile(Thread).threads_per_worker(32)`, 32 caller threads calling `echo`",
    );

    let io = Work { command: "slow", args: || json!({"seconds": 0.01}) };
    let threads = Pool::builder()
        .name("bench-e2-t")
        .size(1)
        .adapter("snakepit.demo")
        .profile(Profile::Thread)
        .threads_per_worker(16)
        .build()?;
    let procs = Pool::builder().name("bench-e2-p").size(2).adapter("snakepit.demo").build()?;
    callers_rate(&threads, 16, THROUGHPUT_WARMUP, &io)?;
    callers_rate(&procs, 16, THROUGHPUT_WARMUP, &io)?;
    let (mut t, mut p) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        let (calls, secs) = callers_rate(&threads, 16, THROUGHPUT_RUN, &io)?;
        t.push(calls as f64 / secs);
        let (calls, secs) = callers_rate(&procs, 16, THROUGHPUT_RUN, &io)?;
        p.push(calls as f64 / secs);
    }
    let rss = |pool: &Pool| -> BoxResult<u64> {
        Ok(pool.stats()?.workers.iter().filter_map(|w| w.rss_bytes).sum::<u64>() >> 20)
    };
    let (rss_t, rss_p) = (rss(&threads)?, rss(&procs)?);
    threads.shutdown()?;
    procs.shutdown()?;
    figs.add(
        "e2.thread",
        &format!("1 thread worker × 16 threads, 10 ms calls ({rss_t} MiB RSS)"),
        &t,
        Unit::Rate,
        format!("16 caller threads calling the demo's `slow(0.01)`; workers' RSS {rss_t} MiB"),
    );
    figs.add(
        "e2.process",
        &format!("2 process workers, 10 ms calls ({rss_p} MiB RSS)"),
        &p,
        Unit::Rate,
        format!("the same 16 callers on a `size(2)` process pool; workers' RSS {rss_p} MiB"),
    );
    Ok(())
}

/// Round trips through one raw loop with [`IN_FLIGHT`] requests outstanding, for `run`.
fn raw_pipelined(raw: &mut RawEcho, run: Duration) -> BoxResult<f64> {
    let frame = |id: u64| -> Vec<u8> {
        let body =
            serde_json::to_vec(&json!({"type": "call", "id": id, "command": "echo", "args": {"x": 1}}))
                .expect("serialisable");
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(&body);
        f
    };
    let (tokens, returned) = bounded::<()>(IN_FLIGHT);
    let stdin = raw.stdin.as_mut().ok_or("stdin is closed")?;
    let stdout = &mut raw.stdout;
    let start = Instant::now();
    let end = start + run;
    let (sent, got) = thread::scope(|s| -> BoxResult<(u64, u64)> {
        let writer = s.spawn(move || -> Result<u64, String> {
            let mut id = 0u64;
            while Instant::now() < end {
                tokens.send(()).map_err(|e| e.to_string())?;
                id += 1;
                stdin.write_all(&frame(id)).map_err(|e| e.to_string())?;
            }
            Ok(id)
        });
        let reader = s.spawn(move || -> Result<u64, String> {
            let mut n = 0u64;
            let mut buf = Vec::new();
            loop {
                match returned.recv_timeout(Duration::from_millis(200)) {
                    Ok(()) => {}
                    Err(_) if Instant::now() >= end => return Ok(n),
                    Err(_) => continue,
                }
                let mut header = [0u8; 4];
                stdout.read_exact(&mut header).map_err(|e| e.to_string())?;
                buf.resize(u32::from_be_bytes(header) as usize, 0);
                stdout.read_exact(&mut buf).map_err(|e| e.to_string())?;
                let _: Value = serde_json::from_slice(&buf).map_err(|e| e.to_string())?;
                n += 1;
            }
        });
        let sent = writer.join().map_err(|_| "writer panicked")??;
        let got = reader.join().map_err(|_| "reader panicked")??;
        Ok((sent, got))
    })?;
    if sent != got {
        return Err(format!("raw pipelined loop: sent {sent}, got {got}").into());
    }
    Ok(got as f64 / start.elapsed().as_secs_f64())
}

// ---- d: recycling ------------------------------------------------------------------------------

/// Throughput with `max_requests(100)` against the same pool without recycling, A B A B, for a
/// tiny echo and for 2 ms calls.
fn recycling(figs: &mut Figures) -> BoxResult<()> {
    for (key, work, label) in [("d1", &ECHO, "tiny echo"), ("d2", &SLOW_2MS, "2 ms calls")] {
        let plain = Pool::builder().name("bench-d-off").size(2).adapter("snakepit.demo").build()?;
        let recycled =
            Pool::builder().name("bench-d-on").size(2).adapter("snakepit.demo").max_requests(100).build()?;
        pool_rate(&plain, THROUGHPUT_WARMUP, work)?;
        pool_rate(&recycled, THROUGHPUT_WARMUP, work)?;
        let (mut off, mut on) = (Vec::new(), Vec::new());
        for _ in 0..RUNS {
            let (calls, secs) = pool_rate(&plain, THROUGHPUT_RUN, work)?;
            off.push(calls as f64 / secs);
            let (calls, secs) = pool_rate(&recycled, THROUGHPUT_RUN, work)?;
            on.push(calls as f64 / secs);
        }
        let stats = recycled.stats()?;
        let how = format!(
            "`size(2)` pool on `snakepit.demo`, {CALLERS} caller threads, {label}; runs alternate with \
             the other pool; {} recycles, {} failed calls in all",
            stats.recycles.max_requests, stats.calls_failed
        );
        let (k_off, k_on): (&'static str, &'static str) =
            if key == "d1" { ("d1.off", "d1.on") } else { ("d2.off", "d2.on") };
        figs.add(k_off, &format!("no recycling, {label}"), &off, Unit::Rate, how.clone());
        figs.add(k_on, &format!("max_requests(100), {label}"), &on, Unit::Rate, how);
        plain.shutdown()?;
        recycled.shutdown()?;
    }
    Ok(())
}

// ---- b3: start-up ------------------------------------------------------------------------------

fn startup(py: &Path, figs: &mut Figures) -> BoxResult<()> {
    // The library resolves `python3` and writes its package once per process: not timed.
    build_time(START_SIZES[0])?;
    bare_starts(py, START_SIZES[0])?;
    let mut lib: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    let mut bare: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    for _ in 0..RUNS {
        for n in START_SIZES {
            lib.entry(n).or_default().push(build_time(n)?);
            bare.entry(n).or_default().push(bare_starts(py, n)?);
        }
    }
    for (n, key_lib, key_bare) in [(4, "b3.start4", "b3.bare4"), (8, "b3.start8", "b3.bare8")] {
        figs.add(
            key_lib,
            &format!("Pool size({n}).build()"),
            &lib[&n],
            Unit::Time,
            format!(
                "Time from `build()` to its return (all {n} workers sent `ready`), then \
                 `shutdown()` untimed; {RUNS} runs interleaved with the bare starts, after one \
                 untimed build that resolves the interpreter"
            ),
        );
        figs.add(
            key_bare,
            &format!("{n} bare interpreters at once"),
            &bare[&n],
            Unit::Time,
            format!(
                "{n} × `python -c \"{BARE_START}\"` spawned at once (real executable), time until \
                 each has written its byte, then killed and reaped untimed"
            ),
        );
    }
    Ok(())
}

fn build_time(size: usize) -> BoxResult<f64> {
    let t = Instant::now();
    let pool = Pool::builder().name(format!("bench-start{size}")).size(size).build()?;
    let took = t.elapsed().as_secs_f64();
    pool.shutdown()?;
    Ok(took)
}

/// Starts `n` bare interpreters at once; seconds until the last has written its byte.
fn bare_starts(py: &Path, n: usize) -> BoxResult<f64> {
    let t = Instant::now();
    let mut children = Reaped(Vec::with_capacity(n));
    for _ in 0..n {
        let child = Command::new(py)
            .args(["-c", BARE_START])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        children.0.push(child);
    }
    for child in &mut children.0 {
        let mut byte = [0u8; 1];
        child.stdout.as_mut().ok_or("stdout is piped")?.read_exact(&mut byte)?;
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Children killed and reaped when dropped, however the code that started them ends.
struct Reaped(Vec<Child>);

impl Drop for Reaped {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---- c: the peers ------------------------------------------------------------------------------

#[derive(serde::Deserialize)]
struct PeerPool {
    tput: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
}

#[derive(serde::Deserialize)]
struct PeerResults {
    start_method: String,
    ppe: PeerPool,
    mp: PeerPool,
    fresh: Vec<f64>,
}

fn peers(py: &Path, figs: &mut Figures) -> BoxResult<()> {
    #[derive(Serialize)]
    struct Settings {
        runs: usize,
        tasks: usize,
        calls: usize,
        spawns: usize,
        warmup: usize,
    }
    let settings =
        Settings { runs: RUNS, tasks: PEER_TASKS, calls: PEER_CALLS, spawns: PEER_SPAWNS, warmup: 200 };
    let mut cmd = Command::new(py);
    cmd.arg("-c").arg(PEERS).arg(serde_json::to_string(&settings)?);
    let out = run_bounded(&mut cmd, PEER_TIMEOUT)?;
    let line = out.lines().last().ok_or("the peer script printed nothing")?;
    let r: PeerResults = serde_json::from_str(line)?;
    let method = &r.start_method;
    let tasks = format!(
        "task `dict(x=1)` (echoes the same tiny args); one `python -c` script, start method \
         `{method}`; {RUNS} runs after 200 single calls and a {}-task warm-up",
        PEER_TASKS / 4
    );
    figs.add(
        "c1.tput",
        "ProcessPoolExecutor(2) no-op throughput",
        &r.ppe.tput,
        Unit::Rate,
        format!("Submit {PEER_TASKS} tasks at once, then `.result()` each; tasks / wall time; {tasks}"),
    );
    figs.add(
        "c1.p50",
        "ProcessPoolExecutor(2) one at a time, p50",
        &r.ppe.p50,
        Unit::Time,
        format!("{PEER_CALLS} × `ex.submit(dict, x=1).result()` in sequence per run, each timed; {tasks}"),
    );
    figs.add(
        "c1.p99",
        "ProcessPoolExecutor(2) one at a time, p99",
        &r.ppe.p99,
        Unit::Time,
        "Same runs as c1 p50",
    );
    figs.add(
        "c2.tput",
        "multiprocessing.Pool(2).apply_async throughput",
        &r.mp.tput,
        Unit::Rate,
        format!("{PEER_TASKS} × `apply_async` at once, then `.get()` each; tasks / wall time; {tasks}"),
    );
    figs.add(
        "c2.p50",
        "multiprocessing.Pool(2).apply, p50",
        &r.mp.p50,
        Unit::Time,
        format!("{PEER_CALLS} × `pool.apply(dict, (), {{\"x\": 1}})` in sequence per run; {tasks}"),
    );
    figs.add("c2.p99", "multiprocessing.Pool(2).apply, p99", &r.mp.p99, Unit::Time, "Same runs as c2 p50");
    figs.add(
        "c3.mean",
        "fresh interpreter per call",
        &r.fresh,
        Unit::Time,
        format!(
            "`subprocess.run([sys.executable, \"-c\", \"pass\"])` from the same script, mean of \
             {PEER_SPAWNS} per run, after 2"
        ),
    );
    Ok(())
}

// ---- processes -----------------------------------------------------------------------------

/// The raw floor: one echo-loop process and the Rust side of its pipes.
struct RawEcho {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    frame: Vec<u8>,
    reply: Vec<u8>,
    next_id: u64,
}

impl RawEcho {
    fn spawn(py: &Path) -> BoxResult<RawEcho> {
        let mut child = Command::new(py)
            .args(["-c", ECHO_LOOP])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().ok_or("stdout is piped")?;
        Ok(RawEcho {
            child,
            stdin,
            stdout: BufReader::with_capacity(64 * 1024, stdout),
            frame: Vec::with_capacity(256),
            reply: Vec::with_capacity(256),
            next_id: 1,
        })
    }

    /// One round trip: the same frame the library would send, the reply parsed as JSON.
    fn call(&mut self, args: &Value) -> BoxResult<Value> {
        #[derive(Serialize)]
        struct CallFrame<'a> {
            #[serde(rename = "type")]
            kind: &'static str,
            id: u64,
            command: &'static str,
            args: &'a Value,
        }
        let id = self.next_id;
        self.next_id += 1;
        self.frame.clear();
        self.frame.extend_from_slice(&[0; 4]);
        serde_json::to_writer(&mut self.frame, &CallFrame { kind: "call", id, command: "echo", args })?;
        let len = u32::try_from(self.frame.len() - 4)?;
        self.frame[..4].copy_from_slice(&len.to_be_bytes());
        let stdin = self.stdin.as_mut().ok_or("stdin is closed")?;
        stdin.write_all(&self.frame)?;
        let mut header = [0u8; 4];
        self.stdout.read_exact(&mut header)?;
        self.reply.resize(u32::from_be_bytes(header) as usize, 0);
        self.stdout.read_exact(&mut self.reply)?;
        let mut reply: Value = serde_json::from_slice(&self.reply)?;
        if reply["id"] != id {
            return Err(format!("raw loop answered {} to call {id}", reply["id"]).into());
        }
        Ok(reply["value"].take())
    }
}

impl Drop for RawEcho {
    fn drop(&mut self) {
        self.stdin = None; // EOF: the loop exits
        if wait_bounded(&mut self.child, EXIT_WAIT).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The pids of the pool's workers.
fn worker_pids(pool: &Pool) -> BoxResult<Vec<u32>> {
    Ok(pool.stats()?.workers.iter().map(|w| w.pid).collect())
}

/// CPU time (user + system, seconds) of this process (every thread, the pool's included) and of
/// the given Python processes.
#[derive(Clone, Copy, Default)]
struct Cpu {
    rust: f64,
    python: f64,
}

impl Cpu {
    fn now(pythons: &[u32]) -> Cpu {
        let python = pythons.iter().map(|p| cpu_seconds(&p.to_string())).sum();
        Cpu { rust: cpu_seconds("self"), python }
    }
}

/// CPU time spent over several runs, and the calls made in them.
#[derive(Default)]
struct CpuTally {
    cpu: Cpu,
    calls: u64,
}

impl CpuTally {
    /// Adds the CPU time spent since `before` and the `calls` made meanwhile.
    fn add(&mut self, before: Cpu, pythons: &[u32], calls: u64) {
        let now = Cpu::now(pythons);
        self.cpu.rust += now.rust - before.rust;
        self.cpu.python += now.python - before.python;
        self.calls += calls;
    }

    fn per_call(&self) -> String {
        let us = |s: f64| s / self.calls.max(1) as f64 * 1e6;
        let (rust, python) = (us(self.cpu.rust), us(self.cpu.python));
        let total = rust + python;
        format!("Rust {rust:.1} µs + Python {python:.1} µs = {total:.1} µs")
    }
}

/// utime + stime of `/proc/<pid>/stat`, in seconds (clock ticks of 1/100 s); 0 if unreadable.
fn cpu_seconds(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    (ticks(11) + ticks(12)) as f64 / 100.0
}

/// Waits up to `limit` for `child` to exit; `None` if it is still running.
fn wait_bounded(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let end = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < end => thread::sleep(Duration::from_millis(1)),
            _ => return None,
        }
    }
}

/// Runs `cmd` to completion in its own process group with its stdout captured, killing the
/// group if it takes longer than `limit`.
fn run_bounded(cmd: &mut Command, limit: Duration) -> BoxResult<String> {
    use std::os::unix::process::CommandExt;
    let mut child =
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit()).process_group(0).spawn()?;
    let mut stdout = child.stdout.take().ok_or("stdout is piped")?;
    let reader = thread::Builder::new().name("bench-stdout".into()).spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).map(|_| s)
    })?;
    let status = match wait_bounded(&mut child, limit) {
        Some(status) => status,
        None => {
            let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", child.id())]).status();
            let _ = child.kill();
            let _ = child.wait();
            let _ = reader.join();
            return Err(format!("{cmd:?} took longer than {limit:?}; killed").into());
        }
    };
    let out = reader.join().map_err(|_| "stdout reader panicked")??;
    if !status.success() {
        return Err(format!("{:?} failed: {status}", cmd.get_program()).into());
    }
    Ok(out)
}

/// Ends the process if the bench overruns its budget. The pools' workers die with it (parent
/// death signal) and the raw loops read EOF.
fn start_watchdog(budget: Duration) -> io::Result<()> {
    thread::Builder::new().name("bench-watchdog".into()).spawn(move || {
        thread::sleep(budget);
        eprintln!("bench: still running after {budget:?}; giving up");
        std::process::exit(2);
    })?;
    Ok(())
}

// ---- the machine -------------------------------------------------------------------------------

struct Host {
    python: PathBuf,
    python_version: String,
    date: String,
    cpus: usize,
    cpu_model: String,
    kernel: String,
}

impl Host {
    fn probe() -> BoxResult<Host> {
        let candidate =
            std::env::var_os("SNAKEPIT_PYTHON").filter(|p| !p.is_empty()).unwrap_or_else(|| "python3".into());
        let script = "import sys, platform, datetime\n\
                      print(sys.executable)\n\
                      print(platform.python_version())\n\
                      print(datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'))";
        let out = run_bounded(Command::new(&candidate).args(["-c", script]), Duration::from_secs(30))?;
        let mut lines = out.lines();
        let mut next = || lines.next().map(str::to_string).ok_or("the interpreter probe printed too little");
        let (python, python_version, date) = (PathBuf::from(next()?), next()?, next()?);
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map_or_else(|| "unknown CPU".to_string(), |m| m.trim().to_string());
        let kernel =
            std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
        let cpus = thread::available_parallelism().map_or(1, |n| n.get());
        Ok(Host { python, python_version, date, cpus, cpu_model, kernel })
    }
}
