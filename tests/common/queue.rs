//! Helpers for the queue tests: a Redis with a registry, a direct producer (XADD of
//! protocol entries), job records, reply lists and the pending list read back. The
//! workers (in-process and processes) and metrics are in [`super::workers`], also
//! reachable from here.
//!
//! Every wait here is bounded in time and panics with what it last saw.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use inferq::protocol::job::{JobEntry, Payload};
use inferq::protocol::oip::encode_request;
use inferq::protocol::{Tensor, TensorData, binary};
use inferq::queue::Keys;
use redis::aio::{ConnectionLike, MultiplexedConnection};

// Re-exported so a queue test needs one `use`; each uses a few.
#[allow(unused_imports)]
pub use super::workers::{
    Armed, WorkerProcess, histogram_buckets, metric, metric_in, start_worker, worker_config,
};
use super::{RedisOptions, RedisServer, Reference, TempRegistry, unique_name};

/// One queue test's world: its own `redis-server`, a registry holding one demo model
/// under a unique name, that model's reference rows, and a connection.
#[derive(Debug)]
pub struct Setup {
    /// The private Redis.
    pub redis: RedisServer,
    /// The registry (in a temporary directory).
    pub registry: TempRegistry,
    /// The model's name in the registry and in every key.
    pub model: String,
    /// The demo model's reference inputs and outputs.
    pub reference: Reference,
    /// A connection to `redis` (30 s response timeout).
    pub conn: MultiplexedConnection,
}

impl Setup {
    /// Starts Redis with `opts` and registers demo model `demo` as version 1 of a
    /// fresh name.
    pub async fn new(demo: &str, opts: RedisOptions) -> Setup {
        let redis = RedisServer::with(opts);
        let model = unique_name(demo);
        let registry = TempRegistry::empty();
        registry.add_as(demo, &model);
        let conn = connect(&redis).await;
        Setup {
            redis,
            registry,
            model,
            reference: Reference::load(demo),
            conn,
        }
    }

    /// Sends one job through and waits for it: the worker has its model loaded after.
    pub async fn warm_up(&mut self, timeout: Duration) -> Record {
        let row = cycled_inputs(&self.reference, 0, 1);
        warm_up(&mut self.conn, &self.model, &row, timeout).await
    }

    /// Adds one-row jobs `<prefix>-0…<prefix>-{n-1}` (reference row i for job i) as a
    /// direct producer; returns their ids.
    pub async fn produce_rows(&mut self, prefix: &str, n: usize) -> Vec<String> {
        let mut ids = Vec::with_capacity(n);
        for i in 0..n {
            let id = format!("{prefix}-{i}");
            let row = cycled_inputs(&self.reference, i, 1);
            produce(&mut self.conn, &self.model, &id, &row).await;
            ids.push(id);
        }
        ids
    }

    /// Reference inputs of `n` rows from row `start` (wrapping around).
    pub fn rows(&self, start: usize, n: usize) -> Vec<Tensor> {
        cycled_inputs(&self.reference, start, n)
    }

    /// Starts an `inferq worker` process (see [`WorkerProcess::spawn`]) and waits,
    /// at most `timeout`, until it has served one job.
    pub async fn worker_process(
        &mut self,
        consumer: &str,
        env: &[(&str, &str)],
        timeout: Duration,
    ) -> WorkerProcess {
        let w = WorkerProcess::spawn(&self.redis, self.registry.path(), consumer, env);
        let row = self.rows(0, 1);
        let warm =
            tokio::time::timeout(timeout, warm_up(&mut self.conn, &self.model, &row, timeout))
                .await;
        assert!(warm.is_ok(), "worker {consumer} never served:\n{}", w.log());
        w
    }
}

/// A job record as one field map: the hash (`inferq:{m}:job:<id>`) overlaid with the
/// terminal record's JSON fields (`inferq:{m}:result:<id>`; objects as JSON text,
/// `true` as `1`).
pub type Record = HashMap<String, String>;

/// Overlays the terminal record's JSON, if any, on the hash.
fn overlay(mut hash: Record, result: Option<String>) -> Record {
    let Some(json) = result else { return hash };
    let fields: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("result {json}: {e}"));
    for (k, v) in fields {
        let text = match v {
            serde_json::Value::String(s) => s,
            serde_json::Value::Bool(b) => if b { "1" } else { "0" }.to_owned(),
            other => other.to_string(),
        };
        hash.insert(k, text);
    }
    hash
}

/// `n` rows of a tensor starting at row `start`, wrapping around its rows.
pub fn cycled(t: &Tensor, start: usize, n: usize) -> Tensor {
    let (w, total) = (t.row_len(), t.rows());
    let mut data = TensorData::with_capacity(t.data.datatype(), n * w);
    for i in 0..n {
        let r = (start + i) % total;
        data.extend_from(&t.data, r * w..(r + 1) * w);
    }
    let mut shape = t.shape.clone();
    shape[0] = n;
    Tensor {
        name: t.name.clone(),
        shape,
        data,
    }
}

/// Reference inputs of `n` rows from row `start` on, wrapping around the reference
/// rows (for jobs larger than the reference, or many one-row jobs).
pub fn cycled_inputs(reference: &Reference, start: usize, n: usize) -> Vec<Tensor> {
    reference
        .inputs
        .iter()
        .map(|t| cycled(t, start, n))
        .collect()
}

/// The expected outputs of [`cycled_inputs`]`(reference, start, n)`.
pub fn cycled_outputs(reference: &Reference, start: usize, n: usize) -> Vec<Tensor> {
    reference
        .outputs
        .iter()
        .map(|t| cycled(t, start, n))
        .collect()
}

/// An async connection whose replies may take up to 30 s (blocking reads, fsync).
pub async fn connect(redis: &RedisServer) -> MultiplexedConnection {
    let cfg = redis::AsyncConnectionConfig::new()
        .set_response_timeout(Some(Duration::from_secs(30)))
        .set_connection_timeout(Some(Duration::from_secs(5)));
    redis
        .client()
        .get_multiplexed_async_connection_with_config(&cfg)
        .await
        .unwrap_or_else(|e| panic!("connect to {}: {e}\n{}", redis.url(), redis.log()))
}

/// A job entry with an OIP v2 JSON body.
pub fn json_job(id: &str, inputs: &[Tensor]) -> JobEntry {
    JobEntry {
        id: id.to_owned(),
        payload: Payload::Json(encode_request(inputs)),
        version: None,
        deadline_ms: None,
        reply_to: None,
        traceparent: None,
        record: false,
    }
}

/// A job entry with the binary tensor encoding (`bin`), for large inputs.
pub fn bin_job(id: &str, inputs: &[Tensor]) -> JobEntry {
    JobEntry {
        payload: Payload::Binary(binary::encode(inputs).expect("encodable tensors")),
        ..json_job(id, &[])
    }
}

/// `XADD inferq:{model}:jobs * <fields>` as a command, for pipelines and MULTI.
pub fn xadd_cmd<K: AsRef<[u8]>, V: AsRef<[u8]>>(model: &str, fields: &[(K, V)]) -> redis::Cmd {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(Keys::new(model).jobs()).arg("*");
    for (k, v) in fields {
        cmd.arg(k.as_ref()).arg(v.as_ref());
    }
    cmd
}

/// The XADD of a protocol entry.
pub fn entry_cmd(model: &str, entry: &JobEntry) -> redis::Cmd {
    xadd_cmd(model, &entry.to_fields())
}

/// Adds raw `fields` to the model's stream; returns the entry id.
pub async fn xadd<C, K, V>(conn: &mut C, model: &str, fields: &[(K, V)]) -> String
where
    C: ConnectionLike + Send,
    K: AsRef<[u8]>,
    V: AsRef<[u8]>,
{
    xadd_cmd(model, fields)
        .query_async(conn)
        .await
        .unwrap_or_else(|e| panic!("XADD to {model}: {e}"))
}

/// Adds a protocol entry; returns the entry id.
pub async fn produce_entry<C: ConnectionLike + Send>(
    conn: &mut C,
    model: &str,
    entry: &JobEntry,
) -> String {
    xadd(conn, model, &entry.to_fields()).await
}

/// Adds a JSON job `id` with `inputs`, as a direct producer would; returns the entry id.
pub async fn produce<C: ConnectionLike + Send>(
    conn: &mut C,
    model: &str,
    id: &str,
    inputs: &[Tensor],
) -> String {
    produce_entry(conn, model, &json_job(id, inputs)).await
}

/// Adds several entries in one MULTI/EXEC, so a worker blocked on the stream gets
/// them all in one read; returns their entry ids.
pub async fn produce_all<C: ConnectionLike + Send>(
    conn: &mut C,
    model: &str,
    entries: &[JobEntry],
) -> Vec<String> {
    let mut pipe = redis::pipe();
    pipe.atomic();
    for e in entries {
        pipe.add_command(entry_cmd(model, e));
    }
    pipe.query_async(conn)
        .await
        .unwrap_or_else(|e| panic!("MULTI XADD to {model}: {e}"))
}

/// The record of job `id` (empty when there is none).
pub async fn record<C: ConnectionLike + Send>(conn: &mut C, model: &str, id: &str) -> Record {
    records(conn, model, &[id.to_owned()]).await.remove(0)
}

/// True when the record holds a terminal status.
pub fn is_terminal(rec: &Record) -> bool {
    matches!(
        rec.get("status").map(String::as_str),
        Some("succeeded" | "failed" | "expired" | "cancelled")
    )
}

/// Polls job `id`'s record every 10 ms until it is terminal; panics after `timeout`.
pub async fn wait_terminal<C: ConnectionLike + Send>(
    conn: &mut C,
    model: &str,
    id: &str,
    timeout: Duration,
) -> Record {
    let deadline = Instant::now() + timeout;
    loop {
        let rec = record(conn, model, id).await;
        if is_terminal(&rec) {
            return rec;
        }
        assert!(
            Instant::now() < deadline,
            "job {model}/{id} not terminal after {timeout:?}: {rec:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until every job in `ids` is terminal (statuses polled in pipelines every
/// 20 ms) and returns their records in `ids` order; panics after `timeout` naming how
/// many are still open.
pub async fn wait_all_terminal<C: ConnectionLike + Send>(
    conn: &mut C,
    model: &str,
    ids: &[String],
    timeout: Duration,
) -> Vec<Record> {
    let keys = Keys::new(model);
    let deadline = Instant::now() + timeout;
    let mut open: Vec<&String> = ids.iter().collect();
    while !open.is_empty() {
        let mut still = Vec::new();
        for chunk in open.chunks(1000) {
            let mut pipe = redis::pipe();
            for id in chunk {
                pipe.cmd("EXISTS").arg(keys.result(id));
            }
            let done: Vec<bool> = pipe
                .query_async(conn)
                .await
                .unwrap_or_else(|e| panic!("EXISTS results: {e}"));
            still.extend(
                chunk
                    .iter()
                    .zip(done)
                    .filter(|(_, d)| !d)
                    .map(|(id, _)| *id),
            );
        }
        open = still;
        if open.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} jobs not terminal after {timeout:?}, e.g. {:?}: {:?}",
            open.len(),
            ids.len(),
            open[0],
            record(conn, model, open[0]).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    records(conn, model, ids).await
}

/// The records of `ids`, in order (pipelined).
pub async fn records<C: ConnectionLike + Send>(
    conn: &mut C,
    model: &str,
    ids: &[String],
) -> Vec<Record> {
    let keys = Keys::new(model);
    let mut out = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(500) {
        let mut pipe = redis::pipe();
        for id in chunk {
            pipe.cmd("HGETALL").arg(keys.job(id));
            pipe.cmd("GET").arg(keys.result(id));
        }
        let recs: Vec<(Record, Option<String>)> = pipe
            .query_async(conn)
            .await
            .unwrap_or_else(|e| panic!("read records: {e}"));
        out.extend(recs.into_iter().map(|(h, r)| overlay(h, r)));
    }
    out
}

/// The output tensors of a succeeded record (its `outputs` OIP v2 response).
pub fn outputs_of(rec: &Record) -> Vec<Tensor> {
    let text = rec
        .get("outputs")
        .unwrap_or_else(|| panic!("record has no outputs: {rec:?}"));
    let v: serde_json::Value = serde_json::from_str(text).expect("outputs are JSON");
    v["outputs"]
        .as_array()
        .unwrap_or_else(|| panic!("outputs JSON has no `outputs`: {text}"))
        .iter()
        .map(super::json_tensor)
        .collect()
}

/// The `attempts` field of a record.
pub fn attempts(rec: &Record) -> u32 {
    rec.get("attempts")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("record has no attempts: {rec:?}"))
}

/// A numeric field of a record.
pub fn ms(rec: &Record, field: &str) -> u64 {
    rec.get(field)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("record has no `{field}`: {rec:?}"))
}

/// One entry of the group's pending list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// Stream entry id.
    pub entry_id: String,
    /// Consumer that holds it.
    pub consumer: String,
    /// Ms since its last delivery.
    pub idle_ms: u64,
    /// Deliveries so far.
    pub deliveries: u64,
}

/// Every entry of the model's pending list (XPENDING extended form); empty when the
/// stream or group does not exist yet.
pub async fn pending<C: ConnectionLike + Send>(conn: &mut C, model: &str) -> Vec<Pending> {
    let r: redis::RedisResult<Vec<(String, String, u64, u64)>> = redis::cmd("XPENDING")
        .arg(Keys::new(model).jobs())
        .arg(inferq::queue::GROUP)
        .arg("-")
        .arg("+")
        .arg(100_000)
        .query_async(conn)
        .await;
    match r {
        Ok(rows) => rows
            .into_iter()
            .map(|(entry_id, consumer, idle_ms, deliveries)| Pending {
                entry_id,
                consumer,
                idle_ms,
                deliveries,
            })
            .collect(),
        Err(e) if e.code() == Some("NOGROUP") => Vec::new(),
        Err(e) => panic!("XPENDING {model}: {e}"),
    }
}

/// Polls the pending list every 2 ms until `done` holds for it; returns it. Panics
/// after `timeout`.
pub async fn wait_pending<C, F>(
    conn: &mut C,
    model: &str,
    timeout: Duration,
    what: &str,
    done: F,
) -> Vec<Pending>
where
    C: ConnectionLike + Send,
    F: Fn(&[Pending]) -> bool,
{
    let deadline = Instant::now() + timeout;
    loop {
        let p = pending(conn, model).await;
        if done(&p) {
            return p;
        }
        assert!(
            Instant::now() < deadline,
            "pending list never showed {what} within {timeout:?}: {p:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Waits until the model's pending list is empty (every delivered entry acknowledged).
pub async fn wait_no_pending<C: ConnectionLike + Send>(
    conn: &mut C,
    model: &str,
    timeout: Duration,
) {
    wait_pending(conn, model, timeout, "no entries", <[Pending]>::is_empty).await;
}

/// `inferq:{model}:reply:<name>`: a reply list the worker may push to.
pub fn reply_key(model: &str, name: &str) -> String {
    format!("{}{name}", Keys::new(model).reply_prefix())
}

/// Sends one job of `inputs` and waits for its result: the worker is up, has loaded
/// the model's default version and warmed up its session. Returns the record.
pub async fn warm_up<C: ConnectionLike + Send>(
    conn: &mut C,
    model: &str,
    inputs: &[Tensor],
    timeout: Duration,
) -> Record {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let id = format!(
        "warm-up-{}",
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    produce(conn, model, &id, inputs).await;
    let rec = wait_terminal(conn, model, &id, timeout).await;
    assert_eq!(rec["status"], "succeeded", "warm-up job: {rec:?}");
    rec
}

/// The elements of a list (a reply list).
pub async fn list<C: ConnectionLike + Send>(conn: &mut C, key: &str) -> Vec<String> {
    redis::cmd("LRANGE")
        .arg(key)
        .arg(0)
        .arg(-1)
        .query_async(conn)
        .await
        .unwrap_or_else(|e| panic!("LRANGE {key}: {e}"))
}

/// The job ids of the records pushed to a reply list.
pub async fn reply_ids<C: ConnectionLike + Send>(conn: &mut C, key: &str) -> Vec<String> {
    list(conn, key)
        .await
        .iter()
        .map(|json| {
            let v: serde_json::Value = serde_json::from_str(json).expect("a pushed record is JSON");
            v["id"]
                .as_str()
                .expect("a pushed record has an id")
                .to_owned()
        })
        .collect()
}

/// `CONFIG SET maxmemory <bytes>`: `"1"` makes every write that may use memory fail
/// with OOM (the server keeps noeviction), `"0"` lifts the limit.
pub async fn set_maxmemory<C: ConnectionLike + Send>(conn: &mut C, bytes: &str) {
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(bytes)
        .query_async::<()>(conn)
        .await
        .unwrap_or_else(|e| panic!("CONFIG SET maxmemory {bytes}: {e}"));
}
