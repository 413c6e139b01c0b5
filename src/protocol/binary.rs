//! The compact binary tensor encoding of a job entry's `bin` field (docs/PROTOCOL.md):
//!
//! ```text
//! "IQT1"                      magic, 4 bytes
//! u8      n                   tensor count
//! n times:
//!   u8    L, L bytes          input name (UTF-8)
//!   u8    datatype code       1 BOOL, 2 INT32, 3 INT64, 4 FP32, 5 FP64
//!   u8    r                   rank
//!   r × u32 LE                dimensions
//!   product × size bytes      elements, little-endian, row-major
//! ```
//! Large tensors skip JSON number formatting and parsing entirely.

use super::oip::DecodeError;
use super::tensor::{DataType, Tensor, TensorData};

/// First bytes of every binary payload.
pub const MAGIC: &[u8; 4] = b"IQT1";

/// Encodes tensors; fails only on a name longer than 255 bytes, a rank above 255 or a
/// dimension above `u32::MAX` (the format's own limits).
pub fn encode(tensors: &[Tensor]) -> Result<Vec<u8>, DecodeError> {
    let bytes: usize = tensors
        .iter()
        .map(|t| 8 + t.name.len() + 4 * t.shape.len() + t.data.len() * t.data.datatype().size())
        .sum();
    let mut out = Vec::with_capacity(5 + bytes);
    out.extend_from_slice(MAGIC);
    out.push(u8::try_from(tensors.len()).map_err(|_| DecodeError("more than 255 tensors".into()))?);
    for t in tensors {
        let name = t.name.as_bytes();
        out.push(
            u8::try_from(name.len())
                .map_err(|_| DecodeError(format!("name `{}` over 255 bytes", t.name)))?,
        );
        out.extend_from_slice(name);
        out.push(t.data.datatype().code());
        out.push(
            u8::try_from(t.shape.len())
                .map_err(|_| DecodeError(format!("`{}`: rank over 255", t.name)))?,
        );
        for &d in &t.shape {
            let d = u32::try_from(d)
                .map_err(|_| DecodeError(format!("`{}`: dimension {d} too large", t.name)))?;
            out.extend_from_slice(&d.to_le_bytes());
        }
        match &t.data {
            TensorData::Bool(v) => out.extend(v.iter().map(|&b| u8::from(b))),
            TensorData::Int32(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            TensorData::Int64(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            TensorData::Fp32(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            TensorData::Fp64(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        }
    }
    Ok(out)
}

/// A cursor that never reads past the end: every short read is an error.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError(format!(
                "binary payload truncated in {what}: needs {n} bytes, {} left",
                self.buf.len()
            )));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }
}

/// Decodes a binary payload. `max_elements` caps each tensor before any allocation,
/// so a forged header cannot make the worker allocate gigabytes.
pub fn decode(payload: &[u8], max_elements: usize) -> Result<Vec<Tensor>, DecodeError> {
    let mut r = Reader { buf: payload };
    if r.take(4, "magic")? != MAGIC {
        return Err(DecodeError(
            "binary payload does not start with IQT1".into(),
        ));
    }
    let n = r.u8("tensor count")?;
    let mut tensors = Vec::with_capacity(n.into());
    for i in 0..n {
        let len = r.u8("name length")?;
        let name = std::str::from_utf8(r.take(len.into(), "name")?)
            .map_err(|_| DecodeError(format!("tensor {i}: name is not UTF-8")))?
            .to_owned();
        let code = r.u8("datatype")?;
        let datatype = DataType::from_code(code)
            .ok_or_else(|| DecodeError(format!("input `{name}`: unknown datatype code {code}")))?;
        let rank = r.u8("rank")?;
        let mut shape = Vec::with_capacity(rank.into());
        let mut elements = 1usize;
        for _ in 0..rank {
            let d = u32::from_le_bytes(
                r.take(4, "shape")?
                    .try_into()
                    .expect("4 bytes, this is a bug"),
            );
            let d = d as usize;
            elements = elements
                .checked_mul(d)
                .filter(|&e| e <= max_elements)
                .ok_or_else(|| {
                    DecodeError(format!(
                        "input `{name}`: shape {shape:?}… has more than {max_elements} elements"
                    ))
                })?;
            shape.push(d);
        }
        let bytes = r.take(elements * datatype.size(), &format!("input `{name}` data"))?;
        tensors.push(Tensor {
            name,
            shape,
            data: from_le(datatype, bytes),
        });
    }
    if !r.buf.is_empty() {
        return Err(DecodeError(format!(
            "{} trailing bytes after the last tensor",
            r.buf.len()
        )));
    }
    Ok(tensors)
}

fn from_le(datatype: DataType, bytes: &[u8]) -> TensorData {
    macro_rules! le {
        ($t:ty, $n:literal) => {
            bytes
                .chunks_exact($n)
                .map(|c| <$t>::from_le_bytes(c.try_into().expect("exact chunk, this is a bug")))
                .collect()
        };
    }
    match datatype {
        DataType::Bool => TensorData::Bool(bytes.iter().map(|&b| b != 0).collect()),
        DataType::Int32 => TensorData::Int32(le!(i32, 4)),
        DataType::Int64 => TensorData::Int64(le!(i64, 8)),
        DataType::Fp32 => TensorData::Fp32(le!(f32, 4)),
        DataType::Fp64 => TensorData::Fp64(le!(f64, 8)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trips_every_type() {
        let tensors = vec![
            Tensor {
                name: "a".into(),
                shape: vec![2, 2],
                data: TensorData::Fp32(vec![1.0, -2.5, 3.25, f32::MAX]),
            },
            Tensor {
                name: "b".into(),
                shape: vec![3],
                data: TensorData::Int64(vec![i64::MIN, 0, 7]),
            },
            Tensor {
                name: "c".into(),
                shape: vec![1, 2],
                data: TensorData::Bool(vec![true, false]),
            },
            Tensor {
                name: "d".into(),
                shape: vec![1],
                data: TensorData::Fp64(vec![0.1]),
            },
            Tensor {
                name: "e".into(),
                shape: vec![1],
                data: TensorData::Int32(vec![-3]),
            },
        ];
        let bytes = encode(&tensors).unwrap();
        assert_eq!(decode(&bytes, 1 << 20).unwrap(), tensors);
    }

    #[test]
    fn forged_headers_are_refused_before_allocating() {
        let t = Tensor {
            name: "x".into(),
            shape: vec![1, 4],
            data: TensorData::Fp32(vec![0.0; 4]),
        };
        let bytes = encode(&[t]).unwrap();
        assert!(
            decode(&bytes, 3)
                .unwrap_err()
                .0
                .contains("more than 3 elements")
        );
        assert!(
            decode(&bytes[..bytes.len() - 1], 100)
                .unwrap_err()
                .0
                .contains("truncated")
        );
        let mut huge = bytes.clone();
        huge[9..13].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&huge, usize::MAX).is_err());
    }

    proptest! {
        #[test]
        fn decode_never_panics(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut bytes = MAGIC.to_vec();
            bytes.extend(data);
            let _ = decode(&bytes, 1 << 16);
        }
    }
}
