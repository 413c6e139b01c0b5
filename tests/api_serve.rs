//! `inferq serve` as a user first runs it: no Redis configured (it starts a private
//! redis-server in its data directory), a registry holding tutorial-rf. It prints a
//! curl example that works, answers /metrics on the metrics port, and on SIGTERM
//! exits 0 leaving no redis-server behind.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::http::{Client, free_port};
use common::{Reference, TempRegistry, inferq_command, model_path, run_ok};

/// Kills the child on drop, so a failed assertion leaves no `inferq serve` running.
struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Running processes (pid, command line) whose command line mentions `dir` or whose
/// working directory is `dir` (redis-server `chdir`s into its `--dir`, and may
/// rewrite its process title).
fn processes_using(dir: &Path) -> Vec<(u32, String)> {
    let needle = dir.to_string_lossy();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc") {
        let entry = entry.expect("proc entry");
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let cwd = std::fs::read_link(entry.path().join("cwd")).ok();
        if cmdline.contains(&*needle) || cwd.as_deref() == Some(dir) {
            found.push((pid, cmdline));
        }
    }
    found
}

/// Reads stdout lines in a thread; returns the receiver.
fn lines(child: &mut Child) -> mpsc::Receiver<String> {
    let out = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn add_model(registry: &Path) {
    let file = model_path("tutorial-rf");
    run_ok(
        inferq_command()
            .arg("--models")
            .arg(registry)
            .args(["models", "add"])
            .arg(file)
            .args(["--name", "tutorial-rf"]),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_without_redis_prints_a_working_curl_and_stops_cleanly() {
    let registry = TempRegistry::empty();
    add_model(registry.path());
    let data = tempfile::Builder::new()
        .prefix("inferq-serve-")
        .tempdir_in("/tmp")
        .expect("data dir");
    let data_dir = data.path().canonicalize().expect("canonical data dir");
    let (port, metrics_port) = (free_port(), free_port());
    let listen = format!("127.0.0.1:{port}");
    let metrics = format!("127.0.0.1:{metrics_port}");
    let stderr = tempfile::NamedTempFile::new().expect("log file");
    let mut serve = Serve(
        inferq_command()
            .arg("serve")
            .arg("--models")
            .arg(registry.path())
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--listen", &listen, "--metrics-listen", &metrics])
            .stdout(Stdio::piped())
            .stderr(stderr.reopen().expect("log handle"))
            .spawn()
            .expect("start inferq serve"),
    );
    let log = || std::fs::read_to_string(stderr.path()).unwrap_or_default();
    let out = lines(&mut serve.0);

    // The banner: where it listens, then `try:` and the curl command.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut printed = Vec::new();
    let curl = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match out.recv_timeout(left) {
            Ok(line) => {
                printed.push(line.clone());
                if let Some(cmd) = line.trim().strip_prefix("curl ") {
                    break format!("curl {cmd}");
                }
            }
            Err(e) => panic!(
                "no curl example within 60 s ({e}); stdout {printed:?}\nstderr:\n{}",
                log()
            ),
        }
    };
    let banner = printed.join("\n");
    assert!(banner.contains(&format!("http://{listen}")), "{banner}");
    assert!(
        banner.contains(&format!("http://{metrics}/metrics")),
        "{banner}"
    );
    assert!(
        curl.contains(&format!("http://{listen}/v2/models/tutorial-rf/infer")),
        "{curl}"
    );
    let serve_pid = serve.0.id();
    let redis: Vec<_> = processes_using(&data_dir)
        .into_iter()
        .filter(|(pid, cmd)| *pid != serve_pid && cmd.contains("redis-server"))
        .collect();
    assert_eq!(
        redis.len(),
        1,
        "one private redis-server in {}: {redis:?}",
        data_dir.display()
    );

    // The private Redis has a memory limit (the default of INFERQ_EMBEDDED_MAXMEMORY_MB),
    // so its noeviction policy acts, and serve does not warn about it.
    let mut embedded = redis::Client::open(format!(
        "redis+unix://{}",
        data_dir.join("redis.sock").display()
    ))
    .expect("socket URL")
    .get_connection()
    .expect("connect to the private redis-server");
    assert_eq!(common::maxmemory(&mut embedded), 1024 << 20);
    assert!(!log().contains("maxmemory is 0"), "{}", log());

    // The printed command, as a user pastes it.
    let sh = std::process::Command::new("sh")
        .arg("-c")
        .arg(&curl)
        .output()
        .expect("run sh -c curl");
    assert!(sh.status.success(), "{curl} failed: {sh:?}");
    let v: serde_json::Value = serde_json::from_slice(&sh.stdout).unwrap_or_else(|e| {
        panic!(
            "{curl} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&sh.stdout)
        )
    });
    assert_eq!(v["model_name"], "tutorial-rf", "{v}");
    let outputs = v["outputs"].as_array().expect("outputs");
    let names: Vec<_> = outputs
        .iter()
        .map(|o| o["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["label", "probabilities"], "{v}");
    assert_eq!(outputs[1]["shape"], serde_json::json!([1, 2]), "{v}");
    let p: Vec<f64> = outputs[1]["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect();
    assert!(
        (p[0] + p[1] - 1.0).abs() < 1e-5,
        "probabilities sum to 1: {p:?}"
    );

    // The same server computes a reference row exactly as the runtime does.
    let r = Reference::load("tutorial-rf");
    let api = Client::new(listen.parse().expect("addr"));
    let resp = api
        .post(
            "/v2/models/tutorial-rf/infer",
            common::http::infer_body(&r.input_rows(0..4), serde_json::json!({})),
        )
        .await;
    resp.expect(200);
    common::assert_outputs(
        &common::http::response_outputs(&resp.json()),
        &r.output_rows(0..4),
        "serve",
    );

    // /metrics and health on the metrics port; metrics are not on the public one's 404 path.
    let ops = Client::new(metrics.parse().expect("addr"));
    let m = ops.get("/metrics").await;
    m.expect(200);
    assert!(
        m.header("content-type")
            .is_some_and(|t| t.starts_with("text/plain"))
    );
    let text = m.text();
    assert!(
        text.contains("inferq_jobs_submitted_total{model=\"tutorial-rf\"}"),
        "{text}"
    );
    ops.get("/v2/health/ready").await.expect(200);
    ops.get("/v1/stats").await.expect_error(404, "not_found");

    // SIGTERM: exit 0, and the private redis-server is gone.
    let pid = serve.0.id().to_string();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(kill.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = serve.0.try_wait().expect("try_wait") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "serve still running 30 s after SIGTERM:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        status.code(),
        Some(0),
        "serve exit status; stderr:\n{}",
        log()
    );
    let left = processes_using(&data_dir);
    assert!(
        left.is_empty(),
        "processes still using {}: {left:?}",
        data_dir.display()
    );
    assert!(
        !data_dir.join("redis.sock").exists(),
        "the socket is removed"
    );
    assert!(
        data_dir.join("appendonlydir").is_dir(),
        "redis kept its append-only file there"
    );
}
