//! Jobs a worker must not compute, written straight to Redis by a producer: bad
//! entries and inputs fail alone with an error naming the problem, a poison job fails
//! alone inside its batch, a passed deadline expires the job uncomputed, and a job
//! that fails every attempt is dead-lettered and re-driven with `inferq dlq`.
//!
//! Each test has its own `redis-server`, registry and in-process worker (so this
//! process's metrics are the worker's).

mod common;

use std::time::Duration;

use common::queue::*;
use common::{RedisOptions, RedisServer, assert_outputs, inferq_command, run_ok};
use inferq::protocol::job::JobEntry;
use inferq::protocol::oip::encode_request;
use inferq::protocol::{Tensor, TensorData};
use inferq::queue::Keys;

const WAIT: Duration = Duration::from_secs(20);

/// A Redis and a registry holding tutorial-rf (FP32 `[?, 20]`) under a fresh name.
async fn setup() -> Setup {
    Setup::new("tutorial-rf", RedisOptions::default()).await
}

/// Stream entry fields.
type Fields = Vec<(String, Vec<u8>)>;

/// A bad job: its id, its fields after `v` and `id`, what the error must say, and the
/// error kind (when checked).
type Case<'a> = (&'a str, Fields, &'a str, Option<&'a str>);

fn fields(pairs: &[(&str, &[u8])]) -> Fields {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.to_vec()))
        .collect()
}

fn tensor(name: &str, shape: &[usize], data: TensorData) -> Tensor {
    Tensor {
        name: name.to_owned(),
        shape: shape.to_vec(),
        data,
    }
}

/// Asserts a `failed` record whose error contains `says` (and whose kind is `kind`,
/// when given).
fn assert_failed(rec: &Record, id: &str, says: &str, kind: Option<&str>) {
    assert_eq!(
        rec.get("status").map(String::as_str),
        Some("failed"),
        "{id}: {rec:?}"
    );
    let error = rec.get("error").map(String::as_str).unwrap_or_default();
    assert!(
        error.contains(says),
        "{id}: error `{error}` should say `{says}`"
    );
    if let Some(kind) = kind {
        assert_eq!(
            rec.get("error_kind").map(String::as_str),
            Some(kind),
            "{id}: {rec:?}"
        );
    }
    assert!(
        !rec.contains_key("outputs"),
        "{id}: a failed job shows outputs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_entries_and_inputs_each_fail_alone_and_the_worker_keeps_serving() {
    let mut s = setup().await;
    let mut cfg = worker_config(&s.model, "w");
    cfg.queue.max_elements = 100; // 5 rows of 20
    let worker = start_worker(&s.redis, &s.registry, cfg).await;
    let row = cycled_inputs(&s.reference, 0, 1);
    warm_up(&mut s.conn, &s.model, &row, WAIT).await;

    let good = encode_request(&row);
    let body = |t: Tensor| encode_request(&[t]);
    let six_rows = cycled_inputs(&s.reference, 0, 6);
    let bin_six = inferq::protocol::binary::encode(&six_rows).expect("encode");
    let other_model_reply = reply_key("someone-else", "x");
    let cases: Vec<Case<'_>> = vec![
        (
            "no-body",
            vec![],
            "neither `body` nor `bin`",
            Some("invalid"),
        ),
        (
            "bad-json",
            fields(&[("body", br#"{"inputs": [{"name": "input""#)]),
            "malformed JSON",
            Some("invalid"),
        ),
        (
            "no-inputs",
            fields(&[("body", br#"{"id": "x"}"#)]),
            "no `inputs`",
            Some("invalid"),
        ),
        (
            "unknown-version",
            fields(&[("body", &good), ("version", b"7")]),
            "has no version 7",
            Some("not_found"),
        ),
        (
            "wrong-shape",
            fields(&[(
                "body",
                &body(tensor("input", &[1, 19], TensorData::Fp32(vec![0.5; 19]))),
            )]),
            "dimension 1 is 19, expected 20",
            Some("invalid"),
        ),
        (
            "shape-vs-data",
            fields(&[(
                "body",
                &body(tensor("input", &[2, 20], TensorData::Fp32(vec![0.5; 20]))),
            )]),
            "needs 40 elements, data has 20",
            Some("invalid"),
        ),
        (
            "wrong-datatype",
            fields(&[(
                "body",
                &body(tensor("input", &[1, 20], TensorData::Int64(vec![1; 20]))),
            )]),
            "datatype INT64, expected FP32",
            Some("invalid"),
        ),
        (
            "unknown-input",
            fields(&[(
                "body",
                &body(tensor(
                    "features",
                    &[1, 20],
                    TensorData::Fp32(vec![0.5; 20]),
                )),
            )]),
            "unknown input `features`",
            Some("invalid"),
        ),
        (
            "reply-elsewhere",
            fields(&[("body", &good), ("reply_to", b"victim:list")]),
            "reply_to must start with",
            Some("invalid"),
        ),
        (
            "reply-other-model",
            fields(&[("body", &good), ("reply_to", other_model_reply.as_bytes())]),
            "reply_to must start with",
            Some("invalid"),
        ),
        (
            "too-many-elements",
            fields(&[("body", &encode_request(&six_rows))]),
            "120 elements, over the per-job cap of 100",
            Some("too_large"),
        ),
        (
            // The same cap and the same kind as for JSON.
            "bin-too-many-elements",
            fields(&[("bin", &bin_six)]),
            "120 elements, over the per-job cap of 100",
            Some("too_large"),
        ),
        (
            "bin-garbage",
            fields(&[("bin", b"not a tensor")]),
            "does not start with IQT1",
            Some("invalid"),
        ),
        (
            "bad-version-field",
            fields(&[("body", &good), ("version", b"latest")]),
            "`version` must be a positive integer",
            Some("invalid"),
        ),
        (
            "bad-deadline",
            fields(&[("body", &good), ("deadline_ms", b"soon")]),
            "`deadline_ms` must be unix milliseconds",
            Some("invalid"),
        ),
    ];
    let mut ids = Vec::new();
    for (id, extra, _, _) in &cases {
        let mut f = fields(&[("v", b"1"), ("id", id.as_bytes())]);
        f.extend(extra.iter().cloned());
        xadd(&mut s.conn, &s.model, &f).await;
        ids.push((*id).to_owned());
    }
    // A protocol version this worker does not speak.
    xadd(
        &mut s.conn,
        &s.model,
        &fields(&[("v", b"2"), ("id", b"v2"), ("body", &good)]),
    )
    .await;
    ids.push("v2".into());
    // Entries without a usable id cannot have a record: each goes to the dead letters.
    xadd(
        &mut s.conn,
        &s.model,
        &fields(&[("v", b"1"), ("body", &good)]),
    )
    .await;
    xadd(
        &mut s.conn,
        &s.model,
        &fields(&[("v", b"1"), ("id", b"a/b"), ("body", &good)]),
    )
    .await;
    // And the worker still serves good jobs afterwards.
    let good_ids = s.produce_rows("good", 3).await;

    let recs = wait_all_terminal(&mut s.conn, &s.model, &ids, WAIT).await;
    for ((id, _, says, kind), rec) in cases.iter().zip(&recs) {
        assert_failed(rec, id, says, *kind);
    }
    assert_failed(
        &recs[cases.len()],
        "v2",
        "unsupported protocol version",
        Some("invalid"),
    );
    let goods = wait_all_terminal(&mut s.conn, &s.model, &good_ids, WAIT).await;
    for (i, rec) in goods.iter().enumerate() {
        assert_eq!(rec["status"], "succeeded", "{rec:?}");
        let expected = s.reference.output_rows(i..i + 1);
        assert_outputs(&outputs_of(rec), &expected, &good_ids[i]);
    }

    // A refused reply_to is never written to, nor is any other key outside the model's.
    let touched: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut s.conn)
        .await
        .unwrap();
    let keys = Keys::new(&s.model);
    let outside: Vec<&String> = touched
        .iter()
        .filter(|k| !k.starts_with(&format!("inferq:{{{}}}:", s.model)))
        .collect();
    assert!(
        outside.is_empty(),
        "keys written outside the model's: {outside:?}"
    );
    // Records exist exactly for the jobs that named a valid id.
    let mut records: Vec<String> = touched
        .iter()
        .filter_map(|k| k.strip_prefix(&keys.result("")).map(str::to_owned))
        .collect();
    records.sort();
    let mut expected: Vec<String> = ids.iter().chain(&good_ids).cloned().collect();
    expected.push("warm-up-0".into());
    expected.sort();
    assert_eq!(records, expected, "job records");

    let dead: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(keys.dlq())
        .arg("-")
        .arg("+")
        .query_async(&mut s.conn)
        .await
        .unwrap();
    assert_eq!(
        dead.len(),
        2,
        "both id-less entries are dead-lettered: {dead:?}"
    );
    for (_, f) in &dead {
        let error = f
            .iter()
            .find(|(k, _)| k == "error")
            .map(|(_, v)| v.as_str());
        assert!(
            error.is_some_and(|e| e.contains("no valid `id`")),
            "dead letter without the reason: {f:?}"
        );
    }
    wait_no_pending(&mut s.conn, &s.model, WAIT).await;
    assert!(worker.shutdown().await, "the worker drains");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_job_fails_alone_while_its_batch_succeeds() {
    let mut s = setup().await;
    // Everything is queued before the worker starts, so its first read takes all of
    // it and the valid jobs form one batch.
    let mut entries = Vec::new();
    let mut expected = Vec::new();
    for i in 0..8 {
        let id = format!("job-{i}");
        let entry = match i {
            2 => json_job(
                &id,
                &[tensor("input", &[1, 21], TensorData::Fp32(vec![0.5; 21]))],
            ),
            5 => {
                // A binary payload cut short inside the tensor's data.
                let mut bin = inferq::protocol::binary::encode(&cycled_inputs(&s.reference, i, 1))
                    .expect("encode");
                bin.truncate(bin.len() - 40);
                JobEntry {
                    payload: inferq::protocol::job::Payload::Binary(bin),
                    ..json_job(&id, &[])
                }
            }
            _ => {
                expected.push((id.clone(), i));
                json_job(&id, &cycled_inputs(&s.reference, i, 1))
            }
        };
        entries.push(entry);
    }
    // Valid for the signature, odd for the model: NaN and the largest floats.
    let odd = |id: &str, v: f32| {
        bin_job(
            id,
            &[tensor("input", &[1, 20], TensorData::Fp32(vec![v; 20]))],
        )
    };
    entries.push(odd("nan", f32::NAN));
    entries.push(odd("huge", f32::MAX));
    produce_all(&mut s.conn, &s.model, &entries).await;
    let worker = start_worker(&s.redis, &s.registry, worker_config(&s.model, "w")).await;

    let ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
    let recs = wait_all_terminal(&mut s.conn, &s.model, &ids, WAIT).await;
    assert_failed(
        &recs[2],
        "job-2",
        "dimension 1 is 21, expected 20",
        Some("invalid"),
    );
    assert_failed(
        &recs[5],
        "job-5",
        "truncated in input `input` data",
        Some("invalid"),
    );
    for (id, row) in &expected {
        let rec = &recs[ids.iter().position(|x| x == id).unwrap()];
        assert_eq!(rec["status"], "succeeded", "{id}: {rec:?}");
        assert_outputs(
            &outputs_of(rec),
            &s.reference.output_rows(*row..*row + 1),
            id,
        );
    }
    for rec in &recs[8..] {
        assert_eq!(
            rec["status"], "succeeded",
            "NaN and huge inputs are the model's business: {rec:?}"
        );
    }
    assert_eq!(
        metric("inferq_batch_jobs_count", &s.model),
        1.0,
        "one batch"
    );
    assert_eq!(
        metric("inferq_batch_jobs_sum", &s.model),
        8.0,
        "of the 8 valid jobs"
    );
    wait_no_pending(&mut s.conn, &s.model, WAIT).await;
    assert!(worker.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_past_its_deadline_expires_uncomputed_and_is_acknowledged() {
    let mut s = setup().await;
    let now = inferq::now_ms();
    let row = |i| cycled_inputs(&s.reference, i, 1);
    let with_deadline = |id: &str, i, deadline_ms| JobEntry {
        deadline_ms: Some(deadline_ms),
        reply_to: Some(reply_key(&s.model, id)),
        ..json_job(id, &row(i))
    };
    let entries = vec![
        with_deadline("past", 0, now - 1000),
        // Still valid when queued; passes while nobody serves the model.
        with_deadline("passes-while-queued", 1, now + 200),
        with_deadline("future", 2, now + 60_000),
        json_job("none", &row(3)),
    ];
    produce_all(&mut s.conn, &s.model, &entries).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let worker = start_worker(&s.redis, &s.registry, worker_config(&s.model, "w")).await;

    let ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
    let recs = wait_all_terminal(&mut s.conn, &s.model, &ids, WAIT).await;
    for (rec, id) in recs[..2].iter().zip(&ids) {
        assert_eq!(rec["status"], "expired", "{id}: {rec:?}");
        assert_eq!(rec["error_kind"], "expired", "{id}");
        assert!(rec["error"].contains("deadline"), "{id}: {rec:?}");
        assert!(!rec.contains_key("outputs"), "{id} was computed: {rec:?}");
        let pushed = list(&mut s.conn, &reply_key(&s.model, id)).await;
        assert_eq!(pushed.len(), 1, "{id}: the producer hears about it once");
        assert!(pushed[0].contains(r#""status":"expired""#), "{}", pushed[0]);
    }
    for (rec, i) in recs[2..].iter().zip(2..) {
        assert_eq!(rec["status"], "succeeded", "{rec:?}");
        assert_outputs(
            &outputs_of(rec),
            &s.reference.output_rows(i..i + 1),
            &ids[i],
        );
    }
    assert_eq!(
        metric("inferq_batch_rows_sum", &s.model),
        2.0,
        "only 2 rows computed"
    );
    wait_no_pending(&mut s.conn, &s.model, WAIT).await;
    assert!(worker.shutdown().await);
}

/// `inferq dlq <args>` against this test's Redis.
async fn dlq(redis: &RedisServer, args: &[&str]) -> String {
    let mut cmd = inferq_command();
    cmd.env("INFERQ_REDIS_URL", redis.url())
        .arg("dlq")
        .args(args);
    tokio::task::spawn_blocking(move || run_ok(&mut cmd))
        .await
        .expect("dlq command")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_failing_every_attempt_is_dead_lettered_then_replayed_after_the_fix() {
    let mut s = setup().await;
    // Version 2's file no longer matches its manifest: a retryable failure (an
    // operator may restore the file), so the job is retried, then dead-lettered.
    s.registry.add_as("tutorial-rf", &s.model);
    s.registry.registry.pin(&s.model, 1).expect("pin v1");
    let file = s
        .registry
        .path()
        .join(&s.model)
        .join("2")
        .join("model.onnx");
    let original = std::fs::read(&file).expect("v2 file");
    let mut tampered = original.clone();
    tampered.extend_from_slice(b"tampered");
    std::fs::write(&file, &tampered).expect("tamper v2");

    let mut cfg = worker_config(&s.model, "w");
    cfg.queue.max_attempts = 2;
    cfg.queue.claim_after = Duration::from_millis(300);
    let worker = start_worker(&s.redis, &s.registry, cfg).await;
    s.warm_up(WAIT).await;

    let reply = reply_key(&s.model, "doomed");
    let doomed = JobEntry {
        version: Some(2),
        reply_to: Some(reply.clone()),
        ..json_job("doomed", &cycled_inputs(&s.reference, 4, 1))
    };
    produce_entry(&mut s.conn, &s.model, &doomed).await;
    produce(
        &mut s.conn,
        &s.model,
        "fine",
        &cycled_inputs(&s.reference, 5, 1),
    )
    .await;

    let rec = wait_terminal(&mut s.conn, &s.model, "doomed", WAIT).await;
    assert_failed(
        &rec,
        "doomed",
        "does not match its manifest",
        Some("dead_lettered"),
    );
    assert!(
        rec["error"].contains("gave up after 2 deliveries"),
        "{rec:?}"
    );
    assert_eq!(rec.get("dead_lettered").map(String::as_str), Some("1"));
    assert!(attempts(&rec) >= 2, "{rec:?}");
    let pushed = list(&mut s.conn, &reply).await;
    assert_eq!(pushed.len(), 1, "one reply: {pushed:?}");
    assert!(
        pushed[0].contains(r#""dead_lettered":true"#),
        "{}",
        pushed[0]
    );
    assert_eq!(
        wait_terminal(&mut s.conn, &s.model, "fine", WAIT).await["status"],
        "succeeded"
    );
    assert_eq!(metric("inferq_jobs_dead_lettered_total", &s.model), 1.0);
    wait_no_pending(&mut s.conn, &s.model, WAIT).await;

    let listed = dlq(&s.redis, &["list", &s.model]).await;
    assert!(
        listed.contains("doomed") && listed.contains("does not match its manifest"),
        "{listed}"
    );
    assert!(listed.contains("1 dead letter(s)"), "{listed}");

    // The operator restores the file and re-drives the job: a fresh run, attempts reset.
    std::fs::write(&file, &original).expect("restore v2");
    let replayed = dlq(&s.redis, &["replay", &s.model]).await;
    assert!(replayed.contains("replayed 1 job(s): doomed"), "{replayed}");
    let rec = wait_terminal(&mut s.conn, &s.model, "doomed", WAIT).await;
    assert_eq!(rec["status"], "succeeded", "{rec:?}");
    assert_eq!(attempts(&rec), 1, "attempts start over: {rec:?}");
    assert_eq!(rec["version"], "2");
    assert!(!rec.contains_key("dead_lettered"), "{rec:?}");
    assert_outputs(
        &outputs_of(&rec),
        &s.reference.output_rows(4..5),
        "replayed",
    );
    let keys = Keys::new(&s.model);
    let left: u64 = redis::cmd("XLEN")
        .arg(keys.dlq())
        .query_async(&mut s.conn)
        .await
        .unwrap();
    assert_eq!(left, 0, "a replayed job leaves the dead letters");

    // An entry without an id is dead-lettered at once; purge removes it.
    xadd(&mut s.conn, &s.model, &[("v", "1"), ("body", "{}")]).await;
    let deadline = std::time::Instant::now() + WAIT;
    while redis::cmd("XLEN")
        .arg(keys.dlq())
        .query_async::<u64>(&mut s.conn)
        .await
        .unwrap()
        == 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the id-less entry never reached the dead letters"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let purged = dlq(&s.redis, &["purge", &s.model]).await;
    assert!(purged.contains("purged 1 dead letter(s)"), "{purged}");
    let listed = dlq(&s.redis, &["list", &s.model]).await;
    assert!(listed.contains("0 dead letter(s)"), "{listed}");
    assert!(worker.shutdown().await);
}
