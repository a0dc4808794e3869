//! `slow_call_log`: a call still running after the threshold has its worker's Python stacks
//! logged, and goes on. (A process-global logger, so a test binary of its own.)

mod common;

use std::sync::Mutex;
use std::time::Duration;

use serde_json::json;

static RECORDS: Mutex<Vec<(log::Level, String)>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        if record.target().starts_with("snakepit") {
            RECORDS.lock().unwrap().push((record.level(), record.args().to_string()));
        }
    }
    fn flush(&self) {}
}

fn slow_logs() -> Vec<String> {
    let records = RECORDS.lock().unwrap();
    records
        .iter()
        .filter(|(l, m)| *l == log::Level::Warn && m.contains("slow_call_log"))
        .map(|(_, m)| m.clone())
        .collect()
}

#[test]
fn a_slow_call_is_logged_with_its_stack_and_goes_on() {
    log::set_logger(&Capture).unwrap();
    log::set_max_level(log::LevelFilter::Debug);
    let pool = common::builder(1).slow_call_log(Duration::from_millis(300)).build().unwrap();
    let pid = common::worker_pids(&pool)[0];
    // A fast call is not logged.
    assert_eq!(pool.call("ponder", json!({"seconds": 0.01})).unwrap(), json!(0.01));
    assert!(slow_logs().is_empty(), "{:?}", slow_logs());
    // A slow one is, once, and it still finishes on the same worker.
    assert_eq!(pool.call("ponder", json!({"seconds": 1.0})).unwrap(), json!(1.0));
    let logs = slow_logs();
    assert_eq!(logs.len(), 1, "{logs:?}");
    assert!(logs[0].contains("`ponder`") && logs[0].contains("deep_in_thought"), "{}", logs[0]);
    assert_eq!(common::worker_pids(&pool), vec![pid]);
    pool.shutdown().unwrap();
    common::assert_gone(&[pid], Duration::from_secs(5));
}
