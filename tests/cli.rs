//! The example CLI (`examples/snakepit.rs`) as a user runs it: real processes, real pools.
//! Every wait is bounded, and each test that starts workers proves they are gone afterwards.

mod common;

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{assert_gone, fixtures, wait_until};
use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError};
use serde_json::{json, Value};

/// Start-up, calls and shutdown of a CLI run: generous, for a loaded machine.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a reply on `serve` may take, pool start-up included.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// check

#[test]
fn check_accepts_a_good_file_without_starting_anything() {
    let dir = TempDir::new("check-good");
    // An interpreter that does not exist: `check` must not try to start it.
    let mut config = two_pools(&dir);
    config["defaults"]["python"] = json!("/no/such/python3");
    let path = dir.write("pools.json", &config.to_string());
    let out = run_cli(&[arg("--config"), path.into(), arg("check")]);
    out.assert_code(0);
    assert_eq!(out.stdout.trim(), "ok: 2 pools (default, blue)", "{out:?}");
}

#[test]
fn check_import_starts_each_pool_alone_with_one_worker_and_names_a_failed_import() {
    let dir = TempDir::new("check-import");
    let imported = dir.path().join("imported");
    std::fs::create_dir(&imported).expect("create the pid folder");
    // Each pool asks for several workers; `check --import` starts one of each.
    let config = json!({
        "defaults": {"python": "python3", "python_path": [fixtures()], "startup_timeout": "20s",
                     "shutdown_timeout": "10s"},
        "pools": [
            {"name": "text", "size": 3, "adapter": "cli_adapter", "env": {"CLI_RUN": dir.tag()}},
            {"name": "broken", "size": 2, "adapter": "cli_missing_module_adapter",
             "env": {"CLI_RUN": dir.tag()}},
            {"name": "quick", "size": 3, "adapter": "cli_slow_import_adapter",
             "env": {"CLI_RUN": dir.tag(), "SLOW_IMPORT_SECONDS": "0", "SLOW_IMPORT_PID_DIR": imported}}
        ]
    });
    let path = dir.write("pools.json", &config.to_string());
    let out = run_cli(&[arg("--config"), path.into(), arg("check"), arg("--import")]);
    out.assert_code(1);

    let python = real_python3();
    let pools: Vec<&str> = out.stdout.lines().filter(|l| !l.starts_with(' ')).collect();
    assert_eq!(pools.len(), 3, "one line per pool, in file order: {out:?}");
    let text = pools[0];
    assert!(text.starts_with(&format!("ok    pool \"text\": python {python} (3.")), "{out:?}");
    assert!(text.ends_with("), 3 commands (fail, slow, whoami)"), "the adapter's commands: {out:?}");
    assert!(pools[1].starts_with("FAIL  pool \"broken\": "), "{out:?}");
    for expected in
        [&format!("(python {python})"), "cli_missing_module_adapter", "snakepit_cli_no_such_module"]
    {
        assert!(pools[1].contains(expected), "missing {expected:?} in the FAIL line: {out:?}");
    }
    // The traceback follows, indented under its pool.
    for expected in ["Traceback (most recent call last)", "ModuleNotFoundError: No module named"] {
        assert!(out.stdout.lines().any(|l| l.starts_with("      ") && l.contains(expected)), "{out:?}");
    }
    let quick = pools[2];
    assert!(
        quick.starts_with("ok    pool \"quick\": python ") && quick.ends_with(", 1 command (whoami)"),
        "{out:?}"
    );

    let pids = pids_in(&imported);
    assert_eq!(pids.len(), 1, "one worker, not the pool's three: {pids:?}");
    assert_gone(&pids, Duration::from_secs(5));
    assert_no_worker_left(&dir);
}

#[test]
fn check_import_shuts_each_pool_down_before_the_next_and_a_signal_exits_130_leaving_no_worker() {
    // The second pool's import takes far longer than this test waits for the CLI to exit.
    let dir = TempDir::new("check-import-sigint");
    let first_pool = format!("{}-text", dir.tag());
    let importing = dir.path().join("importing");
    std::fs::create_dir(&importing).expect("create the pid folder");
    let config = json!({
        "defaults": {"python_path": [fixtures()], "startup_timeout": "600s", "shutdown_timeout": "10s"},
        "pools": [
            {"name": "text", "size": 2, "adapter": "cli_adapter",
             "env": {"CLI_RUN": dir.tag(), "CLI_LABEL": first_pool}},
            {"name": "slow", "size": 2, "adapter": "cli_slow_import_adapter",
             "env": {"CLI_RUN": dir.tag(), "SLOW_IMPORT_SECONDS": "600", "SLOW_IMPORT_PID_DIR": importing}}
        ]
    });
    let config = dir.write("pools.json", &config.to_string());
    let mut cli = Running::spawn(&[arg("check"), arg("--import"), arg("--config"), config.into()]);
    cli.stdin = None;
    let line = cli.stdout.recv_timeout(REPLY_TIMEOUT).expect("the first pool's line");
    assert!(line.starts_with("ok    pool \"text\": python "), "{line:?}");
    assert!(wait_until(REPLY_TIMEOUT, || !pids_in(&importing).is_empty()), "the slow import never began");
    let pids = pids_in(&importing);
    assert_eq!(pids.len(), 1, "one worker, not the pool's two: {pids:?}");
    // The first pool was shut down, every process of it reaped, before this one started.
    let first = processes_with(&format!("CLI_LABEL={first_pool}"));
    assert!(first.is_empty(), "the first pool's processes still run: {first:?}");
    cli.interrupt();

    // Bounded far below the slow import (600 s): the CLI must not wait for start-up to end.
    let out = cli.wait_for(Duration::from_secs(30));
    out.assert_code(130);
    assert_eq!(out.stdout, "", "no line for the pool that was still starting: {out:?}");
    assert!(out.stderr.contains("starting"), "the message says what was cut short: {out:?}");
    assert_gone(&pids, Duration::from_secs(5));
    assert_no_worker_left(&dir);
}

#[test]
fn doctor_reports_the_interpreter_and_its_libraries() {
    let out = run_cli(&[arg("doctor")]);
    out.assert_code(0);
    for expected in
        ["python ", "version      cpython 3.", "GIL          on", "recommended  profile \"process\""]
    {
        assert!(out.stdout.contains(expected), "missing {expected:?} in {out:?}");
    }
    // sqlite3 is in every CPython's standard library, and is not safe to share.
    assert!(out.stdout.lines().any(|l| l.contains("sqlite3") && l.contains("not safe to share")), "{out:?}");
}

#[test]
fn check_prints_every_problem_of_a_bad_file() {
    let dir = TempDir::new("check-bad");
    let path = dir.write(
        "pools.json",
        r#"{"pools": [{"name": "a", "size": 0}, {"name": "b", "max_requests": -3, "adaptor": "x"}]}"#,
    );
    let out = run_cli(&[arg("check"), arg("--config"), path.into()]);
    out.assert_code(1);
    assert_eq!(out.stdout, "", "{out:?}");
    let lines: Vec<&str> = out.stderr.lines().collect();
    for expected in [
        "pools[0].size: expected a positive integer, found 0",
        "pools[1].max_requests: expected a positive integer, found -3",
        "pools[1].adaptor: unknown key (did you mean `adapter`?)",
    ] {
        assert!(lines.iter().any(|l| l.starts_with(expected)), "missing {expected:?} in {out:?}");
    }
    assert_eq!(lines.len(), 3, "one line per problem: {out:?}");
}

// ---------------------------------------------------------------------------------------------
// call and usage

#[test]
fn call_routes_each_call_to_the_pool_named() {
    let dir = TempDir::new("call-route");
    let config = dir.write("pools.json", &two_pools(&dir).to_string());
    let mut pids = Vec::new();
    for pool in ["default", "blue"] {
        let out = run_cli(&[arg("--config"), config.clone().into(), arg("call"), arg(pool), arg("whoami")]);
        out.assert_code(0);
        let reply: Value = serde_json::from_str(out.stdout.trim()).expect("the result is JSON");
        assert_eq!(reply["label"], pool, "the call ran on a worker of pool {pool}: {out:?}");
        pids.push(reply["pid"].as_u64().expect("pid") as u32);
    }
    assert_ne!(pids[0], pids[1]);
    assert_gone(&pids, Duration::from_secs(5));
    assert_no_worker_left(&dir);
}

#[test]
fn call_reports_a_python_exception_with_its_traceback() {
    let dir = TempDir::new("call-python-error");
    let config = dir.write("pools.json", &two_pools(&dir).to_string());
    let out = run_cli(&[
        arg("call"),
        arg("blue"),
        arg("fail"),
        arg(r#"{"message": "kaput"}"#),
        arg("--config"),
        config.into(),
    ]);
    out.assert_code(1);
    assert_eq!(out.stdout, "", "{out:?}");
    for expected in ["ValueError", "kaput", "Traceback (most recent call last)", "cli_adapter.py"] {
        assert!(out.stderr.contains(expected), "missing {expected:?} in {out:?}");
    }
    assert_no_worker_left(&dir);
}

#[test]
fn bad_usage_exits_2_with_a_usage_line() {
    let dir = TempDir::new("usage");
    let config: OsString = dir.write("pools.json", &two_pools(&dir).to_string()).into();
    for args in [
        vec![arg("--config"), config.clone(), arg("call"), arg("blue")],
        vec![arg("--config"), config.clone(), arg("call"), arg("blue"), arg("whoami"), arg("{not json")],
        vec![arg("--config"), config.clone(), arg("frobnicate")],
        vec![arg("--config"), config.clone(), arg("stats"), arg("--concurrency"), arg("2")],
        vec![arg("--config"), config.clone(), arg("stats"), arg("--import")],
        vec![arg("--config"), config.clone(), arg("check"), arg("--import=yes")],
        vec![arg("check")],
    ] {
        let out = run_cli(&args);
        out.assert_code(2);
        assert!(out.stderr.contains("usage: snakepit --config FILE"), "{out:?}");
    }
    let help = run_cli(&[arg("--help")]);
    help.assert_code(0);
    assert!(help.stdout.contains("serve") && help.stdout.contains("--concurrency"), "{help:?}");
}

#[test]
fn stats_prints_every_pool() {
    let dir = TempDir::new("stats");
    let config = dir.write("pools.json", &two_pools(&dir).to_string());
    let out = run_cli(&[arg("--config"), config.into(), arg("stats")]);
    out.assert_code(0);
    let stats: Value = serde_json::from_str(&out.stdout).expect("stats are JSON");
    assert_eq!(stats["default"]["size"], 1, "{out:?}");
    assert_eq!(stats["blue"]["ready_workers"], 2, "{out:?}");
    let pids: Vec<u32> = ["default", "blue"]
        .iter()
        .flat_map(|p| stats[p]["workers"].as_array().expect("workers").clone())
        .map(|w| w["pid"].as_u64().expect("pid") as u32)
        .collect();
    assert_eq!(pids.len(), 3, "{out:?}");
    assert_gone(&pids, Duration::from_secs(5));
    assert_no_worker_left(&dir);
}

// ---------------------------------------------------------------------------------------------
// serve

#[test]
fn serve_lines_that_name_a_session_share_its_worker_and_state() {
    let dir = TempDir::new("serve-session");
    let config = json!({
        "pools": [{"name": "default", "size": 2, "python_path": [fixtures()], "adapter": "session_adapter",
                   "startup_timeout": "20s", "env": {"CLI_RUN": dir.tag()}}]
    });
    let config = dir.write("pools.json", &config.to_string());
    let mut cli = Running::spawn(&[arg("--config"), config.into(), arg("serve")]);
    let points: Vec<[i64; 2]> = (0..5).map(|x| [x, 2 * x + 1]).collect();
    cli.send(&json!({"id": "fit", "command": "fit", "args": {"points": points}, "session": "a"}).to_string());
    let fitted = cli.reply();
    assert_eq!(fitted["ok"], json!(true), "{fitted}");
    for x in 0..4 {
        cli.send(&json!({"id": x, "command": "predict", "args": {"x": x}, "session": "a"}).to_string());
        let reply = cli.reply();
        assert_eq!(reply["value"], json!(2.0 * x as f64 + 1.0), "{reply}");
    }
    // Another session has no model; a bad session name is a bad request.
    cli.send(r#"{"id": "b", "command": "predict", "args": {"x": 1}, "session": "b"}"#);
    let other = cli.reply();
    assert_eq!((&other["ok"], &other["error"]["type"]), (&json!(false), &json!("KeyError")), "{other}");
    cli.send(r#"{"id": "bad", "command": "state", "session": 7}"#);
    assert_eq!(cli.reply()["error"]["kind"], json!("bad_request"));
    let finished = cli.close_stdin_and_wait();
    assert_eq!(finished.code, Some(0), "{}", finished.stderr);
    assert_no_worker_left(&dir);
}

#[test]
fn call_stream_prints_a_line_per_chunk_and_serve_streams_before_its_reply() {
    let dir = TempDir::new("stream");
    let config = json!({
        "pools": [{"name": "default", "size": 1, "python_path": [fixtures()], "adapter": "stream_adapter",
                   "startup_timeout": "20s", "env": {"CLI_RUN": dir.tag()}}]
    });
    let config = dir.write("pools.json", &config.to_string());
    let out = run_cli(&[
        arg("--config"),
        config.clone().into(),
        arg("call"),
        arg("default"),
        arg("count"),
        arg(r#"{"n": 4}"#),
        arg("--stream"),
    ]);
    out.assert_code(0);
    assert_eq!(out.stdout, "0\n1\n2\n3\n", "{out:?}");
    let bad = run_cli(&[arg("--config"), config.clone().into(), arg("serve"), arg("--stream")]);
    bad.assert_code(2);
    let mut cli = Running::spawn(&[arg("--config"), config.into(), arg("serve")]);
    cli.send(r#"{"id": "s", "command": "count", "args": {"n": 3, "returns": "end"}, "stream": true}"#);
    for i in 0..3 {
        assert_eq!(cli.reply(), json!({"id": "s", "chunk": i}));
    }
    assert_eq!(cli.reply(), json!({"id": "s", "ok": true, "value": "end"}));
    cli.send(r#"{"id": "e", "command": "fails_after", "args": {"n": 1}, "stream": true}"#);
    assert_eq!(cli.reply(), json!({"id": "e", "chunk": 0}));
    let failed = cli.reply();
    assert_eq!((&failed["ok"], &failed["error"]["type"]), (&json!(false), &json!("ValueError")), "{failed}");
    cli.send(r#"{"id": "x", "command": "count", "stream": "yes"}"#);
    assert_eq!(cli.reply()["error"]["kind"], json!("bad_request"));
    let finished = cli.close_stdin_and_wait();
    assert_eq!(finished.code, Some(0), "{}", finished.stderr);
    assert_no_worker_left(&dir);
}

#[test]
fn serve_carries_bytes_and_arrays_as_base64_both_ways() {
    let dir = TempDir::new("serve-binary");
    let config = json!({
        "pools": [{"name": "default", "size": 1, "python_path": [fixtures()], "adapter": "binary_adapter",
                   "startup_timeout": "20s", "env": {"CLI_RUN": dir.tag()}}]
    });
    let config = dir.write("pools.json", &config.to_string());
    let mut cli = Running::spawn(&[arg("--config"), config.into(), arg("serve")]);
    cli.send(r#"{"id": 1, "command": "make", "args": {"kind": "bytes", "n": 3}}"#);
    assert_eq!(cli.reply(), json!({"id": 1, "ok": true, "value": {"__snakepit__": "bytes", "b64": "AAEC"}}));
    let array = json!({"__snakepit__": "array", "dtype": "int16", "shape": [2], "b64": "AQD//w=="});
    cli.send(&json!({"id": 2, "command": "describe", "args": [array]}).to_string());
    let described = cli.reply();
    assert_eq!(described["value"]["dtype"], json!("int16"), "{described}");
    assert_eq!(described["value"]["hex"], json!("0100ffff"), "{described}");
    cli.send(&json!({"id": 3, "command": "same", "args": [array]}).to_string());
    assert_eq!(cli.reply()["value"], array, "an array goes back in the same inline form");
    cli.send(r#"{"id": 4, "command": "describe", "args": [{"__snakepit__": "bytes", "b64": "%%%"}]}"#);
    let bad = cli.reply();
    assert_eq!((&bad["ok"], &bad["error"]["type"]), (&json!(false), &json!("ValueError")), "{bad}");
    let finished = cli.close_stdin_and_wait();
    assert_eq!(finished.code, Some(0), "{}", finished.stderr);
    assert_no_worker_left(&dir);
}

#[test]
fn serve_answers_json_lines_by_id_in_completion_order() {
    let dir = TempDir::new("serve");
    let config = dir.write("pools.json", &two_pools(&dir).to_string());
    let mut cli = Running::spawn(&[arg("--config"), config.into(), arg("serve")]);
    let requests = [
        r#"{"id": "slow", "pool": "blue", "command": "slow", "args": {"seconds": 1.0}}"#,
        r#"{"id": 1, "command": "whoami"}"#,
        r#"{"id": [2], "pool": "blue", "command": "whoami"}"#,
        r#"this is not JSON"#,
        r#""#,
        r#"{"id": 3, "pool": "nope", "command": "whoami"}"#,
        r#"{"id": 4, "pool": "blue", "command": "fail", "args": {"message": "kaput"}}"#,
        r#"{"id": 5, "comand": "whoami"}"#,
    ];
    for line in requests {
        cli.send(line);
    }
    let replies: Vec<Value> = (0..7).map(|_| cli.reply()).collect();
    let by_id = |id: Value| -> &Value {
        let found: Vec<&Value> = replies.iter().filter(|r| r["id"] == id).collect();
        assert_eq!(found.len(), 1, "one reply with id {id} in {replies:#?}");
        found[0]
    };

    let default = by_id(json!(1));
    assert_eq!(
        (&default["ok"], &default["value"]["label"]),
        (&json!(true), &json!("default")),
        "no pool: the default"
    );
    assert_eq!(by_id(json!([2]))["value"]["label"], "blue");
    let malformed = by_id(Value::Null);
    assert_eq!((&malformed["ok"], &malformed["error"]["kind"]), (&json!(false), &json!("bad_request")));
    let unknown = &by_id(json!(3))["error"];
    assert_eq!(unknown["kind"], "unknown_pool");
    let message = unknown["message"].as_str().unwrap();
    assert!(message.contains("nope") && message.contains("blue, default"), "the pools are listed: {unknown}");
    let raised = &by_id(json!(4))["error"];
    assert_eq!(
        (&raised["kind"], &raised["type"], &raised["message"]),
        (&json!("python"), &json!("ValueError"), &json!("kaput"))
    );
    assert!(raised["traceback"].as_str().unwrap().contains("Traceback"), "{raised}");
    assert!(by_id(json!(5))["error"]["message"].as_str().unwrap().contains("comand"), "a typo is named");
    assert_eq!(by_id(json!("slow"))["value"], 1.0);
    assert_eq!(replies.last().unwrap()["id"], "slow", "sent first, finished last: {replies:#?}");

    let pids = workers_of(&dir);
    assert_eq!(pids.len(), 3, "{pids:?}");
    let out = cli.close_stdin_and_wait();
    out.assert_code(0);
    assert_eq!(out.stdout, "", "no reply after the last request: {out:?}");
    assert_gone(&pids, Duration::from_secs(5));
    assert_no_worker_left(&dir);
}

#[test]
fn sigint_lets_the_call_in_flight_finish_then_exits_130_leaving_no_worker() {
    let dir = TempDir::new("sigint");
    let config = dir.write("pools.json", &two_pools(&dir).to_string());
    let mut cli = Running::spawn(&[arg("--config"), config.into(), arg("serve")]);
    // The workers' pids, from the workers themselves: both of blue's (two calls at once) and
    // the default pool's one.
    cli.send(r#"{"id": "d", "command": "whoami"}"#);
    cli.send(r#"{"id": "b1", "pool": "blue", "command": "whoami", "args": {"delay": 0.3}}"#);
    cli.send(r#"{"id": "b2", "pool": "blue", "command": "whoami", "args": {"delay": 0.3}}"#);
    let mut pids: Vec<u32> =
        (0..3).map(|_| cli.reply()["value"]["pid"].as_u64().expect("pid") as u32).collect();
    pids.sort_unstable();
    assert_eq!(pids, workers_of(&dir), "the workers' own pids are the CLI's workers");
    assert_eq!(pids.len(), 3, "three workers, each answered once: {pids:?}");

    let started = dir.path().join("slow-started");
    let args = json!({"seconds": 1.5, "started": started});
    let slow = json!({"id": "slow", "pool": "blue", "command": "slow", "args": args});
    cli.send(&slow.to_string());
    assert!(wait_until(REPLY_TIMEOUT, || started.exists()), "the slow call never started");
    cli.interrupt();

    // stdin stays open: the CLI stops reading it by itself.
    let out = cli.wait();
    out.assert_code(130);
    let replies: Vec<Value> =
        out.stdout.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    assert_eq!(
        replies,
        vec![json!({"id": "slow", "ok": true, "value": 1.5})],
        "the call in flight finished: {out:?}"
    );
    assert_gone(&pids, Duration::from_secs(5));
    assert_no_worker_left(&dir);
}

#[test]
fn sigterm_drains_like_ctrl_c_then_exits_130_leaving_no_worker() {
    // What `docker stop`, `systemctl stop` and `kill` send: the call in flight must finish and
    // print its reply, as on Ctrl-C, rather than the CLI dying at once.
    let dir = TempDir::new("sigterm");
    let config = dir.write("pools.json", &two_pools(&dir).to_string());
    let mut cli = Running::spawn(&[arg("--config"), config.into(), arg("serve")]);
    let started = dir.path().join("slow-started");
    let args = json!({"seconds": 1.0, "started": started});
    cli.send(&json!({"id": "slow", "pool": "blue", "command": "slow", "args": args}).to_string());
    assert!(wait_until(REPLY_TIMEOUT, || started.exists()), "the slow call never started");
    let pids = workers_of(&dir);
    assert_eq!(pids.len(), 3, "the pools have started: {pids:?}");
    cli.signal("TERM");

    // stdin stays open: the CLI stops reading it by itself.
    let out = cli.wait();
    out.assert_code(130);
    let replies: Vec<Value> =
        out.stdout.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    assert_eq!(
        replies,
        vec![json!({"id": "slow", "ok": true, "value": 1.0})],
        "the call in flight finished: {out:?}"
    );
    assert_gone(&pids, Duration::from_secs(5));
    assert_no_worker_left(&dir);
}

#[test]
fn sigint_while_the_pools_start_exits_130_without_waiting_leaving_no_worker() {
    // One pool starts at once; the other's adapter takes far longer to import than this test
    // waits for the CLI to exit, so only an exit that does not wait for start-up passes.
    let dir = TempDir::new("sigint-startup");
    let importing = dir.path().join("importing");
    std::fs::create_dir(&importing).expect("create the pid folder");
    let config = json!({
        "defaults": {"python_path": [fixtures()], "startup_timeout": "600s", "shutdown_timeout": "10s"},
        "pools": [
            {"name": "default", "size": 1, "adapter": "cli_adapter", "env": {"CLI_RUN": dir.tag()}},
            {"name": "slow", "size": 2, "adapter": "cli_slow_import_adapter",
             "env": {"CLI_RUN": dir.tag(), "SLOW_IMPORT_SECONDS": "600", "SLOW_IMPORT_PID_DIR": importing}}
        ]
    });
    let config = dir.write("pools.json", &config.to_string());
    let cli = Running::spawn(&[arg("--config"), config.into(), arg("serve")]);
    // The slow workers' pids, from the workers themselves, once both are importing.
    assert!(wait_until(REPLY_TIMEOUT, || pids_in(&importing).len() == 2), "the slow imports never began");
    // And every other process started for the test: the default pool's worker.
    let mut pids = pids_in(&importing);
    assert!(wait_until(REPLY_TIMEOUT, || workers_of(&dir).len() == 3), "{:?}", workers_of(&dir));
    pids.extend(workers_of(&dir));
    pids.sort_unstable();
    pids.dedup();
    assert_eq!(pids.len(), 3, "two slow workers and the default one: {pids:?}");
    cli.interrupt();

    // Bounded far below the slow import (600 s): the CLI must not wait for start-up to end.
    let out = cli.wait_for(Duration::from_secs(30));
    out.assert_code(130);
    assert_eq!(out.stdout, "", "no call was made: {out:?}");
    assert!(out.stderr.contains("starting"), "the message says what was cut short: {out:?}");
    assert_gone(&pids, Duration::from_secs(5));
    assert_no_worker_left(&dir);
}

// ---------------------------------------------------------------------------------------------
// batch

#[test]
fn batch_replies_to_every_line_and_fails_if_any_call_failed() {
    let dir = TempDir::new("batch-mixed");
    let config = dir.write("pools.json", &two_pools(&dir).to_string());
    let file = dir.write(
        "calls.jsonl",
        concat!(
            "{\"command\": \"whoami\"}\n",
            "{\"id\": \"b\", \"pool\": \"blue\", \"command\": \"whoami\"}\n",
            "{\"command\": \"fail\", \"args\": {\"message\": \"nope\"}}\n",
            "\n",
            "{broken\n",
        ),
    );
    let out = run_cli(&[arg("--config"), config.into(), arg("batch"), file.into()]);
    out.assert_code(1);
    let replies: Vec<Value> =
        out.stdout.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    assert_eq!(replies.len(), 4, "{out:?}");
    let reply = |id: Value| {
        replies.iter().find(|r| r["id"] == id).unwrap_or_else(|| panic!("no reply {id}: {out:?}"))
    };
    assert_eq!(reply(json!(1))["value"]["label"], "default", "a line without an id gets its line number");
    assert_eq!(reply(json!("b"))["value"]["label"], "blue");
    assert_eq!(reply(json!(3))["error"]["type"], "ValueError");
    assert_eq!(reply(json!(5))["error"]["kind"], "bad_request");
    let summary = out.stderr.lines().last().unwrap_or("");
    assert!(summary.starts_with("batch: 4 of 4 calls done, 2 failed, in "), "{out:?}");
    assert!(!out.stderr.contains('\r'), "no progress line when stderr is not a terminal: {out:?}");
    assert_no_worker_left(&dir);
}

#[test]
fn batch_keeps_at_most_concurrency_calls_in_flight() {
    let dir = TempDir::new("batch-concurrency");
    let config = dir.write("pools.json", &two_pools(&dir).to_string());
    let line = "{\"pool\": \"blue\", \"command\": \"slow\", \"args\": {\"seconds\": 0.25}}\n";
    let file = dir.write("calls.jsonl", &line.repeat(4));
    // `--config` after the subcommand's own flag. Blue has two workers, so only the limit of
    // one call in flight makes these four calls take a second.
    let out =
        run_cli(&[arg("batch"), file.into(), arg("--concurrency"), arg("1"), arg("--config"), config.into()]);
    out.assert_code(0);
    assert_eq!(out.stdout.lines().count(), 4, "{out:?}");
    assert!(out.stdout.lines().all(|l| l.contains(r#""ok":true"#)), "{out:?}");
    let summary = out.stderr.lines().last().unwrap_or("");
    assert!(summary.starts_with("batch: 4 of 4 calls done, 0 failed, in "), "{out:?}");
    let secs: f64 = summary
        .split(" in ")
        .nth(1)
        .and_then(|rest| rest.split('s').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no elapsed time in {summary:?}"));
    assert!(secs >= 0.95, "four 0.25 s calls one at a time took {secs} s");
    assert_no_worker_left(&dir);
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// Two pools on `tests/fixtures/cli_adapter.py` that differ in size, policy and the
/// `CLI_LABEL` their workers see, so each reply says which pool ran it. Every worker also
/// gets `CLI_RUN=<the test's folder name>`, which `workers_of` looks for.
fn two_pools(dir: &TempDir) -> Value {
    json!({
        "defaults": {
            "python_path": [fixtures()],
            "adapter": "cli_adapter",
            "startup_timeout": "20s",
            "shutdown_timeout": "10s"
        },
        "pools": [
            {"name": "default", "size": 1, "env": {"CLI_LABEL": "default", "CLI_RUN": dir.tag()}},
            {"name": "blue", "size": 2, "env": {"CLI_LABEL": "blue", "CLI_RUN": dir.tag()},
             "max_requests": 1000, "ttl": "1h"}
        ]
    })
}

/// The live processes started for the test that owns `dir` (workers and their children), found
/// by the `CLI_RUN` variable in their environment; sorted.
fn workers_of(dir: &TempDir) -> Vec<u32> {
    let all = processes_with(&format!("CLI_RUN={}", dir.tag()));
    // Each worker runs under its keeper, which holds the same environment: the workers are
    // the ones whose parent is another of them.
    all.iter().copied().filter(|&pid| common::parent_of(pid).is_some_and(|p| all.contains(&p))).collect()
}

/// Every process started for this test: the workers and their keepers.
fn processes_of(dir: &TempDir) -> Vec<u32> {
    processes_with(&format!("CLI_RUN={}", dir.tag()))
}

/// The live processes whose environment holds `marker` (`NAME=value`); sorted.
fn processes_with(marker: &str) -> Vec<u32> {
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .expect("/proc is readable")
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            environ.split(|&b| b == 0).any(|var| var == marker.as_bytes()) && common::alive(pid)
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// The pids named by the files in `folder` (written by `cli_slow_import_adapter`).
fn pids_in(folder: &Path) -> Vec<u32> {
    let entries = std::fs::read_dir(folder).expect("the pid folder is readable");
    entries.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect()
}

/// What `python3` on `PATH` resolves to (`sys.executable`), as the library names it.
fn real_python3() -> String {
    let out = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable, end='')"])
        .output()
        .expect("python3 runs");
    String::from_utf8(out.stdout).expect("a UTF-8 path")
}

/// Fails unless every process started for this test is gone within a few seconds.
fn assert_no_worker_left(dir: &TempDir) {
    let gone = wait_until(Duration::from_secs(5), || processes_of(dir).is_empty());
    assert!(gone, "worker processes left behind: {:?}", processes_of(dir));
}

fn arg(s: &str) -> OsString {
    s.into()
}

/// The built example, next to this test's binary (`target/<profile>/examples/snakepit`).
/// `cargo test` builds the examples before the tests, but `cargo test --test cli` does not,
/// so it is built here first (which does nothing when it is up to date).
fn cli_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| common::example_binary("snakepit", Duration::from_secs(600)))
}

/// Runs the CLI with stdin closed and waits for it, bounded.
fn run_cli(args: &[OsString]) -> Finished {
    let mut cli = Running::spawn(args);
    cli.stdin = None;
    cli.wait()
}

/// A CLI process whose stdout lines and stderr are collected by threads, so that it never
/// blocks on a full pipe. Dropping it kills the process if it is still running.
struct Running {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Receiver<String>,
    stderr: Option<JoinHandle<String>>,
}

/// How a CLI run ended.
struct Finished {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl std::fmt::Debug for Finished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit code {:?}\n--- stdout\n{}\n--- stderr\n{}", self.code, self.stdout, self.stderr)
    }
}

impl Finished {
    fn assert_code(&self, code: i32) {
        assert_eq!(self.code, Some(code), "{self:?}");
    }
}

impl Running {
    fn spawn(args: &[OsString]) -> Running {
        let child = Command::new(cli_binary())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the CLI starts");
        Running::from_child(child)
    }

    fn from_child(mut child: Child) -> Running {
        let stdin = child.stdin.take();
        let (tx, stdout) = unbounded();
        let out = child.stdout.take().expect("piped stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut err = child.stderr.take().expect("piped stderr");
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = err.read_to_string(&mut text);
            text
        });
        Running { child, stdin, stdout, stderr: Some(stderr) }
    }

    fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").and_then(|()| stdin.flush()).expect("the CLI reads stdin");
    }

    /// The next reply line, parsed; fails the test after `REPLY_TIMEOUT`.
    fn reply(&self) -> Value {
        let line = self.stdout.recv_timeout(REPLY_TIMEOUT).unwrap_or_else(|e| panic!("no reply line: {e}"));
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("reply {line:?} is not JSON: {e}"))
    }

    fn interrupt(&self) {
        self.signal("INT");
    }

    /// Sends the signal `name` (`"INT"`, `"TERM"`, ...) to the CLI process.
    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{name} failed");
    }

    fn close_stdin_and_wait(mut self) -> Finished {
        self.stdin = None;
        self.wait()
    }

    fn wait(self) -> Finished {
        self.wait_for(RUN_TIMEOUT)
    }

    /// Waits for the process to exit, polling, then collects what it wrote; kills it and fails
    /// the test after `timeout`.
    fn wait_for(mut self, timeout: Duration) -> Finished {
        let end = Instant::now() + timeout;
        let status = loop {
            match self.child.try_wait().expect("try_wait") {
                Some(status) => break status,
                None if Instant::now() >= end => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    panic!("the CLI did not exit within {timeout:?}; killed");
                }
                None => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        // The pipes close when the process exits (its workers do not hold them): read to the end.
        let mut stdout = String::new();
        loop {
            match self.stdout.recv_deadline(end + Duration::from_secs(5)) {
                Ok(line) => {
                    stdout.push_str(&line);
                    stdout.push('\n');
                }
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => panic!("stdout still open after the CLI exited"),
            }
        }
        let stderr = self.stderr.take().expect("stderr reader");
        assert!(
            wait_until(Duration::from_secs(5), || stderr.is_finished()),
            "stderr still open after the CLI exited"
        );
        let stderr = stderr.join().expect("stderr reader");
        Finished { code: status.code(), stdout, stderr }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A fresh folder per test, removed afterwards; its unique name tags the test's workers.
struct TempDir {
    path: PathBuf,
    tag: String,
}

impl TempDir {
    fn new(name: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tag = format!("snakepit-cli-{}-{n}-{name}", std::process::id());
        let path = std::env::temp_dir().join(&tag);
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create a temp dir");
        TempDir { path, tag }
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn tag(&self) -> &str {
        &self.tag
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path.join(name);
        std::fs::write(&path, text).expect("write a temp file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
