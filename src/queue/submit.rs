//! The gateway's side: enqueue a job atomically (record + entry, or nothing), read a
//! record, cancel.

use std::collections::HashMap;

use redis::Value;

use super::script::scripts;
use super::{Conn, Keys, QueueError, int, text};
use crate::protocol::job::{JobEntry, JobRecord, Status};

/// What a submit did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Submitted {
    /// A new job; the stream entry id.
    Created(String),
    /// The same id with the same body already exists: nothing enqueued.
    Existing(Status),
    /// The id is taken by a different request.
    Conflict,
    /// The model's backlog is at `max_queue`.
    QueueFull(u64),
}

/// What to enqueue besides the entry itself.
#[derive(Debug, Clone)]
pub struct SubmitMeta<'a> {
    /// sha256 of the request, for idempotent resubmits.
    pub body_sha: &'a str,
    /// Backlog cap.
    pub max_queue: u64,
    /// Version resolved at submit (always recorded by the gateway).
    pub version: u64,
}

/// Writes the job record (`queued`) and the stream entry in one script: both or
/// neither. A full Redis (OOM) refuses the whole script.
pub async fn submit(
    conn: &mut Conn,
    keys: &Keys,
    entry: &JobEntry,
    meta: &SubmitMeta<'_>,
) -> Result<Submitted, QueueError> {
    let record = keys.job(&entry.id);
    let result = keys.result(&entry.id);
    // This writes the record hash, so the entry must say so, whatever the caller set.
    let mut fields = entry.to_fields();
    if !entry.record {
        fields.push((crate::protocol::job::field::RECORD, b"1".to_vec()));
    }
    let max_queue = meta.max_queue.to_string();
    let now = crate::now_ms().to_string();
    let version = meta.version.to_string();
    let reply = entry.reply_to.as_deref().unwrap_or("");
    let mut args: Vec<&[u8]> = vec![
        meta.body_sha.as_bytes(),
        max_queue.as_bytes(),
        now.as_bytes(),
        keys.model().as_bytes(),
        version.as_bytes(),
        reply.as_bytes(),
    ];
    for (k, v) in &fields {
        args.push(k.as_bytes());
        args.push(v);
    }
    let v = scripts()
        .submit
        .run(
            conn,
            &[&record, keys.jobs(), &result],
            &args,
            "enqueue a job",
        )
        .await?;
    let Value::Array(parts) = v else {
        return Err(QueueError::Protocol("enqueue a job"));
    };
    let code = parts
        .first()
        .and_then(int)
        .ok_or(QueueError::Protocol("enqueue a job"))?;
    let second = parts.get(1);
    Ok(match code {
        0 => Submitted::Created(second.and_then(text).unwrap_or_default()),
        1 => Submitted::Existing(
            second
                .and_then(text)
                .and_then(|s| Status::parse(&s))
                .unwrap_or(Status::Queued),
        ),
        2 => Submitted::Conflict,
        3 => Submitted::QueueFull(second.and_then(int).unwrap_or(0).max(0) as u64),
        _ => return Err(QueueError::Protocol("enqueue a job")),
    })
}

/// The job record, or `None` for an unknown (or expired) job. The hash is read before
/// the result, so a job that turns terminal between the two reads is seen terminal,
/// never unknown.
pub async fn get(conn: &mut Conn, keys: &Keys, id: &str) -> Result<Option<JobRecord>, QueueError> {
    let (ttl, hash, result): (i64, HashMap<String, String>, Option<String>) = redis::pipe()
        .cmd("PTTL")
        .arg(keys.job(id))
        .cmd("HGETALL")
        .arg(keys.job(id))
        .cmd("GET")
        .arg(keys.result(id))
        .query_async(conn)
        .await
        .map_err(QueueError::redis("read a job record"))?;
    match result {
        Some(json) => serde_json::from_str(&json)
            .map(Some)
            .map_err(|_| QueueError::Protocol("read a terminal record (not a job record)")),
        // Only an ended job's hash has a TTL: its result has expired, the job is unknown.
        None if ttl >= 0 => Ok(None),
        None => Ok(JobRecord::from_hash(id, keys.model(), &hash)),
    }
}

/// What a cancel did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cancelled {
    /// Unknown job.
    Unknown,
    /// Cancelled now; the record JSON.
    Done(String),
    /// Already terminal with this status.
    AlreadyTerminal(Status),
}

/// Cancels a job that is not terminal yet (first writer wins against the worker).
pub async fn cancel(
    conn: &mut Conn,
    keys: &Keys,
    id: &str,
    ttl_s: u64,
) -> Result<Cancelled, QueueError> {
    let record = keys.job(id);
    let result = keys.result(id);
    let reply: Option<String> = redis::cmd("HGET")
        .arg(&record)
        .arg(crate::protocol::job::field::REPLY_TO)
        .query_async(conn)
        .await
        .map_err(QueueError::redis("read a job record"))?;
    let reply = reply
        .filter(|r| keys.is_reply_key(r))
        .unwrap_or_else(|| record.clone());
    let now = crate::now_ms().to_string();
    let ttl = ttl_s.to_string();
    let args: [&[u8]; 4] = [
        now.as_bytes(),
        ttl.as_bytes(),
        keys.done().as_bytes(),
        id.as_bytes(),
    ];
    let v = scripts()
        .cancel
        .run(conn, &[&record, &result, &reply], &args, "cancel a job")
        .await?;
    let Value::Array(parts) = v else {
        return Err(QueueError::Protocol("cancel a job"));
    };
    Ok(match parts.first().and_then(int) {
        Some(0) => Cancelled::Unknown,
        Some(1) => Cancelled::Done(parts.get(1).and_then(text).unwrap_or_default()),
        Some(2) => Cancelled::AlreadyTerminal(
            parts
                .get(1)
                .and_then(text)
                .and_then(|s| Status::parse(&s))
                .unwrap_or(Status::Succeeded),
        ),
        _ => return Err(QueueError::Protocol("cancel a job")),
    })
}
