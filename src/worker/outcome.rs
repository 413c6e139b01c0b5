//! Terminal results as the queue writes them: one record JSON per job, which the
//! result key holds and `reply_to` receives unchanged.

use crate::protocol::job::{JobRecord, Status};
use crate::protocol::{InferResponse, OutputTensor, Tensor};
use crate::queue::consume::Terminal;
use crate::queue::dlq::dead_field;

/// What the worker knows about a job when it ends.
#[derive(Debug, Clone, Default)]
pub(crate) struct JobInfo {
    pub(crate) entry_id: String,
    pub(crate) job_id: Option<String>,
    pub(crate) model: String,
    pub(crate) version: Option<u64>,
    pub(crate) attempts: u32,
    pub(crate) reply_to: Option<String>,
    pub(crate) enqueued_ms: u64,
    pub(crate) started_ms: Option<u64>,
    /// A record hash may exist (gateway submit, running mark, an earlier attempt).
    pub(crate) has_hash: bool,
}

/// How a job ended.
#[derive(Debug)]
pub(crate) enum End {
    /// Outputs (already filtered to those requested).
    Succeeded(Vec<Tensor>),
    /// A terminal failure: machine word and message.
    Failed(&'static str, String),
    /// The deadline passed before compute.
    Expired(String),
    /// Used up its attempts: the reason, and the original entry to keep.
    DeadLetter(String, Vec<(Vec<u8>, Vec<u8>)>),
}

/// Builds the terminal write for one job.
pub(crate) fn terminal(job: &JobInfo, end: End) -> Terminal {
    let finished_ms = crate::now_ms();
    let mut record = JobRecord {
        id: job.job_id.clone().unwrap_or_default(),
        status: Status::Failed,
        model: job.model.clone(),
        version: job.version,
        enqueued_ms: Some(job.enqueued_ms),
        started_ms: job.started_ms,
        finished_ms: Some(finished_ms),
        attempts: job.attempts,
        outputs: None,
        error: None,
        error_kind: None,
        dead_lettered: false,
    };
    let mut dead_letter = Vec::new();
    match end {
        End::Succeeded(outputs) => {
            let response = InferResponse {
                model_name: job.model.clone(),
                model_version: job.version.map(|v| v.to_string()).unwrap_or_default(),
                id: record.id.clone(),
                outputs: outputs.into_iter().map(OutputTensor::from).collect(),
            };
            record.status = Status::Succeeded;
            record.outputs = Some(
                serde_json::value::to_raw_value(&response)
                    .expect("outputs always serialize, this is a bug"),
            );
        }
        End::Failed(kind, message) => error(&mut record, kind, message),
        End::Expired(message) => {
            record.status = Status::Expired;
            error(&mut record, "expired", message);
        }
        End::DeadLetter(message, entry) => {
            dead_letter = entry
                .into_iter()
                .map(|(k, v)| (String::from_utf8_lossy(&k).into_owned(), v))
                .collect();
            dead_letter.push((dead_field::ERROR.into(), message.clone().into_bytes()));
            dead_letter.push((
                dead_field::ATTEMPTS.into(),
                job.attempts.to_string().into_bytes(),
            ));
            dead_letter.push((dead_field::ENTRY.into(), job.entry_id.clone().into_bytes()));
            record.dead_lettered = true;
            error(&mut record, "dead_lettered", message);
        }
    }
    Terminal {
        entry_id: job.entry_id.clone(),
        job_id: job.job_id.clone(),
        status: record.status,
        version: job.version,
        record: serde_json::to_string(&record).expect("a record always serializes, this is a bug"),
        has_hash: job.has_hash,
        reply_to: job.reply_to.clone(),
        dead_letter,
    }
}

/// The record of a job whose own terminal write failed for good (`error_kind`
/// `unwritable`): its first record's facts, no outputs, the error that stopped it.
pub(crate) fn unwritable(t: &Terminal, why: &str) -> String {
    let mut record: JobRecord = serde_json::from_str(&t.record).unwrap_or_else(|_| JobRecord {
        id: t.job_id.clone().unwrap_or_default(),
        status: Status::Failed,
        model: String::new(),
        version: t.version,
        enqueued_ms: None,
        started_ms: None,
        finished_ms: Some(crate::now_ms()),
        attempts: 0,
        outputs: None,
        error: None,
        error_kind: None,
        dead_lettered: false,
    });
    record.status = Status::Failed;
    record.outputs = None;
    record.dead_lettered = false;
    error(
        &mut record,
        "unwritable",
        format!("the job's result could not be written to Redis: {why}"),
    );
    serde_json::to_string(&record).expect("a record always serializes, this is a bug")
}

fn error(record: &mut JobRecord, kind: &str, message: String) {
    record.error = Some(message);
    record.error_kind = Some(kind.to_owned());
}
