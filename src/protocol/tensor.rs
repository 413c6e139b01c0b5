//! Typed tensors: the one in-memory form every wire encoding decodes into and the
//! runtime reads from, so no layer converts element types twice.

use std::fmt;

/// Element types inferq accepts on the wire, named as the Open Inference Protocol v2 names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum DataType {
    /// One byte per element on the binary wire (0 or 1).
    Bool,
    /// Signed 32-bit integer.
    Int32,
    /// Signed 64-bit integer (class labels of scikit-learn classifiers).
    Int64,
    /// IEEE 754 single precision (most models' inputs).
    Fp32,
    /// IEEE 754 double precision.
    Fp64,
}

impl DataType {
    /// Every supported type, for error messages and tests.
    pub const ALL: [DataType; 5] = [
        DataType::Bool,
        DataType::Int32,
        DataType::Int64,
        DataType::Fp32,
        DataType::Fp64,
    ];

    /// The OIP v2 spelling (`FP32`, `INT64` …).
    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::Int32 => "INT32",
            DataType::Int64 => "INT64",
            DataType::Fp32 => "FP32",
            DataType::Fp64 => "FP64",
        }
    }

    /// Parses the OIP v2 spelling; `None` for a type inferq does not serve.
    pub fn parse(name: &str) -> Option<DataType> {
        DataType::ALL.into_iter().find(|d| d.as_str() == name)
    }

    /// Bytes per element in the binary encoding.
    pub fn size(self) -> usize {
        match self {
            DataType::Bool => 1,
            DataType::Int32 | DataType::Fp32 => 4,
            DataType::Int64 | DataType::Fp64 => 8,
        }
    }

    /// Stable one-byte code of the binary encoding (docs/PROTOCOL.md).
    pub fn code(self) -> u8 {
        match self {
            DataType::Bool => 1,
            DataType::Int32 => 2,
            DataType::Int64 => 3,
            DataType::Fp32 => 4,
            DataType::Fp64 => 5,
        }
    }

    /// Inverse of [`DataType::code`].
    pub fn from_code(code: u8) -> Option<DataType> {
        DataType::ALL.into_iter().find(|d| d.code() == code)
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A tensor's elements, row-major, in their own type (no boxing per element).
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    /// `BOOL` elements.
    Bool(Vec<bool>),
    /// `INT32` elements.
    Int32(Vec<i32>),
    /// `INT64` elements.
    Int64(Vec<i64>),
    /// `FP32` elements.
    Fp32(Vec<f32>),
    /// `FP64` elements.
    Fp64(Vec<f64>),
}

/// Applies `$body` to the vector inside any [`TensorData`] variant.
macro_rules! with_data {
    ($data:expr, $v:ident => $body:expr) => {
        match $data {
            TensorData::Bool($v) => $body,
            TensorData::Int32($v) => $body,
            TensorData::Int64($v) => $body,
            TensorData::Fp32($v) => $body,
            TensorData::Fp64($v) => $body,
        }
    };
}
pub(crate) use with_data;

impl TensorData {
    /// The element type of this data.
    pub fn datatype(&self) -> DataType {
        match self {
            TensorData::Bool(_) => DataType::Bool,
            TensorData::Int32(_) => DataType::Int32,
            TensorData::Int64(_) => DataType::Int64,
            TensorData::Fp32(_) => DataType::Fp32,
            TensorData::Fp64(_) => DataType::Fp64,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        with_data!(self, v => v.len())
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// An empty vector of `datatype` with room for `capacity` elements.
    pub fn with_capacity(datatype: DataType, capacity: usize) -> TensorData {
        match datatype {
            DataType::Bool => TensorData::Bool(Vec::with_capacity(capacity)),
            DataType::Int32 => TensorData::Int32(Vec::with_capacity(capacity)),
            DataType::Int64 => TensorData::Int64(Vec::with_capacity(capacity)),
            DataType::Fp32 => TensorData::Fp32(Vec::with_capacity(capacity)),
            DataType::Fp64 => TensorData::Fp64(Vec::with_capacity(capacity)),
        }
    }

    /// `count` zero elements of `datatype`: padding for models with a fixed batch size.
    pub fn zeros(datatype: DataType, count: usize) -> TensorData {
        TensorData::filled(datatype, count, 0.0)
    }

    /// `count` elements of `datatype` equal to `value` (a pad value, checked to fit
    /// the type when the padding was declared).
    pub fn filled(datatype: DataType, count: usize, value: f64) -> TensorData {
        match datatype {
            DataType::Bool => TensorData::Bool(vec![value != 0.0; count]),
            DataType::Int32 => TensorData::Int32(vec![value as i32; count]),
            DataType::Int64 => TensorData::Int64(vec![value as i64; count]),
            DataType::Fp32 => TensorData::Fp32(vec![value as f32; count]),
            DataType::Fp64 => TensorData::Fp64(vec![value; count]),
        }
    }

    /// Appends `other[range]`. False, appending nothing, when the types differ or the
    /// range is out of bounds (never a panic, whatever shapes a caller computed).
    pub fn extend_from(&mut self, other: &TensorData, range: std::ops::Range<usize>) -> bool {
        fn append<T: Clone>(a: &mut Vec<T>, b: &[T], range: std::ops::Range<usize>) -> bool {
            b.get(range).map(|part| a.extend_from_slice(part)).is_some()
        }
        match (self, other) {
            (TensorData::Bool(a), TensorData::Bool(b)) => append(a, b, range),
            (TensorData::Int32(a), TensorData::Int32(b)) => append(a, b, range),
            (TensorData::Int64(a), TensorData::Int64(b)) => append(a, b, range),
            (TensorData::Fp32(a), TensorData::Fp32(b)) => append(a, b, range),
            (TensorData::Fp64(a), TensorData::Fp64(b)) => append(a, b, range),
            _ => false,
        }
    }

    /// A copy of the elements in `range`.
    pub fn slice(&self, range: std::ops::Range<usize>) -> TensorData {
        let mut out = TensorData::with_capacity(self.datatype(), range.len());
        out.extend_from(self, range);
        out
    }
}

/// A named tensor with its shape: one input or output of one job.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// The model input or output this tensor feeds or came from.
    pub name: String,
    /// Dimensions, outermost (the batch dimension) first.
    pub shape: Vec<usize>,
    /// Row-major elements; `shape` product equals `data.len()` once validated.
    pub data: TensorData,
}

impl Tensor {
    /// Rows in the batch dimension (1 for a scalar).
    pub fn rows(&self) -> usize {
        self.shape.first().copied().unwrap_or(1)
    }

    /// Elements per row.
    pub fn row_len(&self) -> usize {
        self.shape.iter().skip(1).product()
    }

    /// This tensor with `axis` extended to `to` entries filled with `value` (a copy
    /// when it is already that long or longer, or has no such axis).
    pub fn pad_axis(&self, axis: usize, to: usize, value: f64) -> Tensor {
        let Some(&have) = self.shape.get(axis).filter(|&&d| d < to) else {
            return self.clone();
        };
        let inner: usize = self.shape[axis + 1..].iter().product();
        let outer: usize = self.shape[..axis].iter().product();
        let fill = TensorData::filled(self.data.datatype(), (to - have) * inner, value);
        let mut data = TensorData::with_capacity(self.data.datatype(), outer * to * inner);
        for o in 0..outer {
            let start = o * have * inner;
            data.extend_from(&self.data, start..start + have * inner);
            data.extend_from(&fill, 0..fill.len());
        }
        let mut shape = self.shape.clone();
        shape[axis] = to;
        Tensor {
            name: self.name.clone(),
            shape,
            data,
        }
    }

    /// This tensor with `axis` cut to its first `keep` entries (unchanged when it has
    /// no more, or no such axis).
    pub fn narrow_axis(self, axis: usize, keep: usize) -> Tensor {
        let Some(&have) = self.shape.get(axis).filter(|&&d| d > keep) else {
            return self;
        };
        let inner: usize = self.shape[axis + 1..].iter().product();
        let outer: usize = self.shape[..axis].iter().product();
        let mut data = TensorData::with_capacity(self.data.datatype(), outer * keep * inner);
        for o in 0..outer {
            let start = o * have * inner;
            data.extend_from(&self.data, start..start + keep * inner);
        }
        let mut shape = self.shape;
        shape[axis] = keep;
        Tensor {
            name: self.name,
            shape,
            data,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(shape: Vec<usize>) -> Tensor {
        let n = shape.iter().product::<usize>();
        Tensor {
            name: "x".into(),
            shape,
            data: TensorData::Int64((0..n as i64).collect()),
        }
    }

    #[test]
    fn pads_and_narrows_an_inner_axis() {
        // [[0, 1], [2, 3]] padded on axis 1 to 3 with -1.
        let p = t(vec![2, 2]).pad_axis(1, 3, -1.0);
        assert_eq!(p.shape, vec![2, 3]);
        assert_eq!(p.data, TensorData::Int64(vec![0, 1, -1, 2, 3, -1]));
        assert_eq!(p.narrow_axis(1, 2), t(vec![2, 2]));
    }

    proptest! {
        /// Narrowing what was padded gives the tensor back, on any axis, and padding
        /// never touches the original elements' order.
        #[test]
        fn narrow_undoes_pad(
            shape in proptest::collection::vec(1usize..4, 1..4),
            axis in 0usize..4,
            extra in 0usize..3,
        ) {
            let x = t(shape.clone());
            let axis = axis % shape.len();
            let to = shape[axis] + extra;
            let p = x.pad_axis(axis, to, 7.0);
            prop_assert_eq!(p.data.len(), p.shape.iter().product::<usize>());
            prop_assert_eq!(p.narrow_axis(axis, shape[axis]), x);
        }
    }
}
