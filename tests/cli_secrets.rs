//! Secrets are never printed: every `--help` of every command, with sentinel secrets
//! in the environment, in a config file and in `_FILE` variables, shows none of them;
//! and `INFERQ_REDIS_URL_FILE` / `INFERQ_API_KEYS_FILE` really configure a gateway.

mod common;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use clap::CommandFactory;
use common::http::{Client, free_port};
use common::{RedisServer, inferq_command, run};

const PASSWORD: &str = "S3NT1NEL-redis-password";
const KEY_A: &str = "S3NT1NEL-key-aaaa";
const KEY_B: &str = "S3NT1NEL-key-bbbb";

/// Every command path of the CLI (`[]`, `["models"]`, `["models", "add"]` …), read
/// from the parser itself so a new subcommand is covered without editing this list.
fn command_paths() -> Vec<Vec<String>> {
    fn walk(cmd: &clap::Command, path: Vec<String>, out: &mut Vec<Vec<String>>) {
        out.push(path.clone());
        for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
            let mut p = path.clone();
            p.push(sub.get_name().to_owned());
            walk(sub, p, out);
        }
    }
    let mut out = Vec::new();
    walk(&inferq::cli::Cli::command(), Vec::new(), &mut out);
    out
}

/// Asserts that no sentinel appears in what `cmd` printed.
fn assert_no_secret(what: &str, printed: &str) {
    for s in ["S3NT1NEL", PASSWORD, KEY_A, KEY_B] {
        assert!(
            !printed.contains(s),
            "{what} printed a secret ({s}):\n{printed}"
        );
    }
}

#[test]
fn no_help_shows_a_secret_from_the_environment_a_config_file_or_a_secret_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("redis://:{PASSWORD}@127.0.0.1:1/0");
    let keys = format!("{KEY_A},{KEY_B}");
    let config = dir.path().join("inferq.toml");
    std::fs::write(
        &config,
        format!("redis_url = \"{url}\"\napi_keys = [\"{KEY_A}\", \"{KEY_B}\"]\n"),
    )
    .expect("write the config file");
    let (url_file, keys_file) = (dir.path().join("url"), dir.path().join("keys"));
    std::fs::write(&url_file, format!("{url}\n")).expect("write the url file");
    std::fs::write(&keys_file, &keys).expect("write the keys file");
    let sources: [(&str, Vec<(&str, &std::ffi::OsStr)>); 3] = [
        (
            "environment",
            vec![
                ("INFERQ_REDIS_URL", url.as_ref()),
                ("INFERQ_API_KEYS", keys.as_ref()),
            ],
        ),
        ("config file", vec![("INFERQ_CONFIG", config.as_os_str())]),
        (
            "_FILE variables",
            vec![
                ("INFERQ_REDIS_URL_FILE", url_file.as_os_str()),
                ("INFERQ_API_KEYS_FILE", keys_file.as_os_str()),
            ],
        ),
    ];
    let paths = command_paths();
    assert!(paths.len() > 10, "subcommands were found: {paths:?}");
    for (source, env) in &sources {
        for path in &paths {
            for flag in ["--help", "-h"] {
                let mut cmd = inferq_command();
                cmd.args(path).arg(flag).envs(env.iter().cloned());
                let out = run(&mut cmd);
                let what = format!(
                    "`inferq {} {flag}` with secrets in the {source}",
                    path.join(" ")
                );
                assert!(out.status.success(), "{what} failed: {out:?}");
                let printed = format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                assert!(
                    printed.contains("Usage"),
                    "{what}: no help text:\n{printed}"
                );
                if path.is_empty() && flag == "--help" {
                    // The variables are still documented, only their values hidden.
                    for var in ["INFERQ_REDIS_URL", "INFERQ_API_KEYS"] {
                        assert!(printed.contains(&format!("[env: {var}]")), "{what}: {var}");
                    }
                }
                assert_no_secret(&what, &printed);
            }
        }
    }
}

#[test]
fn a_variable_and_its_file_together_are_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("keys");
    std::fs::write(&file, KEY_A).expect("write");
    let out = run(inferq_command()
        .args(["models", "list"])
        .env("INFERQ_API_KEYS", KEY_B)
        .env("INFERQ_API_KEYS_FILE", &file));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("INFERQ_API_KEYS or INFERQ_API_KEYS_FILE"),
        "the error names both: {err}"
    );
    assert_no_secret("the refusal", &err);
    let out = run(inferq_command()
        .args(["models", "list"])
        .env("INFERQ_API_KEYS_FILE", dir.path().join("missing")));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("INFERQ_API_KEYS_FILE: cannot read"), "{err}");
}

/// Kills the gateway on drop, so a failing assertion leaves nothing running.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_files_configure_the_gateway_and_its_log_shows_neither() {
    let redis = RedisServer::start();
    // Set once the helper saw it answer: from here on only the password gets in.
    let _: () = redis::cmd("CONFIG")
        .arg(&["SET", "requirepass", PASSWORD])
        .query(&mut redis.connection())
        .expect("CONFIG SET requirepass");
    let dir = tempfile::tempdir().expect("temp dir");
    let (url_file, keys_file) = (dir.path().join("url"), dir.path().join("keys"));
    std::fs::write(&url_file, format!("{}?pass={PASSWORD}\n", redis.url())).expect("write");
    std::fs::write(&keys_file, format!("{KEY_A},{KEY_B}\n")).expect("write");
    let log = dir.path().join("gateway.log");
    let (port, metrics_port) = (free_port(), free_port());
    let child = inferq_command()
        .arg("gateway")
        .env("INFERQ_REDIS_URL_FILE", &url_file)
        .env("INFERQ_API_KEYS_FILE", &keys_file)
        .env("INFERQ_MODELS", dir.path().join("models"))
        .env("INFERQ_LISTEN", format!("127.0.0.1:{port}"))
        .env("INFERQ_METRICS_LISTEN", format!("127.0.0.1:{metrics_port}"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::from(std::fs::File::create(&log).expect("log file")))
        .stderr(Stdio::from(
            std::fs::File::create(dir.path().join("err")).expect("err"),
        ))
        .spawn()
        .expect("spawn the gateway");
    let _gateway = Killed(child);
    let ops = Client::new(([127, 0, 0, 1], metrics_port).into());
    let deadline = Instant::now() + Duration::from_secs(20);
    // Ready means it reached Redis, which needs the password from the file.
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", metrics_port))
            .await
            .is_ok()
            && ops.get("/v2/health/ready").await.status == 200
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway never turned ready: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let api = Client::new(([127, 0, 0, 1], port).into());
    api.get("/v1/models").await.expect(401);
    api.with_key("S3NT1NEL-not-a-key")
        .get("/v1/models")
        .await
        .expect(403);
    for key in [KEY_A, KEY_B] {
        api.with_key(key).get("/v1/models").await.expect(200);
    }
    let printed = format!(
        "{}{}",
        std::fs::read_to_string(&log).unwrap_or_default(),
        std::fs::read_to_string(dir.path().join("err")).unwrap_or_default()
    );
    assert!(
        printed.contains("redacted"),
        "the log shows the settings: {printed}"
    );
    assert_no_secret("the gateway's log", &printed);
}
