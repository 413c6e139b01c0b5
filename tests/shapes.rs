//! Variable-shape models: jobs whose inputs differ on a dynamic non-batch axis never
//! share an ORT call, so every job's answer is its own, whatever the mix and order.
//!
//! The models (testdata/shapes, scripts/make_shape_models.py) answer what is easy to
//! check by hand: `seq-sum` (`x [N, L]` → `sum [N]`, `double [N, L]`), `seq-fixed1`
//! (the same with the batch dimension fixed to 1) and `grid-sum` (`x [N, H, W]` →
//! `sum [N, H]`). Job data are small integers, so FP32 results are exact.

mod common;

use std::time::Duration;

use common::queue::*;
use common::{
    Lcg, RedisOptions, RedisServer, TempRegistry, init_ort, shape_model_path, unique_name,
};
use inferq::protocol::job::JobEntry;
use inferq::protocol::{Tensor, TensorData};
use inferq::runtime::ModelSession;

const WAIT: Duration = Duration::from_secs(30);

/// Job `seed`'s input `x` of `shape`: element k is `seed * 100 + k` (distinct per job).
fn x(seed: usize, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor {
        name: "x".into(),
        shape: shape.to_vec(),
        data: TensorData::Fp32((0..n).map(|k| (seed * 100 + k) as f32).collect()),
    }
}

fn fp32(t: &Tensor) -> &[f32] {
    match &t.data {
        TensorData::Fp32(v) => v,
        other => panic!(
            "output `{}` is {:?}, expected FP32",
            t.name,
            other.datatype()
        ),
    }
}

/// What a sum-over-the-last-axis model must answer for `input`: the sums (shape
/// without the last axis) and, for `seq-*`, the input doubled.
fn expected_sum(input: &Tensor) -> (Vec<usize>, Vec<f32>) {
    let last = *input.shape.last().expect("rank >= 1");
    let sums = fp32(input).chunks(last).map(|c| c.iter().sum()).collect();
    (input.shape[..input.shape.len() - 1].to_vec(), sums)
}

/// Asserts that `outputs` are exactly what the model computes for `input` alone.
fn assert_own_answer(what: &str, input: &Tensor, outputs: &[Tensor]) {
    let (shape, sums) = expected_sum(input);
    let sum = outputs
        .iter()
        .find(|t| t.name == "sum")
        .unwrap_or_else(|| panic!("{what}: no `sum` output in {outputs:?}"));
    assert_eq!(sum.shape, shape, "{what}: shape of `sum`");
    assert_eq!(
        fp32(sum),
        sums.as_slice(),
        "{what}: `sum` holds another job's numbers"
    );
    if let Some(double) = outputs.iter().find(|t| t.name == "double") {
        assert_eq!(double.shape, input.shape, "{what}: shape of `double`");
        let want: Vec<f32> = fp32(input).iter().map(|v| v * 2.0).collect();
        assert_eq!(fp32(double), want.as_slice(), "{what}: `double`");
    }
}

fn session(file: &str) -> ModelSession {
    init_ort();
    let bytes = std::fs::read(shape_model_path(file)).expect("read a shape model");
    ModelSession::load(&bytes, file, 1).expect("load a shape model")
}

/// The mixes of the audit's reproduction (D2), each in both arrival orders, plus
/// longer ones: a fixed-batch model with a dynamic length, rank-3 inputs whose dims
/// permute, multi-row jobs.
fn mixes(file: &str) -> Vec<Vec<Vec<usize>>> {
    let base: Vec<Vec<Vec<usize>>> = match file {
        "seq-fixed1" => vec![
            vec![vec![1, 2], vec![1, 3]],
            vec![vec![1, 4], vec![1, 2], vec![1, 6], vec![1, 2]],
            vec![vec![2, 3], vec![1, 3], vec![3, 2]],
        ],
        "seq-sum" => vec![
            vec![vec![1, 4], vec![1, 2], vec![1, 6]],
            vec![vec![1, 2], vec![2, 3], vec![1, 2], vec![3, 3], vec![1, 6]],
        ],
        "grid-sum" => vec![
            vec![vec![1, 2, 3], vec![1, 3, 2]],
            vec![vec![1, 2, 3], vec![2, 2, 3], vec![1, 3, 2], vec![1, 6, 1]],
        ],
        other => panic!("no mixes for {other}"),
    };
    base.iter()
        .flat_map(|m| [m.clone(), m.iter().rev().cloned().collect()])
        .collect()
}

#[test]
fn the_runtime_never_stacks_jobs_of_different_shapes() {
    for file in ["seq-sum", "seq-fixed1", "grid-sum"] {
        let mut s = session(file);
        for (n, mix) in mixes(file).iter().enumerate() {
            let inputs: Vec<Vec<Tensor>> = mix
                .iter()
                .enumerate()
                .map(|(i, shape)| vec![x(i + 1, shape)])
                .collect();
            let refs: Vec<&[Tensor]> = inputs.iter().map(Vec::as_slice).collect();
            let out = s.run_jobs(&refs);
            assert_eq!(out.len(), mix.len(), "{file} mix {n}: one result per job");
            for (i, o) in out.iter().enumerate() {
                let what = format!("{file} mix {n} ({mix:?}) job {i}");
                let o = o.as_ref().unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_own_answer(&what, &inputs[i][0], o);
            }
        }
    }
}

/// A Redis and a registry holding `file` under a fresh name.
fn world(file: &str) -> (RedisServer, TempRegistry, String) {
    let redis = RedisServer::with(RedisOptions::default());
    let registry = TempRegistry::empty();
    let model = unique_name(file);
    registry.add_shape_model(file, &model);
    (redis, registry, model)
}

/// Every mix queued before the worker starts (so it reads them in one go and could
/// batch them), then checked job by job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_shapes_queued_together_each_get_their_own_answer() {
    for file in ["seq-sum", "seq-fixed1", "grid-sum"] {
        let (redis, registry, model) = world(file);
        let mut conn = connect(&redis).await;
        let mut jobs = Vec::new();
        for (n, mix) in mixes(file).iter().enumerate() {
            for (i, shape) in mix.iter().enumerate() {
                jobs.push((format!("m{n}-j{i}"), x(jobs.len() + 1, shape)));
            }
        }
        let entries: Vec<JobEntry> = jobs
            .iter()
            .enumerate()
            .map(|(i, (id, t))| {
                // Both encodings: JSON bodies and the binary `bin` field.
                if i % 2 == 0 {
                    json_job(id, std::slice::from_ref(t))
                } else {
                    bin_job(id, std::slice::from_ref(t))
                }
            })
            .collect();
        produce_all(&mut conn, &model, &entries).await;
        let worker = start_worker(&redis, &registry, worker_config(&model, "w")).await;
        let ids: Vec<String> = jobs.iter().map(|(id, _)| id.clone()).collect();
        let recs = wait_all_terminal(&mut conn, &model, &ids, WAIT).await;
        for ((id, input), rec) in jobs.iter().zip(&recs) {
            let what = format!("{file} job {id} of shape {:?}", input.shape);
            assert_eq!(
                rec.get("status").map(String::as_str),
                Some("succeeded"),
                "{what}: {rec:?}"
            );
            assert_own_answer(&what, input, &outputs_of(rec));
        }
        worker.shutdown().await;
    }
}

/// Thousands of jobs of random lengths and row counts through Redis while the worker
/// runs: every answer exact, and batches of several jobs really formed (from the
/// metrics, so the test cannot pass by never batching).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_random_lengths_batch_and_each_answer_is_exact() {
    let (redis, registry, model) = world("seq-sum");
    let mut conn = connect(&redis).await;
    let worker = start_worker(&redis, &registry, worker_config(&model, "w")).await;
    let mut rng = Lcg(11);
    let mut jobs = Vec::new();
    for chunk in 0..20 {
        let mut entries = Vec::new();
        for _ in 0..100 {
            let n = jobs.len();
            // Mostly short, some long: lengths 1..=4 often, up to 12 rarely.
            let len = if rng.below(10) < 8 {
                1 + rng.below(4)
            } else {
                5 + rng.below(8)
            };
            let shape = vec![1 + rng.below(3), len];
            let t = x(n + 1, &shape);
            let id = format!("c{chunk}-{n}");
            entries.push(if n % 3 == 0 {
                bin_job(&id, std::slice::from_ref(&t))
            } else {
                json_job(&id, std::slice::from_ref(&t))
            });
            jobs.push((id, t));
        }
        produce_all(&mut conn, &model, &entries).await;
    }
    let ids: Vec<String> = jobs.iter().map(|(id, _)| id.clone()).collect();
    let recs = wait_all_terminal(&mut conn, &model, &ids, Duration::from_secs(60)).await;
    for ((id, input), rec) in jobs.iter().zip(&recs) {
        let what = format!("job {id} of shape {:?}", input.shape);
        assert_eq!(
            rec.get("status").map(String::as_str),
            Some("succeeded"),
            "{what}: {rec:?}"
        );
        assert_own_answer(&what, input, &outputs_of(rec));
    }
    let (jobs_in_batches, batches) = (
        metric("inferq_batch_jobs_sum", &model),
        metric("inferq_batch_jobs_count", &model),
    );
    assert_eq!(jobs_in_batches as usize, jobs.len(), "every job ran once");
    assert!(
        batches < jobs_in_batches * 0.8,
        "{batches} batches for {jobs_in_batches} jobs: jobs of one shape should share batches"
    );
    worker.shutdown().await;
}

#[test]
fn chunks_over_max_rows_keep_every_answer_in_every_mix() {
    let mut s = session("seq-sum");
    s.set_max_rows(Some(2));
    let mut rng = Lcg(3);
    for round in 0..40 {
        let jobs: Vec<Vec<Tensor>> = (0..1 + rng.below(8))
            .map(|i| vec![x(round * 10 + i + 1, &[1 + rng.below(5), 1 + rng.below(3)])])
            .collect();
        let refs: Vec<&[Tensor]> = jobs.iter().map(Vec::as_slice).collect();
        for (i, o) in s.run_jobs(&refs).iter().enumerate() {
            let what = format!("round {round} job {i} (shape {:?})", jobs[i][0].shape);
            assert_own_answer(
                &what,
                &jobs[i][0],
                o.as_ref().unwrap_or_else(|e| panic!("{what}: {e}")),
            );
        }
    }
}

/// `x` of shape `[rows, len, 3]` for seq-feat (the last axis fixed to 3).
fn feat(seed: usize, rows: usize, len: usize) -> Tensor {
    x(seed, &[rows, len, 3])
}

/// Through the front door on a model with a dynamic length and a fixed feature axis:
/// concurrent clients of mixed lengths each get their own sums, and a job whose fixed
/// axis is wrong is a 400 naming the input and the axis, with nothing enqueued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_clients_of_mixed_lengths_get_their_own_answers_and_a_wrong_fixed_axis_is_400() {
    let (redis, registry, model) = world("seq-feat");
    let gw = common::http::Gateway::start(&redis, &registry, &[]).await;
    let worker = common::http::start_worker(&redis, &registry, &gw.settings).await;
    let path = format!("/v2/models/{model}/infer");
    let mut tasks = Vec::new();
    for c in 0..16 {
        let (client, path) = (gw.client(), path.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = Lcg(c as u64);
            for i in 0..64 {
                let input = feat(c * 100 + i, 1, 1 + rng.below(9));
                let body =
                    common::http::infer_body(std::slice::from_ref(&input), serde_json::json!({}));
                let r = client.post(&path, body).await;
                r.expect(200);
                let out = common::http::response_outputs(&r.json());
                // sum over L of a [1, L, 3] tensor: per feature k, Σ_l x[l*3 + k].
                let v = fp32(&input);
                let want: Vec<f32> = (0..3).map(|k| v.iter().skip(k).step_by(3).sum()).collect();
                assert_eq!(out[0].shape, vec![1, 3], "client {c} job {i}");
                assert_eq!(
                    fp32(&out[0]),
                    want.as_slice(),
                    "client {c} job {i}: another job's numbers"
                );
            }
        }));
    }
    for t in tasks {
        t.await.expect("a client task");
    }
    let before = common::http::xlen(&redis, &model).await;
    let bad = x(1, &[1, 4, 2]);
    let msg = gw
        .client()
        .post(
            &path,
            common::http::infer_body(&[bad], serde_json::json!({})),
        )
        .await
        .expect_error(400, "invalid");
    assert!(
        msg.contains("input `x`: dimension 2 is 2, expected 3"),
        "{msg}"
    );
    assert_eq!(
        common::http::xlen(&redis, &model).await,
        before,
        "nothing enqueued"
    );
    worker.shutdown().await;
    gw.stop();
}
