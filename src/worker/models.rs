//! The versions of one model a worker has loaded. The default version comes from the
//! shared [`RegistryCache`], so a new version or pin is picked up within a second
//! without a restart.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::config::BatchConfig;
use crate::error::Retry;
use crate::registry::{Manifest, RegistryCache, RegistryError};
use crate::runtime::LoadedModel;

/// A version ready to serve, with the batching that applies to it.
#[derive(Debug, Clone)]
pub(crate) struct Version {
    pub(crate) model: Arc<LoadedModel>,
    pub(crate) batch: BatchConfig,
}

/// Why a job's version cannot be served, and whether a retry may help.
#[derive(Debug)]
pub(crate) struct ResolveError {
    pub(crate) message: String,
    pub(crate) retry: Retry,
}

#[derive(Debug)]
pub(crate) struct ModelCache {
    registry: RegistryCache,
    name: String,
    defaults: BatchConfig,
    loaded: HashMap<u64, Version>,
}

impl ModelCache {
    pub(crate) fn new(registry: RegistryCache, name: &str, defaults: BatchConfig) -> ModelCache {
        ModelCache {
            registry,
            name: name.to_owned(),
            defaults,
            loaded: HashMap::new(),
        }
    }

    /// Batching of the default version (what the next read should aim for), from its
    /// cached manifest: nothing is loaded here.
    pub(crate) fn default_batch(&mut self) -> BatchConfig {
        if let Ok(v) = self.registry.default_version(&self.name)
            && let Some(found) = self.loaded.get(&v)
        {
            return found.batch;
        }
        self.registry
            .manifest(&self.name, None)
            .map_or(self.defaults, |m| self.batch_of(&m))
    }

    /// The version a job asks for (`None`: the default), loading and hash-checking it
    /// the first time, on a blocking thread: reading and hashing a large model file
    /// must not stall the worker's async threads, which keep reading, refreshing held
    /// jobs and serving `/metrics` meanwhile.
    pub(crate) async fn get(&mut self, version: Option<u64>) -> Result<Version, ResolveError> {
        let v = match version {
            Some(v) => v,
            None => self
                .registry
                .default_version(&self.name)
                .map_err(|e| classify(&e))?,
        };
        if let Some(found) = self.loaded.get(&v) {
            return Ok(found.clone());
        }
        let (registry, name) = (self.registry.registry().clone(), self.name.clone());
        let (manifest, bytes) = tokio::task::spawn_blocking(move || registry.load(&name, Some(v)))
            .await
            .map_err(|e| ResolveError {
                message: format!("model {}@{v}: loading stopped: {e}", self.name),
                retry: Retry::Retryable,
            })?
            .map_err(|e| classify(&e))?;
        let batch = self.batch_of(&manifest);
        if let Some(p) = &manifest.padding {
            // Checked when the version was added; a hand-edited manifest may be fixed
            // by an operator, so jobs are retried until then.
            p.validate(&manifest.signature).map_err(|e| ResolveError {
                message: format!("model {}@{v}: {e}", self.name),
                retry: Retry::Retryable,
            })?;
        }
        let model = Arc::new(LoadedModel {
            name: self.name.clone(),
            version: v,
            bytes: bytes.into(),
            signature: manifest.signature,
            padding: manifest.padding,
        });
        tracing::info!(model = %self.name, version = v, "loaded model version");
        let found = Version { model, batch };
        self.loaded.insert(v, found.clone());
        Ok(found)
    }

    /// A version's batching: its manifest's settings over the process defaults.
    fn batch_of(&self, manifest: &Manifest) -> BatchConfig {
        let batching = manifest.batching.clone().unwrap_or_default();
        BatchConfig {
            // A hand-edited manifest cannot lift the bound `models add` enforces.
            max_batch: batching
                .max_batch
                .unwrap_or(self.defaults.max_batch)
                .clamp(1, crate::config::MAX_BATCH_ROWS),
            max_elements: batching
                .max_batch_elements
                .unwrap_or(self.defaults.max_elements),
            max_wait: batching
                .max_wait_ms
                .map_or(self.defaults.max_wait, Duration::from_millis),
        }
    }
}

/// Unknown models and versions fail the job; a damaged or unreadable file may be
/// fixed by an operator, so it is retried (and dead-lettered after max attempts).
fn classify(e: &RegistryError) -> ResolveError {
    let retry = match e {
        RegistryError::UnknownModel(_)
        | RegistryError::UnknownVersion(..)
        | RegistryError::InvalidName(_) => Retry::Terminal,
        RegistryError::HashMismatch { .. }
        | RegistryError::Refused(_)
        | RegistryError::Io { .. } => Retry::Retryable,
    };
    ResolveError {
        message: e.to_string(),
        retry,
    }
}
