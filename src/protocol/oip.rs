//! Open Inference Protocol v2 request and response bodies, plus the tutorial's
//! `{"features": …}` shorthand.
//!
//! Tensor data is decoded straight into typed vectors (no `serde_json::Value`
//! per element): the hot path of every JSON job.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::tensor::{DataType, Tensor, TensorData};

/// Why a body could not be decoded; the message names the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub String);

/// A decoded inference request: inputs in the order the client sent them.
#[derive(Debug, Clone, PartialEq)]
pub struct InferRequest {
    /// The client's request id (OIP `id`), echoed in the response.
    pub id: Option<String>,
    /// Decoded input tensors, not yet checked against any model.
    pub inputs: Vec<Tensor>,
    /// Output names the client asked for; empty means all.
    pub outputs: Vec<String>,
    /// Job option for the HTTP front door: unix ms after which not to compute.
    pub deadline_ms: Option<u64>,
    /// Job option for the HTTP front door: a reply list to push the record to.
    pub reply_to: Option<String>,
}

#[derive(Deserialize)]
struct RawRequest<'a> {
    #[serde(default)]
    id: Option<String>,
    #[serde(default, borrow)]
    inputs: Option<Vec<RawInput<'a>>>,
    #[serde(default, borrow)]
    features: Option<&'a RawValue>,
    #[serde(default)]
    outputs: Option<Vec<RawOutput>>,
    #[serde(default)]
    deadline_ms: Option<u64>,
    #[serde(default)]
    reply_to: Option<String>,
}

#[derive(Deserialize)]
struct RawInput<'a> {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(borrow)]
    data: &'a RawValue,
}

#[derive(Deserialize)]
struct RawOutput {
    name: String,
}

/// Decodes an OIP v2 inference request. `single_input` names the model's only
/// input and its type, so the `{"features": [[…], …]}` shorthand (or one flat row)
/// can map onto it; `None` when the model has several inputs.
pub fn decode_request(
    body: &[u8],
    single_input: Option<(&str, DataType)>,
) -> Result<InferRequest, DecodeError> {
    let raw: RawRequest<'_> = serde_json::from_slice(body)
        .map_err(|e| DecodeError(format!("malformed JSON body: {e}")))?;
    let outputs = raw
        .outputs
        .unwrap_or_default()
        .into_iter()
        .map(|o| o.name)
        .collect();
    let inputs = match (raw.inputs, raw.features) {
        (Some(inputs), None) => inputs
            .into_iter()
            .map(decode_input)
            .collect::<Result<Vec<_>, _>>()?,
        (None, Some(features)) => {
            let (name, datatype) = single_input.ok_or_else(|| {
                DecodeError(
                    "the `features` shorthand needs a model with exactly one input; send `inputs`"
                        .into(),
                )
            })?;
            vec![decode_features(features, name, datatype)?]
        }
        (Some(_), Some(_)) => {
            return Err(DecodeError(
                "send either `inputs` or `features`, not both".into(),
            ));
        }
        (None, None) => {
            return Err(DecodeError(
                "the body has no `inputs` (OIP v2) nor `features`".into(),
            ));
        }
    };
    Ok(InferRequest {
        id: raw.id,
        inputs,
        outputs,
        deadline_ms: raw.deadline_ms,
        reply_to: raw.reply_to,
    })
}

fn decode_input(raw: RawInput<'_>) -> Result<Tensor, DecodeError> {
    let datatype = DataType::parse(&raw.datatype).ok_or_else(|| {
        DecodeError(format!(
            "input `{}`: unsupported datatype `{}` (expected one of BOOL, INT32, INT64, FP32, FP64)",
            raw.name, raw.datatype
        ))
    })?;
    let mut shape = Vec::with_capacity(raw.shape.len());
    for &d in &raw.shape {
        let d = usize::try_from(d).map_err(|_| {
            DecodeError(format!(
                "input `{}`: negative dimension {d} in shape {:?}",
                raw.name, raw.shape
            ))
        })?;
        shape.push(d);
    }
    let (data, _) = decode_data(raw.data, datatype)
        .map_err(|e| DecodeError(format!("input `{}`: {e}", raw.name)))?;
    Ok(Tensor {
        name: raw.name,
        shape,
        data,
    })
}

fn decode_features(raw: &RawValue, name: &str, datatype: DataType) -> Result<Tensor, DecodeError> {
    let (data, dims) =
        decode_data(raw, datatype).map_err(|e| DecodeError(format!("`features`: {e}")))?;
    let shape = match dims.as_slice() {
        [cols] => vec![1, *cols],
        [_, _] => dims,
        _ => {
            return Err(DecodeError(format!(
                "`features` must be one row or a list of rows, got {} levels of nesting",
                dims.len()
            )));
        }
    };
    Ok(Tensor {
        name: name.to_owned(),
        shape,
        data,
    })
}

/// Decodes (possibly nested) JSON arrays into a flat typed vector; also returns
/// the dimensions the nesting implies, checked to be rectangular.
fn decode_data(raw: &RawValue, datatype: DataType) -> Result<(TensorData, Vec<usize>), String> {
    let mut de = serde_json::Deserializer::from_str(raw.get());
    let mut flat = Flat {
        data: TensorData::with_capacity(datatype, 0),
        dims: Vec::new(),
        seen: Vec::new(),
        depth: 0,
    };
    (&mut flat)
        .deserialize(&mut de)
        .map_err(|e| format!("{e}"))?;
    Ok((flat.data, flat.dims))
}

/// Flattening state: `dims[d]` is the length first seen at nesting depth `d`.
struct Flat {
    data: TensorData,
    dims: Vec<usize>,
    seen: Vec<bool>,
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for &mut Flat {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl Flat {
    fn push_f64<E: de::Error>(&mut self, v: f64) -> Result<(), E> {
        match &mut self.data {
            TensorData::Fp32(x) => x.push(v as f32),
            TensorData::Fp64(x) => x.push(v),
            TensorData::Int32(_) | TensorData::Int64(_) => {
                return Err(E::custom(format!("expected an integer, found {v}")));
            }
            TensorData::Bool(_) => {
                return Err(E::custom(format!("expected true or false, found {v}")));
            }
        }
        Ok(())
    }

    fn push_i64<E: de::Error>(&mut self, v: i64) -> Result<(), E> {
        match &mut self.data {
            TensorData::Fp32(x) => x.push(v as f32),
            TensorData::Fp64(x) => x.push(v as f64),
            TensorData::Int64(x) => x.push(v),
            TensorData::Int32(x) => {
                x.push(i32::try_from(v).map_err(|_| E::custom(format!("{v} does not fit INT32")))?)
            }
            TensorData::Bool(_) => {
                return Err(E::custom(format!("expected true or false, found {v}")));
            }
        }
        Ok(())
    }
}

impl<'de> Visitor<'de> for &mut Flat {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "an array of {} values", self.data.datatype())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let depth = self.depth;
        if self.dims.len() <= depth {
            self.dims.push(0);
            self.seen.push(false);
        }
        self.depth += 1;
        let mut n = 0usize;
        while seq.next_element_seed(&mut *self)?.is_some() {
            n += 1;
        }
        self.depth -= 1;
        if self.seen[depth] {
            if self.dims[depth] != n {
                return Err(de::Error::custom(format!(
                    "ragged nesting: rows of length {} and {n}",
                    self.dims[depth]
                )));
            }
        } else {
            self.dims[depth] = n;
            self.seen[depth] = true;
        }
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.push_f64(v)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.push_i64(v)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        let v = i64::try_from(v).map_err(|_| E::custom(format!("{v} is out of range")))?;
        self.push_i64(v)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        match &mut self.data {
            TensorData::Bool(x) => {
                x.push(v);
                Ok(())
            }
            other => Err(E::custom(format!(
                "expected a {} number, found {v}",
                other.datatype()
            ))),
        }
    }
}

/// Encodes an OIP v2 request with flat data (what `inferq bench` sends). FP32 values
/// are written as the f64 of the same value, which parses back to exactly that f32.
pub fn encode_request(inputs: &[Tensor]) -> Vec<u8> {
    let inputs: Vec<serde_json::Value> = inputs
        .iter()
        .map(|t| {
            let data = match &t.data {
                TensorData::Bool(v) => serde_json::json!(v),
                TensorData::Int32(v) => serde_json::json!(v),
                TensorData::Int64(v) => serde_json::json!(v),
                TensorData::Fp32(v) => serde_json::json!(v.iter().map(|&x| f64::from(x)).collect::<Vec<_>>()),
                TensorData::Fp64(v) => serde_json::json!(v),
            };
            serde_json::json!({ "name": t.name, "shape": t.shape, "datatype": t.data.datatype().as_str(), "data": data })
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({ "inputs": inputs }))
        .expect("JSON values serialize, this is a bug")
}

/// One output tensor of an OIP v2 response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputTensor {
    /// The model output's name.
    pub name: String,
    /// OIP datatype spelling.
    pub datatype: DataType,
    /// Dimensions of this job's slice (batch dimension = the job's rows).
    pub shape: Vec<usize>,
    /// Row-major elements.
    pub data: OutputData,
}

/// Output elements, serialized as a plain JSON array of their type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OutputData {
    /// `BOOL` elements.
    Bool(Vec<bool>),
    /// Integer elements (INT32 and INT64).
    Int(Vec<i64>),
    /// Floating elements; FP32 values are printed shortest-exact as f32.
    Fp32(Vec<f32>),
    /// FP64 elements.
    Fp64(Vec<f64>),
}

impl From<Tensor> for OutputTensor {
    fn from(t: Tensor) -> Self {
        let datatype = t.data.datatype();
        let data = match t.data {
            TensorData::Bool(v) => OutputData::Bool(v),
            TensorData::Int32(v) => OutputData::Int(v.into_iter().map(i64::from).collect()),
            TensorData::Int64(v) => OutputData::Int(v),
            TensorData::Fp32(v) => OutputData::Fp32(v),
            TensorData::Fp64(v) => OutputData::Fp64(v),
        };
        OutputTensor {
            name: t.name,
            datatype,
            shape: t.shape,
            data,
        }
    }
}

/// An OIP v2 inference response: what a job record's `outputs` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferResponse {
    /// The model that computed it.
    pub model_name: String,
    /// The version that computed it (OIP gives versions as strings).
    pub model_version: String,
    /// The job id.
    pub id: String,
    /// One entry per model output (or per requested output).
    pub outputs: Vec<OutputTensor>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_oip_nested_and_flat() {
        let body = br#"{"id":"r1","inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[[1,2.5],[3,4]]}]}"#;
        let req = decode_request(body, None).unwrap();
        assert_eq!(req.id.as_deref(), Some("r1"));
        assert_eq!(req.inputs[0].shape, vec![2, 2]);
        assert_eq!(
            req.inputs[0].data,
            TensorData::Fp32(vec![1.0, 2.5, 3.0, 4.0])
        );
    }

    #[test]
    fn shorthand_maps_to_the_single_input() {
        let req = decode_request(
            br#"{"features":[[1,2],[3,4],[5,6]]}"#,
            Some(("input", DataType::Fp64)),
        )
        .unwrap();
        assert_eq!(req.inputs[0].name, "input");
        assert_eq!(req.inputs[0].shape, vec![3, 2]);
        let one =
            decode_request(br#"{"features":[1,2,3]}"#, Some(("input", DataType::Fp32))).unwrap();
        assert_eq!(one.inputs[0].shape, vec![1, 3]);
        let err = decode_request(
            br#"{"features":[[1,2],[3]]}"#,
            Some(("input", DataType::Fp32)),
        )
        .unwrap_err();
        assert!(err.0.contains("ragged"), "{err}");
    }

    #[test]
    fn type_errors_name_the_input() {
        let body = br#"{"inputs":[{"name":"ids","shape":[1],"datatype":"INT64","data":[1.5]}]}"#;
        let err = decode_request(body, None).unwrap_err();
        assert!(
            err.0.contains("`ids`") && err.0.contains("integer"),
            "{err}"
        );
        let body = br#"{"inputs":[{"name":"x","shape":[1],"datatype":"STRING","data":["a"]}]}"#;
        assert!(
            decode_request(body, None)
                .unwrap_err()
                .0
                .contains("unsupported datatype")
        );
        assert!(
            decode_request(b"{", None)
                .unwrap_err()
                .0
                .contains("malformed JSON")
        );
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        let body =
            format!(r#"{{"inputs":[{{"name":"x","shape":[1],"datatype":"FP32","data":{deep}}}]}}"#);
        assert!(decode_request(body.as_bytes(), None).is_err());
    }
}
