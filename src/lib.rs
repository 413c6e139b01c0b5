//! # inferq
//!
//! Asynchronous, queue-based batch inference: producers put jobs on Redis Streams,
//! workers pull micro-batches, run ONNX Runtime, and write each result back to Redis.
//!
//! # Layout
//!
//! The data flow, front to back:
//!
//! ```text
//! api (HTTP) ──► queue::submit ──► Redis stream inferq:{m}:jobs
//!                                        │
//!        worker: queue::reader ──► batcher ──► runtime (ORT threads) ──► queue::results
//!                                        │
//! api (poll / long-poll) ◄── job record inferq:{m}:job:<id> + done channel
//! ```
//!
//! - [`protocol`]: wire formats (job entry fields, OIP v2 JSON, binary tensors, job records).
//! - [`registry`]: the versioned model repository on disk.
//! - [`runtime`]: ONNX Runtime sessions on owned threads; signature validation.
//! - [`config`]: one set of settings from file, environment and flags, validated once.
//! - [`cli`]: the binary's roles and tools.

pub mod api;
pub mod batcher;
pub mod cli;
pub mod config;
pub mod embedded;
pub mod error;
pub mod health;
pub mod metrics;
pub mod producer;
pub mod protocol;
pub mod queue;
pub mod registry;
pub mod runtime;
pub mod shutdown;
pub mod telemetry;
pub mod worker;

pub use error::now_ms;
