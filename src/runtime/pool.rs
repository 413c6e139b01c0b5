//! Inference threads owned by the runtime, behind an async handle.
//!
//! The channel to the threads holds exactly one batch: `reserve` resolves only when
//! a thread is about to be free, so the caller collects the next batch while the
//! current one runs, and nothing piles up in memory (TEI's prefetch-one pattern).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};

use super::session::{JobOutputs, ModelSession, panic_message};
use super::{Padding, RuntimeError, Signature, faults};
use crate::protocol::Tensor;

/// A model version whose bytes passed the hash check, ready for sessions.
#[derive(Debug)]
pub struct LoadedModel {
    /// Model name.
    pub name: String,
    /// Version number.
    pub version: u64,
    /// The exact bytes whose sha256 matched the manifest.
    pub bytes: Arc<[u8]>,
    /// Its signature, for validating jobs.
    pub signature: Signature,
    /// Its padding declaration (validated against the signature), if any.
    pub padding: Option<Padding>,
}

impl LoadedModel {
    /// `name@version`, as errors and logs show it.
    pub fn label(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }
}

struct Work {
    model: Arc<LoadedModel>,
    jobs: Vec<Vec<Tensor>>,
    max_rows: Option<usize>,
    reply: oneshot::Sender<Vec<JobOutputs>>,
}

/// Async handle to a model's inference threads; clones share the threads.
#[derive(Debug, Clone)]
pub struct InferPool {
    tx: mpsc::Sender<Work>,
    name: Arc<str>,
    alive: Arc<AtomicUsize>,
}

/// Counts a thread as alive until it ends, however it ends.
struct Alive(Arc<AtomicUsize>);

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A reserved slot: the next batch goes straight to a thread.
#[derive(Debug)]
pub struct Slot<'a> {
    permit: mpsc::Permit<'a, Work>,
}

impl Slot<'_> {
    /// Hands a batch (each job's validated inputs) to the thread; the receiver yields
    /// one result per job, in order.
    pub fn send(
        self,
        model: Arc<LoadedModel>,
        jobs: Vec<Vec<Tensor>>,
    ) -> oneshot::Receiver<Vec<JobOutputs>> {
        self.send_capped(model, jobs, None)
    }

    /// Like [`Slot::send`], with ORT calls capped at `max_rows` rows (a larger job is
    /// run in chunks and reassembled).
    pub fn send_capped(
        self,
        model: Arc<LoadedModel>,
        jobs: Vec<Vec<Tensor>>,
        max_rows: Option<usize>,
    ) -> oneshot::Receiver<Vec<JobOutputs>> {
        let (reply, rx) = oneshot::channel();
        self.permit.send(Work {
            model,
            jobs,
            max_rows,
            reply,
        });
        rx
    }
}

impl InferPool {
    /// Starts `threads` inference threads for one model, each with `intra_threads`
    /// ORT intra-op threads. Threads end when every handle is dropped.
    pub fn spawn(name: &str, threads: usize, intra_threads: usize) -> InferPool {
        let (tx, rx) = mpsc::channel::<Work>(1);
        let rx = Arc::new(Mutex::new(rx));
        let alive = Arc::new(AtomicUsize::new(0));
        for i in 0..threads.max(1) {
            let rx = Arc::clone(&rx);
            let model: Arc<str> = name.into();
            alive.fetch_add(1, Ordering::AcqRel);
            let guard = Alive(Arc::clone(&alive));
            let spawned = std::thread::Builder::new()
                .name(format!("infer-{name}-{i}"))
                .spawn(move || {
                    let _alive = guard;
                    thread_main(&rx, intra_threads, &model);
                });
            if let Err(e) = spawned {
                // The guard went with the closure and was dropped: not counted.
                tracing::error!(model = name, error = %e, "cannot start an inference thread");
            }
        }
        InferPool {
            tx,
            name: name.into(),
            alive,
        }
    }

    /// Inference threads still running. Zero while the pool is not shutting down
    /// means the model cannot be served here any more.
    pub fn threads_alive(&self) -> usize {
        self.alive.load(Ordering::Acquire)
    }

    /// Waits until a thread can take a batch.
    pub async fn reserve(&self) -> Result<Slot<'_>, RuntimeError> {
        let permit = self
            .tx
            .reserve()
            .await
            .map_err(|_| RuntimeError::Stopped(self.name.to_string()))?;
        Ok(Slot { permit })
    }

    /// Reserves and runs one batch, waiting for its outputs.
    pub async fn run(
        &self,
        model: Arc<LoadedModel>,
        jobs: Vec<Vec<Tensor>>,
    ) -> Result<Vec<JobOutputs>, RuntimeError> {
        let rx = self.reserve().await?.send(model, jobs);
        rx.await
            .map_err(|_| RuntimeError::Stopped(self.name.to_string()))
    }
}

fn thread_main(rx: &Mutex<mpsc::Receiver<Work>>, intra_threads: usize, model_name: &str) {
    let mut sessions: HashMap<u64, ModelSession> = HashMap::new();
    loop {
        // A poisoned lock only means another thread panicked holding it; the
        // receiver inside is intact.
        let work = rx
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .blocking_recv();
        let Some(Work {
            model,
            jobs,
            max_rows,
            reply,
        }) = work
        else {
            return;
        };
        if faults::take_end_thread(model_name) {
            return;
        }
        let refs: Vec<&[Tensor]> = jobs.iter().map(Vec::as_slice).collect();
        let outputs = match guarded(&mut sessions, &model, &refs, max_rows, intra_threads) {
            Ok(outputs) => outputs,
            // A panic outside the session's own guard (building or warming a session,
            // or splitting outputs): each job alone finds the culprit.
            Err(message) if refs.len() > 1 => {
                tracing::warn!(model = %model.label(), jobs = refs.len(), %message, "inference panicked; running the batch's jobs one at a time");
                refs.iter()
                    .map(|job| {
                        match guarded(&mut sessions, &model, &[job], max_rows, intra_threads) {
                            Ok(one) => one.into_iter().next().unwrap_or_else(|| {
                                Err(panicked(&model, "no result for the job".into()))
                            }),
                            Err(m) => Err(panicked(&model, m)),
                        }
                    })
                    .collect()
            }
            Err(message) => vec![Err(panicked(&model, message))],
        };
        let _ = reply.send(outputs);
    }
}

/// Runs one batch; a panic drops this thread's sessions (rebuilt on next use) and
/// comes back as its message.
fn guarded(
    sessions: &mut HashMap<u64, ModelSession>,
    model: &LoadedModel,
    jobs: &[&[Tensor]],
    max_rows: Option<usize>,
    intra_threads: usize,
) -> Result<Vec<JobOutputs>, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        match session_for(sessions, model, intra_threads) {
            Ok(session) => {
                session.set_max_rows(max_rows);
                session.run_jobs(jobs)
            }
            Err(e) => jobs.iter().map(|_| Err(e.clone())).collect(),
        }
    }))
    .map_err(|panic| {
        sessions.clear();
        panic_message(panic.as_ref())
    })
}

fn panicked(model: &LoadedModel, message: String) -> RuntimeError {
    RuntimeError::Panicked {
        model: model.label(),
        message,
    }
}

/// This thread's session for a version, created and warmed up on first use.
fn session_for<'a>(
    sessions: &'a mut HashMap<u64, ModelSession>,
    model: &LoadedModel,
    intra_threads: usize,
) -> Result<&'a mut ModelSession, RuntimeError> {
    if let std::collections::hash_map::Entry::Vacant(e) = sessions.entry(model.version) {
        let mut s = ModelSession::load(&model.bytes, &model.label(), intra_threads)?;
        s.warm_up()?;
        s.set_padding(model.padding.clone());
        e.insert(s);
    }
    Ok(sessions
        .get_mut(&model.version)
        .expect("inserted above, this is a bug"))
}
