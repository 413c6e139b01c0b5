//! Terminal results as the queue writes them. The record JSON for `reply_to` is built
//! only for jobs that have a reply list: most jobs are polled, and their hash fields
//! are assembled by the result script from a few values.

use serde_json::value::RawValue;

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
    let (status, body, error_kind, dead_letter) = match end {
        End::Succeeded(outputs) => {
            let response = InferResponse {
                model_name: job.model.clone(),
                model_version: job.version.map(|v| v.to_string()).unwrap_or_default(),
                id: job.job_id.clone().unwrap_or_default(),
                outputs: outputs.into_iter().map(OutputTensor::from).collect(),
            };
            let json =
                serde_json::to_string(&response).expect("outputs always serialize, this is a bug");
            (Status::Succeeded, json, None, Vec::new())
        }
        End::Failed(kind, message) => (Status::Failed, message, Some(kind), Vec::new()),
        End::Expired(message) => (Status::Expired, message, Some("expired"), Vec::new()),
        End::DeadLetter(message, entry) => {
            let mut dead: Vec<(String, Vec<u8>)> = entry
                .into_iter()
                .map(|(k, v)| (String::from_utf8_lossy(&k).into_owned(), v))
                .collect();
            dead.push((dead_field::ERROR.into(), message.clone().into_bytes()));
            dead.push((
                dead_field::ATTEMPTS.into(),
                job.attempts.to_string().into_bytes(),
            ));
            dead.push((dead_field::ENTRY.into(), job.entry_id.clone().into_bytes()));
            (Status::Failed, message, Some("dead_lettered"), dead)
        }
    };
    let reply_json = job.reply_to.as_ref().and(job.job_id.as_ref()).map(|id| {
        let succeeded = status == Status::Succeeded;
        let record = JobRecord {
            id: id.clone(),
            status,
            model: job.model.clone(),
            version: job.version,
            enqueued_ms: Some(job.enqueued_ms),
            started_ms: job.started_ms,
            finished_ms: Some(finished_ms),
            attempts: job.attempts,
            outputs: if succeeded {
                RawValue::from_string(body.clone()).ok()
            } else {
                None
            },
            error: (!succeeded).then(|| body.clone()),
            error_kind: error_kind.map(str::to_owned),
            dead_lettered: !dead_letter.is_empty(),
        };
        serde_json::to_string(&record).expect("a record always serializes, this is a bug")
    });
    Terminal {
        entry_id: job.entry_id.clone(),
        job_id: job.job_id.clone(),
        status,
        body,
        error_kind,
        version: job.version,
        attempts: job.attempts,
        started_ms: job.started_ms,
        finished_ms,
        reply_to: job.reply_to.clone(),
        reply_json,
        dead_letter,
    }
}
