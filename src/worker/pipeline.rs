//! One model's pipeline: read (own pending first, then new), check each job, batch,
//! hand the batch to an inference thread, and write results — while the next batch
//! is being collected.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::held::{Held, keep_held};
use super::intake::{Checked, Intake, Ready};
use super::results::{answer, write_results};
use super::running::Mark;
use crate::batcher::{Limits, take_batch, waiting_rows};
use crate::config::{BatchConfig, WorkerConfig};
use crate::metrics::metrics;
use crate::protocol::Tensor;
use crate::queue::consume::{self, Delivery};
use crate::queue::reader::StreamReader;
use crate::queue::{Conn, Keys, QueueError, janitor};
use crate::registry::RegistryCache;
use crate::runtime::{InferPool, RuntimeError};
use crate::shutdown::Backoff;

/// How long a read blocks when nothing is waiting (then the loop checks for shutdown
/// and housekeeping).
const BLOCK_MS: u64 = 1000;

/// How often a batch waiting out `max_wait` looks for more jobs.
const MAX_WAIT_POLL: Duration = Duration::from_millis(2);

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
    /// Admission: parse, bound and validate each delivery; the model's versions.
    intake: Intake,
    waiting: VecDeque<Ready>,
    tracker: TaskTracker,
    stop: CancellationToken,
    /// Ends the refresh of held jobs when the model can no longer be served here (its
    /// jobs must then go to other workers). Not `stop`: during a drain the jobs still
    /// held are being finished here, and must not be reclaimed meanwhile (AUDIT D32).
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
        let keys = Arc::new(Keys::new(model));
        Pipeline {
            intake: Intake::new(
                Arc::clone(&keys),
                Arc::clone(&cfg),
                registry,
                writer.clone(),
            ),
            keys,
            pool: InferPool::spawn(model, cfg.infer_threads, cfg.intra_threads),
            cfg,
            reader,
            writer,
            waiting: VecDeque::new(),
            tracker,
            release: CancellationToken::new(),
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
            self.stop.clone(),
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
            let batch = take_batch(&mut self.waiting, &limits(&self.intake.default_batch()));
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
                            take_batch(&mut self.waiting, &limits(&self.intake.default_batch()));
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
        let batch_cfg = self.intake.default_batch();
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
            self.held.insert(&entry_id);
            match self.intake.check(d).instrument(span).await {
                Checked::Ready(job) => self.waiting.push_back(*job),
                Checked::Answered(t) => answered.push(t),
                // Left pending for a later try (retryable): let the janitor have it.
                Checked::Later => self.held.remove(&entry_id),
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
        for j in &mut batch {
            j.info.started_ms = Some(started_ms);
            queue_wait.observe(started_ms.saturating_sub(j.info.enqueued_ms) as f64 / 1000.0);
        }
        let mark = Mark::start(
            self.writer.clone(),
            Arc::clone(&self.keys),
            started_ms,
            model.version,
            &batch,
        );
        let inputs: Vec<Vec<Tensor>> = batch
            .iter_mut()
            .map(|j| std::mem::take(&mut j.inputs))
            .collect();
        let rx = slot.send_capped(Arc::clone(&model), inputs, Some(max_rows));
        let t0 = Instant::now();
        let (mut writer, keys, cfg) = (
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
            let marked = mark.results_in();
            let terminals = answer(batch, outputs, marked, &mut writer, &keys, &held).await;
            write_results(writer, keys, cfg, terminals, held).await;
            mark.finish();
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
