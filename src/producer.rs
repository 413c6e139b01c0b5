//! The producer side, shared by the HTTP front door and the CLI (`submit`, `bench`):
//! check a request against the model's signature, then enqueue it atomically.
//! Nothing is written when any check fails; when Redis does not confirm the write,
//! the caller learns the job id it may be queued under ([`ProduceError::Unconfirmed`]).

use crate::metrics::metrics;
use crate::protocol::job::{self, JobEntry, Payload};
use crate::protocol::oip;
use crate::queue::submit::{self as q, SubmitMeta, Submitted};
use crate::queue::{Conn, Keys, QueueError};
use crate::registry::{Manifest, RegistryCache, RegistryError, valid_name};
use crate::runtime::InvalidInput;

/// Why a job was not enqueued.
#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    /// Unknown model or version.
    #[error("{0}")]
    NotFound(String),
    /// Malformed or invalid request.
    #[error("{0}")]
    Invalid(String),
    /// A tensor over the per-job cap.
    #[error("{0}")]
    TooLarge(String),
    /// The id is taken by another request.
    #[error("{0}")]
    Conflict(String),
    /// The model's backlog is full.
    #[error("{0}")]
    QueueFull(String),
    /// The registry could not be read.
    #[error("{0}")]
    Registry(RegistryError),
    /// Redis failed before the job could be enqueued: nothing was written.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// Redis did not confirm the enqueue (a timeout, or a connection lost after the
    /// request went out), so the job may be queued or not (AUDIT D6). Its id says
    /// which once Redis answers again; a resubmit with the same id and body cannot
    /// make a second job.
    #[error(
        "Redis did not confirm the enqueue of job `{id}` ({source}): it may or may not be queued; look it up by its id, or submit again with the same id and body (that cannot create a second job)"
    )]
    Unconfirmed {
        /// The job id the enqueue used.
        id: String,
        /// What went wrong (boxed: it is rare, and the error stays small).
        source: Box<QueueError>,
    },
}

impl From<RegistryError> for ProduceError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::UnknownModel(_)
            | RegistryError::UnknownVersion(..)
            | RegistryError::InvalidName(_) => ProduceError::NotFound(e.to_string()),
            other => ProduceError::Registry(other),
        }
    }
}

/// Which way a job was submitted. Part of its idempotency fingerprint with the
/// version, so an id reused on another route or version is a conflict, not silently
/// the same job (AUDIT D9).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Route {
    /// Asynchronous: `POST /v1/models/{m}/jobs` and `inferq submit`.
    #[default]
    Jobs,
    /// Synchronous: `POST /v2/models/{m}[/versions/{v}]/infer`.
    Infer,
}

impl Route {
    /// The word the fingerprint uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Jobs => "jobs",
            Route::Infer => "infer",
        }
    }
}

/// sha256 (hex) of what makes two submits of one id the same job: the route, the
/// resolved version and the body, exactly as sent.
pub fn fingerprint(route: Route, version: u64, body: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(format!("{} {version}\n", route.as_str()).as_bytes());
    h.update(body);
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// One job to enqueue.
#[derive(Debug, Clone, Default)]
pub struct JobRequest<'a> {
    /// Model name.
    pub model: &'a str,
    /// The route it came by (part of the idempotency fingerprint).
    pub route: Route,
    /// Version; `None` resolves the default now (and records it).
    pub version: Option<u64>,
    /// OIP v2 JSON body (or the `features` shorthand), with optional `id`,
    /// `deadline_ms`, `reply_to`.
    pub body: &'a [u8],
    /// A job id that overrides the body's (the `Idempotency-Key` header).
    pub id: Option<String>,
    /// W3C trace context to carry.
    pub traceparent: Option<String>,
}

/// A job that is in the queue (new, or found there with the same body).
#[derive(Debug, Clone)]
pub struct Accepted {
    /// The model's keys.
    pub keys: Keys,
    /// Job id.
    pub id: String,
    /// False when the same id and body were already enqueued.
    pub created: bool,
}

/// Validates and enqueues jobs.
#[derive(Debug, Clone)]
pub struct Producer {
    registry: RegistryCache,
    conn: Conn,
    max_elements: usize,
    max_queue: u64,
}

impl Producer {
    /// A producer over a registry and a Redis connection.
    pub fn new(
        registry: RegistryCache,
        conn: Conn,
        max_elements: usize,
        max_queue: u64,
    ) -> Producer {
        Producer {
            registry,
            conn,
            max_elements,
            max_queue,
        }
    }

    /// The registry cache (for metadata routes).
    pub fn registry(&self) -> &RegistryCache {
        &self.registry
    }

    /// The manifest of a model version (default when `None`); not-found for bad names.
    pub fn manifest(
        &self,
        model: &str,
        version: Option<u64>,
    ) -> Result<std::sync::Arc<Manifest>, ProduceError> {
        if !valid_name(model) {
            return Err(ProduceError::NotFound(format!("unknown model `{model}`")));
        }
        Ok(self.registry.manifest(model, version)?)
    }

    /// Checks the request against the model, then writes record and entry atomically.
    pub async fn submit(&self, req: JobRequest<'_>) -> Result<Accepted, ProduceError> {
        let manifest = self.manifest(req.model, req.version)?;
        let request = oip::decode_request(req.body, manifest.signature.single_input())
            .map_err(|e| ProduceError::Invalid(e.0))?;
        if let Some(unknown) = request
            .outputs
            .iter()
            .find(|o| !manifest.signature.outputs.iter().any(|s| &s.name == *o))
        {
            return Err(ProduceError::Invalid(format!(
                "unknown output `{unknown}` requested"
            )));
        }
        let valid = manifest
            .signature
            .validate(request.inputs, self.max_elements)
            .map_err(|e| match e {
                InvalidInput::Invalid(m) => ProduceError::Invalid(m),
                InvalidInput::TooLarge(m) => ProduceError::TooLarge(m),
            })?;
        if let Some(p) = &manifest.padding {
            // Inputs padded together must agree on their padded axes.
            p.lengths(&valid.tensors).map_err(ProduceError::Invalid)?;
        }
        let id = req.id.or(request.id).unwrap_or_else(job::new_id);
        if !job::valid_id(&id) {
            let shown: String = id.chars().take(140).collect();
            return Err(ProduceError::Invalid(format!(
                "job id `{shown}` must be 1-128 characters of A-Za-z0-9._:-"
            )));
        }
        let keys = Keys::new(req.model);
        if let Some(r) = &request.reply_to
            && !keys.is_reply_key(r)
        {
            return Err(ProduceError::Invalid(format!(
                "reply_to must start with `{}`",
                keys.reply_prefix()
            )));
        }
        let body_sha = fingerprint(req.route, manifest.version, req.body);
        let entry = JobEntry {
            id: id.clone(),
            payload: Payload::Json(req.body.to_vec()),
            version: Some(manifest.version),
            deadline_ms: request.deadline_ms,
            reply_to: request.reply_to,
            traceparent: req.traceparent,
            record: true,
        };
        let meta = SubmitMeta {
            body_sha: &body_sha,
            max_queue: self.max_queue,
            version: manifest.version,
        };
        let mut conn = self.conn.clone();
        let submitted = match q::submit(&mut conn, &keys, &entry, &meta).await {
            Ok(s) => s,
            Err(source) if source.may_have_run() => {
                tracing::warn!(model = req.model, id = %id, error = %source, "enqueue not confirmed; the job may be queued");
                return Err(ProduceError::Unconfirmed {
                    id,
                    source: Box::new(source),
                });
            }
            Err(e) => return Err(e.into()),
        };
        match submitted {
            Submitted::Created(_) => {
                metrics()
                    .jobs_submitted
                    .with_label_values(&[req.model])
                    .inc();
                tracing::debug!(model = req.model, id = %id, "job queued");
                Ok(Accepted {
                    keys,
                    id,
                    created: true,
                })
            }
            Submitted::Existing(_) => Ok(Accepted {
                keys,
                id,
                created: false,
            }),
            Submitted::Conflict => Err(ProduceError::Conflict(format!(
                "job id `{id}` is already used by a different request"
            ))),
            Submitted::QueueFull(n) => Err(ProduceError::QueueFull(format!(
                "model `{}` has {n} jobs queued (max_queue {}); retry later",
                req.model, self.max_queue
            ))),
        }
    }
}
