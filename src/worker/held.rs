//! The entries a pipeline holds (waiting, in flight, or being written) and the task
//! that keeps them fresh, so no janitor, the pipeline's own included, reclaims them.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::WorkerConfig;
use crate::queue::{Conn, Keys, janitor};

/// Refreshes the idle time of every held entry each third of `claim_after`, on its
/// own timer: a batch may keep the pipeline waiting for an inference thread far longer.
/// After `stop` it goes on while anything is held (the drain finishes those jobs here;
/// the drain deadline bounds it); `release` ends it at once.
pub(super) async fn keep_held(
    held: Held,
    mut writer: Conn,
    keys: Arc<Keys>,
    cfg: Arc<WorkerConfig>,
    stop: CancellationToken,
    release: CancellationToken,
) {
    let every = (cfg.queue.claim_after / 3).max(Duration::from_millis(20));
    // Once stopping, look more often whether everything held is done, so the drain
    // ends as soon as the last result is written rather than a refresh period later.
    let draining = every.min(Duration::from_millis(50));
    loop {
        let wait = if stop.is_cancelled() { draining } else { every };
        tokio::select! {
            () = release.cancelled() => return,
            () = stop.cancelled(), if !stop.is_cancelled() => {}
            () = tokio::time::sleep(wait) => {}
        }
        let ids = held.snapshot();
        if ids.is_empty() && stop.is_cancelled() {
            return;
        }
        if let Err(e) = janitor::touch(&mut writer, &keys, &cfg.consumer, &ids).await {
            tracing::warn!(model = keys.model(), error = %e, "cannot refresh held jobs");
        }
    }
}

/// The set of entry ids a pipeline holds, shared with its result-writing tasks.
#[derive(Debug, Clone, Default)]
pub(super) struct Held(Arc<std::sync::Mutex<std::collections::HashSet<String>>>);

impl Held {
    pub(super) fn insert(&self, id: &str) {
        if let Ok(mut h) = self.0.lock() {
            h.insert(id.to_owned());
        }
    }

    pub(super) fn remove(&self, id: &str) {
        if let Ok(mut h) = self.0.lock() {
            h.remove(id);
        }
    }

    pub(super) fn contains(&self, id: &str) -> bool {
        self.0.lock().is_ok_and(|h| h.contains(id))
    }

    pub(super) fn snapshot(&self) -> Vec<String> {
        self.0
            .lock()
            .map(|h| h.iter().cloned().collect())
            .unwrap_or_default()
    }
}
