//! The model registry through the library API: versions, default and pin, removal
//! and pruning, hash verification, and every file it must refuse (bad names,
//! symlinks, truncated or foreign files, external data). The same operations through
//! the `inferq models` binary are in `models_cli.rs`.

mod common;

use std::os::unix::fs::symlink;
use std::path::Path;
use std::sync::Barrier;

use common::{TempRegistry, inspect, model_bytes, model_path};
use inferq::registry::{NewVersion, RegistryError, sha256_hex, valid_name};

const BAD_NAMES: [&str; 8] = ["../x", "A", "a/b", "", "..", ".hidden", "a b", "-x"];

/// Flips one byte in the middle of a registered model file.
fn tamper(path: &Path) {
    let mut bytes = std::fs::read(path).expect("read model");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(path, bytes).expect("write model");
}

fn add_err(r: &TempRegistry, file: &Path, name: &str) -> RegistryError {
    r.registry
        .add(file, name, NewVersion::default(), inspect)
        .expect_err("add must refuse")
}

#[test]
fn versions_default_pin_remove_and_prune_round_trip() {
    let r = TempRegistry::empty();
    assert!(r.registry.list().expect("list").is_empty());
    let m1 = r.add("tutorial-rf");
    assert_eq!(m1.version, 1);
    assert_eq!(m1.sha256, sha256_hex(&model_bytes("tutorial-rf")));
    assert_eq!(m1.size, model_bytes("tutorial-rf").len() as u64);
    assert_eq!(m1.metadata["accuracy"], "0.88");
    assert_eq!(m1.signature.inputs[0].shape, vec![-1, 20]);
    for v in 2..=5 {
        assert_eq!(r.add("tutorial-rf").version, v);
    }
    r.add("iris-f64");

    let list = r.registry.list().expect("list");
    let names: Vec<&str> = list.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["iris-f64", "tutorial-rf"]);
    let rf = &list[1];
    assert_eq!(
        (rf.versions.clone(), rf.default, rf.pinned),
        ((1..=5).collect(), 5, false)
    );
    assert_eq!(rf.manifest.version, 5);
    assert_eq!(
        r.registry.manifest("tutorial-rf", Some(1)).expect("show"),
        m1
    );

    // Pin moves the default; the pinned version cannot be removed.
    r.registry.pin("tutorial-rf", 2).expect("pin");
    assert_eq!(
        r.registry.default_version("tutorial-rf").expect("default"),
        2
    );
    assert_eq!(
        r.registry
            .load("tutorial-rf", None)
            .expect("load")
            .0
            .version,
        2
    );
    assert!(r.registry.list().expect("list")[1].pinned);
    let e = r.registry.remove("tutorial-rf", 2).expect_err("pinned");
    assert!(e.to_string().contains("pinned"), "{e}");
    r.registry.remove("tutorial-rf", 1).expect("rm 1");
    assert_eq!(
        r.registry.versions("tutorial-rf").expect("versions"),
        [2, 3, 4, 5]
    );
    assert!(matches!(
        r.registry.remove("tutorial-rf", 1),
        Err(RegistryError::UnknownVersion(_, 1))
    ));

    // Prune keeps the newest N plus the pinned one.
    assert_eq!(r.registry.prune("tutorial-rf", 1).expect("prune"), [3, 4]);
    assert_eq!(
        r.registry.versions("tutorial-rf").expect("versions"),
        [2, 5]
    );
    assert!(
        r.registry
            .prune("tutorial-rf", 10)
            .expect("prune")
            .is_empty()
    );
    r.registry.pin("tutorial-rf", 5).expect("pin");
    assert_eq!(r.registry.prune("tutorial-rf", 0).expect("prune"), [2]);
    assert_eq!(r.registry.versions("tutorial-rf").expect("versions"), [5]);

    // A new version after removals takes the next number after the newest.
    assert_eq!(r.add("tutorial-rf").version, 6);
    assert_eq!(
        r.registry.default_version("tutorial-rf").expect("pinned"),
        5
    );
    assert_eq!(r.registry.versions("iris-f64").expect("versions"), [1]);

    let checked = r.registry.verify(None).expect("verify");
    assert_eq!(checked.len(), 3);
    assert!(checked.iter().all(|(_, _, ok)| ok.is_ok()), "{checked:?}");
}

#[test]
fn explicit_versions_are_positive_and_never_overwritten() {
    let r = TempRegistry::empty();
    let at = |v| NewVersion {
        version: Some(v),
        ..NewVersion::default()
    };
    let file = model_path("iris-f64");
    let m = r
        .registry
        .add(&file, "iris", at(7), inspect)
        .expect("add v7");
    assert_eq!(m.version, 7);
    let e = r
        .registry
        .add(&file, "iris", at(7), inspect)
        .expect_err("dup");
    assert!(e.to_string().contains("already has version 7"), "{e}");
    let e = r
        .registry
        .add(&file, "iris", at(0), inspect)
        .expect_err("zero");
    assert!(e.to_string().contains("positive"), "{e}");
    assert_eq!(r.add_as("iris-f64", "iris").version, 8);
    assert_eq!(r.registry.versions("iris").expect("versions"), [7, 8]);
}

#[test]
fn unknown_models_and_versions_are_named() {
    let r = TempRegistry::with_models(&["iris-f64"]);
    let e = r.registry.load("nope", None).expect_err("unknown");
    assert!(
        matches!(e, RegistryError::UnknownModel(ref n) if n == "nope"),
        "{e}"
    );
    let e = r
        .registry
        .load("iris-f64", Some(9))
        .expect_err("unknown version");
    assert_eq!(e.to_string(), "model `iris-f64` has no version 9");
    assert!(r.registry.pin("iris-f64", 9).is_err());
    assert!(r.registry.prune("nope", 1).is_err());
    assert!(r.registry.verify(Some("nope")).is_err());
}

#[test]
fn a_tampered_file_is_never_loaded() {
    let r = TempRegistry::with_models(&["iris-f64", "tutorial-rf"]);
    r.add("tutorial-rf");
    tamper(&r.path().join("tutorial-rf/1/model.onnx"));

    let e = r
        .registry
        .load("tutorial-rf", Some(1))
        .expect_err("tampered");
    assert!(matches!(e, RegistryError::HashMismatch { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("tutorial-rf/1/model.onnx"), "{msg}");
    assert!(msg.contains("does not match its manifest"), "{msg}");
    assert!(
        msg.contains(&sha256_hex(&model_bytes("tutorial-rf"))),
        "{msg}"
    );
    // Other versions and models are unaffected.
    assert!(r.registry.load("tutorial-rf", None).is_ok());

    let results = r.registry.verify(None).expect("verify");
    let bad: Vec<(String, u64)> = results
        .iter()
        .filter(|(_, _, ok)| ok.is_err())
        .map(|(n, v, _)| (n.clone(), *v))
        .collect();
    assert_eq!(bad, [("tutorial-rf".to_owned(), 1)]);
    assert_eq!(results.len(), 3);
    assert_eq!(
        r.registry.verify(Some("iris-f64")).expect("verify").len(),
        1
    );
}

#[test]
fn bad_names_are_refused_everywhere() {
    let r = TempRegistry::with_models(&["iris-f64"]);
    let file = model_path("iris-f64");
    let mut names: Vec<String> = BAD_NAMES.iter().map(|&n| n.to_owned()).collect();
    names.push("a".repeat(65));
    for name in &names {
        assert!(!valid_name(name), "`{name}` must be invalid");
        let e = add_err(&r, &file, name);
        assert!(matches!(e, RegistryError::InvalidName(_)), "`{name}`: {e}");
        assert!(e.to_string().contains("invalid model name"), "{e}");
        assert!(matches!(
            r.registry.load(name, None),
            Err(RegistryError::InvalidName(_))
        ));
        assert!(matches!(
            r.registry.pin(name, 1),
            Err(RegistryError::InvalidName(_))
        ));
        assert!(matches!(
            r.registry.remove(name, 1),
            Err(RegistryError::InvalidName(_))
        ));
    }
    // Nothing escaped the root.
    assert!(!r.path().parent().expect("parent").join("x").exists());
    let longest = "a".repeat(64);
    for good in ["0", "a.b_c-d", longest.as_str()] {
        assert_eq!(r.add_as("iris-f64", good).version, 1, "`{good}`");
    }
}

#[test]
fn symlinks_inside_the_registry_are_refused() {
    let r = TempRegistry::with_models(&["iris-f64"]);
    let outside = tempfile::tempdir().expect("temp dir");

    // model.onnx replaced by a symlink to an identical file: the bytes would match,
    // the link is still refused.
    let file = r.path().join("iris-f64/1/model.onnx");
    let copy = outside.path().join("model.onnx");
    std::fs::rename(&file, &copy).expect("move out");
    symlink(&copy, &file).expect("symlink");
    let e = r
        .registry
        .load("iris-f64", Some(1))
        .expect_err("symlinked file");
    assert!(e.to_string().contains("symlink"), "{e}");
    assert!(e.to_string().contains("model.onnx"), "{e}");
    assert!(r.registry.verify(None).expect("verify")[0].2.is_err());

    // A model directory that is a symlink to a real registry elsewhere.
    let elsewhere = TempRegistry::with_models(&["tutorial-rf"]);
    symlink(
        elsewhere.path().join("tutorial-rf"),
        r.path().join("tutorial-rf"),
    )
    .expect("symlink dir");
    let e = r
        .registry
        .load("tutorial-rf", None)
        .expect_err("symlinked dir");
    assert!(e.to_string().contains("symlink"), "{e}");
    let e = add_err(&r, &model_path("tutorial-rf"), "tutorial-rf");
    assert!(e.to_string().contains("symlink"), "{e}");
    assert_eq!(elsewhere.registry.versions("tutorial-rf").expect("v"), [1]);

    // A version directory that is a symlink.
    r.add("diabetes-gbr");
    let v1 = r.path().join("diabetes-gbr/1");
    let moved = outside.path().join("v1");
    std::fs::rename(&v1, &moved).expect("move version out");
    symlink(&moved, &v1).expect("symlink version");
    let e = r
        .registry
        .load("diabetes-gbr", Some(1))
        .expect_err("symlinked version");
    assert!(e.to_string().contains("symlink"), "{e}");
}

#[test]
fn nothing_is_written_or_deleted_through_a_symlinked_model_directory() {
    let r = TempRegistry::empty();
    let elsewhere = TempRegistry::with_models(&["iris-f64"]);
    elsewhere.add("iris-f64");
    symlink(elsewhere.path().join("iris-f64"), r.path().join("iris-f64")).expect("symlink");

    for e in [
        r.registry
            .remove("iris-f64", 1)
            .expect_err("rm through a symlink"),
        r.registry
            .prune("iris-f64", 0)
            .expect_err("prune through a symlink"),
        r.registry
            .pin("iris-f64", 1)
            .expect_err("pin through a symlink"),
        r.registry
            .manifest("iris-f64", None)
            .expect_err("show through a symlink"),
    ] {
        assert!(e.to_string().contains("symlink"), "{e}");
    }
    assert!(r.registry.list().expect("list").is_empty());
    assert_eq!(elsewhere.registry.versions("iris-f64").expect("v"), [1, 2]);
    assert!(!elsewhere.path().join("iris-f64/pinned").exists());
}

#[test]
fn truncated_and_foreign_files_are_refused_at_add_naming_the_file() {
    let r = TempRegistry::empty();
    let dir = tempfile::tempdir().expect("temp dir");
    let bytes = model_bytes("digits-mlp");
    let cases = [
        ("truncated.onnx", bytes[..bytes.len() / 2].to_vec()),
        ("cut-at-end.onnx", bytes[..bytes.len() - 3].to_vec()),
        (
            "reference.json",
            std::fs::read(common::repo_root().join("testdata/models/digits-mlp.reference.json"))
                .expect("read json"),
        ),
        ("empty.onnx", Vec::new()),
    ];
    for (file, content) in cases {
        let path = dir.path().join(file);
        std::fs::write(&path, content).expect("write");
        let e = add_err(&r, &path, "digits");
        assert!(matches!(e, RegistryError::Refused(_)), "{file}: {e:?}");
        assert!(
            e.to_string().contains(&path.display().to_string()),
            "{file}: {e}"
        );
    }
    let e = add_err(&r, &dir.path().join("missing.onnx"), "digits");
    assert!(e.to_string().contains("missing.onnx"), "{e}");
    assert!(
        r.registry.list().expect("list").is_empty(),
        "nothing was added"
    );
    assert!(!r.path().join("digits/1").exists());
}

#[test]
fn a_model_with_external_data_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("external.onnx");
    // skl2onnx writes weights as `float_data`, which onnx never externalises: move
    // them to `raw_data` first. Python's onnxruntime loads the result (from its path),
    // so the refusal below is inferq's own, not ORT failing.
    let script = "import sys, numpy, onnx, onnxruntime
from onnx import numpy_helper as nh
m = onnx.load(sys.argv[1])
for t in m.graph.initializer:
    t.CopyFrom(nh.from_array(nh.to_array(t), t.name))
onnx.save_model(m, sys.argv[2], save_as_external_data=True,
                all_tensors_to_one_file=True, location='weights.bin', size_threshold=1024)
s = onnxruntime.InferenceSession(sys.argv[2])
s.run(None, {'input': numpy.zeros((1, 64), numpy.float32)})";
    common::run_ok(
        std::process::Command::new(common::repo_root().join(".venv/bin/python"))
            .args(["-c", script])
            .arg(model_path("digits-mlp"))
            .arg(&out),
    );
    assert!(
        dir.path().join("weights.bin").is_file(),
        "python wrote external data"
    );

    let r = TempRegistry::empty();
    let e = add_err(&r, &out, "digits");
    let msg = e.to_string();
    assert!(
        msg.contains("external data file, which inferq refuses"),
        "{msg}"
    );
    assert!(msg.contains("external.onnx"), "{msg}");
    assert!(r.registry.list().expect("list").is_empty());
}

#[test]
fn concurrent_adds_land_as_distinct_intact_versions() {
    const N: usize = 8;
    let r = TempRegistry::empty();
    let barrier = Barrier::new(N);
    let versions: Vec<u64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..N)
            .map(|_| {
                s.spawn(|| {
                    let new = NewVersion::default();
                    let bytes = model_bytes("tutorial-rf");
                    let sig = inspect(&bytes);
                    barrier.wait();
                    r.registry
                        .add(&model_path("tutorial-rf"), "rf", new, |_| sig)
                        .expect("concurrent add")
                        .version
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    let mut sorted = versions.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (1..=N as u64).collect::<Vec<_>>(), "{versions:?}");
    r.assert_intact("rf", "tutorial-rf", N);
}

#[test]
fn a_removed_version_number_is_never_reused() {
    let r = TempRegistry::empty();
    assert_eq!(r.add_as("iris-f64", "iris").version, 1);
    assert_eq!(r.add_as("iris-f64", "iris").version, 2);
    r.registry.remove("iris", 2).unwrap();
    // A worker may still hold version 2 loaded: the next add must not reuse the number.
    assert_eq!(r.add_as("iris-f64", "iris").version, 3);
    assert_eq!(r.registry.versions("iris").unwrap(), vec![1, 3]);
}
