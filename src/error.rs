//! What every stage needs to know about a failure: may it be retried?
//!
//! A retryable failure (Redis unreachable, a model file being replaced) leaves the
//! job pending so another delivery tries again; a terminal one (bad input, an ORT
//! error that bisection pinned on one job) fails the job at once.

/// Whether a failure is worth another delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Try again on a later delivery, up to `max_attempts`.
    Retryable,
    /// Fail the job now; another try would fail the same way.
    Terminal,
}

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
