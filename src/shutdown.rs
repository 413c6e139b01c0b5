//! Shutdown: SIGTERM or SIGINT cancels one token that every task watches; tasks then
//! finish in-flight work under a drain deadline.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Cancels `token` on the first SIGTERM or SIGINT.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: draining"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: draining"),
            () = token.cancelled() => return,
        }
        token.cancel();
    });
}

/// Waits for `tracker`'s tasks (closing it first) at most `deadline`; true when all
/// finished in time.
pub async fn drain(tracker: &TaskTracker, deadline: Duration) -> bool {
    tracker.close();
    tokio::time::timeout(deadline, tracker.wait()).await.is_ok()
}

/// Capped exponential backoff with jitter, for reconnect loops.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// Starts at 50 ms, doubles up to `max`.
    pub fn new(max: Duration) -> Backoff {
        Backoff {
            next: Duration::from_millis(50),
            max,
        }
    }

    /// Sleeps the next delay (with ±25% jitter) unless `stop` fires first; false when stopped.
    pub async fn wait(&mut self, stop: &CancellationToken) -> bool {
        let jitter = rand::random::<f64>().mul_add(0.5, 0.75);
        let delay = self.next.mul_f64(jitter);
        self.next = (self.next * 2).min(self.max);
        tokio::select! {
            () = stop.cancelled() => false,
            () = tokio::time::sleep(delay) => true,
        }
    }

    /// Back to the shortest delay after a success.
    pub fn reset(&mut self) {
        self.next = Duration::from_millis(50);
    }
}
