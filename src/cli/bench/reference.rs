//! A model's `*.reference.json` (written by scripts/make_models.py): the rows a run
//! cycles through as inputs, and the outputs each job must come back with. Ints must
//! match exactly; floats within 1e-5, relative above 1 (ORT's float results move a
//! little with the batch size).

use std::path::Path;

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::protocol::{Tensor, TensorData, binary};

/// Reference inputs and outputs, all rows.
#[derive(Debug, Clone)]
pub(super) struct Reference {
    /// One tensor per model input.
    pub inputs: Vec<Tensor>,
    /// One tensor per model output (may be empty: then nothing is checked).
    pub outputs: Vec<Tensor>,
}

/// What one job carries and must get back, precomputed so the send loop only copies.
#[derive(Debug, Clone)]
pub(super) struct JobData {
    /// The `bin` encoding of the inputs.
    pub bin: Vec<u8>,
    /// The OIP v2 JSON request of the inputs.
    pub json: Vec<u8>,
    /// The expected outputs of these rows.
    pub expected: Vec<Tensor>,
}

impl Reference {
    /// Reads a reference file.
    pub(super) fn load(path: &Path) -> anyhow::Result<Reference> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the reference {}", path.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        let tensors = |key: &str| -> anyhow::Result<Vec<Tensor>> {
            v.get(key)
                .and_then(serde_json::Value::as_array)
                .map(|a| a.iter().map(json_tensor).collect())
                .unwrap_or_else(|| Ok(Vec::new()))
                .with_context(|| format!("{}: `{key}`", path.display()))
        };
        let r = Reference {
            inputs: tensors("inputs")?,
            outputs: tensors("outputs")?,
        };
        if r.inputs.is_empty() || r.rows() == 0 {
            bail!("{}: no input rows", path.display());
        }
        if r.inputs
            .iter()
            .chain(&r.outputs)
            .any(|t| t.rows() != r.rows())
        {
            bail!("{}: inputs and outputs differ in rows", path.display());
        }
        Ok(r)
    }

    /// Rows in the reference.
    pub(super) fn rows(&self) -> usize {
        self.inputs.first().map_or(0, Tensor::rows)
    }

    /// Inputs (and expected outputs) of `n` rows from row `start` on, wrapping around.
    pub(super) fn job(&self, start: usize, n: usize) -> anyhow::Result<JobData> {
        let inputs: Vec<Tensor> = self.inputs.iter().map(|t| cycled(t, start, n)).collect();
        Ok(JobData {
            bin: binary::encode(&inputs).map_err(|e| anyhow::anyhow!("{e}"))?,
            json: crate::protocol::oip::encode_request(&inputs),
            expected: self.outputs.iter().map(|t| cycled(t, start, n)).collect(),
        })
    }

    /// One [`JobData`] per start row: job `k` uses entry `k * n % rows`.
    pub(super) fn jobs(&self, n: usize) -> anyhow::Result<Vec<JobData>> {
        (0..self.rows()).map(|s| self.job(s, n)).collect()
    }
}

/// The job data of job `seq` when each job takes `rows_per_job` rows: its start row
/// (the index into `jobs`, one entry per reference row) and the data.
pub(super) fn pick(jobs: &[JobData], seq: u64, rows_per_job: usize) -> (usize, &JobData) {
    let at = (seq as usize).wrapping_mul(rows_per_job) % jobs.len();
    (at, &jobs[at])
}

/// `n` rows of `t` from row `start` on, wrapping around its rows.
pub(super) fn cycled(t: &Tensor, start: usize, n: usize) -> Tensor {
    let (w, total) = (t.row_len(), t.rows().max(1));
    let mut data = TensorData::with_capacity(t.data.datatype(), n * w);
    for i in 0..n {
        let r = (start + i) % total;
        data.extend_from(&t.data, r * w..(r + 1) * w);
    }
    let mut shape = t.shape.clone();
    if let Some(d) = shape.first_mut() {
        *d = n;
    }
    Tensor {
        name: t.name.clone(),
        shape,
        data,
    }
}

fn json_tensor(v: &serde_json::Value) -> anyhow::Result<Tensor> {
    let data = v["data"].as_array().context("no `data` array")?;
    let f = |x: &serde_json::Value| x.as_f64().context("a number");
    let i = |x: &serde_json::Value| x.as_i64().context("an integer");
    let data = match v["datatype"].as_str().context("no `datatype`")? {
        "FP32" => TensorData::Fp32(
            data.iter()
                .map(|x| f(x).map(|x| x as f32))
                .collect::<anyhow::Result<_>>()?,
        ),
        "FP64" => TensorData::Fp64(data.iter().map(f).collect::<anyhow::Result<_>>()?),
        "INT64" => TensorData::Int64(data.iter().map(i).collect::<anyhow::Result<_>>()?),
        "INT32" => TensorData::Int32(
            data.iter()
                .map(|x| i(x).map(|x| x as i32))
                .collect::<anyhow::Result<_>>()?,
        ),
        "BOOL" => TensorData::Bool(
            data.iter()
                .map(|x| x.as_bool().context("a boolean"))
                .collect::<anyhow::Result<_>>()?,
        ),
        other => bail!("datatype {other} is not supported"),
    };
    let shape = v["shape"]
        .as_array()
        .context("no `shape`")?
        .iter()
        .map(|d| d.as_u64().map(|d| d as usize).context("a dimension"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if shape.iter().product::<usize>() != data.len() {
        bail!("shape {shape:?} does not match {} elements", data.len());
    }
    Ok(Tensor {
        name: v["name"].as_str().context("no `name`")?.to_owned(),
        shape,
        data,
    })
}

/// An OIP v2 response as far as checking needs it.
#[derive(Deserialize)]
struct Response {
    outputs: Vec<Output>,
}

#[derive(Deserialize)]
struct Output {
    name: String,
    shape: Vec<usize>,
    data: Vec<serde_json::Number>,
}

/// True when two floats agree (absolute 1e-5, relative above magnitude 1).
pub(super) fn close(actual: f64, expected: f64) -> bool {
    (actual - expected).abs() <= 1e-5 * expected.abs().max(1.0)
}

/// Checks an OIP v2 response (JSON) against the expected outputs; `Err` says what
/// differs. Outputs the response lacks are a mismatch; extra ones are ignored.
pub(super) fn check(response: &[u8], expected: &[Tensor]) -> Result<(), String> {
    if expected.is_empty() {
        return Ok(());
    }
    let r: Response =
        serde_json::from_slice(response).map_err(|e| format!("not an OIP response: {e}"))?;
    for e in expected {
        let a = r
            .outputs
            .iter()
            .find(|o| o.name == e.name)
            .ok_or_else(|| format!("output `{}` missing", e.name))?;
        if a.shape != e.shape || a.data.len() != e.data.len() {
            return Err(format!(
                "output `{}`: shape {:?}, expected {:?}",
                e.name, a.shape, e.shape
            ));
        }
        let bad = |k: usize| format!("output `{}`: element {k} is {}", e.name, a.data[k]);
        match &e.data {
            TensorData::Fp32(x) => {
                for (k, (n, &want)) in a.data.iter().zip(x).enumerate() {
                    if !n.as_f64().is_some_and(|v| close(v, f64::from(want))) {
                        return Err(bad(k));
                    }
                }
            }
            TensorData::Fp64(x) => {
                for (k, (n, &want)) in a.data.iter().zip(x).enumerate() {
                    if !n.as_f64().is_some_and(|v| close(v, want)) {
                        return Err(bad(k));
                    }
                }
            }
            TensorData::Int64(x) => {
                for (k, (n, &want)) in a.data.iter().zip(x).enumerate() {
                    if n.as_i64() != Some(want) {
                        return Err(bad(k));
                    }
                }
            }
            TensorData::Int32(x) => {
                for (k, (n, &want)) in a.data.iter().zip(x).enumerate() {
                    if n.as_i64() != Some(i64::from(want)) {
                        return Err(bad(k));
                    }
                }
            }
            TensorData::Bool(_) => {
                // serde_json::Number cannot hold booleans: such outputs are not checked.
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference() -> Reference {
        Reference {
            inputs: vec![Tensor {
                name: "input".into(),
                shape: vec![3, 2],
                data: TensorData::Fp32(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
            }],
            outputs: vec![
                Tensor {
                    name: "label".into(),
                    shape: vec![3],
                    data: TensorData::Int64(vec![0, 1, 2]),
                },
                Tensor {
                    name: "probabilities".into(),
                    shape: vec![3, 2],
                    data: TensorData::Fp32(vec![0.25, 0.75, 0.5, 0.5, 150.0, 0.0]),
                },
            ],
        }
    }

    #[test]
    fn jobs_cycle_the_rows() {
        let r = reference();
        let j = r.job(2, 2).unwrap();
        assert_eq!(j.expected[0].data, TensorData::Int64(vec![2, 0]));
        assert_eq!(j.expected[1].shape, vec![2, 2]);
        let decoded = binary::decode(&j.bin, 100).unwrap();
        assert_eq!(decoded[0].data, TensorData::Fp32(vec![5.0, 6.0, 1.0, 2.0]));
        let req = crate::protocol::oip::decode_request(&j.json, None).unwrap();
        assert_eq!(req.inputs, decoded);
        assert_eq!(r.jobs(1).unwrap().len(), 3);
    }

    #[test]
    fn outputs_are_compared_with_tolerance() {
        let j = reference().job(1, 2).unwrap();
        let ok = br#"{"model_name":"m","outputs":[
            {"name":"label","datatype":"INT64","shape":[2],"data":[1,2]},
            {"name":"probabilities","datatype":"FP32","shape":[2,2],"data":[0.500001,0.5,150.0009,0]}]}"#;
        assert_eq!(check(ok, &j.expected), Ok(()));
        let wrong_int = br#"{"outputs":[
            {"name":"label","shape":[2],"data":[1,1]},
            {"name":"probabilities","shape":[2,2],"data":[0.5,0.5,150,0]}]}"#;
        assert!(
            check(wrong_int, &j.expected)
                .unwrap_err()
                .contains("`label`: element 1")
        );
        let far = br#"{"outputs":[
            {"name":"label","shape":[2],"data":[1,2]},
            {"name":"probabilities","shape":[2,2],"data":[0.50002,0.5,150,0]}]}"#;
        assert!(check(far, &j.expected).unwrap_err().contains("element 0"));
        let missing = br#"{"outputs":[{"name":"label","shape":[2],"data":[1,2]}]}"#;
        assert!(check(missing, &j.expected).unwrap_err().contains("missing"));
        let shape = br#"{"outputs":[{"name":"label","shape":[1],"data":[1]}]}"#;
        assert!(check(shape, &j.expected).unwrap_err().contains("shape"));
        assert!(check(b"{", &j.expected).is_err());
        assert_eq!(check(b"anything", &[]), Ok(()));
        assert!(close(1.0, 1.0 + 1e-6) && !close(1.0, 1.0 + 1e-4));
        assert!(close(1000.0, 1000.009) && !close(1000.0, 1000.02));
    }
}
