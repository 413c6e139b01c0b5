//! The producer examples of docs/PROTOCOL.md against a live worker: a private
//! `redis-server`, a temporary registry with `tutorial-rf`, an in-process worker, then
//! `examples/producer.py` (redis-py, in `.venv`) and `examples/producer.rs` (built with
//! cargo) as separate processes that know only the Redis protocol. Their results must
//! match the reference outputs onnxruntime (Python) computed, and Redis must be left as
//! the protocol promises: records terminal with a TTL, reply lists drained, nothing
//! pending, one `done` message per job.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use common::{RedisServer, Reference, TempRegistry, init_ort, repo_root};
use futures_util::StreamExt;
use inferq::cli::Cli;
use inferq::protocol::TensorData;
use inferq::queue::{Keys, RedisTarget};
use inferq::registry::Registry;
use inferq::worker::Worker;
use redis::AsyncCommands;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

const MODEL: &str = "tutorial-rf";
const RESULT_TTL_S: i64 = 600;

/// A Redis, a registry and a worker serving `tutorial-rf` from them.
struct Stack {
    redis: RedisServer,
    _registry: TempRegistry,
    worker: Worker,
}

impl Stack {
    async fn start() -> Stack {
        init_ort();
        let redis = RedisServer::start();
        let registry = TempRegistry::with_models(&[MODEL]);
        let dir = registry
            .path()
            .to_str()
            .expect("UTF-8 temp path")
            .to_owned();
        let ttl = RESULT_TTL_S.to_string();
        let url = redis.url();
        let cli = Cli::try_parse_from([
            "inferq",
            "--models",
            &dir,
            "--redis-url",
            &url,
            "--result-ttl-s",
            &ttl,
            "--consumer",
            "producers-test",
            "worker",
        ])
        .expect("worker settings");
        cli.settings.validate().expect("valid settings");
        let worker = Worker::start(
            cli.settings.worker(),
            Registry::new(registry.path()),
            RedisTarget::parse(&url).expect("redis url"),
            CancellationToken::new(),
        )
        .await
        .expect("start the worker");
        Stack {
            redis,
            _registry: registry,
            worker,
        }
    }

    async fn conn(&self) -> redis::aio::MultiplexedConnection {
        self.redis
            .client()
            .get_multiplexed_async_connection()
            .await
            .expect("connect to redis")
    }

    /// Subscribes to the model's `done` channel; every id published arrives on the
    /// returned channel.
    async fn subscribe_done(&self) -> tokio::sync::mpsc::UnboundedReceiver<String> {
        let mut pubsub = self
            .redis
            .client()
            .get_async_pubsub()
            .await
            .expect("pubsub connection");
        pubsub
            .subscribe(Keys::new(MODEL).done())
            .await
            .expect("SUBSCRIBE");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut messages = pubsub.on_message();
            while let Some(m) = messages.next().await {
                if tx
                    .send(m.get_payload::<String>().expect("a job id"))
                    .is_err()
                {
                    break;
                }
            }
        });
        rx
    }

    /// Asserts the protocol's promises for finished jobs: terminal records with a TTL,
    /// nothing pending, the reply lists drained.
    async fn assert_clean(&self, ids: &[String]) {
        let keys = Keys::new(MODEL);
        let mut conn = self.conn().await;
        for id in ids {
            let record: String = conn.get(keys.result(id)).await.expect("GET");
            let record: serde_json::Value = serde_json::from_str(&record).expect("JSON record");
            assert_eq!(record["status"], "succeeded", "record of {id}");
            let ttl: i64 = conn.ttl(keys.result(id)).await.expect("TTL");
            assert!(
                (1..=RESULT_TTL_S).contains(&ttl),
                "record of {id}: TTL {ttl}, expected result_ttl ({RESULT_TTL_S} s) after it turned terminal"
            );
        }
        let pending: redis::Value = redis::cmd("XPENDING")
            .arg(keys.jobs())
            .arg(inferq::queue::GROUP)
            .query_async(&mut conn)
            .await
            .expect("XPENDING");
        let redis::Value::Array(summary) = pending else {
            panic!("XPENDING answered {pending:?}")
        };
        assert_eq!(
            summary.first(),
            Some(&redis::Value::Int(0)),
            "pending entries"
        );
        // Not checked: the inflight index is empty. It should be, but a `running` mark
        // that lands after the terminal write re-indexes the entry (docs/PROTOCOL.md,
        // known deviations), which makes such a check flaky. Shown for diagnosis.
        let inflight: i64 = conn.hlen(keys.inflight()).await.expect("HLEN");
        if inflight > 0 {
            eprintln!("note: {inflight} inflight index entries left after all jobs finished");
        }
        let replies: Vec<String> = conn
            .keys(format!("{}*", keys.reply_prefix()))
            .await
            .expect("KEYS");
        assert!(replies.is_empty(), "reply lists left behind: {replies:?}");
    }

    async fn stop(self) {
        assert!(self.worker.shutdown().await, "the worker drained in time");
    }
}

/// One result line of a producer: `{"row": r, "record": {...}, ...}`.
#[derive(Debug)]
struct Line {
    row: usize,
    id: String,
    labels: Vec<i64>,
    probabilities: Vec<f64>,
}

/// Parses a producer's stdout and checks every record against the reference.
fn check_results(stdout: &str, expected_jobs: usize, what: &str) -> Vec<String> {
    let reference = Reference::load(MODEL);
    let (TensorData::Int64(labels), TensorData::Fp32(probs)) =
        (&reference.outputs[0].data, &reference.outputs[1].data)
    else {
        panic!("tutorial-rf reference: expected INT64 labels and FP32 probabilities");
    };
    let lines: Vec<Line> = stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| parse_line(l, what))
        .collect();
    assert_eq!(
        lines.len(),
        expected_jobs,
        "{what}: result lines:\n{stdout}"
    );
    for line in &lines {
        let ctx = format!("{what}: job {} (row {})", line.id, line.row);
        assert_eq!(line.labels, vec![labels[line.row]], "{ctx}: label");
        let want = &probs[line.row * 2..line.row * 2 + 2];
        assert_eq!(line.probabilities.len(), 2, "{ctx}: probabilities");
        for (got, want) in line.probabilities.iter().zip(want) {
            assert!(
                (got - f64::from(*want)).abs() <= 1e-5,
                "{ctx}: probability {got}, expected {want}"
            );
        }
    }
    let mut ids: Vec<String> = lines.into_iter().map(|l| l.id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), expected_jobs, "{what}: job ids are unique");
    ids
}

fn parse_line(line: &str, what: &str) -> Line {
    let v: serde_json::Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("{what}: `{line}`: {e}"));
    let record = &v["record"];
    let id = record["id"].as_str().expect("record id").to_owned();
    assert_eq!(record["status"], "succeeded", "{what}: {line}");
    assert_eq!(record["model"], MODEL, "{what}: {line}");
    assert_eq!(record["version"], 1, "{what}: {line}");
    assert_eq!(record["attempts"], 1, "{what}: {line}");
    for stamp in ["enqueued_ms", "started_ms", "finished_ms"] {
        assert!(
            record[stamp].as_u64().is_some(),
            "{what}: no {stamp}: {line}"
        );
    }
    let response = &record["outputs"];
    assert_eq!(response["model_name"], MODEL, "{what}: {line}");
    assert_eq!(response["model_version"], "1", "{what}: {line}");
    assert_eq!(response["id"], id.as_str(), "{what}: {line}");
    let outputs = response["outputs"].as_array().expect("outputs array");
    let names: Vec<&str> = outputs
        .iter()
        .map(|o| o["name"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(names, ["label", "probabilities"], "{what}: {line}");
    assert_eq!(outputs[0]["datatype"], "INT64");
    assert_eq!(outputs[0]["shape"], serde_json::json!([1]));
    assert_eq!(outputs[1]["datatype"], "FP32");
    assert_eq!(outputs[1]["shape"], serde_json::json!([1, 2]));
    let numbers = |o: &serde_json::Value| -> Vec<serde_json::Value> {
        o["data"].as_array().expect("data array").clone()
    };
    Line {
        row: v["row"].as_u64().expect("row") as usize,
        labels: numbers(&outputs[0])
            .iter()
            .map(|x| x.as_i64().expect("integer label"))
            .collect(),
        probabilities: numbers(&outputs[1])
            .iter()
            .map(|x| x.as_f64().expect("float probability"))
            .collect(),
        id,
    }
}

/// Runs a producer to its end, killing it after `limit`; panics unless it exits 0.
async fn run_producer(mut cmd: Command, limit: Duration, what: &str) -> String {
    cmd.current_dir(repo_root())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let started = Instant::now();
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot start {cmd:?}: {e}"));
    let out: Output = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{what}: still running after {limit:?}"))
        .expect("wait for the producer");
    let stdout = String::from_utf8(out.stdout).expect("UTF-8 stdout");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    eprintln!("{what}: {:?}\n{stderr}", started.elapsed());
    stdout
}

/// The project's Python with redis-py.
fn python() -> PathBuf {
    let p = repo_root().join(".venv/bin/python");
    assert!(
        p.is_file(),
        "{} is missing: run scripts/setup.sh",
        p.display()
    );
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_producer_gets_every_result() {
    let stack = Stack::start().await;
    let mut done = stack.subscribe_done().await;

    // 40 jobs: every reference row, some twice, in full OIP v2 requests.
    let mut cmd = Command::new(python());
    cmd.arg("examples/producer.py")
        .args(["--redis-url", &stack.redis.url()])
        .args(["--model", MODEL, "--count", "40", "--timeout", "60"]);
    let stdout = run_producer(cmd, Duration::from_secs(90), "producer.py").await;
    let mut ids = check_results(&stdout, 40, "producer.py");

    // The `features` shorthand.
    let mut cmd = Command::new(python());
    cmd.arg("examples/producer.py")
        .args(["--redis-url", &stack.redis.url()])
        .args([
            "--model",
            MODEL,
            "--count",
            "5",
            "--timeout",
            "60",
            "--shorthand",
        ]);
    let stdout = run_producer(cmd, Duration::from_secs(90), "producer.py --shorthand").await;
    ids.extend(check_results(&stdout, 5, "producer.py --shorthand"));

    stack.assert_clean(&ids).await;

    // One PUBLISH per batch, of the ids that turned terminal (space separated): all of
    // them are in by the time the replies were read (same script); wait a little longer
    // for any duplicate.
    let mut published: Vec<String> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while published.len() < ids.len() {
        match tokio::time::timeout_at(deadline, done.recv()).await {
            Ok(Some(msg)) => published.extend(msg.split(' ').map(str::to_owned)),
            _ => break,
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    while let Ok(msg) = done.try_recv() {
        published.extend(msg.split(' ').map(str::to_owned));
    }
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for id in &published {
        *counts.entry(id.as_str()).or_default() += 1;
    }
    for id in &ids {
        assert_eq!(
            counts.get(id.as_str()),
            Some(&1),
            "`done` must carry each job id exactly once; got {published:?}"
        );
    }
    assert_eq!(published.len(), ids.len(), "`done` messages: {published:?}");
    stack.stop().await;
}

/// Builds `examples/producer.rs` (a no-op when it is up to date) and returns its path.
async fn build_rust_producer() -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(repo_root())
        .args([
            "build",
            "--example",
            "producer",
            "--message-format=json-render-diagnostics",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // Generous: another cargo may hold the build lock, or the library may need a rebuild.
    let limit = Duration::from_secs(900);
    let out = tokio::time::timeout(limit, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("cargo build --example producer: still running after {limit:?}"))
        .expect("run cargo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "cargo build --example producer failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|m| {
            m["reason"] == "compiler-artifact"
                && m["target"]["name"] == "producer"
                && m["target"]["kind"] == serde_json::json!(["example"])
        })
        .and_then(|m| m["executable"].as_str().map(PathBuf::from))
        .expect("cargo reported the producer example's executable")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_producer_gets_json_and_binary_results() {
    let started = Instant::now();
    let exe = build_rust_producer().await;
    eprintln!("cargo build --example producer: {:?}", started.elapsed());
    let stack = Stack::start().await;
    let mut cmd = Command::new(exe);
    cmd.args(["--redis-url", &stack.redis.url()])
        .args(["--model", MODEL, "--timeout", "60"]);
    let stdout = run_producer(cmd, Duration::from_secs(90), "producer (rust)").await;
    let ids = check_results(&stdout, 2, "producer (rust)");
    let encodings: Vec<String> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| format!("{}@{}", v["encoding"].as_str().unwrap_or("?"), v["row"]))
        .collect();
    assert!(
        encodings.contains(&"json@0".to_owned()) && encodings.contains(&"bin@1".to_owned()),
        "one JSON job (row 0) and one binary job (row 1): {encodings:?}"
    );
    stack.assert_clean(&ids).await;
    stack.stop().await;
}
