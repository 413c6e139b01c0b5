//! Terminal results as the queue writes them: the record hash fields and the same
//! record as JSON for `reply_to`, built once per job.

use serde_json::value::RawValue;

use crate::protocol::job::{JobRecord, Status, field};
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

impl End {
    pub(crate) fn status(&self) -> Status {
        match self {
            End::Succeeded(_) => Status::Succeeded,
            End::Failed(..) | End::DeadLetter(..) => Status::Failed,
            End::Expired(_) => Status::Expired,
        }
    }
}

/// Builds the terminal write for one job.
pub(crate) fn terminal(job: &JobInfo, end: End) -> Terminal {
    let finished_ms = crate::now_ms();
    let status = end.status();
    let mut record = JobRecord {
        id: job.job_id.clone().unwrap_or_default(),
        status,
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
    let mut fields: Vec<(&'static str, String)> = vec![
        (field::STATUS, status.as_str().to_owned()),
        (field::MODEL, job.model.clone()),
        (field::ENQUEUED_MS, job.enqueued_ms.to_string()),
        (field::FINISHED_MS, finished_ms.to_string()),
        (field::ATTEMPTS, job.attempts.to_string()),
    ];
    if let Some(v) = job.version {
        fields.push((field::VERSION, v.to_string()));
    }
    if let Some(s) = job.started_ms {
        fields.push((field::STARTED_MS, s.to_string()));
    }
    let mut dead_letter = Vec::new();
    match end {
        End::Succeeded(outputs) => {
            let response = InferResponse {
                model_name: job.model.clone(),
                model_version: job.version.map(|v| v.to_string()).unwrap_or_default(),
                id: record.id.clone(),
                outputs: outputs.into_iter().map(OutputTensor::from).collect(),
            };
            let json =
                serde_json::to_string(&response).expect("outputs always serialize, this is a bug");
            record.outputs = RawValue::from_string(json.clone()).ok();
            fields.push((field::OUTPUTS, json));
        }
        End::Failed(kind, message) => fail(&mut record, &mut fields, kind, message),
        End::Expired(message) => fail(&mut record, &mut fields, "expired", message),
        End::DeadLetter(message, entry) => {
            record.dead_lettered = true;
            fields.push((field::DEAD_LETTERED, "1".into()));
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
            fail(&mut record, &mut fields, "dead_lettered", message);
        }
    }
    Terminal {
        entry_id: job.entry_id.clone(),
        job_id: job.job_id.clone(),
        reply_to: job.reply_to.clone(),
        record_json: serde_json::to_string(&record)
            .expect("a record always serializes, this is a bug"),
        fields,
        dead_letter,
    }
}

fn fail(
    record: &mut JobRecord,
    fields: &mut Vec<(&'static str, String)>,
    kind: &str,
    message: String,
) {
    fields.push((field::ERROR, message.clone()));
    fields.push((field::ERROR_KIND, kind.to_owned()));
    record.error = Some(message);
    record.error_kind = Some(kind.to_owned());
}
