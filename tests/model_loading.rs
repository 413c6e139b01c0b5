//! A large model loading never stalls the worker (issue 12, AUDIT D26): reading and
//! hashing its file run on a blocking thread, and its session is built on its own
//! inference thread, so a worker with one async thread keeps serving another model's
//! jobs the whole time.

mod common;

use std::time::{Duration, Instant};

use common::queue::*;
use common::{RedisOptions, repo_root};
use inferq::registry::NewVersion;

const WAIT: Duration = Duration::from_secs(120);

/// A model of about 100 MB (an unused 25-million-float initializer) whose graph adds 1.
fn big_model(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("big.onnx");
    let script = r#"
import sys, numpy as np, onnx
from onnx import helper as h, TensorProto as T, numpy_helper as nh
x = h.make_tensor_value_info("x", T.FLOAT, ["N", 1])
y = h.make_tensor_value_info("y", T.FLOAT, ["N", 1])
one = nh.from_array(np.ones((1, 1), np.float32), "one")
ballast = nh.from_array(np.zeros(25_000_000, np.float32), "ballast")
g = h.make_graph([h.make_node("Add", ["x", "one"], ["y"])], "big", [x], [y], [one, ballast])
m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
m.ir_version = 8
onnx.save(m, sys.argv[1])
"#;
    let out = std::process::Command::new(repo_root().join(".venv/bin/python"))
        .args(["-c", script])
        .arg(&path)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_one_async_thread_keeps_serving_while_a_large_model_loads() {
    let mut s = Setup::new("tutorial-rf", RedisOptions::default()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let big = unique_big(&s, dir.path());
    let w = s
        .worker_process("w", &[("INFERQ_ASYNC_THREADS", "1")], WAIT)
        .await;
    // The big model's first job makes the worker load it (about 100 MB to read and
    // hash; seconds in a debug build) while tutorial-rf jobs keep coming.
    let started = Instant::now();
    produce(&mut s.conn, &big, "big-1", &[one_row()]).await;
    let mut slowest = Duration::ZERO;
    let mut answered_during = 0;
    let mut i = 0;
    loop {
        let id = format!("rf-{i}");
        let t = Instant::now();
        let row = s.rows(i, 1);
        produce(&mut s.conn, &s.model, &id, &row).await;
        let rec = wait_terminal(&mut s.conn, &s.model, &id, WAIT).await;
        slowest = slowest.max(t.elapsed());
        assert_eq!(
            rec.get("status").map(String::as_str),
            Some("succeeded"),
            "{rec:?}"
        );
        i += 1;
        if is_terminal(&record(&mut s.conn, &big, "big-1").await) {
            break;
        }
        answered_during += 1;
        assert!(
            started.elapsed() < WAIT,
            "the big model never answered:\n{}",
            w.log()
        );
    }
    let load = started.elapsed();
    let rec = record(&mut s.conn, &big, "big-1").await;
    assert_eq!(
        rec.get("status").map(String::as_str),
        Some("succeeded"),
        "{rec:?}"
    );
    eprintln!(
        "{answered_during} tutorial-rf jobs answered during the {load:?} the big model took; the slowest in {slowest:?}"
    );
    // Reading and hashing alone take a good part of the load: had they run on the one
    // async thread, some job would have waited that long.
    assert!(
        load > Duration::from_millis(500),
        "the load was too quick ({load:?}) to show anything"
    );
    assert!(
        slowest < load / 5,
        "a tutorial-rf job waited {slowest:?} during the {load:?} load:\n{}",
        w.log()
    );
}

/// Registers the big model under a name of this test's.
fn unique_big(s: &Setup, dir: &std::path::Path) -> String {
    let name = common::unique_name("big");
    s.registry
        .registry
        .add(
            &big_model(dir),
            &name,
            NewVersion::default(),
            common::inspect,
        )
        .unwrap_or_else(|e| panic!("add the big model: {e}"));
    name
}

fn one_row() -> inferq::protocol::Tensor {
    inferq::protocol::Tensor {
        name: "x".into(),
        shape: vec![1, 1],
        data: inferq::protocol::TensorData::Fp32(vec![41.0]),
    }
}
