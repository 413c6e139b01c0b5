//! Load straight through Redis, as a direct producer (docs/PROTOCOL.md): pipelined
//! `XADD`s of job entries naming one reply list, and a collector on its own
//! connection that takes that list in bulk (`BLMPOP … COUNT 512`, Redis 7.0+).
//! Also the two halves of a drain-mode capacity measurement: `fill` (enqueue only)
//! and `drain_wait` (time the consumer group until nothing is left).

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::Semaphore;

use super::load::{Clock, Pace, Plan, wait_answers};
use super::reference::{JobData, check, pick};
use super::schedule::{Schedule, ticker};
use super::stats::{Ending, Ledger, Tally};
use crate::protocol::job::{PROTOCOL_VERSION, field};
use crate::queue::text;
use crate::queue::{Conn, GROUP, Keys, RedisTarget};

/// Entries per pipelined round trip.
const CHUNK: usize = 256;
/// Replies taken per `BLMPOP`.
const DRAIN: usize = 512;

/// How job inputs travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// The binary tensor encoding (`bin`).
    Bin,
    /// An OIP v2 JSON request (`body`).
    Json,
}

/// The shared parts of a Redis run.
#[derive(Debug, Clone)]
pub(super) struct Target {
    /// Where Redis is.
    pub redis: RedisTarget,
    /// The model's keys.
    pub keys: Keys,
    /// Inputs and expected outputs per start row.
    pub jobs: Arc<Vec<JobData>>,
    /// Rows per job (to pick the start row of job `k`).
    pub rows_per_job: usize,
    /// `bin` or `body`.
    pub encoding: Encoding,
}

impl Target {
    fn job(&self, seq: u64) -> (usize, &JobData) {
        pick(&self.jobs, seq, self.rows_per_job)
    }

    fn add_entry(&self, pipe: &mut redis::Pipeline, id: &str, data: &JobData, reply: Option<&str>) {
        let cmd = pipe.cmd("XADD").arg(self.keys.jobs()).arg("*");
        cmd.arg(field::V)
            .arg(PROTOCOL_VERSION)
            .arg(field::ID)
            .arg(id);
        match self.encoding {
            Encoding::Bin => cmd.arg(field::BIN).arg(data.bin.as_slice()),
            Encoding::Json => cmd.arg(field::BODY).arg(data.json.as_slice()),
        };
        if let Some(r) = reply {
            cmd.arg(field::REPLY_TO).arg(r);
        }
        cmd.ignore();
    }
}

/// A reply as far as the bench reads it: inferq's job record, or the minimal
/// `{"id", "status", "outputs"}` another worker may push.
#[derive(Deserialize)]
struct Reply<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow)]
    status: Cow<'a, str>,
    #[serde(default)]
    error_kind: Option<String>,
    #[serde(default, borrow)]
    outputs: Option<&'a RawValue>,
}

/// Runs one load run: sends on the plan's pace, collects and checks every answer.
pub(super) async fn run(target: &Target, plan: &Plan) -> anyhow::Result<Tally> {
    let tag = format!("{:08x}", rand::random::<u32>());
    let reply = format!("{}bench-{tag}", target.keys.reply_prefix());
    let prefix = format!("b{tag}-");
    let mut sender = target
        .redis
        .connect(Duration::from_secs(10))
        .await
        .context("cannot reach Redis")?;
    let collector_conn = target
        .redis
        .connect(Duration::from_secs(5))
        .await
        .context("cannot reach Redis")?;
    let ledger = Arc::new(Ledger::default());
    let permits = Arc::new(Semaphore::new(match plan.pace {
        Pace::Closed { concurrency } => concurrency.max(1),
        Pace::Open { .. } => 0,
    }));
    let closed = matches!(plan.pace, Pace::Closed { .. });
    let stop = Arc::new(AtomicBool::new(false));
    let collector = tokio::spawn(collect(
        collector_conn,
        reply.clone(),
        prefix.clone(),
        Arc::clone(&ledger),
        target.jobs.clone(),
        closed.then(|| Arc::clone(&permits)),
        Arc::clone(&stop),
    ));
    let clock = Clock::new(plan);
    let mut arrivals = match plan.pace {
        Pace::Open { rate, arrivals } => Some(ticker(
            clock.start,
            Schedule::new(rate, arrivals, rand::random()),
            clock.send_until(),
        )),
        Pace::Closed { .. } => None,
    };
    let mut send_error = None;
    'send: loop {
        let mut due_times = Vec::with_capacity(CHUNK);
        match &mut arrivals {
            None => {
                let Ok(p) = permits.acquire().await else {
                    break;
                };
                p.forget();
                let mut n = 1;
                while n < CHUNK {
                    match permits.try_acquire() {
                        Ok(p) => p.forget(),
                        Err(_) => break,
                    }
                    n += 1;
                }
                due_times.resize(n, Instant::now());
            }
            Some(rx) => {
                let Some(due) = rx.recv().await else { break };
                due_times.push(due);
                while due_times.len() < CHUNK {
                    match rx.try_recv() {
                        Ok(due) => due_times.push(due),
                        Err(_) => break,
                    }
                }
            }
        }
        let mut pipe = redis::pipe();
        let mut seqs = Vec::with_capacity(due_times.len());
        for due in due_times {
            let Some((seq, measured)) = clock.admit(due) else {
                if seqs.is_empty() {
                    break 'send;
                }
                break;
            };
            let (at, data) = target.job(seq);
            ledger.sent(seq, due, at, measured);
            target.add_entry(&mut pipe, &format!("{prefix}{seq}"), data, Some(&reply));
            seqs.push(seq);
        }
        if let Err(e) = pipe.query_async::<()>(&mut sender).await {
            let now = Instant::now();
            for seq in seqs {
                ledger.answered(seq, now, Ending::Error("send".into()));
                if closed {
                    permits.add_permits(1);
                }
            }
            send_error.get_or_insert(e);
        }
    }
    wait_answers(&ledger, plan.drain_timeout).await;
    stop.store(true, Ordering::Relaxed);
    let _ = collector.await;
    let mut cleanup = sender.clone();
    let _: Result<(), _> = redis::cmd("DEL")
        .arg(&reply)
        .query_async(&mut cleanup)
        .await;
    if let Some(e) = send_error {
        tracing::warn!(error = %e, "some XADDs failed");
    }
    Ok(ledger.finish(clock.measure_from))
}

/// A `BLMPOP` reply: the list's name and the elements taken.
type Popped = (String, Vec<Vec<u8>>);

/// Takes replies off the list until told to stop, answering jobs in the ledger.
async fn collect(
    mut conn: Conn,
    reply: String,
    prefix: String,
    ledger: Arc<Ledger>,
    jobs: Arc<Vec<JobData>>,
    permits: Option<Arc<Semaphore>>,
    stop: Arc<AtomicBool>,
) {
    let handle = |raw: &[u8], now: Instant| {
        let Ok(r) = serde_json::from_slice::<Reply<'_>>(raw) else {
            tracing::warn!(
                "a reply that is not a job record: {}",
                String::from_utf8_lossy(raw)
            );
            return;
        };
        let Some(seq) =
            r.id.strip_prefix(prefix.as_str())
                .and_then(|s| s.parse::<u64>().ok())
        else {
            return;
        };
        let ending = if r.status == "succeeded" {
            let expected = ledger.rows_at(seq).map(|at| &jobs[at].expected);
            match (r.outputs, expected) {
                (Some(out), Some(exp)) => match check(out.get().as_bytes(), exp) {
                    Ok(()) => Ending::Ok,
                    Err(why) => {
                        tracing::debug!(job = %r.id, %why, "wrong output");
                        Ending::Error("wrong_output".into())
                    }
                },
                (None, Some(_)) => Ending::Error("wrong_output".into()),
                (_, None) => Ending::Ok,
            }
        } else {
            Ending::Error(match &r.error_kind {
                Some(k) => format!("{}:{k}", r.status),
                None => r.status.to_string(),
            })
        };
        ledger.answered(seq, now, ending);
        if let Some(p) = &permits {
            p.add_permits(1);
        }
    };
    while !stop.load(Ordering::Relaxed) {
        // One round trip takes whatever waits, up to DRAIN replies (Redis 7.0+).
        let popped: redis::RedisResult<Option<Popped>> = redis::cmd("BLMPOP")
            .arg(0.1)
            .arg(1)
            .arg(&reply)
            .arg("LEFT")
            .arg("COUNT")
            .arg(DRAIN)
            .query_async(&mut conn)
            .await;
        match popped {
            Ok(Some((_, list))) => {
                let now = Instant::now();
                list.iter().for_each(|raw| handle(raw, now));
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "BLMPOP failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// What `--fill` did.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Filled {
    /// Entries added.
    pub jobs: u64,
    /// Wall time, seconds.
    pub seconds: f64,
    /// Entries per second.
    pub jobs_per_s: f64,
}

/// Enqueues `n` jobs without `reply_to` as fast as pipelining allows.
pub(super) async fn fill(target: &Target, n: u64) -> anyhow::Result<Filled> {
    let mut conn = target
        .redis
        .connect(Duration::from_secs(30))
        .await
        .context("cannot reach Redis")?;
    let tag = format!("{:08x}", rand::random::<u32>());
    let t0 = Instant::now();
    let mut seq = 0u64;
    while seq < n {
        let mut pipe = redis::pipe();
        let end = (seq + 500).min(n);
        for s in seq..end {
            let (_, data) = target.job(s);
            target.add_entry(&mut pipe, &format!("f{tag}-{s}"), data, None);
        }
        pipe.query_async::<()>(&mut conn)
            .await
            .context("XADD failed")?;
        seq = end;
    }
    let seconds = t0.elapsed().as_secs_f64();
    Ok(Filled {
        jobs: n,
        seconds,
        jobs_per_s: n as f64 / seconds.max(1e-9),
    })
}

/// What `--drain-wait` saw.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Drained {
    /// Jobs drained: entries the group read since the start, plus those pending then.
    pub jobs: u64,
    /// From the first delivery seen to nothing lagging or pending, seconds.
    pub seconds: f64,
    /// Jobs per second.
    pub jobs_per_s: f64,
    /// CPU time of the given processes over the same span, seconds (user + system).
    pub cpu_s: Option<f64>,
    /// CPU per job, microseconds.
    pub cpu_us_per_job: Option<f64>,
    /// False when the timeout passed first.
    pub complete: bool,
}

/// The consumer group's progress.
#[derive(Debug, Default)]
struct GroupState {
    exists: bool,
    entries_read: u64,
    lag: Option<u64>,
    pending: u64,
    last_delivered: String,
}

async fn group_state(conn: &mut Conn, keys: &Keys) -> anyhow::Result<GroupState> {
    let reply: redis::Value = match redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(keys.jobs())
        .query_async(conn)
        .await
    {
        Ok(v) => v,
        Err(e) if e.to_string().contains("no such key") => return Ok(GroupState::default()),
        Err(e) => return Err(e).context("XINFO GROUPS"),
    };
    let redis::Value::Array(groups) = reply else {
        return Ok(GroupState::default());
    };
    for g in groups {
        let pairs: Vec<(String, redis::Value)> = match g {
            redis::Value::Array(flat) => flat
                .chunks_exact(2)
                .filter_map(|kv| Some((text(&kv[0])?, kv[1].clone())))
                .collect(),
            redis::Value::Map(m) => m
                .into_iter()
                .filter_map(|(k, v)| Some((text(&k)?, v)))
                .collect(),
            _ => continue,
        };
        let get = |k: &str| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v);
        if get("name").and_then(text).as_deref() != Some(GROUP) {
            continue;
        }
        let num = |k: &str| get(k).and_then(text).and_then(|s| s.parse::<u64>().ok());
        return Ok(GroupState {
            exists: true,
            entries_read: num("entries-read").unwrap_or(0),
            lag: num("lag"),
            pending: num("pending").unwrap_or(0),
            last_delivered: get("last-delivered-id").and_then(text).unwrap_or_default(),
        });
    }
    Ok(GroupState::default())
}

/// True when the group has read up to the stream's last entry.
async fn caught_up(conn: &mut Conn, keys: &Keys, g: &GroupState) -> anyhow::Result<bool> {
    if let Some(lag) = g.lag {
        return Ok(lag == 0);
    }
    // Lag is unknown after deletions: compare ids instead.
    let info: redis::Value = redis::cmd("XINFO")
        .arg("STREAM")
        .arg(keys.jobs())
        .query_async(conn)
        .await
        .context("XINFO STREAM")?;
    let last = match info {
        redis::Value::Array(flat) => flat
            .chunks_exact(2)
            .find(|kv| text(&kv[0]).as_deref() == Some("last-generated-id"))
            .and_then(|kv| text(&kv[1])),
        redis::Value::Map(m) => m
            .iter()
            .find(|(k, _)| text(k).as_deref() == Some("last-generated-id"))
            .and_then(|(_, v)| text(v)),
        _ => None,
    };
    Ok(last.is_some_and(|l| l == g.last_delivered))
}

/// Waits for the first delivery on the model's group, then until nothing is lagging
/// or pending; the CPU time of `pids` is read at both ends.
pub(super) async fn drain_wait(
    target: &Target,
    pids: &[u32],
    timeout: Duration,
) -> anyhow::Result<Drained> {
    let mut conn = target
        .redis
        .connect(Duration::from_secs(5))
        .await
        .context("cannot reach Redis")?;
    let until = Instant::now() + timeout;
    let poll = Duration::from_millis(2);
    // What the group had read before this drain (earlier runs on the same stream).
    let base = group_state(&mut conn, &target.keys).await?;
    // The cue for whoever starts the workers (bench/compare.py, tests): from here on
    // the first delivery is seen.
    eprintln!(
        "drain-wait: watching {} ({} entries read before); start the workers",
        target.keys.jobs(),
        base.entries_read
    );
    let (t0, cpu0) = loop {
        let g = group_state(&mut conn, &target.keys).await?;
        if g.exists && (g.entries_read > base.entries_read || g.pending > base.pending) {
            break (Instant::now(), cpu_seconds(pids));
        }
        if Instant::now() >= until {
            anyhow::bail!(
                "no worker took a job from {} within {timeout:?}",
                target.keys.jobs()
            );
        }
        tokio::time::sleep(poll).await;
    };
    let (complete, g) = loop {
        let g = group_state(&mut conn, &target.keys).await?;
        if g.pending == 0 && caught_up(&mut conn, &target.keys, &g).await? {
            break (true, g);
        }
        if Instant::now() >= until {
            break (false, g);
        }
        tokio::time::sleep(poll).await;
    };
    let seconds = t0.elapsed().as_secs_f64();
    let cpu = match (cpu0, cpu_seconds(pids)) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    // Entries already delivered (to stopped workers) at the start are drained too.
    let jobs = g.entries_read.saturating_sub(base.entries_read) + base.pending;
    Ok(Drained {
        jobs,
        seconds,
        jobs_per_s: jobs as f64 / seconds.max(1e-9),
        cpu_s: cpu,
        cpu_us_per_job: cpu.filter(|_| jobs > 0).map(|c| c * 1e6 / jobs as f64),
        complete,
    })
}

/// User + system CPU seconds of processes (from `/proc/<pid>/stat`), summed; `None`
/// without pids or when one cannot be read.
fn cpu_seconds(pids: &[u32]) -> Option<f64> {
    if pids.is_empty() {
        return None;
    }
    let tick = clock_ticks();
    pids.iter()
        .map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // The command name may hold spaces: fields are counted after its `)`.
            let rest = &stat[stat.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split(' ').collect();
            let utime: f64 = f.get(11)?.parse().ok()?;
            let stime: f64 = f.get(12)?.parse().ok()?;
            Some((utime + stime) / tick)
        })
        .sum()
}

/// Kernel clock ticks per second (`getconf CLK_TCK`, 100 almost everywhere).
fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_of_this_process_is_readable() {
        let me = std::process::id();
        let cpu = cpu_seconds(&[me]).expect("own /proc stat");
        assert!(cpu >= 0.0);
        assert_eq!(cpu_seconds(&[]), None);
    }
}
