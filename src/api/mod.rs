//! The HTTP front door (hyper 1.x): Open Inference Protocol v2 routes, asynchronous
//! jobs, long-polls, and the metrics listener every role has.
//!
//! [`App::handle`] answers one request without a socket (tests call it directly);
//! [`serve`] runs it on a bound listener with limits, and drains on shutdown.

mod error;
mod jobs;
mod limits;
mod meta;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Body;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use error::ApiError;
use limits::{BodyBudget, BodyLimits, PeerCounts};
pub use meta::ops;

use crate::config::Settings;
use crate::metrics::metrics;
use crate::producer::Producer;
use crate::queue::notify::Notifier;
use crate::queue::{Conn, RedisTarget};
use crate::registry::{Registry, RegistryCache};

/// What the front door needs from the settings.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Accepted API keys; empty = no auth.
    pub api_keys: Vec<String>,
    /// Largest body.
    pub max_body_bytes: usize,
    /// Largest tensor per job in elements.
    pub max_elements: usize,
    /// Backlog cap per model.
    pub max_queue: u64,
    /// Synchronous infer wait.
    pub sync_timeout: Duration,
    /// Cap on `?wait=`.
    pub max_poll_wait: Duration,
    /// Result TTL (for cancels).
    pub result_ttl_s: u64,
    /// CORS origin, if any.
    pub cors_origin: Option<String>,
    /// Concurrent long-polls and sync infers allowed.
    pub max_waiters: usize,
    /// Time to send a whole body once the headers are in (408 past it).
    pub body_timeout: Duration,
    /// Body bytes all requests together may hold at once (503 past it).
    pub max_inflight_bytes: usize,
}

impl ApiConfig {
    /// The front door's part of the settings.
    pub fn from_settings(s: &Settings) -> ApiConfig {
        ApiConfig {
            api_keys: s.api_keys.clone(),
            max_body_bytes: s.max_body_bytes,
            max_elements: s.max_elements,
            max_queue: s.max_queue,
            sync_timeout: Duration::from_millis(s.sync_timeout_ms),
            max_poll_wait: Duration::from_secs(s.max_poll_wait_s),
            result_ttl_s: s.result_ttl_s,
            cors_origin: s.cors_origin.clone(),
            max_waiters: 10_000,
            body_timeout: Duration::from_millis(s.body_timeout_ms),
            max_inflight_bytes: s.max_inflight_bytes,
        }
    }
}

/// Shared state of the front door.
#[derive(Debug)]
pub struct App {
    cfg: ApiConfig,
    producer: Producer,
    conn: Conn,
    notifier: Notifier,
    waiters: Semaphore,
    bodies: BodyBudget,
    started: Instant,
    requests: AtomicU64,
}

/// The response body type of every route.
pub type Reply = Response<Full<Bytes>>;

impl App {
    /// Builds the app; `notifier` must be running (see [`Notifier::run`]).
    pub fn new(cfg: ApiConfig, registry: Registry, conn: Conn, notifier: Notifier) -> App {
        let producer = Producer::new(
            RegistryCache::new(registry, Duration::from_secs(1)),
            conn.clone(),
            cfg.max_elements,
            cfg.max_queue,
        );
        App {
            producer,
            waiters: Semaphore::new(cfg.max_waiters),
            bodies: BodyBudget::new(cfg.max_inflight_bytes),
            cfg,
            conn,
            notifier,
            started: Instant::now(),
            requests: AtomicU64::new(0),
        }
    }

    /// Connects to Redis and starts the completion subscription (stopped by `stop`).
    pub async fn connect(
        cfg: ApiConfig,
        registry: Registry,
        target: &RedisTarget,
        stop: CancellationToken,
    ) -> Result<App, crate::queue::QueueError> {
        let conn = target.connect(Duration::from_secs(10)).await?;
        let notifier = Notifier::default();
        tokio::spawn(notifier.clone().run(target.clone(), stop));
        Ok(App::new(cfg, registry, conn, notifier))
    }

    /// Answers one request: auth, routing, errors as JSON, CORS, metrics.
    pub async fn handle<B>(&self, req: Request<B>) -> Reply
    where
        B: Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let t0 = Instant::now();
        self.requests.fetch_add(1, Ordering::Relaxed);
        let cors_preflight = req.method() == Method::OPTIONS && self.cfg.cors_origin.is_some();
        let (routed, result) = if cors_preflight {
            (
                Routed::named("preflight"),
                Ok(empty(StatusCode::NO_CONTENT)),
            )
        } else {
            self.route(req).await
        };
        let mut resp = result.unwrap_or_else(|e| {
            if let (Some(model), true) = (&routed.model, routed.submits)
                && let Some(reason) = e.rejection_reason()
            {
                // The path is client input: label only models the registry knows.
                let known = self.producer.registry().default_version(model).is_ok();
                let label = if known {
                    model.as_str()
                } else {
                    crate::metrics::UNKNOWN_MODEL
                };
                metrics()
                    .jobs_rejected
                    .with_label_values(&[label, reason])
                    .inc();
            }
            let mut r = json(e.status(), e.body());
            if matches!(e, ApiError::Busy(_) | ApiError::Unavailable(_)) {
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            r
        });
        if let Some(origin) = &self.cfg.cors_origin {
            let h = resp.headers_mut();
            if let Ok(v) = HeaderValue::from_str(origin) {
                h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
            }
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, POST, DELETE, OPTIONS"),
            );
            h.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static("authorization, content-type, idempotency-key"),
            );
        }
        metrics()
            .http_duration
            .with_label_values(&[routed.template, resp.status().as_str()])
            .observe(t0.elapsed().as_secs_f64());
        resp
    }

    /// Request-body bytes held by requests in flight now (INFERQ_MAX_INFLIGHT_BYTES).
    pub fn body_bytes_in_flight(&self) -> usize {
        self.bodies.used()
    }

    /// How this app reads request bodies.
    fn body_limits(&self) -> BodyLimits<'_> {
        BodyLimits {
            max_bytes: self.cfg.max_body_bytes,
            timeout: self.cfg.body_timeout,
            budget: &self.bodies,
        }
    }

    /// Requires a valid API key when keys are configured; health routes are open.
    fn authorize<B>(&self, req: &Request<B>) -> Result<(), ApiError> {
        if self.cfg.api_keys.is_empty() {
            return Ok(());
        }
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            // The scheme name is case-insensitive (RFC 9110 §11.1).
            .and_then(|v| {
                v.get(..7)
                    .filter(|p| p.eq_ignore_ascii_case("bearer "))
                    .map(|_| &v[7..])
            })
            .ok_or(ApiError::Unauthorized)?;
        // Compare against every key, without early exit, in constant time per key.
        let ok = self.cfg.api_keys.iter().fold(false, |acc, k| {
            acc | constant_time_eq(k.as_bytes(), given.as_bytes())
        });
        if ok { Ok(()) } else { Err(ApiError::Forbidden) }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Which route answered: its template (a metric label) and, for routes that submit
/// jobs, the model (so refusals are counted by reason).
#[derive(Debug, Clone)]
struct Routed {
    template: &'static str,
    model: Option<String>,
    submits: bool,
}

impl Routed {
    fn named(template: &'static str) -> Routed {
        Routed {
            template,
            model: None,
            submits: false,
        }
    }
}

impl ApiError {
    /// The `reason` label of a refused submit.
    fn rejection_reason(&self) -> Option<&'static str> {
        Some(match self {
            ApiError::Invalid(_) | ApiError::NotFound(_) | ApiError::Conflict(_) => "invalid",
            ApiError::TooLarge(_) => "too_large",
            ApiError::Busy(_) => "queue_full",
            ApiError::Unauthorized | ApiError::Forbidden => "unauthorized",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Timeout(_) => "timeout",
            ApiError::Method(_) | ApiError::JobFailed { .. } => return None,
        })
    }
}

/// A JSON response.
pub fn json(status: StatusCode, body: String) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn empty(status: StatusCode) -> Reply {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = status;
    r
}

/// Server limits.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// Time allowed to send the request headers (slowloris).
    pub header_timeout: Duration,
    /// Open connections at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Open connections from one peer address at once; more are closed when
    /// accepted. 0: no cap.
    pub max_connections_per_peer: usize,
    /// How long shutdown waits for open requests.
    pub drain: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            header_timeout: Duration::from_secs(10),
            max_connections: 4096,
            max_connections_per_peer: 1024,
            drain: Duration::from_secs(30),
        }
    }
}

impl ServerLimits {
    /// The public listener's limits from the settings.
    pub fn from_settings(s: &Settings) -> ServerLimits {
        ServerLimits {
            header_timeout: Duration::from_millis(s.header_timeout_ms),
            max_connections: s.max_connections,
            max_connections_per_peer: s.max_connections_per_peer,
            drain: Duration::from_millis(s.drain_timeout_ms),
        }
    }
}

/// Serves `handler` on `listener` until `stop`, then lets open requests finish
/// (at most `limits.drain`).
pub async fn serve<H, F>(
    listener: TcpListener,
    handler: H,
    limits: ServerLimits,
    stop: CancellationToken,
) where
    H: Fn(Request<hyper::body::Incoming>) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = Reply> + Send + 'static,
{
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let peers = PeerCounts::new(limits.max_connections_per_peer);
    let tracker = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            () = stop.cancelled() => break,
            p = Arc::clone(&connections).acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let (stream, peer): (_, SocketAddr) = tokio::select! {
            () = stop.cancelled() => break,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Closed at once, before any byte is read: an over-cap peer costs no task.
        let Some(slot) = peers.enter(peer.ip()) else {
            tracing::debug!(%peer, "connection refused: the peer is at INFERQ_MAX_CONNECTIONS_PER_PEER");
            metrics()
                .http_connections_refused
                .with_label_values(&["per_peer"])
                .inc();
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let stop = stop.clone();
        tracker.spawn(async move {
            let _permit = (permit, slot);
            let service = hyper::service::service_fn(move |req| {
                let fut = handler(req);
                async move { Ok::<_, Infallible>(fut.await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => { if let Err(e) = r { tracing::debug!(error = %e, "connection ended with an error"); } }
                () = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    if !crate::shutdown::drain(&tracker, limits.drain).await {
        tracing::warn!("HTTP drain deadline passed with requests still open");
    }
}
