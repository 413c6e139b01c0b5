//! The front door's limits over raw sockets: body caps (by Content-Length and while
//! streaming a chunked body), the per-job element cap, JSON nested 10,000 deep,
//! slowloris headers and idle connections cut at the header timeout, the connection
//! cap, the long-poll `?wait=` cap and the cap on concurrent waiters.

mod common;

use std::time::{Duration, Instant};

use common::http::{
    Gateway, GatewayOptions, RawResp, infer_body, read_response, write_lenient, xlen,
};
use common::{RedisServer, Reference, TempRegistry};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const RF: &str = "tutorial-rf";
const LIMIT: usize = 4096;

/// A valid tutorial-rf submit padded with trailing spaces to exactly `len` bytes.
fn padded_body(len: usize) -> Vec<u8> {
    common::http::padded_body(&Reference::load(RF), len)
}

fn head(path: &str, extra: &str) -> String {
    format!("POST {path} HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n{extra}\r\n")
}

/// After a refused body: the server either closed the connection or reads the next
/// request correctly (it never parses the rest of the body as a request).
async fn closed_or_resynced(mut s: TcpStream, rest: &[u8]) {
    write_lenient(&mut s, rest).await;
    write_lenient(
        &mut s,
        b"GET /v2/health/live HTTP/1.1\r\nhost: test\r\n\r\n",
    )
    .await;
    if let Some(r) = read_response(&mut s, Duration::from_secs(5)).await {
        assert_eq!(r.status, 200, "next request on the connection: {r:?}");
    }
}

fn assert_413(r: Option<RawResp>, what: &str) {
    let r = r.unwrap_or_else(|| panic!("{what}: connection closed without a response"));
    let msg = r.expect_error(413, "too_large");
    assert!(msg.contains("4096"), "{what}: {msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_limit_are_413_by_length_and_while_streaming() {
    let redis = RedisServer::start();
    let reg = TempRegistry::with_models(&[RF]);
    let gw = Gateway::start(&redis, &reg, &["--max-body-bytes", "4096"]).await;
    let path = "/v1/models/tutorial-rf/jobs";

    // Exactly at the limit: accepted.
    let c = gw.client();
    c.post(path, padded_body(LIMIT)).await.expect(202);

    // One byte over, announced by Content-Length: refused before the body is read.
    let body = padded_body(LIMIT + 1);
    let mut s = TcpStream::connect(gw.addr).await.expect("connect");
    let h = head(path, &format!("content-length: {}\r\n", LIMIT + 1));
    write_lenient(&mut s, h.as_bytes()).await;
    assert_413(
        read_response(&mut s, Duration::from_secs(5)).await,
        "content-length",
    );
    closed_or_resynced(s, &body).await;

    // One byte over in a chunked body without a length: refused while streaming.
    let mut s = TcpStream::connect(gw.addr).await.expect("connect");
    let mut req = head(path, "transfer-encoding: chunked\r\n").into_bytes();
    for chunk in body.chunks(1000) {
        req.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        req.extend_from_slice(chunk);
        req.extend_from_slice(b"\r\n");
    }
    write_lenient(&mut s, &req).await;
    assert_413(
        read_response(&mut s, Duration::from_secs(5)).await,
        "chunked",
    );
    closed_or_resynced(s, b"0\r\n\r\n").await;

    // The same through the client (it sends Content-Length), on the sync route too.
    for p in [path, "/v2/models/tutorial-rf/infer"] {
        c.post(p, body.clone()).await.expect_error(413, "too_large");
    }
    assert_eq!(
        xlen(&redis, RF).await,
        1,
        "only the body at the limit was enqueued"
    );
    c.get("/v2/health/live").await.expect(200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tensor_over_max_elements_is_413() {
    let redis = RedisServer::start();
    let reg = TempRegistry::with_models(&[RF]);
    let gw = Gateway::start(&redis, &reg, &["--max-elements", "100"]).await;
    let r = Reference::load(RF);
    let c = gw.client();
    // 5 rows × 20 = 100 elements: at the cap; 6 rows: over it.
    c.post(
        "/v1/models/tutorial-rf/jobs",
        infer_body(&r.input_rows(0..5), json!({})),
    )
    .await
    .expect(202);
    let msg = c
        .post(
            "/v1/models/tutorial-rf/jobs",
            infer_body(&r.input_rows(0..6), json!({})),
        )
        .await
        .expect_error(413, "too_large");
    assert!(msg.contains("input"), "{msg}");
    assert_eq!(xlen(&redis, RF).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_nested_10000_deep_is_400_without_a_crash() {
    let redis = RedisServer::start();
    let reg = TempRegistry::with_models(&[RF]);
    let gw = Gateway::start(&redis, &reg, &[]).await;
    let c = gw.client();
    let deep =
        |open: &str, close: &str| format!("{}0{}", open.repeat(10_000), close.repeat(10_000));
    // (body, what the 400 says): nested tensor data reaches serde_json's recursion
    // limit (128); a nested unknown field is skipped without recursion, so the body
    // is judged on its inputs.
    let cases = [
        (deep("[", "]"), "malformed JSON"),
        (
            format!("{{\"features\": {}}}", deep("[", "]")),
            "`features`: recursion limit exceeded",
        ),
        (
            format!(
                "{{\"inputs\": [{{\"name\": \"input\", \"datatype\": \"FP32\", \"shape\": [1, 20], \"data\": {}}}]}}",
                deep("[", "]")
            ),
            "input `input`: recursion limit exceeded",
        ),
        (deep("{\"a\":", "}"), "no `inputs`"),
        (
            format!("{{\"inputs\": [], \"x\": {}}}", deep("{\"a\":", "}")),
            "missing input `input`",
        ),
    ];
    for (body, why) in &cases {
        for path in [
            "/v1/models/tutorial-rf/jobs",
            "/v2/models/tutorial-rf/infer",
        ] {
            let msg = c
                .post(path, body.clone())
                .await
                .expect_error(400, "invalid");
            assert!(msg.contains(why), "{path}: `{msg}` should say {why}");
        }
    }
    c.get("/v2/health/live").await.expect(200);
    assert_eq!(xlen(&redis, RF).await, 0);
}

/// Reads until EOF or reset; returns how long that took (or `None` past `within`)
/// while `trickle` keeps writing header lines every 100 ms.
async fn time_to_close(s: &mut TcpStream, trickle: bool, within: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    let (mut rd, mut wr) = s.split();
    let reader = async {
        let mut buf = [0u8; 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return t0.elapsed(),
                Ok(_) => {} // e.g. a 408 before the close
            }
        }
    };
    let writer = async {
        for i in 0..100 {
            if trickle
                && wr
                    .write_all(format!("x-trickle-{i}: 1\r\n").as_bytes())
                    .await
                    .is_err()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        std::future::pending::<()>().await;
    };
    tokio::time::timeout(within, async {
        tokio::select! {
            d = reader => d,
            () = writer => unreachable!("the writer never ends"),
        }
    })
    .await
    .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_headers_and_idle_connections_are_cut_at_the_header_timeout() {
    let redis = RedisServer::start();
    let reg = TempRegistry::with_models(&[RF]);
    let gw = Gateway::start(&redis, &reg, &["--header-timeout-ms", "500"]).await;

    let mut s = TcpStream::connect(gw.addr).await.expect("connect");
    s.write_all(b"GET /v2/health/live HTTP/1.1\r\nhost: test\r\n")
        .await
        .expect("write");
    let took = time_to_close(&mut s, true, Duration::from_secs(5)).await;
    let took = took.expect("a trickling client is still connected after 5 s");
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_millis(2500),
        "trickled headers cut after {took:?}, the header timeout is 500 ms"
    );

    // A connection that never sends a byte holds a connection slot: cut too.
    let mut idle = TcpStream::connect(gw.addr).await.expect("connect");
    let took = time_to_close(&mut idle, false, Duration::from_secs(5)).await;
    let took = took.expect("an idle connection is still open after 5 s");
    assert!(
        took < Duration::from_millis(2500),
        "idle connection cut after {took:?}"
    );

    // Well-behaved clients are served meanwhile.
    gw.client().get("/v2/health/live").await.expect(200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_wait_for_a_free_slot() {
    let redis = RedisServer::start();
    let reg = TempRegistry::with_models(&[RF]);
    let gw = Gateway::start(&redis, &reg, &["--max-connections", "2"]).await;
    let get = b"GET /v2/health/live HTTP/1.1\r\nhost: test\r\n\r\n";
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(gw.addr).await.expect("connect");
        s.write_all(get).await.expect("write");
        let r = read_response(&mut s, Duration::from_secs(5))
            .await
            .expect("served");
        assert_eq!(r.status, 200);
        held.push(s); // kept alive
    }
    let mut third = TcpStream::connect(gw.addr)
        .await
        .expect("the listen backlog takes it");
    third.write_all(get).await.expect("write");
    let early = tokio::time::timeout(
        Duration::from_millis(300),
        read_response(&mut third, Duration::from_secs(1)),
    )
    .await;
    assert!(
        early.is_err(),
        "a third connection was served past the cap of 2: {early:?}"
    );
    drop(held.pop());
    let r = read_response(&mut third, Duration::from_secs(5))
        .await
        .expect("served once a slot frees");
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_wait_is_capped_and_waiters_are_bounded() {
    let redis = RedisServer::start();
    let reg = TempRegistry::with_models(&[RF]);
    let r = Reference::load(RF);
    let opts = GatewayOptions {
        max_waiters: Some(2),
        ..GatewayOptions::default()
    };
    let gw = Gateway::start_with(&redis, &reg, &["--max-poll-wait-s", "1"], opts).await;
    let c = gw.client();
    let v = c
        .post(
            "/v1/models/tutorial-rf/jobs",
            infer_body(&r.input_rows(0..1), json!({})),
        )
        .await
        .expect(202)
        .json();
    let url = v["status_url"].as_str().expect("url").to_owned();

    // `?wait=30` is capped at the configured 1 s.
    let t0 = Instant::now();
    let rec = c.get(&format!("{url}?wait=30")).await.expect(200).json();
    let took = t0.elapsed();
    assert_eq!(rec["status"], "queued");
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_secs(3),
        "a capped long-poll took {took:?}"
    );

    // Two waiters at once are allowed, a third is refused with Retry-After.
    let polls: Vec<_> = (0..2)
        .map(|_| {
            let (c, u) = (c.clone(), format!("{url}?wait=1"));
            tokio::spawn(async move { c.get(&u).await })
        })
        .collect();
    gw.wait_waiters(1, Duration::from_secs(2)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refused = c.get(&format!("{url}?wait=1")).await;
    refused.expect_error(429, "queue_full");
    assert_eq!(refused.header("retry-after"), Some("1"));
    let sync = c
        .post(
            "/v2/models/tutorial-rf/infer",
            infer_body(&r.input_rows(0..1), json!({})),
        )
        .await;
    sync.expect_error(429, "queue_full");
    assert_eq!(
        xlen(&redis, RF).await,
        1,
        "a refused sync infer enqueues nothing"
    );
    // A plain poll needs no waiter slot.
    c.get(&url).await.expect(200);
    for p in polls {
        p.await.expect("poll task").expect(200);
    }
    gw.wait_waiters(0, Duration::from_secs(1)).await;
    c.get(&format!("{url}?wait=0.1")).await.expect(200);
}
