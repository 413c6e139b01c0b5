//! Housekeeping a worker runs beside its reads: reclaiming entries whose consumer went
//! quiet, trimming acknowledged entries safely, and forgetting stale consumers.

use std::time::Duration;

use redis::Value;

use super::consume::{Delivery, fill_deliveries, parse_entry};
use super::script::scripts;
use super::{Conn, GROUP, Keys, QueueError, int, text};

/// What one reclaim pass found.
#[derive(Debug, Default)]
pub struct Reclaimed {
    /// Entries now owned by this consumer, with delivery counts (this claim included).
    pub entries: Vec<Delivery>,
    /// Entry ids that were pending but no longer exist in the stream.
    pub deleted: Vec<String>,
    /// Cursor for the next pass (`0-0`: a full pass is done).
    pub cursor: String,
}

/// Claims up to `count` entries idle longer than `min_idle` (XAUTOCLAIM, delivery
/// counter counting), starting at `cursor`.
pub async fn reclaim(
    conn: &mut Conn,
    keys: &Keys,
    consumer: &str,
    min_idle: Duration,
    cursor: &str,
    count: usize,
) -> Result<Reclaimed, QueueError> {
    let reply: Value = redis::cmd("XAUTOCLAIM")
        .arg(keys.jobs())
        .arg(GROUP)
        .arg(consumer)
        .arg(min_idle.as_millis() as u64)
        .arg(cursor)
        .arg("COUNT")
        .arg(count.max(1))
        .query_async(conn)
        .await
        .map_err(QueueError::redis("reclaim idle jobs"))?;
    let Value::Array(parts) = reply else {
        return Err(QueueError::Protocol("reclaim idle jobs"));
    };
    let mut parts = parts.into_iter();
    let cursor = parts
        .next()
        .as_ref()
        .and_then(text)
        .unwrap_or_else(|| "0-0".into());
    let mut entries: Vec<Delivery> = match parts.next() {
        Some(Value::Array(list)) => list
            .into_iter()
            .filter_map(parse_entry)
            .filter(|d| d.fields.is_some())
            .collect(),
        _ => Vec::new(),
    };
    let deleted = match parts.next() {
        Some(Value::Array(ids)) => ids.iter().filter_map(text).collect(),
        _ => Vec::new(),
    };
    entries.sort_by_key(|d| entry_order(&d.entry_id));
    fill_deliveries(conn, keys, Some(consumer), &mut entries).await?;
    Ok(Reclaimed {
        entries,
        deleted,
        cursor,
    })
}

/// Resets the idle time of entries this consumer holds (XCLAIM … JUSTID: no delivery
/// is counted), so a slow batch or a long wait is not mistaken for a dead worker.
pub async fn touch(
    conn: &mut Conn,
    keys: &Keys,
    consumer: &str,
    ids: &[String],
) -> Result<(), QueueError> {
    for chunk in ids.chunks(512) {
        redis::cmd("XCLAIM")
            .arg(keys.jobs())
            .arg(GROUP)
            .arg(consumer)
            .arg(0)
            .arg(chunk)
            .arg("JUSTID")
            .query_async::<Value>(conn)
            .await
            .map_err(QueueError::redis("refresh held jobs"))?;
    }
    Ok(())
}

/// `ms-seq` as a sortable pair.
pub fn entry_order(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

/// Removes acknowledged entries, never past the oldest pending or undelivered one.
pub async fn trim(conn: &mut Conn, keys: &Keys) -> Result<u64, QueueError> {
    let limit = TRIM_LIMIT.to_string();
    let v = scripts()
        .trim
        .run(
            conn,
            &[keys.jobs()],
            &[GROUP.as_bytes(), limit.as_bytes()],
            "trim the stream",
        )
        .await?;
    Ok(int(&v).unwrap_or(0).max(0) as u64)
}

/// Most entries one trim removes: a second's worth of a very fast producer, in one
/// short call (freeing whole stream nodes).
const TRIM_LIMIT: u64 = 1_000_000;

/// Deletes consumers idle longer than `idle` that hold no pending entries (pods come
/// and go); a consumer with pending entries is never deleted, or they would become
/// unclaimable. Returns how many were removed.
pub async fn remove_stale_consumers(
    conn: &mut Conn,
    keys: &Keys,
    idle: Duration,
    keep: &str,
) -> Result<usize, QueueError> {
    let reply: Value = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(keys.jobs())
        .arg(GROUP)
        .query_async(conn)
        .await
        .map_err(QueueError::redis("list consumers"))?;
    let Value::Array(consumers) = reply else {
        return Ok(0);
    };
    let mut removed = 0;
    for c in &consumers {
        let info = pairs(c);
        let name = info
            .iter()
            .find(|(k, _)| k == "name")
            .and_then(|(_, v)| text(v));
        let pending = info
            .iter()
            .find(|(k, _)| k == "pending")
            .and_then(|(_, v)| int(v))
            .unwrap_or(1);
        let idle_ms = info
            .iter()
            .find(|(k, _)| k == "idle")
            .and_then(|(_, v)| int(v))
            .unwrap_or(0);
        if let Some(name) = name.filter(|n| n != keep)
            && pending == 0
            && idle_ms as u128 > idle.as_millis()
        {
            redis::cmd("XGROUP")
                .arg("DELCONSUMER")
                .arg(keys.jobs())
                .arg(GROUP)
                .arg(&name)
                .query_async::<Value>(conn)
                .await
                .map_err(QueueError::redis("remove a stale consumer"))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// A flat `[k, v, k, v …]` reply (or a RESP3 map) as pairs with text keys.
pub(crate) fn pairs(v: &Value) -> Vec<(String, &Value)> {
    match v {
        Value::Array(flat) => flat
            .chunks_exact(2)
            .filter_map(|kv| Some((text(&kv[0])?, &kv[1])))
            .collect(),
        Value::Map(m) => m.iter().filter_map(|(k, v)| Some((text(k)?, v))).collect(),
        _ => Vec::new(),
    }
}

/// Redis' memory settings as `INFO memory` reports them (CONFIG may be disabled).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemoryLimits {
    /// `maxmemory-policy`. A cluster answers per node: the first node not at
    /// `noeviction` is reported. Anything but `noeviction` may silently evict jobs,
    /// records and the group's state.
    pub policy: Option<String>,
    /// Some node reports `maxmemory:0`: no limit, so `noeviction` never acts and Redis
    /// grows until the kernel's OOM killer stops it (losing what the AOF has not got).
    pub unlimited: bool,
}

/// Reads [`MemoryLimits`] from `INFO memory` (every node of a cluster).
pub async fn memory_limits(conn: &mut Conn) -> Result<MemoryLimits, QueueError> {
    let info: Value = redis::cmd("INFO")
        .arg("memory")
        .query_async(conn)
        .await
        .map_err(QueueError::redis("read INFO memory"))?;
    let texts: Vec<String> = match &info {
        Value::Map(nodes) => nodes.iter().filter_map(|(_, v)| text(v)).collect(),
        other => text(other).into_iter().collect(),
    };
    Ok(parse_memory_limits(&texts))
}

/// [`MemoryLimits`] of the `INFO memory` texts of one or more nodes.
fn parse_memory_limits(texts: &[String]) -> MemoryLimits {
    let field = |t: &str, name: &str| {
        t.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(|v| v.trim().to_owned())
    };
    let policies: Vec<String> = texts
        .iter()
        .filter_map(|t| field(t, "maxmemory_policy"))
        .collect();
    MemoryLimits {
        policy: policies
            .iter()
            .find(|p| *p != "noeviction")
            .or(policies.first())
            .cloned(),
        unlimited: texts
            .iter()
            .any(|t| field(t, "maxmemory").as_deref() == Some("0")),
    }
}

/// Per-model queue figures for metrics and `/v1/stats`.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Depth {
    /// Entries in the stream (waiting, pending and not yet trimmed).
    pub length: u64,
    /// Entries not yet delivered to the group (Redis 7 `lag`).
    pub lag: Option<u64>,
    /// Delivered but not acknowledged.
    pub pending: u64,
    /// Age in ms of the oldest entry not yet delivered, when any.
    pub oldest_waiting_ms: Option<u64>,
}

/// Reads queue depth, lag and pending count of one model in one round trip.
pub async fn depth(conn: &mut Conn, keys: &Keys) -> Result<Depth, QueueError> {
    let mut pipe = redis::pipe();
    pipe.cmd("XLEN").arg(keys.jobs());
    pipe.cmd("XINFO").arg("GROUPS").arg(keys.jobs());
    pipe.ignore_errors();
    let replies: Vec<Value> = pipe
        .query_async(conn)
        .await
        .map_err(QueueError::redis("read queue depth"))?;
    let length = replies.first().and_then(int).unwrap_or(0).max(0) as u64;
    let mut d = Depth {
        length,
        ..Depth::default()
    };
    let mut last_delivered = None;
    if let Some(Value::Array(groups)) = replies.get(1) {
        for g in groups {
            let info = pairs(g);
            let get = |k: &str| info.iter().find(|(n, _)| n == k).map(|(_, v)| *v);
            if get("name").and_then(text).as_deref() == Some(GROUP) {
                d.lag = get("lag").and_then(int).map(|l| l.max(0) as u64);
                d.pending = get("pending").and_then(int).unwrap_or(0).max(0) as u64;
                last_delivered = get("last-delivered-id").and_then(text);
            }
        }
    }
    if d.lag.unwrap_or(length) > 0 {
        // The oldest waiting entry is the first one after the group's cursor.
        let start = last_delivered.map_or_else(|| "-".to_owned(), |id| format!("({id}"));
        let first: Value = redis::cmd("XRANGE")
            .arg(keys.jobs())
            .arg(start)
            .arg("+")
            .arg("COUNT")
            .arg(1)
            .query_async(conn)
            .await
            .map_err(QueueError::redis("read the oldest job"))?;
        if let Value::Array(list) = first
            && let Some(e) = list.into_iter().next().and_then(parse_entry)
        {
            d.oldest_waiting_ms = Some(crate::now_ms().saturating_sub(e.enqueued_ms()));
        }
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(policy: &str, maxmemory: &str) -> String {
        format!(
            "# Memory\r\nused_memory:1000\r\nmaxmemory:{maxmemory}\r\nmaxmemory_human:x\r\nmaxmemory_policy:{policy}\r\n"
        )
    }

    #[test]
    fn a_node_without_maxmemory_or_evicting_is_reported() {
        let ok = parse_memory_limits(&[info("noeviction", "1048576")]);
        assert_eq!(ok.policy.as_deref(), Some("noeviction"));
        assert!(!ok.unlimited);
        let unlimited = parse_memory_limits(&[info("noeviction", "0")]);
        assert!(unlimited.unlimited);
        // A cluster: one node of three is enough to be flagged, for either reason.
        let nodes = [
            info("noeviction", "1048576"),
            info("allkeys-lru", "1048576"),
            info("noeviction", "0"),
        ];
        let m = parse_memory_limits(&nodes);
        assert_eq!(m.policy.as_deref(), Some("allkeys-lru"));
        assert!(m.unlimited);
        assert_eq!(parse_memory_limits(&[]), MemoryLimits::default());
    }
}
