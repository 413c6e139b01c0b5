//! The native stack (`scripts/stack.sh`): Redis with AOF, one gateway, two workers and
//! Prometheus as separate processes on loopback. 5,000 jobs go through the gateway's
//! HTTP API while one worker is SIGKILLed mid-load; every job must end `succeeded` with
//! the outputs ONNX Runtime gave in Python (the reference file), the consumer group must
//! end with nothing pending, and `down` must leave no process behind.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::http::{Client, free_port};
use common::{Reference, ort_lib, repo_root, run};
use inferq::protocol::TensorData;
use serde_json::Value;

const JOBS: usize = 5_000;
const CONCURRENCY: usize = 32;
/// Submissions done when worker-1 is killed.
const KILL_AFTER: usize = 1_500;
const MODEL: &str = "tutorial-rf";

/// A stack in a temporary directory, taken `down` on drop (also when the test fails).
struct Stack {
    dir: tempfile::TempDir,
    gateway: String,
    metrics_base: u16,
    prometheus: String,
    models: tempfile::TempDir,
}

impl Stack {
    fn command(&self, action: &str) -> Command {
        let mut cmd = Command::new("bash");
        cmd.arg(repo_root().join("scripts/stack.sh")).arg(action);
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if k.starts_with("INFERQ_") || k.starts_with("STACK_") {
                cmd.env_remove(key);
            }
        }
        cmd.env("STACK_DIR", self.dir.path())
            .env("STACK_BIN", env!("CARGO_BIN_EXE_inferq"))
            .env("STACK_GATEWAY_ADDR", &self.gateway)
            .env("STACK_METRICS_PORT", self.metrics_base.to_string())
            .env("STACK_PROMETHEUS_ADDR", &self.prometheus)
            .env("STACK_MODELS_DIR", self.models.path())
            .env("ORT_DYLIB_PATH", ort_lib())
            // A killed worker's jobs are reclaimed after 1 s instead of 30.
            .env("INFERQ_CLAIM_AFTER_MS", "1000")
            .env("INFERQ_DRAIN_TIMEOUT_MS", "5000")
            .env("RUST_LOG", "warn");
        cmd
    }

    /// Runs `stack.sh <action>`; returns its output, failing the test if it fails.
    fn run(&self, action: &str) -> String {
        let out = run(&mut self.command(action));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "stack.sh {action} failed:\n{text}\n{}",
            self.logs()
        );
        text
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn pid(&self, name: &str) -> u32 {
        std::fs::read_to_string(self.path(&format!("{name}.pid")))
            .unwrap_or_else(|e| panic!("{name}.pid: {e}"))
            .trim()
            .parse()
            .expect("a pid")
    }

    /// The end of every log, for failure messages.
    fn logs(&self) -> String {
        let mut s = String::new();
        for name in [
            "redis",
            "gateway",
            "worker-1",
            "worker-2",
            "prometheus",
            "models",
        ] {
            let text =
                std::fs::read_to_string(self.path(&format!("{name}.log"))).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            s.push_str(&format!("--- {name}.log (end)\n"));
            for l in tail.into_iter().rev() {
                s.push_str(l);
                s.push('\n');
            }
        }
        s
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = self.command("down").output();
    }
}

/// A port `p` such that `p`, `p + 1` and `p + 2` were all free a moment ago.
fn free_port_run() -> u16 {
    for _ in 0..100 {
        let base = free_port();
        if base < 65_000
            && (1..3).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok())
        {
            return base;
        }
    }
    panic!("no three consecutive free ports");
}

/// True while `pid` is a process that has not exited. A zombie (exited, waiting for a
/// parent that is not us to reap it) counts as gone.
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().next());
        state != Some("Z")
    })
}

/// Processes (not zombies) whose command line mentions `needle`.
fn processes_mentioning(needle: &Path) -> Vec<(u32, String)> {
    let needle = needle.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != std::process::id() && running(pid))
        .filter_map(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            cmd.contains(&needle).then_some((pid, cmd))
        })
        .collect()
}

/// Entries delivered to `consumer` and not acknowledged (XINFO CONSUMERS).
fn consumer_pending(conn: &mut redis::Connection, consumer: &str) -> i64 {
    let keys = inferq::queue::Keys::new(MODEL);
    let consumers: Vec<std::collections::HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(keys.jobs())
        .arg(inferq::queue::GROUP)
        .query(conn)
        .expect("XINFO CONSUMERS");
    consumers
        .iter()
        .find(|c| {
            c.get("name")
                .and_then(|n| redis::from_redis_value::<String>(n.clone()).ok())
                .as_deref()
                == Some(consumer)
        })
        .and_then(|c| redis::from_redis_value(c.get("pending")?.clone()).ok())
        .unwrap_or(0)
}

#[test]
fn native_stack_survives_a_killed_worker_and_stops_clean() {
    let dir = tempfile::Builder::new()
        .prefix("iq-stack-")
        .tempdir_in("/tmp")
        .expect("temp dir");
    let models = tempfile::tempdir().expect("temp dir");
    std::fs::copy(
        common::model_path(MODEL),
        models.path().join(format!("{MODEL}.onnx")),
    )
    .expect("copy the model");
    let stack = Stack {
        dir,
        gateway: format!("127.0.0.1:{}", free_port()),
        metrics_base: free_port_run(),
        prometheus: format!("127.0.0.1:{}", free_port()),
        models,
    };

    let t0 = Instant::now();
    let up = stack.run("up");
    let up_time = t0.elapsed();
    let status = stack.run("status");
    for name in ["redis", "gateway", "worker-1", "worker-2", "prometheus"] {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("status has no {name}:\n{status}\n{up}"));
        assert!(line.contains("running") && line.contains("ready"), "{line}");
    }

    let reference = Reference::load(MODEL);
    let rows = reference.rows();
    let inputs = Arc::new(reference.inputs.clone());
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let gateway: std::net::SocketAddr = stack.gateway.parse().expect("address");
    let client = Client::new(gateway);

    // ---- submit 5,000 jobs, 32 at a time; kill worker-1 after 1,500
    let submitted = Arc::new(AtomicUsize::new(0));
    let next = Arc::new(AtomicUsize::new(0));
    let worker1 = stack.pid("worker-1");
    let t_load = Instant::now();
    let (killed_at, orphaned) = rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..CONCURRENCY {
            let (client, next, submitted, inputs) = (
                client.clone(),
                next.clone(),
                submitted.clone(),
                inputs.clone(),
            );
            tasks.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= JOBS {
                        return;
                    }
                    let row = common::rows(&inputs[0], i % rows..i % rows + 1);
                    let TensorData::Fp32(values) = &row.data else {
                        panic!("tutorial-rf takes FP32")
                    };
                    let features: Vec<f64> = values.iter().map(|&x| f64::from(x)).collect();
                    let body =
                        serde_json::json!({ "id": format!("stack-{i}"), "features": [features] });
                    let r = client
                        .post(&format!("/v1/models/{MODEL}/jobs"), body.to_string())
                        .await;
                    r.expect(202);
                    assert_eq!(r.json()["id"], format!("stack-{i}"));
                    submitted.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        // The kill, from the side, once 1,500 jobs are in: freeze worker-1 (SIGSTOP) and
        // look at its pending entries; with some delivered and not acknowledged, SIGKILL
        // it (those jobs can only finish through another worker's reclaim), else let it
        // run a moment and look again.
        let killer = {
            let (submitted, sock) = (submitted.clone(), stack.path("redis.sock"));
            tokio::task::spawn_blocking(move || {
                while submitted.load(Ordering::Relaxed) < KILL_AFTER {
                    std::thread::sleep(Duration::from_millis(2));
                }
                let mut conn = redis::Client::open(format!("redis+unix://{}", sock.display()))
                    .and_then(|c| c.get_connection())
                    .expect("connect to the stack's Redis");
                let signal = |sig: &str| {
                    let ok = Command::new("kill")
                        .args([sig, &worker1.to_string()])
                        .status()
                        .expect("run kill")
                        .success();
                    assert!(ok, "kill {sig} {worker1}");
                };
                for _ in 0..1000 {
                    signal("-STOP");
                    let pending = consumer_pending(&mut conn, "stack-worker-1");
                    if pending > 0 {
                        signal("-KILL");
                        return (submitted.load(Ordering::Relaxed), pending);
                    }
                    signal("-CONT");
                    std::thread::sleep(Duration::from_millis(3));
                }
                panic!("worker-1 never had a job in hand");
            })
        };
        for t in tasks {
            t.await.expect("a submit task panicked");
        }
        killer.await.expect("the killer panicked")
    });
    let submit_time = t_load.elapsed();
    assert_eq!(submitted.load(Ordering::Relaxed), JOBS);
    assert!(
        killed_at < JOBS,
        "worker-1 was killed only after the load ({killed_at})"
    );
    assert!(orphaned > 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    while running(worker1) {
        assert!(Instant::now() < deadline, "worker-1 survived SIGKILL");
        std::thread::sleep(Duration::from_millis(10));
    }

    // ---- collect every result (long-polls, 32 at a time) and check it
    let expected_label = match &reference.outputs[0].data {
        TensorData::Int64(v) => v.clone(),
        other => panic!("label is {other:?}"),
    };
    let expected_proba = match &reference.outputs[1].data {
        TensorData::Fp32(v) => v.clone(),
        other => panic!("probabilities are {other:?}"),
    };
    let (expected_label, expected_proba) = (Arc::new(expected_label), Arc::new(expected_proba));
    let next = Arc::new(AtomicUsize::new(0));
    let checked = rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..CONCURRENCY {
            let (client, next) = (client.clone(), next.clone());
            let (labels, probas) = (expected_label.clone(), expected_proba.clone());
            tasks.push(tokio::spawn(async move {
                let mut n = 0usize;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= JOBS {
                        return n;
                    }
                    let path = format!("/v1/models/{MODEL}/jobs/stack-{i}");
                    let deadline = Instant::now() + Duration::from_secs(60);
                    let v: Value = loop {
                        let r = client.get(&format!("{path}?wait=20")).await;
                        r.expect(200);
                        let v = r.json();
                        if v["status"] != "queued" && v["status"] != "running" {
                            break v;
                        }
                        assert!(
                            Instant::now() < deadline,
                            "stack-{i} not done after 60 s: {v}"
                        );
                    };
                    assert_eq!(v["status"], "succeeded", "stack-{i}: {v}");
                    assert_eq!(v["id"], format!("stack-{i}"));
                    let outputs = common::http::response_outputs(&v["outputs"]);
                    let row = i % rows;
                    let TensorData::Int64(label) = &outputs[0].data else {
                        panic!("stack-{i}: label is not INT64: {v}")
                    };
                    assert_eq!(outputs[0].name, "label");
                    assert_eq!(
                        label.as_slice(),
                        &[labels[row]],
                        "stack-{i}: label of row {row}"
                    );
                    let TensorData::Fp32(p) = &outputs[1].data else {
                        panic!("stack-{i}: probabilities are not FP32: {v}")
                    };
                    for (k, (a, e)) in p.iter().zip(&probas[row * 2..row * 2 + 2]).enumerate() {
                        assert!(
                            common::close(f64::from(*a), f64::from(*e)),
                            "stack-{i}: probability {k} is {a}, expected {e}"
                        );
                    }
                    n += 1;
                }
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.expect("a result task panicked");
        }
        total
    });
    let total_time = t_load.elapsed();
    assert_eq!(checked, JOBS, "exactly {JOBS} correct results");

    // ---- Redis: nothing left pending; one stream entry per job (no duplicate XADD)
    let client = redis::Client::open(format!(
        "redis+unix://{}",
        stack.path("redis.sock").display()
    ))
    .expect("redis url");
    let mut conn = client
        .get_connection()
        .expect("connect to the stack's Redis");
    // The stack's Redis has a limit, so noeviction acts (STACK_REDIS_MAXMEMORY, 1gb).
    assert_eq!(common::maxmemory(&mut conn), 1 << 30);
    let keys = inferq::queue::Keys::new(MODEL);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let reply = redis::cmd("XPENDING")
            .arg(keys.jobs())
            .arg(inferq::queue::GROUP)
            .query::<redis::Value>(&mut conn)
            .expect("XPENDING");
        let pending: i64 = match &reply {
            redis::Value::Array(v) => redis::from_redis_value(v[0].clone()).expect("count"),
            other => panic!("XPENDING {other:?}"),
        };
        if pending == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "still pending: {reply:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        consumer_pending(&mut conn, "stack-worker-1"),
        0,
        "worker-1's jobs were reclaimed"
    );
    let records: i64 = (0..JOBS)
        .map(|i| {
            redis::cmd("EXISTS")
                .arg(keys.result(&format!("stack-{i}")))
                .query::<i64>(&mut conn)
                .expect("EXISTS")
        })
        .sum();
    assert_eq!(records, JOBS as i64, "one record per job");
    let aof: String = redis::cmd("CONFIG")
        .arg("GET")
        .arg("appendfsync")
        .query::<Vec<String>>(&mut conn)
        .expect("CONFIG GET")
        .join("=");
    assert_eq!(aof, "appendfsync=always");
    drop(conn);

    // ---- Prometheus scrapes itself, the gateway and both workers (worker-1 is down now)
    let prom: std::net::SocketAddr = stack.prometheus.parse().expect("address");
    let targets = rt.block_on(async {
        let c = Client::new(prom);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let v = c.get("/api/v1/targets").await.json();
            let active = v["data"]["activeTargets"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let up = active.iter().filter(|t| t["health"] == "up").count();
            if active.len() == 4 && up >= 3 {
                return active;
            }
            assert!(Instant::now() < deadline, "Prometheus targets: {v}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    let jobs: std::collections::BTreeSet<&str> = targets
        .iter()
        .filter_map(|t| t["labels"]["job"].as_str())
        .collect();
    assert_eq!(
        jobs,
        std::collections::BTreeSet::from(["inferq-gateway", "inferq-worker", "prometheus"])
    );

    let status = stack.run("status");
    let w1 = status
        .lines()
        .find(|l| l.starts_with("worker-1"))
        .expect("worker-1 line");
    assert!(w1.contains("dead"), "{status}");

    // ---- down: every process goes, nothing mentioning the stack directory is left
    let pids: Vec<(String, u32)> = ["redis", "gateway", "worker-1", "worker-2", "prometheus"]
        .iter()
        .map(|n| ((*n).to_owned(), stack.pid(n)))
        .collect();
    let t_down = Instant::now();
    let down = stack.run("down");
    let down_time = t_down.elapsed();
    for (name, pid) in &pids {
        assert!(
            !running(*pid),
            "{name} (pid {pid}) still runs after down:\n{down}"
        );
        assert!(
            !stack.path(&format!("{name}.pid")).exists(),
            "{name}.pid left behind"
        );
    }
    let left = processes_mentioning(stack.dir.path());
    assert!(left.is_empty(), "processes left behind: {left:?}");
    let again = stack.run("status");
    assert!(again.contains("nothing running"), "{again}");

    eprintln!(
        "native stack: up {up_time:.1?}; {JOBS} jobs submitted in {submit_time:.1?} \
         (worker-1 SIGKILLed after {killed_at}, holding {orphaned}); all results after \
         {total_time:.1?}; \
         down {down_time:.1?}"
    );
}
