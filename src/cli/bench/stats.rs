//! The ledger of a load run: which jobs are out, when each was due, how each ended;
//! and the latency summary computed from it. Pure bookkeeping, no I/O.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

/// The value below which `q` (0..=1) of `sorted` lies: nearest rank, so p100 is the
/// maximum and a single sample is every percentile. `None` for no samples.
pub(super) fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub(super) struct Latency {
    /// Arithmetic mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Slowest job.
    pub max: f64,
}

impl Latency {
    /// Summarises latencies given in milliseconds (sorted here).
    pub(super) fn from_ms(mut samples: Vec<f64>) -> Latency {
        samples.sort_by(f64::total_cmp);
        let p = |q| percentile(&samples, q).unwrap_or(0.0);
        let mean = if samples.is_empty() {
            0.0
        } else {
            samples.iter().sum::<f64>() / samples.len() as f64
        };
        Latency {
            mean,
            p50: p(0.50),
            p90: p(0.90),
            p95: p(0.95),
            p99: p(0.99),
            max: p(1.0),
        }
    }
}

/// A job that was sent and not yet answered.
#[derive(Debug, Clone, Copy)]
struct Out {
    /// When it was due: the scheduled time in open loop (so a stalled sender does not
    /// hide queueing: no coordinated omission), the send time in closed loop.
    due: Instant,
    /// Index of the reference rows it carries (to check its outputs).
    rows_at: usize,
    /// Sent inside the measured window.
    measured: bool,
}

/// How one job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Ending {
    /// Succeeded with the expected outputs.
    Ok,
    /// Anything else, by kind (`failed:invalid`, `wrong_output`, `http_503` …).
    Error(String),
}

#[derive(Debug, Default)]
struct Book {
    out: HashMap<u64, Out>,
    latencies_ms: Vec<f64>,
    errors: BTreeMap<String, u64>,
    sent_measured: u64,
    ok_measured: u64,
    last_measured_done: Option<Instant>,
}

/// Every job of a run, shared by the sender and whoever collects the answers.
#[derive(Debug, Default)]
pub(super) struct Ledger {
    book: Mutex<Book>,
}

/// What a run measured.
#[derive(Debug, Clone, Default)]
pub(super) struct Tally {
    /// Jobs sent inside the measured window.
    pub sent: u64,
    /// Of those, answered with the expected outputs.
    pub ok: u64,
    /// Errors of measured jobs (and duplicates of any job), by kind.
    pub errors: BTreeMap<String, u64>,
    /// Latencies of the measured jobs that succeeded, in ms.
    pub latency: Latency,
    /// From the start of the measured window to its last answer.
    pub elapsed: Duration,
}

impl Ledger {
    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records a job as sent (before it is sent, so a fast answer finds it).
    pub(super) fn sent(&self, seq: u64, due: Instant, rows_at: usize, measured: bool) {
        let mut b = self.book();
        if measured {
            b.sent_measured += 1;
        }
        b.out.insert(
            seq,
            Out {
                due,
                rows_at,
                measured,
            },
        );
    }

    /// The reference rows a job still out carries; `None` for an unknown or answered job.
    pub(super) fn rows_at(&self, seq: u64) -> Option<usize> {
        self.book().out.get(&seq).map(|o| o.rows_at)
    }

    /// Records an answer; false (and a `duplicate` error) when the job was not out.
    pub(super) fn answered(&self, seq: u64, at: Instant, ending: Ending) -> bool {
        let mut b = self.book();
        let Some(job) = b.out.remove(&seq) else {
            *b.errors.entry("duplicate".into()).or_default() += 1;
            return false;
        };
        if job.measured {
            b.last_measured_done = Some(at);
            match ending {
                Ending::Ok => {
                    b.ok_measured += 1;
                    let ms = at.saturating_duration_since(job.due).as_secs_f64() * 1e3;
                    b.latencies_ms.push(ms);
                }
                Ending::Error(kind) => *b.errors.entry(kind).or_default() += 1,
            }
        }
        true
    }

    /// Jobs still out.
    pub(super) fn outstanding(&self) -> usize {
        self.book().out.len()
    }

    /// Closes the run: jobs still out count as `timeout` (measured ones only).
    pub(super) fn finish(&self, measure_from: Instant) -> Tally {
        let mut b = self.book();
        let lost = b.out.values().filter(|o| o.measured).count() as u64;
        if lost > 0 {
            *b.errors.entry("timeout".into()).or_default() += lost;
        }
        b.out.clear();
        Tally {
            sent: b.sent_measured,
            ok: b.ok_measured,
            errors: b.errors.clone(),
            latency: Latency::from_ms(std::mem::take(&mut b.latencies_ms)),
            elapsed: b
                .last_measured_done
                .map(|t| t.saturating_duration_since(measure_from))
                .unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), Some(50.0));
        assert_eq!(percentile(&v, 0.95), Some(95.0));
        assert_eq!(percentile(&v, 0.99), Some(99.0));
        assert_eq!(percentile(&v, 1.0), Some(100.0));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&[7.0], 0.99), Some(7.0));
        assert_eq!(percentile(&[], 0.5), None);
        let l = Latency::from_ms(vec![3.0, 1.0, 2.0, 4.0]);
        assert_eq!((l.p50, l.max, l.mean), (2.0, 4.0, 2.5));
        assert_eq!(Latency::from_ms(Vec::new()), Latency::default());
    }

    #[test]
    fn the_ledger_counts_each_job_once() {
        let ledger = Ledger::default();
        let t0 = Instant::now();
        ledger.sent(1, t0, 0, false);
        ledger.sent(2, t0, 1, true);
        ledger.sent(3, t0, 2, true);
        ledger.sent(4, t0, 3, true);
        assert_eq!(ledger.rows_at(3), Some(2));
        let later = t0 + Duration::from_millis(5);
        assert!(ledger.answered(1, later, Ending::Ok));
        assert!(ledger.answered(2, later, Ending::Ok));
        assert!(!ledger.answered(2, later, Ending::Ok));
        assert!(ledger.answered(3, later, Ending::Error("wrong_output".into())));
        assert_eq!(ledger.outstanding(), 1);
        let tally = ledger.finish(t0);
        assert_eq!((tally.sent, tally.ok), (3, 1));
        assert_eq!(tally.errors["duplicate"], 1);
        assert_eq!(tally.errors["wrong_output"], 1);
        assert_eq!(tally.errors["timeout"], 1);
        assert!((tally.latency.p50 - 5.0).abs() < 1e-9);
        assert_eq!(tally.elapsed, Duration::from_millis(5));
    }
}
