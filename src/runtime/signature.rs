//! A model's input/output signature and the validation of a job's inputs against it.
//! Every job is validated here, in the gateway and again in the worker (producers may
//! write to Redis directly), so one bad job fails alone and never reaches ORT.

use serde::{Deserialize, Serialize};

use crate::protocol::{DataType, Tensor};

/// One input or output as ONNX declares it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    /// The ONNX name.
    pub name: String,
    /// OIP spelling (`FP32` …), or the ONNX type name for types inferq cannot serve.
    pub datatype: String,
    /// Dimensions; `-1` marks a dynamic one (usually the batch dimension).
    pub shape: Vec<i64>,
    /// ONNX's name of each dimension (`batch`, `sequence` …; empty for a fixed or
    /// unnamed one). Two axes of one name have the same size, which is how padding
    /// declarations are checked; empty for manifests written before it was kept.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub symbols: Vec<String>,
}

/// What a model takes and gives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    /// Inputs in the model's order.
    pub inputs: Vec<TensorSpec>,
    /// Outputs in the model's order.
    pub outputs: Vec<TensorSpec>,
}

/// Why a job's inputs do not fit the model; the message names the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidInput {
    /// Wrong name, type, rank, dimension or length.
    #[error("{0}")]
    Invalid(String),
    /// More elements than the per-job cap.
    #[error("{0}")]
    TooLarge(String),
}

/// Inputs that fit the signature, in the signature's order, with their common row count.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidInputs {
    /// One tensor per model input, signature order.
    pub tensors: Vec<Tensor>,
    /// Rows in the batch dimension, the same for every input.
    pub rows: usize,
}

impl Signature {
    /// The only input's name and type, for the `{"features": …}` shorthand.
    pub fn single_input(&self) -> Option<(&str, DataType)> {
        match self.inputs.as_slice() {
            [only] => Some((only.name.as_str(), DataType::parse(&only.datatype)?)),
            _ => None,
        }
    }

    /// The batch size the model insists on, when its first dimension is fixed.
    pub fn fixed_batch(&self) -> Option<usize> {
        let first = self.inputs.first()?.shape.first().copied()?;
        usize::try_from(first).ok().filter(|&n| n > 0)
    }

    /// Checks names, datatypes, rank, fixed dimensions (the batch dimension may be any
    /// positive size: the runtime runs fixed-batch models a batch at a time), element
    /// count against the shape (overflow checked) and the per-job element cap.
    pub fn validate(
        &self,
        mut given: Vec<Tensor>,
        max_elements: usize,
    ) -> Result<ValidInputs, InvalidInput> {
        let bad = |m: String| Err(InvalidInput::Invalid(m));
        let names = || {
            self.inputs
                .iter()
                .map(|s| format!("`{}`", s.name))
                .collect::<Vec<_>>()
                .join(", ")
        };
        for (i, t) in given.iter().enumerate() {
            if !self.inputs.iter().any(|s| s.name == t.name) {
                return bad(format!(
                    "unknown input `{}`; the model's inputs are {}",
                    t.name,
                    names()
                ));
            }
            if given[..i].iter().any(|p| p.name == t.name) {
                return bad(format!("input `{}` is given twice", t.name));
            }
        }
        let mut tensors = Vec::with_capacity(self.inputs.len());
        let mut rows = None;
        for spec in &self.inputs {
            let pos = given
                .iter()
                .position(|t| t.name == spec.name)
                .ok_or_else(|| {
                    InvalidInput::Invalid(format!(
                        "missing input `{}`; the model's inputs are {}",
                        spec.name,
                        names()
                    ))
                })?;
            let t = given.swap_remove(pos);
            let want = DataType::parse(&spec.datatype).ok_or_else(|| {
                InvalidInput::Invalid(format!(
                    "input `{}` has ONNX type {} which inferq cannot feed",
                    spec.name, spec.datatype
                ))
            })?;
            if t.data.datatype() != want {
                return bad(format!(
                    "input `{}`: datatype {}, expected {want}",
                    spec.name,
                    t.data.datatype()
                ));
            }
            if t.shape.len() != spec.shape.len() {
                return bad(format!(
                    "input `{}`: shape {:?} has rank {}, expected rank {} (shape {})",
                    spec.name,
                    t.shape,
                    t.shape.len(),
                    spec.shape.len(),
                    show_shape(&spec.shape)
                ));
            }
            for (axis, (&got, &want)) in t.shape.iter().zip(&spec.shape).enumerate().skip(1) {
                if want >= 0 && got as i64 != want {
                    return bad(format!(
                        "input `{}`: dimension {axis} is {got}, expected {want} (shape {})",
                        spec.name,
                        show_shape(&spec.shape)
                    ));
                }
            }
            let elements = t
                .shape
                .iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| {
                    InvalidInput::TooLarge(format!(
                        "input `{}`: shape {:?} overflows",
                        spec.name, t.shape
                    ))
                })?;
            if elements > max_elements {
                return Err(InvalidInput::TooLarge(format!(
                    "input `{}`: {elements} elements, over the per-job cap of {max_elements}",
                    spec.name
                )));
            }
            if elements != t.data.len() {
                return bad(format!(
                    "input `{}`: shape {:?} needs {elements} elements, data has {}",
                    spec.name,
                    t.shape,
                    t.data.len()
                ));
            }
            if elements == 0 {
                return bad(format!(
                    "input `{}` is empty (shape {:?})",
                    spec.name, t.shape
                ));
            }
            let r = t.rows();
            match rows {
                Some(prev) if prev != r => {
                    return bad(format!(
                        "input `{}` has {r} rows, other inputs have {prev}",
                        spec.name
                    ));
                }
                _ => rows = Some(r),
            }
            tensors.push(t);
        }
        Ok(ValidInputs {
            tensors,
            rows: rows.unwrap_or(0),
        })
    }
}

/// `[-1, 20]` shown as `[?, 20]`.
fn show_shape(shape: &[i64]) -> String {
    let dims: Vec<String> = shape
        .iter()
        .map(|&d| if d < 0 { "?".to_owned() } else { d.to_string() })
        .collect();
    format!("[{}]", dims.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::TensorData;
    use proptest::prelude::*;

    fn sig() -> Signature {
        Signature {
            inputs: vec![TensorSpec {
                name: "input".into(),
                datatype: "FP32".into(),
                shape: vec![-1, 3],
                symbols: vec![],
            }],
            outputs: vec![TensorSpec {
                name: "label".into(),
                datatype: "INT64".into(),
                shape: vec![-1],
                symbols: vec![],
            }],
        }
    }

    fn t(name: &str, shape: Vec<usize>, data: TensorData) -> Tensor {
        Tensor {
            name: name.into(),
            shape,
            data,
        }
    }

    fn msg(r: Result<ValidInputs, InvalidInput>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn accepts_good_rows() {
        let v = sig()
            .validate(
                vec![t("input", vec![2, 3], TensorData::Fp32(vec![0.0; 6]))],
                100,
            )
            .unwrap();
        assert_eq!(v.rows, 2);
    }

    #[test]
    fn every_mistake_names_the_input() {
        let s = sig();
        assert!(
            msg(s.validate(
                vec![t("x", vec![1, 3], TensorData::Fp32(vec![0.0; 3]))],
                100
            ))
            .contains("unknown input `x`")
        );
        assert!(msg(s.validate(vec![], 100)).contains("missing input `input`"));
        assert!(
            msg(s.validate(
                vec![t("input", vec![1, 3], TensorData::Fp64(vec![0.0; 3]))],
                100
            ))
            .contains("datatype FP64, expected FP32")
        );
        assert!(
            msg(s.validate(
                vec![t("input", vec![3], TensorData::Fp32(vec![0.0; 3]))],
                100
            ))
            .contains("rank 1, expected rank 2")
        );
        assert!(
            msg(s.validate(
                vec![t("input", vec![1, 4], TensorData::Fp32(vec![0.0; 4]))],
                100
            ))
            .contains("dimension 1 is 4, expected 3")
        );
        assert!(
            msg(s.validate(
                vec![t("input", vec![2, 3], TensorData::Fp32(vec![0.0; 5]))],
                100
            ))
            .contains("needs 6 elements, data has 5")
        );
        assert!(
            msg(s.validate(vec![t("input", vec![0, 3], TensorData::Fp32(vec![]))], 100))
                .contains("empty")
        );
        let big = s
            .validate(
                vec![t("input", vec![usize::MAX, 3], TensorData::Fp32(vec![]))],
                100,
            )
            .unwrap_err();
        assert!(matches!(big, InvalidInput::TooLarge(_)), "{big}");
        let cap = s
            .validate(
                vec![t("input", vec![40, 3], TensorData::Fp32(vec![0.0; 120]))],
                100,
            )
            .unwrap_err();
        assert!(
            matches!(cap, InvalidInput::TooLarge(ref m) if m.contains("cap of 100")),
            "{cap}"
        );
    }

    proptest! {
        #[test]
        fn validation_never_panics_and_accepts_only_consistent_tensors(
            shape in proptest::collection::vec(0usize..6, 0..4),
            len in 0usize..40,
            huge in any::<bool>(),
        ) {
            let mut shape = shape;
            if huge && !shape.is_empty() { shape[0] = usize::MAX / 2; }
            let input = t("input", shape.clone(), TensorData::Fp32(vec![1.0; len]));
            if let Ok(v) = sig().validate(vec![input], 1000) {
                prop_assert_eq!(shape.len(), 2);
                prop_assert_eq!(shape[1], 3);
                prop_assert_eq!(shape[0] * 3, len);
                prop_assert!(v.rows > 0);
            }
        }
    }
}
