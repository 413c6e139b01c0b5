//! Load through the HTTP front door: synchronous infer (`POST /v2/models/{m}/infer`)
//! or submit and long-poll (`POST /v1/models/{m}/jobs`, then
//! `GET /v1/models/{m}/jobs/{id}?wait=`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::http::HttpClient;
use super::load::{Clock, Pace, Plan, wait_answers};
use super::reference::{JobData, check, pick};
use super::schedule::{Schedule, ticker};
use super::stats::{Ending, Ledger, Tally};

/// Open-loop requests in flight at most; beyond it a job fails at once (`overload`)
/// rather than piling up tasks without bound.
const MAX_IN_FLIGHT: usize = 20_000;

/// Which HTTP route a job takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HttpMode {
    /// `POST /v2/models/{m}/infer`, answered when the job is done.
    Sync,
    /// `POST /v1/models/{m}/jobs`, then long-poll the job.
    Poll,
}

/// The shared parts of an HTTP run.
#[derive(Debug, Clone)]
pub(super) struct Target {
    /// Gateway base URL, no trailing slash.
    pub base: String,
    /// The model.
    pub model: String,
    /// Route.
    pub mode: HttpMode,
    /// Inputs and expected outputs per start row.
    pub jobs: Arc<Vec<JobData>>,
    /// Rows per job.
    pub rows_per_job: usize,
}

#[derive(Deserialize)]
struct Submitted {
    id: String,
}

#[derive(Deserialize)]
struct Record<'a> {
    status: String,
    #[serde(default)]
    error_kind: Option<String>,
    #[serde(default, borrow)]
    outputs: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    kind: Option<String>,
}

fn http_error(status: u16, body: &[u8]) -> Ending {
    let kind = serde_json::from_slice::<ErrorBody>(body)
        .ok()
        .and_then(|e| e.kind);
    Ending::Error(match kind {
        Some(k) => format!("http_{status}:{k}"),
        None => format!("http_{status}"),
    })
}

fn checked(outputs: &[u8], data: &JobData) -> Ending {
    match check(outputs, &data.expected) {
        Ok(()) => Ending::Ok,
        Err(why) => {
            tracing::debug!(%why, "wrong output");
            Ending::Error("wrong_output".into())
        }
    }
}

/// One job, start to end.
async fn one(client: &HttpClient, t: &Target, data: &JobData) -> Ending {
    let body = Bytes::from(data.json.clone());
    match t.mode {
        HttpMode::Sync => {
            let url = format!("{}/v2/models/{}/infer", t.base, t.model);
            match client.post_json(&url, body).await {
                Ok((200, resp)) => checked(&resp, data),
                Ok((202, _)) => Ending::Error("timeout_202".into()),
                Ok((status, resp)) => http_error(status, &resp),
                Err(e) => {
                    tracing::debug!(error = %e, "request failed");
                    Ending::Error("connect".into())
                }
            }
        }
        HttpMode::Poll => {
            let url = format!("{}/v1/models/{}/jobs", t.base, t.model);
            let id = match client.post_json(&url, body).await {
                Ok((200 | 202, resp)) => match serde_json::from_slice::<Submitted>(&resp) {
                    Ok(s) => s.id,
                    Err(_) => return Ending::Error("bad_response".into()),
                },
                Ok((status, resp)) => return http_error(status, &resp),
                Err(_) => return Ending::Error("connect".into()),
            };
            let poll = format!("{}/v1/models/{}/jobs/{id}?wait=30", t.base, t.model);
            loop {
                let resp = match client.get(&poll).await {
                    Ok((200, resp)) => resp,
                    Ok((status, resp)) => return http_error(status, &resp),
                    Err(_) => return Ending::Error("connect".into()),
                };
                let Ok(r) = serde_json::from_slice::<Record<'_>>(&resp) else {
                    return Ending::Error("bad_response".into());
                };
                match r.status.as_str() {
                    "queued" | "running" => {}
                    "succeeded" => {
                        return match r.outputs {
                            Some(o) => checked(o.get().as_bytes(), data),
                            None => Ending::Error("wrong_output".into()),
                        };
                    }
                    other => {
                        return Ending::Error(match r.error_kind {
                            Some(k) => format!("{other}:{k}"),
                            None => other.to_owned(),
                        });
                    }
                }
            }
        }
    }
}

impl Target {
    fn job(&self, seq: u64) -> (usize, &JobData) {
        pick(&self.jobs, seq, self.rows_per_job)
    }
}

/// Runs one load run through HTTP.
pub(super) async fn run(target: &Target, plan: &Plan) -> anyhow::Result<Tally> {
    let client = HttpClient::new(plan.drain_timeout + Duration::from_secs(35));
    let ledger = Arc::new(Ledger::default());
    let clock = Arc::new(Clock::new(plan));
    let target = Arc::new(target.clone());
    let mut tasks = JoinSet::new();
    match plan.pace {
        Pace::Closed { concurrency } => {
            for _ in 0..concurrency.max(1) {
                let (client, ledger, clock, target) = (
                    client.clone(),
                    Arc::clone(&ledger),
                    Arc::clone(&clock),
                    Arc::clone(&target),
                );
                tasks.spawn(async move {
                    loop {
                        let due = Instant::now();
                        let Some((seq, measured)) = clock.admit(due) else {
                            break;
                        };
                        let (at, data) = target.job(seq);
                        ledger.sent(seq, due, at, measured);
                        let ending = one(&client, &target, data).await;
                        ledger.answered(seq, Instant::now(), ending);
                    }
                });
            }
        }
        Pace::Open { rate, arrivals } => {
            let schedule = Schedule::new(rate, arrivals, rand::random());
            let mut due_times = ticker(clock.start, schedule, clock.send_until());
            let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
            while let Some(due) = due_times.recv().await {
                let Some((seq, measured)) = clock.admit(due) else {
                    break;
                };
                let (at, _) = target.job(seq);
                ledger.sent(seq, due, at, measured);
                let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                    ledger.answered(seq, Instant::now(), Ending::Error("overload".into()));
                    continue;
                };
                let (client, ledger, target) =
                    (client.clone(), Arc::clone(&ledger), Arc::clone(&target));
                tasks.spawn(async move {
                    let (_, data) = target.job(seq);
                    let ending = one(&client, &target, data).await;
                    ledger.answered(seq, Instant::now(), ending);
                    drop(slot);
                });
                // Reap finished tasks so the set does not grow for the whole run.
                while tasks.try_join_next().is_some() {}
            }
        }
    }
    let wait = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(plan.drain_timeout + Duration::from_secs(40), wait)
        .await
        .is_err()
    {
        tasks.abort_all();
    }
    wait_answers(&ledger, Duration::ZERO).await;
    Ok(ledger.finish(clock.measure_from))
}
