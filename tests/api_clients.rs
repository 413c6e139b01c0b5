//! Slow and greedy clients against the front door, over real loopback sockets: bodies
//! trickled a byte at a time are cut at the body deadline while health and a normal
//! sync infer keep answering (the trickling sync infers hold no waiter slot); request
//! bytes in flight past the global budget are refused with a JSON 503 instead of
//! growing memory; connections past the per-peer cap are refused while another peer
//! address is served.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::http::{
    Gateway, GatewayOptions, infer_body, padded_body, read_response, start_worker, xlen,
};
use common::{RedisServer, Reference, TempRegistry};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const RF: &str = "tutorial-rf";
const JOBS: &str = "/v1/models/tutorial-rf/jobs";
const INFER: &str = "/v2/models/tutorial-rf/infer";

/// The head of a POST announcing a body of `len` bytes.
fn post_head(path: &str, len: usize) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\ncontent-length: {len}\r\n\r\n"
    )
}

/// A connection to `addr` from the loopback address `ip` (all of 127.0.0.0/8 is
/// loopback on Linux, so one host can play several peers).
async fn connect_from(ip: [u8; 4], addr: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().expect("socket");
    s.bind(SocketAddr::from((ip, 0)))
        .unwrap_or_else(|e| panic!("bind {ip:?}: {e}"));
    s.connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect from {ip:?}: {e}"))
}

/// What a trickling client saw: when the server closed (since the client opened),
/// and the bytes it answered before.
#[derive(Debug)]
struct Cut {
    after: Option<Duration>,
    answer: Vec<u8>,
}

/// Sends one body byte every 100 ms, for at most `budget`, reading what comes back
/// until the server closes.
async fn trickle(mut s: TcpStream, opened: Instant, budget: Duration) -> Cut {
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while opened.elapsed() < budget {
        tokio::select! {
            n = s.read(&mut buf) => match n {
                Ok(0) | Err(_) => return Cut { after: Some(opened.elapsed()), answer },
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            },
            _ = tick.tick() => { let _ = s.write_all(b" ").await; }
        }
    }
    Cut {
        after: None,
        answer,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickled_bodies_are_cut_at_the_body_deadline_while_others_are_served() {
    const SLOW: usize = 200;
    let deadline = Duration::from_millis(1500);
    let redis = RedisServer::start();
    let reg = TempRegistry::with_models(&[RF]);
    let r = Reference::load(RF);
    // Fewer waiter slots than trickling sync infers: were a slot taken before the
    // body is read, the normal infer below would be refused.
    let opts = GatewayOptions {
        max_waiters: Some(8),
        ..GatewayOptions::default()
    };
    let args = [
        "--body-timeout-ms",
        "1500",
        "--max-connections-per-peer",
        "0",
    ];
    let gw = Gateway::start_with(&redis, &reg, &args, opts).await;
    let worker = start_worker(&redis, &reg, &gw.settings).await;

    let mut slow = Vec::new();
    for i in 0..SLOW {
        // 200 × 100 kB announced stays within the default in-flight budget (64 MiB).
        let path = if i % 2 == 0 { JOBS } else { INFER };
        let mut s = TcpStream::connect(gw.addr).await.expect("connect");
        let opened = Instant::now();
        s.write_all(format!("{}{{", post_head(path, 100_000)).as_bytes())
            .await
            .expect("write the head");
        slow.push(tokio::spawn(trickle(s, opened, Duration::from_secs(10))));
    }

    // While they trickle: health and a normal sync infer answer.
    let c = gw.client();
    let t0 = Instant::now();
    c.get("/v2/health/live").await.expect(200);
    let health = t0.elapsed();
    let v = c
        .post(INFER, infer_body(&r.input_rows(0..1), json!({})))
        .await
        .expect(200)
        .json();
    assert_eq!(v["model_name"], RF, "{v}");

    let mut cuts = Vec::new();
    for t in slow {
        cuts.push(t.await.expect("trickler task"));
    }
    let open = cuts.iter().filter(|c| c.after.is_none()).count();
    assert_eq!(
        open, 0,
        "{open} of {SLOW} trickling clients still open after 10 s"
    );
    let latest = cuts.iter().filter_map(|c| c.after).max().expect("cuts");
    let earliest = cuts.iter().filter_map(|c| c.after).min().expect("cuts");
    assert!(
        earliest >= deadline - Duration::from_millis(100) && latest < deadline * 3,
        "cut between {earliest:?} and {latest:?}; the body deadline is {deadline:?}"
    );
    for cut in &cuts {
        let text = String::from_utf8_lossy(&cut.answer);
        assert!(
            text.starts_with("HTTP/1.1 408") && text.contains(r#""kind":"timeout""#),
            "a cut client is told why: {text:?}"
        );
    }
    assert!(
        health < deadline,
        "health took {health:?} under the trickle"
    );
    assert_eq!(xlen(&redis, RF).await, 1, "no trickled body was enqueued");
    gw.wait_waiters(0, Duration::from_secs(2)).await;
    eprintln!(
        "{SLOW} trickling clients cut between {earliest:?} and {latest:?} (deadline {deadline:?}); health answered in {health:?}"
    );
    assert!(worker.shutdown().await, "the worker drains");
}

/// Asserts a JSON 503 refusal that names the in-flight budget.
fn assert_over_budget(resp: Option<common::http::RawResp>, what: &str) {
    let resp = resp.unwrap_or_else(|| panic!("{what}: closed without an answer"));
    let msg = resp.expect_error(503, "unavailable");
    assert!(
        resp.head.contains("retry-after: 1"),
        "{what}: {}",
        resp.head
    );
    assert!(
        msg.contains("100000"),
        "{what}: the error names the budget: {msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bytes_past_the_in_flight_budget_are_503_until_they_free() {
    let redis = RedisServer::start();
    let reg = TempRegistry::with_models(&[RF]);
    let r = Reference::load(RF);
    let args = [
        "--max-body-bytes",
        "40000",
        "--max-inflight-bytes",
        "100000",
    ];
    let gw = Gateway::start(&redis, &reg, &args).await;

    // Three uploads announce 30,000 bytes each and stall: 90,000 of 100,000 held.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(gw.addr).await.expect("connect");
        s.write_all(format!("{}{{", post_head(JOBS, 30_000)).as_bytes())
            .await
            .expect("write");
        held.push(s);
    }
    gw.wait_body_bytes(90_000, Duration::from_secs(5)).await;

    // A small request still fits; health needs no budget.
    let c = gw.client();
    c.post(JOBS, padded_body(&r, 5_000)).await.expect(202);
    c.get("/v2/health/live").await.expect(200);

    // A fourth announcing 30,000 is refused at once, before its body is sent.
    let mut s = TcpStream::connect(gw.addr).await.expect("connect");
    s.write_all(post_head(JOBS, 30_000).as_bytes())
        .await
        .expect("write");
    assert_over_budget(
        read_response(&mut s, Duration::from_secs(5)).await,
        "announced",
    );
    // A chunked body (no length) is refused once what it sent passes the budget.
    let mut s = TcpStream::connect(gw.addr).await.expect("connect");
    let head = format!(
        "POST {JOBS} HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.expect("write");
    let chunk = vec![b' '; 4_000];
    for _ in 0..3 {
        let mut c = format!("{:x}\r\n", chunk.len()).into_bytes();
        c.extend_from_slice(&chunk);
        c.extend_from_slice(b"\r\n");
        let _ = s.write_all(&c).await;
    }
    assert_over_budget(
        read_response(&mut s, Duration::from_secs(5)).await,
        "chunked",
    );
    drop(s);
    gw.wait_body_bytes(90_000, Duration::from_secs(5)).await;

    // The stalled uploads go away: their bytes are free again.
    drop(held);
    gw.wait_body_bytes(0, Duration::from_secs(5)).await;
    c.post(JOBS, padded_body(&r, 30_000)).await.expect(202);
    gw.wait_body_bytes(0, Duration::from_secs(5)).await;
    assert_eq!(
        xlen(&redis, RF).await,
        2,
        "only the two whole bodies were enqueued"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_per_peer_cap_are_refused_while_another_peer_is_served() {
    const CAP: usize = 4;
    let redis = RedisServer::start();
    let reg = TempRegistry::with_models(&[RF]);
    let gw = Gateway::start(&redis, &reg, &["--max-connections-per-peer", "4"]).await;
    let get = b"GET /v2/health/live HTTP/1.1\r\nhost: test\r\n\r\n";

    // Served and kept open: the answer means the server counts the connection.
    let served = |ip: [u8; 4]| async move {
        let mut s = connect_from(ip, gw.addr).await;
        s.write_all(get).await.expect("write");
        let r = read_response(&mut s, Duration::from_secs(5)).await;
        (s, r.map(|r| r.status))
    };
    let mut first = Vec::new();
    for _ in 0..CAP {
        let (s, status) = served([127, 0, 0, 1]).await;
        assert_eq!(status, Some(200), "a connection within the cap");
        first.push(s);
    }
    let (_s, status) = served([127, 0, 0, 1]).await;
    assert_eq!(
        status,
        None,
        "connection {} from one peer is refused",
        CAP + 1
    );

    // Another peer has a cap of its own.
    let mut second = Vec::new();
    for _ in 0..CAP {
        let (s, status) = served([127, 0, 0, 2]).await;
        assert_eq!(status, Some(200), "another peer is served");
        second.push(s);
    }

    // One of the first peer's connections closes: it may connect again once the
    // server has seen the close.
    drop(first.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (s, status) = served([127, 0, 0, 1]).await;
        if status == Some(200) {
            first.push(s);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a freed per-peer slot was never reused"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_s, status) = served([127, 0, 0, 1]).await;
    assert_eq!(status, None, "the cap holds again");
}
