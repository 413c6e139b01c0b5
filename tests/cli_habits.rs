//! The shell habits operators script against, with the real binary, a real worker
//! and a private redis-server per test: `submit --wait` exit statuses (0 succeeded,
//! 1 failed, expired or cancelled, 2 usage, 3 timed out), `dlq list` (`--json`,
//! `--limit`, terminal-safe text), shell completions, and `--help` documenting
//! `RUST_LOG` and the exit statuses.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::workers::WorkerProcess;
use common::{RedisServer, TempRegistry, inferq_command, run, run_exit, run_ok};
use inferq::queue::{Keys, RedisTarget};
use serde_json::Value;

const MODEL: &str = "iris-f64";
const ROWS: &str = "[[5.1, 3.5, 1.4, 0.2]]";

/// `inferq submit MODEL <args…>` against this test's Redis and registry.
fn submit(redis: &RedisServer, registry: &Path, args: &[&str]) -> Command {
    let mut cmd = inferq_command();
    cmd.env("INFERQ_REDIS_URL", redis.url())
        .env("INFERQ_MODELS", registry)
        .args(["submit", MODEL])
        .args(args);
    cmd
}

/// `inferq dlq <args…>` against this test's Redis.
fn dlq(redis: &RedisServer, args: &[&str]) -> Command {
    let mut cmd = inferq_command();
    cmd.env("INFERQ_REDIS_URL", redis.url())
        .arg("dlq")
        .args(args);
    cmd
}

/// Runs `cmd`, asserts its exit status, and returns the record it printed on stdout
/// and its stderr.
fn waited(cmd: &mut Command, code: i32) -> (Value, String) {
    let out = run(cmd);
    let (stdout, stderr) = texts(&out);
    assert_eq!(
        out.status.code(),
        Some(code),
        "{cmd:?} should exit {code}:\nstdout: {stdout}\nstderr: {stderr}"
    );
    let record = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("{cmd:?} printed no record ({e}):\n{stdout}\n{stderr}"));
    (record, stderr)
}

fn texts(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A registry whose `iris-f64` has a good version 1 (pinned, the default) and a
/// version 2 whose file no longer matches its manifest: a job for v2 fails.
fn registry_with_a_broken_version() -> TempRegistry {
    let registry = TempRegistry::with_models(&[MODEL]);
    registry.add(MODEL);
    registry.registry.pin(MODEL, 1).expect("pin v1");
    let file = registry.path().join(MODEL).join("2").join("model.onnx");
    let mut bytes = std::fs::read(&file).expect("v2 file");
    bytes.extend_from_slice(b"tampered");
    std::fs::write(&file, bytes).expect("tamper v2");
    registry
}

/// Submits job `bad` for the broken version 2 and waits for it: it fails (and is
/// dead-lettered), so the submit exits 1. Returns the record and stderr.
fn fail_job_bad(redis: &RedisServer, registry: &Path) -> (Value, String) {
    let args = [
        "--rows",
        ROWS,
        "--version",
        "2",
        "--wait",
        "60",
        "--id",
        "bad",
    ];
    waited(&mut submit(redis, registry, &args), 1)
}

/// A worker that dead-letters a job on its first failure.
fn worker(redis: &RedisServer, registry: &TempRegistry) -> WorkerProcess {
    WorkerProcess::spawn(
        redis,
        registry.path(),
        "w",
        &[
            ("INFERQ_MAX_ATTEMPTS", "1"),
            ("INFERQ_CLAIM_AFTER_MS", "300"),
        ],
    )
}

#[test]
fn submit_wait_exit_status_says_how_the_job_ended() {
    let redis = RedisServer::start();
    let registry = registry_with_a_broken_version();
    let dir = registry.path();

    // No worker yet: the wait runs out. Exit 3, the record (still queued) on stdout.
    let started = Instant::now();
    let (rec, err) = waited(
        &mut submit(
            &redis,
            dir,
            &["--rows", ROWS, "--wait", "0.3", "--id", "early"],
        ),
        3,
    );
    assert_eq!(rec["status"], "queued", "{rec}");
    assert!(
        err.contains("job `early` is still queued after 0.300 s"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the wait took {:?}",
        started.elapsed()
    );
    // `--wait 0` looks once.
    let (rec, _) = waited(
        &mut submit(&redis, dir, &["--rows", ROWS, "--wait", "0"]),
        3,
    );
    assert_eq!(rec["status"], "queued", "{rec}");

    // A cancelled job: exit 1. The cancel comes from another client while we wait.
    let waiting = submit(
        &redis,
        dir,
        &["--rows", ROWS, "--wait", "60", "--id", "gone"],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("start submit --wait");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut conn = RedisTarget::parse(&redis.url())
            .expect("URL")
            .connect(Duration::from_secs(10))
            .await
            .expect("connect");
        let keys = Keys::new(MODEL);
        let deadline = Instant::now() + Duration::from_secs(20);
        // The job exists once the submit has written it; cancel it then.
        while inferq::queue::submit::get(&mut conn, &keys, "gone")
            .await
            .expect("get")
            .is_none()
        {
            assert!(Instant::now() < deadline, "job `gone` was never written");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        inferq::queue::submit::cancel(&mut conn, &keys, "gone", 60)
            .await
            .expect("cancel");
    });
    let out = waiting.wait_with_output().expect("submit --wait ends");
    let (stdout, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    let rec: Value = serde_json::from_str(&stdout).expect("the record");
    assert_eq!(rec["status"], "cancelled", "{rec}");
    assert!(stderr.contains("job `gone` cancelled"), "{stderr}");

    let _worker = worker(&redis, &registry);
    // Succeeded: exit 0 (the first job also waits for the worker's start).
    let (rec, err) = waited(
        &mut submit(&redis, dir, &["--rows", ROWS, "--wait", "60"]),
        0,
    );
    assert_eq!(rec["status"], "succeeded", "{rec}\n{err}");
    assert!(rec["outputs"].is_object(), "{rec}");
    assert!(
        !err.contains("inferq:"),
        "success says nothing on stderr: {err}"
    );

    // Failed (the version's file is corrupt, dead-lettered at once): exit 1.
    let (rec, err) = fail_job_bad(&redis, dir);
    assert_eq!(rec["status"], "failed", "{rec}");
    assert!(err.contains("job `bad` failed: "), "{err}");
    assert!(err.contains("does not match its manifest"), "{err}");

    // Expired (its deadline passed before compute): exit 1.
    let body = tempfile::NamedTempFile::new().expect("body file");
    std::fs::write(
        body.path(),
        format!(r#"{{"features": {ROWS}, "deadline_ms": 1}}"#),
    )
    .expect("write body");
    let path = body.path().to_str().expect("utf-8 path");
    let (rec, err) = waited(
        &mut submit(&redis, dir, &["--json", path, "--wait", "60"]),
        1,
    );
    assert_eq!(rec["status"], "expired", "{rec}");
    assert!(err.contains("expired: "), "{err}");

    // Without --wait, an accepted submit is a success whatever happens later.
    let out = run_ok(&mut submit(
        &redis,
        dir,
        &["--rows", ROWS, "--version", "2"],
    ));
    let accepted: Value = serde_json::from_str(&out).expect("id and created");
    assert!(accepted["id"].is_string(), "{accepted}");
}

#[test]
fn submit_wait_rejects_waits_it_cannot_keep_without_panicking() {
    let redis = RedisServer::start();
    let registry = TempRegistry::with_models(&[MODEL]);
    // 1e30 s overflowed `Duration::from_secs_f64` and panicked (AUDIT D27).
    for wait in ["1e30", "604801", "inf", "NaN", "-1", "soon", ""] {
        let out = run_exit(
            &mut submit(
                &redis,
                registry.path(),
                &["--rows", ROWS, &format!("--wait={wait}")],
            ),
            2,
        );
        assert!(out.contains("--wait"), "{wait}: {out}");
        assert!(!out.contains("panicked"), "{wait}: {out}");
    }
    // Nothing was enqueued by the refused commands.
    let mut conn = redis.connection();
    let len: u64 = redis::cmd("XLEN")
        .arg(Keys::new(MODEL).jobs())
        .query(&mut conn)
        .expect("XLEN");
    assert_eq!(len, 0);
}

/// What a hostile producer puts in a job id: an OSC sequence retitling the terminal,
/// a bell, a screen clear, a bidi override and a byte that is not UTF-8.
const HOSTILE_ID: &[u8] = b"\x1b]0;owned\x07\x1b[2Jevil\xe2\x80\xae\xff";

#[test]
fn dlq_list_prints_json_honours_limit_and_keeps_producer_bytes_off_the_terminal() {
    let redis = RedisServer::start();
    let registry = registry_with_a_broken_version();
    let _worker = worker(&redis, &registry);
    // Dead letter 1: a job that failed (through the CLI, waiting for it).
    fail_job_bad(&redis, registry.path());
    // Dead letter 2: an entry a foreign producer wrote with a hostile id.
    let mut conn = redis.connection();
    let _: String =
        common::queue::xadd_cmd(MODEL, &[(&b"v"[..], &b"1"[..]), (&b"id"[..], HOSTILE_ID)])
            .query(&mut conn)
            .expect("XADD");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let len: u64 = redis::cmd("XLEN")
            .arg(Keys::new(MODEL).dlq())
            .query(&mut conn)
            .expect("XLEN");
        if len == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "{len} dead letters, not 2");
        std::thread::sleep(Duration::from_millis(50));
    }

    // The table: no control byte reaches the terminal; the escapes show what was there.
    let out = run(&mut dlq(&redis, &["list", MODEL]));
    assert!(out.status.success(), "{out:?}");
    assert!(
        !out.stdout
            .iter()
            .any(|b| b.is_ascii_control() && *b != b'\n'),
        "raw control bytes in {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    let table = String::from_utf8(out.stdout).expect("the table is UTF-8");
    assert!(!table.contains('\u{202e}'), "{table}");
    assert!(
        table.contains(r"\u{1b}]0;owned\u{7}\u{1b}[2Jevil\u{202e}\xff"),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.contains(" bad ") && l.contains("does not match")),
        "{table}"
    );
    assert_eq!(table.lines().last(), Some("2 dead letter(s)"), "{table}");

    // --json: every dead letter, oldest first, with its fields.
    let json: Value = serde_json::from_str(&run_ok(&mut dlq(&redis, &["list", MODEL, "--json"])))
        .expect("dlq list --json prints JSON");
    let list = json.as_array().expect("an array");
    assert_eq!(list.len(), 2, "{json}");
    assert_eq!(list[0]["id"], "bad");
    assert_eq!(list[0]["attempts"], 1, "{json}");
    assert!(
        list[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("does not match its manifest")),
        "{json}"
    );
    assert!(
        list[0]["entry"].is_string() && list[0]["original_entry"].is_string(),
        "{json}"
    );
    assert_eq!(
        list[1]["id"].as_str(),
        Some(String::from_utf8_lossy(HOSTILE_ID).as_ref()),
        "JSON carries the id (escaped by JSON itself): {json}"
    );
    assert!(
        list[0]["entry"].as_str() < list[1]["entry"].as_str(),
        "oldest first"
    );

    // --limit: the oldest N, and a line saying the rest was left out.
    let table = run_ok(&mut dlq(&redis, &["list", MODEL, "--limit", "1"]));
    assert_eq!(table.lines().count(), 3, "{table}");
    assert!(
        table.lines().nth(1).is_some_and(|l| l.contains(" bad ")),
        "{table}"
    );
    assert!(
        table.ends_with("1 of 2 dead letter(s) shown, the oldest; --limit shows more\n"),
        "{table}"
    );
    let out = run(&mut dlq(&redis, &["list", MODEL, "--limit", "1", "--json"]));
    let (stdout, stderr) = texts(&out);
    assert!(out.status.success(), "{stderr}");
    let json: Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(json.as_array().map(Vec::len), Some(1), "{json}");
    assert!(stderr.contains("1 of 2 dead letter(s) shown"), "{stderr}");
    for bad in ["0", "-1", "100001", "many"] {
        let out = run_exit(
            &mut dlq(&redis, &["list", MODEL, &format!("--limit={bad}")]),
            2,
        );
        assert!(out.contains("--limit"), "{bad}: {out}");
    }

    // Replay prints the ids it re-enqueued, escaped too.
    let out = run(&mut dlq(&redis, &["replay", MODEL]));
    assert!(out.status.success(), "{out:?}");
    assert!(
        !out.stdout
            .iter()
            .any(|b| b.is_ascii_control() && *b != b'\n'),
        "{out:?}"
    );
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    assert!(text.starts_with("replayed 2 job(s): bad "), "{text}");
    assert!(text.contains(r"\u{1b}]0;owned"), "{text}");
}

#[test]
fn completions_are_generated_for_each_shell() {
    let bash = run_ok(inferq_command().args(["completions", "bash"]));
    assert!(bash.contains("_inferq()"), "{bash}");
    assert!(
        bash.contains("complete -F _inferq"),
        "not a bash completion script"
    );
    for sub in [
        "serve",
        "gateway",
        "worker",
        "models",
        "submit",
        "dlq",
        "bench",
        "completions",
    ] {
        assert!(
            bash.contains(&format!("inferq,{sub})")),
            "bash lacks `{sub}`"
        );
    }
    assert!(
        bash.contains("--redis-url") && bash.contains("--wait"),
        "bash lacks flags"
    );
    let zsh = run_ok(inferq_command().args(["completions", "zsh"]));
    assert!(zsh.starts_with("#compdef inferq"), "{zsh}");
    let fish = run_ok(inferq_command().args(["completions", "fish"]));
    assert!(fish.contains("complete -c inferq"), "{fish}");
    for shell in ["elvish", "powershell"] {
        assert!(
            !run_ok(inferq_command().args(["completions", shell])).is_empty(),
            "{shell}"
        );
    }
    let out = run_exit(inferq_command().args(["completions", "tcsh"]), 2);
    assert!(out.contains("possible values"), "{out}");
    // A full disk is an error with a message, not clap_complete's panic.
    let full = std::fs::File::create("/dev/full").expect("/dev/full");
    let out = run(inferq_command().args(["completions", "bash"]).stdout(full));
    let (_, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot write the bash completion script"),
        "{stderr}"
    );
}

#[test]
fn help_documents_rust_log_and_the_exit_statuses() {
    let top = run_ok(inferq_command().arg("--help"));
    assert!(top.contains("RUST_LOG"), "{top}");
    assert!(
        top.contains("RUST_LOG=inferq=debug"),
        "an example filter: {top}"
    );
    for status in [
        "0 success",
        "1 failure",
        "2 a bad command line",
        "3 `submit --wait`",
    ] {
        assert!(top.contains(status), "`{status}` missing:\n{top}");
    }
    let sub = run_ok(inferq_command().args(["submit", "--help"]));
    for status in [
        "0 submitted",
        "1 the submit failed",
        "2 a bad",
        "3 --wait ran out",
    ] {
        assert!(sub.contains(status), "`{status}` missing:\n{sub}");
    }
    // Settings are grouped, and a closed set is a ValueEnum: listed, and a typo gets
    // clap's suggestion (exit 2) from the environment and from a config file alike.
    for heading in [
        "Redis:",
        "HTTP front door:",
        "Workers and batching:",
        "Limits:",
    ] {
        assert!(
            top.contains(&format!("\n{heading}\n")),
            "no heading {heading}:\n{top}"
        );
    }
    let out = run_exit(
        inferq_command()
            .env("INFERQ_LOG_FORMAT", "jsn")
            .args(["models", "list"]),
        2,
    );
    assert!(out.contains("[possible values: text, json]"), "{out}");
    assert!(out.contains("a similar value exists: 'json'"), "{out}");
    let config = tempfile::NamedTempFile::new().expect("config file");
    std::fs::write(config.path(), "log_format = \"xml\"\n").expect("write config");
    let out = run_exit(
        inferq_command()
            .arg("--config")
            .arg(config.path())
            .args(["models", "list"]),
        2,
    );
    assert!(out.contains("invalid value 'xml'"), "{out}");

    let readme = std::fs::read_to_string(common::repo_root().join("README.md")).expect("README");
    assert!(readme.contains("RUST_LOG"), "the README documents RUST_LOG");
    assert!(
        readme.contains("inferq completions"),
        "the README documents completions"
    );
    assert!(
        readme.contains("exits 3"),
        "the README documents submit's exit statuses"
    );
}
