//! An adapter's `logging` records and `warnings` reach the `log` crate at their own level;
//! plain prints stay at `debug`. (A process-global logger, so a test binary of its own.)

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
        if record.target() == "snakepit::python" {
            RECORDS.lock().unwrap().push((record.level(), record.args().to_string()));
        }
    }
    fn flush(&self) {}
}

fn seen(level: log::Level, text: &str) -> bool {
    RECORDS.lock().unwrap().iter().any(|(l, m)| *l == level && m.contains(text))
}

#[test]
fn python_log_records_and_warnings_keep_their_level() {
    log::set_logger(&Capture).unwrap();
    log::set_max_level(log::LevelFilter::Trace);
    let pool = common::builder(1).adapter("logging_adapter").build().unwrap();
    let pids = common::worker_pids(&pool);
    assert_eq!(pool.call("emit", json!({"message": "x1"})).unwrap(), json!("x1"));
    let all = common::wait_until(Duration::from_secs(10), || {
        seen(log::Level::Warn, "warned: x1")
            && seen(log::Level::Error, "failed: x1")
            && seen(log::Level::Warn, "careful: x1")
            && seen(log::Level::Debug, "printed: x1")
    });
    let records = RECORDS.lock().unwrap().clone();
    assert!(all, "{records:#?}");
    assert!(!seen(log::Level::Info, "below the root logger's level"), "{records:#?}");
    assert!(records.iter().all(|(_, m)| !m.contains('\u{1e}')), "the tags are stripped: {records:#?}");
    pool.shutdown().unwrap();
    common::assert_gone(&pids, Duration::from_secs(5));
}
