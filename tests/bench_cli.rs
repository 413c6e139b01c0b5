//! `inferq bench` against a live worker: a private `redis-server`, a temporary registry
//! with `tutorial-rf` and an in-process worker, then the binary as a direct producer.
//! Every answer must come back, once, with the reference outputs; the drain-mode pair
//! (`--fill`, then `--drain-wait`) must count every job it enqueued.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;

use common::queue::{start_worker, worker_config};
use common::{RedisServer, TempRegistry, inferq_command, repo_root, run_ok};

const MODEL: &str = "tutorial-rf";

fn reference() -> String {
    repo_root()
        .join("testdata/models/tutorial-rf.reference.json")
        .to_string_lossy()
        .into_owned()
}

/// Runs `inferq --redis-url URL bench MODEL <args>` off the async threads (the worker
/// under test runs on them) and returns its stdout as JSON.
async fn bench(redis: &RedisServer, args: &[&str]) -> serde_json::Value {
    let mut cmd = inferq_command();
    cmd.args(["--redis-url", &redis.url(), "bench", MODEL])
        .args(args);
    let out = tokio::task::spawn_blocking(move || run_ok(&mut cmd))
        .await
        .expect("bench thread");
    serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("bench printed non-JSON ({e}):\n{out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_through_redis_answers_every_job_correctly() {
    let redis = RedisServer::start();
    let registry = TempRegistry::with_models(&[MODEL]);
    let worker = start_worker(&redis, &registry, worker_config(MODEL, "bench-test")).await;
    let reference = reference();
    let report = bench(
        &redis,
        &[
            "--via",
            "redis",
            "--max-jobs",
            "200",
            "--concurrency",
            "4",
            "--warmup-s",
            "0",
            "--duration-s",
            "60",
            "--reference",
            &reference,
            "--json",
        ],
    )
    .await;
    assert_eq!(report["sent"], 200, "{report}");
    assert_eq!(report["ok"], 200, "{report}");
    assert_eq!(report["errors"], serde_json::json!({}), "{report}");
    assert!(
        report["jobs_per_s"].as_f64().unwrap_or(0.0) > 0.0,
        "{report}"
    );
    let l = &report["latency_ms"];
    assert!(l["p50"].as_f64() <= l["p99"].as_f64() && l["p99"].as_f64() <= l["max"].as_f64());
    assert!(worker.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fill_then_drain_wait_counts_every_job() {
    let redis = RedisServer::start();
    let registry = TempRegistry::with_models(&[MODEL]);
    let reference = reference();
    let filled = bench(
        &redis,
        &["--fill", "300", "--reference", &reference, "--json"],
    )
    .await;
    assert_eq!(filled["jobs"], 300, "{filled}");
    // Drain-wait first; the worker starts once it says it is watching.
    let mut cmd = inferq_command();
    cmd.args(["--redis-url", &redis.url(), "bench", MODEL, "--drain-wait"])
        .args([
            "--pids",
            &std::process::id().to_string(),
            "--duration-s",
            "30",
        ])
        .args(["--reference", &reference, "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn inferq bench --drain-wait");
    let mut cue = BufReader::new(child.stderr.take().expect("piped stderr"));
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        cue.read_line(&mut line).expect("read the cue");
        line
    })
    .await
    .expect("cue thread");
    assert!(line.contains("start the workers"), "{line}");
    let worker = start_worker(&redis, &registry, worker_config(MODEL, "drain-test")).await;
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().expect("wait"))
        .await
        .expect("wait thread");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}: {stdout}", out.status);
    let drained: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON");
    assert_eq!(drained["jobs"], 300, "{drained}");
    assert_eq!(drained["complete"], true, "{drained}");
    assert!(drained["cpu_us_per_job"].as_f64().is_some(), "{drained}");
    assert!(worker.shutdown().await);
}
