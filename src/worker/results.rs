//! Terminal results on their way to Redis: written per batch, retried while Redis may
//! still take them, and never retried for ever (an incurable error ends each job on
//! its own), then counted once per job.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::held::Held;
use super::intake::Ready;
use super::outcome::{self, End, terminal};
use crate::config::WorkerConfig;
use crate::error::Retry;
use crate::metrics::metrics;
use crate::protocol::Tensor;
use crate::queue::consume::{self, Terminal};
use crate::queue::{Conn, Keys, QueueError, dlq};
use crate::runtime::{RuntimeError, session::JobOutputs};
use crate::shutdown::Backoff;

/// Each job's terminal answer from its batch's outputs (`marked`: the batch was marked
/// running, so record hashes exist). Jobs whose inference could not run (model load
/// trouble, shutdown) get no answer: they stay pending for another try.
pub(super) async fn answer(
    batch: Vec<Ready>,
    outputs: Result<Vec<JobOutputs>, RuntimeError>,
    marked: bool,
    writer: &mut Conn,
    keys: &Keys,
    held: &Held,
) -> Vec<Terminal> {
    let per_job: Vec<JobOutputs> = match outputs {
        Ok(list) => list,
        Err(e) => batch.iter().map(|_| Err(e.clone())).collect(),
    };
    let mut results = Vec::with_capacity(batch.len());
    for (mut job, out) in batch.into_iter().zip(per_job) {
        job.info.has_hash |= marked;
        let end = match out {
            Ok(tensors) => End::Succeeded(select(tensors, &job.wanted)),
            Err(e @ RuntimeError::Run { .. }) => End::Failed("inference", e.to_string()),
            Err(e @ RuntimeError::Panicked { .. }) => panicked(&job, &e, writer, keys).await,
            Err(e) => {
                if let Some(id) = &job.info.job_id {
                    let _ = consume::note_retryable(writer, keys, id, &e.to_string()).await;
                }
                held.remove(&job.info.entry_id);
                continue;
            }
        };
        results.push(terminal(&job.info, end));
    }
    results
}

/// A job whose data made inference panic: dead-lettered with its original entry (read
/// back, only on this path), never retried, since the same input would panic again.
async fn panicked(job: &Ready, e: &RuntimeError, writer: &mut Conn, keys: &Keys) -> End {
    metrics()
        .inference_panics
        .with_label_values(&[keys.model()])
        .inc();
    let id = job.info.job_id.as_deref().unwrap_or_default();
    tracing::error!(model = keys.model(), job = id, error = %e, "inference panicked on this job; dead-lettering it");
    let why = format!("{e} (dead-lettered: the same input would panic again)");
    match consume::entry(writer, keys, &job.info.entry_id).await {
        Ok(Some(fields)) => End::DeadLetter(why, fields),
        _ => End::Failed("inference", why),
    }
}

/// Keeps only the outputs the client asked for (all when none named).
fn select(outputs: Vec<Tensor>, wanted: &[String]) -> Vec<Tensor> {
    if wanted.is_empty() {
        return outputs;
    }
    outputs
        .into_iter()
        .filter(|t| wanted.contains(&t.name))
        .collect()
}

/// Writes terminal results until Redis takes them (the batch in hand is never
/// dropped); counts each job once, and duplicate deliveries separately.
pub(super) async fn write_results(
    mut writer: Conn,
    keys: Arc<Keys>,
    cfg: Arc<WorkerConfig>,
    terminals: Vec<Terminal>,
    held: Held,
) {
    let written = match finish_retrying(&mut writer, &keys, &cfg, &terminals).await {
        Ok(flags) => flags,
        // A write that cannot succeed (a script error, a Lua limit, a producer's key
        // of the wrong type) is never retried for ever: each job alone, then what
        // can still be written (see `finish_alone`).
        Err(e) => {
            tracing::error!(model = keys.model(), jobs = terminals.len(), error = %e, "results cannot be written as a batch; writing each job alone");
            let mut flags = Vec::with_capacity(terminals.len());
            for t in &terminals {
                flags.push(finish_alone(&mut writer, &keys, &cfg, t).await);
            }
            flags
        }
    };
    for t in &terminals {
        held.remove(&t.entry_id);
    }
    let already: Vec<(&str, bool)> = terminals
        .iter()
        .zip(&written)
        .filter(|(_, first)| !**first)
        .filter_map(|(t, _)| Some((t.job_id.as_deref()?, t.has_hash)))
        .collect();
    if let Err(e) =
        consume::settle_expiry(&mut writer, &keys, cfg.queue.result_ttl_s, &already).await
    {
        // The records then keep their own (at most cancel's hold) TTL.
        tracing::warn!(model = keys.model(), error = %e, "cannot shorten the TTL of records already terminal");
    }
    let m = metrics();
    let now = crate::now_ms();
    let end_to_end = m.end_to_end.with_label_values(&[keys.model()]);
    let mut duplicates = 0;
    for (t, first) in terminals.iter().zip(written) {
        let id = t.job_id.as_deref().unwrap_or_default();
        if !first {
            duplicates += 1;
            tracing::debug!(
                model = keys.model(),
                id,
                "job already terminal (cancelled or a second delivery); acknowledged only"
            );
            continue;
        }
        let status = t.status.as_str();
        tracing::debug!(model = keys.model(), id, status, "job finished");
        let version = t.version.map(|v| v.to_string()).unwrap_or_default();
        m.jobs_finished
            .with_label_values(&[keys.model(), &version, status])
            .inc();
        // Counted here, once the write is known to be the first: a dead letter of a
        // job already terminal is no dead letter.
        if !t.dead_letter.is_empty() {
            m.jobs_dead_lettered
                .with_label_values(&[keys.model()])
                .inc();
        }
        let enqueued = t
            .entry_id
            .split('-')
            .next()
            .and_then(|ms| ms.parse::<u64>().ok())
            .unwrap_or(now);
        end_to_end.observe(now.saturating_sub(enqueued) as f64 / 1000.0);
    }
    if duplicates > 0 {
        m.duplicate_deliveries
            .with_label_values(&[keys.model()])
            .inc_by(duplicates);
    }
}

/// [`consume::finish`], retried with backoff while the error is retryable (Redis
/// unreachable, out of memory, failing over): the batch in hand is never dropped.
/// Returns the first error that no retry can cure.
async fn finish_retrying(
    writer: &mut Conn,
    keys: &Keys,
    cfg: &WorkerConfig,
    terminals: &[Terminal],
) -> Result<Vec<bool>, QueueError> {
    let mut backoff = Backoff::new(Duration::from_secs(2));
    let never = CancellationToken::new();
    loop {
        let min_id = dlq::retention_min_id(cfg.queue.dlq_retention_s);
        match consume::finish(writer, keys, cfg.queue.result_ttl_s, &min_id, terminals).await {
            Ok(flags) => return Ok(flags),
            Err(e) => {
                metrics().redis_errors.with_label_values(&["finish"]).inc();
                if e.retry() == Retry::Terminal {
                    return Err(e);
                }
                tracing::warn!(model = keys.model(), jobs = terminals.len(), error = %e, "cannot write results yet; retrying");
                backoff.wait(&never).await;
            }
        }
    }
}

/// One job whose batch write failed for good: its own write; failing that, a plain
/// `failed` record naming the error, with no reply push and no dead letter (what a
/// producer's key of the wrong type or an oversized dead letter breaks); failing that,
/// only the acknowledgement, so the entry never pins the stream. Whether it turned
/// the job terminal.
async fn finish_alone(writer: &mut Conn, keys: &Keys, cfg: &WorkerConfig, t: &Terminal) -> bool {
    let e = match finish_retrying(writer, keys, cfg, std::slice::from_ref(t)).await {
        Ok(flags) => return flags.first().copied().unwrap_or(false),
        Err(e) => e,
    };
    let id = t.job_id.as_deref().unwrap_or_default();
    tracing::error!(model = keys.model(), job = id, error = %e, "the job's result cannot be written; writing a failure without its reply list or dead letter");
    let plain = Terminal {
        record: outcome::unwritable(t, &e.to_string()),
        status: crate::protocol::job::Status::Failed,
        reply_to: None,
        dead_letter: Vec::new(),
        ..t.clone()
    };
    if let Ok(flags) = finish_retrying(writer, keys, cfg, std::slice::from_ref(&plain)).await {
        return flags.first().copied().unwrap_or(false);
    }
    let mut backoff = Backoff::new(Duration::from_secs(2));
    while let Err(e) = consume::acknowledge(writer, keys, &t.entry_id).await {
        tracing::error!(model = keys.model(), job = id, entry = %t.entry_id, error = %e, "cannot even acknowledge the entry");
        if e.retry() == Retry::Terminal || !backoff.wait(&CancellationToken::new()).await {
            break;
        }
    }
    false
}
