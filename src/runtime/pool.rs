//! Inference threads owned by the runtime, behind an async handle.
//!
//! The channel to the threads holds exactly one batch: `reserve` resolves only when
//! a thread is about to be free, so the caller collects the next batch while the
//! current one runs, and nothing piles up in memory (TEI's prefetch-one pattern).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};

use super::session::{JobOutputs, ModelSession};
use super::{RuntimeError, Signature};
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
        for i in 0..threads.max(1) {
            let rx = Arc::clone(&rx);
            std::thread::Builder::new()
                .name(format!("infer-{name}-{i}"))
                .spawn(move || thread_main(&rx, intra_threads))
                .expect(
                    "cannot spawn an inference thread, this is a bug or the OS is out of threads",
                );
        }
        InferPool {
            tx,
            name: name.into(),
        }
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

fn thread_main(rx: &Mutex<mpsc::Receiver<Work>>, intra_threads: usize) {
    let mut sessions: HashMap<u64, ModelSession> = HashMap::new();
    loop {
        let work = {
            let Ok(mut guard) = rx.lock() else { return };
            guard.blocking_recv()
        };
        let Some(Work {
            model,
            jobs,
            max_rows,
            reply,
        }) = work
        else {
            return;
        };
        let outputs = match session_for(&mut sessions, &model, intra_threads) {
            Ok(session) => {
                session.set_max_rows(max_rows);
                let refs: Vec<&[Tensor]> = jobs.iter().map(Vec::as_slice).collect();
                session.run_jobs(&refs)
            }
            Err(e) => jobs.iter().map(|_| Err(e.clone())).collect(),
        };
        let _ = reply.send(outputs);
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
        e.insert(s);
    }
    Ok(sessions
        .get_mut(&model.version)
        .expect("inserted above, this is a bug"))
}
