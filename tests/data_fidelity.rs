//! A result arrives as the value the command returned, or the call fails with a Python error
//! naming the command and the place in the value: dict keys that are not strings, integers the
//! host cannot hold exactly, NaN. Nothing is changed on the way.

mod common;

use std::time::Duration;

use serde_json::{json, Value};
use snakepit::Error;

fn python_error(err: Error) -> snakepit::RemoteError {
    match err {
        Error::Python(e) => e,
        other => panic!("expected a Python exception, got {other:?}"),
    }
}

/// The JSON integer a call returned, failing unless it arrived as one (not as a float).
fn integer(v: &Value) -> &serde_json::Number {
    match v {
        Value::Number(n) if n.is_i64() || n.is_u64() => n,
        other => panic!("expected a JSON integer, got {other:?}"),
    }
}

#[test]
fn a_dict_with_int_keys_is_a_python_error_naming_the_command_and_the_place() {
    let pool = common::builder(1).build().unwrap();
    let pids = common::worker_pids(&pool);
    let e = python_error(pool.call("int_keys", json!({})).unwrap_err());
    assert_eq!(e.error_type, "TypeError");
    assert_eq!(
        e.message,
        r#"result of command 'int_keys' has a dict key 1 (an int) at value["a"][3]: JSON object keys must be strings"#
    );
    // A key that would collide with a string key is refused too, rather than losing an entry.
    let e = python_error(pool.call("colliding_keys", json!({})).unwrap_err());
    assert_eq!(e.error_type, "TypeError");
    assert!(
        e.message.starts_with("result of command 'colliding_keys' has a dict key 1 (an int) at value:"),
        "{}",
        e.message
    );
    assert_eq!(pool.call("echo", json!({"1": "b"})).unwrap(), json!({"1": "b"}));
    assert_eq!(common::worker_pids(&pool), pids);
    pool.shutdown().unwrap();
    common::assert_gone(&pids, Duration::from_secs(5));
}

#[test]
fn integers_at_the_edges_of_the_64_bit_range_round_trip_exactly() {
    let pool = common::builder(1).build().unwrap();
    let pids = common::worker_pids(&pool);
    let max_i64 = pool.call("integer", json!({"base": 2, "exp": 63, "add": -1})).unwrap();
    assert_eq!(integer(&max_i64).as_i64(), Some(i64::MAX));
    let min_i64 = pool.call("integer", json!({"base": 2, "exp": 63, "sign": -1})).unwrap();
    assert_eq!(integer(&min_i64).as_i64(), Some(i64::MIN));
    let max_u64 = pool.call("integer", json!({"base": 2, "exp": 64, "add": -1})).unwrap();
    assert_eq!(integer(&max_u64).as_u64(), Some(u64::MAX));
    // The same numbers sent from here come back unchanged.
    let sent = json!({"n": [i64::MIN, i64::MAX, u64::MAX, 0, -1]});
    assert_eq!(pool.call("echo", sent.clone()).unwrap(), sent);
    pool.shutdown().unwrap();
    common::assert_gone(&pids, Duration::from_secs(5));
}

#[test]
fn an_integer_just_beyond_the_range_is_a_python_error_not_a_float() {
    let pool = common::builder(1).build().unwrap();
    let pids = common::worker_pids(&pool);
    let e = python_error(pool.call("integer", json!({"base": 2, "exp": 64, "add": 1})).unwrap_err());
    assert_eq!(e.error_type, "ValueError");
    assert!(
        e.message.starts_with("result of command 'integer' has the integer 18446744073709551617 at value:"),
        "{}",
        e.message
    );
    assert!(e.message.contains("-2**63 to 2**64-1"), "{}", e.message);
    let e =
        python_error(pool.call("integer", json!({"base": 2, "exp": 63, "add": -1, "sign": -1})).unwrap_err());
    assert!(e.message.contains("the integer -9223372036854775809 at value:"), "{}", e.message);
    assert_eq!(common::worker_pids(&pool), pids);
    pool.shutdown().unwrap();
    common::assert_gone(&pids, Duration::from_secs(5));
}

#[test]
fn a_400_digit_integer_is_a_python_error_and_the_worker_keeps_serving() {
    let pool = common::builder(1).build().unwrap();
    let pids = common::worker_pids(&pool);
    let err = pool.call("integer", json!({"base": 10, "exp": 400})).unwrap_err();
    assert!(matches!(err, Error::Python(_)), "a Python error, not a protocol error: {err:?}");
    let e = python_error(err);
    assert_eq!(e.error_type, "ValueError");
    assert!(
        e.message.starts_with("result of command 'integer' has an integer of 401 digits at value:"),
        "{}",
        e.message
    );
    // The same worker goes on serving.
    assert_eq!(pool.call("add", json!([2, 2])).unwrap(), json!(4));
    assert_eq!(common::worker_pids(&pool), pids);
    assert_eq!(pool.stats().unwrap().crashes, 0);
    pool.shutdown().unwrap();
    common::assert_gone(&pids, Duration::from_secs(5));
}

#[test]
fn nan_is_a_python_error_naming_the_command_and_the_place() {
    let pool = common::builder(1).build().unwrap();
    let pids = common::worker_pids(&pool);
    let e = python_error(pool.call("nan_inside", json!({})).unwrap_err());
    assert_eq!(e.error_type, "ValueError");
    assert_eq!(
        e.message,
        r#"result of command 'nan_inside' has the float nan at value["xs"][1]: JSON has no NaN or Infinity"#
    );
    let e = python_error(pool.call("nan", json!({})).unwrap_err());
    assert_eq!(e.message, "result of command 'nan' has the float nan at value: JSON has no NaN or Infinity");
    assert_eq!(pool.call("add", json!([1, 2])).unwrap(), json!(3));
    assert_eq!(common::worker_pids(&pool), pids);
    pool.shutdown().unwrap();
    common::assert_gone(&pids, Duration::from_secs(5));
}

#[test]
fn floats_come_back_bit_for_bit() {
    // Floats whose shortest decimal form the default serde_json parser rounds 1 ULP off
    // (without its `float_roundtrip` feature, about one float in six came back changed).
    let pool = common::builder(1).build().unwrap();
    let pids = common::worker_pids(&pool);
    let mut floats = vec![9373.711634780513_f64, 0.1, 1e-308, 5e-324, 1.7976931348623157e308, -2.5e-10];
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    for _ in 0..2000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let f = f64::from_bits(x);
        if f.is_finite() {
            floats.push(f);
        }
    }
    let back = pool.call("echo", json!([floats])).unwrap();
    let back: Vec<f64> = serde_json::from_value(back[0].clone()).unwrap();
    let changed: Vec<(f64, f64)> =
        floats.iter().zip(&back).filter(|(a, b)| a.to_bits() != b.to_bits()).map(|(a, b)| (*a, *b)).collect();
    assert_eq!(back.len(), floats.len());
    assert!(
        changed.is_empty(),
        "{} of {} floats changed, e.g. {:?}",
        changed.len(),
        floats.len(),
        &changed[..changed.len().min(3)]
    );
    pool.shutdown().unwrap();
    common::assert_gone(&pids, Duration::from_secs(5));
}
