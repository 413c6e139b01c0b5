//! The dead-letter stream `inferq:{m}:dlq`: jobs that used up their attempts (or
//! could not be parsed), with their inputs and last error, kept for a bounded time.

use redis::Value;

use super::consume::{Delivery, parse_entry};
use super::{Conn, Keys, QueueError};
use crate::protocol::job::field;

/// Dead-letter fields beyond the original entry's.
pub mod dead_field {
    /// Why the job was dead-lettered.
    pub const ERROR: &str = "error";
    /// Deliveries it had.
    pub const ATTEMPTS: &str = "attempts";
    /// Its original stream entry id.
    pub const ENTRY: &str = "entry";
}

/// Up to `count` dead letters, oldest first.
pub async fn list(conn: &mut Conn, keys: &Keys, count: usize) -> Result<Vec<Delivery>, QueueError> {
    Ok(page(conn, keys, count).await?.0)
}

/// Up to `count` dead letters, oldest first, and how many there are in all (read
/// in one transaction, so a listing can say truthfully that it left some out).
pub async fn page(
    conn: &mut Conn,
    keys: &Keys,
    count: usize,
) -> Result<(Vec<Delivery>, u64), QueueError> {
    let (total, reply): (u64, Value) = redis::pipe()
        .atomic()
        .cmd("XLEN")
        .arg(keys.dlq())
        .cmd("XRANGE")
        .arg(keys.dlq())
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(count)
        .query_async(conn)
        .await
        .map_err(QueueError::redis("list dead letters"))?;
    let Value::Array(list) = reply else {
        return Err(QueueError::Protocol("list dead letters"));
    };
    Ok((list.into_iter().filter_map(parse_entry).collect(), total))
}

/// Re-enqueues dead letters (all, or those whose job id is in `ids`) as fresh jobs
/// with attempts reset: the old record is deleted, the entry added again, and the
/// dead letter removed, in one transaction per job. Returns the job ids replayed.
pub async fn replay(
    conn: &mut Conn,
    keys: &Keys,
    ids: &[String],
) -> Result<Vec<String>, QueueError> {
    let mut replayed = Vec::new();
    for d in list(conn, keys, 100_000).await? {
        let Some(fields) = d.fields else { continue };
        let job_id = fields
            .iter()
            .find(|(k, _)| k == field::ID.as_bytes())
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned());
        let Some(job_id) = job_id else { continue };
        if !ids.is_empty() && !ids.contains(&job_id) {
            continue;
        }
        let entry: Vec<(&[u8], &[u8])> = fields
            .iter()
            .filter(|(k, _)| {
                ![dead_field::ERROR, dead_field::ATTEMPTS, dead_field::ENTRY]
                    .iter()
                    .any(|f| f.as_bytes() == k.as_slice())
            })
            .map(|(k, v)| (k.as_slice(), v.as_slice()))
            .collect();
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("DEL")
            .arg(keys.job(&job_id))
            .arg(keys.result(&job_id))
            .ignore();
        let mut xadd = redis::cmd("XADD");
        xadd.arg(keys.jobs()).arg("*");
        for (k, v) in &entry {
            xadd.arg(*k).arg(*v);
        }
        pipe.add_command(xadd).ignore();
        pipe.cmd("XDEL").arg(keys.dlq()).arg(&d.entry_id).ignore();
        pipe.query_async::<()>(conn)
            .await
            .map_err(QueueError::redis("replay a dead letter"))?;
        replayed.push(job_id);
    }
    Ok(replayed)
}

/// Deletes every dead letter of the model; returns how many there were.
pub async fn purge(conn: &mut Conn, keys: &Keys) -> Result<u64, QueueError> {
    let (n,): (u64,) = redis::pipe()
        .atomic()
        .cmd("XLEN")
        .arg(keys.dlq())
        .cmd("DEL")
        .arg(keys.dlq())
        .ignore()
        .query_async(conn)
        .await
        .map_err(QueueError::redis("purge dead letters"))?;
    Ok(n)
}

/// The MINID below which dead letters are past `retention_s` and may be trimmed.
pub fn retention_min_id(retention_s: u64) -> String {
    format!(
        "{}-0",
        crate::now_ms().saturating_sub(retention_s.saturating_mul(1000))
    )
}
