//! The ceiling: ONNX Runtime in this process, with the session settings inferq's
//! workers use (one intra-op thread, no spinning), at fixed batch sizes. No queue,
//! no codec, no Redis: what one inference thread can do at best.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use super::reference::{Reference, cycled};
use crate::protocol::{DataType, Tensor, TensorData};
use crate::runtime::ModelSession;

/// One batch size's figure.
#[derive(Debug, Clone, Serialize)]
pub(super) struct CeilingRow {
    /// Rows per ORT call.
    pub batch: usize,
    /// Rows per second.
    pub rows_per_s: f64,
    /// Wall time per call, microseconds.
    pub us_per_batch: f64,
    /// Calls made.
    pub calls: u64,
}

/// Runs `file` at each batch size for about `duration` each.
pub(super) fn run(
    file: &Path,
    batch_sizes: &[usize],
    reference: Option<&Reference>,
    intra_threads: usize,
    duration: Duration,
) -> anyhow::Result<Vec<CeilingRow>> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let label = file
        .file_stem()
        .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned());
    let mut session = ModelSession::load(&bytes, &label, intra_threads)?;
    session.set_max_rows(None);
    let mut rows = Vec::new();
    for &batch in batch_sizes {
        let inputs = match reference {
            Some(r) => r.inputs.iter().map(|t| cycled(t, 0, batch)).collect(),
            None => zeros(&session, batch)?,
        };
        let call = |s: &mut ModelSession| -> anyhow::Result<()> {
            match s.run_jobs(&[inputs.as_slice()]).pop() {
                Some(Ok(_)) => Ok(()),
                Some(Err(e)) => Err(e.into()),
                None => bail!("no outputs"),
            }
        };
        for _ in 0..3 {
            call(&mut session)?;
        }
        let t0 = Instant::now();
        let mut calls = 0u64;
        while calls < 3 || t0.elapsed() < duration {
            call(&mut session)?;
            calls += 1;
        }
        let secs = t0.elapsed().as_secs_f64();
        rows.push(CeilingRow {
            batch,
            rows_per_s: (calls * batch as u64) as f64 / secs,
            us_per_batch: secs * 1e6 / calls as f64,
            calls,
        });
    }
    Ok(rows)
}

/// Zero inputs of `batch` rows for every model input.
fn zeros(session: &ModelSession, batch: usize) -> anyhow::Result<Vec<Tensor>> {
    session
        .signature()
        .inputs
        .iter()
        .map(|s| {
            let dt = DataType::parse(&s.datatype)
                .with_context(|| format!("input `{}` has type {}", s.name, s.datatype))?;
            let mut shape: Vec<usize> = s
                .shape
                .iter()
                .map(|&d| usize::try_from(d).unwrap_or(1).max(1))
                .collect();
            if let Some(d) = shape.first_mut() {
                *d = batch;
            }
            let n = shape.iter().product();
            Ok(Tensor {
                name: s.name.clone(),
                shape,
                data: TensorData::zeros(dt, n),
            })
        })
        .collect()
}
