//! A job on the wire: the stream entry a producer writes, and the job record
//! (hash fields and the JSON shown to clients) a worker or the gateway writes back.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::oip::DecodeError;

/// Field names of a job entry and of the job record hash: the contract of docs/PROTOCOL.md.
pub mod field {
    /// Protocol version of the entry.
    pub const V: &str = "v";
    /// Job id, unique per model.
    pub const ID: &str = "id";
    /// OIP v2 JSON request.
    pub const BODY: &str = "body";
    /// Binary tensor payload (protocol::binary).
    pub const BIN: &str = "bin";
    /// Model version; absent means the model's default.
    pub const VERSION: &str = "version";
    /// Unix ms after which the job must not be computed.
    pub const DEADLINE_MS: &str = "deadline_ms";
    /// Reply list key under `inferq:{m}:reply:`.
    pub const REPLY_TO: &str = "reply_to";
    /// W3C trace context.
    pub const TRACEPARENT: &str = "traceparent";
    /// `1` when the gateway wrote a record hash beside the entry (the worker then gives
    /// the hash the result TTL when the job ends).
    pub const RECORD: &str = "record";
    /// Record: job status.
    pub const STATUS: &str = "status";
    /// Record: model name.
    pub const MODEL: &str = "model";
    /// Record: when the job entered the queue.
    pub const ENQUEUED_MS: &str = "enqueued_ms";
    /// Record: when a worker took it into a batch.
    pub const STARTED_MS: &str = "started_ms";
    /// Record: when it turned terminal.
    pub const FINISHED_MS: &str = "finished_ms";
    /// Record: deliveries so far.
    pub const ATTEMPTS: &str = "attempts";
    /// Record: OIP v2 response JSON of a succeeded job.
    pub const OUTPUTS: &str = "outputs";
    /// Record: error message of a failed, expired or cancelled job.
    pub const ERROR: &str = "error";
    /// Record: machine word for the error.
    pub const ERROR_KIND: &str = "error_kind";
    /// Record: 1 when the job used up its attempts.
    pub const DEAD_LETTERED: &str = "dead_lettered";
    /// Record: last retryable error, kept for the dead-letter reason.
    pub const LAST_ERROR: &str = "last_error";
    /// Record: sha256 of the submitted body, for idempotent resubmits.
    pub const BODY_SHA: &str = "body_sha";
}

/// The protocol version this build writes and reads.
pub const PROTOCOL_VERSION: &str = "1";

/// A job id is 1–128 characters of `[A-Za-z0-9._:-]`: safe inside keys, URLs and logs.
pub fn valid_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// A fresh 128-bit random job id, URL-safe (32 hex digits).
pub fn new_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// The inputs of a job as they travel.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// `body`: an OIP v2 JSON request.
    Json(Vec<u8>),
    /// `bin`: the binary tensor encoding.
    Binary(Vec<u8>),
}

/// One job entry of `inferq:{m}:jobs`, parsed but not yet validated against a model.
#[derive(Debug, Clone, PartialEq)]
pub struct JobEntry {
    /// The job id.
    pub id: String,
    /// The inputs.
    pub payload: Payload,
    /// The model version asked for; `None` means the default at the time the worker takes it.
    pub version: Option<u64>,
    /// Unix ms after which computing is pointless.
    pub deadline_ms: Option<u64>,
    /// Where to push the record when terminal (checked by the queue against the model's prefix).
    pub reply_to: Option<String>,
    /// W3C trace context to continue.
    pub traceparent: Option<String>,
    /// True when a record hash was written with the entry (the gateway's submit).
    pub record: bool,
}

/// Bounds of one stream entry, checked before any field is copied or decoded, so no
/// producer's entry can make the worker copy, parse or script unbounded data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryLimits {
    /// Field/value pairs.
    pub max_fields: usize,
    /// Bytes of all names and values together.
    pub max_bytes: usize,
}

/// Longest field name, and longest value of a field other than `body` and `bin`.
const MAX_NAME_BYTES: usize = 64;
const MAX_SMALL_VALUE_BYTES: usize = 4096;

impl EntryLimits {
    /// Why `fields` are over a bound, naming it; `None` when they are within them.
    pub fn check(&self, fields: &[(Vec<u8>, Vec<u8>)]) -> Option<String> {
        if fields.len() > self.max_fields {
            return Some(format!(
                "entry has {} fields, over the bound of {} (INFERQ_MAX_ENTRY_FIELDS)",
                fields.len(),
                self.max_fields
            ));
        }
        let bytes: usize = fields.iter().map(|(k, v)| k.len() + v.len()).sum();
        if bytes > self.max_bytes {
            return Some(format!(
                "entry holds {bytes} bytes, over the bound of {} (INFERQ_MAX_ENTRY_BYTES)",
                self.max_bytes
            ));
        }
        for (k, v) in fields {
            if k.len() > MAX_NAME_BYTES {
                return Some(format!(
                    "entry has a field name of {} bytes, over the bound of {MAX_NAME_BYTES}",
                    k.len()
                ));
            }
            let payload = k == b"body" || k == b"bin";
            if !payload && v.len() > MAX_SMALL_VALUE_BYTES {
                return Some(format!(
                    "entry field `{}` holds {} bytes, over the bound of {MAX_SMALL_VALUE_BYTES}",
                    String::from_utf8_lossy(k),
                    v.len()
                ));
            }
        }
        None
    }

    /// What a dead letter keeps of an entry over its bounds: the first `max_fields`
    /// fields, names and values cut to the small-value bound.
    pub fn truncated(&self, fields: &[(Vec<u8>, Vec<u8>)]) -> Vec<(Vec<u8>, Vec<u8>)> {
        fields
            .iter()
            .take(self.max_fields)
            .map(|(k, v)| {
                (
                    k[..k.len().min(MAX_NAME_BYTES)].to_vec(),
                    v[..v.len().min(MAX_SMALL_VALUE_BYTES)].to_vec(),
                )
            })
            .collect()
    }
}

/// The first valid job id among an entry's fields (for answering an entry that cannot
/// be parsed).
pub fn first_id(fields: &[(Vec<u8>, Vec<u8>)]) -> Option<String> {
    fields
        .iter()
        .find(|(k, _)| k == b"id")
        .and_then(|(_, v)| std::str::from_utf8(v).ok())
        .filter(|id| valid_id(id))
        .map(str::to_owned)
}

/// An entry that cannot be a job; `id` is set when the entry at least named a valid one,
/// so the failure can be written to that job's record.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{error}")]
pub struct EntryError {
    /// The job id, when readable.
    pub id: Option<String>,
    /// What is wrong.
    pub error: DecodeError,
}

/// The fields the protocol reads; each may appear once.
const KNOWN_FIELDS: [&[u8]; 9] = [
    b"id",
    b"v",
    b"body",
    b"bin",
    b"version",
    b"deadline_ms",
    b"reply_to",
    b"traceparent",
    b"record",
];

impl JobEntry {
    /// Parses stream entry fields; unknown fields are ignored (forward compatible).
    pub fn from_fields<'a>(
        fields: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    ) -> Result<JobEntry, EntryError> {
        let mut id = None;
        let mut v = None;
        let mut payload = None;
        let mut version = None;
        let mut deadline = None;
        let mut reply_to = None;
        let mut traceparent = None;
        let mut record = false;
        let mut problem: Option<String> = None;
        let mut seen: Vec<&[u8]> = Vec::new();
        for (k, val) in fields {
            let text = || std::str::from_utf8(val).ok().map(str::to_owned);
            if KNOWN_FIELDS.contains(&k) {
                if seen.contains(&k) {
                    // Readers would disagree on which one counts (the inflight index
                    // takes the first id): refuse rather than guess.
                    problem = problem.or(Some(format!(
                        "field `{}` appears twice",
                        String::from_utf8_lossy(k)
                    )));
                    continue;
                }
                seen.push(k);
            }
            match k {
                b"id" => id = text(),
                b"v" => v = text(),
                b"body" => payload = Some(Payload::Json(val.to_vec())),
                b"bin" => payload = Some(Payload::Binary(val.to_vec())),
                b"version" => version = Some(text()),
                b"deadline_ms" => deadline = Some(text()),
                b"reply_to" => reply_to = text().or_else(|| Some(String::from("\u{fffd}"))),
                b"traceparent" => traceparent = text(),
                b"record" => record = val == b"1",
                _ => {}
            }
        }
        let id = id.filter(|i| valid_id(i));
        let fail = |id: &Option<String>, msg: String| EntryError {
            id: id.clone(),
            error: DecodeError(msg),
        };
        if id.is_none() {
            problem = Some("entry has no valid `id` (1-128 characters of A-Za-z0-9._:-)".into());
        }
        match v.as_deref() {
            Some(PROTOCOL_VERSION) => {}
            Some(other) => {
                problem = problem.or(Some(format!(
                    "unsupported protocol version `v`={other} (expected 1)"
                )))
            }
            None => problem = problem.or(Some("entry has no protocol version `v`".into())),
        }
        if let Some(p) = problem {
            return Err(fail(&id, p));
        }
        let version = match version {
            None => None,
            Some(Some(s)) => match s.parse::<u64>() {
                Ok(n) if n > 0 => Some(n),
                _ => {
                    return Err(fail(
                        &id,
                        format!("`version` must be a positive integer, got `{s}`"),
                    ));
                }
            },
            Some(None) => return Err(fail(&id, "`version` is not UTF-8".into())),
        };
        let deadline_ms = match deadline {
            None => None,
            Some(Some(s)) => Some(s.parse::<u64>().map_err(|_| {
                fail(
                    &id,
                    format!("`deadline_ms` must be unix milliseconds, got `{s}`"),
                )
            })?),
            Some(None) => return Err(fail(&id, "`deadline_ms` is not UTF-8".into())),
        };
        let payload =
            payload.ok_or_else(|| fail(&id, "entry has neither `body` nor `bin`".into()))?;
        Ok(JobEntry {
            id: id.expect("checked above, this is a bug"),
            payload,
            version,
            deadline_ms,
            reply_to,
            traceparent,
            record,
        })
    }

    /// The entry's fields, ready for XADD.
    pub fn to_fields(&self) -> Vec<(&'static str, Vec<u8>)> {
        let mut f = vec![
            (field::V, PROTOCOL_VERSION.as_bytes().to_vec()),
            (field::ID, self.id.clone().into_bytes()),
        ];
        match &self.payload {
            Payload::Json(b) => f.push((field::BODY, b.clone())),
            Payload::Binary(b) => f.push((field::BIN, b.clone())),
        }
        if let Some(v) = self.version {
            f.push((field::VERSION, v.to_string().into_bytes()));
        }
        if let Some(d) = self.deadline_ms {
            f.push((field::DEADLINE_MS, d.to_string().into_bytes()));
        }
        if let Some(r) = &self.reply_to {
            f.push((field::REPLY_TO, r.clone().into_bytes()));
        }
        if let Some(t) = &self.traceparent {
            f.push((field::TRACEPARENT, t.clone().into_bytes()));
        }
        if self.record {
            f.push((field::RECORD, b"1".to_vec()));
        }
        f
    }
}

/// Where a job is in its life. Terminal states are written once (first writer wins).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Accepted, waiting for a worker.
    Queued,
    /// Taken into a batch by a worker.
    Running,
    /// Outputs computed.
    Succeeded,
    /// Could not be computed; `error` says why.
    Failed,
    /// Its deadline passed before compute.
    Expired,
    /// Cancelled by a client before it finished.
    Cancelled,
}

impl Status {
    /// Every status, in life order.
    pub const ALL: [Status; 6] = [
        Status::Queued,
        Status::Running,
        Status::Succeeded,
        Status::Failed,
        Status::Expired,
        Status::Cancelled,
    ];

    /// The record's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Running => "running",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Expired => "expired",
            Status::Cancelled => "cancelled",
        }
    }

    /// Parses the record's spelling.
    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|x| x.as_str() == s)
    }

    /// True once the job will never change again.
    pub fn is_terminal(self) -> bool {
        !matches!(self, Status::Queued | Status::Running)
    }
}

/// The job record as clients see it (HTTP responses, `reply_to` pushes).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRecord {
    /// The job id.
    pub id: String,
    /// Where the job is.
    pub status: Status,
    /// The model.
    pub model: String,
    /// The version that ran or will run (absent while a direct producer's job waits).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// Enqueue time, unix ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enqueued_ms: Option<u64>,
    /// Batch start, unix ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<u64>,
    /// Terminal time, unix ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
    /// Deliveries so far.
    #[serde(default)]
    pub attempts: u32,
    /// OIP v2 response, for `succeeded`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outputs: Option<Box<RawValue>>,
    /// What went wrong, for `failed`, `expired`, `cancelled`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Machine word for `error`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<String>,
    /// True when the job used up its attempts.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dead_lettered: bool,
}

impl JobRecord {
    /// Builds the record from the job hash; `None` when the hash has no valid status
    /// (an unknown or expired job).
    pub fn from_hash(id: &str, model: &str, h: &HashMap<String, String>) -> Option<JobRecord> {
        let num = |k: &str| h.get(k).and_then(|v| v.parse::<u64>().ok());
        Some(JobRecord {
            id: id.to_owned(),
            status: Status::parse(h.get(field::STATUS)?)?,
            model: model.to_owned(),
            version: num(field::VERSION),
            enqueued_ms: num(field::ENQUEUED_MS),
            started_ms: num(field::STARTED_MS),
            finished_ms: num(field::FINISHED_MS),
            attempts: num(field::ATTEMPTS).unwrap_or(0) as u32,
            outputs: h
                .get(field::OUTPUTS)
                .and_then(|o| RawValue::from_string(o.clone()).ok()),
            error: h.get(field::ERROR).cloned(),
            error_kind: h.get(field::ERROR_KIND).cloned(),
            dead_lettered: h.get(field::DEAD_LETTERED).is_some_and(|v| v == "1"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&'static str, &'static str)]) -> Vec<(&'static [u8], &'static [u8])> {
        pairs
            .iter()
            .map(|(k, v)| (k.as_bytes(), v.as_bytes()))
            .collect()
    }

    #[test]
    fn ids_are_checked() {
        assert!(valid_id("job-1.a:b_c"));
        assert!(!valid_id(""));
        assert!(!valid_id("a/b"));
        assert!(!valid_id(&"x".repeat(129)));
        assert_eq!(new_id().len(), 32);
        assert_ne!(new_id(), new_id());
    }

    #[test]
    fn entries_round_trip_and_errors_keep_the_id() {
        let e = JobEntry::from_fields(fields(&[
            ("v", "1"),
            ("id", "j1"),
            ("body", "{}"),
            ("version", "2"),
            ("deadline_ms", "5"),
        ]))
        .unwrap();
        assert_eq!(
            (e.id.as_str(), e.version, e.deadline_ms),
            ("j1", Some(2), Some(5))
        );
        let back: Vec<_> = e.to_fields();
        let again =
            JobEntry::from_fields(back.iter().map(|(k, v)| (k.as_bytes(), v.as_slice()))).unwrap();
        assert_eq!(again, e);
        let err = JobEntry::from_fields(fields(&[("v", "1"), ("id", "j2")])).unwrap_err();
        assert_eq!(err.id.as_deref(), Some("j2"));
        assert!(err.error.0.contains("neither `body` nor `bin`"));
        let err = JobEntry::from_fields(fields(&[
            ("v", "1"),
            ("id", "j3"),
            ("body", "{}"),
            ("version", "0"),
        ]))
        .unwrap_err();
        assert!(err.error.0.contains("positive integer"));
        assert!(
            JobEntry::from_fields(fields(&[("v", "1"), ("body", "{}")]))
                .unwrap_err()
                .id
                .is_none()
        );
    }
}
