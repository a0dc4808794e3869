//! With numpy in the worker: arrays arrive as writable ndarrays, ndarrays of any layout and
//! byte order come back as C-contiguous little-endian arrays, numpy scalars become JSON.
//!
//! The worker's Python is a virtual environment with numpy, made once under the target folder
//! (tests/common/numpy_env.rs); each test skips, loudly, only when no package index can be
//! reached to install numpy.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};
use snakepit::{Array, DType, Error, Pool, PoolBuilder, Profile};

fn builder(python: PathBuf, name: &str, profile: Profile) -> PoolBuilder {
    let b = Pool::builder()
        .name(name)
        .size(1)
        .python(python)
        .python_path(common::fixtures())
        .adapter("binary_adapter")
        .max_frame_size(256 << 20)
        .startup_timeout(Duration::from_secs(30))
        .request_timeout(Duration::from_secs(60));
    match profile {
        Profile::Thread => b.profile(Profile::Thread).threads_per_worker(2),
        _ => b,
    }
}

fn finish(pool: Pool) {
    let pids = common::worker_pids(&pool);
    pool.shutdown().unwrap();
    common::assert_gone(&pids, Duration::from_secs(10));
}

#[test]
fn arrays_arrive_as_writable_ndarrays_and_come_back_computed() {
    let Some(python) = common::numpy_env::numpy_python_or_skip("arrays_arrive_as_writable_ndarrays") else {
        return;
    };
    for (profile, name) in [(Profile::Process, "process"), (Profile::Thread, "thread")] {
        let pool = builder(python.clone(), &format!("np-in-{name}"), profile).build().unwrap();
        let x = Array::from_vec((0..1_000_000).map(|i| i as f64).collect(), [1000, 1000]).unwrap();
        let got: Value = pool.call_as("describe", &(x.clone(),)).unwrap();
        assert_eq!(got["type"], "ndarray", "{name}");
        assert_eq!(got["dtype"], "float64");
        assert_eq!(got["shape"], json!([1000, 1000]));
        assert_eq!(got["writable"], true, "{name}: the command may change it in place");
        let doubled: Array = pool.call_as("np_double", &(x.clone(),)).unwrap();
        assert_eq!(doubled.shape(), &[1000, 1000]);
        let values = doubled.as_slice::<f64>().unwrap();
        assert!(values.iter().enumerate().all(|(i, &v)| v == 2.0 * i as f64), "{name}");
        let bumped: Array = pool.call_as("np_add_one_in_place", &(Array::from_slice(&[1i32, 2]),)).unwrap();
        assert_eq!(bumped.to_vec::<i32>().unwrap(), vec![2, 3]);
        let sum: f64 = pool.call_as("np_sum", &(Array::from_slice(&[0.5f32, 0.25]),)).unwrap();
        assert_eq!(sum, 0.75);
        finish(pool);
    }
}

#[test]
fn numpy_arrays_of_every_dtype_read_back_in_rust() {
    let Some(python) = common::numpy_env::numpy_python_or_skip("numpy_arrays_of_every_dtype") else { return };
    let pool = builder(python, "np-dtypes", Profile::Process).build().unwrap();
    let all: std::collections::BTreeMap<String, Array> = pool.call_as("np_every_dtype", &()).unwrap();
    assert_eq!(all.len(), 14);
    for (name, a) in &all {
        assert_eq!(a.dtype().name(), name);
        assert_eq!(a.shape(), &[3]);
    }
    assert_eq!(all["bool"].to_bools().unwrap(), vec![false, true, true]);
    assert_eq!(all["int8"].to_vec::<i8>().unwrap(), vec![0, 1, 2]);
    assert_eq!(all["int16"].to_vec::<i16>().unwrap(), vec![0, 1, 2]);
    assert_eq!(all["int32"].to_vec::<i32>().unwrap(), vec![0, 1, 2]);
    assert_eq!(all["int64"].to_vec::<i64>().unwrap(), vec![0, 1, 2]);
    assert_eq!(all["uint8"].to_vec::<u8>().unwrap(), vec![0, 1, 2]);
    assert_eq!(all["uint16"].to_vec::<u16>().unwrap(), vec![0, 1, 2]);
    assert_eq!(all["uint32"].to_vec::<u32>().unwrap(), vec![0, 1, 2]);
    assert_eq!(all["uint64"].to_vec::<u64>().unwrap(), vec![0, 1, 2]);
    assert_eq!(all["float32"].to_vec::<f32>().unwrap(), vec![0.0, 1.0, 2.0]);
    assert_eq!(all["float64"].to_vec::<f64>().unwrap(), vec![0.0, 1.0, 2.0]);
    // Half precision as its bits: 1.0 is 0x3c00, 2.0 is 0x4000 (little-endian).
    assert_eq!(all["float16"].bytes().as_slice(), &[0x00, 0x00, 0x00, 0x3c, 0x00, 0x40]);
    // Complex numbers as (real, imaginary) pairs.
    let c64 = Array::new(DType::Float32, [6], all["complex64"].bytes().clone()).unwrap();
    assert_eq!(c64.to_vec::<f32>().unwrap(), vec![0.0, 0.0, 1.0, 0.0, 2.0, 0.0]);
    let c128 = Array::new(DType::Float64, [6], all["complex128"].bytes().clone()).unwrap();
    assert_eq!(c128.to_vec::<f64>().unwrap(), vec![0.0, 0.0, 1.0, 0.0, 2.0, 0.0]);
    // And each goes back to numpy as the same dtype.
    for (name, a) in &all {
        let got: Value = pool.call_as("describe", &(a.clone(),)).unwrap();
        assert_eq!((got["type"].as_str(), got["dtype"].as_str()), (Some("ndarray"), Some(name.as_str())));
        let back: Array = pool.call_as("same", &(a.clone(),)).unwrap();
        assert_eq!(&back, a, "{name}");
    }
    finish(pool);
}

#[test]
fn any_layout_and_byte_order_comes_back_c_contiguous_and_little_endian() {
    let Some(python) = common::numpy_env::numpy_python_or_skip("any_layout_and_byte_order") else { return };
    let pool = builder(python, "np-layout", Profile::Process).build().unwrap();
    let fortran: Array = pool.call_as("np_make", &("fortran",)).unwrap();
    assert_eq!(fortran.shape(), &[2, 3]);
    assert_eq!(fortran.to_vec::<f64>().unwrap(), vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0], "row-major order");
    let big: Array = pool.call_as("np_make", &("big_endian",)).unwrap();
    assert_eq!((big.dtype(), big.to_vec::<i32>().unwrap()), (DType::Int32, vec![0, 1, 2, 3]));
    let strided: Array = pool.call_as("np_make", &("strided",)).unwrap();
    assert_eq!(strided.to_vec::<f64>().unwrap(), vec![0.0, 2.0, 4.0, 6.0, 8.0]);
    let zero_d: Array = pool.call_as("np_make", &("zero_d",)).unwrap();
    assert_eq!((zero_d.shape(), zero_d.to_vec::<f64>().unwrap()), (&[][..], vec![3.5]));
    let empty: Array = pool.call_as("np_make", &("empty",)).unwrap();
    assert_eq!((empty.dtype(), empty.shape(), empty.len()), (DType::Float32, &[0, 3][..], 0));
    let complex: Array = pool.call_as("np_make", &("complex",)).unwrap();
    assert_eq!((complex.dtype(), complex.shape()), (DType::Complex128, &[][..]));
    finish(pool);
}

#[test]
fn numpy_scalars_are_json_and_unsupported_dtypes_are_clear_errors() {
    let Some(python) = common::numpy_env::numpy_python_or_skip("numpy_scalars_are_json") else { return };
    let pool = builder(python, "np-scalars", Profile::Process).build().unwrap();
    let pid: u32 = pool.call_as("pid", &()).unwrap();
    let scalars = pool.call("np_make", json!(["scalars"])).unwrap();
    assert_eq!(scalars, json!({"i": 5, "u": 7, "f": 1.5, "b": true, "d": 0.1}));
    let mixed = pool.call("np_make", json!(["mixed"])).unwrap();
    assert_eq!(mixed["n"], 3);
    assert_eq!(mixed["a"]["dtype"], "int8");
    for kind in ["object", "strings", "nan"] {
        match pool.call("np_make", json!([kind])) {
            Err(Error::Python(e)) => {
                let text = e.to_string();
                if kind != "nan" {
                    assert!(text.contains("dtype"), "{kind}: the error names the dtype: {text}");
                }
            }
            other => panic!("{kind}: expected a Python error, got {other:?}"),
        }
    }
    assert_eq!(pool.call_as::<_, u32>("pid", &()).unwrap(), pid, "the worker was kept");
    finish(pool);
}
