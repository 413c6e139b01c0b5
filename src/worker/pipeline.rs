//! One model's pipeline: read (own pending first, then new), check each job, batch,
//! hand the batch to an inference thread, and write results — while the next batch
//! is being collected.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::models::{ModelCache, Version};
use super::outcome::{self, End, JobInfo, terminal};
use crate::batcher::{Batchable, Limits, take_batch, waiting_rows};
use crate::config::{BatchConfig, WorkerConfig};
use crate::error::Retry;
use crate::metrics::metrics;
use crate::protocol::job::{JobEntry, Payload};
use crate::protocol::{DecodeError, Tensor, binary, oip};
use crate::queue::consume::{self, Delivery, Started, Terminal};
use crate::queue::reader::StreamReader;
use crate::queue::{Conn, Keys, QueueError, dlq, janitor};
use crate::registry::RegistryCache;
use crate::runtime::{InferPool, InvalidInput, RuntimeError};
use crate::shutdown::Backoff;

/// How long a read blocks when nothing is waiting (then the loop checks for shutdown
/// and housekeeping).
const BLOCK_MS: u64 = 1000;

/// How often a batch waiting out `max_wait` looks for more jobs.
const MAX_WAIT_POLL: Duration = Duration::from_millis(2);

/// A batch still running after this long gets its jobs marked `running`.
const RUNNING_MARK_AFTER: Duration = Duration::from_millis(20);

/// Response timeout of a reader connection: a blocking read plus a margin, so a
/// silent (blackholed) connection is detected and replaced.
pub(crate) fn read_timeout_ms() -> u64 {
    BLOCK_MS + 3000
}

/// A pipeline's own Redis connections for reading: blocking reads hold them.
pub(crate) struct Reader {
    /// Group set-up, own pending entries, the inflight index; new entries too when
    /// `fast` is `None`.
    pub(crate) conn: Conn,
    /// The hot read's own socket (`None`: a cluster or TLS target).
    pub(crate) fast: Option<StreamReader>,
}

/// A job that passed every check and waits for a batch.
struct Ready {
    info: JobInfo,
    version: Version,
    inputs: Vec<Tensor>,
    rows: usize,
    /// Its length on each padded axis (empty: the model declares no padding).
    lengths: Vec<usize>,
    wanted: Vec<String>,
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

/// The batcher's bounds for a model's batching settings.
fn limits(batch: &BatchConfig) -> Limits {
    Limits {
        max_elements: batch.max_elements,
        ..Limits::rows(batch.max_batch)
    }
}

/// Everything one model's pipeline owns.
pub(crate) struct Pipeline {
    keys: Arc<Keys>,
    cfg: Arc<WorkerConfig>,
    reader: Reader,
    writer: Conn,
    pool: InferPool,
    models: ModelCache,
    waiting: VecDeque<Ready>,
    tracker: TaskTracker,
    stop: CancellationToken,
    /// Ends the refresh of held jobs: with `stop`, or when the model can no longer be
    /// served here (its jobs must then go to other workers).
    release: CancellationToken,
    /// False once every inference thread ended: nothing more is read.
    serving: bool,
    claim_cursor: String,
    /// Entry ids this pipeline holds (waiting, in flight, or being written): their
    /// idle time is refreshed so no janitor, ours included, reclaims them.
    held: Held,
    /// Average rows per job lately: a read asks for about `need / rows_per_job`
    /// entries, so multi-row jobs do not pile up far beyond `max_batch` rows.
    rows_per_job: f64,
    last_janitor: Instant,
    last_trim: Instant,
    last_stale_check: Instant,
}

impl Pipeline {
    pub(crate) fn new(
        model: &str,
        cfg: Arc<WorkerConfig>,
        registry: RegistryCache,
        reader: Reader,
        writer: Conn,
        tracker: TaskTracker,
        stop: CancellationToken,
    ) -> Pipeline {
        let long_ago = Instant::now()
            .checked_sub(Duration::from_secs(3600))
            .unwrap_or_else(Instant::now);
        Pipeline {
            keys: Arc::new(Keys::new(model)),
            pool: InferPool::spawn(model, cfg.infer_threads, cfg.intra_threads),
            models: ModelCache::new(registry, model, cfg.batch),
            cfg,
            reader,
            writer,
            waiting: VecDeque::new(),
            tracker,
            release: stop.child_token(),
            stop,
            serving: true,
            claim_cursor: "0-0".into(),
            held: Held::default(),
            rows_per_job: 1.0,
            last_janitor: long_ago,
            last_trim: long_ago,
            last_stale_check: Instant::now(),
        }
    }

    /// Runs until shutdown: own pending entries first, then new ones. Errors are
    /// logged and retried with backoff; this never returns early.
    pub(crate) async fn run(mut self) {
        let mut backoff = Backoff::new(Duration::from_secs(2));
        while let Err(e) = consume::ensure_group(&mut self.reader.conn, &self.keys).await {
            tracing::warn!(model = self.keys.model(), error = %e, "cannot create the consumer group; retrying");
            if !backoff.wait(&self.stop).await {
                return;
            }
        }
        self.tracker.spawn(keep_held(
            self.held.clone(),
            self.writer.clone(),
            Arc::clone(&self.keys),
            Arc::clone(&self.cfg),
            self.release.clone(),
        ));
        self.drain_own_pending(&mut backoff).await;
        while !self.stop.is_cancelled() && self.serving {
            if let Err(e) = self.step().await {
                metrics().redis_errors.with_label_values(&["read"]).inc();
                if e.is_nogroup() {
                    tracing::error!(
                        model = self.keys.model(),
                        "the jobs stream or its group vanished (Redis lost data); recreating it"
                    );
                    metrics()
                        .data_loss_events
                        .with_label_values(&[self.keys.model()])
                        .inc();
                    let _ = consume::ensure_group(&mut self.reader.conn, &self.keys).await;
                } else {
                    tracing::warn!(model = self.keys.model(), error = %e, "read failed; retrying");
                }
                if !backoff.wait(&self.stop).await {
                    break;
                }
            } else {
                backoff.reset();
            }
        }
        // Jobs already read go through before the pipeline ends (under the drain deadline).
        while !self.waiting.is_empty() {
            let pool = self.pool.clone();
            let Ok(slot) = pool.reserve().await else {
                break;
            };
            let batch = take_batch(&mut self.waiting, &limits(&self.models.default_batch()));
            self.dispatch(slot, batch);
        }
    }

    /// A restarted worker finishes what its consumer name already holds.
    async fn drain_own_pending(&mut self, backoff: &mut Backoff) {
        let mut after = "0".to_owned();
        while !self.stop.is_cancelled() {
            let count = self.cfg.batch.max_batch.max(64);
            match consume::read_own_pending(
                &mut self.reader.conn,
                &self.keys,
                &self.cfg.consumer,
                &after,
                count,
            )
            .await
            {
                Ok(list) if list.is_empty() => return,
                Ok(list) => {
                    after = list.last().map(|d| d.entry_id.clone()).unwrap_or(after);
                    tracing::info!(
                        model = self.keys.model(),
                        jobs = list.len(),
                        "resuming own pending jobs"
                    );
                    self.intake(list).await;
                    while !self.waiting.is_empty() {
                        let pool = self.pool.clone();
                        let Ok(slot) = pool.reserve().await else {
                            return;
                        };
                        let batch =
                            take_batch(&mut self.waiting, &limits(&self.models.default_batch()));
                        self.dispatch(slot, batch);
                    }
                }
                Err(e) => {
                    tracing::warn!(model = self.keys.model(), error = %e, "cannot read own pending jobs; retrying");
                    if !backoff.wait(&self.stop).await {
                        return;
                    }
                }
            }
        }
    }

    /// One round: housekeeping when due, wait for a free inference thread, collect a
    /// batch, dispatch it.
    async fn step(&mut self) -> Result<(), QueueError> {
        self.housekeeping().await;
        let pool = self.pool.clone();
        let slot = tokio::select! {
            () = self.stop.cancelled() => return Ok(()),
            s = pool.reserve() => match s {
                Ok(s) => s,
                Err(e) => {
                    self.lost_inference(&e);
                    return Ok(());
                }
            },
        };
        let batch_cfg = self.models.default_batch();
        let need = batch_cfg
            .max_batch
            .saturating_sub(waiting_rows(&self.waiting));
        if need > 0 {
            let block = self.waiting.is_empty().then_some(BLOCK_MS);
            let got = self.read(self.entries_for(need), block).await?;
            self.intake(got).await;
            if !batch_cfg.max_wait.is_zero() && !self.waiting.is_empty() {
                let until = Instant::now() + batch_cfg.max_wait;
                while waiting_rows(&self.waiting) < batch_cfg.max_batch && !self.stop.is_cancelled()
                {
                    let left = until.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    let need = batch_cfg.max_batch - waiting_rows(&self.waiting);
                    // Poll rather than block: Redis ends an idle BLOCK only on its
                    // 10 Hz cron, which overshot max_wait by up to 100 ms.
                    let got = self.read(self.entries_for(need), None).await?;
                    if got.is_empty() {
                        tokio::time::sleep(left.min(MAX_WAIT_POLL)).await;
                    }
                    self.intake(got).await;
                }
            }
        }
        if self.waiting.is_empty() {
            return Ok(());
        }
        let batch = take_batch(&mut self.waiting, &limits(&batch_cfg));
        self.dispatch(slot, batch);
        Ok(())
    }

    /// Every inference thread ended (they survive panics, so this is rare and for
    /// good): stop reading and reclaiming, stop refreshing what is held so other
    /// workers reclaim it after `claim_after`, and turn this process not-ready.
    fn lost_inference(&mut self, e: &RuntimeError) {
        if self.stop.is_cancelled() {
            return;
        }
        let model = self.keys.model();
        tracing::error!(model, error = %e, jobs_held = self.waiting.len(), "no inference thread is left for this model; it is no longer served here and this process is not ready");
        crate::health::model_down(model, &e.to_string());
        self.serving = false;
        self.release.cancel();
    }

    /// Reads up to `count` new jobs; with `block`, waits that long for one when none waits.
    /// No new read starts once shutdown began; one already sent is not abandoned (it
    /// ends within `block`), and what it returns is kept even when indexing it fails:
    /// Redis puts whatever it delivers in this consumer's pending list, so dropping it
    /// would strand those jobs until another worker's `claim_after`.
    async fn read(
        &mut self,
        count: usize,
        block: Option<u64>,
    ) -> Result<Vec<Delivery>, QueueError> {
        if self.stop.is_cancelled() {
            return Ok(Vec::new());
        }
        let (keys, consumer) = (&self.keys, &self.cfg.consumer);
        let Reader { conn, fast } = &mut self.reader;
        let got = match fast {
            Some(fast) => fast.read_new(keys, consumer, count, block).await?,
            None => consume::read_new(conn, keys, consumer, count, block).await?,
        };
        // What was read is this consumer's now and never dropped. A refused index write
        // (Redis out of memory: XREADGROUP is not refused, HSET is) is retried before
        // anything else happens, which also stops further reads until Redis has room;
        // meanwhile the jobs are held, so kept fresh (intake holds them otherwise).
        let mut backoff = Backoff::new(Duration::from_secs(2));
        let mut held = false;
        while let Err(e) = consume::index(conn, keys, &got).await {
            tracing::warn!(model = keys.model(), jobs = got.len(), error = %e, "cannot index the jobs read yet; retrying");
            if !std::mem::replace(&mut held, true) {
                got.iter().for_each(|d| self.held.insert(&d.entry_id));
            }
            if !backoff.wait(&self.stop).await {
                break;
            }
        }
        Ok(got)
    }

    async fn intake(&mut self, deliveries: Vec<Delivery>) {
        let mut answered = Vec::new();
        let (before, rows_before) = (self.waiting.len(), waiting_rows(&self.waiting));
        for d in deliveries {
            // Every log line about this job carries its model and id (recorded once
            // the entry is parsed). A debug span: at info level an enabled span per job
            // costs the fmt layer about a microsecond, so it is on when debugging only;
            // warnings and errors name the job themselves.
            let span = tracing::debug_span!(
                "job",
                model = self.keys.model(),
                entry = %d.entry_id,
                id = tracing::field::Empty,
                traceparent = tracing::field::Empty
            );
            let entry_id = d.entry_id.clone();
            let queued = self.waiting.len();
            self.held.insert(&entry_id);
            match self.check(d).instrument(span).await {
                Some(t) => answered.push(t),
                // Left pending for a later try (retryable): let the janitor have it.
                None if self.waiting.len() == queued => self.held.remove(&entry_id),
                None => {}
            }
        }
        if !answered.is_empty() {
            let (writer, keys, cfg) = (
                self.writer.clone(),
                Arc::clone(&self.keys),
                Arc::clone(&self.cfg),
            );
            self.tracker.spawn(write_results(
                writer,
                keys,
                cfg,
                answered,
                self.held.clone(),
            ));
        }
        let (jobs, rows) = (
            self.waiting.len().saturating_sub(before),
            waiting_rows(&self.waiting).saturating_sub(rows_before),
        );
        if jobs > 0 {
            self.rows_per_job =
                0.7f64.mul_add(self.rows_per_job, 0.3 * (rows as f64 / jobs as f64));
        }
    }

    /// How many entries to read for `rows` more rows, by the recent rows per job.
    fn entries_for(&self, rows: usize) -> usize {
        ((rows as f64 / self.rows_per_job.max(1.0)).ceil() as usize).clamp(1, rows.max(1))
    }

    /// Turns a delivery into a ready job, or into its terminal answer, or (retryable
    /// trouble) into nothing: it stays pending and is reclaimed later.
    async fn check(&mut self, d: Delivery) -> Option<Terminal> {
        let model = self.keys.model().to_owned();
        let mut info = JobInfo {
            entry_id: d.entry_id.clone(),
            model,
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
            info.job_id = crate::protocol::job::first_id(&fields);
            info.has_hash = true;
            tracing::warn!(model = self.keys.model(), entry = %info.entry_id, job = info.job_id.as_deref().unwrap_or_default(), why, "entry over its bounds");
            let end = if info.job_id.is_some() {
                End::Failed("too_large", why)
            } else {
                End::DeadLetter(why, limits.truncated(&fields))
            };
            return Some(terminal(&info, end));
        }
        let entry =
            match JobEntry::from_fields(fields.iter().map(|(k, v)| (k.as_slice(), v.as_slice()))) {
                Ok(e) => e,
                Err(e) => {
                    if let Some(id) = &e.id {
                        tracing::Span::current().record("id", id.as_str());
                    }
                    info.job_id = e.id.clone();
                    info.has_hash = true;
                    let end = if e.id.is_some() {
                        End::Failed("invalid", format!("bad job entry: {}", e.error))
                    } else {
                        End::DeadLetter(format!("bad job entry: {}", e.error), fields)
                    };
                    return Some(terminal(&info, end));
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
        match entry.reply_to.as_deref() {
            Some(r) if !self.keys.is_reply_key(r) => {
                let msg = format!(
                    "reply_to must start with `{}`; nothing was written to the given key",
                    self.keys.reply_prefix()
                );
                return Some(terminal(&info, End::Failed("invalid", msg)));
            }
            r => info.reply_to = r.map(str::to_owned),
        }
        if d.deliveries > self.cfg.queue.max_attempts {
            let last = consume::last_error(&mut self.writer, &self.keys, &entry.id)
                .await
                .ok()
                .flatten();
            let why = format!(
                "gave up after {} deliveries (max attempts {}): {}",
                d.deliveries - 1,
                self.cfg.queue.max_attempts,
                last.unwrap_or_else(
                    || "the worker handling it stopped or timed out each time".into()
                )
            );
            // The record counts the deliveries that were attempts; this one only gives up.
            info.attempts = d.deliveries - 1;
            return Some(terminal(&info, End::DeadLetter(why, fields)));
        }
        if entry.deadline_ms.is_some_and(|dl| dl < crate::now_ms()) {
            return Some(terminal(
                &info,
                End::Expired("the deadline passed before the job was computed".into()),
            ));
        }
        let version = match self.models.get(entry.version) {
            Ok(v) => v,
            Err(e) if e.retry == Retry::Terminal => {
                return Some(terminal(&info, End::Failed("not_found", e.message)));
            }
            Err(e) => {
                tracing::error!(model = self.keys.model(), job = %entry.id, error = %e.message, "cannot load the model version; the job will be retried");
                let _ =
                    consume::note_retryable(&mut self.writer, &self.keys, &entry.id, &e.message)
                        .await;
                return None;
            }
        };
        info.version = Some(version.model.version);
        let decoded = match &entry.payload {
            Payload::Json(body) => {
                oip::decode_request(body, version.model.signature.single_input())
                    .map(|r| (r.inputs, r.outputs))
            }
            Payload::Binary(bin) => {
                // Capped by the payload's own size (each element takes at least a byte,
                // and the bytes are already in memory); the per-job element cap is then
                // enforced by validation, as for JSON, so both answer `too_large`.
                binary::decode(bin, bin.len()).map(|t| (t, Vec::new()))
            }
        };
        let (inputs, wanted) = match decoded {
            Ok(x) => x,
            Err(DecodeError(m)) => return Some(terminal(&info, End::Failed("invalid", m))),
        };
        if let Some(unknown) = wanted.iter().find(|w| {
            !version
                .model
                .signature
                .outputs
                .iter()
                .any(|o| &o.name == *w)
        }) {
            let msg = format!("unknown output `{unknown}` requested");
            return Some(terminal(&info, End::Failed("invalid", msg)));
        }
        match version
            .model
            .signature
            .validate(inputs, self.cfg.queue.max_elements)
        {
            Ok(valid) => {
                let lengths = match &version.model.padding {
                    Some(p) => match p.lengths(&valid.tensors) {
                        Ok(l) => l,
                        Err(m) => return Some(terminal(&info, End::Failed("invalid", m))),
                    },
                    None => Vec::new(),
                };
                self.waiting.push_back(Ready {
                    info,
                    version,
                    rows: valid.rows,
                    inputs: valid.tensors,
                    lengths,
                    wanted,
                });
                None
            }
            Err(InvalidInput::Invalid(m)) => Some(terminal(&info, End::Failed("invalid", m))),
            Err(InvalidInput::TooLarge(m)) => Some(terminal(&info, End::Failed("too_large", m))),
        }
    }

    /// A pending entry whose stream entry is gone: answer its job as lost, if the
    /// inflight index still knows which job it was.
    async fn lost(&mut self, mut info: JobInfo) -> Option<Terminal> {
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
        Some(terminal(&info, End::Failed("lost", msg)))
    }

    /// Marks the batch running (not waited for), sends it to the reserved inference
    /// thread, and spawns the task that writes its results.
    fn dispatch(&mut self, slot: crate::runtime::pool::Slot<'_>, mut batch: Vec<Ready>) {
        let Some(first) = batch.first() else { return };
        let model = Arc::clone(&first.version.model);
        let max_rows = first.version.batch.max_batch;
        let started_ms = crate::now_ms();
        let m = metrics();
        let name = self.keys.model();
        let rows: usize = batch.iter().map(|j| j.rows).sum();
        m.batch_rows.with_label_values(&[name]).observe(rows as f64);
        m.batch_jobs
            .with_label_values(&[name])
            .observe(batch.len() as f64);
        observe_shapes(name, &model, &batch);
        let queue_wait = m.queue_wait.with_label_values(&[name]);
        let mut running: Vec<(String, u64, u32, Option<String>)> = Vec::with_capacity(batch.len());
        for j in &mut batch {
            j.info.started_ms = Some(started_ms);
            queue_wait.observe(started_ms.saturating_sub(j.info.enqueued_ms) as f64 / 1000.0);
            let id = j.info.job_id.clone().unwrap_or_default();
            running.push((id, model.version, j.info.attempts, j.info.reply_to.clone()));
        }
        // The running mark is written only if the batch is still going after
        // RUNNING_MARK_AFTER: a state that would last a millisecond is never seen by
        // anyone, and skipping it halves the Redis work per job. The mark is
        // conditional, so it never overwrites a result that won the race; `mark`
        // settles once whether it is sent, so the results know to expire the hash.
        let mark = Arc::new(AtomicU8::new(MARK_PENDING));
        let (batch_done, mut done_rx) = tokio::sync::oneshot::channel::<()>();
        let (mut writer, keys) = (self.writer.clone(), Arc::clone(&self.keys));
        let marking = Arc::clone(&mark);
        tokio::spawn(async move {
            tokio::select! {
                _ = &mut done_rx => return,
                () = tokio::time::sleep(RUNNING_MARK_AFTER) => {}
            }
            if settle(&marking, MARK_SENT) != MARK_SENT {
                return;
            }
            let started: Vec<Started<'_>> = running
                .iter()
                .map(|(j, v, a, r)| Started {
                    job_id: j,
                    version: *v,
                    attempts: *a,
                    reply_to: r.as_deref(),
                })
                .collect();
            if let Err(e) = consume::mark_running(&mut writer, &keys, started_ms, &started).await {
                tracing::debug!(error = %e, "running mark not written");
            }
        });
        let inputs: Vec<Vec<Tensor>> = batch
            .iter_mut()
            .map(|j| std::mem::take(&mut j.inputs))
            .collect();
        let rx = slot.send_capped(Arc::clone(&model), inputs, Some(max_rows));
        let t0 = Instant::now();
        let (writer, keys, cfg) = (
            self.writer.clone(),
            Arc::clone(&self.keys),
            Arc::clone(&self.cfg),
        );
        let held = self.held.clone();
        self.tracker.spawn(async move {
            let outputs = rx.await.map_err(|_| RuntimeError::Stopped(model.label()));
            let m = metrics();
            let version = model.version.to_string();
            m.inference_time
                .with_label_values(&[keys.model(), &version])
                .observe(t0.elapsed().as_secs_f64());
            m.batches.with_label_values(&[keys.model(), &version]).inc();
            m.rows_inferred
                .with_label_values(&[keys.model(), &version])
                .inc_by(rows as u64);
            let marked = settle(&mark, MARK_SKIPPED) == MARK_SENT;
            let mut results = Vec::with_capacity(batch.len());
            let mut writer_for_notes = writer.clone();
            let per_job: Vec<Result<Vec<Tensor>, RuntimeError>> = match outputs {
                Ok(list) => list,
                Err(e) => batch.iter().map(|_| Err(e.clone())).collect(),
            };
            for (mut job, out) in batch.into_iter().zip(per_job) {
                job.info.has_hash |= marked;
                let end = match out {
                    Ok(tensors) => End::Succeeded(select(tensors, &job.wanted)),
                    Err(e @ RuntimeError::Run { .. }) => End::Failed("inference", e.to_string()),
                    Err(e @ RuntimeError::Panicked { .. }) => {
                        m.inference_panics.with_label_values(&[keys.model()]).inc();
                        tracing::error!(model = keys.model(), job = job.info.job_id.as_deref().unwrap_or_default(), error = %e, "inference panicked on this job; dead-lettering it");
                        let why = format!("{e} (dead-lettered: the same input would panic again)");
                        match consume::entry(&mut writer_for_notes, &keys, &job.info.entry_id).await {
                            Ok(Some(fields)) => End::DeadLetter(why, fields),
                            _ => End::Failed("inference", why),
                        }
                    }
                    Err(e) => {
                        // Load trouble or shutdown: leave the job pending for another try.
                        if let Some(id) = &job.info.job_id {
                            let _ = consume::note_retryable(
                                &mut writer_for_notes,
                                &keys,
                                id,
                                &e.to_string(),
                            )
                            .await;
                        }
                        held.remove(&job.info.entry_id);
                        continue;
                    }
                };
                results.push(terminal(&job.info, end));
            }
            write_results(writer, keys, cfg, results, held).await;
            let _ = batch_done.send(());
        });
    }

    /// Reclaims idle entries, trims, and forgets stale consumers, each when due.
    async fn housekeeping(&mut self) {
        let claim_after = self.cfg.queue.claim_after;
        let every = (claim_after / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
        if self.last_janitor.elapsed() >= every {
            self.last_janitor = Instant::now();
            let count = self.cfg.batch.max_batch.max(16);
            match janitor::reclaim(
                &mut self.writer,
                &self.keys,
                &self.cfg.consumer,
                claim_after,
                &self.claim_cursor,
                count,
            )
            .await
            {
                Ok(r) => {
                    self.claim_cursor = r.cursor;
                    if !r.entries.is_empty() || !r.deleted.is_empty() {
                        tracing::info!(
                            model = self.keys.model(),
                            reclaimed = r.entries.len(),
                            vanished = r.deleted.len(),
                            "reclaimed idle jobs"
                        );
                    }
                    let gone = r.deleted.into_iter().map(|entry_id| Delivery {
                        entry_id,
                        fields: None,
                        deliveries: 0,
                    });
                    let mine = |d: &Delivery| self.held.contains(&d.entry_id);
                    let all: Vec<Delivery> = r
                        .entries
                        .into_iter()
                        .filter(|d| !mine(d))
                        .chain(gone)
                        .collect();
                    self.intake(all).await;
                }
                Err(e) => tracing::warn!(model = self.keys.model(), error = %e, "reclaim failed"),
            }
        }
        if self.last_trim.elapsed() >= Duration::from_secs(1) {
            self.last_trim = Instant::now();
            if let Err(e) = janitor::trim(&mut self.writer, &self.keys).await {
                tracing::warn!(model = self.keys.model(), error = %e, "trim failed");
            }
        }
        let stale_after = (claim_after * 10).max(Duration::from_secs(10));
        if self.last_stale_check.elapsed() >= stale_after {
            self.last_stale_check = Instant::now();
            match janitor::remove_stale_consumers(
                &mut self.writer,
                &self.keys,
                stale_after,
                &self.cfg.consumer,
            )
            .await
            {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    model = self.keys.model(),
                    removed = n,
                    "removed stale consumers"
                ),
                Err(e) => {
                    tracing::warn!(model = self.keys.model(), error = %e, "stale consumer check failed")
                }
            }
        }
    }
}

/// A batch's input elements (real and as padded) and its distinct shapes.
fn observe_shapes(name: &str, model: &crate::runtime::LoadedModel, batch: &[Ready]) {
    let m = metrics();
    let jobs: Vec<&[Tensor]> = batch.iter().map(|j| j.inputs.as_slice()).collect();
    let (real, padded) = crate::runtime::padding::batch_elements(model.padding.as_ref(), &jobs);
    m.batch_elements
        .with_label_values(&[name])
        .observe(padded as f64);
    m.input_elements
        .with_label_values(&[name, "real"])
        .inc_by(real as u64);
    m.input_elements
        .with_label_values(&[name, "padded"])
        .inc_by(padded as u64);
    let mut shapes: Vec<&[usize]> = batch.iter().map(|j| j.lengths.as_slice()).collect();
    shapes.sort_unstable();
    shapes.dedup();
    m.batch_shapes
        .with_label_values(&[name])
        .observe(shapes.len() as f64);
}

/// Running-mark states of a batch: not decided yet, sent, or skipped (results first).
const MARK_PENDING: u8 = 0;
const MARK_SENT: u8 = 1;
const MARK_SKIPPED: u8 = 2;

/// Moves a pending mark to `to` and returns the state it ends in: whoever settles
/// first decides, once.
fn settle(mark: &AtomicU8, to: u8) -> u8 {
    match mark.compare_exchange(MARK_PENDING, to, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => to,
        Err(now) => now,
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
async fn write_results(
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

/// Refreshes the idle time of every held entry each third of `claim_after`, on its
/// own timer: a batch may keep the pipeline waiting for an inference thread far longer.
async fn keep_held(
    held: Held,
    mut writer: Conn,
    keys: Arc<Keys>,
    cfg: Arc<WorkerConfig>,
    stop: CancellationToken,
) {
    let every = (cfg.queue.claim_after / 3).max(Duration::from_millis(20));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let ids = held.snapshot();
        if let Err(e) = janitor::touch(&mut writer, &keys, &cfg.consumer, &ids).await {
            tracing::warn!(model = keys.model(), error = %e, "cannot refresh held jobs");
        }
    }
}

/// The set of entry ids a pipeline holds, shared with its result-writing tasks.
#[derive(Debug, Clone, Default)]
struct Held(Arc<std::sync::Mutex<std::collections::HashSet<String>>>);

impl Held {
    fn insert(&self, id: &str) {
        if let Ok(mut h) = self.0.lock() {
            h.insert(id.to_owned());
        }
    }

    fn remove(&self, id: &str) {
        if let Ok(mut h) = self.0.lock() {
            h.remove(id);
        }
    }

    fn contains(&self, id: &str) -> bool {
        self.0.lock().is_ok_and(|h| h.contains(id))
    }

    fn snapshot(&self) -> Vec<String> {
        self.0
            .lock()
            .map(|h| h.iter().cloned().collect())
            .unwrap_or_default()
    }
}
