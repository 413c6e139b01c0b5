//! The job routes over real sockets, with a real redis-server and an in-process
//! worker: submit → poll → outputs equal to the runtime's reference, synchronous
//! infer (and its 202 past the timeout), long-poll wake-up latency, 1,000 concurrent
//! long-polls on a bounded number of Redis connections, idempotent submits (body `id`
//! and `Idempotency-Key`), and cancel.

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::http::{
    Client, Gateway, infer_body, redis_clients, response_outputs, start_worker, xlen,
};
use common::{RedisServer, Reference, TempRegistry, assert_outputs};
use futures_util::future::join_all;
use hyper::Method;
use serde_json::{Value, json};

const MODEL: &str = "tutorial-rf";
const JOBS: &str = "/v1/models/tutorial-rf/jobs";

fn setup() -> (RedisServer, TempRegistry, Reference) {
    (
        RedisServer::start(),
        TempRegistry::with_models(&[MODEL]),
        Reference::load(MODEL),
    )
}

/// A one-row `features` body from reference row `i` (mod the rows there are).
fn row_body(r: &Reference, i: usize) -> String {
    let row = i % r.rows();
    infer_body(&r.input_rows(row..row + 1), json!({}))
}

/// Submits and returns the 202 body.
async fn submit(c: &Client, body: String) -> Value {
    let r = c.post(JOBS, body).await;
    r.expect(202);
    r.json()
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_poll_and_sync_infer_return_the_runtime_outputs() {
    let (redis, reg, r) = setup();
    let gw = Gateway::start(&redis, &reg, &[]).await;
    let worker = start_worker(&redis, &reg, &gw.settings).await;
    let c = gw.client();

    // Asynchronous: 202 with id, status and status_url (also as Location), then poll.
    let all = r.rows();
    let resp = c.post(JOBS, infer_body(&r.inputs, json!({}))).await;
    resp.expect(202);
    let v = resp.json();
    let id = v["id"].as_str().expect("an id").to_owned();
    assert!(
        id.len() == 32 && id.chars().all(|ch| ch.is_ascii_hexdigit()),
        "a generated id is 128 random bits in hex: {id}"
    );
    assert_eq!(v["status"], "queued");
    let url = format!("{JOBS}/{id}");
    assert_eq!(v["status_url"], url.as_str());
    assert_eq!(resp.header("location"), Some(url.as_str()));
    let rec = c.wait_terminal(&url, Duration::from_secs(30)).await;
    assert_eq!(rec["status"], "succeeded", "{rec}");
    assert_eq!(
        (rec["id"].as_str(), rec["model"].as_str()),
        (Some(id.as_str()), Some(MODEL))
    );
    assert_eq!(rec["version"], 1);
    assert!(rec["attempts"].as_u64() >= Some(1), "{rec}");
    let (enq, start, fin) = (&rec["enqueued_ms"], &rec["started_ms"], &rec["finished_ms"]);
    assert!(
        enq.as_u64() <= start.as_u64() && start.as_u64() <= fin.as_u64(),
        "{rec}"
    );
    assert_outputs(
        &response_outputs(&rec["outputs"]),
        &r.output_rows(0..all),
        "polled outputs",
    );

    // Synchronous: the OIP response itself.
    let resp = c
        .post(
            "/v2/models/tutorial-rf/infer",
            infer_body(&r.input_rows(0..8), json!({})),
        )
        .await;
    resp.expect(200);
    let v = resp.json();
    assert_eq!(
        (v["model_name"].as_str(), v["model_version"].as_str()),
        (Some(MODEL), Some("1"))
    );
    assert_outputs(&response_outputs(&v), &r.output_rows(0..8), "sync infer");

    // A version in the path, and the tutorial's `features` shorthand for the same rows.
    let rows: Vec<Vec<f64>> = (8..16)
        .map(|i| match &r.input_rows(i..i + 1)[0].data {
            inferq::protocol::TensorData::Fp32(x) => x.iter().map(|&f| f64::from(f)).collect(),
            other => panic!("tutorial-rf input is FP32, not {other:?}"),
        })
        .collect();
    let resp = c
        .post(
            "/v2/models/tutorial-rf/versions/1/infer",
            json!({ "features": rows }).to_string(),
        )
        .await;
    resp.expect(200);
    assert_outputs(
        &response_outputs(&resp.json()),
        &r.output_rows(8..16),
        "features shorthand",
    );
    assert!(worker.shutdown().await, "the worker drains");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_infer_past_its_timeout_answers_202_with_the_status_url() {
    let (redis, reg, r) = setup();
    let gw = Gateway::start(&redis, &reg, &["--sync-timeout-ms", "300"]).await;
    let c = gw.client();
    let t0 = Instant::now();
    let resp = c
        .post("/v2/models/tutorial-rf/infer", row_body(&r, 0))
        .await;
    let took = t0.elapsed();
    resp.expect(202);
    assert!(
        took >= Duration::from_millis(290) && took < Duration::from_secs(5),
        "answered after {took:?}, the timeout is 300 ms"
    );
    let v = resp.json();
    let id = v["id"].as_str().expect("an id");
    let url = format!("{JOBS}/{id}");
    assert_eq!(
        (v["status"].as_str(), v["status_url"].as_str()),
        (Some("queued"), Some(url.as_str()))
    );
    assert_eq!(resp.header("location"), Some(url.as_str()));
    let rec = c.get(&url).await;
    rec.expect(200);
    assert_eq!(rec.json()["status"], "queued");
    assert_eq!(
        xlen(&redis, MODEL).await,
        1,
        "the job stays queued for a worker"
    );

    // A worker that comes later still computes it.
    let worker = start_worker(&redis, &reg, &gw.settings).await;
    let rec = c.wait_terminal(&url, Duration::from_secs(30)).await;
    assert_eq!(rec["status"], "succeeded", "{rec}");
    assert_outputs(
        &response_outputs(&rec["outputs"]),
        &r.output_rows(0..1),
        "late job",
    );
    assert!(worker.shutdown().await);
}

/// Starts `GET url?wait=5` in a task; returns when the gateway holds its waiter. The
/// task yields the response body and the instant (and unix ms) it arrived.
async fn long_poll(gw: &Gateway, url: &str) -> tokio::task::JoinHandle<(Value, Instant, u64)> {
    let c = gw.client();
    let url = format!("{url}?wait=5");
    let task = tokio::spawn(async move {
        let r = c.get(&url).await;
        let (at, ms) = (Instant::now(), unix_ms());
        r.expect(200);
        (r.json(), at, ms)
    });
    gw.wait_waiters(1, Duration::from_secs(5)).await;
    task
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_answers_within_50ms_of_the_result() {
    let (redis, reg, r) = setup();
    let gw = Gateway::start(&redis, &reg, &[]).await;
    let c = gw.client();

    // Terminal write by a cancel: from sending DELETE to the long-poll's answer.
    let id = submit(&c, row_body(&r, 0)).await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let url = format!("{JOBS}/{id}");
    let poll = long_poll(&gw, &url).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !poll.is_finished(),
        "the long-poll answered before the job was terminal"
    );
    let t0 = Instant::now();
    c.delete(&url).await.expect(200);
    let (rec, at, _) = poll.await.expect("long-poll task");
    let latency = at.duration_since(t0);
    assert_eq!(rec["status"], "cancelled", "{rec}");
    eprintln!("long-poll answered {latency:?} after sending the cancel");
    assert!(
        latency < Duration::from_millis(50),
        "long-poll answered {latency:?} after the cancel"
    );

    // Terminal write by a worker: from its finished_ms to the long-poll's answer.
    let id = submit(&c, row_body(&r, 1)).await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let url = format!("{JOBS}/{id}");
    let poll = long_poll(&gw, &url).await;
    let worker = start_worker(&redis, &reg, &gw.settings).await;
    let (rec, _, answered_ms) = poll.await.expect("long-poll task");
    assert_eq!(rec["status"], "succeeded", "{rec}");
    let finished = rec["finished_ms"].as_u64().expect("finished_ms");
    let latency = answered_ms.saturating_sub(finished);
    eprintln!("long-poll answered {latency} ms after the worker's finished_ms");
    assert!(
        latency < 50,
        "long-poll answered {latency} ms after the worker finished"
    );
    assert_outputs(
        &response_outputs(&rec["outputs"]),
        &r.output_rows(1..2),
        "long-poll",
    );
    gw.wait_waiters(0, Duration::from_secs(1)).await;
    assert!(worker.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_long_polls_use_few_redis_connections() {
    const N: usize = 1000;
    let (redis, reg, r) = setup();
    let gw = Gateway::start(&redis, &reg, &[]).await;
    let c = gw.client();
    let mut urls = Vec::with_capacity(N);
    for chunk in (0..N).collect::<Vec<_>>().chunks(50) {
        let subs = join_all(chunk.iter().map(|&i| submit(&c, row_body(&r, i)))).await;
        urls.extend(
            subs.iter()
                .map(|v| v["status_url"].as_str().expect("url").to_owned()),
        );
    }
    let polls: Vec<_> = urls
        .iter()
        .map(|u| {
            let (c, u) = (c.clone(), format!("{u}?wait=30"));
            tokio::spawn(async move { c.get(&u).await })
        })
        .collect();
    gw.wait_waiters(N, Duration::from_secs(30)).await;
    let during = redis_clients(&redis).await;
    eprintln!("{during} Redis connections while {N} long-polls wait");
    assert!(
        during < 20,
        "{during} Redis connections while {N} long-polls wait"
    );

    let t0 = Instant::now();
    let worker = start_worker(&redis, &reg, &gw.settings).await;
    let all = tokio::time::timeout(Duration::from_secs(60), join_all(polls))
        .await
        .expect("every long-poll answers within 60 s");
    for (i, resp) in all.into_iter().enumerate() {
        let resp = resp.expect("long-poll task");
        resp.expect(200);
        let v = resp.json();
        assert_eq!(v["status"], "succeeded", "poll {i}: {v}");
        let row = i % r.rows();
        assert_outputs(
            &response_outputs(&v["outputs"]),
            &r.output_rows(row..row + 1),
            "poll",
        );
    }
    eprintln!(
        "{N} long-polls answered {:?} after the worker started",
        t0.elapsed()
    );
    gw.wait_waiters(0, Duration::from_secs(5)).await;
    let after = redis_clients(&redis).await;
    assert!(after < 20, "{after} Redis connections after the long-polls");
    assert!(worker.shutdown().await);
}

/// Sends the same submit `n` times at once; returns the responses.
async fn concurrent_submits(
    c: &Client,
    body: &str,
    headers: &[(&str, &str)],
    n: usize,
) -> Vec<common::http::Resp> {
    join_all((0..n).map(|_| {
        let mut h = vec![("content-type", "application/json")];
        h.extend_from_slice(headers);
        let body = body.to_owned();
        async move { c.send(Method::POST, JOBS, &h, body.into()).await }
    }))
    .await
}

/// Exactly one 202, the rest 200 with the (queued) record, all naming `id`.
fn assert_one_created(resps: &[common::http::Resp], id: &str) {
    let created = resps.iter().filter(|r| r.status == 202).count();
    assert_eq!(created, 1, "one submit creates the job: {resps:?}");
    for r in resps {
        let v = r.json();
        assert_eq!(v["id"], id, "{v}");
        if r.status != 202 {
            r.expect(200);
            assert_eq!(
                (v["status"].as_str(), v["model"].as_str()),
                (Some("queued"), Some(MODEL))
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_submits_of_one_id_enqueue_once() {
    let (redis, reg, r) = setup();
    let gw = Gateway::start(&redis, &reg, &[]).await;
    let c = gw.client();

    // Client id in the body.
    let body = infer_body(&r.input_rows(0..2), json!({ "id": "order-42" }));
    assert_one_created(&concurrent_submits(&c, &body, &[], 20).await, "order-42");
    assert_eq!(xlen(&redis, MODEL).await, 1, "one stream entry");
    let other = infer_body(&r.input_rows(2..4), json!({ "id": "order-42" }));
    let msg = c.post(JOBS, other).await.expect_error(409, "conflict");
    assert!(msg.contains("order-42"), "{msg}");

    // Idempotency-Key header.
    let body = infer_body(&r.input_rows(4..5), json!({}));
    let key = [("idempotency-key", "key-7")];
    assert_one_created(&concurrent_submits(&c, &body, &key, 20).await, "key-7");
    assert_eq!(xlen(&redis, MODEL).await, 2, "one more stream entry");
    let other = infer_body(&r.input_rows(5..6), json!({}));
    let resp = concurrent_submits(&c, &other, &key, 1).await;
    resp[0].expect_error(409, "conflict");
    assert_eq!(
        xlen(&redis, MODEL).await,
        2,
        "nothing enqueued on a conflict"
    );

    // After the job ran, the same submit answers its finished record; nothing re-runs.
    let worker = start_worker(&redis, &reg, &gw.settings).await;
    c.wait_terminal(&format!("{JOBS}/order-42"), Duration::from_secs(30))
        .await;
    let again = c.post(JOBS, body_with_id(&r, "order-42")).await;
    again.expect(200);
    let v = again.json();
    assert_eq!(v["status"], "succeeded", "{v}");
    assert_outputs(
        &response_outputs(&v["outputs"]),
        &r.output_rows(0..2),
        "resubmit",
    );
    assert_eq!(xlen(&redis, MODEL).await, 2, "a resubmit enqueues nothing");
    assert!(worker.shutdown().await);
}

fn body_with_id(r: &Reference, id: &str) -> String {
    infer_body(&r.input_rows(0..2), json!({ "id": id }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_then_conflict_and_unknown_jobs_are_404() {
    let (redis, reg, r) = setup();
    let gw = Gateway::start(&redis, &reg, &[]).await;
    let c = gw.client();
    let id = submit(&c, row_body(&r, 3)).await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let url = format!("{JOBS}/{id}");
    let resp = c.delete(&url).await;
    resp.expect(200);
    let v = resp.json();
    assert_eq!(
        (v["id"].as_str(), v["status"].as_str()),
        (Some(id.as_str()), Some("cancelled"))
    );
    assert_eq!(v["error_kind"], "cancelled");
    assert!(v.get("outputs").is_none(), "{v}");
    let msg = c.delete(&url).await.expect_error(409, "conflict");
    assert!(msg.contains("cancelled"), "{msg}");

    for path in [
        format!("{JOBS}/never-submitted"),
        format!("{JOBS}/bad%20id"),
        "/v1/models/no-such-model/jobs/x".to_owned(),
    ] {
        c.get(&path).await.expect_error(404, "not_found");
        c.delete(&path).await.expect_error(404, "not_found");
    }

    // A worker then passes over the cancelled job: it never shows outputs, and a
    // finished job cannot be cancelled.
    let worker = start_worker(&redis, &reg, &gw.settings).await;
    let done = submit(&c, row_body(&r, 4)).await["status_url"]
        .as_str()
        .expect("url")
        .to_owned();
    let rec = c.wait_terminal(&done, Duration::from_secs(30)).await;
    assert_eq!(rec["status"], "succeeded");
    let v = c.get(&url).await.json();
    assert_eq!(v["status"], "cancelled", "{v}");
    assert!(
        v.get("outputs").is_none(),
        "a cancelled job never shows outputs: {v}"
    );
    let msg = c.delete(&done).await.expect_error(409, "conflict");
    assert!(msg.contains("succeeded"), "{msg}");
    assert!(worker.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_long_polls_on_one_job_all_wake_and_deregister() {
    const N: usize = 200;
    let (redis, reg, r) = setup();
    let gw = Gateway::start(&redis, &reg, &[]).await;
    let c = gw.client();
    let url = submit(&c, row_body(&r, 0)).await["status_url"]
        .as_str()
        .expect("url")
        .to_owned();
    let polls: Vec<_> = (0..N)
        .map(|_| {
            let (c, u) = (c.clone(), format!("{url}?wait=30"));
            tokio::spawn(async move { c.get(&u).await })
        })
        .collect();
    // One job, so one notifier entry however many wait on it.
    gw.wait_waiters(1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.delete(&url).await.expect(200);
    let all = tokio::time::timeout(Duration::from_secs(10), join_all(polls))
        .await
        .expect("every long-poll answers after the cancel");
    for resp in all {
        let resp = resp.expect("poll task");
        assert_eq!(resp.expect(200).json()["status"], "cancelled");
    }
    gw.wait_waiters(0, Duration::from_secs(2)).await;
}

/// An ended job's hash gets the result TTL once, so it never outlives the result and
/// brings the job back: once the result is gone the job is 404, cannot be cancelled,
/// and its id is free for a new job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_result_expired_is_forgotten() {
    let (redis, reg, r) = setup();
    let gw = Gateway::start(&redis, &reg, &[]).await;
    let worker = start_worker(&redis, &reg, &gw.settings).await;
    let c = gw.client();
    let body = body_with_id(&r, "expiring");
    let url = format!("{JOBS}/expiring");
    submit(&c, body.clone()).await;
    let rec = c.wait_terminal(&url, Duration::from_secs(30)).await;
    assert_eq!(rec["status"], "succeeded", "{rec}");

    let mut conn = redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let keys = inferq::queue::Keys::new(MODEL);
    let ttl: i64 = redis::cmd("PTTL")
        .arg(keys.job("expiring"))
        .query_async(&mut conn)
        .await
        .expect("PTTL");
    assert!(ttl > 0, "the ended job's hash has the result TTL: {ttl}");
    // The result expires (first, or at the same moment as the hash).
    let _: () = redis::cmd("DEL")
        .arg(keys.result("expiring"))
        .query_async(&mut conn)
        .await
        .expect("DEL");
    c.get(&url).await.expect_error(404, "not_found");
    c.delete(&url).await.expect_error(404, "not_found");
    // 202, not 200: a new job, not the forgotten one.
    let again = submit(&c, body).await;
    assert_eq!(again["status"], "queued", "{again}");
    let rec = c.wait_terminal(&url, Duration::from_secs(30)).await;
    assert_eq!(rec["status"], "succeeded", "{rec}");
    assert!(worker.shutdown().await);
}
