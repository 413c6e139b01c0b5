//! The per-version manifest: what was registered, its hash, its signature.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::runtime::{Padding, Signature};

/// Batching settings a model may carry; they override the process defaults for it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Batching {
    /// Rows per batch for this model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_batch: Option<usize>,
    /// Extra wait for more rows, in ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_wait_ms: Option<u64>,
    /// Padded elements per batch (rows × padded length) for this model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_batch_elements: Option<usize>,
}

/// `models/<name>/<version>/manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Model name.
    pub name: String,
    /// Positive version number.
    pub version: u64,
    /// Hex sha256 of `model.onnx`; a file that does not match is never loaded.
    pub sha256: String,
    /// Bytes in `model.onnx`.
    pub size: u64,
    /// When the version was added, unix ms.
    pub created_ms: u64,
    /// Inputs and outputs as ONNX Runtime reads them.
    #[serde(flatten)]
    pub signature: Signature,
    /// Free-form facts (dataset, accuracy …).
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Per-model batching overrides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batching: Option<Batching>,
    /// Axes that may be padded so jobs of different lengths share a batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub padding: Option<Padding>,
}
