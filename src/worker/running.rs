//! The `running` mark of a batch. It is written only if the batch is still going after
//! [`RUNNING_MARK_AFTER`]: a state that would last a millisecond is never seen by
//! anyone, and skipping it halves the Redis work per job. The mark is conditional
//! (`running.lua`), so it never overwrites a result that won the race; whether it was
//! sent is settled once, so the results know to expire the record hash it created.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use tokio::sync::oneshot;

use super::intake::Ready;
use crate::queue::consume::{self, Started};
use crate::queue::{Conn, Keys};

/// A batch still running after this long gets its jobs marked `running`.
const RUNNING_MARK_AFTER: Duration = Duration::from_millis(20);

/// Mark states: not decided yet, sent, or skipped (the results came first).
const PENDING: u8 = 0;
const SENT: u8 = 1;
const SKIPPED: u8 = 2;

/// The pending mark of one batch.
#[derive(Debug)]
pub(super) struct Mark {
    state: Arc<AtomicU8>,
    done: oneshot::Sender<()>,
}

impl Mark {
    /// Starts the timer that marks `batch` running unless its results come first.
    pub(super) fn start(
        mut writer: Conn,
        keys: Arc<Keys>,
        started_ms: u64,
        version: u64,
        batch: &[Ready],
    ) -> Mark {
        let running: Vec<(String, u32, Option<String>)> = batch
            .iter()
            .map(|j| {
                let id = j.info.job_id.clone().unwrap_or_default();
                (id, j.info.attempts, j.info.reply_to.clone())
            })
            .collect();
        let state = Arc::new(AtomicU8::new(PENDING));
        let (done, mut done_rx) = oneshot::channel::<()>();
        let marking = Arc::clone(&state);
        tokio::spawn(async move {
            tokio::select! {
                _ = &mut done_rx => return,
                () = tokio::time::sleep(RUNNING_MARK_AFTER) => {}
            }
            if settle(&marking, SENT) != SENT {
                return;
            }
            let started: Vec<Started<'_>> = running
                .iter()
                .map(|(j, a, r)| Started {
                    job_id: j,
                    version,
                    attempts: *a,
                    reply_to: r.as_deref(),
                })
                .collect();
            if let Err(e) = consume::mark_running(&mut writer, &keys, started_ms, &started).await {
                tracing::debug!(error = %e, "running mark not written");
            }
        });
        Mark { state, done }
    }

    /// Called when the results are in: true when the mark was (or is being) sent, so
    /// the jobs' record hashes exist and must get the result TTL.
    pub(super) fn results_in(&self) -> bool {
        settle(&self.state, SKIPPED) == SENT
    }

    /// The results are written: the timer may stop.
    pub(super) fn finish(self) {
        let _ = self.done.send(());
    }
}

/// Moves a pending mark to `to` and returns the state it ends in: whoever settles
/// first decides, once.
fn settle(mark: &AtomicU8, to: u8) -> u8 {
    match mark.compare_exchange(PENDING, to, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => to,
        Err(now) => now,
    }
}
