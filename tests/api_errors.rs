//! The refusals of the front door over real sockets, with a real redis-server: API
//! keys on every route but health (401/403), invalid inputs (400 naming the input),
//! 429 with Retry-After past `max_queue`, and 503 from a Redis filled to its
//! `maxmemory`. Nothing is enqueued on any of them.

mod common;

use std::collections::HashMap;

use common::http::{Client, Gateway, Resp, infer_body, xlen};
use common::queue::{cycled_inputs, set_maxmemory};
use common::{RedisOptions, RedisServer, Reference, TempRegistry};
use hyper::Method;
use serde_json::{Value, json};

const RF: &str = "tutorial-rf";

/// A valid one-row body for tutorial-rf.
fn rf_row(r: &Reference, i: usize) -> String {
    infer_body(&r.input_rows(i..i + 1), json!({}))
}

/// Every route but health, with a body where it takes one.
fn guarded_routes(r: &Reference) -> Vec<(Method, &'static str, String)> {
    let body = rf_row(r, 0);
    let get = |p| (Method::GET, p, String::new());
    vec![
        get("/v2"),
        get("/v2/models/tutorial-rf"),
        get("/v2/models/tutorial-rf/versions/1"),
        get("/v2/models/tutorial-rf/ready"),
        get("/v2/models/tutorial-rf/versions/1/ready"),
        (Method::POST, "/v2/models/tutorial-rf/infer", body.clone()),
        (
            Method::POST,
            "/v2/models/tutorial-rf/versions/1/infer",
            body.clone(),
        ),
        (Method::POST, "/v1/models/tutorial-rf/jobs", body),
        get("/v1/models/tutorial-rf/jobs/some-job"),
        (
            Method::DELETE,
            "/v1/models/tutorial-rf/jobs/some-job",
            String::new(),
        ),
        get("/v1/models"),
        get("/v1/stats"),
        get("/metrics"),
    ]
}

async fn send(c: &Client, m: &Method, path: &str, body: &str, headers: &[(&str, &str)]) -> Resp {
    c.send(m.clone(), path, headers, body.to_owned().into())
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_guard_every_route_but_health() {
    let redis = RedisServer::start();
    let reg = TempRegistry::with_models(&[RF]);
    let r = Reference::load(RF);
    let args = [
        "--api-keys",
        "key-aaaaaaaa,key-bbbbbbbb",
        "--sync-timeout-ms",
        "100",
    ];
    let gw = Gateway::start(&redis, &reg, &args).await;
    let c = gw.client();
    for path in ["/v2/health/live", "/v2/health/ready"] {
        c.get(path).await.expect(200);
    }
    for (m, path, body) in guarded_routes(&r) {
        let what = format!("{m} {path}");
        let queued = xlen(&redis, RF).await;
        let msg = send(&c, &m, path, &body, &[])
            .await
            .expect_error(401, "unauthorized");
        assert!(msg.contains("Bearer"), "{what}: {msg}");
        for bad in [
            "Basic a2V5LWFhYWFhYWFh",
            "Bearer key-aaaaaaa",
            "Bearer key-aaaaaaaaa",
            "Bearer key-cccccccc",
        ] {
            let resp = send(&c, &m, path, &body, &[("authorization", bad)]).await;
            let kind = if bad.starts_with("Bearer") {
                (403, "forbidden")
            } else {
                (401, "unauthorized")
            };
            resp.expect_error(kind.0, kind.1);
        }
        assert_eq!(
            xlen(&redis, RF).await,
            queued,
            "{what}: refused requests enqueue nothing"
        );
        for key in ["key-aaaaaaaa", "key-bbbbbbbb"] {
            let resp = send(&c.with_key(key), &m, path, &body, &[]).await;
            assert!(
                ![401, 403].contains(&resp.status.as_u16()),
                "{what} with a valid key: {} {}",
                resp.status,
                resp.text()
            );
        }
    }
    // The error never echoes the key that was sent.
    let resp = send(
        &c,
        &Method::GET,
        "/v2",
        "",
        &[("authorization", "Bearer secret-guess")],
    )
    .await;
    assert!(!resp.text().contains("secret-guess"), "{}", resp.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_inputs_are_400_naming_the_input_and_enqueue_nothing() {
    let redis = RedisServer::start();
    let reg = TempRegistry::with_models(&[RF, "iris-f64"]);
    let gw = Gateway::start(&redis, &reg, &[]).await;
    let c = gw.client();
    let row: Vec<f64> = vec![0.5; 20];
    let input = |name: &str, dt: &str, shape: Value, data: Value| {
        json!({ "inputs": [{ "name": name, "datatype": dt, "shape": shape, "data": data }] })
            .to_string()
    };
    let cases: Vec<(String, &str)> = vec![
        ("{\"inputs\": [".into(), "malformed JSON"),
        ("".into(), "malformed JSON"),
        ("[1, 2]".into(), "malformed JSON"),
        ("{}".into(), "no `inputs`"),
        (
            input("input", "FP64", json!([1, 20]), json!(row)),
            "`input`: datatype FP64, expected FP32",
        ),
        (
            input("input", "FP32", json!([1, 19]), json!(&row[..19])),
            "`input`",
        ),
        (
            input("input", "FP32", json!([1, 20]), json!(&row[..19])),
            "`input`",
        ),
        (input("input", "FP32", json!([20]), json!(row)), "`input`"),
        (
            input("input", "FP32", json!([-1, 20]), json!(row)),
            "`input`",
        ),
        (
            input("input", "FP16", json!([1, 20]), json!(row)),
            "`input`",
        ),
        (
            input("input", "FP32", json!([1, 20]), json!(vec!["a"; 20])),
            "`input`",
        ),
        (
            input("nope", "FP32", json!([1, 20]), json!(row)),
            "unknown input `nope`",
        ),
        (json!({ "inputs": [] }).to_string(), "missing input `input`"),
        (json!({ "features": [[1.0, 2.0]] }).to_string(), "`input`"),
        (
            json!({ "features": [row], "outputs": [{ "name": "nope" }] }).to_string(),
            "`nope`",
        ),
        (
            json!({ "features": [row], "reply_to": "other:key" }).to_string(),
            "reply_to",
        ),
        (
            json!({ "features": [row], "id": "bad id!" }).to_string(),
            "job id",
        ),
    ];
    for (body, needle) in &cases {
        for path in [
            "/v1/models/tutorial-rf/jobs",
            "/v2/models/tutorial-rf/infer",
        ] {
            let msg = c
                .post(path, body.clone())
                .await
                .expect_error(400, "invalid");
            assert!(
                msg.contains(needle),
                "{path} {body}: `{msg}` does not name {needle}"
            );
        }
    }
    // A float64 model refuses FP32, naming its own input.
    let v = c.get("/v2/models/iris-f64").await.json();
    let name = v["inputs"][0]["name"]
        .as_str()
        .expect("input name")
        .to_owned();
    let body = input(&name, "FP32", json!([1, 4]), json!([1.0, 2.0, 3.0, 4.0]));
    let msg = c
        .post("/v1/models/iris-f64/jobs", body)
        .await
        .expect_error(400, "invalid");
    assert!(
        msg.contains(&format!("`{name}`")) && msg.contains("FP64"),
        "{msg}"
    );
    assert_eq!(
        xlen(&redis, RF).await + xlen(&redis, "iris-f64").await,
        0,
        "nothing enqueued"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_over_max_queue_is_429_with_retry_after() {
    let redis = RedisServer::start();
    let reg = TempRegistry::with_models(&[RF, "iris-f64"]);
    let r = Reference::load(RF);
    let gw = Gateway::start(&redis, &reg, &["--max-queue", "2"]).await;
    let c = gw.client();
    for i in 0..2 {
        c.post("/v1/models/tutorial-rf/jobs", rf_row(&r, i))
            .await
            .expect(202);
    }
    for path in [
        "/v1/models/tutorial-rf/jobs",
        "/v2/models/tutorial-rf/infer",
    ] {
        let resp = c.post(path, rf_row(&r, 2)).await;
        let msg = resp.expect_error(429, "queue_full");
        assert_eq!(resp.header("retry-after"), Some("1"), "{path}");
        assert!(msg.contains("max_queue 2"), "{msg}");
    }
    assert_eq!(xlen(&redis, RF).await, 2, "nothing enqueued past the cap");
    // The cap is per model.
    let iris = Reference::load("iris-f64");
    let body = infer_body(&iris.input_rows(0..1), json!({}));
    c.post("/v1/models/iris-f64/jobs", body).await.expect(202);
}

/// `INFO memory` field `name` of `redis`, in bytes.
async fn memory_field(conn: &mut redis::aio::MultiplexedConnection, name: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(conn)
        .await
        .expect("INFO memory");
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in INFO memory:\n{info}"))
}

/// A Redis with `maxmemory` and `noeviction` (as shipped), filled through the gateway
/// with jobs that no worker takes: once it is full, both submit routes answer 503 with
/// the JSON error, and the refused job left nothing behind (no stream entry, no record
/// hash, no terminal record). Freeing memory lets the same job in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_full_to_its_maxmemory_is_503_and_keeps_nothing_of_the_job() {
    let redis = RedisServer::with(RedisOptions {
        args: ["--maxmemory", "4mb", "--maxmemory-policy", "noeviction"]
            .map(String::from)
            .to_vec(),
        ..RedisOptions::default()
    });
    let mut conn = common::queue::connect(&redis).await;
    let limit = memory_field(&mut conn, "maxmemory").await;
    assert_eq!(limit, 4 << 20);
    assert!(
        memory_field(&mut conn, "used_memory").await < limit,
        "an empty Redis already over its limit proves nothing"
    );
    let reg = TempRegistry::with_models(&[RF]);
    let r = Reference::load(RF);
    let gw = Gateway::start(&redis, &reg, &[]).await;
    let c = gw.client();
    // About 100 kB of JSON per job: the limit is reached within a few dozen.
    let body = |id: &str| infer_body(&cycled_inputs(&r, 0, 500), json!({ "id": id }));
    let mut accepted = 0_u64;
    let (refused, msg) = loop {
        assert!(
            accepted < 400,
            "4 MB of Redis took {accepted} jobs and more"
        );
        let id = format!("fill-{accepted}");
        let resp = c.post("/v1/models/tutorial-rf/jobs", body(&id)).await;
        if resp.status.as_u16() == 202 {
            accepted += 1;
            continue;
        }
        break (id, resp.expect_error(503, "unavailable"));
    };
    assert!(
        accepted >= 5,
        "full after {accepted} jobs: was it ever empty?"
    );
    assert!(msg.contains("out of memory"), "{msg}");
    // (Redis compares its memory less some buffers with the limit: near it, not over.)
    let used = memory_field(&mut conn, "used_memory").await;
    assert!(used * 4 >= limit * 3, "refused at {used} of {limit} bytes");
    // The synchronous route is refused the same way, before it waits for anything.
    c.post("/v2/models/tutorial-rf/infer", body("sync-refused"))
        .await
        .expect_error(503, "unavailable");

    // Nothing half-written: every accepted job has its entry, no refused one has any key.
    assert_eq!(xlen(&redis, RF).await, accepted);
    let keys = inferq::queue::Keys::new(RF);
    let entries: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
        .arg(keys.jobs())
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .expect("XRANGE");
    let ids: Vec<&str> = entries
        .iter()
        .map(|(_, f)| f.get("id").map_or("", String::as_str))
        .collect();
    for id in [refused.as_str(), "sync-refused"] {
        assert!(!ids.contains(&id), "{id} has a stream entry");
        for key in [keys.job(id), keys.result(id)] {
            let exists: bool = redis::cmd("EXISTS")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .expect("EXISTS");
            assert!(!exists, "the refused job left {key}");
        }
    }
    assert_eq!(ids.len() as u64, accepted);

    // Room again: the refused job is accepted as a new one.
    set_maxmemory(&mut conn, "0").await;
    c.post("/v1/models/tutorial-rf/jobs", body(&refused))
        .await
        .expect(202);
    assert_eq!(xlen(&redis, RF).await, accepted + 1);
}
