//! The JSON configuration file: several named pools with shared defaults, or the small legacy
//! single-pool form. Everything is validated before any process starts, and every problem is
//! reported at once with its place in the file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value};

use crate::config::{PoolBuilder, Profile};
use crate::error::{Error, Result};
use crate::protocol::json_kind;

/// Every key a pool takes, with its default and meaning. The README's table is checked
/// against this list by a test, so the two cannot drift apart.
pub const POOL_KEYS: &[(&str, &str, &str)] = &[
    ("name", "\"default\"", "the pool's name; calls are routed by it"),
    ("size", "number of CPUs", "worker processes kept running (1 to 1024)"),
    (
        "profile",
        "\"process\"",
        "\"process\": one call at a time per worker; \"thread\": `threads_per_worker` at once",
    ),
    ("threads_per_worker", "8", "calls each worker runs at once in the thread profile"),
    ("allow_unsafe_threads", "false", "let the thread profile run commands not declared thread-safe"),
    (
        "kill_on_timeout",
        "false",
        "thread profile: kill a worker whose call overran (its other calls fail too)",
    ),
    ("adapter", "none", "the module whose `@snakepit.command` functions are served"),
    ("python", "`$SNAKEPIT_PYTHON`, else `python3`", "the interpreter"),
    ("python_path", "[]", "folders put on the workers' `PYTHONPATH`"),
    ("args", "[]", "extra arguments for the adapter, as `snakepit.ARGS` in the worker"),
    ("env", "{}", "environment variables for the workers"),
    ("launcher", "none", "a command prefix the workers run under, e.g. `[\"nice\", \"-n\", \"10\"]`"),
    ("startup_timeout", "\"30s\"", "spawn to `ready`, per worker"),
    ("request_timeout", "\"30s\"", "a call's whole deadline: queue wait plus execution"),
    ("queue_timeout", "the whole deadline", "the longest a call may wait for a worker"),
    ("shutdown_timeout", "\"5s\"", "grace period for in-flight calls at shutdown"),
    (
        "stop_timeout",
        "\"5s\"",
        "how long a worker asked to stop may take before SIGTERM (and again before SIGKILL)",
    ),
    (
        "cancel_grace",
        "\"250ms\"",
        "how long a cancelled or timed-out call has at each step: asked, interrupted, given up on",
    ),
    ("max_queue", "1024", "calls that may wait; more get `QueueFull`"),
    ("max_frame_size", "\"64MiB\"", "the largest frame either side may send"),
    ("ttl", "off", "recycle a worker once it is this old (plus jitter)"),
    ("max_requests", "off", "recycle a worker after this many calls (plus jitter)"),
    ("max_memory", "off", "recycle a worker whose process tree's RSS passes this size"),
    ("max_memory_hard", "off", "kill a worker whose process tree's RSS passes this size"),
    ("jitter", "0.1", "the largest fraction added to each recycling limit, per worker"),
    ("max_concurrent_recycles", "1", "workers recycled at the same time"),
    ("health_interval", "off", "ping idle workers this often"),
    ("health_timeout", "\"5s\"", "how long a pinged worker has to answer"),
    ("reaper_interval", "\"1s\"", "how often memory is read (when a memory limit is set)"),
    ("degraded_after", "3", "start-up failures in a row before a pool with no ready worker fails calls fast"),
    ("slow_call_log", "off", "log the Python stacks of a call still running after this long"),
    ("session_ttl", "off", "end a session after this long without a call"),
    ("max_sessions", "100000", "sessions open at once; more get `TooManySessions`"),
    ("session_drain", "\"30s\"", "how long a worker being recycled keeps serving its strict sessions"),
    (
        "init",
        "none",
        "`{\"command\": ..., \"args\": ...}`: run once on every worker before it counts as ready",
    ),
];

/// The keys whose `null` means "off" (to override a default).
const OPTIONAL: &[&str] = &[
    "ttl",
    "max_requests",
    "max_memory",
    "max_memory_hard",
    "health_interval",
    "queue_timeout",
    "session_ttl",
    "init",
];

/// The keys the file itself takes at the top level, besides the legacy single-pool keys.
const TOP_KEYS: &[&str] = &["defaults", "pools"];

/// A validated configuration: the pools it describes, ready to start with
/// [`PoolSet::from_config`](crate::PoolSet::from_config).
#[derive(Debug, Clone)]
pub struct Config {
    pools: Vec<PoolBuilder>,
}

impl Config {
    /// Reads and validates a configuration file. Relative `python_path` folders (and a
    /// relative `python` path such as `.venv/bin/python`) are read from the file's folder, not
    /// from the current directory; a folder that does not exist is a problem. (Under a
    /// `launcher` they name places on the far side and are passed on as written.)
    pub fn from_path(path: impl AsRef<Path>) -> Result<Config> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::ConfigFile {
            problems: vec![format!("{}: cannot read: {e}", path.display())],
        })?;
        let base = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        Config::parse(&text, &base)
    }

    /// Parses and validates a configuration from JSON text. Relative paths are read from the
    /// current directory.
    pub fn from_json_str(text: &str) -> Result<Config> {
        Config::parse(text, Path::new("."))
    }

    fn parse(text: &str, base: &Path) -> Result<Config> {
        let root: Value = serde_json::from_str(text)
            .map_err(|e| Error::ConfigFile { problems: vec![format!("not valid JSON: {e}")] })?;
        let mut problems = Vec::new();
        let pools = parse_root(&root, base, &mut problems);
        if problems.is_empty() {
            Ok(Config { pools })
        } else {
            Err(Error::ConfigFile { problems })
        }
    }

    /// The pools' names, in file order.
    pub fn pool_names(&self) -> Vec<String> {
        self.pools.iter().map(|p| p.config.name.clone()).collect()
    }

    /// The pools as builders, to adjust before starting them.
    pub fn builders(&self) -> Vec<PoolBuilder> {
        self.pools.clone()
    }
}

fn parse_root(root: &Value, base: &Path, problems: &mut Vec<String>) -> Vec<PoolBuilder> {
    let Some(obj) = root.as_object() else {
        problems.push(format!("(top level): expected an object, found {}", json_kind(root)));
        return Vec::new();
    };
    if !obj.contains_key("pools") {
        return parse_legacy(obj, base, problems);
    }
    for key in obj.keys() {
        if !TOP_KEYS.contains(&key.as_str()) {
            let hint = if POOL_KEYS.iter().any(|(k, _, _)| k == key) {
                " (pool settings go in a pool, or in `defaults` for every pool)".to_string()
            } else {
                suggest(key, TOP_KEYS.iter().copied())
            };
            problems.push(format!("{key}: unknown key{hint}"));
        }
    }
    let defaults = match obj.get("defaults") {
        None => Map::new(),
        Some(Value::Object(d)) => {
            if d.contains_key("name") {
                problems.push("defaults.name: a name cannot be a default; name each pool".into());
            }
            d.clone()
        }
        Some(other) => {
            problems.push(format!("defaults: expected an object, found {}", json_kind(other)));
            Map::new()
        }
    };
    let pools = match &obj["pools"] {
        Value::Array(pools) if pools.is_empty() => {
            problems.push("pools: expected at least one pool, found none".into());
            return Vec::new();
        }
        Value::Array(pools) => pools,
        other => {
            problems.push(format!("pools: expected an array of pools, found {}", json_kind(other)));
            return Vec::new();
        }
    };
    let mut builders = Vec::new();
    let mut names: Vec<(String, usize)> = Vec::new();
    for (i, pool) in pools.iter().enumerate() {
        let at = format!("pools[{i}]");
        let Some(pool) = pool.as_object() else {
            problems.push(format!("{at}: expected an object, found {}", json_kind(pool)));
            continue;
        };
        if !pool.contains_key("name") {
            problems.push(format!("{at}.name: every pool in `pools` needs a name"));
        }
        // The pool's own keys override the defaults.
        let mut merged = defaults.clone();
        merged.extend(pool.iter().map(|(k, v)| (k.clone(), v.clone())));
        let origin = |k: &str| if pool.contains_key(k) { at.as_str() } else { "defaults" };
        let builder = parse_pool(&merged, &at, origin, base, problems);
        let name = builder.config.name.clone();
        if let Some((_, first)) = names.iter().find(|(n, _)| *n == name) {
            problems.push(format!("{at}.name: {name:?} is already the name of pools[{first}]"));
        }
        names.push((name, i));
        builders.push(builder);
    }
    builders
}

/// The small single-pool form: pool keys at the top level (`pool_size` for `size`).
fn parse_legacy(obj: &Map<String, Value>, base: &Path, problems: &mut Vec<String>) -> Vec<PoolBuilder> {
    let mut pool = Map::new();
    for (k, v) in obj {
        let key = if k == "pool_size" { "size" } else { k.as_str() };
        if key == "size" && pool.contains_key("size") {
            problems.push("pool_size: give `pool_size` or `size`, not both".into());
        }
        pool.insert(key.to_string(), v.clone());
    }
    vec![parse_pool(&pool, "", |_| "", base, problems)]
}

/// Reads one pool's keys into a builder, recording every problem. `origin(key)` says where a
/// key came from (the pool or `defaults`), for the problem's path. Relative paths are read
/// from `base` (unless the pool has a launcher: then they are the far side's).
fn parse_pool<'a>(
    pool: &Map<String, Value>,
    at: &str,
    origin: impl Fn(&str) -> &'a str,
    base: &Path,
    problems: &mut Vec<String>,
) -> PoolBuilder {
    let mut b = PoolBuilder::default();
    let local = !pool.get("launcher").is_some_and(|l| !l.is_null());
    let resolve = |p: &str| if local { base.join(p) } else { PathBuf::from(p) };
    for (key, value) in pool {
        let mut missing = Vec::new();
        let place = origin(key);
        let path = if place.is_empty() { key.clone() } else { format!("{place}.{key}") };
        let mut bad =
            |expected: &str| problems.push(format!("{path}: expected {expected}, found {}", show(value)));
        let dur = |v: &Value| parse_duration(v);
        // `null` turns off a limit that `defaults` set (the limits are off unless set).
        if value.is_null() && OPTIONAL.contains(&key.as_str()) {
            let c = &mut b.config;
            match key.as_str() {
                "ttl" => c.policy.ttl = None,
                "max_requests" => c.policy.max_requests = None,
                "max_memory" => c.policy.max_memory = None,
                "max_memory_hard" => c.policy.max_memory_hard = None,
                "health_interval" => c.health_interval = None,
                "session_ttl" => c.session_ttl = None,
                "slow_call_log" => c.slow_call_log = None,
                "init" => c.init = None,
                _ => c.queue_timeout = None,
            }
            continue;
        }
        b = match key.as_str() {
            "name" => match value.as_str() {
                Some(s) => b.name(s),
                None => {
                    bad("a string");
                    b
                }
            },
            "size" => match positive(value) {
                Some(n) => b.size(n as usize),
                None => {
                    bad("a positive integer");
                    b
                }
            },
            "profile" => match value.as_str() {
                Some("process") => b.profile(Profile::Process),
                Some("thread") => b.profile(Profile::Thread),
                _ => {
                    bad("\"process\" or \"thread\"");
                    b
                }
            },
            "allow_unsafe_threads" | "kill_on_timeout" => match value.as_bool() {
                Some(flag) if key == "allow_unsafe_threads" => b.allow_unsafe_threads(flag),
                Some(flag) => b.kill_on_timeout(flag),
                None => {
                    bad("true or false");
                    b
                }
            },
            "adapter" => match value.as_str() {
                Some(s) => b.adapter(s),
                None => {
                    bad("a module name");
                    b
                }
            },
            // A path (with a `/`) is read from the file's folder; a bare name is looked up on PATH.
            "python" => match value.as_str() {
                Some(s) if s.contains('/') => b.python(resolve(s)),
                Some(s) if !s.is_empty() => b.python(s),
                _ => {
                    bad("a path or command name");
                    b
                }
            },
            "python_path" => match strings(value) {
                Some(dirs) => dirs.into_iter().fold(b, |b, d| {
                    let dir = resolve(&d);
                    if local && !dir.is_dir() {
                        missing.push(format!(
                            "{path}: folder {d:?} does not exist (looked for {})",
                            dir.display()
                        ));
                    }
                    b.python_path(dir)
                }),
                None => {
                    bad("an array of folder names");
                    b
                }
            },
            "args" => match strings(value) {
                Some(args) => b.args(args),
                None => {
                    bad("an array of strings");
                    b
                }
            },
            "env" => match value.as_object() {
                Some(env) if env.values().all(Value::is_string) => {
                    env.iter().fold(b, |b, (k, v)| b.env(k, v.as_str().unwrap_or_default()))
                }
                _ => {
                    bad("an object of strings");
                    b
                }
            },
            "launcher" => match strings(value) {
                Some(cmd) if !cmd.is_empty() && !cmd[0].is_empty() => b.launcher(cmd),
                Some(_) => {
                    problems
                        .push(format!("{path}: a launcher needs at least a program, found an empty list"));
                    b
                }
                None => {
                    bad("an array of strings, the program first");
                    b
                }
            },
            "startup_timeout" | "request_timeout" | "queue_timeout" | "shutdown_timeout" | "stop_timeout"
            | "ttl" | "health_interval" | "health_timeout" | "reaper_interval" | "session_ttl"
            | "session_drain" | "slow_call_log" | "cancel_grace" => match dur(value) {
                Some(d) if !d.is_zero() => match key.as_str() {
                    "cancel_grace" => b.cancel_grace(d),
                    "slow_call_log" => b.slow_call_log(d),
                    "session_ttl" => b.session_ttl(d),
                    "session_drain" => b.session_drain(d),
                    "startup_timeout" => b.startup_timeout(d),
                    "request_timeout" => b.request_timeout(d),
                    "queue_timeout" => b.queue_timeout(d),
                    "shutdown_timeout" => b.shutdown_timeout(d),
                    "stop_timeout" => b.stop_timeout(d),
                    "ttl" => b.ttl(d),
                    "health_interval" => b.health_interval(d),
                    "health_timeout" => b.health_timeout(d),
                    _ => b.reaper_interval(d),
                },
                _ => {
                    bad("a duration above zero such as \"500ms\", \"30s\", \"5m\", \"1h\" or milliseconds");
                    b
                }
            },
            "max_queue" => match value.as_u64() {
                Some(n) => b.max_queue(n as usize),
                None => {
                    bad("a non-negative integer");
                    b
                }
            },
            "init" => match value.as_object().map(|o| (o.get("command").and_then(Value::as_str), o)) {
                Some((Some(command), o))
                    if !command.is_empty() && o.keys().all(|k| k == "command" || k == "args") =>
                {
                    b.init(command, o.get("args").cloned().unwrap_or(Value::Null))
                }
                _ => {
                    bad("an object {\"command\": name, \"args\": object, array or null}");
                    b
                }
            },
            "max_requests"
            | "max_concurrent_recycles"
            | "degraded_after"
            | "threads_per_worker"
            | "max_sessions" => match positive(value) {
                Some(n) => match key.as_str() {
                    "max_sessions" => b.max_sessions(n as usize),
                    "max_requests" => b.max_requests(n),
                    "threads_per_worker" => b.threads_per_worker(n as usize),
                    "max_concurrent_recycles" => b.max_concurrent_recycles(n as usize),
                    _ => b.degraded_after(n.min(u64::from(u32::MAX)) as u32),
                },
                None => {
                    bad("a positive integer");
                    b
                }
            },
            "max_frame_size" | "max_memory" | "max_memory_hard" => match parse_size(value) {
                Some(n) if n > 0 => match key.as_str() {
                    "max_frame_size" => b.max_frame_size(n as usize),
                    "max_memory" => b.max_memory(n),
                    _ => b.max_memory_hard(n),
                },
                _ => {
                    bad("a size above zero such as \"512MB\" or bytes");
                    b
                }
            },
            "jitter" => match value.as_f64() {
                Some(j) if (0.0..=1.0).contains(&j) => b.jitter(j),
                _ => {
                    bad("a fraction between 0 and 1");
                    b
                }
            },
            _ => {
                // In the single-pool form the file's own keys are candidates too (`pool` for
                // `pools`).
                let top = if at.is_empty() { TOP_KEYS } else { &[] };
                let hint = suggest(key, POOL_KEYS.iter().map(|(k, _, _)| *k).chain(top.iter().copied()));
                problems.push(format!("{path}: unknown key{hint}"));
                b
            }
        };
        problems.extend(missing);
    }
    // Whatever the per-key checks let through, the builder's own validation still sees.
    for e in b.config.problems() {
        if let Error::Config { setting, message } = e {
            let path = if at.is_empty() { setting } else { format!("{at}.{setting}") };
            problems.push(format!("{path}: {message}"));
        }
    }
    b
}

fn positive(v: &Value) -> Option<u64> {
    v.as_u64().filter(|&n| n > 0)
}

fn strings(v: &Value) -> Option<Vec<String>> {
    v.as_array()?.iter().map(|s| s.as_str().map(str::to_string)).collect()
}

/// `"500ms"`, `"30s"`, `"5m"`, `"1h"`, or a number of milliseconds.
pub(crate) fn parse_duration(v: &Value) -> Option<Duration> {
    if let Some(ms) = v.as_u64() {
        return Some(Duration::from_millis(ms));
    }
    let s = v.as_str()?.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (number, unit) = s.split_at(split);
    let n: f64 = number.parse().ok()?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    };
    Duration::try_from_secs_f64(secs).ok()
}

/// `"512MB"`, `"2GiB"`, `"64KB"` (binary multiples: MB = 1024² bytes), or a number of bytes.
pub(crate) fn parse_size(v: &Value) -> Option<u64> {
    if let Some(n) = v.as_u64() {
        return Some(n);
    }
    let s = v.as_str()?.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: f64 = number.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "KB" | "KIB" | "K" => 1 << 10,
        "MB" | "MIB" | "M" => 1 << 20,
        "GB" | "GIB" | "G" => 1 << 30,
        _ => return None,
    };
    let bytes = n * mult as f64;
    (bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64).then_some(bytes as u64)
}

/// " (did you mean `x`?)" for a near miss, else the known keys.
fn suggest<'a>(key: &str, known: impl Iterator<Item = &'a str> + Clone) -> String {
    let best = known.clone().map(|k| (edit_distance(key, k), k)).min();
    match best {
        Some((d, k)) if d <= 2 || (key.len() > 3 && k.contains(key)) => format!(" (did you mean `{k}`?)"),
        _ => format!("; known keys: {}", known.collect::<Vec<_>>().join(", ")),
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// A value as it appears in the file, shortened.
fn show(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 60 {
        format!("{}...", &s[..s.char_indices().nth(57).map_or(s.len(), |(i, _)| i)])
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(json: &str) -> Vec<String> {
        match Config::from_json_str(json) {
            Err(Error::ConfigFile { problems }) => problems,
            Ok(_) => Vec::new(),
            Err(other) => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn durations_and_sizes() {
        let d = |s: Value| parse_duration(&s);
        assert_eq!(d("500ms".into()), Some(Duration::from_millis(500)));
        assert_eq!(d("30s".into()), Some(Duration::from_secs(30)));
        assert_eq!(d("5m".into()), Some(Duration::from_secs(300)));
        assert_eq!(d("1h".into()), Some(Duration::from_secs(3600)));
        assert_eq!(d("1.5s".into()), Some(Duration::from_millis(1500)));
        assert_eq!(d(250.into()), Some(Duration::from_millis(250)));
        for bad in [Value::from("5"), "5 parsecs".into(), "s".into(), (-3).into(), true.into(), "-1s".into()]
        {
            assert_eq!(parse_duration(&bad), None, "{bad}");
        }
        let z = |s: Value| parse_size(&s);
        assert_eq!(z("512MB".into()), Some(512 << 20));
        assert_eq!(z("2GiB".into()), Some(2 << 30));
        assert_eq!(z("64KB".into()), Some(64 << 10));
        assert_eq!(z("100".into()), Some(100));
        assert_eq!(z(4096.into()), Some(4096));
        assert_eq!(z("12 parsecs".into()), None);
        assert_eq!(z((-1).into()), None);
    }

    #[test]
    fn a_full_file_with_defaults() {
        let c = Config::from_json_str(
            r#"{
              "defaults": {"request_timeout": "10s", "env": {"A": "1"}},
              "pools": [
                {"name": "embed", "size": 2, "adapter": "m.embed", "max_requests": 500, "ttl": "1h"},
                {"name": "text", "size": 8, "request_timeout": 500, "max_memory": "512MB",
                 "launcher": ["nice", "-n", "5"], "args": ["--model", "small"]}
              ]
            }"#,
        )
        .unwrap();
        assert_eq!(c.pool_names(), vec!["embed", "text"]);
        let pools = c.builders();
        let (a, b) = (&pools[0].config, &pools[1].config);
        assert_eq!((a.size(), a.adapter(), a.max_requests()), (2, Some("m.embed"), Some(500)));
        assert_eq!(a.request_timeout(), Duration::from_secs(10), "from defaults");
        assert_eq!(b.request_timeout(), Duration::from_millis(500), "the pool's own value wins");
        assert_eq!(a.ttl(), Some(Duration::from_secs(3600)));
        assert_eq!(b.max_memory(), Some(512 << 20));
        assert_eq!(a.env(), &[("A".to_string(), "1".to_string())]);
        assert_eq!(b.launcher(), &["nice", "-n", "5"]);
        assert_eq!(b.args(), &["--model", "small"]);
    }

    #[test]
    fn the_legacy_form_is_one_pool_named_default() {
        let c =
            Config::from_json_str(r#"{"pool_size": 3, "adapter": "snakepit.demo", "ttl": "5m"}"#).unwrap();
        assert_eq!(c.pool_names(), vec!["default"]);
        let p = &c.builders()[0].config;
        assert_eq!(
            (p.size(), p.adapter(), p.ttl()),
            (3, Some("snakepit.demo"), Some(Duration::from_secs(300)))
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_place() {
        let got = problems(
            r#"{
              "defaults": {"max_reqests": 10},
              "pools": [
                {"name": "a", "size": 0},
                {"name": "b", "max_requests": -3, "launcher": []},
                {"name": "a", "ttl": "soon", "env": {"X": 1}},
                {"size": 2, "jitter": 2},
                "not a pool"
              ],
              "extra": true
            }"#,
        );
        let expect = [
            "extra: unknown key",
            "defaults.max_reqests: unknown key (did you mean `max_requests`?)",
            "pools[0].size: expected a positive integer, found 0",
            "pools[1].max_requests: expected a positive integer, found -3",
            "pools[1].launcher: a launcher needs at least a program, found an empty list",
            "pools[2].name: \"a\" is already the name of pools[0]",
            "pools[2].ttl: expected a duration",
            "pools[2].env: expected an object of strings, found {\"X\":1}",
            "pools[3].name: every pool in `pools` needs a name",
            "pools[3].jitter: expected a fraction between 0 and 1, found 2",
            "pools[4]: expected an object, found a string",
        ];
        for e in expect {
            assert!(got.iter().any(|p| p.starts_with(e)), "missing {e:?} in {got:#?}");
        }
    }

    #[test]
    fn null_turns_off_a_default_limit() {
        let c = Config::from_json_str(
            r#"{"defaults": {"ttl": "1h", "max_requests": 10}, "pools": [{"name": "a"}, {"name": "b", "ttl": null, "max_requests": null}]}"#,
        )
        .unwrap();
        let pools = c.builders();
        assert_eq!(pools[0].config.ttl(), Some(Duration::from_secs(3600)));
        assert_eq!((pools[1].config.ttl(), pools[1].config.max_requests()), (None, None));
        assert!(
            problems(r#"{"pools": [{"name": "a", "size": null}]}"#)[0].starts_with("pools[0].size: expected")
        );
    }

    #[test]
    fn typos_are_never_ignored() {
        let got = problems(r#"{"pool_size": 2, "adaptor": "x"}"#);
        assert_eq!(got, vec!["adaptor: unknown key (did you mean `adapter`?)"]);
        let got = problems(r#"{"pools": [{"name": "a", "zzz": 1}]}"#);
        assert!(got[0].starts_with("pools[0].zzz: unknown key; known keys: name, size"), "{got:?}");
        let got = problems(r#"{"pool": [{"name": "a"}]}"#);
        assert_eq!(got, vec!["pool: unknown key (did you mean `pools`?)"]);
        let got = problems(r#"{"pools": [{"name": "a"}], "size": 3}"#);
        assert!(got[0].contains("go in a pool, or in `defaults`"), "{got:?}");
    }

    #[test]
    fn bad_documents() {
        assert!(problems("[1]")[0].contains("expected an object"));
        assert!(problems("{nope")[0].starts_with("not valid JSON"));
        assert!(problems(r#"{"pools": []}"#)[0].contains("at least one pool"));
        let got = problems(r#"{"pools": [{"name": "a", "profile": "threads"}]}"#);
        assert!(got[0].contains("\"process\" or \"thread\""), "{got:?}");
        let c = Config::from_json_str(
            r#"{"pools": [{"name": "a", "profile": "thread", "threads_per_worker": 4}]}"#,
        );
        let p = c.unwrap().builders().remove(0).config;
        assert_eq!((p.profile(), p.capacity()), (Profile::Thread, 4));
        let missing = Config::from_path("/no/such/file.json").unwrap_err();
        assert!(missing.to_string().contains("/no/such/file.json"), "{missing}");
    }

    #[test]
    fn range_problems_of_one_pool_are_all_reported() {
        let got = problems(r#"{"pools": [{"name": "a", "size": 5000, "threads_per_worker": 5000}]}"#);
        assert!(got.iter().any(|p| p.starts_with("pools[0].size: must be between 1 and 1024")), "{got:?}");
        assert!(got.iter().any(|p| p.starts_with("pools[0].threads_per_worker: ")), "{got:?}");
    }

    #[test]
    fn the_builders_own_checks_still_apply() {
        let got = problems(r#"{"pools": [{"name": "bad name!"}]}"#);
        assert!(got[0].starts_with("pools[0].name: "), "{got:?}");
        let got = problems(r#"{"pools": [{"name": "a", "max_memory": "1GB", "max_memory_hard": "1MB"}]}"#);
        assert!(got[0].starts_with("pools[0].max_memory_hard: "), "{got:?}");
    }

    #[test]
    fn relative_paths_in_a_file_are_read_from_its_folder_and_missing_folders_are_problems() {
        let dir = std::env::temp_dir().join(format!("snakepit-config-paths-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("adapters")).unwrap();
        let file = dir.join("pools.json");
        std::fs::write(
            &file,
            r#"{"pools": [{"name": "a", "python_path": ["adapters"], "python": ".venv/bin/python"},
                          {"name": "b", "python_path": ["nope"]},
                          {"name": "c", "python_path": ["remote/dir"], "launcher": ["ssh", "h"]}]}"#,
        )
        .unwrap();
        let problems = match Config::from_path(&file) {
            Err(Error::ConfigFile { problems }) => problems,
            other => panic!("expected the missing folder to be a problem, got {other:?}"),
        };
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with("pools[1].python_path: folder \"nope\" does not exist"),
            "{problems:?}"
        );
        assert!(problems[0].contains(&dir.join("nope").display().to_string()), "{problems:?}");
        std::fs::create_dir_all(dir.join("nope")).unwrap();
        let config = Config::from_path(&file).unwrap();
        let pools = config.builders();
        assert_eq!(pools[0].config.python_path, [dir.join("adapters")]);
        assert_eq!(pools[0].config.python.as_deref(), Some(dir.join(".venv/bin/python").as_path()));
        assert_eq!(pools[2].config.python_path, [PathBuf::from("remote/dir")], "the far side's, as written");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
