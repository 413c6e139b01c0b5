//! What every load run shares: the pace (closed or open loop), the clock that decides
//! which jobs are sent and which are measured, and the wait for the last answers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::schedule::Arrivals;
use super::stats::Ledger;

/// How jobs are sent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Pace {
    /// A new job as soon as one of `concurrency` outstanding jobs is answered.
    Closed {
        /// Jobs out at once.
        concurrency: usize,
    },
    /// Jobs at scheduled times, whatever the answers do.
    Open {
        /// Jobs per second.
        rate: f64,
        /// Spacing of the arrivals.
        arrivals: Arrivals,
    },
}

/// One run's bounds.
#[derive(Debug, Clone, Copy)]
pub(super) struct Plan {
    /// Closed or open loop.
    pub pace: Pace,
    /// Sent but not measured, first.
    pub warmup: Duration,
    /// The measured window.
    pub duration: Duration,
    /// At most this many measured jobs (the window ends early when they are sent).
    pub max_jobs: Option<u64>,
    /// How long to wait for the last answers once sending stopped.
    pub drain_timeout: Duration,
}

/// Decides, for each job about to be sent, whether it is sent and whether it counts.
#[derive(Debug)]
pub(super) struct Clock {
    /// When the run started.
    pub start: Instant,
    /// Jobs due from here on are measured.
    pub measure_from: Instant,
    send_until: Instant,
    max_jobs: Option<u64>,
    measured: AtomicU64,
    seq: AtomicU64,
}

impl Clock {
    /// A clock starting now.
    pub(super) fn new(plan: &Plan) -> Clock {
        let start = Instant::now();
        let measure_from = start + plan.warmup;
        Clock {
            start,
            measure_from,
            send_until: measure_from + plan.duration,
            max_jobs: plan.max_jobs,
            measured: AtomicU64::new(0),
            seq: AtomicU64::new(0),
        }
    }

    /// A job due at `due`: `None` when the run sends no more, else its sequence
    /// number and whether it is measured.
    pub(super) fn admit(&self, due: Instant) -> Option<(u64, bool)> {
        if due >= self.send_until {
            return None;
        }
        let measured = due >= self.measure_from;
        if measured {
            let n = self.measured.fetch_add(1, Ordering::Relaxed);
            if self.max_jobs.is_some_and(|max| n >= max) {
                self.measured.fetch_sub(1, Ordering::Relaxed);
                return None;
            }
        }
        Some((self.seq.fetch_add(1, Ordering::Relaxed), measured))
    }

    /// When sending stops at the latest.
    pub(super) fn send_until(&self) -> Instant {
        self.send_until
    }
}

/// Waits until every job is answered or `timeout` passes.
pub(super) async fn wait_answers(ledger: &Ledger, timeout: Duration) {
    let until = Instant::now() + timeout;
    while ledger.outstanding() > 0 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_bounds_jobs_in_count_and_time() {
        let plan = Plan {
            pace: Pace::Closed { concurrency: 1 },
            warmup: Duration::from_secs(1),
            duration: Duration::from_secs(2),
            max_jobs: Some(2),
            drain_timeout: Duration::from_secs(1),
        };
        let c = Clock::new(&plan);
        assert_eq!(c.admit(c.start), Some((0, false)));
        let inside = c.start + Duration::from_millis(1500);
        assert_eq!(c.admit(inside), Some((1, true)));
        assert_eq!(c.admit(inside), Some((2, true)));
        assert_eq!(c.admit(inside), None, "max_jobs reached");
        assert_eq!(c.admit(c.start), Some((3, false)), "warm-up is not counted");
        assert_eq!(
            c.admit(c.start + Duration::from_secs(3)),
            None,
            "past the window"
        );
    }
}
