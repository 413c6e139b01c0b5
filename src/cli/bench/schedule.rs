//! Open-loop arrival times: constant spacing or a Poisson process, as offsets from
//! the start of a run. Each job's latency is measured from its scheduled time, so a
//! sender that falls behind shows up as latency instead of hiding it.

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How open-loop jobs arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arrivals {
    /// Evenly spaced, `1/rate` apart.
    Constant,
    /// Exponential gaps of mean `1/rate` (independent arrivals, as real clients send).
    Poisson,
}

/// An endless stream of arrival offsets at `rate` jobs per second.
#[derive(Debug)]
pub(super) struct Schedule {
    gap: f64,
    arrivals: Arrivals,
    rng: StdRng,
    next: f64,
}

impl Schedule {
    /// Arrivals at `rate` per second (must be positive); the seed makes a Poisson
    /// schedule reproducible.
    pub(super) fn new(rate: f64, arrivals: Arrivals, seed: u64) -> Schedule {
        assert!(
            rate > 0.0 && rate.is_finite(),
            "rate is checked positive by the caller, this is a bug"
        );
        Schedule {
            gap: 1.0 / rate,
            arrivals,
            rng: StdRng::seed_from_u64(seed),
            next: 0.0,
        }
    }

    /// The offsets inside `horizon`, at most `max` of them.
    #[cfg(test)]
    pub(super) fn bounded(mut self, horizon: Duration, max: usize) -> Vec<Duration> {
        std::iter::from_fn(|| Some(self.next_offset()))
            .take_while(|t| *t < horizon)
            .take(max)
            .collect()
    }

    /// The next arrival's offset from the start.
    pub(super) fn next_offset(&mut self) -> Duration {
        let at = self.next;
        self.next += match self.arrivals {
            Arrivals::Constant => self.gap,
            // Inverse transform: -ln(U) with U in (0, 1].
            Arrivals::Poisson => -(1.0 - self.rng.random::<f64>()).ln() * self.gap,
        };
        Duration::from_secs_f64(at)
    }
}

/// Delivers each arrival's due instant at (about) that instant, from an OS thread that
/// sleeps precisely: tokio's timer ticks in whole milliseconds, which would add up to
/// 1 ms of sender lateness to every open-loop latency. Stops at `until`, or when the
/// receiver is dropped.
pub(super) fn ticker(
    start: Instant,
    mut schedule: Schedule,
    until: Instant,
) -> tokio::sync::mpsc::UnboundedReceiver<Instant> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let spawned = std::thread::Builder::new()
        .name("bench-ticker".into())
        .spawn(move || {
            loop {
                let due = start + schedule.next_offset();
                if due >= until {
                    break;
                }
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                if tx.send(due).is_err() {
                    break;
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the arrival ticker; no job will be sent");
    }
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_arrivals_are_evenly_spaced_and_bounded() {
        let t = Schedule::new(100.0, Arrivals::Constant, 1).bounded(Duration::from_secs(1), 1000);
        assert_eq!(t.len(), 100);
        assert_eq!(t[0], Duration::ZERO);
        for w in t.windows(2) {
            let gap = (w[1] - w[0]).as_secs_f64();
            assert!((gap - 0.01).abs() < 1e-9, "{gap}");
        }
        let capped =
            Schedule::new(100.0, Arrivals::Constant, 1).bounded(Duration::from_secs(10), 7);
        assert_eq!(capped.len(), 7);
    }

    #[test]
    fn poisson_arrivals_have_the_rate_on_average() {
        let t = Schedule::new(1000.0, Arrivals::Poisson, 42)
            .bounded(Duration::from_secs(20), usize::MAX);
        let n = t.len() as f64;
        assert!((n - 20_000.0).abs() < 20_000.0 * 0.03, "{n} arrivals");
        assert!(t.windows(2).all(|w| w[1] >= w[0]));
        assert!(t.iter().all(|x| *x < Duration::from_secs(20)));
        // Exponential gaps: the share above the mean is e^-1.
        let over = t
            .windows(2)
            .filter(|w| (w[1] - w[0]).as_secs_f64() > 0.001)
            .count() as f64;
        assert!((over / n - (-1.0f64).exp()).abs() < 0.02, "{}", over / n);
        let again = Schedule::new(1000.0, Arrivals::Poisson, 42)
            .bounded(Duration::from_secs(20), usize::MAX);
        assert_eq!(t, again);
    }

    #[tokio::test]
    async fn the_ticker_delivers_each_arrival_on_time_and_stops() {
        let start = Instant::now();
        let until = start + Duration::from_millis(200);
        let mut rx = ticker(start, Schedule::new(100.0, Arrivals::Constant, 1), until);
        let mut got = Vec::new();
        while let Some(due) = rx.recv().await {
            got.push((due, Instant::now()));
        }
        assert_eq!(got.len(), 20);
        for (due, at) in got {
            assert!(at >= due, "delivered before it was due");
        }
    }
}
