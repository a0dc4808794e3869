//! How common Python libraries behave under threads: the table behind
//! [`PythonInfo::libraries`](crate::python::PythonInfo::libraries), shipped as data.

use serde::Serialize;

/// Whether a library's objects may be used from several threads at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ThreadSafety {
    /// Safe to call from several threads; heavy work releases the GIL.
    Safe,
    /// Safe under a condition (see the note).
    Conditional,
    /// Objects must not be shared between threads: give each thread its own, or use the
    /// process profile.
    NotSafe,
}

/// One row: the import name shown to users, the distribution names to look for, the class,
/// and what to know.
pub(crate) struct Entry {
    pub(crate) name: &'static str,
    pub(crate) distributions: &'static [&'static str],
    pub(crate) safety: ThreadSafety,
    pub(crate) note: &'static str,
}

use ThreadSafety::{Conditional, NotSafe, Safe};

pub(crate) const TABLE: &[Entry] = &[
    Entry {
        name: "numpy",
        distributions: &["numpy"],
        safety: Safe,
        note: "array operations release the GIL; do not mutate one array from two threads",
    },
    Entry { name: "scipy", distributions: &["scipy"], safety: Safe, note: "most routines release the GIL" },
    Entry {
        name: "torch",
        distributions: &["torch"],
        safety: Safe,
        note: "inference is thread-safe; set torch.set_num_threads per worker",
    },
    Entry {
        name: "tensorflow",
        distributions: &["tensorflow", "tensorflow-cpu"],
        safety: Safe,
        note: "a model may be called from several threads",
    },
    Entry {
        name: "polars",
        distributions: &["polars"],
        safety: Safe,
        note: "runs its own thread pool; limit it with POLARS_MAX_THREADS",
    },
    Entry {
        name: "requests",
        distributions: &["requests"],
        safety: Safe,
        note: "use a Session per thread for connection reuse",
    },
    Entry {
        name: "httpx",
        distributions: &["httpx"],
        safety: Safe,
        note: "a Client may be shared between threads",
    },
    Entry {
        name: "onnxruntime",
        distributions: &["onnxruntime", "onnxruntime-gpu"],
        safety: Safe,
        note: "InferenceSession.run may be called concurrently",
    },
    Entry {
        name: "scikit-learn",
        distributions: &["scikit-learn"],
        safety: Conditional,
        note: "predict on a fitted model is safe; fit is not, and n_jobs spawns its own workers",
    },
    Entry {
        name: "pillow",
        distributions: &["pillow", "Pillow"],
        safety: Conditional,
        note: "safe with one Image object per thread",
    },
    Entry {
        name: "sqlalchemy",
        distributions: &["sqlalchemy", "SQLAlchemy"],
        safety: Conditional,
        note: "an Engine is shared safely; a Session is not: one per thread",
    },
    Entry {
        name: "opencv",
        distributions: &["opencv-python", "opencv-python-headless", "opencv-contrib-python"],
        safety: Conditional,
        note: "functions release the GIL; call cv2.setNumThreads(1) to avoid oversubscription",
    },
    Entry {
        name: "jax",
        distributions: &["jax"],
        safety: Conditional,
        note: "jitted functions are safe to call; tracing/compiling from several threads is not",
    },
    Entry {
        name: "xgboost",
        distributions: &["xgboost"],
        safety: Conditional,
        note: "inplace_predict is safe; predict on a shared Booster is not",
    },
    Entry {
        name: "lightgbm",
        distributions: &["lightgbm"],
        safety: Conditional,
        note: "predict is safe with num_threads=1 per call",
    },
    Entry {
        name: "faiss",
        distributions: &["faiss-cpu", "faiss-gpu"],
        safety: Conditional,
        note: "searches may run concurrently; adding to an index may not",
    },
    Entry {
        name: "pandas",
        distributions: &["pandas"],
        safety: NotSafe,
        note: "a DataFrame must not be shared between threads that modify it",
    },
    Entry {
        name: "matplotlib",
        distributions: &["matplotlib"],
        safety: NotSafe,
        note: "pyplot keeps global state: one figure per process",
    },
    Entry {
        name: "sqlite3",
        distributions: &[],
        safety: NotSafe,
        note: "a connection belongs to the thread that opened it (standard library)",
    },
    Entry {
        name: "spacy",
        distributions: &["spacy"],
        safety: NotSafe,
        note: "a loaded pipeline must not be shared between threads",
    },
];
