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
    let pool = common::builder(2).build().unwrap();
    let mut pids: Vec<String> = common::worker_pids(&pool).iter().map(u32::to_string).collect();
    // A child process of a worker: it must die with the workers.
    let child = pool.call("spawn_child", serde_json::json!({"seconds": 60})).unwrap();
    pids.push(child.to_string());
    println!("PIDS {}", pids.join(" "));
    // Also busy one worker in a long call: it must exit even while busy.
    std::thread::spawn(move || {
        let _ = pool.call("sleep", serde_json::json!({"seconds": 60}));
    });
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
    assert_eq!(pids.len(), 3, "two workers and a worker's child");
    assert!(pids.iter().all(|&p| common::alive(p)));
    // Let the long call reach its worker, then kill the parent without any chance to clean up.
    std::thread::sleep(Duration::from_millis(300));
    parent.kill().unwrap(); // SIGKILL
    parent.wait().unwrap();
    common::assert_gone(&pids, Duration::from_secs(5));
}
