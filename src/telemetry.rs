//! Logging set-up: human-readable by default, JSON on request; level from `RUST_LOG`.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber once; later calls are no-ops (tests).
pub fn init_logging(format: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Figures about this process and host, read through sysinfo.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessFigures {
    /// CPU use in percent of one core since the previous reading.
    pub cpu_percent: f32,
    /// Resident memory in bytes.
    pub resident_bytes: u64,
    /// Host memory in use in bytes.
    pub host_used_bytes: u64,
    /// Open file descriptors.
    pub open_fds: u64,
}

/// Reads the process and host figures (CPU % is relative to the previous call).
pub fn process_figures() -> ProcessFigures {
    use std::sync::Mutex;
    use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, RefreshKind, System};
    static SYSTEM: Mutex<Option<System>> = Mutex::new(None);
    let Ok(mut guard) = SYSTEM.lock() else {
        return ProcessFigures::default();
    };
    let sys = guard.get_or_insert_with(|| System::new_with_specifics(RefreshKind::nothing()));
    let pid = Pid::from_u32(std::process::id());
    sys.refresh_processes_specifics(
        ProcessesToUpdate::Some(&[pid]),
        true,
        ProcessRefreshKind::nothing().with_cpu().with_memory(),
    );
    sys.refresh_memory();
    let (cpu_percent, resident_bytes) = sys
        .process(pid)
        .map_or((0.0, 0), |p| (p.cpu_usage(), p.memory()));
    let open_fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
    ProcessFigures {
        cpu_percent,
        resident_bytes,
        host_used_bytes: sys.used_memory(),
        open_fds,
    }
}

/// Updates the process gauges and uptime before a scrape.
pub fn refresh_process_metrics() {
    use std::sync::OnceLock;
    static STARTED: OnceLock<std::time::Instant> = OnceLock::new();
    let started = STARTED.get_or_init(std::time::Instant::now);
    let f = process_figures();
    let m = crate::metrics::metrics();
    m.process_cpu.set(f64::from(f.cpu_percent));
    m.process_memory.set(f.resident_bytes as i64);
    m.host_memory_used.set(f.host_used_bytes as i64);
    m.open_fds.set(f.open_fds as i64);
    m.uptime.set(started.elapsed().as_secs_f64());
    m.build_info
        .with_label_values(&[env!("CARGO_PKG_VERSION"), &crate::runtime::version()])
        .set(1);
}

/// Samples queue depth, lag, pending and oldest-job age of every model every
/// `every`, into the gauges: one task per process, never per request.
pub fn spawn_depth_sampler(
    mut conn: crate::queue::Conn,
    registry: crate::registry::Registry,
    every: std::time::Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    tokio::spawn(async move {
        let m = crate::metrics::metrics();
        loop {
            for name in registry.names().unwrap_or_default() {
                let keys = crate::queue::Keys::new(&name);
                match crate::queue::janitor::depth(&mut conn, &keys).await {
                    Ok(d) => {
                        m.queue_depth
                            .with_label_values(&[&name])
                            .set(d.length as i64);
                        m.consumer_lag
                            .with_label_values(&[&name])
                            .set(d.lag.unwrap_or(d.length) as i64);
                        m.pending.with_label_values(&[&name]).set(d.pending as i64);
                        m.oldest_job_age
                            .with_label_values(&[&name])
                            .set(d.oldest_waiting_ms.unwrap_or(0) as f64 / 1000.0);
                    }
                    Err(e) => {
                        m.redis_errors.with_label_values(&["depth"]).inc();
                        tracing::debug!(model = %name, error = %e, "depth sample failed");
                    }
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    });
}
