//! Padding declared per model version: jobs of different lengths share a batch padded
//! to the longest member, and every job's answer equals its own unpadded single run.
//!
//! The model is `seq-pool` (testdata/shapes): `input_ids`, `attention_mask` INT64
//! `[N, L]` → `embedding` FP32 `[N, 4]`, the mean of the embedding-table rows
//! (token t → `t * [1, 10, 100, 1000]`) of the tokens whose mask is 1, and `hidden`
//! FP32 `[N, L, 4]`, every token's row. Its pooled output truly depends on the mask,
//! so a padded token that leaked into a job's answer would show.

mod common;

use std::time::Duration;

use common::http::{Gateway, infer_body, response_outputs};
use common::queue::*;
use common::{Lcg, RedisServer, TempRegistry, inferq_command, run, shape_model_path, unique_name};
use inferq::protocol::job::JobEntry;
use inferq::protocol::{Tensor, TensorData};
use inferq::registry::NewVersion;
use inferq::runtime::padding::{PadInput, PadOutput};
use inferq::runtime::{ModelSession, Padding};

const WAIT: Duration = Duration::from_secs(60);

/// `input_ids` and `attention_mask` padded on axis 1 with 0; `hidden` cut back.
fn text_padding() -> Padding {
    let pad = |name: &str| PadInput {
        name: name.into(),
        axis: 1,
        value: 0.0,
    };
    Padding {
        inputs: vec![pad("input_ids"), pad("attention_mask")],
        outputs: vec![PadOutput {
            name: "hidden".into(),
            axis: 1,
            follows: 1,
        }],
    }
}

/// A skewed length: mostly 1–8, sometimes up to 48.
fn skewed_length(rng: &mut Lcg) -> usize {
    if rng.below(10) < 8 {
        1 + rng.below(8)
    } else {
        9 + rng.below(40)
    }
}

/// One job: `rows` sentences of length `len`, tokens 1–31, and a mask whose last
/// tokens are sometimes 0 (the client's own padding, which must stay excluded).
fn job(rng: &mut Lcg, rows: usize, len: usize) -> Vec<Tensor> {
    let ids: Vec<i64> = (0..rows * len).map(|_| 1 + rng.below(31) as i64).collect();
    let mut mask = vec![1i64; rows * len];
    for r in 0..rows {
        let zeros = if len > 2 { rng.below(len / 2) } else { 0 };
        for k in len - zeros..len {
            mask[r * len + k] = 0;
        }
    }
    let t = |name: &str, data: Vec<i64>| Tensor {
        name: name.into(),
        shape: vec![rows, len],
        data: TensorData::Int64(data),
    };
    vec![t("input_ids", ids), t("attention_mask", mask)]
}

fn ints(t: &Tensor) -> &[i64] {
    match &t.data {
        TensorData::Int64(v) => v,
        other => panic!("`{}` is {:?}", t.name, other.datatype()),
    }
}

fn floats<'a>(outputs: &'a [Tensor], name: &str) -> &'a Tensor {
    outputs
        .iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no output `{name}` in {outputs:?}"))
}

/// Asserts that `outputs` are what seq-pool computes for `inputs` alone: computed
/// here from the table, not by ORT.
fn assert_own_answer(what: &str, inputs: &[Tensor], outputs: &[Tensor]) {
    let (ids, mask) = (ints(&inputs[0]), ints(&inputs[1]));
    let (rows, len) = (inputs[0].shape[0], inputs[0].shape[1]);
    let row = |t: i64| [1.0, 10.0, 100.0, 1000.0].map(|s| t as f64 * s);
    let emb = floats(outputs, "embedding");
    assert_eq!(emb.shape, vec![rows, 4], "{what}: shape of `embedding`");
    let hidden = floats(outputs, "hidden");
    assert_eq!(
        hidden.shape,
        vec![rows, len, 4],
        "{what}: `hidden` cut back to its own length"
    );
    let (TensorData::Fp32(e), TensorData::Fp32(h)) = (&emb.data, &hidden.data) else {
        panic!("{what}: outputs are not FP32");
    };
    for r in 0..rows {
        let mut sum = [0.0f64; 4];
        let mut n = 0.0f64;
        for k in 0..len {
            let i = r * len + k;
            let want = row(ids[i]);
            for d in 0..4 {
                assert_eq!(
                    f64::from(h[i * 4 + d]),
                    want[d],
                    "{what}: hidden[{r},{k},{d}]"
                );
            }
            if mask[i] == 1 {
                n += 1.0;
                for d in 0..4 {
                    sum[d] += want[d];
                }
            }
        }
        for d in 0..4 {
            let want = sum[d] / n.max(1.0);
            let got = f64::from(e[r * 4 + d]);
            assert!(
                (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                "{what}: embedding[{r},{d}] = {got}, its own run gives {want}"
            );
        }
    }
}

#[test]
fn padded_batches_of_mixed_lengths_equal_each_jobs_single_run() {
    common::init_ort();
    let bytes = std::fs::read(shape_model_path("seq-pool")).expect("read seq-pool");
    let mut padded = ModelSession::load(&bytes, "seq-pool", 1).expect("load");
    padded.set_padding(Some(text_padding()));
    let mut rng = Lcg(5);
    for round in 0..50 {
        let jobs: Vec<Vec<Tensor>> = (0..1 + rng.below(12))
            .map(|_| {
                let (rows, len) = (1 + rng.below(3), skewed_length(&mut rng));
                job(&mut rng, rows, len)
            })
            .collect();
        let refs: Vec<&[Tensor]> = jobs.iter().map(Vec::as_slice).collect();
        let out = padded.run_jobs(&refs);
        for (i, (inputs, o)) in jobs.iter().zip(&out).enumerate() {
            let what = format!("round {round} job {i} (shape {:?})", inputs[0].shape);
            let o = o.as_ref().unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_own_answer(&what, inputs, o);
        }
    }
}

#[test]
fn a_failing_job_in_a_padded_batch_fails_alone() {
    common::init_ort();
    let bytes = std::fs::read(shape_model_path("seq-pool")).expect("read seq-pool");
    let mut padded = ModelSession::load(&bytes, "seq-pool", 1).expect("load");
    padded.set_padding(Some(text_padding()));
    let mut rng = Lcg(9);
    let mut jobs: Vec<Vec<Tensor>> = (0..9)
        .map(|_| {
            let len = skewed_length(&mut rng);
            job(&mut rng, 1, len)
        })
        .collect();
    // Token 99 is outside the 32-row table: ORT fails the whole padded batch.
    if let TensorData::Int64(ids) = &mut jobs[4][0].data {
        ids[0] = 99;
    }
    let refs: Vec<&[Tensor]> = jobs.iter().map(Vec::as_slice).collect();
    let out = padded.run_jobs(&refs);
    for (i, (inputs, o)) in jobs.iter().zip(&out).enumerate() {
        if i == 4 {
            let e = o.as_ref().expect_err("the bad job fails");
            assert!(e.to_string().contains("seq-pool"), "names the model: {e}");
            continue;
        }
        let what = format!("job {i} beside a failing one");
        assert_own_answer(
            &what,
            inputs,
            o.as_ref().unwrap_or_else(|e| panic!("{what}: {e}")),
        );
    }
}

/// `inferq models add` of a shape model as `m` with `args`; returns (success, output).
fn add(registry: &std::path::Path, file: &str, args: &[&str]) -> (bool, String) {
    add_file(registry, &shape_model_path(file), args)
}

fn add_file(registry: &std::path::Path, file: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = run(inferq_command()
        .arg("--models")
        .arg(registry)
        .args(["models", "add"])
        .arg(file)
        .args(["--name", "m"])
        .args(args));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn a_padding_declaration_is_checked_against_the_model_when_added() {
    let dir = tempfile::tempdir().expect("temp dir");
    let refused = [
        ("seq-sum", vec!["--pad", "x:0"], "axis 0 is the batch axis"),
        ("seq-sum", vec!["--pad", "x:2"], "has rank 2, so no axis 2"),
        (
            "seq-sum",
            vec!["--pad", "nope:1"],
            "input `nope`, which the model does not have",
        ),
        (
            "seq-sum",
            vec!["--pad", "x:1"],
            "output `double` axis 1 has the padded dimension `L` of input `x` axis 1: declare it",
        ),
        (
            "seq-sum",
            vec!["--pad", "x:1", "--pad-output", "double:1=2"],
            "follows axis 2, which no padded input has",
        ),
        (
            "seq-pool",
            vec!["--pad", "input_ids:1=0.5"],
            "pad value 0.5 is not a INT64",
        ),
        (
            "seq-fixed1",
            vec!["--pad-output", "double:1"],
            "--pad-output needs at least one --pad",
        ),
    ];
    for (file, args, says) in &refused {
        let (ok, text) = add(dir.path(), file, args);
        assert!(
            !ok && text.contains(says),
            "{file} {args:?} should be refused saying `{says}`:\n{text}"
        );
    }
    // A fixed axis, on a demo model whose input is [N, 20].
    let (ok, text) = add_file(
        dir.path(),
        &common::model_path("tutorial-rf"),
        &["--pad", "input:1"],
    );
    assert!(!ok, "{text}");
    assert!(
        text.contains("padded input `input` axis 1 is fixed (20) in the model"),
        "names the input and axis: {text}"
    );
    assert!(
        !dir.path().join("m").join("1").exists(),
        "nothing was registered"
    );
    // Accepted, and shown.
    let (ok, text) = add(
        dir.path(),
        "seq-sum",
        &[
            "--pad",
            "x:1=0",
            "--pad-output",
            "double:1",
            "--batch-max-elements",
            "512",
        ],
    );
    assert!(ok, "{text}");
    let shown = run(inferq_command()
        .arg("--models")
        .arg(dir.path())
        .args(["models", "show", "m"]));
    let manifest: serde_json::Value = serde_json::from_slice(&shown.stdout).expect("JSON");
    assert_eq!(
        manifest["padding"],
        serde_json::json!({
            "inputs": [{"name": "x", "axis": 1, "value": 0.0}],
            "outputs": [{"name": "double", "axis": 1, "follows": 1}]
        }),
        "{manifest}"
    );
    assert_eq!(manifest["batching"]["max_batch_elements"], 512);
}

fn padded_world() -> (RedisServer, TempRegistry, String) {
    let redis = RedisServer::start();
    let registry = TempRegistry::empty();
    let model = unique_name("seq-pool");
    registry.add_shape_model_with(
        "seq-pool",
        &model,
        NewVersion {
            padding: Some(text_padding()),
            ..NewVersion::default()
        },
    );
    (redis, registry, model)
}

/// Thousands of jobs of skewed random lengths through Redis: every answer is its own,
/// batches held several jobs of several lengths (so padding really ran), and padding
/// waste stayed within the policy's 25%.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_mixed_lengths_share_padded_batches_and_each_answer_is_its_own() {
    let (redis, registry, model) = padded_world();
    let mut conn = connect(&redis).await;
    let worker = start_worker(&redis, &registry, worker_config(&model, "w")).await;
    let mut rng = Lcg(17);
    let mut jobs = Vec::new();
    for chunk in 0..20 {
        let entries: Vec<JobEntry> = (0..100)
            .map(|i| {
                let (rows, len) = (1 + rng.below(2), skewed_length(&mut rng));
                let inputs = job(&mut rng, rows, len);
                let id = format!("c{chunk}-{i}");
                let e = if i % 2 == 0 {
                    json_job(&id, &inputs)
                } else {
                    bin_job(&id, &inputs)
                };
                jobs.push((id, inputs));
                e
            })
            .collect();
        produce_all(&mut conn, &model, &entries).await;
    }
    let ids: Vec<String> = jobs.iter().map(|(id, _)| id.clone()).collect();
    let recs = wait_all_terminal(&mut conn, &model, &ids, WAIT).await;
    for ((id, inputs), rec) in jobs.iter().zip(&recs) {
        let what = format!("job {id} (shape {:?})", inputs[0].shape);
        assert_eq!(
            rec.get("status").map(String::as_str),
            Some("succeeded"),
            "{what}: {rec:?}"
        );
        assert_own_answer(&what, inputs, &outputs_of(rec));
    }
    let per_batch = |name: &str| {
        metric(&format!("{name}_sum"), &model) / metric(&format!("{name}_count"), &model)
    };
    assert!(
        per_batch("inferq_batch_jobs") > 1.5,
        "jobs per batch {}",
        per_batch("inferq_batch_jobs")
    );
    assert!(
        per_batch("inferq_batch_shapes") > 1.2,
        "lengths per batch {}",
        per_batch("inferq_batch_shapes")
    );
    let text = inferq::metrics::metrics().render();
    let elements = |kind: &str| {
        text.lines()
            .find(|l| {
                l.starts_with("inferq_input_elements_total")
                    && l.contains(&format!("model=\"{model}\""))
                    && l.contains(&format!("kind=\"{kind}\""))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {kind} elements series"))
    };
    let waste = 1.0 - elements("real") / elements("padded");
    assert!(waste > 0.0 && waste <= 0.25, "padding waste {waste}");
    worker.shutdown().await;
}

/// Through the front door: concurrent synchronous infers of mixed lengths, each its
/// own answer; inputs padded together but of different lengths are a 400 naming both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_clients_get_their_own_answers_and_mismatched_lengths_are_refused() {
    let (redis, registry, model) = padded_world();
    let gw = Gateway::start(&redis, &registry, &[]).await;
    let worker = common::http::start_worker(&redis, &registry, &gw.settings).await;
    let path = format!("/v2/models/{model}/infer");
    let mut rng = Lcg(23);
    let mut tasks = Vec::new();
    for c in 0..16 {
        let inputs: Vec<Vec<Tensor>> = (0..64)
            .map(|_| {
                let len = skewed_length(&mut rng);
                job(&mut rng, 1, len)
            })
            .collect();
        let (client, path) = (gw.client(), path.clone());
        tasks.push(tokio::spawn(async move {
            for (i, inputs) in inputs.iter().enumerate() {
                let r = client
                    .post(&path, infer_body(inputs, serde_json::json!({})))
                    .await;
                r.expect(200);
                assert_own_answer(
                    &format!("client {c} job {i}"),
                    inputs,
                    &response_outputs(&r.json()),
                );
            }
        }));
    }
    for t in tasks {
        t.await.expect("a client task");
    }
    let meta = gw.client().get(&format!("/v2/models/{model}")).await;
    let meta = meta.expect(200).json();
    assert_eq!(
        meta["inputs"][0]["shape"],
        serde_json::json!([-1, -1]),
        "dynamic axes as -1: {meta}"
    );
    assert_eq!(
        meta["padding"]["inputs"][1]["name"], "attention_mask",
        "{meta}"
    );
    assert_eq!(meta["padding"]["outputs"][0]["name"], "hidden", "{meta}");
    let mut bad = job(&mut rng, 1, 5);
    bad[1] = Tensor {
        name: "attention_mask".into(),
        shape: vec![1, 4],
        data: TensorData::Int64(vec![1; 4]),
    };
    let msg = gw
        .client()
        .post(&path, infer_body(&bad, serde_json::json!({})))
        .await
        .expect_error(400, "invalid");
    assert!(
        msg.contains("`input_ids` and `attention_mask` differ on padded axis 1 (5 and 4)"),
        "{msg}"
    );
    worker.shutdown().await;
    gw.stop();
}
