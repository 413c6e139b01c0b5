//! What a submit answers when Redis does not, or cannot, take it, and what makes two
//! submits of one id the same job: a write Redis did not confirm in time (paused with
//! `CLIENT PAUSE … WRITE`) answers 202 with the id, never "nothing was enqueued"
//! (AUDIT D6), while a write Redis refused (out of memory) answers 503 and enqueues
//! nothing; an idempotency key names one route and one version (AUDIT D9).

mod common;

use std::time::{Duration, Instant};

use common::http::{Client, Gateway, GatewayOptions, Resp, infer_body, xlen};
use common::{RedisServer, Reference, TempRegistry};
use hyper::Method;
use serde_json::{Value, json};

const RF: &str = "tutorial-rf";
const JOBS: &str = "/v1/models/tutorial-rf/jobs";
const INFER: &str = "/v2/models/tutorial-rf/infer";

async fn redis_cmd(redis: &RedisServer, args: &[&str]) -> redis::Value {
    let mut conn = redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

/// Waits until the model's stream holds `n` entries.
async fn wait_xlen(redis: &RedisServer, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = xlen(redis, RF).await;
        if now == n {
            return;
        }
        assert!(Instant::now() < deadline, "XLEN {now}, expected {n}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Asserts a 202 whose outcome is unknown; returns the job id.
#[track_caller]
fn expect_unconfirmed(resp: &Resp) -> String {
    resp.expect(202);
    let v = resp.json();
    assert_eq!(v["status"], "unknown", "{v}");
    let id = v["id"].as_str().expect("an id").to_owned();
    let url = format!("{JOBS}/{id}");
    assert_eq!(v["status_url"], url.as_str(), "{v}");
    assert_eq!(resp.header("location"), Some(url.as_str()));
    let msg = v["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("may or may not be queued") && msg.contains(&id),
        "the message says the outcome is unknown and how to resubmit: {msg}"
    );
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submit_redis_did_not_confirm_answers_202_with_the_id_it_runs_under() {
    let redis = RedisServer::start();
    let reg = TempRegistry::with_models(&[RF]);
    let r = Reference::load(RF);
    let timeout = Duration::from_millis(500);
    let opts = GatewayOptions {
        redis_timeout: Some(timeout),
        ..GatewayOptions::default()
    };
    let gw = Gateway::start_with(&redis, &reg, &["--sync-timeout-ms", "200"], opts).await;
    let c = gw.client();
    let bodies: Vec<String> = (0..3)
        .map(|i| infer_body(&r.input_rows(i..i + 1), json!({})))
        .collect();
    // One submit first loads the script: a paused EVALSHA of an unknown script would
    // only answer NOSCRIPT once Redis resumes, after the gateway gave up.
    c.post(JOBS, bodies[2].clone()).await.expect(202);

    // Redis holds every write for 5 s: the scripts run after the gateway gave up.
    redis_cmd(&redis, &["CLIENT", "PAUSE", "5000", "WRITE"]).await;
    let t0 = Instant::now();
    let async_id = expect_unconfirmed(&c.post(JOBS, bodies[0].clone()).await);
    let sync_id = expect_unconfirmed(&c.post(INFER, bodies[1].clone()).await);
    let took = t0.elapsed();
    assert!(
        took >= timeout * 2 && took < Duration::from_secs(4),
        "two unconfirmed submits took {took:?}"
    );
    redis_cmd(&redis, &["CLIENT", "UNPAUSE"]).await;

    // Both were enqueued after all, under the ids the client was given.
    wait_xlen(&redis, 3).await;
    for id in [&async_id, &sync_id] {
        let rec = c.get(&format!("{JOBS}/{id}")).await.expect(200).json();
        assert_eq!(rec["status"], "queued", "{rec}");
    }
    // Resubmitting with the id is the same job, not a second one.
    let again = with_key(&c, JOBS, &async_id, &bodies[0]).await;
    assert_eq!(again.expect(200).json()["id"], async_id.as_str());
    let again = with_key(&c, INFER, &sync_id, &bodies[1]).await;
    assert_eq!(again.expect(202).json()["id"], sync_id.as_str());
    assert_eq!(xlen(&redis, RF).await, 3, "resubmits enqueue nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submit_redis_refused_is_503_and_enqueues_nothing() {
    let redis = RedisServer::start();
    let reg = TempRegistry::with_models(&[RF]);
    let r = Reference::load(RF);
    let gw = Gateway::start(&redis, &reg, &["--sync-timeout-ms", "200"]).await;
    let c = gw.client();
    let body = infer_body(&r.input_rows(0..1), json!({}));

    // Out of memory: Redis answers, refusing the whole script.
    redis_cmd(&redis, &["CONFIG", "SET", "maxmemory", "1"]).await;
    for path in [JOBS, INFER] {
        let resp = c.post(path, body.clone()).await;
        let msg = resp.expect_error(503, "unavailable");
        assert!(msg.contains("out of memory"), "{path}: {msg}");
        assert_eq!(resp.header("retry-after"), Some("1"), "{path}");
    }
    redis_cmd(&redis, &["CONFIG", "SET", "maxmemory", "0"]).await;
    assert_eq!(xlen(&redis, RF).await, 0, "nothing was enqueued");
    c.post(JOBS, body).await.expect(202);
    assert_eq!(xlen(&redis, RF).await, 1, "Redis takes jobs again");
}

/// POSTs `body` under `Idempotency-Key: key`.
async fn with_key(c: &Client, path: &str, key: &str, body: &str) -> Resp {
    c.send(
        Method::POST,
        path,
        &[("idempotency-key", key)],
        body.to_owned().into(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_is_one_request_on_one_route_and_one_version() {
    let redis = RedisServer::start();
    let reg = TempRegistry::with_models(&["iris-f64"]);
    reg.add("iris-f64"); // version 2, the default
    let gw = Gateway::start(&redis, &reg, &["--sync-timeout-ms", "100"]).await;
    let c = gw.client();
    let body = json!({ "features": [[5.1, 3.5, 1.4, 0.2]] }).to_string();
    let v1 = "/v2/models/iris-f64/versions/1/infer";
    let v2 = "/v2/models/iris-f64/versions/2/infer";
    let default = "/v2/models/iris-f64/infer";
    let jobs = "/v1/models/iris-f64/jobs";
    let id = |resp: &Resp| -> Value { resp.json()["id"].clone() };

    // Version 1 first; the same key and body on version 2 is another request.
    let first = with_key(&c, v1, "k1", &body).await;
    assert_eq!(id(first.expect(202)), "k1");
    let msg = with_key(&c, v2, "k1", &body)
        .await
        .expect_error(409, "conflict");
    assert!(msg.contains("k1"), "{msg}");
    // The same route and version again is the same job.
    assert_eq!(id(with_key(&c, v1, "k1", &body).await.expect(202)), "k1");

    // The default version resolves to 2: the same job as naming version 2 ...
    assert_eq!(
        id(with_key(&c, default, "k2", &body).await.expect(202)),
        "k2"
    );
    assert_eq!(id(with_key(&c, v2, "k2", &body).await.expect(202)), "k2");
    // ... but not the same job as the asynchronous route, on that same version.
    with_key(&c, jobs, "k2", &body)
        .await
        .expect_error(409, "conflict");
    // And the other way round.
    with_key(&c, jobs, "k3", &body).await.expect(202);
    with_key(&c, default, "k3", &body)
        .await
        .expect_error(409, "conflict");
    assert_eq!(
        xlen(&redis, "iris-f64").await,
        3,
        "one job per key: k1, k2, k3"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_infer_whose_wait_fails_after_the_enqueue_answers_202_with_the_id() {
    let mut redis = RedisServer::start();
    let reg = TempRegistry::with_models(&[RF]);
    let r = Reference::load(RF);
    let gw = Gateway::start(&redis, &reg, &["--sync-timeout-ms", "1000"]).await;
    let c = gw.client();
    let body = infer_body(&r.input_rows(0..1), json!({}));
    let infer = {
        let c = c.clone();
        tokio::spawn(async move { c.post(INFER, body).await })
    };
    // Enqueued (no worker runs it); then Redis goes away while the infer waits.
    wait_xlen(&redis, 1).await;
    redis.kill();
    let resp = infer.await.expect("infer task");
    resp.expect(202);
    let v = resp.json();
    assert_eq!(v["status"], "queued", "{v}");
    let id = v["id"].as_str().expect("an id");
    assert_eq!(v["status_url"], format!("{JOBS}/{id}").as_str(), "{v}");
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("the job is queued")),
        "{v}"
    );
}
