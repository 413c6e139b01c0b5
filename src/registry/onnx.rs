//! A minimal walk over an ONNX protobuf that finds tensors stored as external data.
//!
//! inferq refuses external data outright: ORT would resolve those paths itself, and
//! its own checks against escaping the model directory arrived late (see
//! RELIABILITY.md). Only the fields that can hold tensors are followed.

/// Field numbers (onnx.proto3) of the messages that can hold a tensor.
mod tag {
    pub(super) const MODEL_GRAPH: u64 = 7;
    pub(super) const MODEL_FUNCTIONS: u64 = 25;
    pub(super) const FUNCTION_NODE: u64 = 7;
    pub(super) const GRAPH_NODE: u64 = 1;
    pub(super) const GRAPH_INITIALIZER: u64 = 5;
    pub(super) const GRAPH_SPARSE_INITIALIZER: u64 = 15;
    pub(super) const NODE_ATTRIBUTE: u64 = 5;
    pub(super) const ATTR_T: u64 = 5;
    pub(super) const ATTR_G: u64 = 6;
    pub(super) const ATTR_TENSORS: u64 = 10;
    pub(super) const ATTR_GRAPHS: u64 = 11;
    pub(super) const ATTR_SPARSE: u64 = 22;
    pub(super) const ATTR_SPARSES: u64 = 23;
    pub(super) const SPARSE_VALUES: u64 = 1;
    pub(super) const SPARSE_INDICES: u64 = 2;
    pub(super) const TENSOR_EXTERNAL_DATA: u64 = 13;
    pub(super) const TENSOR_DATA_LOCATION: u64 = 14;
}

#[derive(Clone, Copy)]
enum Kind {
    Model,
    Function,
    Graph,
    Node,
    Attribute,
    Sparse,
    Tensor,
}

/// `Ok` when no tensor refers to external data; `Err` says what is wrong (a malformed
/// protobuf, or the external reference found).
pub fn check_no_external_data(bytes: &[u8]) -> Result<(), String> {
    walk(bytes, Kind::Model, 0)
}

fn walk(mut buf: &[u8], kind: Kind, depth: usize) -> Result<(), String> {
    if depth > 64 {
        return Err("the model nests graphs more than 64 deep".into());
    }
    while !buf.is_empty() {
        let key = varint(&mut buf)?;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                let v = varint(&mut buf)?;
                if matches!(kind, Kind::Tensor) && field == tag::TENSOR_DATA_LOCATION && v == 1 {
                    return Err("a tensor is stored as external data, which inferq refuses".into());
                }
            }
            1 => buf = skip(buf, 8)?,
            5 => buf = skip(buf, 4)?,
            2 => {
                let len = usize::try_from(varint(&mut buf)?)
                    .map_err(|_| "length overflows".to_owned())?;
                if buf.len() < len {
                    return Err("the file is truncated or not an ONNX model".into());
                }
                let (inner, rest) = buf.split_at(len);
                buf = rest;
                if let Some(child) = child(kind, field) {
                    walk(inner, child, depth + 1)?;
                } else if matches!(kind, Kind::Tensor) && field == tag::TENSOR_EXTERNAL_DATA {
                    return Err(
                        "a tensor refers to an external data file, which inferq refuses".into(),
                    );
                }
            }
            _ => return Err("the file is not an ONNX model (bad protobuf wire type)".into()),
        }
    }
    Ok(())
}

fn child(kind: Kind, field: u64) -> Option<Kind> {
    use tag::*;
    Some(match (kind, field) {
        (Kind::Model, MODEL_GRAPH) => Kind::Graph,
        (Kind::Model, MODEL_FUNCTIONS) => Kind::Function,
        (Kind::Function, FUNCTION_NODE) | (Kind::Graph, GRAPH_NODE) => Kind::Node,
        (Kind::Graph, GRAPH_INITIALIZER) => Kind::Tensor,
        (Kind::Graph, GRAPH_SPARSE_INITIALIZER) => Kind::Sparse,
        (Kind::Node, NODE_ATTRIBUTE) => Kind::Attribute,
        (Kind::Attribute, ATTR_T | ATTR_TENSORS) => Kind::Tensor,
        (Kind::Attribute, ATTR_G | ATTR_GRAPHS) => Kind::Graph,
        (Kind::Attribute, ATTR_SPARSE | ATTR_SPARSES) => Kind::Sparse,
        (Kind::Sparse, SPARSE_VALUES | SPARSE_INDICES) => Kind::Tensor,
        _ => return None,
    })
}

fn varint(buf: &mut &[u8]) -> Result<u64, String> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = buf
            .split_first()
            .ok_or("the file is truncated or not an ONNX model")?;
        *buf = rest;
        value |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err("the file is not an ONNX model (bad varint)".into())
}

fn skip(buf: &[u8], n: usize) -> Result<&[u8], String> {
    buf.get(n..)
        .ok_or_else(|| "the file is truncated or not an ONNX model".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn len_field(field: u64, body: &[u8]) -> Vec<u8> {
        let mut out = vec![((field << 3) | 2) as u8, body.len() as u8];
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn finds_external_data_in_nested_graphs() {
        let location = len_field(1, b"location");
        let tensor = len_field(tag::TENSOR_EXTERNAL_DATA, &location);
        let inner_graph = len_field(tag::GRAPH_INITIALIZER, &tensor);
        let attr = len_field(tag::ATTR_G, &inner_graph);
        let node = len_field(tag::NODE_ATTRIBUTE, &attr);
        let graph = len_field(tag::GRAPH_NODE, &node);
        let model = len_field(tag::MODEL_GRAPH, &graph);
        assert!(
            check_no_external_data(&model)
                .unwrap_err()
                .contains("external data")
        );
        let plain = len_field(
            tag::MODEL_GRAPH,
            &len_field(tag::GRAPH_INITIALIZER, &[8, 1]),
        );
        assert!(check_no_external_data(&plain).is_ok());
        assert!(check_no_external_data(&model[..model.len() - 2]).is_err());
    }
}
