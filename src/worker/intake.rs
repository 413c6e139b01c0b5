//! Admission of one delivered entry: bounded, parsed, checked against its attempts,
//! deadline and model version, decoded and validated against the signature — into a
//! job ready for a batch, or into its terminal answer, or (retryable trouble) into
//! nothing: it stays pending and is tried again later. One bad job fails alone here,
//! before it can share a batch.

use std::sync::Arc;

use super::models::{ModelCache, Version};
use super::outcome::{End, JobInfo, terminal};
use crate::batcher::Batchable;
use crate::config::{BatchConfig, WorkerConfig};
use crate::error::Retry;
use crate::metrics::metrics;
use crate::protocol::job::{JobEntry, Payload, first_id};
use crate::protocol::{DecodeError, Tensor, binary, oip};
use crate::queue::consume::{self, Delivery, Terminal};
use crate::queue::{Conn, Keys};
use crate::registry::RegistryCache;
use crate::runtime::InvalidInput;

/// A job that passed every check and waits for a batch.
pub(super) struct Ready {
    pub(super) info: JobInfo,
    pub(super) version: Version,
    pub(super) inputs: Vec<Tensor>,
    pub(super) rows: usize,
    /// Its length on each padded axis (empty: the model declares no padding).
    pub(super) lengths: Vec<usize>,
    /// Outputs the client asked for (empty: all).
    pub(super) wanted: Vec<String>,
}

impl Batchable for Ready {
    fn rows(&self) -> usize {
        self.rows
    }
    fn batches_with(&self, first: &Self) -> bool {
        self.version.model.version == first.version.model.version
            && match &self.version.model.padding {
                Some(p) => p.stackable(&self.inputs, &first.inputs),
                None => crate::runtime::stackable(&self.inputs, &first.inputs),
            }
    }
    fn lengths(&self) -> &[usize] {
        &self.lengths
    }
}

/// What became of a delivery.
pub(super) enum Checked {
    /// Waits for a batch.
    Ready(Box<Ready>),
    /// Answered without computing (bad entry, bad input, expired, used up its attempts).
    Answered(Terminal),
    /// Retryable trouble (a model file that cannot be loaded yet): left pending.
    Later,
}

/// Admission for one model's pipeline: its versions, and a connection for the rare
/// reads admission needs (last errors, lost entries).
pub(super) struct Intake {
    keys: Arc<Keys>,
    cfg: Arc<WorkerConfig>,
    models: ModelCache,
    writer: Conn,
}

impl Intake {
    pub(super) fn new(
        keys: Arc<Keys>,
        cfg: Arc<WorkerConfig>,
        registry: RegistryCache,
        writer: Conn,
    ) -> Intake {
        let models = ModelCache::new(registry, keys.model(), cfg.batch);
        Intake {
            keys,
            cfg,
            models,
            writer,
        }
    }

    /// Batching of the default version (what the next read should aim for).
    pub(super) fn default_batch(&mut self) -> BatchConfig {
        self.models.default_batch()
    }

    /// Admits one delivery (see the module doc).
    pub(super) async fn check(&mut self, d: Delivery) -> Checked {
        let mut info = JobInfo {
            entry_id: d.entry_id.clone(),
            model: self.keys.model().to_owned(),
            attempts: d.deliveries,
            enqueued_ms: d.enqueued_ms(),
            ..JobInfo::default()
        };
        let Some(fields) = d.fields else {
            return self.lost(info).await;
        };
        let limits = &self.cfg.queue.entry_limits;
        if let Some(why) = limits.check(&fields) {
            // Answered before anything is parsed or copied: an entry with thousands of
            // fields or a huge value once wedged the result script (AUDIT D1).
            info.job_id = first_id(&fields);
            info.has_hash = true;
            tracing::warn!(model = self.keys.model(), entry = %info.entry_id, job = info.job_id.as_deref().unwrap_or_default(), why, "entry over its bounds");
            let end = if info.job_id.is_some() {
                End::Failed("too_large", why)
            } else {
                End::DeadLetter(why, limits.truncated(&fields))
            };
            return Checked::Answered(terminal(&info, end));
        }
        let pairs = fields.iter().map(|(k, v)| (k.as_slice(), v.as_slice()));
        let entry = match JobEntry::from_fields(pairs) {
            Ok(e) => e,
            Err(e) => {
                if let Some(id) = &e.id {
                    tracing::Span::current().record("id", id.as_str());
                }
                info.job_id = e.id.clone();
                info.has_hash = true;
                let why = format!("bad job entry: {}", e.error);
                let end = if e.id.is_some() {
                    End::Failed("invalid", why)
                } else {
                    End::DeadLetter(why, fields)
                };
                return Checked::Answered(terminal(&info, end));
            }
        };
        let span = tracing::Span::current();
        span.record("id", entry.id.as_str());
        if let Some(tp) = &entry.traceparent {
            span.record("traceparent", tp.as_str());
        }
        info.job_id = Some(entry.id.clone());
        // The version stays unset until it resolves: a producer's made-up versions
        // must not become metric labels (AUDIT D7).
        info.has_hash = entry.record || d.deliveries > 1;
        if let Some(end) = self.refuse(&entry, &mut info, d.deliveries, fields).await {
            return Checked::Answered(terminal(&info, end));
        }
        self.admit(entry, info).await
    }

    /// A job that must not be computed: a foreign reply list, used-up attempts, a
    /// passed deadline. Sets the job's reply list otherwise.
    async fn refuse(
        &mut self,
        entry: &JobEntry,
        info: &mut JobInfo,
        deliveries: u32,
        fields: Vec<(Vec<u8>, Vec<u8>)>,
    ) -> Option<End> {
        match entry.reply_to.as_deref() {
            Some(r) if !self.keys.is_reply_key(r) => {
                let msg = format!(
                    "reply_to must start with `{}`; nothing was written to the given key",
                    self.keys.reply_prefix()
                );
                return Some(End::Failed("invalid", msg));
            }
            r => info.reply_to = r.map(str::to_owned),
        }
        if deliveries > self.cfg.queue.max_attempts {
            let last = consume::last_error(&mut self.writer, &self.keys, &entry.id)
                .await
                .ok()
                .flatten();
            let why = format!(
                "gave up after {} deliveries (max attempts {}): {}",
                deliveries - 1,
                self.cfg.queue.max_attempts,
                last.unwrap_or_else(
                    || "the worker handling it stopped or timed out each time".into()
                )
            );
            // The record counts the deliveries that were attempts; this one only gives up.
            info.attempts = deliveries - 1;
            return Some(End::DeadLetter(why, fields));
        }
        if entry.deadline_ms.is_some_and(|dl| dl < crate::now_ms()) {
            return Some(End::Expired(
                "the deadline passed before the job was computed".into(),
            ));
        }
        None
    }

    /// Resolves the version, decodes and validates the inputs.
    async fn admit(&mut self, entry: JobEntry, mut info: JobInfo) -> Checked {
        let version = match self.models.get(entry.version).await {
            Ok(v) => v,
            Err(e) if e.retry == Retry::Terminal => {
                return Checked::Answered(terminal(&info, End::Failed("not_found", e.message)));
            }
            Err(e) => {
                tracing::error!(model = self.keys.model(), job = %entry.id, error = %e.message, "cannot load the model version; the job will be retried");
                let _ =
                    consume::note_retryable(&mut self.writer, &self.keys, &entry.id, &e.message)
                        .await;
                return Checked::Later;
            }
        };
        info.version = Some(version.model.version);
        match inputs(&entry, &version, self.cfg.queue.max_elements) {
            Ok((inputs, rows, lengths, wanted)) => Checked::Ready(Box::new(Ready {
                info,
                version,
                inputs,
                rows,
                lengths,
                wanted,
            })),
            Err((kind, message)) => Checked::Answered(terminal(&info, End::Failed(kind, message))),
        }
    }

    /// A pending entry whose stream entry is gone: answer its job as lost, if the
    /// inflight index still knows which job it was.
    async fn lost(&mut self, mut info: JobInfo) -> Checked {
        info.has_hash = true;
        metrics()
            .jobs_lost
            .with_label_values(&[self.keys.model()])
            .inc();
        tracing::error!(model = self.keys.model(), entry = %info.entry_id, "a pending job's stream entry vanished (trimmed or lost by Redis)");
        // The entry is gone; the inflight index kept its job id and reply list.
        let found = consume::inflight_job(&mut self.writer, &self.keys, &info.entry_id)
            .await
            .ok()
            .flatten();
        if let Some((id, reply)) = found.filter(|(id, _)| crate::protocol::job::valid_id(id)) {
            info.job_id = Some(id);
            info.reply_to = reply.filter(|r| self.keys.is_reply_key(r));
        }
        let msg = "lost: the job's stream entry vanished before it was computed (stream trimmed or Redis lost data)".to_owned();
        Checked::Answered(terminal(&info, End::Failed("lost", msg)))
    }
}

/// A job's validated inputs (signature order), rows, padded lengths and the outputs it
/// asked for; or the error kind and message that fail it.
type Inputs = (Vec<Tensor>, usize, Vec<usize>, Vec<String>);

fn inputs(
    entry: &JobEntry,
    version: &Version,
    max_elements: usize,
) -> Result<Inputs, (&'static str, String)> {
    let sig = &version.model.signature;
    let decoded = match &entry.payload {
        Payload::Json(body) => {
            oip::decode_request(body, sig.single_input()).map(|r| (r.inputs, r.outputs))
        }
        // Capped by the payload's own size (each element takes at least a byte, and the
        // bytes are already in memory); the per-job element cap is then enforced by
        // validation, as for JSON, so both answer `too_large`.
        Payload::Binary(bin) => binary::decode(bin, bin.len()).map(|t| (t, Vec::new())),
    };
    let (inputs, wanted) = decoded.map_err(|DecodeError(m)| ("invalid", m))?;
    if let Some(unknown) = wanted
        .iter()
        .find(|w| !sig.outputs.iter().any(|o| &o.name == *w))
    {
        return Err(("invalid", format!("unknown output `{unknown}` requested")));
    }
    let valid = sig.validate(inputs, max_elements).map_err(|e| match e {
        InvalidInput::Invalid(m) => ("invalid", m),
        InvalidInput::TooLarge(m) => ("too_large", m),
    })?;
    let lengths = match &version.model.padding {
        Some(p) => p.lengths(&valid.tensors).map_err(|m| ("invalid", m))?,
        None => Vec::new(),
    };
    Ok((valid.tensors, valid.rows, lengths, wanted))
}
