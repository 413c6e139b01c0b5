//! What a worker does when inference itself breaks: a panic on one job's data is
//! caught, the batch bisected, only that job dead-lettered, and the model keeps
//! serving; a model whose inference threads are all gone stops being read, leaves its
//! jobs to other workers, and turns the process not-ready. Faults are injected with
//! `inferq::runtime::faults` into an in-process worker on the `seq-sum` model
//! (`x [N, L]` → `sum [N]`, `double [N, L]`).

mod common;

use std::time::Duration;

use common::queue::*;
use common::{RedisServer, TempRegistry, unique_name};
use inferq::protocol::job::JobEntry;
use inferq::protocol::{Tensor, TensorData};
use inferq::queue::{Keys, RedisTarget};
use inferq::runtime::faults::{self, Fault};

const WAIT: Duration = Duration::from_secs(30);
const POISON: f32 = 666.0;

fn world() -> (RedisServer, TempRegistry, String) {
    let redis = RedisServer::start();
    let registry = TempRegistry::empty();
    let model = unique_name("seq-sum");
    registry.add_shape_model("seq-sum", &model);
    (redis, registry, model)
}

/// Job `i`'s one-row input of length 3 (`[i, i+1, i+2]`), or the poison row.
fn row(i: usize, poison: bool) -> Tensor {
    let data = if poison {
        vec![1.0, POISON, 2.0]
    } else {
        (0..3).map(|k| (i + k) as f32).collect()
    };
    Tensor {
        name: "x".into(),
        shape: vec![1, 3],
        data: TensorData::Fp32(data),
    }
}

fn sum_of(rec: &Record) -> Vec<f32> {
    let outputs = outputs_of(rec);
    let sum = outputs
        .iter()
        .find(|t| t.name == "sum")
        .expect("`sum` output");
    match &sum.data {
        TensorData::Fp32(v) => v.clone(),
        other => panic!("`sum` is {:?}", other.datatype()),
    }
}

/// The worker's readiness as the metrics listener answers it (in this process).
async fn readiness(redis: &RedisServer) -> (u16, serde_json::Value) {
    let conn = RedisTarget::parse(&redis.url())
        .expect("url")
        .connect(Duration::from_secs(5))
        .await
        .expect("connect");
    let req = hyper::Request::get("/v2/health/ready")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("request");
    let resp = inferq::api::ops(req, conn).await;
    let status = resp.status().as_u16();
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .expect("body")
        .to_bytes();
    (status, serde_json::from_slice(&body).expect("JSON"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_on_one_jobs_data_dead_letters_that_job_only_and_the_model_keeps_serving() {
    let (redis, registry, model) = world();
    faults::arm(Fault::PanicOnValue {
        model: model.clone(),
        value: f64::from(POISON),
    });
    let mut conn = connect(&redis).await;
    // Queued together so the poison job shares a batch with the others.
    let entries: Vec<JobEntry> = (0..20)
        .map(|i| json_job(&format!("j{i}"), &[row(i, i == 7)]))
        .collect();
    produce_all(&mut conn, &model, &entries).await;
    let worker = start_worker(&redis, &registry, worker_config(&model, "w")).await;
    let ids: Vec<String> = (0..20).map(|i| format!("j{i}")).collect();
    let recs = wait_all_terminal(&mut conn, &model, &ids, WAIT).await;
    for (i, rec) in recs.iter().enumerate() {
        if i == 7 {
            assert_eq!(
                rec.get("status").map(String::as_str),
                Some("failed"),
                "{rec:?}"
            );
            assert_eq!(
                rec.get("dead_lettered").map(String::as_str),
                Some("1"),
                "{rec:?}"
            );
            let error = rec.get("error").cloned().unwrap_or_default();
            assert!(error.contains("panicked"), "the reason says so: {error}");
            continue;
        }
        assert_eq!(
            rec.get("status").map(String::as_str),
            Some("succeeded"),
            "j{i}: {rec:?}"
        );
        assert_eq!(sum_of(rec), vec![(3 * i + 3) as f32], "j{i}");
    }
    assert!(
        metric("inferq_batch_jobs_count", &model) < 20.0,
        "the poison job was batched with others (else bisection was not exercised)"
    );
    assert_eq!(metric("inferq_inference_panics_total", &model), 1.0);
    // The dead letter keeps the original entry, so it can be replayed after a fix.
    let dead: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(Keys::new(&model).dlq())
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .expect("XRANGE dlq");
    assert_eq!(dead.len(), 1, "{dead:?}");
    let field = |k: &str| {
        dead[0]
            .1
            .iter()
            .find(|(f, _)| f == k)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(field("id").as_deref(), Some("j7"));
    assert!(field("body").is_some_and(|b| b.contains("666")), "{dead:?}");
    assert!(field("error").is_some_and(|e| e.contains("panicked")));
    // Still serving, and honest about it.
    produce(&mut conn, &model, "after", &[row(40, false)]).await;
    let rec = wait_terminal(&mut conn, &model, "after", WAIT).await;
    assert_eq!(sum_of(&rec), vec![123.0]);
    let (status, body) = readiness(&redis).await;
    assert!(
        !body["models_down"]
            .as_object()
            .is_some_and(|m| m.contains_key(&model)),
        "{status} {body}"
    );
    wait_no_pending(&mut conn, &model, WAIT).await;
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_without_inference_threads_is_not_ready_and_its_jobs_go_to_another_worker() {
    let (redis, registry, model) = world();
    let mut conn = connect(&redis).await;
    let first = start_worker(&redis, &registry, worker_config(&model, "first")).await;
    let rec = {
        produce(&mut conn, &model, "warm", &[row(1, false)]).await;
        wait_terminal(&mut conn, &model, "warm", WAIT).await
    };
    assert_eq!(sum_of(&rec), vec![6.0]);
    // The next batch ends the only inference thread of `first`.
    faults::arm(Fault::EndThread {
        model: model.clone(),
    });
    let entries: Vec<JobEntry> = (0..10)
        .map(|i| json_job(&format!("j{i}"), &[row(i, false)]))
        .collect();
    produce_all(&mut conn, &model, &entries).await;
    let deadline = std::time::Instant::now() + WAIT;
    let body = loop {
        let (status, body) = readiness(&redis).await;
        if status == 503 {
            break body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never turned not-ready: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(body["ready"], false, "{body}");
    assert!(
        body["models_down"][&model]
            .as_str()
            .is_some_and(|r| r.contains("inference threads")),
        "the reason names the model and why: {body}"
    );
    // Nothing was answered by `first`; another worker reclaims and serves every job.
    let second = start_worker(&redis, &registry, worker_config(&model, "second")).await;
    let ids: Vec<String> = (0..10).map(|i| format!("j{i}")).collect();
    let recs = wait_all_terminal(&mut conn, &model, &ids, WAIT).await;
    for (i, rec) in recs.iter().enumerate() {
        assert_eq!(
            rec.get("status").map(String::as_str),
            Some("succeeded"),
            "j{i}: {rec:?}"
        );
        assert_eq!(sum_of(rec), vec![(3 * i + 3) as f32], "j{i}");
    }
    let held_by_first = pending(&mut conn, &model)
        .await
        .into_iter()
        .filter(|p| p.consumer == "first")
        .count();
    assert_eq!(held_by_first, 0, "the dead pipeline hoards nothing");
    assert_eq!(metric("inferq_duplicate_deliveries_total", &model), 0.0);
    second.shutdown().await;
    first.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_finishing_during_a_drain_is_not_reclaimed_by_another_worker() {
    let (redis, registry, model) = world();
    // Every ORT call takes 1.5 s, far beyond the 300 ms after which idle jobs are taken.
    faults::arm(Fault::SlowRun {
        model: model.clone(),
        ms: 1500,
    });
    let fast_claims = |consumer: &str| {
        let mut cfg = worker_config(&model, consumer);
        cfg.queue.claim_after = Duration::from_millis(300);
        cfg
    };
    let mut conn = connect(&redis).await;
    let a = start_worker(&redis, &registry, fast_claims("a")).await;
    produce(&mut conn, &model, "slow", &[row(1, false)]).await;
    wait_pending(&mut conn, &model, WAIT, "the job held by a", |p| {
        p.iter().any(|e| e.consumer == "a")
    })
    .await;
    let b = start_worker(&redis, &registry, fast_claims("b")).await;
    // a drains: it finishes the job it holds, and keeps it fresh until then.
    let drained = tokio::spawn(a.shutdown());
    let rec = wait_terminal(&mut conn, &model, "slow", WAIT).await;
    assert_eq!(
        rec.get("status").map(String::as_str),
        Some("succeeded"),
        "{rec:?}"
    );
    assert!(drained.await.expect("a's drain"), "a drained in time");
    wait_no_pending(&mut conn, &model, WAIT).await;
    b.shutdown().await;
    assert_eq!(
        metric("inferq_duplicate_deliveries_total", &model),
        0.0,
        "b computed the job a was finishing"
    );
    assert_eq!(attempts(&rec), 1, "{rec:?}");
}
