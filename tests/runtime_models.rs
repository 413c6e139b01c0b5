//! Every demo model through `inferq::runtime`: a single session, the batching of
//! several jobs into one run, fixed-batch models, bisection of a failing batch, and
//! the async inference pool fed from the registry. Outputs are compared with the
//! reference outputs onnxruntime (Python) computed at export.

mod common;

use std::sync::Arc;

use common::{DEMO_MODELS, Reference, TempRegistry, assert_outputs, rows, session};
use inferq::protocol::{Tensor, TensorData};
use inferq::runtime::{InferPool, LoadedModel, RuntimeError};

/// Runs `jobs` as one batch and returns each job's outputs, failing on any error.
fn run_all(s: &mut inferq::runtime::ModelSession, jobs: &[Vec<Tensor>]) -> Vec<Vec<Tensor>> {
    let refs: Vec<&[Tensor]> = jobs.iter().map(Vec::as_slice).collect();
    s.run_jobs(&refs)
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.unwrap_or_else(|e| panic!("job {i}: {e}")))
        .collect()
}

/// The reference split into jobs of the given row counts, with their expected outputs.
fn jobs_of(reference: &Reference, sizes: &[usize]) -> (Vec<Vec<Tensor>>, Vec<Vec<Tensor>>) {
    let mut start = 0;
    sizes
        .iter()
        .map(|&n| {
            let range = start..start + n;
            start += n;
            (
                reference.input_rows(range.clone()),
                reference.output_rows(range),
            )
        })
        .unzip()
}

#[test]
fn every_model_warms_up_and_matches_its_reference() {
    for name in DEMO_MODELS {
        let reference = Reference::load(name);
        let mut s = session(name);
        let sig = s.signature().clone();
        let input_names: Vec<&str> = sig.inputs.iter().map(|i| i.name.as_str()).collect();
        let expected_inputs: Vec<&str> = reference.inputs.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(input_names, expected_inputs, "{name}: input names");
        let output_names: Vec<&str> = sig.outputs.iter().map(|o| o.name.as_str()).collect();
        let expected_outputs: Vec<&str> =
            reference.outputs.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(output_names, expected_outputs, "{name}: output names");
        for (spec, t) in sig.inputs.iter().zip(&reference.inputs) {
            assert_eq!(
                spec.datatype,
                t.data.datatype().as_str(),
                "{name}: input type"
            );
        }

        s.warm_up()
            .unwrap_or_else(|e| panic!("{name}: warm-up: {e}"));
        let out = run_all(&mut s, std::slice::from_ref(&reference.inputs));
        assert_outputs(&out[0], &reference.outputs, name);
    }
}

#[test]
fn signatures_declare_the_batch_dimension() {
    let expect = [
        ("tutorial-rf", vec![-1, 20], None),
        ("digits-mlp", vec![-1, 64], None),
        ("diabetes-gbr", vec![-1, 10], None),
        ("iris-f64", vec![-1, 4], None),
        ("iris-fixed1", vec![1, 4], Some(1)),
        ("heavy-mlp", vec![-1, 256], None),
    ];
    for (name, shape, fixed) in expect {
        let s = session(name);
        assert_eq!(s.signature().inputs[0].shape, shape, "{name}");
        assert_eq!(s.signature().fixed_batch(), fixed, "{name}");
        let single = s.signature().single_input().map(|(n, _)| n.to_owned());
        assert_eq!(single.as_deref(), Some("input"), "{name}");
    }
}

#[test]
fn one_row_jobs_batched_together_equal_single_runs() {
    for name in DEMO_MODELS {
        let reference = Reference::load(name);
        let mut s = session(name);
        let (jobs, expected) = jobs_of(&reference, &vec![1; reference.rows()]);
        let batched = run_all(&mut s, &jobs);
        assert_eq!(batched.len(), jobs.len(), "{name}: one result per job");
        for (i, job) in jobs.iter().enumerate() {
            let alone = run_all(&mut s, std::slice::from_ref(job));
            let what = format!("{name} row {i}");
            assert_outputs(&batched[i], &alone[0], &format!("{what} batched vs alone"));
            assert_outputs(&batched[i], &expected[i], &format!("{what} vs reference"));
        }
    }
}

#[test]
fn jobs_of_several_rows_keep_their_rows_in_order() {
    for name in DEMO_MODELS {
        let reference = Reference::load(name);
        let mut s = session(name);
        let sizes: &[usize] = if reference.rows() == 8 {
            &[3, 1, 4]
        } else {
            &[5, 1, 10, 2, 14]
        };
        let (jobs, expected) = jobs_of(&reference, sizes);
        let out = run_all(&mut s, &jobs);
        for (i, (got, want)) in out.iter().zip(&expected).enumerate() {
            assert_outputs(got, want, &format!("{name} job {i} ({} rows)", sizes[i]));
        }
    }
}

#[test]
fn a_fixed_batch_model_runs_multi_row_jobs_a_row_at_a_time() {
    let reference = Reference::load("iris-fixed1");
    assert_eq!(reference.rows(), 8);
    let mut s = session("iris-fixed1");
    assert_eq!(s.signature().fixed_batch(), Some(1));

    let eight = run_all(&mut s, std::slice::from_ref(&reference.inputs));
    assert_outputs(&eight[0], &reference.outputs, "iris-fixed1, one 8-row job");

    let (jobs, expected) = jobs_of(&reference, &[2, 1, 1, 3, 1]);
    for (i, (got, want)) in run_all(&mut s, &jobs).iter().zip(&expected).enumerate() {
        assert_outputs(got, want, &format!("iris-fixed1 job {i}"));
    }
}

#[test]
fn batches_over_max_rows_run_in_chunks_and_come_back_whole() {
    for name in DEMO_MODELS {
        let reference = Reference::load(name);
        let mut s = session(name);
        let sizes: &[usize] = if reference.rows() == 8 {
            &[5, 3]
        } else {
            &[13, 1, 18]
        };
        let (jobs, expected) = jobs_of(&reference, sizes);
        for cap in [Some(5), Some(1), Some(0), None] {
            s.set_max_rows(cap);
            for (i, (got, want)) in run_all(&mut s, &jobs).iter().zip(&expected).enumerate() {
                assert_outputs(got, want, &format!("{name}, max_rows {cap:?}, job {i}"));
            }
        }
    }
}

#[tokio::test]
async fn the_pool_caps_rows_per_run_when_asked() {
    let r = TempRegistry::with_models(&["diabetes-gbr"]);
    let model = loaded(&r, "diabetes-gbr", None);
    let reference = Reference::load("diabetes-gbr");
    let pool = InferPool::spawn("diabetes-gbr", 1, 1);
    let slot = pool.reserve().await.expect("a free thread");
    let out = slot
        .send_capped(model, vec![reference.inputs.clone()], Some(3))
        .await
        .expect("the pool answers");
    assert_outputs(
        out[0].as_ref().expect("job ok"),
        &reference.outputs,
        "capped",
    );
}

/// A job that slipped past validation: one element short of its declared row length.
fn malformed(job: &[Tensor]) -> Vec<Tensor> {
    job.iter()
        .map(|t| {
            let w = t.row_len();
            let mut bad = rows(t, 0..1);
            bad.shape = vec![1, w - 1];
            bad.data = t.data.slice(0..w - 1);
            bad
        })
        .collect()
}

#[test]
fn bisection_fails_only_the_bad_job() {
    let reference = Reference::load("tutorial-rf");
    let mut s = session("tutorial-rf");
    for (n, bad_at) in [(2, 0), (2, 1), (5, 0), (5, 2), (5, 4), (8, 3), (13, 12)] {
        let (mut jobs, expected) = jobs_of(&reference, &vec![2; n]);
        jobs[bad_at] = malformed(&jobs[bad_at]);
        let refs: Vec<&[Tensor]> = jobs.iter().map(Vec::as_slice).collect();
        let results = s.run_jobs(&refs);
        assert_eq!(results.len(), n);
        for (i, r) in results.into_iter().enumerate() {
            let what = format!("{n} jobs, bad job {bad_at}: job {i}");
            if i == bad_at {
                let e = r.expect_err(&what);
                assert!(matches!(e, RuntimeError::Run { .. }), "{what}: {e:?}");
                assert!(e.to_string().contains("tutorial-rf"), "{what}: {e}");
            } else {
                let out = r.unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_outputs(&out, &expected[i], &what);
            }
        }
    }
}

#[test]
fn bisection_isolates_a_wrong_datatype_and_several_bad_jobs() {
    let reference = Reference::load("digits-mlp");
    let mut s = session("digits-mlp");
    let (mut jobs, expected) = jobs_of(&reference, &[1; 9]);
    // FP64 where the model takes FP32: ORT refuses it.
    let TensorData::Fp32(v) = &jobs[4][0].data else {
        panic!("digits-mlp takes FP32");
    };
    jobs[4][0].data = TensorData::Fp64(v.iter().map(|&x| f64::from(x)).collect());
    jobs[7] = malformed(&jobs[7]);
    let refs: Vec<&[Tensor]> = jobs.iter().map(Vec::as_slice).collect();
    let results = s.run_jobs(&refs);
    for (i, r) in results.into_iter().enumerate() {
        match i {
            4 | 7 => assert!(r.is_err(), "job {i} must fail"),
            _ => assert_outputs(&r.expect("a good job succeeds"), &expected[i], "digits"),
        }
    }
}

#[test]
fn an_empty_batch_gives_no_results() {
    let mut s = session("iris-f64");
    assert!(s.run_jobs(&[]).is_empty());
}

#[test]
fn bytes_that_are_not_a_model_fail_to_load_naming_it() {
    common::init_ort();
    let e = inferq::runtime::ModelSession::load(b"not an onnx model", "junk@3", 1)
        .expect_err("garbage must not load");
    assert!(matches!(e, RuntimeError::Load { .. }), "{e:?}");
    assert!(e.to_string().contains("junk@3"), "{e}");
}

/// The registry's hash-verified bytes, as a worker would hand them to the pool.
fn loaded(r: &TempRegistry, name: &str, version: Option<u64>) -> Arc<LoadedModel> {
    let (manifest, bytes) = r.registry.load(name, version).expect("registry load");
    Arc::new(LoadedModel {
        name: manifest.name,
        version: manifest.version,
        bytes: bytes.into(),
        signature: manifest.signature,
        padding: manifest.padding,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_serves_every_model_from_the_registry() {
    let r = TempRegistry::with_models(&DEMO_MODELS);
    for name in DEMO_MODELS {
        let reference = Reference::load(name);
        let model = loaded(&r, name, None);
        assert_eq!(
            model.signature,
            session(name).signature().clone(),
            "{name}: manifest signature is what ORT reads"
        );
        let pool = InferPool::spawn(name, 2, 1);
        let whole = pool
            .run(Arc::clone(&model), vec![reference.inputs.clone()])
            .await
            .expect("pool runs");
        assert_eq!(whole.len(), 1);
        assert_outputs(whole[0].as_ref().expect("job ok"), &reference.outputs, name);

        // Batches on both threads at once, each of several jobs.
        let half = reference.rows() / 2;
        let (a, a_expected) = jobs_of(&reference, &[1, half - 1]);
        let (b, b_expected) = jobs_of(&reference, &[half, reference.rows() - half]);
        let b = b[1..].to_vec();
        let (ra, rb) = tokio::join!(
            pool.run(Arc::clone(&model), a),
            pool.run(Arc::clone(&model), b)
        );
        for (got, want) in ra.expect("batch a").iter().zip(&a_expected) {
            assert_outputs(got.as_ref().expect("job ok"), want, name);
        }
        let rb = rb.expect("batch b");
        assert_eq!(rb.len(), 1);
        assert_outputs(rb[0].as_ref().expect("job ok"), &b_expected[1], name);
    }
}

#[tokio::test]
async fn the_pool_fails_every_job_of_a_model_it_cannot_load() {
    common::init_ort();
    let model = Arc::new(LoadedModel {
        name: "broken".into(),
        version: 2,
        bytes: b"garbage".as_slice().into(),
        signature: session("iris-f64").signature().clone(),
        padding: None,
    });
    let jobs = Reference::load("iris-f64").input_rows(0..1);
    let pool = InferPool::spawn("broken", 1, 1);
    let results = pool
        .run(model, vec![jobs.clone(), jobs])
        .await
        .expect("the pool answers");
    assert_eq!(results.len(), 2);
    for r in results {
        let e = r.expect_err("a model that does not load fails its jobs");
        assert!(e.to_string().contains("broken@2"), "{e}");
    }
}

#[tokio::test]
async fn the_pool_keeps_one_session_per_version() {
    let r = TempRegistry::with_models(&["tutorial-rf"]);
    let v1 = loaded(&r, "tutorial-rf", None);
    // Version 2 is a different model under the same name: the pool must not reuse
    // version 1's session for it.
    let m = r
        .registry
        .add(
            &common::model_path("iris-f64"),
            "tutorial-rf",
            inferq::registry::NewVersion::default(),
            common::inspect,
        )
        .expect("add v2");
    assert_eq!(m.version, 2);
    let v2 = loaded(&r, "tutorial-rf", None);
    assert_eq!(v2.version, 2);

    let pool = InferPool::spawn("tutorial-rf", 1, 1);
    for (model, reference) in [
        (v1, "tutorial-rf"),
        (v2, "iris-f64"),
        (loaded(&r, "tutorial-rf", Some(1)), "tutorial-rf"),
    ] {
        let reference = Reference::load(reference);
        let out = pool
            .run(model, vec![reference.inputs.clone()])
            .await
            .expect("pool runs");
        assert_outputs(out[0].as_ref().expect("job ok"), &reference.outputs, "v");
    }
}
