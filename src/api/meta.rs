//! Routing, plus the read-only routes: health, server and model metadata, the
//! registry listing, stats and metrics.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use hyper::body::Body;
use hyper::{Method, Request, StatusCode};
use serde_json::json;

use super::{ApiError, App, Reply, Routed, json};
use crate::metrics::metrics;
use crate::protocol::job::Status;
use crate::queue::{Keys, janitor};

impl App {
    /// Dispatches on method and path; the template names the route in metrics.
    pub(super) async fn route<B>(&self, req: Request<B>) -> (Routed, Result<Reply, ApiError>)
    where
        B: Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let path = req.uri().path().to_owned();
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        let method = req.method().clone();
        let model = |i: usize| segs.get(i).map(|s| (*s).to_owned());
        // Health answers without a key (probes carry none).
        match (&method, segs.as_slice()) {
            (&Method::GET, ["v2", "health", "live"]) => {
                return (
                    Routed::named("/v2/health/live"),
                    Ok(json(StatusCode::OK, r#"{"live":true}"#.into())),
                );
            }
            (&Method::GET, ["v2", "health", "ready"]) => {
                return (Routed::named("/v2/health/ready"), Ok(self.ready().await));
            }
            _ => {}
        }
        let submits = matches!(
            (&method, segs.as_slice()),
            (
                &Method::POST,
                ["v1", "models", _, "jobs"]
                    | ["v2", "models", _, "infer"]
                    | ["v2", "models", _, "versions", _, "infer"]
            )
        );
        let routed = |template: &'static str, m: Option<String>| Routed {
            template,
            model: m,
            submits,
        };
        if let Err(e) = self.authorize(&req) {
            return (
                routed("unauthorized", if submits { model(2) } else { None }),
                Err(e),
            );
        }
        let version = |s: &str| {
            s.parse::<u64>()
                .ok()
                .filter(|&v| v > 0)
                .ok_or_else(|| ApiError::NotFound(format!("`{s}` is not a version number")))
        };
        match (method, segs.as_slice()) {
            (Method::GET, ["v2"]) => (routed("/v2", None), Ok(server_metadata())),
            (Method::GET, ["v2", "models", m]) => {
                (routed("/v2/models/{m}", None), self.model_metadata(m, None))
            }
            (Method::GET, ["v2", "models", m, "versions", v]) => (
                routed("/v2/models/{m}/versions/{v}", None),
                version(v).and_then(|v| self.model_metadata(m, Some(v))),
            ),
            (Method::GET, ["v2", "models", m, "ready"]) => (
                routed("/v2/models/{m}/ready", None),
                self.model_ready(m, None),
            ),
            (Method::GET, ["v2", "models", m, "versions", v, "ready"]) => (
                routed("/v2/models/{m}/versions/{v}/ready", None),
                version(v).and_then(|v| self.model_ready(m, Some(v))),
            ),
            (Method::POST, ["v2", "models", m, "infer"]) => (
                routed("/v2/models/{m}/infer", model(2)),
                self.infer(m, None, req).await,
            ),
            (Method::POST, ["v2", "models", m, "versions", v, "infer"]) => {
                let v = match version(v) {
                    Ok(v) => v,
                    Err(e) => {
                        return (
                            routed("/v2/models/{m}/versions/{v}/infer", model(2)),
                            Err(e),
                        );
                    }
                };
                (
                    routed("/v2/models/{m}/versions/{v}/infer", model(2)),
                    self.infer(m, Some(v), req).await,
                )
            }
            (Method::POST, ["v1", "models", m, "jobs"]) => (
                routed("/v1/models/{m}/jobs", model(2)),
                self.submit_job(m, req).await,
            ),
            (Method::GET, ["v1", "models", m, "jobs", id]) => {
                let wait = req.uri().query().and_then(wait_param);
                (
                    routed("/v1/models/{m}/jobs/{id}", None),
                    self.get_job(m, id, wait).await,
                )
            }
            (Method::DELETE, ["v1", "models", m, "jobs", id]) => (
                routed("/v1/models/{m}/jobs/{id}", None),
                self.cancel_job(m, id).await,
            ),
            (Method::GET, ["v1", "models"]) => (routed("/v1/models", None), self.list_models()),
            (Method::GET, ["v1", "stats"]) => (routed("/v1/stats", None), Ok(self.stats().await)),
            (Method::GET, ["metrics"]) => (routed("/metrics", None), Ok(metrics_reply())),
            (m, ["v2" | "v1", ..] | ["metrics"]) if known_path(&segs) => {
                (routed("other", None), Err(ApiError::Method(m.to_string())))
            }
            _ => (
                routed("other", None),
                Err(ApiError::NotFound(format!("no route for {path}"))),
            ),
        }
    }

    /// Ready when Redis answers, the registry is readable and no model this process
    /// serves has lost its inference threads.
    async fn ready(&self) -> Reply {
        let mut conn = self.conn.clone();
        let redis_ok = redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .is_ok();
        let registry_ok = self.producer.registry().registry().names().is_ok();
        // `serve` runs workers in this process: a model they stopped serving counts.
        let down = crate::health::models_down();
        let ok = redis_ok && registry_ok && down.is_empty();
        let status = if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        let body =
            json!({ "ready": ok, "redis": redis_ok, "registry": registry_ok, "models_down": down });
        json(status, body.to_string())
    }

    fn model_metadata(&self, m: &str, v: Option<u64>) -> Result<Reply, ApiError> {
        let manifest = self.producer.manifest(m, v)?;
        let versions: Vec<String> = self
            .producer
            .registry()
            .registry()
            .versions(m)?
            .iter()
            .map(u64::to_string)
            .collect();
        let tensors = |specs: &[crate::runtime::TensorSpec]| {
            specs
                .iter()
                .map(|s| json!({ "name": s.name, "datatype": s.datatype, "shape": s.shape }))
                .collect::<Vec<_>>()
        };
        let mut body = json!({
            "name": manifest.name,
            "versions": versions,
            "version": manifest.version.to_string(),
            "platform": "onnxruntime",
            "inputs": tensors(&manifest.signature.inputs),
            "outputs": tensors(&manifest.signature.outputs),
            "metadata": manifest.metadata,
        });
        // Which lengths may differ within a batch (and which outputs are cut back).
        if let Some(p) = &manifest.padding {
            body["padding"] = json!(p);
        }
        Ok(json(StatusCode::OK, body.to_string()))
    }

    fn model_ready(&self, m: &str, v: Option<u64>) -> Result<Reply, ApiError> {
        let manifest = self.producer.manifest(m, v)?;
        Ok(json(StatusCode::OK, json!({ "name": manifest.name, "version": manifest.version.to_string(), "ready": true }).to_string()))
    }

    fn list_models(&self) -> Result<Reply, ApiError> {
        let models = self.producer.registry().registry().list()?;
        let body: Vec<_> = models
            .iter()
            .map(|m| {
                json!({
                    "name": m.name, "versions": m.versions, "default": m.default, "pinned": m.pinned,
                    "size": m.manifest.size, "created_ms": m.manifest.created_ms, "metadata": m.manifest.metadata,
                })
            })
            .collect();
        Ok(json(StatusCode::OK, json!({ "models": body }).to_string()))
    }

    /// The tutorial's figures for this process, from the same counters `/metrics` shows,
    /// plus queue depth per model.
    async fn stats(&self) -> Reply {
        let m = metrics();
        let finished = |status: Status| {
            crate::metrics::sum(&m.jobs_finished, Some(("status", status.as_str())))
        };
        let submitted = crate::metrics::sum(&m.jobs_submitted, None);
        let (ok, failed) = (finished(Status::Succeeded), finished(Status::Failed));
        let mut depth = serde_json::Map::new();
        let mut conn = self.conn.clone();
        for name in self
            .producer
            .registry()
            .registry()
            .names()
            .unwrap_or_default()
        {
            if let Ok(d) = janitor::depth(&mut conn, &Keys::new(&name)).await {
                depth.insert(name, json!(d));
            }
        }
        let body = json!({
            "total_requests": self.requests.load(Ordering::Relaxed),
            "jobs_submitted": submitted,
            "successful_predictions": ok,
            "failed_predictions": failed,
            "success_rate": if ok + failed > 0 { ok as f64 / (ok + failed) as f64 } else { 1.0 },
            "uptime_seconds": self.started.elapsed().as_secs_f64(),
            "loaded_models": self.producer.registry().registry().names().unwrap_or_default(),
            "memory_mb": m.resident_memory_bytes() / 1_048_576.0,
            "queue_depth": depth,
        });
        json(StatusCode::OK, body.to_string())
    }
}

fn server_metadata() -> Reply {
    let body = json!({
        "name": "inferq",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["async_jobs", "long_poll", "binary_tensors"],
        "onnxruntime": crate::runtime::version(),
    });
    json(StatusCode::OK, body.to_string())
}

/// `/metrics` in the Prometheus text format.
pub(super) fn metrics_reply() -> Reply {
    crate::telemetry::refresh_process_metrics();
    let mut r = json(StatusCode::OK, metrics().render());
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}

/// `wait=S` (seconds, fractional allowed) from a query string.
fn wait_param(q: &str) -> Option<f64> {
    q.split('&')
        .find_map(|kv| kv.strip_prefix("wait="))
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|w| w.is_finite() && *w > 0.0)
}

/// True for paths that exist with some method (so a wrong method is 405, not 404).
fn known_path(segs: &[&str]) -> bool {
    matches!(
        segs,
        ["v2"]
            | ["v2", "models", _]
            | ["v2", "models", _, "infer" | "ready"]
            | ["v2", "models", _, "versions", _]
            | ["v2", "models", _, "versions", _, "infer" | "ready"]
            | ["v1", "models"]
            | ["v1", "models", _, "jobs"]
            | ["v1", "models", _, "jobs", _]
            | ["v1", "stats"]
            | ["metrics"]
            | ["v2", "health", "live" | "ready"]
    )
}

/// The metrics listener every role has: `/metrics` and the health routes, off the
/// public port. Ready when Redis answers and every model this process took on is
/// still served ([`crate::health`]).
pub async fn ops<B>(req: Request<B>, mut conn: crate::queue::Conn) -> Reply {
    let path = req.uri().path();
    let t0 = std::time::Instant::now();
    let (template, resp) = match (req.method(), path) {
        (&Method::GET, "/metrics") => ("/metrics", metrics_reply()),
        (&Method::GET, "/v2/health/live") => (
            "/v2/health/live",
            json(StatusCode::OK, r#"{"live":true}"#.into()),
        ),
        (&Method::GET, "/v2/health/ready") => {
            let redis_ok = redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .is_ok();
            let down = crate::health::models_down();
            let ok = redis_ok && down.is_empty();
            let status = if ok {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let body = json!({ "ready": ok, "redis": redis_ok, "models_down": down });
            ("/v2/health/ready", json(status, body.to_string()))
        }
        _ => {
            let e = ApiError::NotFound(format!("no route for {path} on the metrics listener"));
            ("other", json(e.status(), e.body()))
        }
    };
    metrics()
        .http_duration
        .with_label_values(&[template, resp.status().as_str()])
        .observe(t0.elapsed().as_secs_f64());
    resp
}
