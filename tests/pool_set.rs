//! Several named pools side by side: routing, isolation, and shutdown of them all.

mod common;

use std::time::Duration;

use serde_json::json;
use snakepit::{Config, Error, Pool, PoolSet};

fn two_pools() -> PoolSet {
    PoolSet::builder()
        .pool(common::builder(1).name("basic").max_requests(5).jitter(0.0))
        .pool(Pool::builder().name("demo").size(2).adapter("snakepit.demo"))
        .build()
        .unwrap()
}

fn all_pids(set: &PoolSet) -> Vec<u32> {
    set.stats().unwrap().values().flat_map(|s| s.workers.iter().map(|w| w.pid)).collect()
}

#[test]
fn calls_are_routed_by_pool_name_and_pools_keep_their_own_policies() {
    let set = two_pools();
    assert_eq!(set.pool_names(), vec!["basic", "demo"]);
    assert_eq!(set.call("basic", "add", json!([2, 3])).unwrap(), json!(5));
    assert_eq!(set.call("demo", "word_count", json!({"text": "a b c"})).unwrap(), json!(3));
    // Each pool serves only its own adapter's commands.
    assert!(matches!(set.call("demo", "add", json!([1, 1])), Err(Error::UnknownCommand { .. })));
    assert!(matches!(
        set.call("basic", "word_count", json!({"text": "x"})),
        Err(Error::UnknownCommand { .. })
    ));
    let upper: String = set.call_as("demo", "upper", &json!({"text": "py"})).unwrap();
    assert_eq!(upper, "PY");
    match set.call("nope", "add", json!([])).unwrap_err() {
        Error::UnknownPool { name, known } => {
            assert_eq!(name, "nope");
            assert_eq!(known, vec!["basic", "demo"]);
        }
        other => panic!("expected UnknownPool, got {other:?}"),
    }
    // Only "basic" recycles (max_requests 5); "demo" keeps its workers.
    let demo_pids = common::worker_pids(set.pool("demo").unwrap());
    for i in 0..20 {
        set.call("basic", "add", json!([i, 0])).unwrap();
        set.call("demo", "word_count", json!({"text": "x"})).unwrap();
    }
    let stats = set.stats().unwrap();
    assert!(stats["basic"].recycles.max_requests >= 3, "{:?}", stats["basic"].recycles);
    assert_eq!(stats["demo"].recycles.total(), 0);
    assert_eq!(common::worker_pids(set.pool("demo").unwrap()), demo_pids);
    let pids = all_pids(&set);
    set.shutdown().unwrap();
    common::assert_gone(&pids, Duration::from_secs(5));
}

#[test]
fn a_stuck_pool_does_not_delay_another() {
    let set = PoolSet::builder()
        .pool(common::builder(1).name("stuck"))
        .pool(common::builder(1).name("free"))
        .build()
        .unwrap();
    std::thread::scope(|s| {
        let stuck = set.pool("stuck").unwrap();
        let hog = s.spawn(|| stuck.call("sleep", json!({"seconds": 2.0})));
        assert!(
            common::wait_until(Duration::from_secs(5), || stuck.stats().unwrap().workers[0].in_flight == 1)
        );
        let queued = s.spawn(|| stuck.call("add", json!([1, 1])));
        assert!(common::wait_until(Duration::from_secs(5), || stuck.stats().unwrap().queued == 1));
        // While every worker of "stuck" is busy and calls queue there, "free" answers at once.
        for i in 0..50 {
            assert_eq!(set.call("free", "add", json!([i, 1])).unwrap(), json!(i + 1));
        }
        let st = stuck.stats().unwrap();
        assert_eq!((st.workers[0].in_flight, st.queued), (1, 1), "the stuck pool was still stuck");
        assert!(hog.join().unwrap().is_ok());
        assert_eq!(queued.join().unwrap().unwrap(), json!(2));
    });
    let pids = all_pids(&set);
    drop(set);
    common::assert_gone(&pids, Duration::from_secs(5));
}

#[test]
fn the_default_pool_serves_the_short_form() {
    let set = PoolSet::builder().pool(common::builder(1).name("only")).build().unwrap();
    assert_eq!(set.call_default("add", json!([1, 2])).unwrap(), json!(3), "a single pool is the default");
    drop(set);
    let set = PoolSet::builder()
        .pool(common::builder(1).name("default"))
        .pool(common::builder(1).name("other"))
        .build()
        .unwrap();
    assert_eq!(set.default_pool().unwrap().name(), "default");
    drop(set);
    let set = PoolSet::builder()
        .pool(common::builder(1).name("a"))
        .pool(common::builder(1).name("b"))
        .build()
        .unwrap();
    assert!(matches!(set.call_default("add", json!([1, 2])), Err(Error::UnknownPool { .. })));
}

#[test]
fn a_pool_that_fails_to_start_takes_the_set_down_cleanly() {
    let err = PoolSet::builder()
        .pool(common::builder(2).name("good"))
        .pool(common::builder(1).name("bad").adapter("broken_adapter"))
        .build()
        .unwrap_err();
    assert!(matches!(err, Error::Startup { .. }), "{err:?}");
    let err =
        PoolSet::builder().pool(common::builder(1).name("x")).pool(common::builder(1).name("x")).build();
    assert!(matches!(err, Err(Error::Config { ref setting, .. }) if setting == "name"), "{err:?}");
    assert!(matches!(PoolSet::builder().build(), Err(Error::Config { .. })));
}

#[test]
fn a_set_starts_from_a_configuration() {
    let fixtures = common::fixtures();
    let json = format!(
        r#"{{
          "defaults": {{"python_path": [{fixtures:?}], "startup_timeout": "20s"}},
          "pools": [
            {{"name": "basic", "size": 1, "adapter": "basic_adapter", "env": {{"WHO": "basic"}}}},
            {{"name": "demo", "size": 1, "adapter": "snakepit.demo", "max_requests": 100}}
          ]
        }}"#
    );
    let config = Config::from_json_str(&json).unwrap();
    let set = PoolSet::from_config(&config).unwrap();
    assert_eq!(set.call("basic", "add", json!([1, 2])).unwrap(), json!(3));
    assert_eq!(set.call("demo", "upper", json!({"text": "a"})).unwrap(), json!("A"));
    assert_eq!(set.pool("demo").unwrap().config().max_requests(), Some(100));
    let pids = all_pids(&set);
    set.shutdown().unwrap();
    common::assert_gone(&pids, Duration::from_secs(5));
}
