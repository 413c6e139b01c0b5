//! The versions of one model a worker has loaded, and its default version (re-read
//! from the registry at most once a second, so a new version or pin is picked up
//! without a restart).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::BatchConfig;
use crate::error::Retry;
use crate::registry::{Registry, RegistryError};
use crate::runtime::LoadedModel;

/// How long a looked-up default version is trusted.
const DEFAULT_TTL: Duration = Duration::from_secs(1);

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
    registry: Registry,
    name: String,
    defaults: BatchConfig,
    default: Option<(u64, Instant)>,
    loaded: HashMap<u64, Version>,
}

impl ModelCache {
    pub(crate) fn new(registry: Registry, name: &str, defaults: BatchConfig) -> ModelCache {
        ModelCache {
            registry,
            name: name.to_owned(),
            defaults,
            default: None,
            loaded: HashMap::new(),
        }
    }

    /// The default version now (pinned, else latest).
    pub(crate) fn default_version(&mut self) -> Result<u64, ResolveError> {
        if let Some((v, at)) = self.default {
            if at.elapsed() < DEFAULT_TTL {
                return Ok(v);
            }
        }
        let v = self
            .registry
            .default_version(&self.name)
            .map_err(|e| classify(&e))?;
        self.default = Some((v, Instant::now()));
        Ok(v)
    }

    /// Batching of the default version (what the next read should aim for).
    pub(crate) fn default_batch(&mut self) -> BatchConfig {
        self.default_version()
            .ok()
            .and_then(|v| self.get(Some(v)).ok())
            .map_or(self.defaults, |v| v.batch)
    }

    /// The version a job asks for (`None`: the default), loading and hash-checking it
    /// the first time.
    pub(crate) fn get(&mut self, version: Option<u64>) -> Result<Version, ResolveError> {
        let v = match version {
            Some(v) => v,
            None => self.default_version()?,
        };
        if let Some(found) = self.loaded.get(&v) {
            return Ok(found.clone());
        }
        let (manifest, bytes) = self
            .registry
            .load(&self.name, Some(v))
            .map_err(|e| classify(&e))?;
        let batch = BatchConfig {
            max_batch: manifest
                .batching
                .as_ref()
                .and_then(|b| b.max_batch)
                .unwrap_or(self.defaults.max_batch),
            max_wait: manifest
                .batching
                .as_ref()
                .and_then(|b| b.max_wait_ms)
                .map_or(self.defaults.max_wait, Duration::from_millis),
        };
        let model = Arc::new(LoadedModel {
            name: self.name.clone(),
            version: v,
            bytes: bytes.into(),
            signature: manifest.signature,
        });
        tracing::info!(model = %self.name, version = v, "loaded model version");
        let found = Version { model, batch };
        self.loaded.insert(v, found.clone());
        Ok(found)
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
