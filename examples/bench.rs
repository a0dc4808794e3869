//! The benchmark, measured in one run: `cargo run --release --example bench`.
//!
//! Every figure is set beside a baseline measured in the same run, because absolute numbers
//! drift from machine to machine: a raw echo loop over pipes written without the library (the
//! floor), bare interpreter starts, and the pools a Python user would pick instead
//! (`concurrent.futures`, `multiprocessing`, a fresh `subprocess` per call). Each measurement is
//! warmed up, then taken several times; the tables show the median with min..max, the ratio to
//! the baseline, the target and whether it is met.
//!
//! Two conditions, because idle vCPUs can be slow to wake (on a small VM a raw round trip takes
//! 55–90 µs idle and ~13 µs with the CPUs busy), which hides the library's own overhead behind
//! the wake-ups: **idle**, the machine as found (its load average is printed), and **CPUs
//! awake**, with one busy-loop process (`sh` at nice 19, spinning, in its own process group)
//! running beside the bench for the length of the section, killed and reaped after. Each section
//! runs idle, then awake, and each condition gets its own table. Sections whose figures do not
//! hinge on wake-ups run idle only: e2 (10 ms sleeps), d1/d2 (recycling every 100 calls), g1
//! (the threads of a 64-worker pool) and i3 (peak memory). The whole run takes 6–6½ minutes on 2
//! cores; a watchdog ends it after [`BUDGET`] (8 minutes).
//!
//! The interpreter is `$SNAKEPIT_PYTHON`, else `python3` on `PATH`, resolved once to the real
//! executable (a pyenv shim would add ~50 ms to every raw start). The array figures (i1, i3) run
//! on a virtual environment with numpy, made once under `target/tmp/numpy-venv` by
//! `tests/common/numpy_env.rs` before the watchdog starts (the first time, that downloads numpy);
//! when no package index can be reached they are skipped with a note in the output. The bench
//! writes its own small adapter and scripts into `$TMPDIR/snakepit-bench-<pid>/` and removes them
//! at the end. `RUST_LOG=debug` shows the library's own logging.
//!
//! `SNAKEPIT_BENCH_ONLY=<letters>` runs only the sections whose keys start with one of the
//! letters (`ai`: a1/b1, a2/b2 and i), for a quick look while working on one part; rows whose
//! figures were not taken are left out of the tables.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::bounded;
use serde::Serialize;
use serde_json::{json, Value};
use snakepit::{Array, Bytes, CallOptions, Pool, Profile};

// The numpy environment of the tests, by path: the bench is no test crate.
#[allow(dead_code)]
#[path = "../tests/common/numpy_env.rs"]
mod numpy_env;

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
/// f1: the share of calls that end their worker, and the `max_requests` of the baseline, which
/// replaces workers as often (one in 200 calls).
const CRASH_RATE: f64 = 0.005;
const CRASH_BASELINE_MAX_REQUESTS: u64 = 200;
/// d3: recycling at a realistic setting.
const REALISTIC_MAX_REQUESTS: u64 = 1_000;
/// g1: the pool whose threads are counted, its start-up deadline, and the threads allowed
/// beyond one per worker.
const MANY_WORKERS: usize = 64;
const MANY_STARTUP: Duration = Duration::from_secs(120);
const MANY_THREADS_SLACK: usize = 8;
/// How long the busy loop spins before an awake section starts, and its niceness: 19, so that
/// it keeps a vCPU out of idle without taking much CPU time from the bench when both CPUs are
/// wanted (a waking task of the bench preempts it at once).
const SPIN_SETTLE: Duration = Duration::from_millis(300);
const SPIN_NICE: &str = "19";
/// i1: the 1M float64 values' shape, and the round trips per run: the JSON list takes 1–1.5 s
/// a call, so it gets one (its runs hardly vary, and it misses its target by a factor of ten
/// or does not).
const ARRAY_SHAPE: [usize; 2] = [1000, 1000];
const ARRAY_CALLS: usize = 20;
const ARRAY_JSON_CALLS: usize = 1;
/// i3: the big array (100 MB of float64), one copy of it in bytes, and its round trips.
const BIG_SHAPE: [usize; 2] = [12_500, 1000];
const BIG_BYTES: f64 = 1e8;
const BIG_RUNS: usize = 3;
/// The frame limit of the array pools: the big array, and the 1M floats as JSON (~19 MB).
const ARRAY_MAX_FRAME: usize = 256 << 20;
/// Bounds: the peer script, one child's exit, and the whole bench (then it exits; the pools'
/// workers die with it, the raw loops read EOF and the busy loop is killed).
const PEER_TIMEOUT: Duration = Duration::from_secs(150);
const EXIT_WAIT: Duration = Duration::from_secs(5);
const BUDGET: Duration = Duration::from_secs(480);

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

/// The raw floor for bytes (i2.raw): a 4-byte big-endian length + that many raw bytes in, both
/// written back as they came, nothing else (no JSON, no copy into one buffer).
const BYTES_LOOP: &str = r#"
import os, struct
H = struct.Struct(">I")
rd = os.fdopen(0, "rb", 65536)
while True:
    h = rd.read(4)
    if len(h) < 4:
        break
    data = rd.read(H.unpack(h)[0])
    for part in (h, data):
        view = memoryview(part)
        while view:
            view = view[os.write(1, view):]
"#;

/// What starting an interpreter costs at the least: start, write one byte, flush.
const BARE_START: &str = "import sys; sys.stdout.write('x'); sys.stdout.flush()";

/// The busy loop of the awake condition. It spins in the shell (no syscalls) and every 200 000
/// turns (a fraction of a second) checks that its parent is still the bench (field 4 of
/// /proc/self/stat), so it ends by itself even if the bench is killed outright.
const SPIN: &str = "p=$PPID; i=0; while :; do i=$((i+1)); if [ $i -ge 200000 ]; then \
                    read -r _ _ _ pp _ < /proc/$$/stat; [ \"$pp\" = \"$p\" ] || exit 0; i=0; fi; done";

/// The bench's own adapter (module [`BENCH_ADAPTER_MODULE`]), written to a temp dir at run time.
const BENCH_ADAPTER_MODULE: &str = "bench_adapter";
const BENCH_ADAPTER: &str = r#""""The snakepit bench's adapter: an echo that sometimes ends its worker, an identity."""

import os
import random
import time

import snakepit


@snakepit.command
def echo_or_crash(x, crash_rate):
    """Return {"x": x}; with probability crash_rate, exit the worker at once instead."""
    if crash_rate and random.random() < crash_rate:
        os._exit(1)
    return {"x": x}


@snakepit.command
def count(n):
    """A stream of small chunks."""
    for i in range(n):
        yield i


@snakepit.command
def until_cancelled(seconds):
    """Runs until cancelled, looking every millisecond, as a long loop would."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        snakepit.check_cancelled()
        time.sleep(0.001)
    return "not cancelled"


@snakepit.command
def same(x):
    """Returns its argument as it arrived: bytes, an ndarray (with numpy), a list."""
    return x
"#;
const CRASH_COMMAND: &str = "echo_or_crash";

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

/// i1's peer, written next to the adapter as [`PPE_ARRAYS_FILE`]: a file, not `-c`, because with
/// the `spawn` or `forkserver` start method the pool's processes import `same` from the main
/// module by its path. The same 1M float64 values as i1, as an ndarray, pickled both ways.
/// Prints one JSON object.
const PPE_ARRAYS_FILE: &str = "bench_ppe_arrays.py";
const PPE_ARRAYS: &str = r#""""The snakepit bench's i1 peer: ProcessPoolExecutor(2) round trips of one ndarray."""
import concurrent.futures as cf
import json, multiprocessing as mp, sys, time

import numpy as np


def same(x):
    return x


def main():
    cfg = json.loads(sys.argv[1])
    rows, cols = cfg["shape"]
    x = ((np.arange(rows * cols, dtype=np.float64) * 0.618033988749895) % 1.0).reshape(rows, cols)
    out = {"start_method": mp.get_start_method(), "per_call": []}
    with cf.ProcessPoolExecutor(2) as ex:
        back = ex.submit(same, x).result()
        assert back.shape == x.shape and (back == x).all()
        for _ in range(cfg["warmup"]):
            ex.submit(same, x).result()
        for _ in range(cfg["runs"]):
            t = time.perf_counter()
            for _ in range(cfg["calls"]):
                ex.submit(same, x).result()
            out["per_call"].append((time.perf_counter() - t) / cfg["calls"])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
"#;

fn main() -> BoxResult<()> {
    env_logger::init();
    // Before the watchdog: the first time, this downloads numpy (numpy_env bounds it itself).
    let numpy = numpy_interpreter()?;
    start_watchdog(BUDGET)?;
    let began = Instant::now();
    let host = Host::probe()?;
    let adapter = AdapterDir::create()?;
    println!("# snakepit benchmark\n");
    println!(
        "{} · {} CPUs (nproc), {} · Linux {} · Python {} ({}) · snakepit {} · each figure: warm-up, \
         then {RUNS} runs, median (min..max) · two conditions: idle (as found) and CPUs awake (one \
         busy-loop process at nice {SPIN_NICE} beside the bench) · load average at the start {}\n",
        host.date,
        host.cpus,
        host.cpu_model,
        host.kernel,
        host.python_version,
        host.python.display(),
        env!("CARGO_PKG_VERSION"),
        load_average(),
    );
    if numpy.is_none() {
        println!(
            "**i1 and i3 SKIPPED: numpy could not be installed in a virtual environment because no \
             package index can be reached (the reason is on stderr).**\n"
        );
    }
    let py = host.python.as_path();
    let np = numpy.as_deref();
    let mut bench = Bench { only: std::env::var("SNAKEPIT_BENCH_ONLY").ok(), ..Bench::default() };
    let s2 = if bench.selected("s2") { Some(session_memory()?) } else { None };
    if let Some(s2) = &s2 {
        eprintln!("bench: {s2}");
    }
    bench.both("a1/b1 sequential latency, CPU per call, the 1 MB echo", |f| sequential(py, f))?;
    bench.both("s1/s2 sessions", sessions)?;
    bench.both("a2/b2 throughput", |f| throughput(py, f))?;
    bench.both("e1 thread profile, 32 in flight", |f| pipelined(py, f))?;
    bench.idle_only("e2", "e2 thread profile, I/O-bound", io_bound)?;
    bench.both("f1 rare crashes", |f| rare_crashes(&adapter.0, f))?;
    bench.both("h map, streams, cancelling", |f| handles(&adapter.0, f))?;
    bench.both("i1/i2 bytes and arrays", |f| binary(py, np, &adapter.0, f))?;
    bench.idle_only("i3", "i3 peak memory of a 100 MB array round trip", |f| {
        array_memory(np, &adapter.0, f)
    })?;
    bench.both("d3 recycling at max_requests(1000)", |f| {
        recycling(f, "d3", &SLOW_1MS, "1 ms calls", REALISTIC_MAX_REQUESTS)
    })?;
    bench.idle_only("d1/d2", "d1/d2 recycling at max_requests(100)", |f| {
        recycling(f, "d1", &ECHO, "tiny echo", 100)?;
        recycling(f, "d2", &SLOW_2MS, "2 ms calls", 100)
    })?;
    bench.idle_only("g1", "g1 threads of a 64-worker pool", many_workers)?;
    bench.both("b3 start-up", |f| startup(py, f))?;
    bench.both("c peers (concurrent.futures, multiprocessing, subprocess)", |f| peers(py, f))?;

    for cond in Condition::BOTH {
        println!("## {}\n", cond.title());
        print!("{}", table(&rows(bench.figures(cond), cond)));
        if cond == Condition::Awake && !bench.idle_only.is_empty() {
            println!("\nRan idle only, so not in this table: {}.", bench.idle_only.join(", "));
        }
        println!();
    }
    if let Some(s2) = s2 {
        println!("{s2}\n");
    }
    println!("## How each figure was taken\n");
    let keys: BTreeSet<&str> = bench.figs.iter().flat_map(|f| f.all.keys().copied()).collect();
    for key in keys {
        let taken: Vec<(Condition, &Measure)> = Condition::BOTH
            .into_iter()
            .filter_map(|c| bench.figures(c).all.get(key).map(|m| (c, m)))
            .collect();
        let values: Vec<String> =
            taken.iter().map(|(c, m)| format!("{} {}", c.title(), show(m.spread, m.unit))).collect();
        let first = taken[0].1;
        let mut how = first.how.clone();
        for (c, m) in &taken[1..] {
            if m.how != first.how {
                how += &format!(" ({}: {})", c.title(), m.how);
            }
        }
        println!("- **{key}** {}: {}. {how}", first.label, values.join(" · "));
    }
    for cond in Condition::BOTH {
        for note in &bench.figures(cond).notes {
            println!("- {}: {note}", cond.title());
        }
    }
    drop(adapter);
    println!(
        "\ntotal bench time {:.1} s · load average at the end {}",
        began.elapsed().as_secs_f64(),
        load_average()
    );
    Ok(())
}

// ---- the conditions ----------------------------------------------------------------------------

/// The state of the CPUs a section runs in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Condition {
    /// The machine as found.
    Idle,
    /// One busy-loop process running beside the bench, so that a vCPU is always awake.
    Awake,
}

impl Condition {
    const BOTH: [Condition; 2] = [Condition::Idle, Condition::Awake];

    fn title(self) -> &'static str {
        match self {
            Condition::Idle => "idle",
            Condition::Awake => "CPUs awake",
        }
    }

    /// Sets the condition up: nothing idle, a busy loop awake (until the guard is dropped).
    fn enter(self) -> BoxResult<Option<Spinner>> {
        match self {
            Condition::Idle => Ok(None),
            Condition::Awake => Spinner::start().map(Some),
        }
    }
}

/// The figures of both conditions, the sections that ran idle only, and the letters of the
/// sections to run (`None`: all).
#[derive(Default)]
struct Bench {
    figs: [Figures; 2],
    idle_only: Vec<&'static str>,
    only: Option<String>,
}

impl Bench {
    fn figures(&self, cond: Condition) -> &Figures {
        &self.figs[cond as usize]
    }

    /// Whether the section titled `what` runs: its key's letter (the title's first) is among
    /// `SNAKEPIT_BENCH_ONLY`'s, or that is not set.
    fn selected(&self, what: &str) -> bool {
        match &self.only {
            None => true,
            Some(letters) => what.chars().next().is_some_and(|c| letters.contains(c)),
        }
    }

    /// Runs `section` idle, then with the CPUs awake.
    fn both(&mut self, what: &str, mut section: impl FnMut(&mut Figures) -> BoxResult<()>) -> BoxResult<()> {
        for cond in Condition::BOTH {
            self.run(cond, what, &mut section)?;
        }
        Ok(())
    }

    /// Runs `section` idle only; `keys` names its figures for the awake table's footnote.
    fn idle_only(
        &mut self,
        keys: &'static str,
        what: &str,
        mut section: impl FnMut(&mut Figures) -> BoxResult<()>,
    ) -> BoxResult<()> {
        if self.selected(what) {
            self.idle_only.push(keys);
        }
        self.run(Condition::Idle, what, &mut section)
    }

    fn run(
        &mut self,
        cond: Condition,
        what: &str,
        section: &mut impl FnMut(&mut Figures) -> BoxResult<()>,
    ) -> BoxResult<()> {
        if !self.selected(what) {
            return Ok(());
        }
        eprintln!("bench: {what} ({}) ...", cond.title());
        let t = Instant::now();
        let spinner = cond.enter()?;
        let figs = &mut self.figs[cond as usize];
        section(figs)?;
        if let Some(spinner) = spinner {
            figs.notes.push(format!(
                "{what}: the busy loop used {:.0}% of a CPU meanwhile.",
                spinner.cpu_share() * 100.0
            ));
        }
        eprintln!("bench:   {:.1} s", t.elapsed().as_secs_f64());
        Ok(())
    }
}

/// The process group of the busy loop while one runs (0 when none), for the watchdog.
static SPINNER_GROUP: AtomicI32 = AtomicI32::new(0);

/// The busy loop of the awake condition: one `sh` spinning in its own process group. Dropping
/// it kills the group and reaps the shell; the watchdog kills the group too, and the loop ends
/// by itself once the bench is gone.
struct Spinner {
    child: Child,
    started: Instant,
}

impl Spinner {
    fn start() -> BoxResult<Spinner> {
        use std::os::unix::process::CommandExt;
        // `nice` execs `sh`, so the shell's parent (`$PPID`) is the bench.
        let child = Command::new("nice")
            .args(["-n", SPIN_NICE, "sh", "-c", SPIN])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()?;
        SPINNER_GROUP.store(i32::try_from(child.id())?, Ordering::SeqCst);
        thread::sleep(SPIN_SETTLE);
        Ok(Spinner { child, started: Instant::now() })
    }

    /// The share of one CPU the loop has used since it settled.
    fn cpu_share(&self) -> f64 {
        let spun = cpu_seconds(&self.child.id().to_string());
        spun / (self.started.elapsed() + SPIN_SETTLE).as_secs_f64()
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        kill_group(SPINNER_GROUP.swap(0, Ordering::SeqCst));
        let _ = self.child.kill();
        if wait_bounded(&mut self.child, EXIT_WAIT).is_none() {
            eprintln!("bench: the busy loop {} did not exit", self.child.id());
        }
    }
}

/// Sends SIGKILL to the process group `group` (nothing for 0).
fn kill_group(group: i32) {
    if group > 0 {
        // SAFETY: kill(2) takes plain integers and touches no memory of this process.
        unsafe {
            libc::kill(-group, libc::SIGKILL);
        }
    }
}

/// The temp dir holding the bench's adapter, for the watchdog.
static ADAPTER_DIR: OnceLock<PathBuf> = OnceLock::new();

/// `$TMPDIR/snakepit-bench-<pid>/` with the bench's adapter and i1's peer script in it;
/// removed when dropped.
struct AdapterDir(PathBuf);

impl AdapterDir {
    fn create() -> BoxResult<AdapterDir> {
        // Dirs left by benches that were killed outright (no destructors, no watchdog) go first.
        for entry in std::fs::read_dir(std::env::temp_dir())?.flatten() {
            let name = entry.file_name();
            let pid = name.to_str().and_then(|n| n.strip_prefix("snakepit-bench-"));
            if pid.is_some_and(|p| p.parse::<u32>().is_ok() && !Path::new("/proc").join(p).exists()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let dir = std::env::temp_dir().join(format!("snakepit-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let dir = AdapterDir(dir);
        std::fs::write(dir.0.join(format!("{BENCH_ADAPTER_MODULE}.py")), BENCH_ADAPTER)?;
        std::fs::write(dir.0.join(PPE_ARRAYS_FILE), PPE_ARRAYS)?;
        let _ = ADAPTER_DIR.set(dir.0.clone());
        Ok(dir)
    }
}

impl Drop for AdapterDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---- the table ---------------------------------------------------------------------------------

/// The table's rows for one condition: each library figure against the baselines it is judged
/// by. Rows whose figures were not taken in this condition are left out. Add rows here.
fn rows(f: &Figures, cond: Condition) -> Vec<Row> {
    let b1_target = match cond {
        Condition::Idle => 1.25,
        Condition::Awake => 1.5,
    };
    let b3_target = Some(Target::AtMost(1.3));
    let threads_target = (MANY_WORKERS + MANY_THREADS_SLACK) as f64 / MANY_WORKERS as f64;
    let specs: Vec<(&str, &str, &str, Option<Target>)> = vec![
        ("b1 1 caller → pool(1), tiny echo, p50", "b1.p50", "a1.p50", Some(Target::AtMost(b1_target))),
        ("b1 1 caller → pool(1), tiny echo, p99", "b1.p99", "a1.p99", None),
        ("b1 Rust CPU per call (this process)", "b1.cpu_rust", "a1.cpu_rust", Some(Target::AtMost(2.0))),
        ("b1 Python CPU per call (the worker)", "b1.cpu_py", "a1.cpu_py", Some(Target::AtMost(1.2))),
        ("b1 p50 vs ProcessPoolExecutor one at a time", "b1.p50", "c1.p50", None),
        ("b1 p50 vs multiprocessing.Pool.apply", "b1.p50", "c2.p50", None),
        ("b1 mean vs a fresh interpreter per call", "b1.mean", "c3.mean", None),
        (
            "s1 a call through a session vs a plain call, p50",
            "s1.session",
            "s1.plain",
            Some(Target::AtMost(1.1)),
        ),
        ("b2 8 callers → pool(2), tiny echo", "b2.tput", "c2.tput", Some(Target::AtLeast(2.0))),
        ("b2 8 callers → pool(2), tiny echo", "b2.tput", "a2.tput", Some(Target::AtLeast(0.7))),
        ("b2 vs ProcessPoolExecutor(2)", "b2.tput", "c1.tput", None),
        ("b3 start-up, size(4).build()", "b3.start4", "b3.bare4", b3_target),
        ("b3 start-up, size(8).build()", "b3.start8", "b3.bare8", b3_target),
        ("1 MB echo through pool(1)", "b1.1mb", "a1.1mb", None),
        (
            "i1 1M float64 round trip: `Array` vs a JSON list",
            "i1.array",
            "i1.json",
            Some(Target::AtMost(0.1)),
        ),
        (
            "i1 1M float64 round trip vs ProcessPoolExecutor(2)",
            "i1.array",
            "i1.ppe",
            Some(Target::AtMost(1.0)),
        ),
        (
            "i2 1 MB `Bytes` echo, pool(1), vs the raw JSON loop",
            "i2.bytes",
            "a1.1mb",
            Some(Target::AtLeast(0.8)),
        ),
        ("i2 1 MB `Bytes` echo vs a raw binary loop", "i2.bytes", "i2.raw", None),
        (
            "i3 peak copies of a 100 MB array, this process",
            "i3.rust",
            "limit.2copies",
            Some(Target::AtMost(1.0)),
        ),
        (
            "i3 peak copies of a 100 MB array, the worker",
            "i3.python",
            "limit.2copies",
            Some(Target::AtMost(1.0)),
        ),
        ("e1 thread worker, 32 in flight", "e1.pool", "e1.raw", Some(Target::AtLeast(0.6))),
        ("e2 I/O-bound (10 ms): thread vs process", "e2.thread", "e2.process", None),
        ("h1 `map`, 32 in flight → pool(2), tiny echo", "h1.map", "b2.tput", Some(Target::AtLeast(1.0))),
        ("h2 a stream of small chunks, pool(1)", "h2.stream", "e1.raw", Some(Target::AtLeast(0.5))),
        ("h3 cancelling a queued call, p50", "h3.queued", "limit.1ms", Some(Target::AtMost(1.0))),
        (
            "h4 cancelling a running call that checks, p50",
            "h4.running",
            "limit.50ms",
            Some(Target::AtMost(1.0)),
        ),
        ("f1 rare crashes (0.5% of calls), pool(2)", "f1.crash", "f1.recycle", Some(Target::AtLeast(0.5))),
        ("f1 longest call wait, crashes vs recycling", "f1.crash_max", "f1.recycle_max", None),
        ("d3 max_requests(1000), 1 ms calls, pool(2)", "d3.on", "d3.off", Some(Target::AtLeast(0.95))),
        ("d1 max_requests(100), tiny echo, pool(2)", "d1.on", "d1.off", Some(Target::AtLeast(0.9))),
        ("d2 max_requests(100), 2 ms calls, pool(2)", "d2.on", "d2.off", Some(Target::AtLeast(0.9))),
        (
            "g1 Rust threads per worker, pool(64)",
            "g1.threads",
            "g1.workers",
            Some(Target::AtMost(threads_target)),
        ),
    ];
    specs
        .into_iter()
        .filter_map(|(what, figure, baseline, target)| {
            Some(Row::new(what, f.all.get(figure)?, f.all.get(baseline)?, target))
        })
        .collect()
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
    Count,
    /// Copies of a payload, to one decimal.
    Copies,
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
        Unit::Count => (1.0, "", 0),
        Unit::Copies => (1.0, " copies", 1),
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

// ---- a1/b1: one sequential caller; CPU per call; the 1 MB payload ------------------------------

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
    // Interleaved (A B A B) so that drift hits both sides alike; CPU per call of each run.
    let (mut a, mut b) = (Vec::new(), Vec::new());
    let (mut cpu_a, mut cpu_b) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        let before = Cpu::now(&raw_pids);
        a.push(percentiles(time_calls(LATENCY_CALLS, || raw.call(&tiny).map(drop))?));
        cpu_a.push(Cpu::now(&raw_pids).per_call_since(before, LATENCY_CALLS));
        let before = Cpu::now(&pool_pids);
        b.push(percentiles(time_calls(LATENCY_CALLS, || {
            pool.call("echo", json!({"x": 1})).map(drop).map_err(Into::into)
        })?));
        cpu_b.push(Cpu::now(&pool_pids).per_call_since(before, LATENCY_CALLS));
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
    let rust = |v: &[Cpu]| -> Vec<f64> { v.iter().map(|c| c.rust).collect() };
    let python = |v: &[Cpu]| -> Vec<f64> { v.iter().map(|c| c.python).collect() };
    let how_rust = |side: &str| {
        format!(
            "CPU time (utime + stime of /proc/self/stat, 10 ms ticks) of this process, every thread, \
             over each timed run of {side}, / {LATENCY_CALLS} calls"
        )
    };
    let how_python = |side: &str, whose: &str| {
        format!(
            "CPU time (utime + stime of /proc/<pid>/stat, 10 ms ticks) of {whose} over each timed run \
             of {side}, / {LATENCY_CALLS} calls"
        )
    };
    figs.add("a1.cpu_rust", "raw loop, Rust CPU per call", &rust(&cpu_a), Unit::Time, how_rust("a1"));
    figs.add(
        "a1.cpu_py",
        "raw loop, Python CPU per call",
        &python(&cpu_a),
        Unit::Time,
        how_python("a1", "the echo loop's process"),
    );
    figs.add(
        "b1.cpu_rust",
        "pool(1), Rust CPU per call",
        &rust(&cpu_b),
        Unit::Time,
        how_rust("b1") + " (the caller's and the pool's threads)",
    );
    figs.add(
        "b1.cpu_py",
        "pool(1), Python CPU per call",
        &python(&cpu_b),
        Unit::Time,
        how_python("b1", "the worker (pid from `pool.stats().workers`)"),
    );
    let stats = pool.stats()?;
    figs.notes.push(format!(
        "b1 inside the pool (its own stats, last {} calls): queue wait (the call made → a \
         lease on a worker) p50 {} µs; execution (the frame written → the reply read by the \
         caller) p50 {} µs, p99 {} µs, against a whole raw round trip (a1) of {:.0} µs; b1 in \
         all: {:.0} µs.",
        stats.execution.samples,
        stats.queue_wait.p50_us,
        stats.execution.p50_us,
        stats.execution.p99_us,
        figs.get("a1.p50").spread.median * 1e6,
        figs.get("b1.p50").spread.median * 1e6,
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

/// s1: the same tiny echo as b1, plain and through a strict session, interleaved on one
/// pool(1); s2: what 10 000 live sessions cost this process.
fn sessions(figs: &mut Figures) -> BoxResult<()> {
    let pool = Pool::builder().name("bench-s1").size(1).build()?;
    let session = pool.session()?;
    for _ in 0..LATENCY_WARMUP {
        pool.call("echo", json!({"x": 1}))?;
        session.call("echo", json!({"x": 1}))?;
    }
    let (mut plain, mut through) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        plain.push(percentiles(time_calls(LATENCY_CALLS, || {
            pool.call("echo", json!({"x": 1})).map(drop).map_err(Into::into)
        })?));
        through.push(percentiles(time_calls(LATENCY_CALLS, || {
            session.call("echo", json!({"x": 1})).map(drop).map_err(Into::into)
        })?));
    }
    let p50 = |v: &[(f64, f64, f64)]| -> Vec<f64> { v.iter().map(|t| t.0).collect() };
    figs.add(
        "s1.plain",
        "pool(1), plain call, p50",
        &p50(&plain),
        Unit::Time,
        format!("`pool.call(\"echo\", json!({{\"x\": 1}}))`; {RUNS} runs of {LATENCY_CALLS} calls, interleaved with s1 session"),
    );
    figs.add(
        "s1.session",
        "pool(1), call through a session, p50",
        &p50(&through),
        Unit::Time,
        "The same echo through `pool.session()?.call(..)` (strict: routed to the session's worker, its id in the frame)",
    );
    drop(session);
    pool.shutdown()?;
    Ok(())
}

/// s2: what 10 000 live sessions cost this process: its resident memory before and after
/// opening them (each bound to the one worker, none called). Run first, on a young heap, so
/// that memory freed by earlier sections cannot hide the growth.
fn session_memory() -> BoxResult<String> {
    let pool = Pool::builder().name("bench-s2").size(1).build()?;
    pool.session()?.call("echo", json!({"x": 1}))?;
    let before = self_rss()?;
    let many: Vec<_> = (0..10_000).map(|_| pool.session()).collect::<Result<_, _>>()?;
    let open = self_rss()?;
    let live = pool.stats()?.sessions.live;
    drop(many);
    pool.shutdown()?;
    Ok(format!(
        "s2: {live} live sessions cost this process {:.1} MB of RSS ({before} → {open} kB; target < 10 MB), \
         measured once, before the other sections",
        (open.saturating_sub(before)) as f64 / 1024.0,
    ))
}

/// This process's resident set size, in kB.
fn self_rss() -> BoxResult<u64> {
    status_kb("self", "VmRSS")
}

/// A kB field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`, ...).
fn status_kb(pid: &str, field: &str) -> BoxResult<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.strip_prefix(field).is_some_and(|rest| rest.starts_with(':')))
        .ok_or_else(|| format!("no {field} in /proc/{pid}/status"))?;
    Ok(line.split_whitespace().nth(1).ok_or_else(|| format!("no {field} value"))?.parse()?)
}

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
/// The demo adapter's `slow` for 1 ms.
const SLOW_1MS: Work = Work { command: "slow", args: || json!({"seconds": 0.001}) };

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

/// e1: one thread-profile worker with 32 calls in flight vs a raw loop fed 32 at a time.
fn pipelined(py: &Path, figs: &mut Figures) -> BoxResult<()> {
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
        "`size(1).profile(Thread).threads_per_worker(32)`, 32 caller threads calling `echo`; runs \
         interleaved with e1.raw",
    );
    Ok(())
}

/// e2: an I/O-bound workload (10 ms sleeps) on one thread worker with 16 threads vs 2 process
/// workers, with each side's memory.
fn io_bound(figs: &mut Figures) -> BoxResult<()> {
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

// ---- h: background calls, streams and cancelling ------------------------------------------------

/// Cancels timed in each run of h3 and h4.
const CANCELS: usize = 50;

/// h1-h4: `map` with 32 in flight on pool(2); a stream of small chunks on pool(1); cancelling
/// a queued call; cancelling a running call whose command looks at `snakepit.cancelled()`
/// every millisecond.
fn handles(adapter_dir: &Path, figs: &mut Figures) -> BoxResult<()> {
    let build = |name: &str, size: usize| -> BoxResult<Pool> {
        Ok(Pool::builder()
            .name(name)
            .size(size)
            .python_path(adapter_dir)
            .adapter(BENCH_ADAPTER_MODULE)
            .build()?)
    };
    let pool = build("bench-h", 2)?;
    let map_rate = |run: Duration| -> BoxResult<f64> {
        let start = Instant::now();
        let mut n = 0u64;
        for r in pool.map("echo", std::iter::repeat_with(|| json!({"x": 1})), IN_FLIGHT) {
            r?;
            n += 1;
            if start.elapsed() >= run {
                break;
            }
        }
        Ok(n as f64 / start.elapsed().as_secs_f64())
    };
    let one = build("bench-h2", 1)?;
    let stream_rate = |run: Duration| -> BoxResult<f64> {
        let start = Instant::now();
        let mut n = 0u64;
        for chunk in one.stream_with("count", json!({"n": u32::MAX}), CallOptions::new().window(64))? {
            chunk?;
            n += 1;
            if start.elapsed() >= run {
                break; // dropping the stream closes the generator
            }
        }
        Ok(n as f64 / start.elapsed().as_secs_f64())
    };
    map_rate(THROUGHPUT_WARMUP)?;
    stream_rate(THROUGHPUT_WARMUP)?;
    let (mut maps, mut streams, mut queued, mut running) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..RUNS {
        maps.push(map_rate(THROUGHPUT_RUN / 2)?);
        streams.push(stream_rate(THROUGHPUT_RUN / 2)?);
        // h3: both workers busy, so each call waits in the queue until it is cancelled.
        let blockers =
            [pool.submit("until_cancelled", json!([60]))?, pool.submit("until_cancelled", json!([60]))?];
        thread::sleep(Duration::from_millis(50));
        let mut times = Vec::new();
        for _ in 0..CANCELS {
            let call = pool.submit("echo", json!({"x": 1}))?;
            let t = Instant::now();
            call.cancel();
            let outcome = call.wait_timeout(Duration::from_secs(5));
            times.push(t.elapsed().as_secs_f64());
            if !matches!(outcome, Some(Err(snakepit::Error::Cancelled))) {
                return Err(format!("h3: a queued call was not cancelled: {outcome:?}").into());
            }
        }
        queued.push(percentiles(times).0);
        // h4: a running command that checks every millisecond.
        let mut times = Vec::new();
        for blocker in &blockers {
            blocker.cancel();
            let _ = blocker.wait_timeout(Duration::from_secs(5));
        }
        for _ in 0..CANCELS / 5 {
            let call = pool.submit("until_cancelled", json!([60]))?;
            thread::sleep(Duration::from_millis(20)); // it runs
            let t = Instant::now();
            call.cancel();
            let outcome = call.wait_timeout(Duration::from_secs(5));
            times.push(t.elapsed().as_secs_f64());
            if !matches!(outcome, Some(Err(snakepit::Error::Cancelled))) {
                return Err(format!("h4: a running call was not cancelled: {outcome:?}").into());
            }
        }
        running.push(percentiles(times).0);
    }
    let replaced = pool.stats()?.restarts + one.stats()?.restarts;
    pool.shutdown()?;
    one.shutdown()?;
    figs.add(
        "h1.map",
        "`pool.map(\"echo\", .., 32)` on pool(2)",
        &maps,
        Unit::Rate,
        "one thread iterating `map` over endless `{\"x\": 1}` arguments with 32 in flight, for 1 s a run",
    );
    figs.add(
        "h2.stream",
        "chunks of one stream (window 64), pool(1)",
        &streams,
        Unit::Rate,
        "one `stream_with(\"count\", .., window(64))` read for 1 s a run, then dropped (its generator is \
         closed)",
    );
    figs.add(
        "h3.queued",
        "cancel() to Err(Cancelled), queued call",
        &queued,
        Unit::Time,
        format!("{CANCELS} calls a run submitted behind two busy workers, each cancelled at once; p50 of each run"),
    );
    figs.add(
        "h4.running",
        "cancel() to Err(Cancelled), running call",
        &running,
        Unit::Time,
        format!(
            "{} calls a run of a command that calls `snakepit.check_cancelled()` every 1 ms, cancelled \
             20 ms after submission; p50 of each run; workers replaced over the section: {replaced}",
            CANCELS / 5
        ),
    );
    figs.add("limit.1ms", "the target", &[0.001], Unit::Time, "the issue's target, not a measurement");
    figs.add("limit.50ms", "the target", &[0.05], Unit::Time, "the issue's target, not a measurement");
    Ok(())
}

// ---- i: bytes and arrays -----------------------------------------------------------------------

/// The numpy environment's interpreter, or `None` after a loud message when no package index
/// can be reached to install numpy; any other failure to make it fails the bench.
fn numpy_interpreter() -> BoxResult<Option<PathBuf>> {
    match numpy_env::numpy_python() {
        Ok(python) => Ok(Some(python)),
        Err(numpy_env::NoNumpy::Offline(why)) => {
            eprintln!(
                "\n**********\nbench: i1 and i3 SKIPPED: numpy could not be installed because no \
                 package index can be reached:\n{why}\n**********\n"
            );
            Ok(None)
        }
        Err(numpy_env::NoNumpy::Failed(why)) => Err(format!("making a Python with numpy: {why}").into()),
    }
}

/// A pool(1) on the numpy environment's interpreter with the bench's adapter, whose frames may
/// carry the big array of i3 and the 1M floats of i1 as JSON.
fn array_pool(name: &str, numpy: &Path, adapter_dir: &Path) -> BoxResult<Pool> {
    Ok(Pool::builder()
        .name(name)
        .size(1)
        .python(numpy)
        .python_path(adapter_dir)
        .adapter(BENCH_ADAPTER_MODULE)
        .max_frame_size(ARRAY_MAX_FRAME)
        .build()?)
}

/// `n` float64 values with all their digits (as measurements have), so that the JSON
/// baseline writes and parses numbers of a realistic length.
fn float_values(n: usize) -> Vec<f64> {
    (0..n).map(|i| (i as f64 * 0.618_033_988_749_895).fract()).collect()
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// i1 and i2; i1 only with numpy (`numpy` is its interpreter).
fn binary(py: &Path, numpy: Option<&Path>, adapter_dir: &Path, figs: &mut Figures) -> BoxResult<()> {
    match numpy {
        Some(numpy) => array_round_trips(numpy, adapter_dir, figs)?,
        None => {
            figs.notes.push("i1 SKIPPED: numpy could not be installed (no package index reachable).".into())
        }
    }
    bytes_echo(py, adapter_dir, figs)
}

/// i1: 1M float64 values round trip through `same` on a numpy pool(1) as an `Array`, and as a
/// JSON list on the same pool, A B A B; then `concurrent.futures` passing the same ndarray.
fn array_round_trips(numpy: &Path, adapter_dir: &Path, figs: &mut Figures) -> BoxResult<()> {
    let pool = array_pool("bench-i1", numpy, adapter_dir)?;
    let values = float_values(ARRAY_SHAPE.iter().product());
    let x = Array::from_vec(values.clone(), ARRAY_SHAPE)?;
    // The clone shares x's data: what a caller that keeps its array pays.
    let as_array = || -> BoxResult<Array> { Ok(pool.call_as::<_, Array>("same", &(x.clone(),))?) };
    let as_json = || -> BoxResult<Vec<f64>> { Ok(pool.call_as::<_, Vec<f64>>("same", &(&values,))?) };
    let back = as_array()?;
    if back.shape() != ARRAY_SHAPE || back.as_slice::<f64>()? != values.as_slice() {
        return Err("i1: the array did not come back intact".into());
    }
    // serde_json may read a float back one unit in the last place off.
    let list = as_json()?;
    if list.len() != values.len() || list.iter().zip(&values).any(|(a, b)| (a - b).abs() > b.abs() * 1e-15) {
        return Err("i1: the JSON list did not come back intact".into());
    }
    for _ in 0..3 {
        as_array()?;
    }
    let (mut arrays, mut lists) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        arrays.push(mean(&time_calls(ARRAY_CALLS, || as_array().map(drop))?));
        lists.push(mean(&time_calls(ARRAY_JSON_CALLS, || as_json().map(drop))?));
    }
    pool.shutdown()?;
    let (method, ppe) = ppe_array_round_trips(numpy, adapter_dir)?;
    let n = format!("{}×{} float64", ARRAY_SHAPE[0], ARRAY_SHAPE[1]);
    figs.add(
        "i1.array",
        "1M float64 as an `Array`, pool(1) with numpy",
        &arrays,
        Unit::Time,
        format!(
            "`pool.call_as::<_, Array>(\"same\", &(x.clone(),))`, x a {n} `Array` of full-precision \
             values (the clone shares its data), `same` returning the ndarray it got; pool(1) on the \
             numpy venv's interpreter, `max_frame_size(256 MiB)`; mean round trip of {ARRAY_CALLS} \
             calls a run, {RUNS} runs interleaved with i1.json after a check and 3 calls"
        ),
    );
    figs.add(
        "i1.json",
        "1M float64 as a JSON list, same pool",
        &lists,
        Unit::Time,
        format!(
            "The same values as a `Vec<f64>`: `pool.call_as::<_, Vec<f64>>(\"same\", &(&values,))` \
             on the same pool, a JSON list both ways (~19 MB each); {ARRAY_JSON_CALLS} call(s) timed a run"
        ),
    );
    figs.add(
        "i1.ppe",
        "ProcessPoolExecutor(2) passing the ndarray",
        &ppe,
        Unit::Time,
        format!(
            "`ex.submit(same, x).result()`, x the same values as a {n} ndarray (pickled both ways), \
             `same` an identity at module level; a script file run by the numpy venv's interpreter \
             after i1.array and i1.json, start method `{method}`; mean round trip of {ARRAY_CALLS} \
             calls a run, {RUNS} runs after a check and 3 calls"
        ),
    );
    Ok(())
}

/// i1's peer script on the numpy interpreter: (start method, seconds per round trip of each run).
fn ppe_array_round_trips(numpy: &Path, adapter_dir: &Path) -> BoxResult<(String, Vec<f64>)> {
    #[derive(Serialize)]
    struct Settings {
        shape: [usize; 2],
        runs: usize,
        calls: usize,
        warmup: usize,
    }
    #[derive(serde::Deserialize)]
    struct Results {
        start_method: String,
        per_call: Vec<f64>,
    }
    let settings = Settings { shape: ARRAY_SHAPE, runs: RUNS, calls: ARRAY_CALLS, warmup: 3 };
    let mut cmd = Command::new(numpy);
    cmd.arg(adapter_dir.join(PPE_ARRAYS_FILE)).arg(serde_json::to_string(&settings)?);
    let out = run_bounded(&mut cmd, PEER_TIMEOUT)?;
    let line = out.lines().last().ok_or("the i1 peer script printed nothing")?;
    let r: Results = serde_json::from_str(line)?;
    Ok((r.start_method, r.per_call))
}

/// i2: 1 MB of bytes echoed through `same` on pool(1) (the default Python: no numpy needed),
/// and through a raw binary loop, A B A B.
fn bytes_echo(py: &Path, adapter_dir: &Path, figs: &mut Figures) -> BoxResult<()> {
    let pool = Pool::builder()
        .name("bench-i2")
        .size(1)
        .python_path(adapter_dir)
        .adapter(BENCH_ADAPTER_MODULE)
        .build()?;
    let mut raw = RawBytesEcho::spawn(py)?;
    let data = Bytes::from((0..PAYLOAD_BYTES).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    // The clone shares the bytes, as `Array`'s does in i1.
    let echo = || -> BoxResult<Bytes> { Ok(pool.call_as::<_, Bytes>("same", &(data.clone(),))?) };
    if echo()? != data || raw.echo(&data)? != data.as_slice() {
        return Err("i2: the 1 MB of bytes did not come back intact".into());
    }
    for _ in 0..3 {
        echo()?;
        raw.echo(&data)?;
    }
    let mbps = |xs: Vec<f64>| PAYLOAD_BYTES as f64 * xs.len() as f64 / xs.iter().sum::<f64>() / 1e6;
    let (mut lib, mut floor) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        floor.push(mbps(time_calls(PAYLOAD_CALLS, || raw.echo(&data).map(drop))?));
        lib.push(mbps(time_calls(PAYLOAD_CALLS, || echo().map(drop))?));
    }
    pool.shutdown()?;
    let how = format!(
        "MB/s = payload bytes / round-trip time, one sequential caller; {RUNS} interleaved runs of \
         {PAYLOAD_CALLS} calls after a check and 3"
    );
    figs.add(
        "i2.bytes",
        "pool(1), 1 MB `Bytes` echo",
        &lib,
        Unit::MBps,
        format!(
            "`pool.call_as::<_, Bytes>(\"same\", &(b.clone(),))`, b {PAYLOAD_BYTES} bytes (the clone \
             shares them), pool(1) on the bench's adapter and the default Python (they arrive as \
             `bytes` and go back as an attachment); {how}"
        ),
    );
    figs.add(
        "i2.raw",
        "raw binary loop, 1 MB echo",
        &floor,
        Unit::MBps,
        format!(
            "Raw floor for bytes, no library: a `python -c` loop reading a 4-byte big-endian length and \
             that many bytes and writing both back (no JSON), Rust writing and reading plain pipes as \
             in a1; {how}"
        ),
    );
    Ok(())
}

/// i3: what one round trip of a 100 MB array costs in peak memory on each side, in copies of
/// it, a few times, each after a small array call: that loads numpy first, and lets the worker
/// drop the previous round trip's values, which it holds until its next frame comes in.
fn array_memory(numpy: Option<&Path>, adapter_dir: &Path, figs: &mut Figures) -> BoxResult<()> {
    let Some(numpy) = numpy else {
        figs.notes.push("i3 SKIPPED: numpy could not be installed (no package index reachable).".into());
        return Ok(());
    };
    let pool = array_pool("bench-i3", numpy, adapter_dir)?;
    let worker = worker_pids(&pool)?.first().ok_or("i3: the pool has no worker")?.to_string();
    let small = || -> BoxResult<()> {
        Ok(pool.call_as::<_, Array>("same", &(Array::from_slice(&[0.5f64; 1000]),)).map(drop)?)
    };
    let (mut rust, mut python) = (Vec::new(), Vec::new());
    for _ in 0..BIG_RUNS {
        small()?;
        let (r, p) = big_round_trip(&pool, &worker)?;
        rust.push(r);
        python.push(p);
    }
    let held = status_kb(&worker, "VmRSS")?;
    small()?;
    let released = status_kb(&worker, "VmRSS")?;
    pool.shutdown()?;
    figs.notes.push(format!(
        "i3: the worker's RSS was {} MB right after the last 100 MB round trip and {} MB after one \
         more small call: it holds a call's values until its next frame comes in, so back-to-back \
         big calls peak at one copy more in the worker than i3.python (each taken after a small call).",
        held / 1024,
        released / 1024
    ));
    let how = format!(
        "One round trip of a {}×{} float64 `Array` (100 MB) through `same` on a numpy pool(1) \
         (`max_frame_size(256 MiB)`): both processes' peak RSS reset (`5` into \
         /proc/<pid>/clear_refs), VmRSS read, x made, `call_as::<_, Array>(\"same\", &(x.clone(),))`, \
         VmHWM read; copies = (VmHWM after − VmRSS before) / 100 MB, rounded to one decimal; \
         {BIG_RUNS} round trips, each with its own x and after a 1000-element array call (see the \
         note), idle only",
        BIG_SHAPE[0], BIG_SHAPE[1]
    );
    figs.add(
        "i3.rust",
        "this process's peak, 100 MB copies",
        &rust,
        Unit::Copies,
        format!("{how}. This process: x (made after the reset) is one copy, the result another"),
    );
    figs.add(
        "i3.python",
        "the worker's peak, 100 MB copies",
        &python,
        Unit::Copies,
        format!(
            "{how}. The worker (pid from `pool.stats()`): what it held at once to receive the \
             array and send it back"
        ),
    );
    figs.add("limit.2copies", "the target", &[2.0], Unit::Copies, "the issue's target, not a measurement");
    Ok(())
}

/// One 100 MB array round trip: the peak growth of (this process, the worker), in copies.
fn big_round_trip(pool: &Pool, worker: &str) -> BoxResult<(f64, f64)> {
    for pid in ["self", worker] {
        // "5" resets the peak (VmHWM) to the current RSS.
        std::fs::write(format!("/proc/{pid}/clear_refs"), "5")?;
    }
    let (rust_before, python_before) = (status_kb("self", "VmRSS")?, status_kb(worker, "VmRSS")?);
    let x = Array::from_vec(float_values(BIG_SHAPE.iter().product()), BIG_SHAPE)?;
    let back: Array = pool.call_as("same", &(x.clone(),))?;
    let (rust_peak, python_peak) = (status_kb("self", "VmHWM")?, status_kb(worker, "VmHWM")?);
    if back.shape() != BIG_SHAPE || back.bytes() != x.bytes() {
        return Err("i3: the 100 MB array did not come back intact".into());
    }
    // To one decimal: a tenth of a copy is 10 MB, more than buffers and bookkeeping take.
    let copies = |peak: u64, before: u64| {
        (peak.saturating_sub(before) as f64 * 1024.0 / BIG_BYTES * 10.0).round() / 10.0
    };
    Ok((copies(rust_peak, rust_before), copies(python_peak, python_before)))
}

// ---- d: recycling ------------------------------------------------------------------------------

/// Throughput with `max_requests(max_requests)` (figure `<key>.on`) against the same pool
/// without recycling (`<key>.off`), A B A B, both `size(2)` on the demo adapter.
fn recycling(
    figs: &mut Figures,
    key: &'static str,
    work: &Work,
    label: &str,
    max_requests: u64,
) -> BoxResult<()> {
    let plain = Pool::builder().name("bench-d-off").size(2).adapter("snakepit.demo").build()?;
    let recycled = Pool::builder()
        .name("bench-d-on")
        .size(2)
        .adapter("snakepit.demo")
        .max_requests(max_requests)
        .build()?;
    pool_rate(&plain, THROUGHPUT_WARMUP, work)?;
    pool_rate(&recycled, THROUGHPUT_WARMUP, work)?;
    let before = recycled.stats()?;
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        let (calls, secs) = pool_rate(&plain, THROUGHPUT_RUN, work)?;
        off.push(calls as f64 / secs);
        let (calls, secs) = pool_rate(&recycled, THROUGHPUT_RUN, work)?;
        on.push(calls as f64 / secs);
    }
    let after = recycled.stats()?;
    let how = format!(
        "`size(2)` pool on `snakepit.demo`, {CALLERS} caller threads, {label}, calls / wall time over \
         {} s; {RUNS} runs alternating with the other pool after a {:.1} s warm-up each",
        THROUGHPUT_RUN.as_secs_f64(),
        THROUGHPUT_WARMUP.as_secs_f64()
    );
    let (k_off, k_on) = match key {
        "d1" => ("d1.off", "d1.on"),
        "d2" => ("d2.off", "d2.on"),
        _ => ("d3.off", "d3.on"),
    };
    figs.add(k_off, &format!("no recycling, {label}"), &off, Unit::Rate, how.clone());
    figs.add(k_on, &format!("max_requests({max_requests}), {label}"), &on, Unit::Rate, how);
    figs.notes.push(format!(
        "{key} max_requests({max_requests}), {label}: {} workers recycled and {} calls failed over \
         the timed runs.",
        after.recycles.max_requests - before.recycles.max_requests,
        after.calls_failed - before.calls_failed
    ));
    plain.shutdown()?;
    recycled.shutdown()?;
    Ok(())
}

// ---- f1: rare crashes --------------------------------------------------------------------------

/// How the calls of a run ended, and the longest one.
#[derive(Default)]
struct Outcomes {
    ok: u64,
    /// Failed with `WorkerDied`: the crashing calls.
    died: u64,
    /// Any other failure, by kind.
    other: BTreeMap<String, u64>,
    longest: f64,
}

impl Outcomes {
    fn merge(&mut self, o: Outcomes) {
        self.ok += o.ok;
        self.died += o.died;
        for (kind, n) in o.other {
            *self.other.entry(kind).or_default() += n;
        }
        self.longest = self.longest.max(o.longest);
    }

    fn describe(&self) -> String {
        let mut s = format!("{} calls ok, {} failed with WorkerDied", self.ok, self.died);
        for (kind, n) in &self.other {
            s += &format!(", {n} failed with {kind}");
        }
        s
    }
}

/// The variant name of a library error (`Timeout(Queue)` → `Timeout`).
fn error_kind(e: &snakepit::Error) -> String {
    let debug = format!("{e:?}");
    debug.split(|c: char| !c.is_alphanumeric()).next().unwrap_or("?").to_string()
}

/// Calls the bench adapter's `echo_or_crash` with `args` from [`CALLERS`] threads for `run`,
/// counting failures instead of stopping at them: (outcomes, seconds).
fn tolerant_rate(pool: &Pool, run: Duration, args: &Value) -> BoxResult<(Outcomes, f64)> {
    let start = Instant::now();
    let end = start + run;
    let per_caller: Vec<Outcomes> = thread::scope(|s| {
        let handles: Vec<_> = (0..CALLERS)
            .map(|_| {
                s.spawn(move || {
                    let mut o = Outcomes::default();
                    while Instant::now() < end {
                        let t = Instant::now();
                        let result = pool.call(CRASH_COMMAND, args.clone());
                        o.longest = o.longest.max(t.elapsed().as_secs_f64());
                        match result {
                            Ok(_) => o.ok += 1,
                            Err(snakepit::Error::WorkerDied { .. }) => o.died += 1,
                            Err(e) => *o.other.entry(error_kind(&e)).or_default() += 1,
                        }
                    }
                    o
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join()).collect::<Result<Vec<_>, _>>()
    })
    .map_err(|_| "pool caller panicked")?;
    let elapsed = start.elapsed().as_secs_f64();
    let mut all = Outcomes::default();
    for o in per_caller {
        all.merge(o);
    }
    Ok((all, elapsed))
}

/// f1: a pool whose worker exits on a random 0.5% of calls, against the same pool with no
/// crashes but `max_requests(200)`: as many workers replaced, by recycling instead.
fn rare_crashes(adapter_dir: &Path, figs: &mut Figures) -> BoxResult<()> {
    let build = |name: &str, max_requests: Option<u64>| -> BoxResult<Pool> {
        let mut builder =
            Pool::builder().name(name).size(2).python_path(adapter_dir).adapter(BENCH_ADAPTER_MODULE);
        if let Some(n) = max_requests {
            builder = builder.max_requests(n);
        }
        Ok(builder.build()?)
    };
    let crashing = build("bench-f1-crash", None)?;
    let recycled = build("bench-f1-recycle", Some(CRASH_BASELINE_MAX_REQUESTS))?;
    let crash_args = json!({"x": 1, "crash_rate": CRASH_RATE});
    let calm_args = json!({"x": 1, "crash_rate": 0.0});
    tolerant_rate(&crashing, THROUGHPUT_WARMUP, &crash_args)?;
    tolerant_rate(&recycled, THROUGHPUT_WARMUP, &calm_args)?;
    let (crash_before, recycle_before) = (crashing.stats()?, recycled.stats()?);
    let (mut crash, mut recycle) = (Outcomes::default(), Outcomes::default());
    let (mut crash_rate, mut recycle_rate) = (Vec::new(), Vec::new());
    let (mut crash_max, mut recycle_max) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        let (o, secs) = tolerant_rate(&crashing, THROUGHPUT_RUN, &crash_args)?;
        crash_rate.push(o.ok as f64 / secs);
        crash_max.push(o.longest);
        crash.merge(o);
        let (o, secs) = tolerant_rate(&recycled, THROUGHPUT_RUN, &calm_args)?;
        recycle_rate.push(o.ok as f64 / secs);
        recycle_max.push(o.longest);
        recycle.merge(o);
    }
    let (crash_after, recycle_after) = (crashing.stats()?, recycled.stats()?);
    crashing.shutdown()?;
    recycled.shutdown()?;
    let pct = CRASH_RATE * 100.0;
    let pool = format!(
        "`size(2)` pool on the bench's adapter (`{CRASH_COMMAND}`: returns {{\"x\": 1}}, or \
         `os._exit(1)` when `random.random() < crash_rate`), default `restart_backoff`, {CALLERS} \
         caller threads calling back to back"
    );
    let how = format!(
        "successful calls / wall time over {} s; {RUNS} runs alternating with the other pool after \
         a {:.1} s warm-up each; failed calls are counted (see the notes), not retried",
        THROUGHPUT_RUN.as_secs_f64(),
        THROUGHPUT_WARMUP.as_secs_f64()
    );
    figs.add(
        "f1.crash",
        &format!("pool(2), {pct}% of calls crash their worker"),
        &crash_rate,
        Unit::Rate,
        format!("{pool}, `crash_rate` {CRASH_RATE}; {how}"),
    );
    figs.add(
        "f1.recycle",
        &format!("pool(2), no crashes, max_requests({CRASH_BASELINE_MAX_REQUESTS})"),
        &recycle_rate,
        Unit::Rate,
        format!(
            "The same {pool}, `crash_rate` 0 and `max_requests({CRASH_BASELINE_MAX_REQUESTS})` (a \
             worker replaced every ~{:.0} calls, as with the crashes); {how}",
            1.0 / CRASH_RATE
        ),
    );
    figs.add(
        "f1.crash_max",
        "longest single call, crash runs",
        &crash_max,
        Unit::Time,
        "The longest wall time of one `pool.call` (queue wait included) in each f1.crash run, \
         failed calls included",
    );
    figs.add(
        "f1.recycle_max",
        "longest single call, recycle runs",
        &recycle_max,
        Unit::Time,
        "The longest wall time of one `pool.call` in each f1.recycle run",
    );
    figs.notes.push(format!(
        "f1 crash runs: {}; the pool counted {} crashes and {} restarts (a WorkerDied for the \
         crashing call only is expected: one per crash). Recycle runs: {}; {} workers recycled.",
        crash.describe(),
        crash_after.crashes - crash_before.crashes,
        crash_after.restarts - crash_before.restarts,
        recycle.describe(),
        recycle_after.recycles.max_requests - recycle_before.recycles.max_requests,
    ));
    Ok(())
}

// ---- g1: the threads of a large pool -----------------------------------------------------------

/// Threads of this process.
fn thread_count() -> BoxResult<usize> {
    Ok(std::fs::read_dir("/proc/self/task")?.count())
}

/// g1: the threads a `size(64)` pool adds to this process, per worker.
fn many_workers(figs: &mut Figures) -> BoxResult<()> {
    let before = thread_count()?;
    let t = Instant::now();
    let pool = Pool::builder()
        .name("bench-g1")
        .size(MANY_WORKERS)
        .adapter("snakepit.demo")
        .startup_timeout(MANY_STARTUP)
        .build()?;
    let took = t.elapsed().as_secs_f64();
    // Counted right after build(), then after each of RUNS - 1 bursts of calls (the callers'
    // threads joined before counting), so that threads made lazily are counted too.
    let mut added = Vec::new();
    let mut calls = 0;
    for run in 0..RUNS {
        if run > 0 {
            calls += callers_rate(&pool, 16, Duration::from_millis(300), &ECHO)?.0;
            thread::sleep(Duration::from_millis(50));
        }
        added.push(thread_count()?.saturating_sub(before) as f64);
    }
    let ready = pool.stats()?.ready_workers;
    pool.shutdown()?;
    figs.add(
        "g1.threads",
        &format!("threads added by a size({MANY_WORKERS}) pool"),
        &added,
        Unit::Count,
        format!(
            "Entries of /proc/self/task after `size({MANY_WORKERS}).adapter(\"snakepit.demo\")\
             .startup_timeout({}s).build()` minus those before it ({before}); counted right after \
             build() and after each of {} bursts of 0.3 s of 16 callers calling `echo` ({calls} calls \
             in all), the callers joined first; build() took {took:.1} s",
            MANY_STARTUP.as_secs(),
            RUNS - 1
        ),
    );
    figs.add(
        "g1.workers",
        "process workers in the pool",
        &[MANY_WORKERS as f64; RUNS],
        Unit::Count,
        format!(
            "`size({MANY_WORKERS})`, {ready} ready after the bursts; the target allows one thread per \
             worker plus {MANY_THREADS_SLACK}"
        ),
    );
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
        RawEcho::spawn_script(py, ECHO_LOOP)
    }

    /// A raw loop running `script` (`python -c`) on plain pipes.
    fn spawn_script(py: &Path, script: &str) -> BoxResult<RawEcho> {
        let mut child = Command::new(py)
            .args(["-c", script])
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

/// The raw floor for bytes: [`BYTES_LOOP`] on the pipes of a [`RawEcho`] (which ends it).
struct RawBytesEcho(RawEcho);

impl RawBytesEcho {
    fn spawn(py: &Path) -> BoxResult<RawBytesEcho> {
        Ok(RawBytesEcho(RawEcho::spawn_script(py, BYTES_LOOP)?))
    }

    /// One round trip: length + bytes out, the same back into the reused reply buffer.
    fn echo(&mut self, data: &[u8]) -> BoxResult<&[u8]> {
        let raw = &mut self.0;
        let stdin = raw.stdin.as_mut().ok_or("stdin is closed")?;
        stdin.write_all(&u32::try_from(data.len())?.to_be_bytes())?;
        stdin.write_all(data)?;
        let mut header = [0u8; 4];
        raw.stdout.read_exact(&mut header)?;
        raw.reply.resize(u32::from_be_bytes(header) as usize, 0);
        raw.stdout.read_exact(&mut raw.reply)?;
        Ok(&raw.reply)
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

    /// CPU time per call on each side since `before`, over `calls` calls.
    fn per_call_since(self, before: Cpu, calls: usize) -> Cpu {
        let n = calls.max(1) as f64;
        Cpu { rust: (self.rust - before.rust) / n, python: (self.python - before.python) / n }
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

/// Ends the process if the bench overruns its budget, after killing the busy loop's process
/// group and removing the adapter's temp dir. The pools' workers die with it (parent death
/// signal) and the raw loops read EOF.
fn start_watchdog(budget: Duration) -> io::Result<()> {
    thread::Builder::new().name("bench-watchdog".into()).spawn(move || {
        thread::sleep(budget);
        eprintln!("bench: still running after {budget:?}; giving up");
        kill_group(SPINNER_GROUP.swap(0, Ordering::SeqCst));
        if let Some(dir) = ADAPTER_DIR.get() {
            let _ = std::fs::remove_dir_all(dir);
        }
        std::process::exit(2);
    })?;
    Ok(())
}

// ---- the machine -------------------------------------------------------------------------------

/// The 1, 5 and 15 minute load averages, as /proc/loadavg gives them: how idle "idle" was.
fn load_average() -> String {
    let all = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let three: Vec<&str> = all.split_whitespace().take(3).collect();
    if three.len() == 3 {
        three.join(" ")
    } else {
        "unknown".to_string()
    }
}

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
