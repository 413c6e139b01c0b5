//! Job routes: submit (idempotent, validated, atomic), poll and long-poll, cancel,
//! and synchronous infer through the same queue.

use std::time::Duration;

use bytes::Bytes;
use hyper::body::Body;
use hyper::header::{self, HeaderValue};
use hyper::{Request, StatusCode};
use serde_json::json;

use super::limits::{ReadBody, read_body};
use super::{ApiError, App, Reply, json};
use crate::metrics::metrics;
use crate::producer::{Accepted, JobRequest, ProduceError, Route};
use crate::protocol::job::{self, JobRecord};
use crate::queue::Keys;
use crate::queue::submit::{self as q, Cancelled};

fn status_url(model: &str, id: &str) -> String {
    format!("/v1/models/{model}/jobs/{id}")
}

/// 202 with the job's id and status URL (also as `Location`), plus `extra` members.
fn accepted(model: &str, id: &str, extra: serde_json::Value) -> Reply {
    let url = status_url(model, id);
    let mut body = json!({ "id": id, "status_url": url });
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    let mut r = json(StatusCode::ACCEPTED, body.to_string());
    if let Ok(v) = HeaderValue::from_str(&url) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// The answer to a submit Redis did not confirm (AUDIT D6): the job may be queued,
/// so the client gets its id to look it up, never "nothing was enqueued".
fn unconfirmed(model: &str, id: &str) -> Reply {
    let message = format!(
        "Redis did not confirm the enqueue in time: the job may or may not be queued. \
         Poll the status URL (once Redis answers again, 404 means it was not queued), or \
         submit again with `Idempotency-Key: {id}` and the same body, which cannot create a second job."
    );
    accepted(
        model,
        id,
        json!({ "status": "unknown", "message": message }),
    )
}

/// A `?wait=` of `requested` seconds, capped at `cap`; never panics, whatever the
/// request or the setting (AUDIT D27: `from_secs_f64` of a cap near u64::MAX did).
fn poll_wait(requested: f64, cap: Duration) -> Duration {
    Duration::try_from_secs_f64(requested).map_or(cap, |w| w.min(cap))
}

/// What an enqueue came to.
#[derive(Debug)]
enum Enqueued {
    /// Redis answered: the job is queued (new, or the same job again).
    Done(Accepted),
    /// Redis did not answer: the job with this id may be queued.
    Unconfirmed(String),
}

/// A submit whose body has arrived: what the producer needs from the request, and
/// the body's share of the in-flight budget (held until the submit is done).
#[derive(Debug)]
struct ReadJob<'a> {
    read: ReadBody<'a>,
    id: Option<String>,
    traceparent: Option<String>,
}

impl App {
    /// Checks the model, then reads the body (deadline, size cap, byte budget).
    async fn read_job<B>(
        &self,
        model: &str,
        version: Option<u64>,
        req: Request<B>,
    ) -> Result<ReadJob<'_>, ApiError>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.producer.manifest(model, version)?;
        let read = read_body(req, self.body_limits()).await?;
        let header = |name: &str| {
            read.parts
                .headers
                .get(name)
                .map(|v| v.to_str().map(str::to_owned))
        };
        let id = match header("idempotency-key") {
            Some(Ok(h)) => Some(h),
            Some(Err(_)) => {
                return Err(ApiError::Invalid(
                    "Idempotency-Key is not valid text".into(),
                ));
            }
            None => None,
        };
        let traceparent = header("traceparent").and_then(Result::ok);
        Ok(ReadJob {
            read,
            id,
            traceparent,
        })
    }

    /// Hands a read body to the producer (validation, atomic enqueue).
    async fn enqueue(
        &self,
        model: &str,
        version: Option<u64>,
        route: Route,
        job: ReadJob<'_>,
    ) -> Result<Enqueued, ApiError> {
        let submitted = self
            .producer
            .submit(JobRequest {
                model,
                route,
                version,
                body: &job.read.body,
                id: job.id,
                traceparent: job.traceparent,
            })
            .await;
        match submitted {
            Ok(a) => Ok(Enqueued::Done(a)),
            Err(ProduceError::Unconfirmed { id, .. }) => Ok(Enqueued::Unconfirmed(id)),
            Err(e) => Err(e.into()),
        }
    }

    /// `POST /v1/models/{m}/jobs`: 202 with the status URL; the same id and body again: 200.
    pub(super) async fn submit_job<B>(
        &self,
        model: &str,
        req: Request<B>,
    ) -> Result<Reply, ApiError>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let job = self.read_job(model, None, req).await?;
        let a = match self.enqueue(model, None, Route::Jobs, job).await? {
            Enqueued::Done(a) => a,
            Enqueued::Unconfirmed(id) => return Ok(unconfirmed(model, &id)),
        };
        if !a.created {
            return self.get_job(model, &a.id, None).await;
        }
        Ok(accepted(model, &a.id, json!({ "status": "queued" })))
    }

    /// `GET /v1/models/{m}/jobs/{id}[?wait=S]`: the record, waiting up to S seconds
    /// (capped) for it to turn terminal.
    pub(super) async fn get_job(
        &self,
        model: &str,
        id: &str,
        wait: Option<f64>,
    ) -> Result<Reply, ApiError> {
        let keys = Self::job_keys(model, id)?;
        let wait = wait.map(|s| poll_wait(s, self.cfg.max_poll_wait));
        let record = self
            .wait_terminal(&keys, id, wait.unwrap_or_default())
            .await?;
        let record = record.ok_or_else(|| {
            ApiError::NotFound(format!(
                "unknown job `{id}` of model `{model}` (never submitted, or its result expired)"
            ))
        })?;
        Ok(json(
            StatusCode::OK,
            serde_json::to_string(&record).expect("a record always serializes, this is a bug"),
        ))
    }

    /// `DELETE /v1/models/{m}/jobs/{id}`: cancels a job that is not terminal yet.
    pub(super) async fn cancel_job(&self, model: &str, id: &str) -> Result<Reply, ApiError> {
        let keys = Self::job_keys(model, id)?;
        let mut conn = self.conn.clone();
        match q::cancel(&mut conn, &keys, id, self.cfg.result_ttl_s).await? {
            Cancelled::Unknown => Err(ApiError::NotFound(format!(
                "unknown job `{id}` of model `{model}`"
            ))),
            Cancelled::Done(record) => {
                metrics()
                    .jobs_finished
                    .with_label_values(&[model, "", "cancelled"])
                    .inc();
                Ok(json(StatusCode::OK, record))
            }
            Cancelled::AlreadyTerminal(s) => Err(ApiError::Conflict(format!(
                "job `{id}` is already {}",
                s.as_str()
            ))),
        }
    }

    /// `POST /v2/models/{m}[/versions/{v}]/infer`: through the queue like any job;
    /// 200 with the OIP response when done in time, else 202 with the status URL.
    pub(super) async fn infer<B>(
        &self,
        model: &str,
        version: Option<u64>,
        req: Request<B>,
    ) -> Result<Reply, ApiError>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let job = self.read_job(model, version, req).await?;
        // The waiter slot once the body is in (a slow body holds none), and before the
        // enqueue (a sync infer refused for want of one enqueues nothing).
        let _permit = self.waiter_permit()?;
        let a = match self.enqueue(model, version, Route::Infer, job).await? {
            Enqueued::Done(a) => a,
            Enqueued::Unconfirmed(id) => return Ok(unconfirmed(model, &id)),
        };
        let record = match self.wait_for(&a.keys, &a.id, self.cfg.sync_timeout).await {
            Ok(record) => record,
            // The job is queued: a failed wait must not read as a failed submit.
            Err(ApiError::Unavailable(why)) => {
                let message = format!(
                    "the job is queued, but waiting for its result failed ({why}); poll the status URL"
                );
                let extra = json!({ "status": "queued", "message": message });
                return Ok(accepted(model, &a.id, extra));
            }
            Err(e) => return Err(e),
        };
        let record = record.ok_or_else(|| {
            ApiError::NotFound(format!("job `{}` vanished (Redis lost it)", a.id))
        })?;
        match (record.status, record.outputs) {
            (job::Status::Succeeded, Some(outputs)) => {
                Ok(json(StatusCode::OK, outputs.get().to_owned()))
            }
            (s, _) if s.is_terminal() => Err(ApiError::JobFailed {
                message: record
                    .error
                    .unwrap_or_else(|| format!("job {}", s.as_str())),
                kind: record.error_kind.unwrap_or_else(|| s.as_str().to_owned()),
            }),
            (s, _) => Ok(accepted(model, &a.id, json!({ "status": s.as_str() }))),
        }
    }

    fn job_keys(model: &str, id: &str) -> Result<Keys, ApiError> {
        if !crate::registry::valid_name(model) || !job::valid_id(id) {
            return Err(ApiError::NotFound(format!(
                "unknown job `{id}` of model `{model}`"
            )));
        }
        Ok(Keys::new(model))
    }

    /// The record once terminal, or as it is when `wait` runs out; `None` when unknown.
    async fn wait_terminal(
        &self,
        keys: &Keys,
        id: &str,
        wait: Duration,
    ) -> Result<Option<JobRecord>, ApiError> {
        if wait.is_zero() {
            let mut conn = self.conn.clone();
            return Ok(q::get(&mut conn, keys, id).await?);
        }
        let _permit = self.waiter_permit()?;
        self.wait_for(keys, id, wait).await
    }

    /// One of the `max_waiters` slots for a long-poll or sync infer; 429 when none is free.
    fn waiter_permit(&self) -> Result<tokio::sync::SemaphorePermit<'_>, ApiError> {
        self.waiters.try_acquire().map_err(|_| {
            ApiError::Busy("too many requests are waiting for results; retry later".into())
        })
    }

    /// [`App::wait_terminal`] for a caller that holds a waiter slot. The waiter
    /// registers before the first read, so a completion in between is not missed.
    async fn wait_for(
        &self,
        keys: &Keys,
        id: &str,
        wait: Duration,
    ) -> Result<Option<JobRecord>, ApiError> {
        let mut conn = self.conn.clone();
        let mut waiter = self.notifier.register(keys.model(), id);
        let until = tokio::time::Instant::now() + wait;
        loop {
            let record = q::get(&mut conn, keys, id).await?;
            match &record {
                Some(r) if !r.status.is_terminal() => {}
                _ => return Ok(record),
            }
            tokio::select! {
                () = waiter.changed() => {}
                () = tokio::time::sleep_until(until) => return Ok(q::get(&mut conn, keys, id).await?),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_waits_are_capped_and_never_panic() {
        let cap = Duration::from_secs(60);
        assert_eq!(poll_wait(1.5, cap), Duration::from_millis(1500));
        assert_eq!(poll_wait(30_000.0, cap), cap);
        assert_eq!(poll_wait(f64::INFINITY, cap), cap);
        assert_eq!(poll_wait(1e30, cap), cap);
        let huge = Duration::from_secs(u64::MAX);
        assert_eq!(poll_wait(5.0, huge), Duration::from_secs(5));
        assert_eq!(poll_wait(1e30, huge), huge);
    }
}
