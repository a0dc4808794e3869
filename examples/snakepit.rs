//! Run it: `cargo run --example snakepit -- --config examples/pools.json <subcommand>`.
//!
//! A command line for the pools a JSON configuration file describes. `call` runs one command;
//! `serve` answers JSON lines on stdin, so shell pipelines and other languages can use the
//! pools; `batch` runs a file of such lines; `stats` prints every pool's snapshot; `check`
//! validates the file without starting anything, and `check --import` also starts each pool in
//! turn with one worker to prove that its adapter imports. `--help` says more.
//!
//! Ctrl-C, SIGTERM (`kill`, `docker stop`, `systemctl stop`) and SIGHUP all stop the CLI the
//! same way: it stops taking work, lets the calls in flight finish within the pools' grace
//! period (`shutdown_timeout`), shuts the pools down and exits 130. While the pools are still
//! starting it exits 130 without waiting for them. A second signal quits at once (the workers
//! then die with the process). Set `RUST_LOG=info` to watch the pools.

use std::collections::HashMap;
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, select, unbounded, Receiver, Sender, TryRecvError};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use snakepit::{
    Config, Error, Pool, PoolBuilder, PoolConfig, PoolSet, PoolSetBuilder, Session, SessionOptions,
    DEFAULT_POOL,
};

const USAGE: &str = "usage: snakepit --config FILE \
    (call POOL COMMAND [JSON-ARGS] [--session NAME | --stream] | serve | batch FILE.jsonl [--concurrency N] | stats \
    | check [--import] | doctor)";

const HELP: &str = r#"Runs the Python worker pools that a JSON configuration file describes.

  call POOL COMMAND [JSON-ARGS]   run one command; prints its result as JSON.
                                 A Python exception prints its type, message and traceback
                                 on stderr and exits 1.
        [--session NAME]         run it in a session (which lives for this one call).
        [--stream]               run it as a stream: one JSON line per chunk the
                                 generator yields, as it comes.
  serve                          read one JSON request per line on stdin, write one JSON
                                 reply per line on stdout as each call completes.
  batch FILE.jsonl               run a file of requests, at most N at a time
        [--concurrency N]        (default 8); replies on stdout, progress and a summary on
                                 stderr; exits 1 if any call failed.
  stats                          start the pools and print every pool's snapshot.
  check                          validate the configuration file; print every problem.
        [--import]               then start each pool in turn, with its own settings but
                                 one worker, and shut it down: prints per pool the
                                 interpreter and the adapter's commands, or the start-up
                                 error with its traceback; exits 1 if any pool failed.
  doctor                         report on the interpreter (each pool's, with --config; else
                                 $SNAKEPIT_PYTHON or python3): version, free-threading, the
                                 GIL, the recommended profile, and the installed libraries'
                                 thread-safety.

Options: --config FILE (required, before or after the subcommand's own arguments), --help.

A request:  {"pool": "embed", "command": "embed", "args": {"text": "hi"}, "id": 7}
  `pool` defaults to the pool named "default" (or the only pool); `args` is a JSON object,
  array or null (the default); `id` is any JSON value, echoed in the reply (in `batch`, a
  request without one gets its line number). `"session": "NAME"` runs the call in that
  session of its pool (strict: on the session's worker, with its Python state), opened by the
  first line that names it and closed when the pools stop. `"stream": true` runs it as a
  stream (not in a session): a line {"id": 7, "chunk": ...} per chunk as it comes, then the
  reply, whose value is what the generator returned (usually null).
A reply:    {"id": 7, "ok": true, "value": ...}
        or  {"id": 7, "ok": false, "error": {"kind": "python", "message": "...",
                                             "type": "ValueError", "traceback": "..."}}
  (`type` and `traceback` for a Python exception only).

Ctrl-C, SIGTERM or SIGHUP stops taking work, lets calls in flight finish within the pools'
grace period, shuts the pools down and exits 130; while the pools are still starting, it exits
130 without waiting for them; a second signal quits at once. SIGHUP stays ignored under nohup.
Exit codes: 0 ok, 1 failed, 2 bad usage, 130 interrupted (by any of the three signals).
"#;

/// Calls `serve` runs at the same time.
const SERVE_CONCURRENCY: usize = 16;
/// Calls `batch` runs at the same time unless `--concurrency` says otherwise.
const BATCH_CONCURRENCY: usize = 8;
/// How often the progress line of `batch` is redrawn.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

const EXIT_OK: u8 = 0;
const EXIT_FAILED: u8 = 1;
const EXIT_USAGE: u8 = 2;
/// After Ctrl-C, and also after SIGTERM or SIGHUP: the handler cannot tell them apart, and one
/// code for "stopped on request, calls in flight drained" is simpler to script against.
const EXIT_INTERRUPTED: u8 = 130;

fn main() -> ExitCode {
    env_logger::init();
    let cli = match parse_args(std::env::args().skip(1)) {
        Ok(cli) => cli,
        Err(problem) => {
            eprintln!("snakepit: {problem}\n{USAGE}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let config = cli.config.as_path();
    let result = match cli.command {
        Command::Help => {
            println!("{USAGE}\n\n{HELP}");
            Ok(EXIT_OK)
        }
        Command::Check { import: false } => check(config),
        Command::Doctor => doctor(config),
        // Only the subcommands that start pools handle the signals: the others have nothing to
        // drain and die of them as usual.
        command => match Interrupt::install() {
            Ok(interrupt) => with_pools(config, &interrupt, command),
            Err(e) => {
                eprintln!("snakepit: cannot handle Ctrl-C and SIGTERM: {e}");
                return ExitCode::from(EXIT_FAILED);
            }
        },
    };
    ExitCode::from(result.unwrap_or_else(|e| {
        report(&e);
        EXIT_FAILED
    }))
}

// ---------------------------------------------------------------------------------------------
// Arguments

#[derive(Debug)]
struct Cli {
    config: PathBuf,
    command: Command,
}

#[derive(Debug)]
enum Command {
    Help,
    Call { pool: String, command: String, args: Value, session: Option<String>, stream: bool },
    Serve,
    Batch { file: PathBuf, concurrency: usize },
    Stats,
    // `import`: also start each pool, to prove that its adapter imports.
    Check { import: bool },
    Doctor,
}

/// The arguments after the program's name; `Err` says what is wrong with them.
fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Cli, String> {
    let mut config = None;
    let mut concurrency = None;
    let mut import = false;
    let mut session = None;
    let mut stream = false;
    let mut words = Vec::new();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag.to_string(), Some(value.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = || inline.clone().or_else(|| args.next()).ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "-h" | "--help" => return Ok(Cli { config: PathBuf::new(), command: Command::Help }),
            "--config" => config = Some(PathBuf::from(value()?)),
            "--concurrency" => {
                let n = value()?;
                match n.parse::<usize>() {
                    Ok(n) if (1..=1024).contains(&n) => concurrency = Some(n),
                    _ => return Err(format!("--concurrency: expected a number from 1 to 1024, found {n:?}")),
                }
            }
            "--import" if inline.is_none() => import = true,
            "--session" => session = Some(value()?),
            "--stream" if inline.is_none() => stream = true,
            "--stream" => return Err("--stream takes no value".into()),
            "--import" => return Err("--import takes no value".into()),
            _ if arg.starts_with('-') && arg.len() > 1 => return Err(format!("unknown option {arg}")),
            _ => words.push(arg),
        }
    }
    let command = match words.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["call", pool, command] => Command::Call {
            pool: String::from(*pool),
            command: String::from(*command),
            args: Value::Null,
            session: None,
            stream: false,
        },
        ["call", pool, command, args] => {
            let args = serde_json::from_str(args).map_err(|e| format!("JSON-ARGS is not valid JSON: {e}"))?;
            let (pool, command) = (String::from(*pool), String::from(*command));
            Command::Call { pool, command, args, session: None, stream: false }
        }
        ["serve"] => Command::Serve,
        ["batch", file] => Command::Batch { file: PathBuf::from(file), concurrency: BATCH_CONCURRENCY },
        ["stats"] => Command::Stats,
        ["check"] => Command::Check { import: false },
        ["doctor"] => Command::Doctor,
        [] => return Err("no subcommand".into()),
        [sub @ ("call" | "serve" | "batch" | "stats" | "check" | "doctor"), ..] => {
            return Err(format!("wrong number of arguments for {sub}"));
        }
        [other, ..] => return Err(format!("unknown subcommand {other:?}")),
    };
    let command = match (command, concurrency) {
        (Command::Batch { file, .. }, Some(concurrency)) => Command::Batch { file, concurrency },
        (_, Some(_)) => return Err("--concurrency applies to batch only".into()),
        (command, None) => command,
    };
    let command = match (command, stream) {
        (Command::Call { pool, command, args, session, .. }, true) => {
            Command::Call { pool, command, args, session, stream: true }
        }
        (_, true) => {
            return Err("--stream applies to call only (serve and batch lines say \"stream\")".into())
        }
        (command, false) => command,
    };
    let command = match (command, session) {
        (Command::Call { stream: true, .. }, Some(_)) => {
            return Err("--stream and --session do not go together (streams run outside sessions)".into())
        }
        (Command::Call { pool, command, args, .. }, Some(name)) => {
            Command::Call { pool, command, args, session: Some(name), stream: false }
        }
        (_, Some(_)) => {
            return Err("--session applies to call only (serve and batch lines name theirs)".into())
        }
        (command, None) => command,
    };
    let command = match (command, import) {
        (Command::Check { .. }, true) => Command::Check { import: true },
        (_, true) => return Err("--import applies to check only".into()),
        (command, false) => command,
    };
    let config = match command {
        // Without --config, `doctor` reports on the default interpreter.
        Command::Doctor => config.unwrap_or_default(),
        _ => config.ok_or("missing --config FILE")?,
    };
    Ok(Cli { config, command })
}

// ---------------------------------------------------------------------------------------------
// Subcommands

/// The subcommands that start pools.
fn with_pools(config: &Path, interrupt: &Interrupt, command: Command) -> Result<u8, Error> {
    match command {
        Command::Call { pool, command, args, session, stream } => {
            call(config, interrupt, &pool, &command, args, session, stream)
        }
        Command::Serve => serve(config, interrupt),
        Command::Batch { file, concurrency } => batch(config, interrupt, &file, concurrency),
        Command::Stats => stats(config, interrupt),
        Command::Check { import: true } => check_import(config, interrupt),
        Command::Help | Command::Check { import: false } | Command::Doctor => {
            unreachable!("{command:?} starts no pool")
        }
    }
}

/// `check`: validates the file without starting anything.
fn check(path: &Path) -> Result<u8, Error> {
    let config = Config::from_path(path)?;
    let names = config.pool_names();
    println!("ok: {} pools ({})", names.len(), names.join(", "));
    Ok(EXIT_OK)
}

/// The commands every worker serves, with or without an adapter (`BUILTIN_COMMANDS` in
/// `python/snakepit/worker.py`); an adapter cannot define commands of these names.
const BUILT_IN_COMMANDS: [&str; 3] = ["echo", "info", "ping"];

/// What the built-in `info` command says about a worker (the fields used here).
#[derive(Deserialize)]
struct WorkerReport {
    python_version: String,
    commands: Vec<String>,
}

/// `check --import`: validates the file, then starts each pool in turn with all its own
/// settings but one worker, asks that worker what it serves, and shuts the pool down before
/// the next. One line per pool on stdout: `ok` with the interpreter and the adapter's
/// commands, or `FAIL` with the start-up error (which names the interpreter and carries the
/// Python traceback on the lines after). Exits 1 if any pool failed.
fn check_import(path: &Path, interrupt: &Interrupt) -> Result<u8, Error> {
    let config = Config::from_path(path)?;
    let mut interpreters = Interpreters::default();
    let mut failed = 0;
    for pool in config.builders() {
        if interrupt.is_pressed() {
            return Ok(EXIT_INTERRUPTED);
        }
        let settings = pool.config().clone();
        let name = settings.name();
        // On Ctrl-C while the pool starts, `start` exits the process with 130.
        let set = match start([pool.size(1)], interrupt) {
            Ok(set) => set,
            Err(e) => {
                failed += 1;
                print_failure(name, &e);
                continue;
            }
        };
        let (report, interrupted) = watching_interrupt(&set, interrupt, || {
            set.call_as::<_, WorkerReport>(name, "info", &Value::Null)
        })?;
        shut_down(&set);
        if interrupted {
            return Ok(EXIT_INTERRUPTED);
        }
        match report.and_then(|report| interpreters.name(&settings).map(|python| (python, report))) {
            Ok((python, report)) => {
                let commands: Vec<String> = report
                    .commands
                    .into_iter()
                    .filter(|c| !BUILT_IN_COMMANDS.contains(&c.as_str()))
                    .collect();
                let listed =
                    if commands.is_empty() { String::new() } else { format!(" ({})", commands.join(", ")) };
                let s = if commands.len() == 1 { "" } else { "s" };
                println!(
                    "ok    pool {name:?}: python {python} ({}), {} command{s}{listed}",
                    report.python_version,
                    commands.len()
                );
            }
            Err(e) => {
                failed += 1;
                print_failure(name, &e);
            }
        }
    }
    Ok(if failed == 0 { EXIT_OK } else { EXIT_FAILED })
}

/// `FAIL  pool "x": <the error>`; the lines after the first (a Python traceback) are indented
/// under it.
fn print_failure(pool: &str, e: &Error) {
    let text = e.to_string();
    let mut lines = text.trim_end().lines();
    println!("FAIL  pool {pool:?}: {}", lines.next().unwrap_or(""));
    for line in lines {
        println!("      {line}");
    }
}

/// The interpreter each pool runs, named as the library's start-up errors name it, looked up
/// once per distinct setting.
#[derive(Default)]
struct Interpreters {
    known: Vec<(Option<PathBuf>, String)>,
}

impl Interpreters {
    /// The real executable, resolved as for a pool (the `python` setting, else
    /// `$SNAKEPIT_PYTHON`, else `python3`) by `python::inspect`. Under a launcher, the launcher
    /// and the interpreter as the pool passes them on: it runs on the far side.
    fn name(&mut self, pool: &PoolConfig) -> Result<String, Error> {
        let python = pool.python().map(Path::to_path_buf);
        if !pool.launcher().is_empty() {
            let python = python.unwrap_or_else(|| PathBuf::from("python3"));
            return Ok(format!("{} {}", pool.launcher().join(" "), python.display()));
        }
        if let Some((_, name)) = self.known.iter().find(|(p, _)| *p == python) {
            return Ok(name.clone());
        }
        let name = snakepit::python::inspect(python.as_deref())?.executable.display().to_string();
        self.known.push((python, name.clone()));
        Ok(name)
    }
}

/// `doctor`: which Python, which profile fits it, and how its libraries take to threads.
fn doctor(path: &Path) -> Result<u8, Error> {
    // Each distinct interpreter the configuration names (with --config), else the default.
    let mut pythons: Vec<Option<PathBuf>> = Vec::new();
    if path.as_os_str().is_empty() {
        pythons.push(None);
    } else {
        for b in Config::from_path(path)?.builders() {
            let python = b.config().python().map(Path::to_path_buf);
            if !pythons.contains(&python) {
                pythons.push(python);
            }
        }
    }
    for python in pythons {
        let info = snakepit::python::inspect(python.as_deref())?;
        println!("python       {}", info.executable.display());
        println!("version      {} {}", info.implementation, info.version);
        println!("build        {}", if info.free_threaded { "free-threaded" } else { "with a GIL" });
        println!("GIL          {}", if info.gil_enabled { "on" } else { "off" });
        println!("recommended  profile \"{}\": {}", profile_name(info.recommended_profile), info.reason);
        if info.libraries.is_empty() {
            println!("libraries    none of the known ones installed");
        }
        for lib in &info.libraries {
            let class = match lib.safety {
                snakepit::ThreadSafety::Safe => "thread-safe",
                snakepit::ThreadSafety::Conditional => "conditional",
                snakepit::ThreadSafety::NotSafe => "not safe to share",
                _ => "unknown",
            };
            println!("  {:<14} {:<10} {:<18} {}", lib.name, lib.version, class, lib.note);
        }
        println!();
    }
    Ok(EXIT_OK)
}

fn profile_name(profile: snakepit::Profile) -> &'static str {
    match profile {
        snakepit::Profile::Thread => "thread",
        _ => "process",
    }
}

/// `call`: starts only the pool named, runs one command, prints the result.
fn call(
    path: &Path,
    interrupt: &Interrupt,
    pool: &str,
    command: &str,
    args: Value,
    session: Option<String>,
    stream: bool,
) -> Result<u8, Error> {
    let config = Config::from_path(path)?;
    let known = config.pool_names();
    if !known.iter().any(|name| name == pool) {
        return Err(Error::UnknownPool { name: pool.to_string(), known });
    }
    let only = config.builders().into_iter().filter(|b| b.config().name() == pool);
    let set = start(only, interrupt)?;
    // A session here lives for this one call: its command gets a session store (and the
    // session's id in events and logs); `serve` and `batch` keep theirs across lines.
    let run = || match &session {
        Some(_) => set.session(pool, SessionOptions::new())?.call(command, args),
        // A stream's chunks are printed as they come; its end is what the generator returned.
        None if stream => {
            for chunk in set.pool(pool)?.stream(command, args)? {
                let line = serde_json::to_string(&chunk?)?;
                let mut out = io::stdout().lock();
                writeln!(out, "{line}").and_then(|_| out.flush())?;
            }
            Ok(Value::Null)
        }
        None => set.call(pool, command, args),
    };
    let (result, interrupted) = watching_interrupt(&set, interrupt, run)?;
    match result {
        Ok(_) if stream => {}
        Ok(value) => println!("{}", serde_json::to_string(&value)?),
        Err(e) if interrupted => report(&e),
        Err(e) => return Err(e),
    }
    shut_down(&set);
    Ok(if interrupted { EXIT_INTERRUPTED } else { EXIT_OK })
}

/// `serve`: JSON requests on stdin, JSON replies on stdout, until EOF or Ctrl-C.
fn serve(path: &Path, interrupt: &Interrupt) -> Result<u8, Error> {
    let set = start(Config::from_path(path)?.builders(), interrupt)?;
    let lines = read_stdin_lines()?;
    let interrupted =
        run_requests(&set, &lines, SERVE_CONCURRENCY, interrupt, &Tally::default(), MissingId::Null)?;
    shut_down(&set);
    Ok(if interrupted { EXIT_INTERRUPTED } else { EXIT_OK })
}

/// `batch`: the requests of a file, at most `concurrency` at a time, with progress and a summary.
fn batch(path: &Path, interrupt: &Interrupt, file: &Path, concurrency: usize) -> Result<u8, Error> {
    let config = Config::from_path(path)?;
    let text =
        std::fs::read(file).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", file.display())))?;
    let lines = split_lines(&text);
    let total = lines.len() as u64;
    let set = start(config.builders(), interrupt)?;
    let (tx, queue) = unbounded();
    for line in lines {
        let _ = tx.send(line);
    }
    drop(tx);
    let tally = Tally::default();
    let started = Instant::now();
    let interrupted = std::thread::scope(|s| -> Result<bool, Error> {
        let (stop_progress, stopped) = bounded::<()>(0);
        if stderr_is_terminal() {
            let tally = &tally;
            std::thread::Builder::new()
                .name("cli-progress".into())
                .spawn_scoped(s, move || show_progress(tally, total, started, &stopped))?;
        }
        let interrupted = run_requests(&set, &queue, concurrency, interrupt, &tally, MissingId::LineNumber);
        drop(stop_progress);
        Ok(interrupted?)
    })?;
    let elapsed = started.elapsed();
    shut_down(&set);
    let (done, failed) = tally.get();
    eprintln!(
        "batch{}: {done} of {total} calls done, {failed} failed, in {:.2}s ({:.1} calls/s)",
        if interrupted { " interrupted" } else { "" },
        elapsed.as_secs_f64(),
        rate(done, elapsed),
    );
    Ok(match (interrupted, failed) {
        (true, _) => EXIT_INTERRUPTED,
        (false, 0) => EXIT_OK,
        (false, _) => EXIT_FAILED,
    })
}

/// `stats`: starts the pools and prints every pool's snapshot.
fn stats(path: &Path, interrupt: &Interrupt) -> Result<u8, Error> {
    let set = start(Config::from_path(path)?.builders(), interrupt)?;
    let (stats, interrupted) = watching_interrupt(&set, interrupt, || set.stats())?;
    match stats {
        Ok(stats) => println!("{}", serde_json::to_string_pretty(&stats)?),
        Err(e) if interrupted => report(&e),
        Err(e) => return Err(e),
    }
    shut_down(&set);
    Ok(if interrupted { EXIT_INTERRUPTED } else { EXIT_OK })
}

// ---------------------------------------------------------------------------------------------
// Pools, Ctrl-C and errors

/// Starts the pools `pools` describes; on an interrupt before they are all ready, exits the
/// process with 130 at once.
///
/// Start-up can take long (a slow import, a large model to load), and `build` blocks until every
/// worker is ready with no way to cancel it. So it runs on a thread of its own while this one
/// waits for either its result or the interrupt. No call has been made yet, so there is nothing
/// to drain, and waiting for the build only to shut it down would take as long as start-up: the
/// process exits, leaving the build thread behind. The workers go with it, as the library
/// promises: each worker sets its parent-death signal before it imports the adapter, bound to
/// its pool's dispatcher thread, which dies with the process; a worker not that far yet sees it
/// was orphaned (its `--parent-pid` is gone) and exits; and a worker that dies kills its own
/// process group, so the adapter's child processes go too.
fn start(pools: impl IntoIterator<Item = PoolBuilder>, interrupt: &Interrupt) -> Result<PoolSet, Error> {
    let builder = pools.into_iter().fold(PoolSet::builder(), PoolSetBuilder::pool);
    let (tx, built) = bounded(1);
    std::thread::Builder::new().name("cli-start".into()).spawn(move || {
        let _ = tx.send(builder.build());
    })?;
    select! {
        recv(built) -> set => set.unwrap_or_else(|_| {
            Err(io::Error::new(io::ErrorKind::Other, "the thread starting the pools panicked").into())
        }),
        recv(interrupt.pressed) -> _ => {
            eprintln!("snakepit: the pools were still starting: quitting without waiting for them");
            std::process::exit(i32::from(EXIT_INTERRUPTED));
        }
    }
}

/// Shuts the pools down; in-flight calls get the grace period. What went wrong is only
/// reported: every worker is gone either way.
fn shut_down(set: &PoolSet) {
    if let Err(e) = set.shutdown() {
        eprintln!("snakepit: shutdown: {e}");
    }
}

/// Ctrl-C, SIGTERM or SIGHUP (ctrlc's `termination` feature: one handler for all three, which
/// cannot tell them apart), seen as a channel that disconnects at the first signal, so that any
/// number of `select!`s see it. A second signal quits at once.
struct Interrupt {
    pressed: Receiver<()>,
}

impl Interrupt {
    /// Sets the process's handler for the three signals (once per process). SIGHUP stays
    /// ignored if it was, as `nohup` leaves it: a hang-up must not stop a server run that way.
    fn install() -> Result<Interrupt, ctrlc::Error> {
        let (tx, pressed) = bounded::<()>(0);
        let tx = Mutex::new(Some(tx));
        let hangup_ignored = hangup_ignored();
        ctrlc::set_handler(move || {
            if tx.lock().take().is_some() {
                eprintln!(
                    "snakepit: interrupted: stopping; calls in flight get the grace period \
                     (a second Ctrl-C, SIGTERM or SIGHUP quits now)"
                );
            } else {
                eprintln!("snakepit: interrupted again: quitting now");
                std::process::exit(i32::from(EXIT_INTERRUPTED));
            }
        })?;
        if hangup_ignored {
            // SAFETY: sets a signal's disposition to "ignore"; no handler code is involved.
            unsafe { libc::signal(libc::SIGHUP, libc::SIG_IGN) };
        }
        Ok(Interrupt { pressed })
    }

    fn is_pressed(&self) -> bool {
        matches!(self.pressed.try_recv(), Err(TryRecvError::Disconnected))
    }
}

/// Whether SIGHUP is ignored (inherited from `nohup`, say), read without changing it.
fn hangup_ignored() -> bool {
    // SAFETY: `sigaction` with no new action only fills in `old`, a plain C struct for which
    // all zeros is a valid value.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGHUP, std::ptr::null(), &mut old) == 0 && old.sa_sigaction == libc::SIG_IGN
    }
}

/// Runs `work` on a thread of its own while watching for Ctrl-C (also one pressed while the
/// pools were starting). On Ctrl-C the pools are shut down, which gives the call in flight
/// the grace period. Returns what `work` returned and whether Ctrl-C was pressed.
fn watching_interrupt<T: Send>(
    set: &PoolSet,
    interrupt: &Interrupt,
    work: impl FnOnce() -> T + Send,
) -> io::Result<(T, bool)> {
    std::thread::scope(|s| {
        let (finished, done) = bounded::<()>(0);
        let worker = std::thread::Builder::new().name("cli-call".into()).spawn_scoped(s, move || {
            let _finished = finished; // dropped when `work` returns, which `done` sees
            work()
        })?;
        let interrupted = interrupt.is_pressed()
            || select! {
                recv(done) -> _ => false,
                recv(interrupt.pressed) -> _ => true,
            };
        if interrupted {
            shut_down(set);
        }
        let value = worker.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        Ok((value, interrupted))
    })
}

/// Prints an error for a person: a Python exception with its traceback, a configuration
/// problem per line, anything else in one line.
fn report(e: &Error) {
    match e {
        Error::Python(exc) => {
            eprintln!("python exception {}: {}", exc.error_type, exc.message);
            if !exc.traceback.is_empty() {
                eprintln!("{}", exc.traceback.trim_end());
            }
        }
        Error::ConfigFile { problems } => problems.iter().for_each(|p| eprintln!("{p}")),
        other => eprintln!("snakepit: {other}"),
    }
}

// ---------------------------------------------------------------------------------------------
// JSON lines: requests in, replies out

/// One non-blank input line and its number (from 1).
struct Line {
    number: u64,
    bytes: Vec<u8>,
}

/// The `id` of a reply to a request that has none.
#[derive(Debug, Clone, Copy)]
enum MissingId {
    Null,
    LineNumber,
}

struct Request {
    id: Option<Value>,
    pool: Option<String>,
    command: String,
    args: Value,
    session: Option<String>,
    stream: bool,
}

/// The sessions the request lines named, by pool and name: opened (strict) by the first line
/// that names one, closed when the pools shut down.
#[derive(Default)]
struct Sessions(Mutex<HashMap<(String, String), Arc<Session>>>);

impl Sessions {
    fn get(&self, pool: &Pool, name: &str) -> Result<Arc<Session>, Error> {
        let mut open = self.0.lock();
        let key = (pool.name().to_string(), name.to_string());
        if let Some(session) = open.get(&key) {
            return Ok(session.clone());
        }
        let session = Arc::new(pool.session()?);
        open.insert(key, session.clone());
        Ok(session)
    }
}

/// A request that cannot be run: its id if one could be read, and why.
struct BadRequest {
    id: Option<Value>,
    message: String,
}

/// Calls done and failed, shared by the calling threads and the progress line.
#[derive(Default)]
struct Tally {
    done: AtomicU64,
    failed: AtomicU64,
}

impl Tally {
    fn record(&self, ok: bool) {
        if !ok {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        self.done.fetch_add(1, Ordering::Release);
    }

    /// (done, failed)
    fn get(&self) -> (u64, u64) {
        let done = self.done.load(Ordering::Acquire);
        (done, self.failed.load(Ordering::Relaxed))
    }
}

/// Reads stdin on a thread of its own, so that Ctrl-C need not wait for a line. The channel
/// ends at EOF (or a read error, which is reported).
fn read_stdin_lines() -> io::Result<Receiver<Line>> {
    let (tx, rx) = bounded(SERVE_CONCURRENCY);
    std::thread::Builder::new().name("cli-stdin".into()).spawn(move || {
        let mut stdin = io::stdin().lock();
        let mut number = 0;
        loop {
            let mut bytes = Vec::new();
            match stdin.read_until(b'\n', &mut bytes) {
                Ok(0) => return,
                Ok(_) => {
                    number += 1;
                    if is_blank(&bytes) {
                        continue;
                    }
                    if tx.send(Line { number, bytes }).is_err() {
                        return; // no longer taking work
                    }
                }
                Err(e) => {
                    eprintln!("snakepit: reading stdin: {e}");
                    return;
                }
            }
        }
    })?;
    Ok(rx)
}

/// The non-blank lines of a file.
fn split_lines(text: &[u8]) -> Vec<Line> {
    (1..)
        .zip(text.split(|&b| b == b'\n'))
        .filter(|(_, bytes)| !is_blank(bytes))
        .map(|(number, bytes)| Line { number, bytes: bytes.to_vec() })
        .collect()
}

fn is_blank(bytes: &[u8]) -> bool {
    bytes.iter().all(u8::is_ascii_whitespace)
}

/// Runs the call of every line from `lines` on `concurrency` threads and writes each reply to
/// stdout as it completes, until `lines` ends or Ctrl-C. On Ctrl-C no further line is taken and
/// the pools are shut down, which gives the calls in flight the grace period. Returns whether it
/// was interrupted; `Err` if a reply could not be written.
fn run_requests(
    set: &PoolSet,
    lines: &Receiver<Line>,
    concurrency: usize,
    interrupt: &Interrupt,
    tally: &Tally,
    missing_id: MissingId,
) -> io::Result<bool> {
    let write_error = Mutex::new(None);
    let sessions = Sessions::default();
    // A rendezvous channel: a line is either being run by a thread or not taken yet.
    let (jobs, taken) = bounded::<Line>(0);
    let interrupted = std::thread::scope(|s| -> io::Result<bool> {
        let jobs = jobs; // moved in, so that an early return here still ends the threads
        for i in 0..concurrency {
            let (taken, write_error, sessions) = (taken.clone(), &write_error, &sessions);
            std::thread::Builder::new().name(format!("cli-call-{i}")).spawn_scoped(s, move || {
                for line in taken {
                    let reply = answer(set, sessions, &line, missing_id, &mut |id, chunk| {
                        write_line(&serde_json::json!({"id": id, "chunk": chunk}))
                    });
                    tally.record(reply.ok);
                    if let Err(e) = write_reply(&reply) {
                        write_error.lock().get_or_insert(e);
                    }
                }
            })?;
        }
        let interrupted = hand_out(lines, &jobs, interrupt);
        drop(jobs);
        if interrupted {
            shut_down(set);
        }
        Ok(interrupted)
    })?;
    match write_error.into_inner() {
        Some(e) => Err(io::Error::new(e.kind(), format!("writing replies: {e}"))),
        None => Ok(interrupted),
    }
}

/// Passes lines to the calling threads until the lines end (`false`) or Ctrl-C (`true`).
fn hand_out(lines: &Receiver<Line>, jobs: &Sender<Line>, interrupt: &Interrupt) -> bool {
    loop {
        if interrupt.is_pressed() {
            return true;
        }
        let line = select! {
            recv(lines) -> line => match line {
                Ok(line) => line,
                Err(_) => return false,
            },
            recv(interrupt.pressed) -> _ => return true,
        };
        select! {
            send(jobs, line) -> sent => if sent.is_err() { return false },
            recv(interrupt.pressed) -> _ => return true,
        }
    }
}

/// A reply line: `{"id", "ok": true, "value"}` or `{"id", "ok": false, "error"}`.
#[derive(Serialize)]
struct Reply {
    id: Value,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ErrorReply>,
}

/// `{"kind", "message"}`, plus `type` and `traceback` for a Python exception.
#[derive(Serialize)]
struct ErrorReply {
    kind: &'static str,
    message: String,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    error_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    traceback: Option<String>,
}

impl Reply {
    fn new(id: Value, result: Result<Value, ErrorReply>) -> Reply {
        match result {
            Ok(value) => Reply { id, ok: true, value: Some(value), error: None },
            Err(error) => Reply { id, ok: false, value: None, error: Some(error) },
        }
    }
}

impl ErrorReply {
    fn new(kind: &'static str, message: String) -> ErrorReply {
        ErrorReply { kind, message, error_type: None, traceback: None }
    }
}

impl From<Error> for ErrorReply {
    fn from(e: Error) -> ErrorReply {
        match e {
            Error::Python(exc) => ErrorReply {
                kind: "python",
                message: exc.message,
                error_type: Some(exc.error_type),
                traceback: Some(exc.traceback),
            },
            other => ErrorReply::new(error_kind(&other), other.to_string()),
        }
    }
}

/// Runs one line's request and replies; a stream's chunks go to `on_chunk` as they come.
fn answer(
    set: &PoolSet,
    sessions: &Sessions,
    line: &Line,
    missing_id: MissingId,
    on_chunk: &mut dyn FnMut(&Value, Value) -> io::Result<()>,
) -> Reply {
    let default_id = || match missing_id {
        MissingId::Null => Value::Null,
        MissingId::LineNumber => line.number.into(),
    };
    let request = match parse_request(&line.bytes) {
        Ok(request) => request,
        Err(bad) => {
            let id = bad.id.unwrap_or_else(default_id);
            return Reply::new(id, Err(ErrorReply::new("bad_request", bad.message)));
        }
    };
    let id = request.id.unwrap_or_else(default_id);
    let pool = match &request.pool {
        Some(name) => set.pool(name).map_err(ErrorReply::from),
        None => set.default_pool().map_err(|_| {
            let message = format!(
                "the request names no pool and none is named {DEFAULT_POOL:?}: the pools are {}",
                set.pool_names().join(", ")
            );
            ErrorReply::new("unknown_pool", message)
        }),
    };
    let result = pool.and_then(|pool| {
        match &request.session {
            Some(name) => sessions.get(pool, name).and_then(|s| s.call(&request.command, request.args)),
            None if request.stream => {
                return (|| {
                    let mut stream = pool.stream(&request.command, request.args)?;
                    for chunk in &mut stream {
                        on_chunk(&id, chunk?)?;
                    }
                    Ok::<Value, Error>(stream.returned().cloned().unwrap_or(Value::Null))
                })()
                .map_err(ErrorReply::from)
            }
            None => pool.call(&request.command, request.args),
        }
        .map_err(ErrorReply::from)
    });
    Reply::new(id, result)
}

/// `{"id", "pool", "command", "args"}`; any other key is refused, so a typo is never ignored.
fn parse_request(bytes: &[u8]) -> Result<Request, BadRequest> {
    let bad = |id: &Option<Value>, message: String| BadRequest { id: id.clone(), message };
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| bad(&None, format!("not valid JSON: {e}")))?;
    let Value::Object(mut request) = value else {
        return Err(bad(&None, format!("expected a JSON object, found {value}")));
    };
    let id = request.remove("id");
    let keys = ["pool", "command", "args", "session", "stream"];
    if let Some(key) = request.keys().find(|k| !keys.contains(&k.as_str())) {
        return Err(bad(
            &id,
            format!("{key}: unknown key; a request has id, pool, command, args, session and stream"),
        ));
    }
    let command = match request.remove("command") {
        Some(Value::String(command)) => command,
        Some(other) => return Err(bad(&id, format!("command: expected a string, found {other}"))),
        None => return Err(bad(&id, "command: missing".into())),
    };
    let pool = match request.remove("pool") {
        None | Some(Value::Null) => None,
        Some(Value::String(pool)) => Some(pool),
        Some(other) => return Err(bad(&id, format!("pool: expected a string, found {other}"))),
    };
    let session = match request.remove("session") {
        None | Some(Value::Null) => None,
        Some(Value::String(name)) if !name.is_empty() => Some(name),
        Some(other) => return Err(bad(&id, format!("session: expected a non-empty string, found {other}"))),
    };
    let stream = match request.remove("stream") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Bool(true)) if session.is_some() => {
            return Err(bad(&id, "stream: streams run outside sessions; drop one of the two".into()))
        }
        Some(Value::Bool(true)) => true,
        Some(other) => return Err(bad(&id, format!("stream: expected true or false, found {other}"))),
    };
    let args = request.remove("args").unwrap_or(Value::Null);
    Ok(Request { id, pool, command, args, session, stream })
}

fn error_kind(e: &Error) -> &'static str {
    match e {
        Error::Python(_) => "python",
        Error::Timeout { .. } => "timeout",
        Error::WorkerDied { .. } => "worker_died",
        Error::QueueFull { .. } => "queue_full",
        Error::Degraded { .. } => "degraded",
        Error::ShuttingDown => "shutting_down",
        Error::UnknownPool { .. } => "unknown_pool",
        Error::UnknownCommand { .. } => "unknown_command",
        Error::InvalidArgs(_) => "invalid_args",
        Error::Binary(_) => "binary",
        Error::FrameTooLarge { .. } => "frame_too_large",
        Error::Protocol(_) => "protocol",
        Error::Json(_) => "json",
        Error::Io(_) => "io",
        Error::SessionLost { .. } => "session_lost",
        Error::SessionBusy { .. } => "session_busy",
        Error::SessionClosed { .. } => "session_closed",
        Error::TooManySessions { .. } => "too_many_sessions",
        Error::Cancelled => "cancelled",
        _ => "other",
    }
}

/// Writes one reply as one whole line, flushed, under stdout's lock.
fn write_reply(reply: &Reply) -> io::Result<()> {
    write_line(reply)
}

/// Writes one JSON value as one whole line, flushed, under stdout's lock.
fn write_line(value: &impl Serialize) -> io::Result<()> {
    let mut line = serde_json::to_string(value).map_err(io::Error::from)?;
    line.push('\n');
    let mut out = io::stdout().lock();
    out.write_all(line.as_bytes())?;
    out.flush()
}

// ---------------------------------------------------------------------------------------------
// Progress

fn stderr_is_terminal() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}

/// Redraws one line on stderr until `stopped` disconnects, then clears it.
fn show_progress(tally: &Tally, total: u64, started: Instant, stopped: &Receiver<()>) {
    let mut err = io::stderr();
    while let Err(crossbeam_channel::RecvTimeoutError::Timeout) = stopped.recv_timeout(PROGRESS_INTERVAL) {
        let (done, failed) = tally.get();
        let rate = rate(done, started.elapsed());
        let _ = write!(err, "\r\x1b[K{done}/{total} calls, {rate:.1}/s, {failed} errors");
        let _ = err.flush();
    }
    let _ = write!(err, "\r\x1b[K");
    let _ = err.flush();
}

fn rate(done: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        done as f64 / secs
    } else {
        0.0
    }
}
