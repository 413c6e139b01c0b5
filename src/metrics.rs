//! Every metric inferq exports: names, help texts, labels and buckets live here and
//! nowhere else. Labels are bounded: model, version, status, reason, route template —
//! never a job id.

use std::sync::OnceLock;

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// The `reason` values of `inferq_jobs_rejected_total` (what the front door refuses).
pub const REJECTION_REASONS: [&str; 6] = [
    "invalid",
    "too_large",
    "queue_full",
    "unauthorized",
    "unavailable",
    "timeout",
];

/// The `op` values of `inferq_redis_errors_total`: the pipeline's reads and result
/// writes, and the sampler's ping and depth reads.
pub const REDIS_OPS: [&str; 4] = ["read", "finish", "ping", "depth"];

/// The `model` label of a refusal naming a model the registry does not know. The path
/// is client input: labelling it as sent would let any client grow the label set
/// without bound. A leading `_` is never a valid model name, so this cannot clash.
pub const UNKNOWN_MODEL: &str = "_unknown";

/// Latency buckets from 0.5 ms to 30 s, fine enough for a meaningful p95 of one batch's
/// inference.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15,
    0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0,
];

/// Buckets for what includes time in the queue: a backlog makes waits of minutes, and
/// the alerts look at them (`histogram_quantile` cannot see past the top finite
/// bucket: above it, it answers that bucket's bound).
const QUEUE_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15,
    0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0,
    600.0,
];

/// HTTP durations: long-polls and sync infers last up to `INFERQ_MAX_POLL_WAIT_S` (60 s).
const HTTP_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15,
    0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0,
];

/// Batch size buckets (rows or jobs), up to `INFERQ_MAX_BATCH`'s ceiling of 2048.
const SIZE_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0,
];

/// Input elements per batch: powers of 4 from 1 to about 4 million.
const ELEMENT_BUCKETS: &[f64] = &[
    1.0,
    4.0,
    16.0,
    64.0,
    256.0,
    1024.0,
    4096.0,
    16384.0,
    65536.0,
    262_144.0,
    1_048_576.0,
    4_194_304.0,
];

/// The `kind` values of `inferq_input_elements_total`: what the jobs carried, and what
/// ORT was fed once padded (padding waste = 1 - real / padded).
pub const ELEMENT_KINDS: [&str; 2] = ["real", "padded"];

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
    /// Panics caught in inference (each dead-letters the job that caused it), by model.
    pub inference_panics: IntCounterVec,
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
    /// Input elements per batch as ORT is fed them (padding included).
    pub batch_elements: HistogramVec,
    /// Distinct input shapes per batch (above 1 only for padded models).
    pub batch_shapes: HistogramVec,
    /// Input elements inferred, real and padded, by model.
    pub input_elements: IntCounterVec,
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
    /// Connections closed as soon as accepted, by reason (`per_peer`).
    pub http_connections_refused: IntCounterVec,
    /// Request-body bytes held by requests in flight (against INFERQ_MAX_INFLIGHT_BYTES).
    pub http_body_bytes_in_flight: IntGauge,
    /// 1 when this process' last Redis ping answered, else 0 (sampled with the depth).
    pub redis_up: IntGauge,
    /// Build information (value 1).
    pub build_info: IntGaugeVec,
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
        // The standard process_* figures (CPU seconds, resident memory, open and max
        // file descriptors, start time) under the names dashboards and alerts expect.
        r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .expect("process collector registered once, this is a bug");
        let m = Metrics {
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
            inference_panics: counter(
                &r,
                "inferq_inference_panics_total",
                "Panics caught while running inference; the job at fault is dead-lettered.",
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
            batch_elements: histogram(
                &r,
                "inferq_batch_elements",
                "Input elements per inference batch, padding included.",
                &["model"],
                ELEMENT_BUCKETS,
            ),
            batch_shapes: histogram(
                &r,
                "inferq_batch_shapes",
                "Distinct input shapes per inference batch (jobs padded to one).",
                &["model"],
                SIZE_BUCKETS,
            ),
            input_elements: counter(
                &r,
                "inferq_input_elements_total",
                "Input elements inferred: `real` as the jobs sent them, `padded` as ORT ran them.",
                &["model", "kind"],
            ),
            queue_wait: histogram(
                &r,
                "inferq_queue_wait_seconds",
                "Time from enqueue to the start of the job's batch.",
                &["model"],
                QUEUE_BUCKETS,
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
                QUEUE_BUCKETS,
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
                HTTP_BUCKETS,
            ),
            http_connections_refused: counter(
                &r,
                "inferq_http_connections_refused_total",
                "Connections closed as soon as accepted, by reason (per_peer: over INFERQ_MAX_CONNECTIONS_PER_PEER).",
                &["reason"],
            ),
            http_body_bytes_in_flight: igauge(
                "inferq_http_body_bytes_in_flight",
                "Request-body bytes held by requests in flight at the front door.",
            ),
            redis_up: igauge(
                "inferq_redis_up",
                "1 when this process' last Redis ping (every few seconds) answered, else 0.",
            ),
            build_info: gauge_vec(
                &r,
                "inferq_build_info",
                "Build information; the value is 1.",
                &["version", "onnxruntime"],
            ),
            registry: r,
        };
        for op in REDIS_OPS {
            m.redis_errors.with_label_values(&[op]);
        }
        // Exported at 0 from the start, so rate() has a series before the first refusal.
        m.http_connections_refused.with_label_values(&["per_peer"]);
        m
    }

    /// Creates the series of `model` that only appear on their first event, at zero.
    /// Prometheus' `rate()` and `increase()` miss the first increment of a series that
    /// appears at 1, and a panel or alert on a series that does not exist shows "no
    /// data" rather than 0. Called by the depth sampler for each model it sees;
    /// idempotent.
    pub fn touch_model(&self, model: &str) {
        for c in [
            &self.jobs_submitted,
            &self.jobs_dead_lettered,
            &self.duplicate_deliveries,
            &self.jobs_lost,
            &self.data_loss_events,
            &self.inference_panics,
        ] {
            c.with_label_values(&[model]);
        }
        for reason in REJECTION_REASONS {
            self.jobs_rejected.with_label_values(&[model, reason]);
        }
        for kind in ELEMENT_KINDS {
            self.input_elements.with_label_values(&[model, kind]);
        }
        for h in [
            &self.batch_rows,
            &self.batch_jobs,
            &self.batch_elements,
            &self.batch_shapes,
            &self.queue_wait,
            &self.end_to_end,
        ] {
            h.with_label_values(&[model]);
        }
    }

    /// Drops the sampled gauges of a model that left the registry, so its last
    /// figures do not stay on the dashboard forever.
    pub fn forget_model(&self, model: &str) {
        for g in [&self.queue_depth, &self.consumer_lag, &self.pending] {
            let _ = g.remove_label_values(&[model]);
        }
        let _ = self.oldest_job_age.remove_label_values(&[model]);
    }

    /// The process' resident memory in bytes, as the process collector reads it (0
    /// where it cannot: not Linux).
    pub fn resident_memory_bytes(&self) -> f64 {
        self.registry
            .gather()
            .iter()
            .find(|f| f.name() == "process_resident_memory_bytes")
            .and_then(|f| f.get_metric().first().map(|m| m.get_gauge().get_value()))
            .unwrap_or(0.0)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Names follow the Prometheus conventions promtool lints for (the integration
    /// test runs `promtool check metrics` on a live exposition too).
    #[test]
    fn names_are_prefixed_and_counters_end_in_total() {
        let m = Metrics::new();
        m.touch_model("m");
        m.jobs_finished
            .with_label_values(&["m", "1", "succeeded"])
            .inc();
        let text = m.render();
        for line in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
            let (name, kind) = line.split_once(' ').expect("name and type");
            assert!(
                name.starts_with("inferq_") || name.starts_with("process_"),
                "{name}"
            );
            assert_eq!(kind == "counter", name.ends_with("_total"), "{line}");
        }
        for reason in REJECTION_REASONS {
            let series = format!(r#"inferq_jobs_rejected_total{{model="m",reason="{reason}"}} 0"#);
            assert!(text.contains(&series), "{series} missing:\n{text}");
        }
        assert!(text.contains(r#"inferq_jobs_submitted_total{model="m"} 0"#));
        assert!(text.contains(r#"inferq_end_to_end_seconds_count{model="m"} 0"#));
        // Waits of minutes and batches of 2048 rows land in buckets of their own.
        for bucket in [
            r#"inferq_end_to_end_seconds_bucket{model="m",le="600"} 0"#,
            r#"inferq_queue_wait_seconds_bucket{model="m",le="300"} 0"#,
            r#"inferq_batch_rows_bucket{model="m",le="2048"} 0"#,
        ] {
            assert!(text.contains(bucket), "{bucket} missing");
        }
        for family in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_start_time_seconds",
        ] {
            assert!(
                text.contains(&format!("# TYPE {family} ")),
                "{family} missing"
            );
        }
        assert!(m.resident_memory_bytes() > 0.0);
    }

    #[test]
    fn a_model_that_left_the_registry_loses_its_gauges() {
        let m = Metrics::new();
        m.queue_depth.with_label_values(&["gone"]).set(5);
        m.oldest_job_age.with_label_values(&["gone"]).set(1.5);
        m.forget_model("gone");
        assert!(!m.render().contains(r#"model="gone""#));
    }
}
