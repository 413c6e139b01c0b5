//! Logging set-up (human-readable by default, JSON on request; level from `RUST_LOG`),
//! the process and host figures read through sysinfo, and the one background task
//! per process that samples queue figures into the gauges.

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tracing_subscriber::EnvFilter;

use crate::metrics::metrics;

/// When this process started, as near as we can tell: the first call of
/// [`init_logging`] (the first thing `main` does), else the first scrape.
fn started() -> Instant {
    static STARTED: OnceLock<Instant> = OnceLock::new();
    *STARTED.get_or_init(Instant::now)
}

/// Installs the global subscriber once; later calls are no-ops (tests).
pub fn init_logging(format: &str) {
    started();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: log files and container logs stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
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
    /// CPU time used since the process started, user and system, all cores.
    pub cpu_seconds: f64,
    /// Resident memory in bytes.
    pub resident_bytes: u64,
    /// Host memory in use in bytes.
    pub host_used_bytes: u64,
    /// Host memory in total in bytes.
    pub host_total_bytes: u64,
    /// Open file descriptors (0 where `/proc/self/fd` does not exist).
    pub open_fds: u64,
}

/// Reads the process and host figures. Cumulative CPU time rather than a percentage,
/// so that a reader (`/v1/stats`) cannot disturb what the next scrape reports.
pub fn process_figures() -> ProcessFigures {
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
    let (cpu_ms, resident_bytes) = sys
        .process(pid)
        .map_or((0, 0), |p| (p.accumulated_cpu_time(), p.memory()));
    // Listing the directory opens one descriptor, which the listing shows: not ours.
    let open_fds =
        std::fs::read_dir("/proc/self/fd").map_or(0, |d| (d.count() as u64).saturating_sub(1));
    ProcessFigures {
        cpu_seconds: cpu_ms as f64 / 1000.0,
        resident_bytes,
        host_used_bytes: sys.used_memory(),
        host_total_bytes: sys.total_memory(),
        open_fds,
    }
}

/// Updates the process gauges, CPU counter, uptime and build info before a scrape.
pub fn refresh_process_metrics() {
    // The previous scrape: when, and the CPU seconds counted up to then.
    static LAST: Mutex<Option<(Instant, f64)>> = Mutex::new(None);
    let f = process_figures();
    let m = metrics();
    let now = Instant::now();
    if let Ok(mut last) = LAST.lock() {
        let (since, before) = last.unwrap_or((started(), 0.0));
        let used = (f.cpu_seconds - before).max(0.0);
        let wall = now.duration_since(since).as_secs_f64();
        // Over a too short span (the first scrape of a process that never called
        // `init_logging`) the ratio means nothing: keep the previous figure.
        if wall >= 0.1 {
            m.process_cpu.set(used / wall * 100.0);
        }
        m.process_cpu_seconds.inc_by(used);
        *last = Some((now, before + used));
    }
    m.process_memory.set(f.resident_bytes as i64);
    m.host_memory_used.set(f.host_used_bytes as i64);
    m.host_memory_total.set(f.host_total_bytes as i64);
    m.open_fds.set(f.open_fds as i64);
    m.uptime.set(started().elapsed().as_secs_f64());
    // Set once: the ONNX Runtime version does not change while the process runs.
    static BUILD_INFO: OnceLock<()> = OnceLock::new();
    BUILD_INFO.get_or_init(|| {
        m.build_info
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
