//! One ORT session: build it from verified bytes, read its signature, warm it up, and
//! run a batch made of several jobs' rows, splitting the outputs back per job.

use std::borrow::Cow;

use ort::session::{Session, SessionInputValue, builder::GraphOptimizationLevel};
use ort::value::{DynValue, TensorElementType, TensorRef, ValueType};

use super::{Padding, RuntimeError, Signature, TensorSpec, environment};
use crate::protocol::{DataType, Tensor, TensorData, tensor::with_data};

/// A session plus what inferq needs to know about it. `run` takes `&mut self`
/// (ORT rc.10+), so each inference thread owns its own.
#[derive(Debug)]
pub struct ModelSession {
    session: Session,
    signature: Signature,
    label: String,
    max_rows: Option<usize>,
    padding: Option<Padding>,
}

/// The outputs of one job, in the model's output order; or why it failed.
pub type JobOutputs = Result<Vec<Tensor>, RuntimeError>;

impl ModelSession {
    /// Builds a session from model bytes (already hash-checked by the caller; ORT
    /// never re-opens the file). `label` (`name@version`) goes into every error.
    pub fn load(
        bytes: &[u8],
        label: &str,
        intra_threads: usize,
    ) -> Result<ModelSession, RuntimeError> {
        let env = environment()?;
        let load_err = |e: ort::Error| RuntimeError::Load {
            model: label.to_owned(),
            message: e.to_string(),
        };
        let session = Session::builder(env)
            .map_err(load_err)?
            .with_optimization_level(GraphOptimizationLevel::All)
            .map_err(|e| load_err(e.into()))?
            .with_intra_threads(intra_threads.max(1))
            .map_err(|e| load_err(e.into()))?
            .with_intra_op_spinning(false)
            .map_err(|e| load_err(e.into()))?
            .commit_from_memory(bytes)
            .map_err(load_err)?;
        let signature = Signature {
            inputs: session
                .inputs()
                .iter()
                .map(|o| spec(o.name(), o.dtype()))
                .collect(),
            outputs: session
                .outputs()
                .iter()
                .map(|o| spec(o.name(), o.dtype()))
                .collect(),
        };
        Ok(ModelSession {
            session,
            signature,
            label: label.to_owned(),
            max_rows: None,
            padding: None,
        })
    }

    /// Caps the rows of one ORT call: a job larger than this runs in chunks whose
    /// outputs are reassembled in order (`None`: no cap).
    pub fn set_max_rows(&mut self, max_rows: Option<usize>) {
        self.max_rows = max_rows.filter(|&n| n > 0);
    }

    /// Lets jobs of different lengths on the declared axes run together, padded to
    /// the longest and cut back per job (a declaration validated against the model).
    pub fn set_padding(&mut self, padding: Option<Padding>) {
        self.padding = padding;
    }

    /// The signature ORT reads from the model.
    pub fn signature(&self) -> &Signature {
        &self.signature
    }

    /// Runs one row of zeros through the model so the first real batch does not pay
    /// for lazy initialisation. Models with inputs inferq cannot feed are skipped.
    pub fn warm_up(&mut self) -> Result<(), RuntimeError> {
        let mut inputs = Vec::new();
        for s in &self.signature.inputs {
            let Some(dt) = DataType::parse(&s.datatype) else {
                return Ok(());
            };
            let shape: Vec<usize> = s
                .shape
                .iter()
                .map(|&d| if d > 0 { d as usize } else { 1 })
                .collect();
            let n = shape.iter().product();
            inputs.push(Tensor {
                name: s.name.clone(),
                shape,
                data: TensorData::zeros(dt, n),
            });
        }
        self.run_rows(&inputs).map(drop)
    }

    /// Runs several jobs' inputs (each validated, in signature order) as one batch and
    /// returns each job's outputs, row order kept. When the batch fails, it is bisected
    /// so only the job at fault fails.
    ///
    /// Jobs that cannot be stacked (see [`stackable`]) are run one at a time: the
    /// batcher never sends such a mix, and this keeps a wrong answer impossible if it did.
    ///
    /// A panic while running (a bug reached by some job's data) is caught and treated
    /// like an ORT failure: bisected, so only the job that causes it fails, with
    /// [`RuntimeError::Panicked`].
    pub fn run_jobs(&mut self, jobs: &[&[Tensor]]) -> Vec<JobOutputs> {
        match jobs {
            [] => Vec::new(),
            [one] => vec![self.run_guarded(one)],
            [first, rest @ ..] if !rest.iter().all(|j| self.stackable(j, first)) => {
                jobs.iter().map(|j| self.run_guarded(j)).collect()
            }
            _ if self.padding.is_some() && !jobs[1..].iter().all(|j| stackable(j, jobs[0])) => {
                self.run_padded(jobs)
            }
            _ => match self.run_guarded(&concat(jobs)).map(|out| split(out, jobs)) {
                Ok(Some(per_job)) => per_job.into_iter().map(Ok).collect(),
                // An output without a batch dimension cannot be split: run jobs alone.
                Ok(None) => jobs.iter().map(|j| self.run_guarded(j)).collect(),
                Err(_) => self.bisect(jobs),
            },
        }
    }

    fn stackable(&self, a: &[Tensor], b: &[Tensor]) -> bool {
        match &self.padding {
            Some(p) => p.stackable(a, b),
            None => stackable(a, b),
        }
    }

    /// Jobs of different lengths on padded axes: each padded to the longest, run as
    /// one batch, outputs cut back to each job's own lengths. A failure is bisected
    /// like any other (each half padded to its own longest).
    fn run_padded(&mut self, jobs: &[&[Tensor]]) -> Vec<JobOutputs> {
        let Some(padding) = self.padding.clone() else {
            return jobs.iter().map(|j| self.run_guarded(j)).collect();
        };
        let lengths: Result<Vec<Vec<usize>>, String> =
            jobs.iter().map(|j| padding.lengths(j)).collect();
        let lengths = match lengths {
            Ok(l) => l,
            // Checked per job before batching; run alone if it slipped through.
            Err(_) => return jobs.iter().map(|j| self.run_guarded(j)).collect(),
        };
        let mut target = lengths[0].clone();
        for l in &lengths[1..] {
            for (t, &x) in target.iter_mut().zip(l) {
                *t = (*t).max(x);
            }
        }
        let padded: Vec<Vec<Tensor>> = jobs.iter().map(|j| padding.pad(j, &target)).collect();
        let refs: Vec<&[Tensor]> = padded.iter().map(Vec::as_slice).collect();
        let label = self.label.clone();
        match self
            .run_guarded(&concat(&refs))
            .map(|out| split(out, &refs))
        {
            Ok(Some(per_job)) => per_job
                .into_iter()
                .zip(&lengths)
                .map(|(out, own)| {
                    padding
                        .cut(out, own, &target)
                        .map_err(|message| RuntimeError::Run {
                            model: label.clone(),
                            message,
                        })
                })
                .collect(),
            Ok(None) => jobs.iter().map(|j| self.run_guarded(j)).collect(),
            Err(_) => self.bisect(jobs),
        }
    }

    /// A failed batch, run again as two halves, so only the job at fault fails.
    fn bisect(&mut self, jobs: &[&[Tensor]]) -> Vec<JobOutputs> {
        let (a, b) = jobs.split_at(jobs.len() / 2);
        let mut out = self.run_jobs(a);
        out.extend(self.run_jobs(b));
        out
    }

    /// [`ModelSession::run_rows`] with a panic turned into an error. Unwinding out of
    /// our own code leaves the ORT session as it was (a run either returned or never
    /// started), so the session stays usable.
    fn run_guarded(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, RuntimeError> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run_rows(inputs)))
            .unwrap_or_else(|panic| {
                Err(RuntimeError::Panicked {
                    model: self.label.clone(),
                    message: panic_message(panic.as_ref()),
                })
            })
    }

    /// Runs tensors sharing a batch dimension. A model with a fixed batch size runs
    /// them that many rows at a time, the last chunk padded with zeros and trimmed;
    /// rows beyond `max_rows` run in chunks of `max_rows`.
    fn run_rows(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, RuntimeError> {
        let rows = inputs.first().map_or(0, Tensor::rows);
        let (fixed, pad) = match (self.signature.fixed_batch(), self.max_rows) {
            (Some(f), _) if f != rows => (f, true),
            (None, Some(m)) if rows > m => (m, false),
            _ => return self.run_once(inputs),
        };
        let mut chunks = Vec::new();
        let mut start = 0;
        while start < rows {
            let take = fixed.min(rows - start);
            let chunk: Vec<Tensor> = inputs
                .iter()
                .map(|t| {
                    if t.shape.is_empty() {
                        // A scalar input has no batch dimension: every chunk gets it whole.
                        return t.clone();
                    }
                    let w = t.row_len();
                    let mut data = t.data.slice(start * w..(start + take) * w);
                    let padding = if pad { fixed - take } else { 0 };
                    let zeros = TensorData::zeros(data.datatype(), padding * w);
                    data.extend_from(&zeros, 0..padding * w);
                    let mut shape = t.shape.clone();
                    shape[0] = take + padding;
                    Tensor {
                        name: t.name.clone(),
                        shape,
                        data,
                    }
                })
                .collect();
            let out = self.run_once(&chunk)?;
            chunks.push(
                out.into_iter()
                    .map(|t| take_rows(t, take))
                    .collect::<Vec<_>>(),
            );
            start += take;
        }
        let pieces: Vec<&[Tensor]> = chunks.iter().map(Vec::as_slice).collect();
        Ok(concat(&pieces))
    }

    fn run_once(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, RuntimeError> {
        super::faults::check_run(&self.label, inputs);
        let run_err = |message: String| RuntimeError::Run {
            model: self.label.clone(),
            message,
        };
        let mut values: Vec<(Cow<'_, str>, SessionInputValue<'_>)> =
            Vec::with_capacity(inputs.len());
        for t in inputs {
            let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
            let value: SessionInputValue<'_> = with_data!(&t.data, v => TensorRef::from_array_view((shape, v.as_slice()))
                .map_err(|e| run_err(format!("input `{}`: {e}", t.name)))?
                .into());
            values.push((Cow::Borrowed(t.name.as_str()), value));
        }
        let label = self.label.clone();
        let outputs = self.session.run(values).map_err(|e| RuntimeError::Run {
            model: label.clone(),
            message: e.to_string(),
        })?;
        let mut result = Vec::with_capacity(self.signature.outputs.len());
        for (name, value) in outputs.iter() {
            result.push(extract(name, &value).map_err(|m| RuntimeError::Run {
                model: label.clone(),
                message: m,
            })?);
        }
        Ok(result)
    }
}

fn spec(name: &str, dtype: &ValueType) -> TensorSpec {
    match dtype {
        ValueType::Tensor {
            ty,
            shape,
            dimension_symbols,
        } => TensorSpec {
            name: name.to_owned(),
            datatype: oip_type(*ty).map_or_else(
                || format!("{ty:?}").to_uppercase(),
                |d| d.as_str().to_owned(),
            ),
            shape: shape.iter().copied().collect(),
            symbols: if dimension_symbols.iter().all(String::is_empty) {
                Vec::new()
            } else {
                dimension_symbols.iter().cloned().collect()
            },
        },
        other => TensorSpec {
            name: name.to_owned(),
            datatype: format!("{other:?}").to_uppercase(),
            shape: Vec::new(),
            symbols: Vec::new(),
        },
    }
}

fn oip_type(ty: TensorElementType) -> Option<DataType> {
    Some(match ty {
        TensorElementType::Bool => DataType::Bool,
        TensorElementType::Int32 => DataType::Int32,
        TensorElementType::Int64 => DataType::Int64,
        TensorElementType::Float32 => DataType::Fp32,
        TensorElementType::Float64 => DataType::Fp64,
        _ => return None,
    })
}

fn extract(name: &str, value: &DynValue) -> Result<Tensor, String> {
    let ty = match value.dtype() {
        ValueType::Tensor { ty, .. } => oip_type(*ty),
        _ => None,
    }
    .ok_or_else(|| {
        format!(
            "output `{name}` has type {:?}, which inferq cannot return",
            value.dtype()
        )
    })?;
    let err = |e: ort::Error| format!("output `{name}`: {e}");
    macro_rules! grab {
        ($t:ty, $variant:ident) => {{
            let (shape, data) = value.try_extract_tensor::<$t>().map_err(err)?;
            (
                shape.iter().map(|&d| d as usize).collect::<Vec<_>>(),
                TensorData::$variant(data.to_vec()),
            )
        }};
    }
    let (shape, data) = match ty {
        DataType::Bool => grab!(bool, Bool),
        DataType::Int32 => grab!(i32, Int32),
        DataType::Int64 => grab!(i64, Int64),
        DataType::Fp32 => grab!(f32, Fp32),
        DataType::Fp64 => grab!(f64, Fp64),
    };
    Ok(Tensor {
        name: name.to_owned(),
        shape,
        data,
    })
}

/// The message of a caught panic (`&str` or `String` payloads; others unnamed).
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// Whether two jobs' inputs can be stacked along the batch dimension in one ORT call:
/// the same inputs in the same order and types, each of rank 1 or more, agreeing on
/// every dimension but the first. Anything else would reinterpret one job's numbers
/// with another's shape.
pub fn stackable(a: &[Tensor], b: &[Tensor]) -> bool {
    stackable_but(a, b, |_, _| false)
}

/// [`stackable`], except that dimensions `free(input, axis)` says may differ do.
pub(crate) fn stackable_but(
    a: &[Tensor],
    b: &[Tensor],
    free: impl Fn(&str, usize) -> bool,
) -> bool {
    !a.is_empty()
        && a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.name == y.name
                && x.data.datatype() == y.data.datatype()
                && x.shape.len() == y.shape.len()
                && !x.shape.is_empty()
                && x.shape
                    .iter()
                    .zip(&y.shape)
                    .enumerate()
                    .skip(1)
                    .all(|(axis, (dx, dy))| dx == dy || free(&x.name, axis))
        })
}

/// Stacks several jobs' tensors (same names, same order) along the batch dimension.
fn concat(jobs: &[&[Tensor]]) -> Vec<Tensor> {
    let Some(first) = jobs.first() else {
        return Vec::new();
    };
    (0..first.len())
        .map(|i| {
            let rows: usize = jobs.iter().map(|j| j[i].rows()).sum();
            let mut data =
                TensorData::with_capacity(first[i].data.datatype(), rows * first[i].row_len());
            for j in jobs {
                data.extend_from(&j[i].data, 0..j[i].data.len());
            }
            let mut shape = first[i].shape.clone();
            if let Some(d) = shape.first_mut() {
                *d = rows;
            }
            Tensor {
                name: first[i].name.clone(),
                shape,
                data,
            }
        })
        .collect()
}

/// Splits batch outputs back to jobs by their row counts; `None` when an output has
/// no batch dimension matching the total.
fn split(outputs: Vec<Tensor>, jobs: &[&[Tensor]]) -> Option<Vec<Vec<Tensor>>> {
    let rows: Vec<usize> = jobs.iter().map(|j| j[0].rows()).collect();
    let total: usize = rows.iter().sum();
    if outputs.iter().any(|o| o.shape.first() != Some(&total)) {
        return None;
    }
    let mut per_job: Vec<Vec<Tensor>> = rows
        .iter()
        .map(|_| Vec::with_capacity(outputs.len()))
        .collect();
    for o in outputs {
        let w = o.row_len();
        let mut start = 0;
        for (job, &r) in per_job.iter_mut().zip(&rows) {
            let mut shape = o.shape.clone();
            shape[0] = r;
            job.push(Tensor {
                name: o.name.clone(),
                shape,
                data: o.data.slice(start * w..(start + r) * w),
            });
            start += r;
        }
    }
    Some(per_job)
}

/// Keeps the first `rows` rows of an output (drops fixed-batch padding).
fn take_rows(mut t: Tensor, rows: usize) -> Tensor {
    if t.shape.first().is_some_and(|&d| d > rows) {
        let w = t.row_len();
        t.data = t.data.slice(0..rows * w);
        t.shape[0] = rows;
    }
    t
}
