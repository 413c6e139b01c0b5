//! Completion fan-out: one pattern subscription per process to every model's `done`
//! channel, waking the in-process waiters of the job ids published. 1,000 long-polls
//! cost one Redis connection, not 1,000.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::RedisTarget;
use super::keys::{DONE_PATTERN, model_of_done_channel};

type Waiters = HashMap<(String, String), watch::Sender<bool>>;

/// Registry of waiters keyed by (model, job id); clones share it.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    waiters: Arc<Mutex<Waiters>>,
    /// Bumped on every (re)subscription: a waiter re-checks after a reconnect, since
    /// completions published while disconnected were missed.
    epoch: Arc<watch::Sender<u64>>,
}

/// A registered interest in one job; deregisters on drop.
#[derive(Debug)]
pub struct Waiter {
    key: (String, String),
    rx: watch::Receiver<bool>,
    epoch: watch::Receiver<u64>,
    waiters: Arc<Mutex<Waiters>>,
}

impl Waiter {
    /// Resolves when the job is announced done or the subscription was re-established
    /// (either way: re-read the record).
    pub async fn changed(&mut self) {
        tokio::select! {
            _ = self.rx.changed() => {}
            _ = self.epoch.changed() => {}
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if let Ok(mut w) = self.waiters.lock() {
            // Drop our receiver while holding the lock, so two waiters of one job
            // dropped at once cannot each see the other and both leave the entry.
            self.rx = watch::channel(false).1;
            if w.get(&self.key).is_some_and(|tx| tx.receiver_count() == 0) {
                w.remove(&self.key);
            }
        }
    }
}

/// How often the subscription is asked for a `PING`, and how long it may take.
const HEALTH_EVERY: Duration = Duration::from_secs(5);
const HEALTH_TIMEOUT: Duration = Duration::from_secs(3);

impl Notifier {
    /// Registers interest in a job. Register *before* checking the record, so a
    /// completion between the check and the wait is never missed.
    pub fn register(&self, model: &str, id: &str) -> Waiter {
        let key = (model.to_owned(), id.to_owned());
        let mut w = self
            .waiters
            .lock()
            .expect("notifier lock poisoned, this is a bug");
        let rx = w
            .entry(key.clone())
            .or_insert_with(|| watch::channel(false).0)
            .subscribe();
        Waiter {
            key,
            rx,
            epoch: self.epoch.subscribe(),
            waiters: Arc::clone(&self.waiters),
        }
    }

    /// Number of jobs with waiters (for tests and stats).
    pub fn waiting(&self) -> usize {
        self.waiters.lock().map(|w| w.len()).unwrap_or(0)
    }

    fn announce(&self, model: &str, id: &str) {
        if let Ok(w) = self.waiters.lock()
            && let Some(tx) = w.get(&(model.to_owned(), id.to_owned()))
        {
            let _ = tx.send(true);
        }
    }

    /// Subscribes and dispatches until `stop`; reconnects with capped backoff, also when
    /// the subscription stops answering a periodic `PING`. Every (re)subscription bumps
    /// the epoch, so waiters re-read their records: nothing published while the
    /// subscription was down is missed.
    pub async fn run(self, target: RedisTarget, stop: CancellationToken) {
        let mut backoff = Duration::from_millis(50);
        while !stop.is_cancelled() {
            match target.pubsub().await {
                Ok(mut pubsub) => {
                    if let Err(e) = pubsub.psubscribe(DONE_PATTERN).await {
                        tracing::warn!(error = %e, "cannot subscribe to completions; retrying");
                    } else {
                        backoff = Duration::from_millis(50);
                        self.epoch.send_modify(|e| *e += 1);
                        let (mut sink, mut messages) = pubsub.split();
                        let mut check = tokio::time::interval(HEALTH_EVERY);
                        check.tick().await;
                        loop {
                            tokio::select! {
                                () = stop.cancelled() => return,
                                _ = check.tick() => {
                                    // A subscription sees nothing on a silent (blackholed)
                                    // connection, exactly as when nothing completes: ask.
                                    let pong = tokio::time::timeout(HEALTH_TIMEOUT, sink.ping::<redis::Value>()).await;
                                    if !matches!(pong, Ok(Ok(_))) {
                                        tracing::warn!("completion subscription does not answer PING; reconnecting");
                                        break;
                                    }
                                }
                                m = messages.next() => match m {
                                    Some(msg) => {
                                        let channel = msg.get_channel_name().to_owned();
                                        // One message per batch: its job ids, space separated.
                                        if let (Some(model), Ok(ids)) = (model_of_done_channel(&channel), msg.get_payload::<String>()) {
                                            ids.split(' ').for_each(|id| self.announce(model, id));
                                        }
                                    }
                                    None => break,
                                },
                            }
                        }
                        tracing::warn!("completion subscription lost; reconnecting");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot connect for completions; retrying"),
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}
