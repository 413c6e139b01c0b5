//! The long-running roles: worker, gateway, and serve (both, with an embedded Redis
//! when none is configured). Each also serves /metrics and health on its metrics
//! listener, and shuts down in order: stop accepting, drain, stop Redis.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::{self, ApiConfig, App, ServerLimits};
use crate::config::Settings;
use crate::embedded::EmbeddedRedis;
use crate::queue::{Conn, RedisTarget};
use crate::registry::Registry;
use crate::worker::Worker;

/// The Redis to use, or the error a role without an embedded default must give.
pub(super) fn redis_target(settings: &Settings, role: &str) -> anyhow::Result<RedisTarget> {
    let url = settings.redis_url.as_deref().with_context(|| {
        format!(
            "`inferq {role}` needs INFERQ_REDIS_URL (or --redis-url), e.g. redis://127.0.0.1:6379"
        )
    })?;
    target(settings, url)
}

/// A Redis URL with the TLS files the settings name.
fn target(settings: &Settings, url: &str) -> anyhow::Result<RedisTarget> {
    Ok(RedisTarget::parse(url)?.with_tls_files(
        settings.redis_ca_file.as_deref(),
        settings.redis_client_cert_file.as_deref(),
        settings.redis_client_key_file.as_deref(),
    )?)
}

/// A multi-threaded runtime for a role.
pub(super) fn runtime(threads: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let cores = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.unwrap_or(cores).max(1))
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Which parts a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    Worker,
    Gateway,
    Serve,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Worker => "worker",
            Role::Gateway => "gateway",
            Role::Serve => "serve",
        }
    }
}

/// Runs a role until SIGTERM/SIGINT, then drains.
pub(super) fn run(settings: &Settings, role: Role) -> anyhow::Result<()> {
    let configured = match role {
        Role::Serve => settings
            .redis_url
            .as_deref()
            .map(|url| target(settings, url))
            .transpose()?,
        _ => Some(redis_target(settings, role.name())?),
    };
    if role != Role::Gateway {
        crate::runtime::environment()?;
    }
    tracing::info!(role = role.name(), settings = ?settings, onnxruntime = %crate::runtime::version(), "starting");
    // A worker's async side only moves bytes between Redis and its inference
    // threads: one thread does it with fewer context switches (measured in drains).
    let default_threads = (role == Role::Worker).then_some(1);
    runtime(settings.async_threads.or(default_threads))?.block_on(async {
        let stop = CancellationToken::new();
        crate::shutdown::cancel_on_signal(stop.clone());
        let embedded = match configured {
            Some(_) => None,
            None => Some(
                EmbeddedRedis::start(&settings.data_dir, settings.embedded_maxmemory_mb)
                    .await
                    .map_err(anyhow::Error::msg)?,
            ),
        };
        let target = match (&configured, &embedded) {
            (Some(t), _) => t.clone(),
            (None, Some(e)) => RedisTarget::parse(&e.url())?,
            (None, None) => unreachable!("one of the two is set above"),
        };
        let result = run_parts(settings, role, &target, stop.clone()).await;
        stop.cancel();
        if let Some(e) = embedded {
            e.stop().await;
        }
        result
    })
}

/// Warns, at start, about a Redis whose memory settings break the promise that a full
/// Redis refuses new jobs and never drops accepted ones. Reading them may fail (a
/// managed Redis may hide INFO sections): that is a warning too, never fatal.
async fn warn_memory_limits(conn: &mut Conn) {
    match crate::queue::janitor::memory_limits(conn).await {
        Ok(m) => {
            if let Some(p) = m.policy.as_deref().filter(|p| *p != "noeviction") {
                tracing::warn!(
                    policy = %p,
                    "Redis maxmemory-policy is not noeviction: under memory pressure it may evict jobs, results and consumer-group state; set maxmemory-policy noeviction"
                );
            }
            if m.unlimited {
                tracing::warn!(
                    "Redis maxmemory is 0 (no limit), so noeviction never acts: Redis grows until the kernel kills it instead of refusing new jobs; set maxmemory below its memory limit"
                );
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot read Redis' memory settings"),
    }
}

async fn run_parts(
    settings: &Settings,
    role: Role,
    target: &RedisTarget,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let registry = Registry::new(&settings.models);
    let ops_conn = target
        .connect(Duration::from_secs(5))
        .await
        .context("cannot reach Redis")?;
    warn_memory_limits(&mut ops_conn.clone()).await;
    let metrics_listener = TcpListener::bind(settings.metrics_listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on INFERQ_METRICS_LISTEN {}",
                settings.metrics_listen
            )
        })?;
    let ops_stop = CancellationToken::new();
    let ops = tokio::spawn(serve_ops(
        metrics_listener,
        ops_conn.clone(),
        ops_stop.clone(),
    ));
    crate::telemetry::spawn_depth_sampler(
        ops_conn,
        registry.clone(),
        Duration::from_secs(5),
        ops_stop.clone(),
    );

    let http = if role == Role::Worker {
        None
    } else {
        let listener = TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("cannot listen on INFERQ_LISTEN {}", settings.listen))?;
        let app = Arc::new(
            App::connect(
                ApiConfig::from_settings(settings),
                registry.clone(),
                target,
                ops_stop.clone(),
            )
            .await?,
        );
        let limits = ServerLimits::from_settings(settings);
        let handler = move |req| {
            let app = Arc::clone(&app);
            async move { app.handle(req).await }
        };
        tracing::info!(listen = %settings.listen, metrics = %settings.metrics_listen, "HTTP front door listening");
        Some(tokio::spawn(api::serve(
            listener,
            handler,
            limits,
            stop.clone(),
        )))
    };
    let worker = if role == Role::Gateway {
        None
    } else {
        Some(
            Worker::start(
                settings.worker(),
                registry.clone(),
                target.clone(),
                stop.clone(),
            )
            .await?,
        )
    };
    if role == Role::Serve {
        print_banner(settings, &registry);
    }
    stop.cancelled().await;
    if let Some(h) = http {
        let _ = h.await;
    }
    if let Some(w) = worker {
        if w.shutdown().await {
            tracing::info!("worker drained");
        } else {
            tracing::warn!(
                "drain deadline passed; unfinished jobs stay pending for another worker"
            );
        }
    }
    ops_stop.cancel();
    let _ = ops.await;
    Ok(())
}

async fn serve_ops(listener: TcpListener, conn: Conn, stop: CancellationToken) {
    let handler = move |req| {
        let conn = conn.clone();
        async move { api::ops(req, conn).await }
    };
    api::serve(
        listener,
        handler,
        ServerLimits {
            drain: Duration::from_secs(1),
            ..ServerLimits::default()
        },
        stop,
    )
    .await;
}

/// Where to point a browser or curl: printed by `serve` once it listens.
fn print_banner(settings: &Settings, registry: &Registry) {
    let example = registry.list().ok().and_then(|models| {
        models.into_iter().find_map(|m| {
            let input = m.manifest.signature.inputs.first()?;
            let width = usize::try_from(*input.shape.get(1)?).ok()?;
            let row = vec!["0.5"; width].join(", ");
            Some(format!(
                "curl -s -X POST http://{}/v2/models/{}/infer -H 'content-type: application/json' -d '{{\"features\": [[{row}]]}}'",
                settings.listen, m.name
            ))
        })
    });
    println!(
        "inferq serving on http://{} (metrics on http://{}/metrics)",
        settings.listen, settings.metrics_listen
    );
    match example {
        Some(cmd) => println!("try:\n  {cmd}"),
        None => println!(
            "the registry at {} has no models yet: add one with `inferq models add FILE --name NAME`",
            settings.models.display()
        ),
    }
}
