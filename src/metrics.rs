//! Every metric inferq exports: names, help texts, labels and buckets live here and
//! nowhere else. Labels are bounded: model, version, status, reason, route template —
//! never a job id.

use std::sync::OnceLock;

use prometheus::{
    Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

/// Latency buckets from 0.5 ms to 30 s, fine enough for a meaningful p95.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15,
    0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0,
];

/// Batch size buckets (rows or jobs).
const SIZE_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// All of inferq's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Jobs accepted at the door, by model.
    pub jobs_submitted: IntCounterVec,
    /// Jobs that turned terminal, by model, version and status (each job once).
    pub jobs_finished: IntCounterVec,
    /// Jobs dead-lettered (also counted as failed), by model.
    pub jobs_dead_lettered: IntCounterVec,
    /// Requests refused at the door, by model and reason.
    pub jobs_rejected: IntCounterVec,
    /// Deliveries of a job that was already terminal (first writer won), by model.
    pub duplicate_deliveries: IntCounterVec,
    /// Pending entries that vanished from the stream, by model.
    pub jobs_lost: IntCounterVec,
    /// A stream or group found missing (Redis lost data), by model.
    pub data_loss_events: IntCounterVec,
    /// Redis errors by operation.
    pub redis_errors: IntCounterVec,
    /// Stream entries per model (waiting + pending + not yet trimmed).
    pub queue_depth: IntGaugeVec,
    /// Entries not yet delivered to the group.
    pub consumer_lag: IntGaugeVec,
    /// Delivered, unacknowledged entries.
    pub pending: IntGaugeVec,
    /// Age of the oldest waiting job.
    pub oldest_job_age: GaugeVec,
    /// Rows per batch.
    pub batch_rows: HistogramVec,
    /// Jobs per batch.
    pub batch_jobs: HistogramVec,
    /// Enqueue to batch start.
    pub queue_wait: HistogramVec,
    /// Inference time per batch.
    pub inference_time: HistogramVec,
    /// Enqueue to result written.
    pub end_to_end: HistogramVec,
    /// Rows inferred, by model and version.
    pub rows_inferred: IntCounterVec,
    /// Batches run, by model and version.
    pub batches: IntCounterVec,
    /// HTTP requests by route template and status.
    pub http_duration: HistogramVec,
    /// Process CPU use in percent of one core.
    pub process_cpu: Gauge,
    /// Process resident memory.
    pub process_memory: IntGauge,
    /// Host memory in use.
    pub host_memory_used: IntGauge,
    /// Open file descriptors of the process.
    pub open_fds: IntGauge,
    /// Build information (value 1).
    pub build_info: IntGaugeVec,
    /// Seconds since the process started.
    pub uptime: Gauge,
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric, this is a bug");
    r.register(Box::new(c.clone()))
        .expect("metric registered once, this is a bug");
    c
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric, this is a bug");
    r.register(Box::new(g.clone()))
        .expect("metric registered once, this is a bug");
    g
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .expect("valid metric, this is a bug");
    r.register(Box::new(h.clone()))
        .expect("metric registered once, this is a bug");
    h
}

impl Metrics {
    fn new() -> Metrics {
        let r = Registry::new();
        let fgauge = |name: &str, help: &str| {
            let g = Gauge::new(name, help).expect("valid metric, this is a bug");
            r.register(Box::new(g.clone()))
                .expect("metric registered once, this is a bug");
            g
        };
        let igauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric, this is a bug");
            r.register(Box::new(g.clone()))
                .expect("metric registered once, this is a bug");
            g
        };
        let oldest = GaugeVec::new(
            Opts::new(
                "inferq_oldest_job_age_seconds",
                "Age of the oldest job not yet delivered to a worker.",
            ),
            &["model"],
        )
        .expect("valid metric, this is a bug");
        r.register(Box::new(oldest.clone()))
            .expect("metric registered once, this is a bug");
        Metrics {
            jobs_submitted: counter(
                &r,
                "inferq_jobs_submitted_total",
                "Jobs accepted at the front door.",
                &["model"],
            ),
            jobs_finished: counter(
                &r,
                "inferq_jobs_finished_total",
                "Jobs that turned terminal, by status (each job counted once).",
                &["model", "version", "status"],
            ),
            jobs_dead_lettered: counter(
                &r,
                "inferq_jobs_dead_lettered_total",
                "Jobs moved to the dead-letter stream (also counted as failed).",
                &["model"],
            ),
            jobs_rejected: counter(
                &r,
                "inferq_jobs_rejected_total",
                "Requests refused at the front door, by reason.",
                &["model", "reason"],
            ),
            duplicate_deliveries: counter(
                &r,
                "inferq_duplicate_deliveries_total",
                "Deliveries of jobs that were already terminal (only acknowledged).",
                &["model"],
            ),
            jobs_lost: counter(
                &r,
                "inferq_jobs_lost_total",
                "Pending jobs whose stream entry vanished (trimmed or lost by Redis).",
                &["model"],
            ),
            data_loss_events: counter(
                &r,
                "inferq_data_loss_events_total",
                "Times a model's stream or consumer group was found missing and recreated.",
                &["model"],
            ),
            redis_errors: counter(
                &r,
                "inferq_redis_errors_total",
                "Redis commands that failed, by operation.",
                &["op"],
            ),
            queue_depth: gauge_vec(
                &r,
                "inferq_queue_depth",
                "Entries in the model's jobs stream.",
                &["model"],
            ),
            consumer_lag: gauge_vec(
                &r,
                "inferq_consumer_lag",
                "Entries not yet delivered to the consumer group.",
                &["model"],
            ),
            pending: gauge_vec(
                &r,
                "inferq_pending_jobs",
                "Entries delivered to a worker and not yet acknowledged.",
                &["model"],
            ),
            oldest_job_age: oldest,
            batch_rows: histogram(
                &r,
                "inferq_batch_rows",
                "Rows per inference batch.",
                &["model"],
                SIZE_BUCKETS,
            ),
            batch_jobs: histogram(
                &r,
                "inferq_batch_jobs",
                "Jobs per inference batch.",
                &["model"],
                SIZE_BUCKETS,
            ),
            queue_wait: histogram(
                &r,
                "inferq_queue_wait_seconds",
                "Time from enqueue to the start of the job's batch.",
                &["model"],
                LATENCY_BUCKETS,
            ),
            inference_time: histogram(
                &r,
                "inferq_inference_seconds",
                "ONNX Runtime time per batch.",
                &["model", "version"],
                LATENCY_BUCKETS,
            ),
            end_to_end: histogram(
                &r,
                "inferq_end_to_end_seconds",
                "Time from enqueue to the result being written.",
                &["model"],
                LATENCY_BUCKETS,
            ),
            rows_inferred: counter(
                &r,
                "inferq_rows_inferred_total",
                "Rows run through ONNX Runtime.",
                &["model", "version"],
            ),
            batches: counter(
                &r,
                "inferq_batches_total",
                "Inference batches run.",
                &["model", "version"],
            ),
            http_duration: histogram(
                &r,
                "inferq_http_request_duration_seconds",
                "HTTP request duration by route template and status.",
                &["route", "status"],
                LATENCY_BUCKETS,
            ),
            process_cpu: fgauge(
                "inferq_process_cpu_percent",
                "CPU used by this process, percent of one core.",
            ),
            process_memory: igauge(
                "inferq_process_resident_memory_bytes",
                "Resident memory of this process.",
            ),
            host_memory_used: igauge(
                "inferq_host_memory_used_bytes",
                "Memory in use on the host.",
            ),
            open_fds: igauge(
                "inferq_process_open_fds",
                "Open file descriptors of this process.",
            ),
            build_info: gauge_vec(
                &r,
                "inferq_build_info",
                "Build information; the value is 1.",
                &["version", "onnxruntime"],
            ),
            uptime: fgauge(
                "inferq_uptime_seconds",
                "Seconds since this process started.",
            ),
            registry: r,
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail, this is a bug");
        String::from_utf8(out).expect("exposition is UTF-8, this is a bug")
    }
}

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// Sum of a counter family, optionally only the series with `label` = value
/// (for `/v1/stats`, which must agree with `/metrics`).
pub fn sum(counter: &IntCounterVec, label: Option<(&str, &str)>) -> u64 {
    use prometheus::core::Collector;
    counter
        .collect()
        .iter()
        .flat_map(|family| family.get_metric())
        .filter(|m| {
            label.is_none_or(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == k && l.value() == v)
            })
        })
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}
