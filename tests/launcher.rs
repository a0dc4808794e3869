//! A launcher prefix: workers run as `launcher... python -m snakepit ...`.

mod common;

use std::time::Duration;

use serde_json::json;

#[test]
fn workers_run_under_the_launcher() {
    let dir = std::env::temp_dir().join(format!("snakepit-launcher-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("ran.log");
    let _ = std::fs::remove_file(&log);
    let script = common::fixtures().join("launcher.sh");
    let python = String::from_utf8(
        std::process::Command::new("python3")
            .args(["-c", "import sys; print(sys.executable, end='')"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let pool = common::builder(2)
        .launcher(["sh", script.to_str().unwrap()])
        .python(&python)
        .env("LAUNCHER_LOG", log.to_str().unwrap())
        .build()
        .unwrap();
    assert_eq!(pool.call("add", json!([20, 22])).unwrap(), json!(42));
    // The script ran once per worker, with the worker's command line after it, and exec'd
    // the interpreter: the worker's pid is the script's.
    let ran = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = ran.lines().collect();
    assert_eq!(lines.len(), 2, "{ran}");
    assert!(
        lines.iter().all(|l| l.contains(&format!("{python} -c ")) && l.contains("--adapter basic_adapter")),
        "{ran}"
    );
    assert!(lines.iter().all(|l| !l.contains("--parent-pid")), "{ran}");
    let mut logged: Vec<u32> = lines.iter().map(|l| l.split(' ').next().unwrap().parse().unwrap()).collect();
    let mut pids = common::worker_pids(&pool);
    logged.sort();
    pids.sort();
    assert_eq!(logged, pids);
    pool.shutdown().unwrap();
    common::assert_gone(&pids, Duration::from_secs(5));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn adapter_args_reach_the_adapter() {
    let pool = common::builder(1).args(["--model", "small"]).build().unwrap();
    assert_eq!(pool.call("adapter_args", json!({})).unwrap(), json!(["--model", "small"]));
    pool.shutdown().unwrap();
}

/// The interpreter's real path (the `python3` on PATH may be a slow shim).
fn python() -> String {
    let out = std::process::Command::new("python3")
        .args(["-c", "import sys; print(sys.executable, end='')"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn an_ssh_launcher_gets_a_command_line_its_remote_shell_parses_back_with_the_pools_env() {
    // A stand-in for ssh: it drops the host, starts from an empty environment (sshd gives the
    // remote command none of ours), and runs the rest through a shell, as sshd does.
    let dir = std::env::temp_dir().join(format!("snakepit-ssh-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ssh = dir.join("ssh");
    std::fs::write(&ssh, "#!/bin/sh\nshift\nexec env -i PATH=\"$PATH\" sh -c \"$*\"\n").unwrap();
    std::fs::set_permissions(&ssh, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let tricky = "two words; $HOME `id` 'quoted' \"double\" \\ end";
    let pool = common::builder(1)
        .launcher([ssh.to_str().unwrap(), "somehost"])
        .python(python())
        .env("GREETING", tricky)
        .args(["--model", "a b"])
        .build()
        .unwrap();
    assert_eq!(pool.call("add", json!([20, 22])).unwrap(), json!(42));
    assert_eq!(pool.call("getenv", json!({"name": "GREETING"})).unwrap(), json!(tricky));
    assert_eq!(pool.call("adapter_args", json!({})).unwrap(), json!(["--model", "a b"]));
    let pids = common::worker_pids(&pool);
    pool.shutdown().unwrap();
    common::assert_gone(&pids, Duration::from_secs(5));
    let _ = std::fs::remove_dir_all(&dir);
}
