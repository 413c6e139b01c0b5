//! The long-running roles: worker (and, with the front door, gateway and serve).

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::queue::RedisTarget;
use crate::registry::Registry;
use crate::worker::Worker;

/// The Redis to use, or the error a role without an embedded default must give.
pub(super) fn redis_target(settings: &Settings, role: &str) -> anyhow::Result<RedisTarget> {
    let url = settings.redis_url.as_deref().with_context(|| {
        format!(
            "`inferq {role}` needs INFERQ_REDIS_URL (or --redis-url), e.g. redis://127.0.0.1:6379"
        )
    })?;
    Ok(RedisTarget::parse(url)?)
}

/// A multi-threaded runtime for a role.
pub(super) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// `inferq worker`: serve models until SIGTERM/SIGINT, then drain.
pub(super) fn worker(settings: &Settings) -> anyhow::Result<()> {
    let target = redis_target(settings, "worker")?;
    crate::runtime::environment()?;
    let cfg = settings.worker();
    tracing::info!(settings = ?settings, onnxruntime = %crate::runtime::version(), "starting worker");
    runtime()?.block_on(async {
        let stop = CancellationToken::new();
        crate::shutdown::cancel_on_signal(stop.clone());
        let worker =
            Worker::start(cfg, Registry::new(&settings.models), target, stop.clone()).await?;
        stop.cancelled().await;
        if worker.shutdown().await {
            tracing::info!("worker drained");
        } else {
            tracing::warn!(
                "drain deadline passed; unfinished jobs stay pending for another worker"
            );
        }
        Ok(())
    })
}
