//! Redis Streams: every key and command of the protocol (docs/PROTOCOL.md).
//!
//! - [`submit`]: the gateway's side: enqueue atomically, read records, cancel.
//! - [`consume`]: the worker's side: group, reads, running marks, terminal writes.
//! - [`reader`]: the worker's hot read on a socket of its own.
//! - [`janitor`]: reclaiming idle entries, safe trimming, stale consumers.
//! - [`dlq`]: the dead-letter stream's operations.
//! - [`notify`]: one subscription per process fanning completions out to waiters.
//!
//! Nothing here knows tensors, ONNX Runtime or HTTP status codes.

pub mod conn;
pub mod consume;
pub mod dlq;
pub mod janitor;
pub mod keys;
pub mod notify;
pub mod reader;
mod script;
pub mod submit;

pub use conn::{Conn, RedisTarget};
pub use keys::{GROUP, Keys};

/// Queue failures; `Redis` names the action that failed.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// A Redis command failed (connection, timeout, server error).
    #[error("redis: {action}: {source}")]
    Redis {
        /// What inferq was doing.
        action: &'static str,
        /// The client's error.
        source: redis::RedisError,
    },
    /// Redis refused a write because it is out of memory.
    #[error("redis is out of memory (maxmemory reached): {0}")]
    OutOfMemory(String),
    /// A wrong setting.
    #[error("{0}")]
    Config(String),
    /// Redis answered something the protocol does not allow.
    #[error("unexpected reply from redis while trying to {0}")]
    Protocol(&'static str),
}

impl QueueError {
    /// Wraps a redis error with the action it interrupted; OOM becomes its own variant.
    pub fn redis(action: &'static str) -> impl Fn(redis::RedisError) -> QueueError {
        move |source| {
            if source.code() == Some("OOM") {
                QueueError::OutOfMemory(source.to_string())
            } else {
                QueueError::Redis { action, source }
            }
        }
    }

    /// Whether the same command may succeed later. Only errors known to fail the same
    /// way every time are terminal: a key of the wrong type and a script's own error
    /// (a Lua limit such as `unpack`'s); retrying those would wedge the caller for
    /// ever. Everything else (connection trouble, timeouts, OOM — also inside an
    /// aborted transaction —, a loading or failing-over server, a busy script, and any
    /// error not recognised) is retried, as before.
    pub fn retry(&self) -> crate::error::Retry {
        use crate::error::Retry;
        match self {
            QueueError::OutOfMemory(_) => Retry::Retryable,
            QueueError::Redis { source, .. } => {
                let text = source.to_string();
                let script_error = source.code() == Some("ERR")
                    && (text.contains("user_script") || text.contains("Error running script"));
                if text.contains("OOM") || source.is_io_error() || source.is_timeout() {
                    Retry::Retryable
                } else if source.code() == Some("WRONGTYPE") || script_error {
                    Retry::Terminal
                } else {
                    Retry::Retryable
                }
            }
            QueueError::Config(_) | QueueError::Protocol(_) => Retry::Retryable,
        }
    }

    /// True when a command may have run although no answer came back: a timeout, or
    /// a connection lost once the request may have gone out, or an answer inferq cannot
    /// read. False when Redis answered with an error (OOM, a script error: it did not
    /// run) and when no connection could be opened (nothing was sent).
    pub fn may_have_run(&self) -> bool {
        match self {
            QueueError::Redis { source, .. } => {
                source.is_io_error() && !source.is_connection_refusal()
            }
            QueueError::Protocol(_) => true,
            QueueError::OutOfMemory(_) | QueueError::Config(_) => false,
        }
    }

    /// True when the stream or its group vanished (Redis restarted without persistence).
    pub fn is_nogroup(&self) -> bool {
        matches!(self, QueueError::Redis { source, .. } if source.code() == Some("NOGROUP"))
    }
}

/// Bytes of a Redis bulk reply as text (lossy for non-UTF-8).
pub(crate) fn text(v: &redis::Value) -> Option<String> {
    match v {
        redis::Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        redis::Value::SimpleString(s) => Some(s.clone()),
        redis::Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

/// The integer in a reply (also accepting a numeric string).
fn int(v: &redis::Value) -> Option<i64> {
    match v {
        redis::Value::Int(i) => Some(*i),
        other => text(other)?.parse().ok(),
    }
}
