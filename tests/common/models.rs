//! The demo models' reference outputs, a tolerant comparison, a temporary registry.

use std::path::Path;

use inferq::protocol::{Tensor, TensorData};
use inferq::registry::{NewVersion, Registry};

use super::{inspect, model_bytes, model_path, repo_root, shape_model_path};

/// A `<name>.reference.json`: inputs and the outputs onnxruntime (Python) computed.
#[derive(Debug, Clone)]
pub struct Reference {
    /// Model name.
    pub model: String,
    /// Inputs, all rows.
    pub inputs: Vec<Tensor>,
    /// Expected outputs, all rows, in the model's output order.
    pub outputs: Vec<Tensor>,
    /// Where the rows came from.
    pub dataset: String,
    /// Test-split score recorded at export.
    pub accuracy: f64,
}

impl Reference {
    /// Reads `testdata/models/<name>.reference.json`.
    pub fn load(name: &str) -> Reference {
        let path = repo_root()
            .join("testdata/models")
            .join(format!("{name}.reference.json"));
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (run scripts/setup.sh)", path.display()));
        let v: serde_json::Value = serde_json::from_str(&text).expect("reference is JSON");
        let tensors = |key: &str| -> Vec<Tensor> {
            v[key]
                .as_array()
                .unwrap_or_else(|| panic!("{}: no `{key}` array", path.display()))
                .iter()
                .map(json_tensor)
                .collect()
        };
        Reference {
            model: v["model"].as_str().expect("model").to_owned(),
            inputs: tensors("inputs"),
            outputs: tensors("outputs"),
            dataset: v["dataset"].as_str().unwrap_or_default().to_owned(),
            accuracy: v["accuracy"].as_f64().unwrap_or_default(),
        }
    }

    /// Reference rows.
    pub fn rows(&self) -> usize {
        self.inputs[0].rows()
    }

    /// Inputs of rows `range`.
    pub fn input_rows(&self, range: std::ops::Range<usize>) -> Vec<Tensor> {
        self.inputs.iter().map(|t| rows(t, range.clone())).collect()
    }

    /// Expected outputs of rows `range`.
    pub fn output_rows(&self, range: std::ops::Range<usize>) -> Vec<Tensor> {
        self.outputs
            .iter()
            .map(|t| rows(t, range.clone()))
            .collect()
    }
}

/// One OIP v2 tensor object (`name`, `datatype`, `shape`, flat `data`), parsed here
/// rather than by the codec under test.
pub fn json_tensor(v: &serde_json::Value) -> Tensor {
    let data = v["data"].as_array().expect("data array");
    let f = |x: &serde_json::Value| x.as_f64().expect("number");
    let i = |x: &serde_json::Value| x.as_i64().expect("integer");
    let data = match v["datatype"].as_str().expect("datatype") {
        "FP32" => TensorData::Fp32(data.iter().map(|x| f(x) as f32).collect()),
        "FP64" => TensorData::Fp64(data.iter().map(f).collect()),
        "INT64" => TensorData::Int64(data.iter().map(i).collect()),
        "INT32" => TensorData::Int32(data.iter().map(|x| i(x) as i32).collect()),
        "BOOL" => TensorData::Bool(data.iter().map(|x| x.as_bool().expect("bool")).collect()),
        other => panic!("reference datatype {other} is not supported by the tests"),
    };
    Tensor {
        name: v["name"].as_str().expect("name").to_owned(),
        shape: v["shape"]
            .as_array()
            .expect("shape")
            .iter()
            .map(|d| d.as_u64().expect("dimension") as usize)
            .collect(),
        data,
    }
}

/// Rows `range` of a tensor (batch dimension first).
pub fn rows(t: &Tensor, range: std::ops::Range<usize>) -> Tensor {
    let w = t.row_len();
    let mut shape = t.shape.clone();
    shape[0] = range.len();
    Tensor {
        name: t.name.clone(),
        shape,
        data: t.data.slice(range.start * w..range.end * w),
    }
}

/// True when two floats agree: ORT's float results move slightly with batch size
/// (up to ~3e-5 absolute on values ~150), so the bound is relative above 1.
pub fn close(actual: f64, expected: f64) -> bool {
    (actual - expected).abs() <= 1e-5 * expected.abs().max(1.0)
}

/// Asserts that `actual` has the names, types and shapes of `expected`, integers equal
/// and floats [`close`]; `what` prefixes the failure message.
pub fn assert_outputs(actual: &[Tensor], expected: &[Tensor], what: &str) {
    let names = |ts: &[Tensor]| ts.iter().map(|t| t.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(actual), names(expected), "{what}: output names");
    for (a, e) in actual.iter().zip(expected) {
        let ctx = format!("{what}: output `{}`", e.name);
        assert_eq!(a.shape, e.shape, "{ctx}: shape");
        assert_eq!(a.data.datatype(), e.data.datatype(), "{ctx}: datatype");
        let floats = |a: Vec<f64>, e: Vec<f64>| {
            for (k, (x, y)) in a.iter().zip(&e).enumerate() {
                assert!(close(*x, *y), "{ctx}: element {k} is {x}, expected {y}");
            }
        };
        match (&a.data, &e.data) {
            (TensorData::Fp32(x), TensorData::Fp32(y)) => floats(
                x.iter().map(|&v| f64::from(v)).collect(),
                y.iter().map(|&v| f64::from(v)).collect(),
            ),
            (TensorData::Fp64(x), TensorData::Fp64(y)) => floats(x.clone(), y.clone()),
            _ => assert_eq!(a.data, e.data, "{ctx}: values"),
        }
    }
}

/// A registry in a temporary directory, removed on drop.
#[derive(Debug)]
pub struct TempRegistry {
    /// Keeps the directory alive.
    pub dir: tempfile::TempDir,
    /// The registry rooted at `dir`.
    pub registry: Registry,
}

impl TempRegistry {
    /// An empty registry.
    pub fn empty() -> TempRegistry {
        let dir = tempfile::tempdir().expect("temp dir");
        let registry = Registry::new(dir.path());
        TempRegistry { dir, registry }
    }

    /// A registry holding version 1 of each named demo model, with its dataset and
    /// accuracy as metadata.
    pub fn with_models(names: &[&str]) -> TempRegistry {
        let r = TempRegistry::empty();
        for name in names {
            r.add(name);
        }
        r
    }

    /// Adds a demo model as its next version.
    pub fn add(&self, name: &str) -> inferq::registry::Manifest {
        self.add_as(name, name)
    }

    /// Adds the demo model `model` as the next version of `name`.
    pub fn add_as(&self, model: &str, name: &str) -> inferq::registry::Manifest {
        let reference = Reference::load(model);
        let new = NewVersion {
            metadata: [
                ("dataset".to_owned(), reference.dataset),
                ("accuracy".to_owned(), reference.accuracy.to_string()),
            ]
            .into(),
            ..NewVersion::default()
        };
        self.registry
            .add(&model_path(model), name, new, inspect)
            .unwrap_or_else(|e| panic!("add {model} as {name}: {e}"))
    }

    /// Adds `testdata/shapes/<file>.onnx` (a variable-shape test model) as the next
    /// version of `name`.
    pub fn add_shape_model(&self, file: &str, name: &str) -> inferq::registry::Manifest {
        self.add_shape_model_with(file, name, NewVersion::default())
    }

    /// [`TempRegistry::add_shape_model`] with settings (padding, batching).
    pub fn add_shape_model_with(
        &self,
        file: &str,
        name: &str,
        new: NewVersion,
    ) -> inferq::registry::Manifest {
        self.registry
            .add(&shape_model_path(file), name, new, inspect)
            .unwrap_or_else(|e| panic!("add {file} as {name}: {e}"))
    }

    /// Asserts that `name` has exactly versions 1..=n, each manifest naming its own
    /// version and the hash of demo model `model`, every file verifying, and no
    /// temporary directory left behind (what concurrent adds must leave).
    pub fn assert_intact(&self, name: &str, model: &str, n: usize) {
        let expected: Vec<u64> = (1..=n as u64).collect();
        assert_eq!(self.registry.versions(name).expect("versions"), expected);
        let sha = inferq::registry::sha256_hex(&model_bytes(model));
        for v in expected {
            let (m, _) = self
                .registry
                .load(name, Some(v))
                .unwrap_or_else(|e| panic!("{name}@{v}: {e}"));
            assert_eq!((m.version, m.sha256.as_str()), (v, sha.as_str()));
        }
        let leftovers: Vec<_> = std::fs::read_dir(self.path().join(name))
            .expect("model dir")
            .map(|e| e.expect("entry").file_name())
            .filter(|f| f.to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
    }

    /// The registry directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}
