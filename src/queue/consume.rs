//! The worker's side of the stream: the group, reads (own pending first, then new),
//! running marks, and terminal writes.

use redis::Value;

use super::script::scripts;
use super::{Conn, GROUP, Keys, QueueError, int, text};
use crate::protocol::job::{Status, field};

/// One delivered stream entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// The stream entry id (`ms-seq`).
    pub entry_id: String,
    /// Its fields; `None` when the entry was trimmed away while pending.
    pub fields: Option<Vec<(Vec<u8>, Vec<u8>)>>,
    /// How many times it has been delivered, this time included.
    pub deliveries: u32,
}

impl Delivery {
    /// Unix ms at which the entry was added (its id's first part).
    pub fn enqueued_ms(&self) -> u64 {
        self.entry_id
            .split('-')
            .next()
            .and_then(|ms| ms.parse().ok())
            .unwrap_or(0)
    }
}

/// Creates the consumer group at the start of the stream (and the stream), so jobs
/// added before any worker existed are served. An existing group is fine.
pub async fn ensure_group(conn: &mut Conn, keys: &Keys) -> Result<(), QueueError> {
    let r: Result<Value, _> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(keys.jobs())
        .arg(GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(conn)
        .await;
    match r {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        Err(e) => Err(QueueError::redis("create the consumer group")(e)),
    }
}

/// Reads up to `count` new entries (`>`); with `block_ms`, waits that long for one when
/// none waits. The connection should be the caller's own: a blocking read holds it.
/// (The worker reads through [`super::reader`] where it can; this is the crate's way,
/// for a cluster or TLS.) Callers [`index`] what they read.
pub async fn read_new(
    conn: &mut Conn,
    keys: &Keys,
    consumer: &str,
    count: usize,
    block_ms: Option<u64>,
) -> Result<Vec<Delivery>, QueueError> {
    let mut cmd = redis::cmd("XREADGROUP");
    cmd.arg("GROUP")
        .arg(GROUP)
        .arg(consumer)
        .arg("COUNT")
        .arg(count.max(1));
    if let Some(ms) = block_ms {
        cmd.arg("BLOCK").arg(ms.max(1));
    }
    let reply: Value = cmd
        .arg("STREAMS")
        .arg(keys.jobs())
        .arg(">")
        .query_async(conn)
        .await
        .map_err(QueueError::redis("read new jobs"))?;
    parse_read(reply)
}

/// Indexes fresh deliveries in `inferq:{m}:inflight` (entry id → `<job id>[ <reply_to>]`),
/// so a pending entry trimmed from the stream can still be answered by name.
pub async fn index(
    conn: &mut Conn,
    keys: &Keys,
    deliveries: &[Delivery],
) -> Result<(), QueueError> {
    let mut cmd = redis::cmd("HSET");
    cmd.arg(keys.inflight());
    let mut any = false;
    for d in deliveries {
        let Some(fields) = &d.fields else { continue };
        let get = |name: &str| {
            fields
                .iter()
                .find(|(k, _)| k == name.as_bytes())
                .map(|(_, v)| v.as_slice())
        };
        let Some(id) = get(field::ID).filter(|id| !id.contains(&b' ')) else {
            continue;
        };
        let mut value = id.to_vec();
        if let Some(reply) = get(field::REPLY_TO) {
            value.push(b' ');
            value.extend_from_slice(reply);
        }
        cmd.arg(&d.entry_id).arg(value);
        any = true;
    }
    if !any {
        return Ok(());
    }
    cmd.query_async::<Value>(conn)
        .await
        .map(drop)
        .map_err(QueueError::redis("index delivered jobs"))
}

/// Reads this consumer's own pending entries after `after` (`0` first), with their
/// delivery counts: what a restarted worker must finish before taking new work.
pub async fn read_own_pending(
    conn: &mut Conn,
    keys: &Keys,
    consumer: &str,
    after: &str,
    count: usize,
) -> Result<Vec<Delivery>, QueueError> {
    let reply: Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(GROUP)
        .arg(consumer)
        .arg("COUNT")
        .arg(count.max(1))
        .arg("STREAMS")
        .arg(keys.jobs())
        .arg(after)
        .query_async(conn)
        .await
        .map_err(QueueError::redis("read own pending jobs"))?;
    let mut out = parse_read(reply)?;
    fill_deliveries(conn, keys, Some(consumer), &mut out).await?;
    Ok(out)
}

/// Sets each delivery's count from `XPENDING`, one exact query per entry (pipelined).
/// A range query with `COUNT n` would be filled by this consumer's other pending
/// entries inside the range, and the counts left out would read as a first delivery,
/// which bypasses `max_attempts` (AUDIT D8). Used on reclaims and restarts, not on the
/// hot path.
pub(crate) async fn fill_deliveries(
    conn: &mut Conn,
    keys: &Keys,
    consumer: Option<&str>,
    out: &mut [Delivery],
) -> Result<(), QueueError> {
    if out.is_empty() {
        return Ok(());
    }
    let mut pipe = redis::pipe();
    for d in out.iter() {
        let cmd = pipe
            .cmd("XPENDING")
            .arg(keys.jobs())
            .arg(GROUP)
            .arg(&d.entry_id)
            .arg(&d.entry_id)
            .arg(1);
        if let Some(c) = consumer {
            cmd.arg(c);
        }
    }
    let replies: Vec<Value> = pipe
        .query_async(conn)
        .await
        .map_err(QueueError::redis("read delivery counts"))?;
    for (d, reply) in out.iter_mut().zip(replies) {
        let count = match reply {
            Value::Array(rows) => rows.first().and_then(|r| match r {
                Value::Array(f) if f.len() >= 4 => int(&f[3]),
                _ => None,
            }),
            _ => None,
        };
        d.deliveries = count.map_or(1, |c| c.clamp(1, i64::from(u32::MAX)) as u32);
    }
    Ok(())
}

/// Parses an XREADGROUP reply: `nil`, or `[[stream, [[id, [f, v, …] | nil], …]]]`
/// (RESP3 maps accepted too). Takes the reply by value: the fields move, not copy.
pub(crate) fn parse_read(reply: Value) -> Result<Vec<Delivery>, QueueError> {
    let streams: Vec<Value> = match reply {
        Value::Nil => return Ok(Vec::new()),
        Value::Array(s) => s
            .into_iter()
            .map(|pair| match pair {
                Value::Array(mut kv) if kv.len() == 2 => kv.swap_remove(1),
                other => other,
            })
            .collect(),
        Value::Map(m) => m.into_iter().map(|(_, v)| v).collect(),
        _ => return Err(QueueError::Protocol("read jobs")),
    };
    let mut out = Vec::new();
    for entries in streams {
        let Value::Array(entries) = entries else {
            return Err(QueueError::Protocol("read jobs"));
        };
        for e in entries {
            out.push(parse_entry(e).ok_or(QueueError::Protocol("read jobs"))?);
        }
    }
    Ok(out)
}

/// One `[id, [f, v, …] | nil]` entry.
pub(crate) fn parse_entry(e: Value) -> Option<Delivery> {
    let Value::Array(parts) = e else { return None };
    let mut parts = parts.into_iter();
    let entry_id = text(&parts.next()?)?;
    let pairs = |flat: Vec<Value>| {
        let mut out = Vec::with_capacity(flat.len() / 2);
        let mut it = flat.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            if let (Value::BulkString(k), Value::BulkString(v)) = (k, v) {
                out.push((k, v));
            }
        }
        out
    };
    let fields = match parts.next() {
        None | Some(Value::Nil) => None,
        Some(Value::Array(flat)) => Some(pairs(flat)),
        Some(Value::Map(m)) => Some(
            m.into_iter()
                .filter_map(|(k, v)| match (k, v) {
                    (Value::BulkString(k), Value::BulkString(v)) => Some((k, v)),
                    _ => None,
                })
                .collect(),
        ),
        Some(_) => return None,
    };
    Some(Delivery {
        entry_id,
        fields,
        deliveries: 1,
    })
}

/// A job taken into a batch, for the running mark.
#[derive(Debug, Clone)]
pub struct Started<'a> {
    /// Job id.
    pub job_id: &'a str,
    /// Version that will run it.
    pub version: u64,
    /// Deliveries so far.
    pub attempts: u32,
    /// Reply list, if any (already checked).
    pub reply_to: Option<&'a str>,
}

/// Marks a batch's jobs running (never a terminal one).
/// One round trip; callers usually spawn it and move on.
pub async fn mark_running(
    conn: &mut Conn,
    keys: &Keys,
    started_ms: u64,
    jobs: &[Started<'_>],
) -> Result<(), QueueError> {
    if jobs.is_empty() {
        return Ok(());
    }
    let owned: Vec<String> = jobs
        .iter()
        .flat_map(|j| [keys.job(j.job_id), keys.result(j.job_id)])
        .collect();
    let key_refs: Vec<&str> = owned.iter().map(String::as_str).collect();
    let started = started_ms.to_string();
    let nums: Vec<(String, String)> = jobs
        .iter()
        .map(|j| (j.version.to_string(), j.attempts.to_string()))
        .collect();
    let mut args: Vec<&[u8]> = vec![started.as_bytes(), keys.model().as_bytes()];
    for (j, (v, a)) in jobs.iter().zip(&nums) {
        args.extend([
            v.as_bytes(),
            a.as_bytes(),
            j.reply_to.unwrap_or("").as_bytes(),
        ]);
    }
    scripts()
        .running
        .run(conn, &key_refs, &args, "mark jobs running")
        .await
        .map(drop)
}

/// A terminal result ready to write.
#[derive(Debug, Clone)]
pub struct Terminal {
    /// Stream entry id to acknowledge.
    pub entry_id: String,
    /// Job id (`None` for an entry without a valid id: it is only dead-lettered and acked).
    pub job_id: Option<String>,
    /// The terminal status (for metrics and logs; the record holds it too).
    pub status: Status,
    /// Version that ran (or was asked for), for metrics.
    pub version: Option<u64>,
    /// The terminal record as JSON: what the result key holds and `reply_to` receives.
    pub record: String,
    /// True when a record hash may exist (gateway submit, running mark, an earlier
    /// attempt): it gets the result TTL.
    pub has_hash: bool,
    /// Reply list (already checked against the model's prefix).
    pub reply_to: Option<String>,
    /// Dead-letter entry fields, when the job used up its attempts or cannot be parsed.
    pub dead_letter: Vec<(String, Vec<u8>)>,
}

/// Writes a batch of terminal results, first writer wins, and acknowledges every
/// entry; returns, per result, whether this call turned the job terminal (false: it
/// already was, a duplicate delivery). Safe to call again with the same results.
pub async fn finish(
    conn: &mut Conn,
    keys: &Keys,
    ttl_s: u64,
    dlq_min_id: &str,
    results: &[Terminal],
) -> Result<Vec<bool>, QueueError> {
    if results.is_empty() {
        return Ok(Vec::new());
    }
    if results
        .iter()
        .all(|r| r.job_id.is_some() && r.reply_to.is_none() && r.dead_letter.is_empty())
    {
        return finish_polled(conn, keys, ttl_s, results).await;
    }
    // Per job: result key, hash key, reply list; an absent hash or reply repeats the
    // result key. An id-less entry has no record: a throwaway key in the slot stands in.
    let mut owned: Vec<String> = Vec::with_capacity(results.len() * 3);
    let mut slots: Vec<(usize, Option<usize>, Option<usize>)> = Vec::with_capacity(results.len());
    for r in results {
        let id = r.job_id.as_deref().unwrap_or("-");
        let result = owned.len();
        owned.push(keys.result(id));
        let hash = r.has_hash.then(|| {
            owned.push(keys.job(id));
            owned.len() - 1
        });
        let reply = r.reply_to.as_ref().filter(|_| r.job_id.is_some()).map(|k| {
            owned.push(k.clone());
            owned.len() - 1
        });
        slots.push((result, hash, reply));
    }
    let mut key_refs: Vec<&str> = vec![keys.jobs(), keys.dlq(), keys.inflight()];
    for &(result, hash, reply) in &slots {
        key_refs.extend([
            owned[result].as_str(),
            owned[hash.unwrap_or(result)].as_str(),
            owned[reply.unwrap_or(result)].as_str(),
        ]);
    }
    let ttl = ttl_s.to_string();
    let counts: Vec<String> = results
        .iter()
        .map(|r| r.dead_letter.len().to_string())
        .collect();
    let mut args: Vec<&[u8]> = vec![
        super::GROUP.as_bytes(),
        ttl.as_bytes(),
        keys.done().as_bytes(),
        dlq_min_id.as_bytes(),
    ];
    for (r, d) in results.iter().zip(&counts) {
        args.extend([
            r.entry_id.as_bytes(),
            r.job_id.as_deref().unwrap_or("").as_bytes(),
            r.record.as_bytes(),
            d.as_bytes(),
        ]);
        for (f, v) in &r.dead_letter {
            args.push(f.as_bytes());
            args.push(v);
        }
    }
    match scripts()
        .finish
        .run(conn, &key_refs, &args, "write results")
        .await?
    {
        Value::Array(flags) if flags.len() == results.len() => {
            Ok(flags.iter().map(|f| int(f) == Some(1)).collect())
        }
        _ => Err(QueueError::Protocol("write results")),
    }
}

/// [`finish`] for a batch of polled jobs (no reply list, no dead letter): one MULTI of
/// plain commands, at about half the Redis CPU of the script (no Lua call per job).
/// `SET NX EX` still lets the first writer win, and a refused command (OOM) aborts the
/// whole transaction, so nothing is acknowledged without its result. What a
/// transaction cannot make conditional is the `done` message: a duplicate delivery
/// publishes its id again, and a woken reader finds the first result.
async fn finish_polled(
    conn: &mut Conn,
    keys: &Keys,
    ttl_s: u64,
    results: &[Terminal],
) -> Result<Vec<bool>, QueueError> {
    let mut pipe = redis::pipe();
    pipe.atomic();
    let mut ids = String::new();
    for r in results {
        let id = r.job_id.as_deref().unwrap_or_default();
        pipe.cmd("SET")
            .arg(keys.result(id))
            .arg(&r.record)
            .arg("NX")
            .arg("EX")
            .arg(ttl_s);
        if !ids.is_empty() {
            ids.push(' ');
        }
        ids.push_str(id);
    }
    for r in results.iter().filter(|r| r.has_hash) {
        let id = r.job_id.as_deref().unwrap_or_default();
        pipe.cmd("EXPIRE")
            .arg(keys.job(id))
            .arg(ttl_s)
            .arg("NX")
            .ignore();
    }
    let entries: Vec<&str> = results.iter().map(|r| r.entry_id.as_str()).collect();
    pipe.cmd("PUBLISH").arg(keys.done()).arg(ids).ignore();
    pipe.cmd("HDEL").arg(keys.inflight()).arg(&entries).ignore();
    pipe.cmd("XACK")
        .arg(keys.jobs())
        .arg(GROUP)
        .arg(&entries)
        .ignore();
    let set: Vec<Value> = pipe
        .query_async(conn)
        .await
        .map_err(QueueError::redis("write results"))?;
    if set.len() != results.len() {
        return Err(QueueError::Protocol("write results"));
    }
    Ok(set.iter().map(|v| matches!(v, Value::Okay)).collect())
}

/// Gives the records of jobs that were already terminal when their entry was finished
/// (a cancel, or an earlier delivery) the result TTL, if they would outlive it: a
/// cancelled record is kept until its entry is taken (cancel.lua), then expires as any
/// other. `EXPIRE … LT` never lengthens a TTL. Only duplicates pay for it.
pub async fn settle_expiry(
    conn: &mut Conn,
    keys: &Keys,
    ttl_s: u64,
    jobs: &[(&str, bool)],
) -> Result<(), QueueError> {
    if jobs.is_empty() {
        return Ok(());
    }
    let mut pipe = redis::pipe();
    for &(id, has_hash) in jobs {
        pipe.cmd("EXPIRE")
            .arg(keys.result(id))
            .arg(ttl_s)
            .arg("LT")
            .ignore();
        if has_hash {
            pipe.cmd("EXPIRE")
                .arg(keys.job(id))
                .arg(ttl_s)
                .arg("LT")
                .ignore();
        }
    }
    pipe.query_async::<()>(conn)
        .await
        .map_err(QueueError::redis("expire terminal records"))
}

/// Acknowledges one entry and forgets its inflight index, writing nothing else: the
/// last resort for a job none of whose results can be written.
pub async fn acknowledge(conn: &mut Conn, keys: &Keys, entry_id: &str) -> Result<(), QueueError> {
    redis::pipe()
        .atomic()
        .cmd("HDEL")
        .arg(keys.inflight())
        .arg(entry_id)
        .ignore()
        .cmd("XACK")
        .arg(keys.jobs())
        .arg(GROUP)
        .arg(entry_id)
        .ignore()
        .query_async::<()>(conn)
        .await
        .map_err(QueueError::redis("acknowledge an entry"))
}

/// Notes a retryable failure on the record, so a later dead-letter can say why.
pub async fn note_retryable(
    conn: &mut Conn,
    keys: &Keys,
    job_id: &str,
    error: &str,
) -> Result<(), QueueError> {
    redis::cmd("HSET")
        .arg(keys.job(job_id))
        .arg(crate::protocol::job::field::LAST_ERROR)
        .arg(error)
        .query_async::<Value>(conn)
        .await
        .map(drop)
        .map_err(QueueError::redis("note a retryable error"))
}

/// The last retryable error noted on a record, for a dead-letter reason.
pub async fn last_error(
    conn: &mut Conn,
    keys: &Keys,
    job_id: &str,
) -> Result<Option<String>, QueueError> {
    redis::cmd("HGET")
        .arg(keys.job(job_id))
        .arg(crate::protocol::job::field::LAST_ERROR)
        .query_async(conn)
        .await
        .map_err(QueueError::redis("read the last error"))
}

/// The fields of one stream entry, `None` when it is gone (trimmed): what a dead
/// letter keeps of a job whose fields the worker no longer holds.
pub async fn entry(
    conn: &mut Conn,
    keys: &Keys,
    entry_id: &str,
) -> Result<Option<Vec<(Vec<u8>, Vec<u8>)>>, QueueError> {
    let reply: Value = redis::cmd("XRANGE")
        .arg(keys.jobs())
        .arg(entry_id)
        .arg(entry_id)
        .arg("COUNT")
        .arg(1)
        .query_async(conn)
        .await
        .map_err(QueueError::redis("read a job entry"))?;
    let Value::Array(list) = reply else {
        return Err(QueueError::Protocol("read a job entry"));
    };
    Ok(list
        .into_iter()
        .find_map(parse_entry)
        .and_then(|d| d.fields))
}

/// The job id (and reply list) of a pending entry that vanished from the stream,
/// from the inflight index.
pub async fn inflight_job(
    conn: &mut Conn,
    keys: &Keys,
    entry_id: &str,
) -> Result<Option<(String, Option<String>)>, QueueError> {
    let v: Option<String> = redis::cmd("HGET")
        .arg(keys.inflight())
        .arg(entry_id)
        .query_async(conn)
        .await
        .map_err(QueueError::redis("look up a lost entry"))?;
    Ok(v.map(|v| match v.split_once(' ') {
        Some((id, reply)) => (id.to_owned(), Some(reply.to_owned())),
        None => (v, None),
    }))
}
