//! The worker role: one pipeline per served model (queue → batcher → runtime →
//! queue), started as models appear in the registry, drained in order on shutdown.

mod held;
mod intake;
mod models;
mod outcome;
mod pipeline;
mod results;
mod running;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::WorkerConfig;
use crate::queue::reader::{ReaderTarget, StreamReader};
use crate::queue::{QueueError, RedisTarget};
use crate::registry::{Registry, RegistryCache};
use crate::shutdown::Backoff;

/// How often the registry is re-read for new models (when serving all models).
const DISCOVER_EVERY: Duration = Duration::from_secs(2);

/// A running worker; `stop` ends reading, `finished` resolves once in-flight batches
/// are written (or the drain deadline passed).
#[derive(Debug)]
pub struct Worker {
    stop: CancellationToken,
    tracker: TaskTracker,
    drain: Duration,
}

impl Worker {
    /// Starts pipelines for the configured models (or every model in the registry,
    /// re-checked every few seconds). Redis must answer within a few retries.
    pub async fn start(
        cfg: WorkerConfig,
        registry: Registry,
        target: RedisTarget,
        stop: CancellationToken,
    ) -> Result<Worker, QueueError> {
        let writer_timeout = Duration::from_secs(10);
        let writer = target.connect(writer_timeout).await?;
        let cfg = Arc::new(cfg);
        let tracker = TaskTracker::new();
        let drain = cfg.drain_timeout;
        let spawner = Spawner {
            cfg: Arc::clone(&cfg),
            registry: RegistryCache::new(registry, Duration::from_secs(1)),
            target,
            writer,
            tracker: tracker.clone(),
            stop: stop.clone(),
        };
        tracker.spawn(spawner.run());
        Ok(Worker {
            stop,
            tracker,
            drain,
        })
    }

    /// Stops reading and waits for in-flight work, at most the drain deadline; true
    /// when everything finished in time.
    pub async fn shutdown(self) -> bool {
        self.stop.cancel();
        crate::shutdown::drain(&self.tracker, self.drain).await
    }
}

/// Starts a pipeline per model, once each.
struct Spawner {
    cfg: Arc<WorkerConfig>,
    registry: RegistryCache,
    target: RedisTarget,
    writer: crate::queue::Conn,
    tracker: TaskTracker,
    stop: CancellationToken,
}

impl Spawner {
    async fn run(self) {
        let mut started: HashSet<String> = HashSet::new();
        let mut backoff = Backoff::new(Duration::from_secs(2));
        while !self.stop.is_cancelled() {
            let wanted = if self.cfg.models.is_empty() {
                match self.registry.registry().names() {
                    Ok(names) => names,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot list the registry");
                        Vec::new()
                    }
                }
            } else {
                self.cfg.models.clone()
            };
            let new: Vec<String> = wanted
                .into_iter()
                .filter(|m| !started.contains(m))
                .collect();
            for model in new {
                let reader = match self
                    .target
                    .connect(Duration::from_millis(pipeline::read_timeout_ms()))
                    .await
                {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(model = %model, error = %e, "cannot connect a reader; retrying");
                        if !backoff.wait(&self.stop).await {
                            return;
                        }
                        continue;
                    }
                };
                backoff.reset();
                tracing::info!(model = %model, consumer = %self.cfg.consumer, "serving model");
                let p = pipeline::Pipeline::new(
                    &model,
                    Arc::clone(&self.cfg),
                    self.registry.clone(),
                    pipeline::Reader {
                        conn: reader,
                        fast: ReaderTarget::new(&self.target).map(StreamReader::new),
                    },
                    self.writer.clone(),
                    self.tracker.clone(),
                    self.stop.clone(),
                );
                self.tracker.spawn(p.run());
                started.insert(model);
            }
            if !self.cfg.models.is_empty() && started.len() == self.cfg.models.len() {
                return;
            }
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = tokio::time::sleep(DISCOVER_EVERY) => {}
            }
        }
    }
}
