//! The wire codecs on the worker's hot path, per job: the binary tensor encoding
//! (`bin`), the OIP v2 JSON request (`body`), and the JSON of a job's outputs. Shapes
//! are the tutorial's RandomForest (20 FP32 features; a label and two probabilities
//! out), one row and 64 rows.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use inferq::protocol::oip::{InferResponse, OutputTensor};
use inferq::protocol::{DataType, Tensor, TensorData, binary, oip};
use std::hint::black_box;

const FEATURES: usize = 20;

fn input(rows: usize) -> Tensor {
    Tensor {
        name: "input".into(),
        shape: vec![rows, FEATURES],
        data: TensorData::Fp32(
            (0..rows * FEATURES)
                .map(|i| (i as f32 * 0.377).sin() * 2.5)
                .collect(),
        ),
    }
}

fn json_request(t: &Tensor) -> Vec<u8> {
    let TensorData::Fp32(data) = &t.data else {
        unreachable!("FP32 input")
    };
    serde_json::to_vec(&serde_json::json!({
        "inputs": [{"name": t.name, "shape": t.shape, "datatype": "FP32", "data": data}]
    }))
    .expect("serializable")
}

fn response(rows: usize) -> InferResponse {
    InferResponse {
        model_name: "tutorial-rf".into(),
        model_version: "1".into(),
        id: "0123456789abcdef0123456789abcdef".into(),
        outputs: vec![
            OutputTensor::from(Tensor {
                name: "label".into(),
                shape: vec![rows],
                data: TensorData::Int64(vec![1; rows]),
            }),
            OutputTensor::from(Tensor {
                name: "probabilities".into(),
                shape: vec![rows, 2],
                data: TensorData::Fp32((0..rows * 2).map(|i| i as f32 / 7.0).collect()),
            }),
        ],
    }
}

fn codecs(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec");
    for rows in [1usize, 64] {
        let t = input(rows);
        let bin = binary::encode(std::slice::from_ref(&t)).expect("encodable");
        let json = json_request(&t);
        g.throughput(Throughput::Elements(rows as u64));
        g.bench_with_input(BenchmarkId::new("binary_encode", rows), &t, |b, t| {
            b.iter(|| binary::encode(black_box(std::slice::from_ref(t))))
        });
        g.bench_with_input(BenchmarkId::new("binary_decode", rows), &bin, |b, bin| {
            b.iter(|| binary::decode(black_box(bin), 4_000_000))
        });
        g.bench_with_input(
            BenchmarkId::new("oip_json_decode", rows),
            &json,
            |b, json| {
                b.iter(|| oip::decode_request(black_box(json), Some(("input", DataType::Fp32))))
            },
        );
        let resp = response(rows);
        g.bench_with_input(
            BenchmarkId::new("outputs_json_encode", rows),
            &resp,
            |b, r| b.iter(|| serde_json::to_vec(black_box(r))),
        );
    }
    g.finish();
}

criterion_group!(benches, codecs);
criterion_main!(benches);
