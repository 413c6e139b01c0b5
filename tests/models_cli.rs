//! `inferq models …` as an operator runs it: the real binary against a temporary
//! registry, its exit codes and messages, configuration layering (file < env <
//! flags), concurrent adds from several processes, and a missing ONNX Runtime.

mod common;

use std::path::Path;
use std::process::Command;

use common::{TempRegistry, inferq_command, model_path, run_exit, run_fail, run_ok};
use inferq::registry::sha256_hex;
use serde_json::Value;

/// `inferq --models <dir> models <args…>`.
fn models(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = inferq_command();
    cmd.arg("--models").arg(dir).arg("models").args(args);
    cmd
}

fn add(dir: &Path, model: &str, name: &str, extra: &[&str]) -> Command {
    let file = model_path(model);
    let mut cmd = models(
        dir,
        &["add", file.to_str().expect("utf-8 path"), "--name", name],
    );
    cmd.args(extra);
    cmd
}

fn list_json(dir: &Path) -> Vec<Value> {
    let out = run_ok(&mut models(dir, &["list", "--json"]));
    let v: Value = serde_json::from_str(&out).expect("list --json prints JSON");
    v.as_array().expect("a JSON array").clone()
}

fn versions(entry: &Value) -> Vec<u64> {
    entry["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .map(|v| v.as_u64().expect("number"))
        .collect()
}

#[test]
fn add_list_show_pin_rm_prune_verify_round_trip() {
    let r = TempRegistry::empty();
    let dir = r.path();
    let out = run_ok(&mut add(
        dir,
        "iris-f64",
        "iris",
        &["--meta", "dataset=iris"],
    ));
    let sha = sha256_hex(&common::model_bytes("iris-f64"));
    assert!(out.starts_with("added iris@1 (sha256 "), "{out}");
    assert!(out.contains(&sha), "{out}");
    let out = run_ok(&mut add(
        dir,
        "iris-f64",
        "iris",
        &["--batch-max-rows", "16", "--batch-max-wait-ms", "5"],
    ));
    assert!(out.starts_with("added iris@2 "), "{out}");
    run_ok(&mut add(dir, "iris-f64", "iris", &["--version", "7"]));
    run_ok(&mut add(dir, "tutorial-rf", "rf", &[]));

    let list = list_json(dir);
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["name"], "iris");
    assert_eq!(versions(&list[0]), [1, 2, 7]);
    assert_eq!(
        (list[0]["default"].as_u64(), list[0]["pinned"].as_bool()),
        (Some(7), Some(false))
    );
    let table = run_ok(&mut models(dir, &["list"]));
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("iris ") && l.contains("1,2,7")),
        "{table}"
    );

    let show: Value = serde_json::from_str(&run_ok(&mut models(dir, &["show", "iris@1"])))
        .expect("show prints JSON");
    assert_eq!(
        (show["version"].as_u64(), show["sha256"].as_str()),
        (Some(1), Some(sha.as_str()))
    );
    assert_eq!(show["metadata"]["dataset"], "iris");
    assert_eq!(show["inputs"][0]["datatype"], "FP64");
    let show2: Value =
        serde_json::from_str(&run_ok(&mut models(dir, &["show", "iris@2"]))).expect("JSON");
    assert_eq!(show2["batching"]["max_batch"], 16);
    assert_eq!(show2["batching"]["max_wait_ms"], 5);
    let latest: Value =
        serde_json::from_str(&run_ok(&mut models(dir, &["show", "iris"]))).expect("JSON");
    assert_eq!(latest["version"], 7);

    // Pin moves the default and protects the version.
    assert!(run_ok(&mut models(dir, &["pin", "iris", "2"])).contains("pinned iris@2"));
    let list = list_json(dir);
    assert_eq!(
        (list[0]["default"].as_u64(), list[0]["pinned"].as_bool()),
        (Some(2), Some(true))
    );
    assert!(run_ok(&mut models(dir, &["list"])).contains("2*"));
    let err = run_fail(&mut models(dir, &["rm", "iris@2"]));
    assert!(err.contains("pinned"), "{err}");
    let err = run_fail(&mut models(dir, &["rm", "iris"]));
    assert!(err.contains("NAME@VERSION"), "{err}");
    assert!(run_ok(&mut models(dir, &["rm", "iris@1"])).contains("removed iris@1"));
    assert!(run_fail(&mut models(dir, &["rm", "iris@1"])).contains("has no version 1"));

    run_ok(&mut add(dir, "iris-f64", "iris", &[]));
    run_ok(&mut add(dir, "iris-f64", "iris", &[]));
    assert_eq!(versions(&list_json(dir)[0]), [2, 7, 8, 9]);
    let out = run_ok(&mut models(dir, &["prune", "iris", "--keep", "1"]));
    assert!(
        out.contains("removed 2 version(s) of iris: [7, 8]"),
        "{out}"
    );
    assert_eq!(versions(&list_json(dir)[0]), [2, 9]);

    let out = run_ok(&mut models(dir, &["verify"]));
    assert_eq!(
        out.lines().filter(|l| l.starts_with("ok ")).count(),
        3,
        "{out}"
    );
}

#[test]
fn verify_fails_on_a_tampered_file_and_names_it() {
    let r = TempRegistry::with_models(&["iris-f64", "tutorial-rf"]);
    let file = r.path().join("tutorial-rf/1/model.onnx");
    let mut bytes = std::fs::read(&file).expect("read");
    bytes.truncate(bytes.len() - 1);
    std::fs::write(&file, bytes).expect("write");

    let out = run_fail(&mut models(r.path(), &["verify"]));
    assert!(out.contains("ok       iris-f64@1"), "{out}");
    assert!(out.contains("MISMATCH tutorial-rf@1"), "{out}");
    assert!(out.contains("tutorial-rf/1/model.onnx"), "{out}");
    assert!(out.contains("1 version(s) failed verification"), "{out}");
    run_ok(&mut models(r.path(), &["verify", "iris-f64"]));
    assert!(run_fail(&mut models(r.path(), &["verify", "nope"])).contains("unknown model `nope`"));
}

#[test]
fn bad_names_and_files_are_refused_with_a_message_naming_them() {
    let r = TempRegistry::with_models(&["iris-f64"]);
    let dir = r.path();
    let long = "a".repeat(65);
    for name in ["../x", "A", "a/b", "", long.as_str()] {
        let out = run_fail(&mut add(dir, "iris-f64", name, &[]));
        assert!(out.contains("invalid model name"), "`{name}`: {out}");
        let out = run_fail(&mut models(dir, &["pin", name, "1"]));
        assert!(out.contains("invalid model name"), "`{name}`: {out}");
    }
    assert!(run_fail(&mut models(dir, &["show", "../iris-f64"])).contains("invalid model name"));
    assert!(run_fail(&mut models(dir, &["show", "iris-f64@0"])).contains("not a version"));

    let tmp = tempfile::tempdir().expect("temp dir");
    let bytes = common::model_bytes("iris-f64");
    for (file, content) in [
        ("half.onnx", bytes[..bytes.len() / 2].to_vec()),
        ("notes.txt", b"this is not a model\n".to_vec()),
    ] {
        let path = tmp.path().join(file);
        std::fs::write(&path, content).expect("write");
        let mut cmd = models(
            dir,
            &["add", path.to_str().expect("utf-8"), "--name", "iris-f64"],
        );
        let out = run_fail(&mut cmd);
        assert!(
            out.contains(&format!("cannot add {}", path.display())),
            "{out}"
        );
    }
    let out = run_fail(&mut add(
        dir,
        "iris-f64",
        "iris-f64",
        &["--batch-max-rows", "0"],
    ));
    assert!(out.contains("--batch-max-rows"), "{out}");
    assert_eq!(versions(&list_json(dir)[0]), [1], "nothing was added");
}

#[test]
fn concurrent_add_processes_get_distinct_versions() {
    const N: usize = 4;
    let r = TempRegistry::empty();
    let children: Vec<_> = (0..N)
        .map(|_| {
            add(r.path(), "tutorial-rf", "rf", &[])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("spawn inferq")
        })
        .collect();
    let mut added: Vec<String> = children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().expect("wait");
            assert!(out.status.success(), "{out:?}");
            let text = String::from_utf8(out.stdout).expect("utf-8");
            text.split_whitespace()
                .nth(1)
                .expect("added NAME@V")
                .to_owned()
        })
        .collect();
    added.sort();
    assert_eq!(added, ["rf@1", "rf@2", "rf@3", "rf@4"]);
    r.assert_intact("rf", "tutorial-rf", N);
}

#[test]
fn settings_layer_file_then_environment_then_flags() {
    let [file_reg, env_reg, flag_reg] =
        ["iris-f64", "tutorial-rf", "digits-mlp"].map(|m| TempRegistry::with_models(&[m]));
    let cfg_dir = tempfile::tempdir().expect("temp dir");
    let cfg = cfg_dir.path().join("inferq.toml");
    std::fs::write(
        &cfg,
        format!(
            "models = {:?}\nmax_batch = 32\n",
            file_reg.path().display().to_string()
        ),
    )
    .expect("write config");
    let names = |cmd: &mut Command| -> Vec<String> {
        let out: Value = serde_json::from_str(&run_ok(cmd)).expect("JSON");
        out.as_array()
            .expect("array")
            .iter()
            .map(|m| m["name"].as_str().expect("name").to_owned())
            .collect()
    };
    let list = |config: Option<&Path>| {
        let mut cmd = inferq_command();
        if let Some(c) = config {
            cmd.arg("--config").arg(c);
        }
        cmd.args(["models", "list", "--json"]);
        cmd
    };

    assert_eq!(
        names(&mut list(Some(&cfg))),
        ["iris-f64"],
        "the file sets models"
    );
    assert_eq!(
        names(list(None).env("INFERQ_CONFIG", &cfg)),
        ["iris-f64"],
        "INFERQ_CONFIG names the file"
    );
    assert_eq!(
        names(list(Some(&cfg)).env("INFERQ_MODELS", env_reg.path())),
        ["tutorial-rf"],
        "the environment overrides the file"
    );
    let mut cmd = list(Some(&cfg));
    cmd.env("INFERQ_MODELS", env_reg.path())
        .arg("--models")
        .arg(flag_reg.path());
    assert_eq!(
        names(&mut cmd),
        ["digits-mlp"],
        "a flag overrides the environment"
    );

    // Mistakes in the file are named; invalid values are refused before anything runs.
    std::fs::write(&cfg, "modles = \"x\"\n").expect("write");
    let out = common::run_exit(&mut list(Some(&cfg)), 2);
    assert!(out.contains("unknown setting `modles`"), "{out}");
    std::fs::write(&cfg, "max_batch = 0\n").expect("write");
    let out = common::run_exit(&mut list(Some(&cfg)), 2);
    assert!(out.contains("INFERQ_MAX_BATCH must be at least 1"), "{out}");
    let out = common::run_exit(&mut list(Some(&cfg_dir.path().join("missing.toml"))), 2);
    assert!(out.contains("missing.toml"), "{out}");
}

#[test]
fn a_missing_onnx_runtime_is_one_clear_sentence() {
    // The binary alone in a directory with no `.ort/` above it, no ORT_DYLIB_PATH, and
    // a PATH on which no python3 (with or without onnxruntime) can be found.
    let tmp = tempfile::tempdir().expect("temp dir");
    assert!(
        tmp.path().ancestors().all(|a| !a.join(".ort/lib").exists()),
        "{} must not be under a directory with .ort/lib",
        tmp.path().display()
    );
    let exe = tmp.path().join("inferq");
    std::fs::copy(env!("CARGO_BIN_EXE_inferq"), &exe).expect("copy the binary");
    let empty_path = tmp.path().join("empty-bin");
    std::fs::create_dir(&empty_path).expect("mkdir");
    let registry = tmp.path().join("models");
    let run = |ort: Option<&Path>| {
        let mut cmd = Command::new(&exe);
        cmd.env_clear()
            .env("PATH", &empty_path)
            .env("RUST_BACKTRACE", "1")
            .current_dir(tmp.path())
            .args(["models", "add"])
            .arg(model_path("iris-f64"))
            .args(["--name", "x", "--models"])
            .arg(&registry);
        if let Some(p) = ort {
            cmd.env("ORT_DYLIB_PATH", p);
        }
        run_fail(&mut cmd)
    };

    let out = run(None);
    assert_eq!(out.trim().lines().count(), 1, "one line:\n{out}");
    assert!(out.contains("ONNX Runtime library not found"), "{out}");
    assert!(out.contains("scripts/setup.sh"), "{out}");
    assert!(out.contains("ORT_DYLIB_PATH"), "{out}");
    assert!(!out.contains("backtrace"), "{out}");
    assert!(!registry.join("x").exists(), "nothing was registered");

    let out = run(Some(&tmp.path().join("nope.so")));
    assert!(out.contains("ORT_DYLIB_PATH points to"), "{out}");
    assert!(out.contains("nope.so"), "{out}");
    let out = run(Some(&model_path("iris-f64")));
    assert!(out.contains("cannot load ONNX Runtime from"), "{out}");
    assert_eq!(out.trim().lines().count(), 1, "one line:\n{out}");
}

#[test]
fn empty_environment_values_count_as_unset() {
    let r = TempRegistry::empty();
    // Compose files often pass `INFERQ_API_KEYS=` through when the shell has none.
    let out = run_ok(
        models(r.path(), &["list", "--json"])
            .env("INFERQ_API_KEYS", "")
            .env("INFERQ_SERVE_MODELS", "")
            .env("INFERQ_REDIS_URL", ""),
    );
    assert_eq!(out.trim(), "[]");
    // A real but bad value is still refused, naming the setting.
    let err = run_exit(
        models(r.path(), &["list"]).env("INFERQ_API_KEYS", "short"),
        2,
    );
    assert!(err.contains("INFERQ_API_KEYS"), "{err}");
}
