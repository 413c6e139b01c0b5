//! Helpers for the queue tests: a direct producer (XADD of protocol entries), job
//! records and the pending list read back, in-process workers, worker processes that
//! can be killed, stopped and resumed, and the process's metrics.
//!
//! Every wait here is bounded in time and panics with what it last saw.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use inferq::config::{BatchConfig, QueueConfig, WorkerConfig};
use inferq::protocol::job::{JobEntry, Payload};
use inferq::protocol::{Tensor, TensorData, binary};
use inferq::queue::{Keys, RedisTarget};
use inferq::worker::Worker;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use tokio_util::sync::CancellationToken;

use super::{RedisServer, Reference, TempRegistry, inferq_command};

/// A job record hash (`inferq:{m}:job:<id>`) as read with HGETALL.
pub type Record = HashMap<String, String>;

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

/// One OIP v2 output tensor object, parsed here rather than by the codec under test.
fn json_tensor(v: &serde_json::Value) -> Tensor {
    let data = v["data"].as_array().expect("data array");
    let f = |x: &serde_json::Value| x.as_f64().expect("number");
    let i = |x: &serde_json::Value| x.as_i64().expect("integer");
    let data = match v["datatype"].as_str().expect("datatype") {
        "FP32" => TensorData::Fp32(data.iter().map(|x| f(x) as f32).collect()),
        "FP64" => TensorData::Fp64(data.iter().map(f).collect()),
        "INT64" => TensorData::Int64(data.iter().map(i).collect()),
        "INT32" => TensorData::Int32(data.iter().map(|x| i(x) as i32).collect()),
        "BOOL" => TensorData::Bool(data.iter().map(|x| x.as_bool().expect("bool")).collect()),
        other => panic!("output datatype {other} is not supported by the tests"),
    };
    Tensor {
        name: v["name"].as_str().expect("name").to_owned(),
        shape: v["shape"]
            .as_array()
            .expect("shape")
            .iter()
            .map(|d| d.as_u64().expect("dimension") as usize)
            .collect(),
        data,
    }
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

/// An OIP v2 JSON request body carrying `inputs`.
pub fn oip_body(inputs: &[Tensor]) -> Vec<u8> {
    let tensors: Vec<serde_json::Value> = inputs
        .iter()
        .map(|t| {
            let data = match &t.data {
                TensorData::Bool(v) => serde_json::json!(v),
                TensorData::Int32(v) => serde_json::json!(v),
                TensorData::Int64(v) => serde_json::json!(v),
                // f32 -> f64 is exact, and serde_json prints the shortest f64 that
                // reads back to it, so the worker sees exactly these floats.
                TensorData::Fp32(v) => {
                    serde_json::json!(v.iter().map(|&x| f64::from(x)).collect::<Vec<_>>())
                }
                TensorData::Fp64(v) => serde_json::json!(v),
            };
            serde_json::json!({
                "name": t.name,
                "shape": t.shape,
                "datatype": t.data.datatype().as_str(),
                "data": data,
            })
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({ "inputs": tensors })).expect("JSON body")
}

/// A job entry with an OIP v2 JSON body.
pub fn json_job(id: &str, inputs: &[Tensor]) -> JobEntry {
    JobEntry {
        id: id.to_owned(),
        payload: Payload::Json(oip_body(inputs)),
        version: None,
        deadline_ms: None,
        reply_to: None,
        traceparent: None,
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
    redis::cmd("HGETALL")
        .arg(Keys::new(model).job(id))
        .query_async(conn)
        .await
        .unwrap_or_else(|e| panic!("HGETALL {id}: {e}"))
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
                pipe.cmd("HGET").arg(keys.job(id)).arg("status");
            }
            let statuses: Vec<Option<String>> = pipe
                .query_async(conn)
                .await
                .unwrap_or_else(|e| panic!("HGET statuses: {e}"));
            for (id, s) in chunk.iter().zip(statuses) {
                if !matches!(
                    s.as_deref(),
                    Some("succeeded" | "failed" | "expired" | "cancelled")
                ) {
                    still.push(*id);
                }
            }
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
        }
        let recs: Vec<Record> = pipe
            .query_async(conn)
            .await
            .unwrap_or_else(|e| panic!("HGETALL records: {e}"));
        out.extend(recs);
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
        .map(json_tensor)
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

/// Worker settings for tests: one inference thread, `max_batch` 64, no `max_wait`,
/// `claim_after` 500 ms, 3 attempts, a 10 s drain.
pub fn worker_config(model: &str, consumer: &str) -> WorkerConfig {
    WorkerConfig {
        models: vec![model.to_owned()],
        consumer: consumer.to_owned(),
        batch: BatchConfig {
            max_batch: 64,
            max_wait: Duration::ZERO,
        },
        infer_threads: 1,
        intra_threads: 1,
        queue: QueueConfig {
            result_ttl_s: 3600,
            claim_after: Duration::from_millis(500),
            max_attempts: 3,
            max_queue: 100_000,
            max_elements: 4_000_000,
            dlq_retention_s: 7 * 24 * 3600,
        },
        drain_timeout: Duration::from_secs(10),
    }
}

/// Starts an in-process worker (this process's metrics then show its counters).
pub async fn start_worker(
    redis: &RedisServer,
    registry: &TempRegistry,
    cfg: WorkerConfig,
) -> Worker {
    super::init_ort();
    let target = RedisTarget::parse(&redis.url()).expect("a valid redis URL");
    Worker::start(
        cfg,
        registry.registry.clone(),
        target,
        CancellationToken::new(),
    )
    .await
    .unwrap_or_else(|e| panic!("start an in-process worker: {e}"))
}

/// A loopback port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Sum of the series of metric `name` with `model="<model>"` in a `/metrics` text.
pub fn metric_in(text: &str, name: &str, model: &str) -> f64 {
    let label = format!("model=\"{model}\"");
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{'))
                && l.contains(&label)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Sum of every series of metric `name` (a counter, or a histogram's `_sum`/`_count`)
/// whose `model` label is `model`, in this process.
pub fn metric(name: &str, model: &str) -> f64 {
    metric_in(&inferq::metrics::metrics().render(), name, model)
}

/// The cumulative buckets (`le`, count) of histogram `name` for `model`.
pub fn histogram_buckets(name: &str, model: &str) -> Vec<(String, f64)> {
    let label = format!("model=\"{model}\"");
    let prefix = format!("{name}_bucket{{");
    inferq::metrics::metrics()
        .render()
        .lines()
        .filter(|l| l.starts_with(&prefix) && l.contains(&label))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?.to_owned();
            Some((le, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect()
}

/// An `inferq worker` process on a test Redis and registry, its log in a temporary
/// file. Killed (SIGKILL) on drop.
#[derive(Debug)]
pub struct WorkerProcess {
    child: Child,
    consumer: String,
    metrics_port: u16,
    log: tempfile::NamedTempFile,
    exit: Option<ExitStatus>,
}

impl WorkerProcess {
    /// Starts `inferq worker` as consumer `consumer`, serving every model of
    /// `models`, with `env` (e.g. `INFERQ_CLAIM_AFTER_MS`) on top of the defaults
    /// (metrics on a free port, logs at info).
    pub fn spawn(
        redis: &RedisServer,
        models: &Path,
        consumer: &str,
        env: &[(&str, &str)],
    ) -> WorkerProcess {
        let log = tempfile::NamedTempFile::new().expect("log file");
        let metrics_port = free_port();
        let mut cmd = inferq_command();
        cmd.arg("worker")
            .env("INFERQ_REDIS_URL", redis.url())
            .env("INFERQ_MODELS", models)
            .env("INFERQ_CONSUMER", consumer)
            .env("INFERQ_METRICS_LISTEN", format!("127.0.0.1:{metrics_port}"))
            .env("RUST_LOG", "inferq=info")
            .stdout(Stdio::null())
            .stderr(log.reopen().expect("log file handle"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start inferq worker: {e}"));
        WorkerProcess {
            child,
            consumer: consumer.to_owned(),
            metrics_port,
            log,
            exit: None,
        }
    }

    /// Its consumer name.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its `/metrics` text, or `None` when the listener does not answer.
    pub fn metrics(&self) -> Option<String> {
        use std::io::{Read, Write};
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.metrics_port));
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        (head.split_whitespace().nth(1) == Some("200")).then(|| body.to_owned())
    }

    /// Its log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// Sends a signal (`-STOP`, `-CONT`, `-TERM`, `-KILL`).
    pub fn signal(&self, sig: &str) {
        let status = std::process::Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {sig} {} failed", self.pid());
    }

    /// A signal ready to go: a shell already waits to send it, so [`Armed::fire`]
    /// delivers it within a fraction of a millisecond (spawning `kill` takes several).
    pub fn arm(&self, sig: &str) -> Armed {
        let child = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("read _ && exec kill {sig} {}", self.pid()))
            .stdin(Stdio::piped())
            .spawn()
            .expect("spawn sh");
        Armed(child)
    }

    /// SIGSTOP: frozen with its connections open, as a paused VM or a long GC looks.
    pub fn stop(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT.
    pub fn cont(&self) {
        self.signal("-CONT");
    }

    /// SIGTERM: the orderly shutdown request.
    pub fn term(&self) {
        self.signal("-TERM");
    }

    /// SIGKILL, then reaps it: a crash with nothing flushed.
    pub fn kill(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            self.exit = self.child.wait().ok();
        }
    }

    /// Waits at most `timeout` for it to exit; its status, or `None` if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while self.exit.is_none() {
            self.exit = self.child.try_wait().expect("try_wait");
            if self.exit.is_some() || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.exit
    }
}

/// A signal about to be sent; see [`WorkerProcess::arm`].
#[derive(Debug)]
pub struct Armed(Child);

impl Armed {
    /// Sends the signal and waits for `kill` to finish.
    pub fn fire(mut self) {
        use std::io::Write;
        let mut stdin = self.0.stdin.take().expect("piped stdin");
        stdin.write_all(b"go\n").expect("arm the signal");
        drop(stdin);
        let status = self.0.wait().expect("kill ran");
        assert!(status.success(), "kill failed: {status}");
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
