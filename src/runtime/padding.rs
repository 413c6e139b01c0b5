//! Padding a model version declares, so jobs of different lengths can share a batch:
//! which input axes may be padded (and with what), and which output axes follow the
//! padded length and are cut back to each job's own. Without a declaration, jobs of
//! different shapes never share a batch.
//!
//! A declaration is checked against the model's signature when a version is added and
//! again when a worker loads it: only dynamic axes past the batch axis, pad values the
//! input's type can hold, and every output axis that carries a padded dimension
//! (by ONNX's dimension name) declared, so no output ever returns padding.

use serde::{Deserialize, Serialize};

use super::{Signature, TensorSpec};
use crate::protocol::{DataType, Tensor};

/// The padding of one model version (`padding` in its manifest).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Padding {
    /// Input axes that may be padded.
    pub inputs: Vec<PadInput>,
    /// Output axes that follow a padded length; outputs not named follow none (pooled
    /// outputs, scores).
    #[serde(default)]
    pub outputs: Vec<PadOutput>,
}

/// One paddable input axis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PadInput {
    /// Input name.
    pub name: String,
    /// Axis (1 or more: axis 0 is the batch).
    pub axis: usize,
    /// The pad value (an attention mask's 0, a tokenizer's pad id).
    #[serde(default)]
    pub value: f64,
}

/// One output axis whose size is a padded length, cut back per job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PadOutput {
    /// Output name.
    pub name: String,
    /// The output's axis.
    pub axis: usize,
    /// The padded input axis whose length it has (default: the same number).
    pub follows: usize,
}

impl Padding {
    /// The padded axes, ascending and distinct: a job's lengths come in this order.
    pub fn axes(&self) -> Vec<usize> {
        let mut axes: Vec<usize> = self.inputs.iter().map(|p| p.axis).collect();
        axes.sort_unstable();
        axes.dedup();
        axes
    }

    /// Checks the declaration against the model; the message names the input or
    /// output and the axis.
    pub fn validate(&self, sig: &Signature) -> Result<(), String> {
        if self.inputs.is_empty() {
            return Err("padding names no input".into());
        }
        for (i, p) in self.inputs.iter().enumerate() {
            let what = format!("padded input `{}` axis {}", p.name, p.axis);
            let spec = find(&sig.inputs, &p.name, "input")?;
            dynamic_axis(spec, p.axis, &what)?;
            let dt = DataType::parse(&spec.datatype)
                .ok_or_else(|| format!("{what}: type {} cannot be fed", spec.datatype))?;
            if !holds(dt, p.value) {
                return Err(format!("{what}: pad value {} is not a {dt}", p.value));
            }
            if self.inputs[..i]
                .iter()
                .any(|q| q.name == p.name && q.axis == p.axis)
            {
                return Err(format!("{what} is declared twice"));
            }
        }
        let axes = self.axes();
        for (i, o) in self.outputs.iter().enumerate() {
            let what = format!("padded output `{}` axis {}", o.name, o.axis);
            let spec = find(&sig.outputs, &o.name, "output")?;
            dynamic_axis(spec, o.axis, &what)?;
            if !axes.contains(&o.follows) {
                return Err(format!(
                    "{what} follows axis {}, which no padded input has (padded axes: {axes:?})",
                    o.follows
                ));
            }
            if self.outputs[..i].iter().any(|q| q.name == o.name) {
                return Err(format!("padded output `{}` is declared twice", o.name));
            }
        }
        // An output axis named like a padded input axis would return padding unless
        // it is declared: refuse rather than answer wrongly.
        for p in &self.inputs {
            let Some(symbol) = find(&sig.inputs, &p.name, "input")?
                .symbols
                .get(p.axis)
                .filter(|s| !s.is_empty())
            else {
                continue;
            };
            for out in &sig.outputs {
                for (axis, s) in out.symbols.iter().enumerate().skip(1) {
                    let declared = self
                        .outputs
                        .iter()
                        .any(|o| o.name == out.name && o.axis == axis);
                    if s == symbol && !declared {
                        return Err(format!(
                            "output `{}` axis {axis} has the padded dimension `{symbol}` of input `{}` axis {}: declare it (--pad-output {}:{axis}) so it is cut back per job",
                            out.name, p.name, p.axis, out.name
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// A job's length on each padded axis ([`Padding::axes`] order). Every padded
    /// input of one axis must agree (they are padded together: `input_ids` and
    /// `attention_mask`). Inputs are validated first, so ranks are right.
    pub fn lengths(&self, inputs: &[Tensor]) -> Result<Vec<usize>, String> {
        self.axes()
            .into_iter()
            .map(|axis| {
                let mut seen: Option<(&str, usize)> = None;
                for p in self.inputs.iter().filter(|p| p.axis == axis) {
                    let Some(t) = inputs.iter().find(|t| t.name == p.name) else {
                        continue;
                    };
                    let len = t.shape.get(axis).copied().unwrap_or(0);
                    match seen {
                        Some((other, l)) if l != len => {
                            return Err(format!(
                                "inputs `{other}` and `{}` differ on padded axis {axis} ({l} and {len}); they are padded together, so they must agree",
                                p.name
                            ));
                        }
                        _ => seen = Some((&p.name, len)),
                    }
                }
                Ok(seen.map_or(1, |(_, l)| l))
            })
            .collect()
    }

    /// Whether two jobs' inputs can be stacked once padded: like
    /// [`super::stackable`], but padded axes may differ.
    pub fn stackable(&self, a: &[Tensor], b: &[Tensor]) -> bool {
        super::session::stackable_but(a, b, |input, axis| self.pads(input, axis))
    }

    fn pads(&self, input: &str, axis: usize) -> bool {
        self.inputs
            .iter()
            .any(|p| p.name == input && p.axis == axis)
    }

    /// A job's inputs padded to `target` lengths ([`Padding::axes`] order).
    pub fn pad(&self, inputs: &[Tensor], target: &[usize]) -> Vec<Tensor> {
        let axes = self.axes();
        inputs
            .iter()
            .map(|t| {
                let mut t = t.clone();
                let name = t.name.clone();
                for p in self.inputs.iter().filter(|p| p.name == name) {
                    if let Some(&to) = axes
                        .iter()
                        .position(|&a| a == p.axis)
                        .and_then(|i| target.get(i))
                    {
                        t = t.pad_axis(p.axis, to, p.value);
                    }
                }
                t
            })
            .collect()
    }

    /// One job's share of the batch outputs cut back to its own `lengths` on every
    /// declared output axis; an error when the model's output does not have the
    /// padded length there (the declaration does not fit the model).
    pub fn cut(
        &self,
        outputs: Vec<Tensor>,
        lengths: &[usize],
        target: &[usize],
    ) -> Result<Vec<Tensor>, String> {
        let axes = self.axes();
        outputs
            .into_iter()
            .map(|mut t| {
                let name = t.name.clone();
                for o in self.outputs.iter().filter(|o| o.name == name) {
                    let Some(i) = axes.iter().position(|&a| a == o.follows) else {
                        continue;
                    };
                    let (own, padded) = (lengths[i], target[i]);
                    if t.shape.get(o.axis) != Some(&padded) {
                        return Err(format!(
                            "output `{}` axis {} is {:?} where the padded length is {padded}: the padding declaration does not fit the model",
                            t.name,
                            o.axis,
                            t.shape.get(o.axis)
                        ));
                    }
                    t = t.narrow_axis(o.axis, own);
                }
                Ok(t)
            })
            .collect()
    }
}

/// Input elements of a batch of jobs (each job's inputs, in signature order): as the
/// jobs carry them, and as ORT runs them once padded to the longest member.
pub fn batch_elements(padding: Option<&Padding>, jobs: &[&[Tensor]]) -> (usize, usize) {
    let real: usize = jobs
        .iter()
        .flat_map(|j| j.iter())
        .map(|t| t.data.len())
        .sum();
    let (Some(p), [first, ..]) = (padding, jobs) else {
        return (real, real);
    };
    let axes = p.axes();
    let mut target = p.lengths(first).unwrap_or_default();
    for j in &jobs[1..] {
        for (t, l) in target.iter_mut().zip(p.lengths(j).unwrap_or_default()) {
            *t = (*t).max(l);
        }
    }
    let padded = jobs
        .iter()
        .flat_map(|j| j.iter())
        .map(|t| {
            p.inputs
                .iter()
                .filter(|d| d.name == t.name)
                .fold(t.data.len(), |n, d| {
                    let have = t.shape.get(d.axis).copied().unwrap_or(1).max(1);
                    let to = axes
                        .iter()
                        .position(|&a| a == d.axis)
                        .and_then(|i| target.get(i))
                        .copied()
                        .unwrap_or(have);
                    n / have * to
                })
        })
        .sum();
    (real, padded)
}

fn find<'a>(specs: &'a [TensorSpec], name: &str, what: &str) -> Result<&'a TensorSpec, String> {
    specs.iter().find(|s| s.name == name).ok_or_else(|| {
        let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        format!(
            "padding names {what} `{name}`, which the model does not have (its {what}s: {names:?})"
        )
    })
}

fn dynamic_axis(spec: &TensorSpec, axis: usize, what: &str) -> Result<(), String> {
    if axis == 0 {
        return Err(format!(
            "{what}: axis 0 is the batch axis, which is never padded"
        ));
    }
    match spec.shape.get(axis) {
        None => Err(format!(
            "{what}: the tensor has rank {}, so no axis {axis}",
            spec.shape.len()
        )),
        Some(&d) if d >= 0 => Err(format!(
            "{what} is fixed ({d}) in the model; only a dynamic axis can be padded"
        )),
        Some(_) => Ok(()),
    }
}

/// Whether `value` is exactly representable in `dt`.
fn holds(dt: DataType, value: f64) -> bool {
    match dt {
        DataType::Bool => value == 0.0 || value == 1.0,
        DataType::Int32 => {
            value.fract() == 0.0 && (f64::from(i32::MIN)..=f64::from(i32::MAX)).contains(&value)
        }
        DataType::Int64 => value.fract() == 0.0 && value.abs() < 9.0e15,
        DataType::Fp32 => value.is_finite() && f64::from(value as f32) == value,
        DataType::Fp64 => value.is_finite(),
    }
}
