//! What a submit answers when Redis does not, or cannot, take it, and what makes two
//! submits of one id the same job: a write Redis did not confirm in time (the server
//! stalled with `DEBUG SLEEP`, or writes paused with `CLIENT PAUSE … WRITE`) answers
//! 202 with the id, never "nothing was enqueued"
//! (AUDIT D6), while a write Redis refused (out of memory) answers 503 and enqueues
//! nothing; an idempotency key names one route and one version (AUDIT D9).

mod common;

use std::time::{Duration, Instant};

use common::http::{Client, Gateway, GatewayOptions, Resp, infer_body, xlen};
use common::{RedisOptions, RedisServer, Reference, TempRegistry};
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

/// Puts the whole server to sleep for `ms` (`DEBUG SLEEP`) and returns once it
/// sleeps (a PING no longer answers); the task ends when it wakes.
async fn stall(redis: &RedisServer, ms: u64) -> tokio::task::JoinHandle<()> {
    // Both connections are made while Redis still answers.
    let config =
        redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(30)));
    let mut sleeper = redis
        .client()
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .expect("connect");
    let mut probe = redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let secs = format!("{}", ms as f64 / 1000.0);
    let task = tokio::spawn(async move {
        let _: () = redis::cmd("DEBUG")
            .arg("SLEEP")
            .arg(&secs)
            .query_async(&mut sleeper)
            .await
            .expect("DEBUG SLEEP");
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ping = redis::cmd("PING");
        if tokio::time::timeout(
            Duration::from_millis(50),
            ping.query_async::<String>(&mut probe),
        )
        .await
        .is_err()
        {
            return task;
        }
        assert!(Instant::now() < deadline, "Redis never went to sleep");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submit_redis_did_not_confirm_answers_202_with_the_id_it_runs_under() {
    let redis = RedisServer::with(RedisOptions {
        args: vec!["--enable-debug-command".into(), "yes".into()],
        ..RedisOptions::default()
    });
    let reg = TempRegistry::with_models(&[RF]);
    let r = Reference::load(RF);
    let timeout = Duration::from_millis(500);
    let opts = GatewayOptions {
        redis_timeout: Some(timeout),
        ..GatewayOptions::default()
    };
    let gw = Gateway::start_with(&redis, &reg, &["--sync-timeout-ms", "200"], opts).await;
    let c = gw.client();
    let bodies: Vec<String> = (0..4)
        .map(|i| infer_body(&r.input_rows(i..i + 1), json!({})))
        .collect();
    // One submit first loads the script: a stalled EVALSHA of an unknown script would
    // only answer NOSCRIPT once Redis wakes, after the gateway gave up.
    c.post(JOBS, bodies[3].clone()).await.expect(202);

    // Redis stalls for 2 s with the submit in its socket: it runs the script once it
    // wakes, after the gateway gave up waiting for the answer. Both routes.
    for (n, (path, body)) in [(JOBS, &bodies[0]), (INFER, &bodies[1])]
        .into_iter()
        .enumerate()
    {
        let asleep = stall(&redis, 2000).await;
        let t0 = Instant::now();
        let id = expect_unconfirmed(&c.post(path, body.clone()).await);
        let took = t0.elapsed();
        assert!(
            took >= timeout && took < Duration::from_secs(2),
            "{path}: answered after {took:?}"
        );
        asleep.await.expect("DEBUG SLEEP task");
        wait_xlen(&redis, 2 + n as u64).await;
        let rec = c.get(&format!("{JOBS}/{id}")).await.expect(200).json();
        assert_eq!(rec["status"], "queued", "{path}: the job is there: {rec}");
        // Resubmitting with the id is the same job, not a second one.
        let again = with_key(&c, path, &id, body).await;
        assert_eq!(again.json()["id"], id.as_str(), "{path}");
        assert_eq!(
            xlen(&redis, RF).await,
            2 + n as u64,
            "{path}: no second job"
        );
    }

    // Writes paused: whether the script ran or not, the id the client was given,
    // resubmitted, ends as exactly one job.
    redis_cmd(&redis, &["CLIENT", "PAUSE", "3000", "WRITE"]).await;
    let id = expect_unconfirmed(&c.post(JOBS, bodies[2].clone()).await);
    redis_cmd(&redis, &["CLIENT", "UNPAUSE"]).await;
    let again = with_key(&c, JOBS, &id, &bodies[2]).await;
    assert!(
        [200, 202].contains(&again.status.as_u16()),
        "{}",
        again.text()
    );
    assert_eq!(again.json()["id"], id.as_str());
    assert_eq!(xlen(&redis, RF).await, 4, "one job per id");
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
