//! A short-lived cache over the registry for hot paths (every submit resolves a
//! version): defaults and manifests are re-read at most once per `ttl`, so a new
//! version, pin or removal shows within a second without a restart.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Manifest, Registry, RegistryError};

type Stamped<T> = (T, Instant);
type ManifestMap = HashMap<(String, u64), Stamped<Arc<Manifest>>>;

/// Cached registry reads; clones share the cache.
#[derive(Debug, Clone)]
pub struct RegistryCache {
    registry: Registry,
    ttl: Duration,
    defaults: Arc<Mutex<HashMap<String, Stamped<u64>>>>,
    manifests: Arc<Mutex<ManifestMap>>,
}

impl RegistryCache {
    /// Caches reads of `registry` for `ttl`.
    pub fn new(registry: Registry, ttl: Duration) -> RegistryCache {
        RegistryCache {
            registry,
            ttl,
            defaults: Arc::default(),
            manifests: Arc::default(),
        }
    }

    /// The registry underneath.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The default version of `name` (pinned, else latest).
    pub fn default_version(&self, name: &str) -> Result<u64, RegistryError> {
        if let Some(&(v, at)) = self
            .defaults
            .lock()
            .expect("cache lock poisoned, this is a bug")
            .get(name)
            && at.elapsed() < self.ttl
        {
            return Ok(v);
        }
        let v = self.registry.default_version(name)?;
        self.defaults
            .lock()
            .expect("cache lock poisoned, this is a bug")
            .insert(name.to_owned(), (v, Instant::now()));
        Ok(v)
    }

    /// The manifest of `name` at `version` (default when `None`).
    pub fn manifest(
        &self,
        name: &str,
        version: Option<u64>,
    ) -> Result<Arc<Manifest>, RegistryError> {
        let v = match version {
            Some(v) => v,
            None => self.default_version(name)?,
        };
        let key = (name.to_owned(), v);
        if let Some((m, at)) = self
            .manifests
            .lock()
            .expect("cache lock poisoned, this is a bug")
            .get(&key)
            && at.elapsed() < self.ttl
        {
            return Ok(Arc::clone(m));
        }
        let m = Arc::new(self.registry.manifest(name, Some(v))?);
        self.manifests
            .lock()
            .expect("cache lock poisoned, this is a bug")
            .insert(key, (Arc::clone(&m), Instant::now()));
        Ok(m)
    }
}
