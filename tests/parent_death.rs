//! A Rust program killed with SIGKILL cannot shut its pool down; its workers must still exit.
//!
//! The test runs this same test binary again as the "program": with SNAKEPIT_TEST_PARENT set,
//! `parent_program` builds a pool, prints its workers' pids and sleeps until it is killed.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

const ROLE: &str = "SNAKEPIT_TEST_PARENT";

#[test]
fn parent_program() {
    if std::env::var_os(ROLE).is_none() {
        return; // only meaningful as the child program of the test below
    }
    let pool = std::sync::Arc::new(common::builder(3).build().unwrap());
    let mut pids: Vec<String> = common::worker_pids(&pool).iter().map(u32::to_string).collect();
    // Each worker starts a child process (the least-served worker takes each call): they must
    // die with the workers.
    for _ in 0..3 {
        let child = pool.call("spawn_child", serde_json::json!({"seconds": 60})).unwrap();
        pids.push(child.to_string());
    }
    // And a daemon each (double fork and setsid: out of the worker's group and session).
    let dir = std::env::temp_dir().join(format!("snakepit-parent-death-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for n in 0..3 {
        let args = serde_json::json!({"pid_file": dir.join(format!("{n}.pid")), "seconds": 60});
        pids.push(pool.call("daemonize", args).unwrap().to_string());
    }
    // The workers' keepers, the processes this program started.
    for worker in common::worker_pids(&pool) {
        let stat = std::fs::read_to_string(format!("/proc/{worker}/stat")).unwrap();
        pids.push(stat.rsplit(')').next().unwrap().split_whitespace().nth(1).unwrap().to_string());
    }
    println!("PIDS {}", pids.join(" "));
    // One worker busy in a long call, one holding the GIL in one long C call (no Python signal
    // handler can run there), one idle: all must exit.
    for (command, args) in [("sleep", serde_json::json!({"seconds": 60})), ("gil_hog", serde_json::json!({}))]
    {
        let pool = pool.clone();
        std::thread::spawn(move || {
            let _ =
                pool.call_with(command, args, snakepit::CallOptions::new().timeout(Duration::from_secs(120)));
        });
    }
    std::thread::sleep(Duration::from_secs(60));
}

#[test]
fn workers_exit_when_their_parent_is_killed() {
    let mut parent = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "parent_program", "--nocapture", "--test-threads", "1"])
        .env(ROLE, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = parent.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // libtest prints "test parent_program ... " on the same line first.
            if let Some(rest) = line.split("PIDS ").nth(1) {
                let pids: Vec<u32> = rest.split_whitespace().map(|p| p.parse().unwrap()).collect();
                let _ = tx.send(pids);
            }
        }
    });
    let pids = match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(pids) => pids,
        Err(_) => {
            let _ = parent.kill();
            let _ = parent.wait();
            panic!("the parent program never reported its workers");
        }
    };
    assert_eq!(pids.len(), 12, "three workers, and a child, a daemon and a keeper of each");
    assert!(pids.iter().all(|&p| common::alive(p)));
    // Let the long calls reach their workers, then kill the parent without any chance to clean
    // up. Everything must be gone within 3 s.
    std::thread::sleep(Duration::from_millis(500));
    parent.kill().unwrap(); // SIGKILL
    parent.wait().unwrap();
    let _ =
        std::fs::remove_dir_all(std::env::temp_dir().join(format!("snakepit-parent-death-{}", parent.id())));
    if !common::wait_until(Duration::from_secs(3), || pids.iter().all(|&p| !common::alive(p))) {
        for p in &pids {
            let cmd = std::fs::read_to_string(format!("/proc/{p}/cmdline")).unwrap_or_default();
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            eprintln!("{p}: {} | {}", cmd.replace('\0', " "), stat);
        }
    }
    common::assert_gone(&pids, Duration::from_secs(3));
}
