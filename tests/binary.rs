//! Bytes and arrays travel as raw attachments beside the JSON, both ways, on both profiles,
//! through plain calls, streams and sessions, on a Python without numpy (where an array is a
//! `snakepit.Array`). With numpy: tests/numpy_arrays.rs.

mod common;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use snakepit::{Array, Bytes, DType, Error, Pool, PoolBuilder, Profile};

fn builder(name: &str, profile: Profile) -> PoolBuilder {
    let b = Pool::builder()
        .name(name)
        .size(1)
        .python_path(common::fixtures())
        .adapter("binary_adapter")
        .startup_timeout(Duration::from_secs(20))
        .request_timeout(Duration::from_secs(30));
    match profile {
        Profile::Thread => b.profile(Profile::Thread).threads_per_worker(4),
        _ => b,
    }
}

fn profiles() -> [(Profile, &'static str); 2] {
    [(Profile::Process, "process"), (Profile::Thread, "thread")]
}

/// Shuts `pool` down and proves its workers are gone.
fn finish(pool: Pool) {
    let pids = common::worker_pids(&pool);
    pool.shutdown().unwrap();
    common::assert_gone(&pids, Duration::from_secs(10));
}

/// `n` elements of `T` counting up from 0, as an array of `shape`.
fn counting<T: snakepit::Element>(shape: &[usize], from: impl Fn(usize) -> T) -> Array {
    let n = shape.iter().product();
    Array::from_vec((0..n).map(from).collect(), shape.to_vec()).unwrap()
}

/// One array of every element type, in several shapes: 0-d, empty, 1-d and 2-d.
fn every_array() -> Vec<Array> {
    let mut out = Vec::new();
    for shape in [vec![], vec![0], vec![5], vec![2, 3], vec![0, 4]] {
        out.push(counting(&shape, |i| i as i8 - 3));
        out.push(counting(&shape, |i| i as i16 * -300));
        out.push(counting(&shape, |i| i as i32 * -70_000));
        out.push(counting(&shape, |i| i as i64 * -(1 << 40)));
        out.push(counting(&shape, |i| i as u8 + 250));
        out.push(counting(&shape, |i| i as u16 * 1000));
        out.push(counting(&shape, |i| i as u32 * 100_000));
        out.push(counting(&shape, |i| u64::MAX - i as u64));
        out.push(counting(&shape, |i| i as f32 / 3.0));
        out.push(counting(&shape, |i| -(i as f64) / 7.0));
        let n: usize = shape.iter().product();
        out.push(Array::from_bools(&(0..n).map(|i| i % 2 == 0).collect::<Vec<_>>(), shape.clone()).unwrap());
        for (dtype, size) in [(DType::Float16, 2), (DType::Complex64, 8), (DType::Complex128, 16)] {
            let raw: Vec<u8> = (0..n * size).map(|i| (i * 7 % 256) as u8).collect();
            out.push(Array::new(dtype, shape.clone(), raw).unwrap());
        }
    }
    out
}

#[test]
fn bytes_and_arrays_of_every_dtype_and_shape_come_back_unchanged() {
    for (profile, name) in profiles() {
        let pool = builder(&format!("bin-same-{name}"), profile).build().unwrap();
        for size in [0usize, 1, 4095, 70_000, 1 << 20] {
            let data = Bytes::from((0..size).map(|i| (i % 253) as u8).collect::<Vec<u8>>());
            let back: Bytes = pool.call_as("same", &(data.clone(),)).unwrap();
            assert_eq!(back, data, "{name}: {size} bytes");
        }
        let arrays = every_array();
        for a in &arrays {
            let back: Array = pool.call_as("same", &(a.clone(),)).unwrap();
            assert_eq!(&back, a, "{name}: {a:?}");
            if back.dtype() == DType::Float64 {
                // In place, empty ones too.
                assert_eq!(back.as_slice::<f64>().unwrap(), a.to_vec::<f64>().unwrap(), "{name}: {a:?}");
            }
        }
        // All at once, in one frame.
        let back: Vec<Array> = pool.call_as("same", &(arrays.clone(),)).unwrap();
        assert_eq!(back, arrays, "{name}: all together");
        finish(pool);
    }
}

#[test]
fn python_gets_bytes_as_bytes_and_arrays_as_snakepit_arrays_without_numpy() {
    for (profile, name) in profiles() {
        let pool = builder(&format!("bin-types-{name}"), profile).build().unwrap();
        let got: Value = pool.call_as("describe", &(Bytes::from(vec![0xde, 0xad, 0xbe, 0xef]),)).unwrap();
        assert_eq!(got, json!({"type": "bytes", "len": 4, "hex": "deadbeef"}), "{name}");
        let a = Array::from_vec(vec![1.0f64, -2.0], [1, 2]).unwrap();
        let got: Value = pool.call_as("describe", &(a.clone(),)).unwrap();
        // Little-endian on the wire: 1.0 is 00 00 00 00 00 00 f0 3f.
        let expected = json!({"type": "snakepit.Array", "dtype": "float64", "shape": [1, 2],
            "hex": "000000000000f03f00000000000000c0"});
        assert_eq!(got, expected, "{name}");
        let first: f64 = pool.call_as("first_float64", &(a,)).unwrap();
        assert_eq!(first, 1.0, "{name}");
        finish(pool);
    }
}

#[test]
fn python_bytes_bytearrays_memoryviews_and_arrays_come_back_as_binary_values() {
    for (profile, name) in profiles() {
        let pool = builder(&format!("bin-make-{name}"), profile).build().unwrap();
        let expected: Vec<u8> = (0..8).collect();
        for kind in ["bytes", "bytearray", "memoryview"] {
            let got: Bytes = pool.call_as("make", &json!({"kind": kind})).unwrap();
            assert_eq!(got.into_vec(), expected, "{name}: {kind}");
        }
        let strided: Bytes = pool.call_as("make", &json!({"kind": "strided"})).unwrap();
        assert_eq!(strided.as_slice(), &[0, 2, 4, 6], "{name}: a strided memoryview, made contiguous");
        #[derive(Deserialize)]
        struct Nested {
            blobs: (Bytes, Inner),
            n: u32,
        }
        #[derive(Deserialize)]
        struct Inner {
            inner: Bytes,
        }
        // Taken as plain JSON (a `Value`), they come in their inline form, not as references.
        let loose: Value = pool.call_as("make", &json!({"kind": "nested", "n": 2})).unwrap();
        assert_eq!(loose["blobs"][0], json!({"__snakepit__": "bytes", "b64": "AAE="}), "{name}");
        let nested: Nested = pool.call_as("make", &json!({"kind": "nested", "n": 5})).unwrap();
        assert_eq!(
            (nested.blobs.0.as_slice(), nested.blobs.1.inner.as_slice(), nested.n),
            (&[0, 1, 2, 3, 4][..], &[0, 1][..], 5)
        );
        let a: Array = pool.call_as("make", &json!({"kind": "array"})).unwrap();
        assert_eq!((a.dtype(), a.shape()), (DType::Int16, &[2, 2][..]), "{name}");
        assert_eq!(a.to_vec::<i16>().unwrap(), vec![1, -2, 300, -400]);
        finish(pool);
    }
}

#[test]
fn untyped_calls_carry_binary_values_inline_as_base64_both_ways() {
    let pool = builder("bin-inline", Profile::Process).build().unwrap();
    let got = pool.call("make", json!({"kind": "bytes", "n": 3})).unwrap();
    assert_eq!(got, json!({"__snakepit__": "bytes", "b64": "AAEC"}));
    // The inline form reads back through serde, too.
    assert_eq!(serde_json::from_value::<Bytes>(got).unwrap().as_slice(), &[0, 1, 2]);
    // And goes to Python as bytes.
    let sent = pool.call("describe", json!([{"__snakepit__": "bytes", "b64": "AAEC"}])).unwrap();
    assert_eq!(sent, json!({"type": "bytes", "len": 3, "hex": "000102"}));
    let array = json!({"__snakepit__": "array", "dtype": "int16", "shape": [2], "b64": "AQD//w=="});
    let sent = pool.call("describe", json!([array])).unwrap();
    assert_eq!(sent["dtype"], "int16");
    // A Bytes put into a serde_json::Value takes the inline form.
    let v = json!([Bytes::from(vec![0u8, 1, 2])]);
    assert_eq!(v, json!([{"__snakepit__": "bytes", "b64": "AAEC"}]));
    // Bad inline data fails its call with a clear error, and the worker serves on.
    let pid: u32 = pool.call_as("pid", &()).unwrap();
    let err = pool.call("describe", json!([{"__snakepit__": "bytes", "b64": "not base64!"}])).unwrap_err();
    match &err {
        Error::Python(e) => assert_eq!(e.error_type, "ValueError", "{e}"),
        other => panic!("expected a Python ValueError, got {other:?}"),
    }
    let err = pool.call(
        "describe",
        json!([{"__snakepit__": "array", "dtype": "float64", "shape": [3], "b64": "AAEC"}]),
    );
    assert!(matches!(err, Err(Error::Python(_))), "{err:?}");
    assert_eq!(pool.call_as::<_, u32>("pid", &()).unwrap(), pid, "the worker was kept");
    finish(pool);
}

#[test]
fn asking_for_the_wrong_type_is_a_clear_error() {
    let pool = builder("bin-wrong", Profile::Process).build().unwrap();
    let err = pool.call_as::<_, Bytes>("pid", &()).unwrap_err();
    assert!(matches!(err, Error::Json(_)), "{err:?}");
    assert!(err.to_string().contains("expected a binary value"), "{err}");
    let err = pool.call_as::<_, Array>("make", &json!({"kind": "bytes"})).unwrap_err();
    assert!(err.to_string().contains("expected an array, found bytes"), "{err}");
    let a: Array = pool.call_as("same", &(Array::from_slice(&[1.0f32]),)).unwrap();
    let err = a.to_vec::<f64>().unwrap_err();
    assert!(
        matches!(err, Error::Binary(_)) && err.to_string().contains("float64 elements of a float32"),
        "{err}"
    );
    finish(pool);
}

#[test]
fn streams_carry_binary_chunks_and_return_values() {
    for (profile, name) in profiles() {
        let pool = builder(&format!("bin-stream-{name}"), profile).build().unwrap();
        let mut stream = pool.stream("blob_stream", json!({"n": 40, "size": 100_000})).unwrap();
        let mut seen = 0;
        while let Some(chunk) = stream.next_as::<Bytes>() {
            let chunk = chunk.unwrap();
            assert_eq!(chunk.len(), 100_000);
            assert!(chunk.iter().all(|&b| b == seen as u8), "{name}: chunk {seen}");
            seen += 1;
        }
        assert_eq!(seen, 40, "{name}");
        assert_eq!(
            stream.returned(),
            Some(&json!({"__snakepit__": "bytes", "b64": "ZW5k"})),
            "{name}: b\"end\""
        );
        // The untyped iterator gives the inline form.
        let first = pool.stream("blob_stream", json!({"n": 1, "size": 2})).unwrap().next().unwrap().unwrap();
        assert_eq!(first, json!({"__snakepit__": "bytes", "b64": "AAA="}));
        finish(pool);
    }
}

#[test]
fn sessions_carry_binary_values() {
    let pool = builder("bin-session", Profile::Process).size(2).build().unwrap();
    let session = pool.session().unwrap();
    let a = Array::from_vec((0..12).map(|i| i as f32).collect(), [3, 4]).unwrap();
    let shape: Vec<usize> = session.call_as("keep", &(a.clone(),)).unwrap();
    assert_eq!(shape, vec![3, 4]);
    let back: Array = session.call_as("kept", &()).unwrap();
    assert_eq!(back, a);
    drop(session);
    finish(pool);
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Point {
    x: f64,
    y: f64,
    label: Bytes,
}

#[test]
fn dataclasses_and_registered_encoders_become_json_and_a_runaway_encoder_is_stopped() {
    for (profile, name) in profiles() {
        let pool = builder(&format!("bin-enc-{name}"), profile).build().unwrap();
        let p: Point = pool.call_as("objects", &json!({"kind": "dataclass"})).unwrap();
        assert_eq!(p, Point { x: 1.5, y: -2.0, label: Bytes::from(vec![0, 1]) }, "{name}");
        let r = pool.call("objects", json!({"kind": "registered"})).unwrap();
        assert_eq!(r, json!([{"celsius": 21.5}, {"celsius": -3}]), "{name}");
        for kind in ["loop", "unknown"] {
            match pool.call("objects", json!({"kind": kind})) {
                Err(Error::Python(e)) => assert!(!e.message.is_empty(), "{name}: {kind}: {e}"),
                other => panic!("{name}: {kind}: expected a Python error, got {other:?}"),
            }
        }
        assert!(pool.call_as::<_, u32>("pid", &()).is_ok(), "{name}: the pool serves on");
        finish(pool);
    }
}

#[test]
fn binary_values_too_large_for_a_frame_fail_only_their_call() {
    for (profile, name) in profiles() {
        let pool = builder(&format!("bin-big-{name}"), profile).max_frame_size(1 << 20).build().unwrap();
        let pid: u32 = pool.call_as("pid", &()).unwrap();
        // Too large to send: refused before anything is written.
        let big = Bytes::from(vec![1u8; 2 << 20]);
        let err = pool.call_as::<_, Bytes>("same", &(big,)).unwrap_err();
        assert!(matches!(err, Error::FrameTooLarge { .. }), "{name}: {err:?}");
        // Too large to come back: the worker answers an error instead.
        let err = pool.call_as::<_, Bytes>("make", &json!({"kind": "huge", "n": 2 << 20})).unwrap_err();
        assert!(
            err.to_string().contains("too large") || err.to_string().contains("FrameTooLarge"),
            "{name}: {err}"
        );
        // Just under the limit goes through.
        let fits: Bytes = pool.call_as("same", &(Bytes::from(vec![2u8; (1 << 20) - 200]),)).unwrap();
        assert_eq!(fits.len(), (1 << 20) - 200);
        assert_eq!(pool.call_as::<_, u32>("pid", &()).unwrap(), pid, "{name}: the same worker serves on");
        finish(pool);
    }
}

#[test]
fn a_deadline_part_way_through_a_large_frame_never_leaves_half_a_frame_to_the_next_call() {
    for (profile, name) in profiles() {
        let pool = builder(&format!("bin-cut-{name}"), profile).max_frame_size(128 << 20).build().unwrap();
        let big = Bytes::from(vec![3u8; 64 << 20]); // far more than the pipe takes in 5 ms
        for _ in 0..3 {
            let options = snakepit::CallOptions::new().timeout(Duration::from_millis(5));
            let err = pool.call_as_with::<_, Bytes>("same", &(big.clone(),), options).unwrap_err();
            assert_eq!(err.timeout_kind(), Some(snakepit::TimeoutKind::Call), "{name}: {err}");
            // Whatever worker serves next reads whole frames: the reply is this call's.
            let small = Bytes::from(vec![9u8; 1000]);
            let back: Bytes = pool.call_as("same", &(small.clone(),)).unwrap();
            assert_eq!(back, small, "{name}");
        }
        finish(pool);
    }
}

#[test]
fn a_call_waiting_to_write_behind_a_cut_frame_runs_on_the_next_worker() {
    // Thread profile: while a large frame is being written, other callers wait for the pipe.
    // When that frame is cut by its deadline, the worker is done for; a waiting call must not
    // be appended to the half frame (it would die with the worker), but run on the replacement.
    let pool = builder("bin-behind", Profile::Thread).max_frame_size(256 << 20).build().unwrap();
    let big = Bytes::from(vec![5u8; 192 << 20]); // ~100 ms or more to write
    std::thread::scope(|s| {
        let cut = s.spawn(|| {
            let options = snakepit::CallOptions::new().timeout(Duration::from_millis(60));
            pool.call_as_with::<_, Bytes>("same", &(big.clone(),), options)
        });
        std::thread::sleep(Duration::from_millis(20)); // the big frame is being written
        let small: u32 = pool.call_as("pid", &()).expect("the waiting call runs on the next worker");
        assert!(small > 0);
        let err = cut.join().unwrap().unwrap_err();
        assert_eq!(err.timeout_kind(), Some(snakepit::TimeoutKind::Call), "{err}");
    });
    finish(pool);
}

/// CRC-32 (IEEE), bit by bit: what Python's `zlib.crc32` computes.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= byte as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

#[test]
fn the_demo_adapter_checksums_bytes_and_scales_arrays_without_numpy() {
    let pool = Pool::builder().name("bin-demo").size(1).adapter("snakepit.demo").build().unwrap();
    let blob: Vec<u8> = (0..=255).collect();
    let sum: Value = pool.call_as("checksum", &(Bytes::from(blob.clone()),)).unwrap();
    assert_eq!(sum, json!({"len": 256, "crc32": crc32(&blob)}));
    let x = Array::from_vec(vec![1.5f64, -2.0, 0.25], [3]).unwrap();
    let y: Array = pool.call_as("scale", &(x, 4.0)).unwrap();
    assert_eq!((y.shape(), y.as_slice::<f64>().unwrap()), (&[3][..], &[6.0, -8.0, 1.0][..]));
    let wrong = pool.call_as::<_, Array>("scale", &(Array::from_slice(&[1i32]), 2.0)).unwrap_err();
    assert!(matches!(&wrong, Error::Python(e) if e.error_type == "TypeError"), "{wrong:?}");
    finish(pool);
}
