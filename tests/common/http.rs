//! Helpers for the HTTP front-door tests: an in-process gateway (`App` served on
//! `127.0.0.1:0` by `api::serve`, exactly as `inferq gateway` wires it) and an
//! in-process worker, both built from settings parsed by the binary's own `Cli`; a
//! small HTTP client; raw-socket exchanges for the limit tests; request bodies.
//!
//! Every wait here is bounded in time and panics with what it last saw.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use inferq::api::{self, ApiConfig, App, ServerLimits};
use inferq::config::Settings;
use inferq::protocol::Tensor;
use inferq::queue::RedisTarget;
use inferq::queue::notify::Notifier;
use inferq::worker::Worker;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::{RedisServer, TempRegistry};

/// How long any single HTTP exchange of a test may take before the test fails.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);

/// Settings as `inferq gateway` would parse them: `--models <registry>
/// --redis-url <redis> <args…> gateway`. Panics on a setting the binary would refuse.
pub fn settings(redis: &RedisServer, registry: &TempRegistry, args: &[&str]) -> Settings {
    let models = registry.path().to_str().expect("utf-8 registry path");
    let url = redis.url();
    let mut argv = vec!["inferq", "--models", models, "--redis-url", &url];
    argv.extend_from_slice(args);
    argv.push("gateway");
    let cli = inferq::cli::Cli::try_parse_from(&argv)
        .unwrap_or_else(|e| panic!("settings {argv:?} do not parse: {e}"));
    cli.settings
        .validate()
        .unwrap_or_else(|e| panic!("settings {argv:?} are invalid: {e}"));
    cli.settings
}

/// What to change in a test gateway besides its settings.
#[derive(Debug, Clone, Default)]
pub struct GatewayOptions {
    /// Server limits (header timeout, connection caps, drain); `None`: from the
    /// settings, as `inferq gateway` takes them, with a 2 s drain.
    pub limits: Option<ServerLimits>,
    /// Overrides `ApiConfig::max_waiters` (concurrent long-polls and sync infers).
    pub max_waiters: Option<usize>,
    /// The gateway's Redis response timeout; `None`: 10 s, as `inferq gateway` has.
    pub redis_timeout: Option<Duration>,
}

/// An in-process gateway on a loopback port; stopped on drop.
#[derive(Debug)]
pub struct Gateway {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The settings it was built from (a worker for it uses the same).
    pub settings: Settings,
    /// The app's completion notifier (shared with the app), for waiter counts.
    pub notifier: Notifier,
    /// The app itself, for socket-less calls.
    pub app: Arc<App>,
    stop: CancellationToken,
}

impl Gateway {
    /// A gateway with `args` on top of the defaults.
    pub async fn start(redis: &RedisServer, registry: &TempRegistry, args: &[&str]) -> Gateway {
        Gateway::start_with(redis, registry, args, GatewayOptions::default()).await
    }

    /// A gateway with `args` and `opts`. Returns once its completion subscription is
    /// live (so no test races the first `PSUBSCRIBE`).
    pub async fn start_with(
        redis: &RedisServer,
        registry: &TempRegistry,
        args: &[&str],
        opts: GatewayOptions,
    ) -> Gateway {
        let settings = settings(redis, registry, args);
        let mut cfg = ApiConfig::from_settings(&settings);
        if let Some(n) = opts.max_waiters {
            cfg.max_waiters = n;
        }
        let target = RedisTarget::parse(&redis.url()).expect("a valid redis URL");
        let mut probe = redis
            .client()
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        let subscribed = psubscribers(&mut probe).await;
        let stop = CancellationToken::new();
        let conn = target
            .connect(opts.redis_timeout.unwrap_or(Duration::from_secs(10)))
            .await
            .unwrap_or_else(|e| panic!("gateway cannot reach {}: {e}", redis.url()));
        let notifier = Notifier::default();
        tokio::spawn(notifier.clone().run(target.clone(), stop.clone()));
        let app = Arc::new(App::new(
            cfg,
            registry.registry.clone(),
            conn,
            notifier.clone(),
        ));
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let served = Arc::clone(&app);
        let handler = move |req| {
            let app = Arc::clone(&served);
            async move { app.handle(req).await }
        };
        let limits = opts.limits.unwrap_or(ServerLimits {
            drain: Duration::from_secs(2),
            ..ServerLimits::from_settings(&settings)
        });
        tokio::spawn(api::serve(listener, handler, limits, stop.clone()));
        wait_psubscribed(&mut probe, subscribed).await;
        Gateway {
            addr,
            settings,
            notifier,
            app,
            stop,
        }
    }

    /// A client for this gateway without an API key.
    pub fn client(&self) -> Client {
        Client::new(self.addr)
    }

    /// Waits until exactly `n` jobs have long-poll (or sync infer) waiters.
    pub async fn wait_waiters(&self, n: usize, timeout: Duration) {
        wait_count("jobs with waiters", n, timeout, || self.notifier.waiting()).await;
    }

    /// Waits until the app holds exactly `n` request-body bytes in flight.
    pub async fn wait_body_bytes(&self, n: usize, timeout: Duration) {
        wait_count("body bytes in flight", n, timeout, || {
            self.app.body_bytes_in_flight()
        })
        .await;
    }

    /// Stops accepting and cancels the notifier.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Waits until `count()` is `n`, failing the test after `timeout`.
async fn wait_count(what: &str, n: usize, timeout: Duration, count: impl Fn() -> usize) {
    let deadline = Instant::now() + timeout;
    loop {
        let now = count();
        if now == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "expected {n} {what} within {timeout:?}, have {now}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Clients of `redis` holding a pattern subscription (each notifier holds one).
async fn psubscribers(conn: &mut redis::aio::MultiplexedConnection) -> usize {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(conn)
        .await
        .expect("CLIENT LIST");
    list.lines()
        .filter(|l| {
            l.split(' ')
                .any(|f| f.starts_with("psub=") && f != "psub=0")
        })
        .count()
}

/// Waits until `redis` has more pattern subscribers than `before` (the new gateway's
/// notifier is subscribed).
async fn wait_psubscribed(conn: &mut redis::aio::MultiplexedConnection, before: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while psubscribers(conn).await <= before {
        assert!(
            Instant::now() < deadline,
            "the gateway's completion subscription never appeared"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// An in-process worker with the gateway's settings (every model of the registry);
/// `Worker::shutdown` stops and drains it.
pub async fn start_worker(
    redis: &RedisServer,
    registry: &TempRegistry,
    settings: &Settings,
) -> Worker {
    super::init_ort();
    let target = RedisTarget::parse(&redis.url()).expect("a valid redis URL");
    Worker::start(
        settings.worker(),
        registry.registry.clone(),
        target,
        CancellationToken::new(),
    )
    .await
    .unwrap_or_else(|e| panic!("start an in-process worker: {e}"))
}

/// A response, read whole.
#[derive(Debug, Clone)]
pub struct Resp {
    /// Status code.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body bytes.
    pub body: Bytes,
}

impl Resp {
    /// The body as JSON (panics with the body when it is not).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{} body is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts the status.
    #[track_caller]
    pub fn expect(&self, status: u16) -> &Resp {
        assert_eq!(
            self.status.as_u16(),
            status,
            "unexpected status; body: {}",
            self.text()
        );
        self
    }

    /// Asserts an error response: `status`, JSON content type, and a body of exactly
    /// `{"error": <non-empty text>, "kind": kind}`. Returns the error text.
    #[track_caller]
    pub fn expect_error(&self, status: u16, kind: &str) -> String {
        self.expect(status);
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "an error is JSON"
        );
        let v = self.json();
        let obj = v.as_object().unwrap_or_else(|| panic!("error body {v}"));
        assert_eq!(obj.len(), 2, "error body has exactly error and kind: {v}");
        assert_eq!(v["kind"], kind, "error kind; body {v}");
        let msg = v["error"].as_str().unwrap_or_default().to_owned();
        assert!(!msg.is_empty(), "error text is empty: {v}");
        msg
    }
}

/// A small HTTP/1.1 client (hyper-util's pooled legacy client) for one gateway.
#[derive(Debug, Clone)]
pub struct Client {
    inner: HyperClient<HttpConnector, Full<Bytes>>,
    base: String,
    key: Option<String>,
}

impl Client {
    /// A client for `addr`.
    pub fn new(addr: SocketAddr) -> Client {
        Client {
            inner: HyperClient::builder(TokioExecutor::new()).build_http(),
            base: format!("http://{addr}"),
            key: None,
        }
    }

    /// The same client sending `Authorization: Bearer <key>`.
    pub fn with_key(&self, key: &str) -> Client {
        Client {
            key: Some(key.to_owned()),
            ..self.clone()
        }
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> Resp {
        self.send(Method::GET, path, &[], Bytes::new()).await
    }

    /// `POST path` with a JSON body.
    pub async fn post(&self, path: &str, body: impl Into<Bytes>) -> Resp {
        self.send(
            Method::POST,
            path,
            &[("content-type", "application/json")],
            body.into(),
        )
        .await
    }

    /// `DELETE path`.
    pub async fn delete(&self, path: &str) -> Resp {
        self.send(Method::DELETE, path, &[], Bytes::new()).await
    }

    /// Any request; fails the test past [`EXCHANGE_TIMEOUT`].
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Resp {
        let mut req = Request::builder()
            .method(method.clone())
            .uri(format!("{}{path}", self.base));
        if let Some(k) = &self.key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        for (k, v) in headers {
            req = req.header(
                HeaderName::from_bytes(k.as_bytes()).expect("header name"),
                HeaderValue::from_str(v).expect("header value"),
            );
        }
        let req = req.body(Full::new(body)).expect("a valid request");
        let exchange = async {
            let resp = self
                .inner
                .request(req)
                .await
                .unwrap_or_else(|e| panic!("{method} {path}: {e:?}"));
            let (parts, body) = resp.into_parts();
            let body = body
                .collect()
                .await
                .unwrap_or_else(|e| panic!("{method} {path}: reading the body: {e}"))
                .to_bytes();
            Resp {
                status: parts.status,
                headers: parts.headers,
                body,
            }
        };
        tokio::time::timeout(EXCHANGE_TIMEOUT, exchange)
            .await
            .unwrap_or_else(|_| panic!("{method} {path} took over {EXCHANGE_TIMEOUT:?}"))
    }

    /// Polls `GET path` every 10 ms until the record's status is terminal; panics after
    /// `timeout`.
    pub async fn wait_terminal(&self, path: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.get(path).await;
            r.expect(200);
            let v = r.json();
            if matches!(
                v["status"].as_str(),
                Some("succeeded" | "failed" | "expired" | "cancelled")
            ) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{path} not terminal after {timeout:?}: {v}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// An OIP v2 JSON inference request body carrying `inputs` (encoded here, not by the
/// codec under test), with extra top-level fields from `extra` (e.g. `id`).
pub fn infer_body(inputs: &[Tensor], extra: Value) -> String {
    let mut body: Value = serde_json::from_slice(&inferq::protocol::oip::encode_request(inputs))
        .expect("the body is JSON");
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    body.to_string()
}

/// The tensors of an OIP v2 response's `outputs` (parsed here, not by the crate).
pub fn response_outputs(v: &Value) -> Vec<Tensor> {
    v["outputs"]
        .as_array()
        .unwrap_or_else(|| panic!("no `outputs` array in {v}"))
        .iter()
        .map(super::json_tensor)
        .collect()
}

/// A raw HTTP/1.1 response read off a socket.
#[derive(Debug, Clone)]
pub struct RawResp {
    /// Status code.
    pub status: u16,
    /// The header block, lower-cased.
    pub head: String,
    /// The body (by Content-Length).
    pub body: Vec<u8>,
}

impl RawResp {
    /// Asserts a JSON error response with `status` and `kind`; returns its text.
    #[track_caller]
    pub fn expect_error(&self, status: u16, kind: &str) -> String {
        assert_eq!(self.status, status, "{self:?}");
        let v: Value = serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("the error body is not JSON ({e}): {self:?}"));
        assert_eq!(v["kind"], kind, "{v}");
        v["error"].as_str().unwrap_or_default().to_owned()
    }
}

/// A valid submit for reference row 0, padded with trailing spaces to `len` bytes.
pub fn padded_body(r: &super::Reference, len: usize) -> Vec<u8> {
    let mut body = infer_body(&r.input_rows(0..1), serde_json::json!({})).into_bytes();
    assert!(body.len() <= len, "the row alone is {} bytes", body.len());
    body.resize(len, b' ');
    body
}

/// Reads one response (status line, headers, Content-Length body) from `stream`,
/// failing the test after `timeout`. `None` when the server closed (or reset) the
/// connection before a whole response arrived.
pub async fn read_response(stream: &mut TcpStream, timeout: Duration) -> Option<RawResp> {
    let read = async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = find(&buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().expect("content-length"));
                if buf.len() >= end + 4 + len {
                    let status = head
                        .split_whitespace()
                        .nth(1)
                        .and_then(|s| s.parse().ok())
                        .expect("a status code");
                    let body = buf[end + 4..end + 4 + len].to_vec();
                    return Some(RawResp { status, head, body });
                }
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .unwrap_or_else(|_| panic!("no response within {timeout:?}"))
}

/// Writes all of `bytes`, ignoring a reset (the server may answer and close early).
pub async fn write_lenient(stream: &mut TcpStream, bytes: &[u8]) {
    let _ = stream.write_all(bytes).await;
    let _ = stream.flush().await;
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Number of clients connected to `redis` (`CLIENT LIST`, minus the asking one).
pub async fn redis_clients(redis: &RedisServer) -> usize {
    let mut conn = redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut conn)
        .await
        .expect("CLIENT LIST");
    list.lines().filter(|l| !l.trim().is_empty()).count() - 1
}

/// XLEN of a model's jobs stream.
pub async fn xlen(redis: &RedisServer, model: &str) -> u64 {
    let mut conn = redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    redis::cmd("XLEN")
        .arg(inferq::queue::Keys::new(model).jobs())
        .query_async(&mut conn)
        .await
        .expect("XLEN")
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}
