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

/// Stops the child on drop, so a failed assertion leaves no `inferq serve` running:
/// SIGTERM first (serve stops its redis-server, which a SIGKILL would orphan), SIGKILL
/// after 10 s.
struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &self.0.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
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

/// `inferq serve` on free loopback ports with its stderr in `stderr`; returns it, its
/// listen address and its metrics address.
fn spawn_serve(
    registry: &Path,
    data_dir: &Path,
    stderr: &tempfile::NamedTempFile,
) -> (Serve, String, String) {
    let listen = format!("127.0.0.1:{}", free_port());
    let metrics = format!("127.0.0.1:{}", free_port());
    let child = inferq_command()
        .arg("serve")
        .arg("--models")
        .arg(registry)
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--listen", &listen, "--metrics-listen", &metrics])
        .stdout(Stdio::piped())
        .stderr(stderr.reopen().expect("log handle"))
        .spawn()
        .expect("start inferq serve");
    (Serve(child), listen, metrics)
}

/// The child's exit status once it exits; `None` if it still runs after `timeout`.
async fn wait_exit(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return Some(s);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends SIGTERM (a clean stop: serve stops its redis-server too).
fn sigterm(child: &Child) {
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(kill.success());
}

/// Waits for the line of the banner that says where `serve` listens.
fn wait_banner(out: &mpsc::Receiver<String>, log: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match out.recv_timeout(left) {
            Ok(line) if line.starts_with("inferq serving on") => return,
            Ok(_) => {}
            Err(e) => panic!("no banner within 60 s ({e}); stderr:\n{}", log()),
        }
    }
}

/// A fresh data directory under /tmp (a unix socket path must stay short), and its
/// canonical path.
fn data_dir() -> (tempfile::TempDir, std::path::PathBuf) {
    let data = tempfile::Builder::new()
        .prefix("inferq-serve-")
        .tempdir_in("/tmp")
        .expect("data dir");
    let path = data.path().canonicalize().expect("canonical data dir");
    (data, path)
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
    let (_data, data_dir) = data_dir();
    let stderr = tempfile::NamedTempFile::new().expect("log file");
    let (mut serve, listen, metrics) = spawn_serve(registry.path(), &data_dir, &stderr);
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
    sigterm(&serve.0);
    let status = wait_exit(&mut serve.0, Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("serve still running 30 s after SIGTERM:\n{}", log()));
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_serve_on_the_same_data_directory_refuses_to_start() {
    let registry = TempRegistry::empty();
    add_model(registry.path());
    let (_data, data_dir) = data_dir();
    let first_err = tempfile::NamedTempFile::new().expect("log file");
    let (mut first, listen, _) = spawn_serve(registry.path(), &data_dir, &first_err);
    let first_log = || std::fs::read_to_string(first_err.path()).unwrap_or_default();
    let out = lines(&mut first.0);
    wait_banner(&out, first_log);

    // Another serve, other ports, the same directory: it exits with a reason.
    let second_err = tempfile::NamedTempFile::new().expect("log file");
    let (mut second, _, _) = spawn_serve(registry.path(), &data_dir, &second_err);
    let status = wait_exit(&mut second.0, Duration::from_secs(30)).await;
    let second_log = std::fs::read_to_string(second_err.path()).unwrap_or_default();
    let status = status.unwrap_or_else(|| {
        panic!("a second serve on the same data directory still runs after 30 s:\n{second_log}")
    });
    assert!(!status.success(), "{status}; stderr:\n{second_log}");
    let pid = first.0.id().to_string();
    assert!(
        second_log.contains("another `inferq serve`")
            && second_log.contains(&*data_dir.to_string_lossy())
            && second_log.contains(&pid),
        "the refusal names the directory and the serve holding it (pid {pid}):\n{second_log}"
    );

    // The first one is untouched: its Redis socket is there and it serves.
    assert!(data_dir.join("redis.sock").exists(), "the socket is kept");
    let api = Client::new(listen.parse().expect("addr"));
    api.get("/v2/health/ready").await.expect(200);
    let r = Reference::load("tutorial-rf");
    api.post(
        "/v2/models/tutorial-rf/infer",
        common::http::infer_body(&r.input_rows(0..1), serde_json::json!({})),
    )
    .await
    .expect(200);
    assert!(
        first.0.try_wait().expect("try_wait").is_none(),
        "{}",
        first_log()
    );
    sigterm(&first.0);
    let status = wait_exit(&mut first.0, Duration::from_secs(30)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        first_log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_a_data_directory_whose_redis_still_runs() {
    let registry = TempRegistry::empty();
    let (_data, data_dir) = data_dir();
    let socket = data_dir.join("redis.sock");
    // What a SIGKILLed serve leaves behind: its redis-server, still on the socket.
    let mut orphan = std::process::Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--save",
            "",
            "--appendonly",
            "no",
            "--unixsocket",
        ])
        .arg(&socket)
        .stdout(Stdio::null())
        .spawn()
        .expect("start redis-server");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "redis-server never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    let stderr = tempfile::NamedTempFile::new().expect("log file");
    let (mut serve, _, _) = spawn_serve(registry.path(), &data_dir, &stderr);
    let status = wait_exit(&mut serve.0, Duration::from_secs(30)).await;
    let log = std::fs::read_to_string(stderr.path()).unwrap_or_default();
    let _ = orphan.kill();
    let _ = orphan.wait();
    let status = status.unwrap_or_else(|| panic!("serve still runs after 30 s:\n{log}"));
    assert!(!status.success(), "{status}; stderr:\n{log}");
    assert!(
        log.contains("a redis-server still listens on") && log.contains(&*socket.to_string_lossy()),
        "{log}"
    );
}
