//! Helpers shared by the integration tests: the demo models and their reference
//! outputs, a tolerant tensor comparison, a temporary registry, the `inferq` binary,
//! and a private `redis-server` per test.
//!
//! Every test gets its own directories and its own Redis, so tests run in parallel
//! (no fixed ports, no `FLUSHDB`).
//!
//! ONNX Runtime: `inferq::runtime::locate` finds `.ort/lib/libonnxruntime.so` from the
//! working directory (cargo and nextest run tests from the package root), so tests
//! need no environment. We cannot set `ORT_DYLIB_PATH` for this process
//! (`std::env::set_var` is `unsafe` in edition 2024 and the crate forbids unsafe code);
//! child processes get it through [`inferq_command`].

// Each test crate uses a different subset, and `mod common;` is private to it.
#![allow(dead_code, unreachable_pub)]

pub mod http;
mod models;
pub mod proxy;
pub mod queue;
mod redis_server;
pub mod workers;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

use inferq::runtime::{ModelSession, Signature};

// Re-exported so tests write `common::RedisServer`; each test crate uses a few.
#[allow(unused_imports)]
pub use models::{Reference, TempRegistry, assert_outputs, close, json_tensor, rows};
#[allow(unused_imports)]
pub use redis_server::{RedisOptions, RedisServer};

/// Every demo model that `scripts/setup.sh` generates into `testdata/models/`.
pub const DEMO_MODELS: [&str; 6] = [
    "tutorial-rf",
    "digits-mlp",
    "diabetes-gbr",
    "iris-f64",
    "iris-fixed1",
    "heavy-mlp",
];

/// The repository root (where `Cargo.toml` is).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `testdata/models/<name>.onnx`.
pub fn model_path(name: &str) -> PathBuf {
    testdata_model("models", name)
}

/// `testdata/shapes/<name>.onnx`: the variable-shape test models
/// (scripts/make_shape_models.py).
pub fn shape_model_path(name: &str) -> PathBuf {
    testdata_model("shapes", name)
}

/// `testdata/<dir>/<name>.onnx`, which setup generates.
fn testdata_model(dir: &str, name: &str) -> PathBuf {
    let p = repo_root()
        .join("testdata")
        .join(dir)
        .join(format!("{name}.onnx"));
    assert!(
        p.is_file(),
        "{} is missing: run scripts/setup.sh",
        p.display()
    );
    p
}

/// A small deterministic generator (Knuth's MMIX LCG), so a failing random test
/// replays exactly.
#[derive(Debug)]
pub struct Lcg(pub u64);

impl Lcg {
    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 33) % n as u64) as usize
    }
}

/// The bytes of a demo model.
pub fn model_bytes(name: &str) -> Vec<u8> {
    std::fs::read(model_path(name)).expect("read a demo model")
}

/// The ONNX Runtime library: `ORT_DYLIB_PATH` when set, else the one setup unpacked.
pub fn ort_lib() -> PathBuf {
    let p = std::env::var_os("ORT_DYLIB_PATH")
        .filter(|p| !p.is_empty())
        .map_or_else(
            || repo_root().join(".ort/lib/libonnxruntime.so"),
            PathBuf::from,
        );
    assert!(
        p.is_file(),
        "{} is missing: run scripts/setup.sh",
        p.display()
    );
    p
}

/// Loads ONNX Runtime in this process, failing the test with the reason if it cannot.
pub fn init_ort() {
    ort_lib();
    if let Err(e) = inferq::runtime::environment() {
        panic!("ONNX Runtime did not load: {e}");
    }
}

/// A session on a demo model (one intra-op thread).
pub fn session(name: &str) -> ModelSession {
    init_ort();
    ModelSession::load(&model_bytes(name), name, 1).expect("load a demo model")
}

/// The signature reader `Registry::add` takes, as `inferq models add` uses it.
pub fn inspect(bytes: &[u8]) -> Result<Signature, String> {
    init_ort();
    ModelSession::load(bytes, "inspect", 1)
        .map(|s| s.signature().clone())
        .map_err(|e| e.to_string())
}

/// A name no other test (or process) uses, valid as a model name: `<prefix>-<pid>-<n>`.
/// Queue tests use it to keep their keys apart on a shared server.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The `inferq` binary with a clean environment for it: no `INFERQ_*` variable from
/// the caller's shell, `ORT_DYLIB_PATH` set, logs at `warn`.
pub fn inferq_command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_inferq"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("INFERQ_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("ORT_DYLIB_PATH", ort_lib())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    cmd
}

/// Runs a command to its end and returns its output.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs a command that must succeed; returns its stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

/// Runs a command that must fail with exit code 1 (a refused operation; not a
/// panic, which is 101, nor a signal); returns stdout and stderr together.
pub fn run_fail(cmd: &mut Command) -> String {
    run_exit(cmd, 1)
}

/// Runs a command that must exit with `code` without panicking; returns stdout and
/// stderr together. `inferq` exits 2 for a bad setting or command line.
pub fn run_exit(cmd: &mut Command, code: i32) -> String {
    let out = run(cmd);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        out.status.code(),
        Some(code),
        "{cmd:?} should exit with {code}:\n{text}"
    );
    assert!(!text.contains("panicked"), "{cmd:?} panicked:\n{text}");
    text
}

/// `CONFIG GET maxmemory` of a Redis, in bytes (0: no limit).
pub fn maxmemory(conn: &mut redis::Connection) -> u64 {
    let (_, bytes): (String, u64) = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory")
        .query(conn)
        .expect("CONFIG GET maxmemory");
    bytes
}
