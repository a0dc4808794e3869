//! A daemon an adapter starts (double fork and `setsid`, leaving the worker's process group)
//! does not outlive the pool's shutdown.

mod common;

use std::time::Duration;

use serde_json::json;

#[test]
fn a_daemon_started_by_an_adapter_is_gone_after_shutdown() {
    let dir = std::env::temp_dir().join(format!("snakepit-daemon-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pid_file = dir.join("daemon.pid");
    let pool = common::builder(1).build().unwrap();
    let workers = common::worker_pids(&pool);
    let daemon = pool.call("daemonize", json!({"pid_file": pid_file, "seconds": 60})).unwrap();
    let daemon = daemon.as_u64().expect("the daemon's pid") as u32;
    assert!(common::alive(daemon), "the daemon runs");
    // It left the worker's session and process group.
    let stat = std::fs::read_to_string(format!("/proc/{daemon}/stat")).unwrap();
    let pgrp: u32 = stat.rsplit(')').next().unwrap().split_whitespace().nth(2).unwrap().parse().unwrap();
    assert_ne!(pgrp, workers[0], "not in the worker's group: {stat}");
    pool.shutdown().unwrap();
    let gone = common::wait_until(Duration::from_secs(5), || !common::alive(daemon));
    if !gone {
        let _ = std::process::Command::new("kill").args(["-9", &daemon.to_string()]).status();
    }
    assert!(gone, "the daemon {daemon} outlived shutdown()");
    common::assert_gone(&workers, Duration::from_secs(5));
    let _ = std::fs::remove_dir_all(&dir);
}
