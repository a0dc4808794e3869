//! [`PoolSet`]: several named pools side by side, each with its own workers, queue, policies
//! and threads, and routing of calls by pool name.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::config::PoolBuilder;
use crate::config_file::Config;
use crate::error::{Error, Result};
use crate::pool::{CallOptions, Pool};
use crate::session::{Session, SessionOptions};
use crate::stats::PoolStats;

/// The name of the pool that the short forms ([`PoolSet::call_default`]) use when the set has
/// more than one pool.
pub const DEFAULT_POOL: &str = "default";

/// Several named pools. `Send + Sync`; dropping it shuts every pool down.
#[derive(Debug)]
pub struct PoolSet {
    pools: BTreeMap<String, Pool>,
}

/// Sets up a [`PoolSet`].
#[derive(Debug, Default)]
#[must_use = "a builder does nothing until build() is called"]
pub struct PoolSetBuilder {
    pools: Vec<PoolBuilder>,
}

impl PoolSetBuilder {
    /// Adds a pool; its `name` routes calls to it.
    pub fn pool(mut self, pool: PoolBuilder) -> Self {
        self.pools.push(pool);
        self
    }

    /// Validates every pool's settings (names must be unique), then starts all pools at once
    /// and returns when every worker of every pool is ready. If any pool fails, the pools
    /// already started are shut down and the first error is returned.
    pub fn build(self) -> Result<PoolSet> {
        if self.pools.is_empty() {
            return Err(Error::config("pools", "a pool set needs at least one pool"));
        }
        let mut names = std::collections::BTreeSet::new();
        for p in &self.pools {
            p.config.validate()?;
            if !names.insert(p.config.name.clone()) {
                return Err(Error::config("name", format!("two pools are named {:?}", p.config.name)));
            }
        }
        // Each pool's workers are spawned by its own dispatcher thread, so building them from
        // short-lived threads here is safe.
        let results: Vec<(String, Result<Pool>)> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .pools
                .into_iter()
                .map(|p| {
                    let name = p.config.name.clone();
                    (name, s.spawn(move || p.build()))
                })
                .collect();
            handles
                .into_iter()
                .map(|(name, h)| {
                    let r = h.join().unwrap_or_else(|_| Err(Error::Protocol("pool build panicked".into())));
                    (name, r)
                })
                .collect()
        });
        let mut pools = BTreeMap::new();
        let mut first_error = None;
        for (name, result) in results {
            match result {
                Ok(pool) => {
                    pools.insert(name, pool);
                }
                Err(e) => {
                    log::error!("[{name}] pool failed to start: {e}");
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            None => Ok(PoolSet { pools }),
            Some(e) => {
                for pool in pools.values() {
                    let _ = pool.shutdown();
                }
                Err(e)
            }
        }
    }
}

impl PoolSet {
    /// A builder with no pools yet.
    pub fn builder() -> PoolSetBuilder {
        PoolSetBuilder::default()
    }

    /// Starts every pool a configuration describes.
    pub fn from_config(config: &Config) -> Result<PoolSet> {
        config.builders().into_iter().fold(PoolSet::builder(), PoolSetBuilder::pool).build()
    }

    /// The pool named `name`; `UnknownPool` (listing the names that exist) if there is none.
    pub fn pool(&self, name: &str) -> Result<&Pool> {
        self.pools
            .get(name)
            .ok_or_else(|| Error::UnknownPool { name: name.to_string(), known: self.pool_names() })
    }

    /// The pools' names, sorted.
    pub fn pool_names(&self) -> Vec<String> {
        self.pools.keys().cloned().collect()
    }

    /// The pool the short forms use: the only pool, else the one named `"default"`.
    pub fn default_pool(&self) -> Result<&Pool> {
        if self.pools.len() == 1 {
            return Ok(self.pools.values().next().expect("one pool"));
        }
        self.pool(DEFAULT_POOL)
    }

    /// Runs `command` on the pool named `pool`. See [`Pool::call`].
    pub fn call(&self, pool: &str, command: &str, args: Value) -> Result<Value> {
        self.pool(pool)?.call(command, args)
    }

    /// [`call`](PoolSet::call) with serde on both sides. See [`Pool::call_as`].
    pub fn call_as<A: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        pool: &str,
        command: &str,
        args: &A,
    ) -> Result<R> {
        self.pool(pool)?.call_as(command, args)
    }

    /// [`call`](PoolSet::call) with per-call options. See [`Pool::call_with`].
    pub fn call_with(&self, pool: &str, command: &str, args: Value, options: CallOptions) -> Result<Value> {
        self.pool(pool)?.call_with(command, args, options)
    }

    /// Opens a session on the pool named `pool` (its calls are routed there). See
    /// [`Pool::session_with`].
    pub fn session(&self, pool: &str, options: SessionOptions) -> Result<Session> {
        self.pool(pool)?.session_with(options)
    }

    /// Runs `command` on the [default pool](PoolSet::default_pool).
    pub fn call_default(&self, command: &str, args: Value) -> Result<Value> {
        self.default_pool()?.call(command, args)
    }

    /// Every pool's snapshot, by name.
    pub fn stats(&self) -> Result<BTreeMap<String, PoolStats>> {
        self.pools.iter().map(|(name, pool)| Ok((name.clone(), pool.stats()?))).collect()
    }

    /// Shuts every pool down at once (see [`Pool::shutdown`]); returns the first error.
    pub fn shutdown(&self) -> Result<()> {
        let results: Vec<Result<()>> = std::thread::scope(|s| {
            let handles: Vec<_> = self.pools.values().map(|p| s.spawn(move || p.shutdown())).collect();
            handles.into_iter().map(|h| h.join().unwrap_or(Ok(()))).collect()
        });
        results.into_iter().find(|r| r.is_err()).unwrap_or(Ok(()))
    }
}

impl Drop for PoolSet {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            log::warn!("pool set shutdown on drop: {e}");
        }
    }
}
