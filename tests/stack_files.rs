//! A worker's stack file (where it writes its Python stacks for a time-out's error) is never
//! left on disk. On its own in this file: no other test's pools start meanwhile.

mod common;

use std::time::Duration;

use serde_json::json;
use snakepit::CallOptions;

/// The stack files this process's pools created that are still on disk.
fn stack_files() -> Vec<String> {
    let prefix = format!("snakepit-{}-", std::process::id());
    std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix) && n.ends_with(".stack"))
        .collect()
}

#[test]
fn no_stack_file_is_left_on_disk() {
    let pool = common::builder(2).build().unwrap();
    // Unlinked once the workers are ready: both sides keep them open.
    assert!(common::wait_until(Duration::from_secs(5), || stack_files().is_empty()), "{:?}", stack_files());
    let _ = pool.call_with(
        "ponder",
        json!({"seconds": 5}),
        CallOptions::new().timeout(Duration::from_millis(300)),
    );
    pool.shutdown().unwrap();
    assert_eq!(stack_files(), Vec::<String>::new());
}
