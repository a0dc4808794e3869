//! The first program to run: `cargo run --example quickstart`.
//!
//! Starts a pool of Python workers on the embedded demo adapter (`snakepit.demo`), calls it from
//! several threads, sends bytes and an array as raw bytes, shows a Python exception coming back
//! as an error, and prints the pool's stats. Set `RUST_LOG=debug` to watch workers start and stop.

use std::time::Instant;

use serde_json::json;
use snakepit::{Array, Bytes, Error, Pool};

fn main() -> Result<(), Error> {
    env_logger::init();
    let started = Instant::now();
    let pool = Pool::builder().name("demo").size(2).adapter("snakepit.demo").build()?;
    println!("pool of 2 workers ready in {:?}", started.elapsed());

    let sentences = [
        "the quick brown fox",
        "jumps over the lazy dog",
        "warm python processes answer fast",
        "crashes stay contained",
    ];
    std::thread::scope(|s| {
        for text in sentences {
            let pool = &pool;
            s.spawn(move || {
                let words: u64 = pool.call_as("word_count", &json!({ "text": text })).expect("word_count");
                let vector: Vec<f64> = pool.call_as("embed", &json!({ "text": text })).expect("embed");
                let head: Vec<String> = vector.iter().take(3).map(|x| format!("{x:+.3}")).collect();
                println!("{text:?}: {words} words, embedding [{}, ...]", head.join(", "));
            });
        }
    });

    // Bytes and arrays travel as raw bytes beside the JSON (no base64, no list of numbers).
    let blob = Bytes::from(b"any bytes at all: \x00\xff".to_vec());
    let sum: serde_json::Value = pool.call_as("checksum", &(blob,))?;
    let x = Array::from_vec(vec![1.0f64, 2.0, 3.0, 4.0], [2, 2])?;
    let y: Array = pool.call_as("scale", &(x, 10.0))?;
    println!("checksum of the bytes: {sum}; the array times 10: {:?} {:?}", y.shape(), y.as_slice::<f64>()?);

    match pool.call("fail", json!({ "message": "this one raises on purpose" })) {
        Err(Error::Python(e)) => {
            println!("python raised {}: {}", e.error_type, e.message);
            let last = e.traceback.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
            println!("  traceback ends with: {}", last.trim());
        }
        other => println!("expected a Python exception, got {other:?}"),
    }

    let stats = pool.stats()?;
    println!("stats: {}", serde_json::to_string_pretty(&stats)?);
    pool.shutdown()?;
    println!("pool shut down; no worker left");
    Ok(())
}
