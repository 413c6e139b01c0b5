//! The server's side of a run, read from `/metrics` before and after the measured
//! window: where a job's time went (queue wait vs inference) and how large batches
//! were. Several URLs (one per worker process) are summed.

use std::collections::HashMap;

use serde::Serialize;

use super::http::HttpClient;

/// Counter and histogram sums of one model, summed over every scraped process.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Snapshot {
    values: HashMap<&'static str, f64>,
}

/// The series a run reads (`inferq_…` names from `metrics.rs`).
const SERIES: [&str; 8] = [
    "inferq_queue_wait_seconds_sum",
    "inferq_queue_wait_seconds_count",
    "inferq_inference_seconds_sum",
    "inferq_inference_seconds_count",
    "inferq_rows_inferred_total",
    "inferq_batches_total",
    "inferq_batch_rows_sum",
    "inferq_batch_rows_count",
];

impl Snapshot {
    /// Adds the series of one exposition (Prometheus text format) for `model`.
    pub(super) fn add_text(&mut self, text: &str, model: &str) {
        let label = format!("model=\"{model}\"");
        for line in text.lines() {
            if line.starts_with('#') {
                continue;
            }
            let (head, value) = match line.rsplit_once(' ') {
                Some(x) => x,
                None => continue,
            };
            let (name, labels) = head.split_once('{').unwrap_or((head, ""));
            let Some(&series) = SERIES.iter().find(|s| **s == name) else {
                continue;
            };
            if !labels.split(',').any(|l| l.trim_end_matches('}') == label) {
                continue;
            }
            if let Ok(v) = value.parse::<f64>() {
                *self.values.entry(series).or_default() += v;
            }
        }
    }

    fn get(&self, name: &str) -> f64 {
        self.values.get(name).copied().unwrap_or(0.0)
    }

    /// What happened between `before` and `self`.
    pub(super) fn since(&self, before: &Snapshot) -> ServerSide {
        let d = |n: &str| self.get(n) - before.get(n);
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        let batches = d("inferq_batches_total");
        ServerSide {
            jobs: d("inferq_queue_wait_seconds_count"),
            batches,
            rows: d("inferq_rows_inferred_total"),
            queue_wait_ms: 1e3
                * ratio(
                    d("inferq_queue_wait_seconds_sum"),
                    d("inferq_queue_wait_seconds_count"),
                ),
            inference_ms: 1e3
                * ratio(
                    d("inferq_inference_seconds_sum"),
                    d("inferq_inference_seconds_count"),
                ),
            batch_rows: ratio(d("inferq_rows_inferred_total"), batches),
        }
    }
}

/// Server-side figures of the measured window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub(super) struct ServerSide {
    /// Jobs that started a batch.
    pub jobs: f64,
    /// Batches run.
    pub batches: f64,
    /// Rows inferred.
    pub rows: f64,
    /// Average enqueue-to-batch-start per job, ms.
    pub queue_wait_ms: f64,
    /// Average ONNX Runtime time per batch, ms.
    pub inference_ms: f64,
    /// Average rows per batch.
    pub batch_rows: f64,
}

/// Scrapes every URL and sums `model`'s series.
pub(super) async fn scrape(
    client: &HttpClient,
    urls: &[String],
    model: &str,
) -> anyhow::Result<Snapshot> {
    let mut snap = Snapshot::default();
    for url in urls {
        let (status, body) = client.get(url).await?;
        if status != 200 {
            anyhow::bail!("{url} answered {status}");
        }
        snap.add_text(&String::from_utf8_lossy(&body), model);
    }
    Ok(snap)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP inferq_batches_total Inference batches run.
# TYPE inferq_batches_total counter
inferq_batches_total{model="m",version="1"} 10
inferq_batches_total{model="other",version="1"} 99
inferq_rows_inferred_total{model="m",version="1"} 320
inferq_inference_seconds_sum{model="m",version="1"} 0.05
inferq_inference_seconds_count{model="m",version="1"} 10
inferq_queue_wait_seconds_sum{model="m"} 0.32
inferq_queue_wait_seconds_count{model="m"} 320
inferq_queue_wait_seconds_bucket{model="m",le="0.001"} 3
"#;

    #[test]
    fn differences_give_per_batch_and_per_job_figures() {
        let before = Snapshot::default();
        let mut after = Snapshot::default();
        after.add_text(TEXT, "m");
        after.add_text(TEXT, "m");
        let s = after.since(&before);
        assert_eq!((s.batches, s.rows, s.jobs), (20.0, 640.0, 640.0));
        assert!((s.batch_rows - 32.0).abs() < 1e-9);
        assert!((s.inference_ms - 5.0).abs() < 1e-9);
        assert!((s.queue_wait_ms - 1.0).abs() < 1e-9);
        assert_eq!(after.since(&after), ServerSide::default());
    }
}
