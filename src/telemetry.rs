//! Logging set-up (human-readable by default, JSON on request; level from `RUST_LOG`),
//! the build info, and the one background task per process that samples queue
//! figures into the gauges.

use std::collections::HashSet;
use std::sync::OnceLock;
use std::time::Duration;

use tracing_subscriber::EnvFilter;

use crate::metrics::metrics;

/// Installs the global subscriber once; later calls are no-ops (tests).
pub fn init_logging(format: crate::config::LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: log files and container logs stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let _ = if format == crate::config::LogFormat::Json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Sets what the collectors do not read by themselves before a scrape: the build info
/// (the process_* figures come from the prometheus crate's process collector).
pub fn refresh_process_metrics() {
    // Set once: the ONNX Runtime version does not change while the process runs.
    static BUILD_INFO: OnceLock<()> = OnceLock::new();
    BUILD_INFO.get_or_init(|| {
        metrics()
            .build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), &crate::runtime::version()])
            .set(1);
    });
}

/// Samples, every `every`, whether Redis answers and the queue depth, lag, pending
/// count and oldest-job age of every model into the gauges: one task per process,
/// never per request. Also creates each model's event series at zero (see
/// [`crate::metrics::Metrics::touch_model`]).
pub fn spawn_depth_sampler(
    mut conn: crate::queue::Conn,
    registry: crate::registry::Registry,
    every: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    tokio::spawn(async move {
        let m = metrics();
        let mut known: HashSet<String> = HashSet::new();
        loop {
            let up = redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .is_ok();
            m.redis_up.set(i64::from(up));
            if !up {
                m.redis_errors.with_label_values(&["ping"]).inc();
            }
            // A registry that cannot be read this round keeps the models of the last.
            let names: HashSet<String> = match registry.names() {
                Ok(list) => list.into_iter().collect(),
                Err(_) => known.clone(),
            };
            for gone in known.difference(&names) {
                m.forget_model(gone);
            }
            for name in &names {
                m.touch_model(name);
                if !up {
                    continue;
                }
                let keys = crate::queue::Keys::new(name);
                match crate::queue::janitor::depth(&mut conn, &keys).await {
                    Ok(d) => {
                        m.queue_depth
                            .with_label_values(&[name])
                            .set(d.length as i64);
                        m.consumer_lag
                            .with_label_values(&[name])
                            .set(d.lag.unwrap_or(d.length) as i64);
                        m.pending.with_label_values(&[name]).set(d.pending as i64);
                        m.oldest_job_age
                            .with_label_values(&[name])
                            .set(d.oldest_waiting_ms.unwrap_or(0) as f64 / 1000.0);
                    }
                    Err(e) => {
                        m.redis_errors.with_label_values(&["depth"]).inc();
                        tracing::debug!(model = %name, error = %e, "depth sample failed");
                    }
                }
            }
            known = names;
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    });
}
