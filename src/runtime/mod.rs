//! ONNX Runtime: the process-wide environment, sessions on threads the runtime owns,
//! tensor conversion, warm-up, and validation against a model's signature.
//!
//! Nothing here touches async threads, Redis or job ids: a batch arrives as tensors
//! grouped per job and leaves as tensors grouped per job.

pub mod faults;
mod library;
pub mod padding;
pub mod pool;
pub mod session;
pub mod signature;

use std::sync::OnceLock;

pub use library::locate;
pub use padding::Padding;
pub use pool::{InferPool, LoadedModel};
pub use session::{ModelSession, stackable};
pub use signature::{InvalidInput, Signature, TensorSpec, ValidInputs};

/// Runtime failures; every one names the model it concerns where there is one.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RuntimeError {
    /// The shared library is missing or did not load.
    #[error("{0}")]
    Library(String),
    /// ORT refused the model file.
    #[error("model {model}: ONNX Runtime cannot load it: {message}")]
    Load {
        /// `name@version` or a file name.
        model: String,
        /// ORT's message.
        message: String,
    },
    /// ORT failed while running a batch.
    #[error("model {model}: inference failed: {message}")]
    Run {
        /// `name@version`.
        model: String,
        /// ORT's message.
        message: String,
    },
    /// Inference panicked on this job's data (a bug inferq must not retry into): it
    /// was caught, the session rebuilt, and the job is dead-lettered with this reason.
    #[error("model {model}: inference panicked: {message}")]
    Panicked {
        /// `name@version`.
        model: String,
        /// The panic's message.
        message: String,
    },
    /// The inference threads are gone (shutdown).
    #[error("model {0}: inference threads stopped")]
    Stopped(String),
}

static ENVIRONMENT: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();

/// The process-wide ORT environment, loading the library on first use. Loading
/// happens once per process; later calls return the same outcome.
pub fn environment() -> Result<&'static ort::environment::Environment, RuntimeError> {
    ENVIRONMENT
        .get_or_init(|| {
            let path = locate()?;
            let builder = ort::init_from(&path)
                .map_err(|e| format!("cannot load ONNX Runtime from {}: {e}", path.display()))?;
            builder
                .with_name("inferq")
                .with_telemetry(false)
                .build()
                .map_err(|e| format!("cannot start ONNX Runtime from {}: {e}", path.display()))
        })
        .as_ref()
        .map_err(|e| RuntimeError::Library(e.clone()))
}

/// The loaded library's version string (for build info and `/v2`).
pub fn version() -> String {
    match environment() {
        Ok(_) => ort::info()
            .split(['=', ','])
            .find_map(|w| w.trim().strip_prefix("rel-"))
            .map(str::to_owned)
            // Release wheels are built from a tag (`git-branch=HEAD`): the library's
            // file name (`libonnxruntime.so.1.32.0`, behind the `.so` link) says it.
            .or_else(version_from_file_name)
            .unwrap_or_else(|| "unknown".to_owned()),
        Err(_) => "unavailable".to_owned(),
    }
}

/// `1.32.0` from the resolved `libonnxruntime.so.1.32.0`.
fn version_from_file_name() -> Option<String> {
    let path = std::fs::canonicalize(locate().ok()?).ok()?;
    let name = path.file_name()?.to_str()?;
    let v = name.split_once(".so.")?.1;
    v.chars()
        .all(|c| c.is_ascii_digit() || c == '.')
        .then(|| v.to_owned())
}
