//! One configuration for every role: a TOML file, then `INFERQ_*` environment
//! variables, then flags, each overriding the one before. Validated once at start;
//! roles receive typed parts of it and never re-read it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

/// The most rows a batch may have, whatever a setting or a manifest says: one
/// batch's results go to Redis in one script call, whose arguments must stay far
/// below Lua's limits.
pub const MAX_BATCH_ROWS: usize = 2048;

/// The `--help` headings the settings are grouped under: some 30 settings in one
/// list hid the few an operator looks for (clap's `help_heading`).
pub mod heading {
    /// Where models come from, and the config file.
    pub const REGISTRY: &str = "Registry and config file";
    /// The Redis to use, or the one `serve` starts.
    pub const REDIS: &str = "Redis";
    /// The HTTP front door (`gateway`, `serve`).
    pub const HTTP: &str = "HTTP front door";
    /// How workers take and batch jobs.
    pub const WORKER: &str = "Workers and batching";
    /// Retries, reclaim, backlog and retention.
    pub const QUEUE: &str = "Queue";
    /// Sizes refused before anything is decoded.
    pub const LIMITS: &str = "Limits";
    /// Every role's metrics listener, shutdown, logging and threads.
    pub const PROCESS: &str = "Process";
    /// Every heading, in the order `--help` shows them.
    pub const ALL: [&str; 7] = [REGISTRY, REDIS, HTTP, PROCESS, WORKER, QUEUE, LIMITS];
}

/// Every setting. Doc comments become `--help`; each has an `INFERQ_` variable.
#[derive(Args, Clone)]
pub struct Settings {
    /// Model registry directory.
    #[arg(
        long,
        env = "INFERQ_MODELS",
        default_value = "./models",
        global = true,
        help_heading = heading::REGISTRY
    )]
    pub models: PathBuf,

    /// Redis: redis://, rediss:// or redis+unix:// URL; a comma-separated list of node
    /// URLs means Redis Cluster. Unset: `serve` starts a private redis-server;
    /// `gateway` and `worker` refuse to start. May hold a password: its value is never
    /// shown; INFERQ_REDIS_URL_FILE names a file holding it instead (a mounted secret).
    #[arg(
        long,
        env = "INFERQ_REDIS_URL",
        hide_env_values = true,
        global = true,
        help_heading = heading::REDIS
    )]
    pub redis_url: Option<String>,

    /// For rediss:// URLs: a PEM file of the certificate authorities to trust (unset:
    /// the system's trust store).
    #[arg(
        long,
        env = "INFERQ_REDIS_CA_FILE",
        global = true,
        help_heading = heading::REDIS
    )]
    pub redis_ca_file: Option<PathBuf>,

    /// For rediss:// URLs with client authentication: this client's PEM certificate
    /// (with INFERQ_REDIS_CLIENT_KEY_FILE).
    #[arg(
        long,
        env = "INFERQ_REDIS_CLIENT_CERT_FILE",
        global = true,
        help_heading = heading::REDIS
    )]
    pub redis_client_cert_file: Option<PathBuf>,

    /// For rediss:// URLs with client authentication: the PEM key of
    /// INFERQ_REDIS_CLIENT_CERT_FILE.
    #[arg(
        long,
        env = "INFERQ_REDIS_CLIENT_KEY_FILE",
        global = true,
        help_heading = heading::REDIS
    )]
    pub redis_client_key_file: Option<PathBuf>,

    /// Address of the HTTP front door.
    #[arg(
        long,
        env = "INFERQ_LISTEN",
        default_value = "127.0.0.1:8080",
        global = true,
        help_heading = heading::HTTP
    )]
    pub listen: SocketAddr,

    /// Address for /metrics and the health routes (every role has one).
    #[arg(
        long,
        env = "INFERQ_METRICS_LISTEN",
        default_value = "127.0.0.1:9464",
        global = true,
        help_heading = heading::PROCESS
    )]
    pub metrics_listen: SocketAddr,

    /// Models a worker serves (comma-separated); empty means every model in the registry.
    #[arg(
        long,
        env = "INFERQ_SERVE_MODELS",
        value_delimiter = ',',
        global = true,
        help_heading = heading::WORKER
    )]
    pub serve_models: Vec<String>,

    /// Rows per batch (a model's manifest may override it).
    #[arg(
        long,
        env = "INFERQ_MAX_BATCH",
        default_value_t = 64,
        global = true,
        help_heading = heading::WORKER
    )]
    pub max_batch: usize,

    /// Padded elements per batch, for models that declare padding: rows × padded
    /// length (the product of the padded axes), TEI's max_batch_tokens in spirit; a
    /// model's manifest may override it. 0: no bound beyond INFERQ_MAX_BATCH.
    #[arg(
        long,
        env = "INFERQ_MAX_BATCH_ELEMENTS",
        default_value_t = 16_384,
        global = true,
        help_heading = heading::WORKER
    )]
    pub max_batch_elements: usize,

    /// Extra wait in ms for more rows when a batch is not full (0: never wait).
    #[arg(
        long,
        env = "INFERQ_MAX_WAIT_MS",
        default_value_t = 0,
        global = true,
        help_heading = heading::WORKER
    )]
    pub max_wait_ms: u64,

    /// Inference threads per model, each with its own ONNX Runtime session.
    #[arg(
        long,
        env = "INFERQ_INFER_THREADS",
        default_value_t = 1,
        global = true,
        help_heading = heading::WORKER
    )]
    pub infer_threads: usize,

    /// ONNX Runtime intra-op threads per session.
    #[arg(
        long,
        env = "INFERQ_INTRA_THREADS",
        default_value_t = 1,
        global = true,
        help_heading = heading::WORKER
    )]
    pub intra_threads: usize,

    /// Seconds a terminal job record (and its reply list) stays readable.
    #[arg(
        long,
        env = "INFERQ_RESULT_TTL_S",
        default_value_t = 3600,
        global = true,
        help_heading = heading::QUEUE
    )]
    pub result_ttl_s: u64,

    /// A delivered job idle this long (ms) is reclaimed by another worker.
    #[arg(
        long,
        env = "INFERQ_CLAIM_AFTER_MS",
        default_value_t = 30_000,
        global = true,
        help_heading = heading::QUEUE
    )]
    pub claim_after_ms: u64,

    /// Deliveries before a job is dead-lettered.
    #[arg(
        long,
        env = "INFERQ_MAX_ATTEMPTS",
        default_value_t = 3,
        global = true,
        help_heading = heading::QUEUE
    )]
    pub max_attempts: u32,

    /// Backlog per model above which submits get 429.
    #[arg(
        long,
        env = "INFERQ_MAX_QUEUE",
        default_value_t = 100_000,
        global = true,
        help_heading = heading::QUEUE
    )]
    pub max_queue: u64,

    /// How long (ms) a synchronous infer waits before answering 202.
    #[arg(
        long,
        env = "INFERQ_SYNC_TIMEOUT_MS",
        default_value_t = 30_000,
        global = true,
        help_heading = heading::HTTP
    )]
    pub sync_timeout_ms: u64,

    /// How long (ms) shutdown waits for in-flight batches and requests.
    #[arg(
        long,
        env = "INFERQ_DRAIN_TIMEOUT_MS",
        default_value_t = 30_000,
        global = true,
        help_heading = heading::PROCESS
    )]
    pub drain_timeout_ms: u64,

    /// This worker's consumer name in the group (default: host name and pid).
    #[arg(
        long,
        env = "INFERQ_CONSUMER",
        global = true,
        help_heading = heading::WORKER
    )]
    pub consumer: Option<String>,

    /// API keys (comma-separated); when set, every route but health needs
    /// `Authorization: Bearer <key>`. Never shown; INFERQ_API_KEYS_FILE names a file
    /// holding them instead (a mounted secret).
    #[arg(
        long,
        env = "INFERQ_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true,
        global = true,
        help_heading = heading::HTTP
    )]
    pub api_keys: Vec<String>,

    /// Largest request body in bytes.
    #[arg(
        long,
        env = "INFERQ_MAX_BODY_BYTES",
        default_value_t = 6_553_500,
        global = true,
        help_heading = heading::LIMITS
    )]
    pub max_body_bytes: usize,

    /// Largest tensor per job, in elements.
    #[arg(
        long,
        env = "INFERQ_MAX_ELEMENTS",
        default_value_t = 4_000_000,
        global = true,
        help_heading = heading::LIMITS
    )]
    pub max_elements: usize,

    /// Most fields a stream entry may have; an entry with more is answered (or
    /// dead-lettered, truncated) without being parsed.
    #[arg(
        long,
        env = "INFERQ_MAX_ENTRY_FIELDS",
        default_value_t = 32,
        global = true,
        help_heading = heading::LIMITS
    )]
    pub max_entry_fields: usize,

    /// Most bytes a stream entry may hold (all fields and values); a larger one is
    /// answered `too_large` without being decoded.
    #[arg(
        long,
        env = "INFERQ_MAX_ENTRY_BYTES",
        default_value_t = 64 << 20,
        global = true,
        help_heading = heading::LIMITS
    )]
    pub max_entry_bytes: usize,

    /// Cap on a long-poll's `?wait=` in seconds.
    #[arg(
        long,
        env = "INFERQ_MAX_POLL_WAIT_S",
        default_value_t = 60,
        global = true,
        help_heading = heading::HTTP
    )]
    pub max_poll_wait_s: u64,

    /// Time (ms) a client has to send a request's headers; an idle keep-alive
    /// connection is closed after it too, so trickled headers cannot hold a slot.
    #[arg(
        long,
        env = "INFERQ_HEADER_TIMEOUT_MS",
        default_value_t = 10_000,
        global = true,
        help_heading = heading::HTTP
    )]
    pub header_timeout_ms: u64,

    /// Time (ms) a client has to send a whole request body once its headers are in.
    /// Past it the request is answered 408 and the connection closed, so a body
    /// trickled a byte at a time cannot hold a connection or a sync-infer slot.
    #[arg(
        long,
        env = "INFERQ_BODY_TIMEOUT_MS",
        default_value_t = 30_000,
        global = true,
        help_heading = heading::HTTP
    )]
    pub body_timeout_ms: u64,

    /// Open connections to the front door at once; more wait in the listen backlog.
    #[arg(
        long,
        env = "INFERQ_MAX_CONNECTIONS",
        default_value_t = 4096,
        global = true,
        help_heading = heading::HTTP
    )]
    pub max_connections: usize,

    /// Open connections from one peer address at once; more are closed as soon as
    /// they are accepted, so one host cannot take every connection slot. 0: no cap
    /// per peer (behind a proxy, which is then the only peer).
    #[arg(
        long,
        env = "INFERQ_MAX_CONNECTIONS_PER_PEER",
        default_value_t = 1024,
        global = true,
        help_heading = heading::HTTP
    )]
    pub max_connections_per_peer: usize,

    /// Request-body bytes the front door holds at once, over all requests (a
    /// declared Content-Length counts in full from the start). A request that would
    /// pass it is answered 503 with Retry-After instead of growing memory; decoding
    /// takes a few times the body on top, so size this at a fraction of the memory
    /// limit. At least INFERQ_MAX_BODY_BYTES.
    #[arg(
        long,
        env = "INFERQ_MAX_INFLIGHT_BYTES",
        default_value_t = 64 << 20,
        global = true,
        help_heading = heading::HTTP
    )]
    pub max_inflight_bytes: usize,

    /// Allowed CORS origin (`*` for any); unset means no CORS headers.
    #[arg(
        long,
        env = "INFERQ_CORS_ORIGIN",
        global = true,
        help_heading = heading::HTTP
    )]
    pub cors_origin: Option<String>,

    /// Seconds a dead-lettered entry (which holds the job's inputs) is kept.
    #[arg(
        long,
        env = "INFERQ_DLQ_RETENTION_S",
        default_value_t = 7 * 24 * 3600,
        global = true,
        help_heading = heading::QUEUE
    )]
    pub dlq_retention_s: u64,

    /// Data directory of the embedded redis-server that `serve` starts.
    #[arg(
        long,
        env = "INFERQ_DATA_DIR",
        default_value = "./.data",
        global = true,
        help_heading = heading::REDIS
    )]
    pub data_dir: PathBuf,

    /// `maxmemory` of the embedded redis-server, in MiB. Without a limit its
    /// `noeviction` policy never acts and Redis grows until the kernel kills it; with
    /// one, a full Redis refuses new jobs (HTTP 503) and keeps every accepted one.
    #[arg(
        long,
        env = "INFERQ_EMBEDDED_MAXMEMORY_MB",
        default_value_t = 1024,
        global = true,
        help_heading = heading::REDIS
    )]
    pub embedded_maxmemory_mb: u64,

    /// Log format on stderr (the level comes from RUST_LOG).
    #[arg(
        long,
        env = "INFERQ_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Text,
        global = true,
        help_heading = heading::PROCESS
    )]
    pub log_format: LogFormat,

    /// Async threads of the process (Redis I/O, HTTP, result building; inference has
    /// threads of its own). Default: 1 for `worker`, where more only add context
    /// switches on a small host, else the number of cores.
    #[arg(
        long,
        env = "INFERQ_ASYNC_THREADS",
        global = true,
        help_heading = heading::PROCESS
    )]
    pub async_threads: Option<usize>,
}

/// How logs are written. A closed set as a `ValueEnum`, so `--help` lists the values
/// and clap refuses (and suggests for) anything else before a role starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, coloured on a terminal.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// What a worker needs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Models to serve; empty = all.
    pub models: Vec<String>,
    /// Consumer name.
    pub consumer: String,
    /// Default batching.
    pub batch: BatchConfig,
    /// Inference threads per model.
    pub infer_threads: usize,
    /// ORT intra-op threads per session.
    pub intra_threads: usize,
    /// Queue behaviour.
    pub queue: QueueConfig,
    /// Shutdown deadline.
    pub drain_timeout: Duration,
}

/// Batch forming policy for one model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    /// Rows per batch.
    pub max_batch: usize,
    /// Padded elements per batch of a padded model (0: no bound).
    pub max_elements: usize,
    /// Extra wait for more rows.
    pub max_wait: Duration,
}

/// Queue behaviour shared by gateway and worker.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// TTL of terminal records.
    pub result_ttl_s: u64,
    /// Idle time before reclaim.
    pub claim_after: Duration,
    /// Deliveries before dead-lettering.
    pub max_attempts: u32,
    /// Backlog cap per model.
    pub max_queue: u64,
    /// Per-job element cap.
    pub max_elements: usize,
    /// Bounds of one stream entry, checked before anything is copied or decoded.
    pub entry_limits: crate::protocol::job::EntryLimits,
    /// Dead-letter retention.
    pub dlq_retention_s: u64,
}

impl Settings {
    /// Treats an empty value (`INFERQ_API_KEYS=` in a compose file) as unset.
    pub fn drop_empty_values(&mut self) {
        self.api_keys.retain(|k| !k.trim().is_empty());
        self.serve_models.retain(|m| !m.trim().is_empty());
        self.redis_url = self.redis_url.take().filter(|u| !u.trim().is_empty());
        self.cors_origin = self.cors_origin.take().filter(|o| !o.trim().is_empty());
        self.consumer = self.consumer.take().filter(|c| !c.trim().is_empty());
    }

    /// Checks every setting once, with a message naming the setting.
    pub fn validate(&self) -> Result<(), String> {
        let positive = |v: u64, name: &str| {
            if v == 0 {
                Err(format!("{name} must be at least 1"))
            } else {
                Ok(())
            }
        };
        positive(self.max_batch as u64, "INFERQ_MAX_BATCH")?;
        if self.async_threads == Some(0) {
            return Err("INFERQ_ASYNC_THREADS must be at least 1".into());
        }
        if self.max_batch > MAX_BATCH_ROWS {
            return Err(format!(
                "INFERQ_MAX_BATCH must be at most {MAX_BATCH_ROWS} rows (one result script per batch)"
            ));
        }
        positive(self.infer_threads as u64, "INFERQ_INFER_THREADS")?;
        positive(self.intra_threads as u64, "INFERQ_INTRA_THREADS")?;
        positive(self.result_ttl_s, "INFERQ_RESULT_TTL_S")?;
        positive(self.claim_after_ms, "INFERQ_CLAIM_AFTER_MS")?;
        positive(u64::from(self.max_attempts), "INFERQ_MAX_ATTEMPTS")?;
        positive(self.max_queue, "INFERQ_MAX_QUEUE")?;
        positive(self.max_body_bytes as u64, "INFERQ_MAX_BODY_BYTES")?;
        positive(self.max_elements as u64, "INFERQ_MAX_ELEMENTS")?;
        if !(16..=1000).contains(&self.max_entry_fields) {
            // The protocol's own fields must fit, and a dead letter's copy must stay
            // far below Lua's unpack limit (about 8,000 values).
            return Err("INFERQ_MAX_ENTRY_FIELDS must be 16 to 1000".into());
        }
        positive(self.max_entry_bytes as u64, "INFERQ_MAX_ENTRY_BYTES")?;
        positive(self.embedded_maxmemory_mb, "INFERQ_EMBEDDED_MAXMEMORY_MB")?;
        // Deadlines are added to the clock: bounded, so that can never overflow.
        let at_most = |v: u64, max: u64, name: &str| {
            if v > max {
                Err(format!("{name} must be at most {max}"))
            } else {
                Ok(())
            }
        };
        for (v, name) in [
            (self.header_timeout_ms, "INFERQ_HEADER_TIMEOUT_MS"),
            (self.body_timeout_ms, "INFERQ_BODY_TIMEOUT_MS"),
        ] {
            positive(v, name)?;
            at_most(v, 3_600_000, name)?;
        }
        // AUDIT D27: near u64::MAX these panicked when a request added them to the clock.
        at_most(self.sync_timeout_ms, 3_600_000, "INFERQ_SYNC_TIMEOUT_MS")?;
        at_most(self.max_poll_wait_s, 3600, "INFERQ_MAX_POLL_WAIT_S")?;
        positive(self.max_connections as u64, "INFERQ_MAX_CONNECTIONS")?;
        if self.max_inflight_bytes < self.max_body_bytes {
            return Err(format!(
                "INFERQ_MAX_INFLIGHT_BYTES ({}) must be at least INFERQ_MAX_BODY_BYTES ({}), or no body of the largest size is ever accepted",
                self.max_inflight_bytes, self.max_body_bytes
            ));
        }
        if let Some(url) = &self.redis_url {
            for u in url.split(',') {
                let scheme_ok = ["redis://", "rediss://", "redis+unix://", "unix://"]
                    .iter()
                    .any(|s| u.trim().starts_with(s));
                if !scheme_ok {
                    return Err(format!(
                        "INFERQ_REDIS_URL: `{}` must start with redis://, rediss:// or redis+unix://",
                        redact_url(u)
                    ));
                }
            }
        }
        for m in &self.serve_models {
            if !crate::registry::valid_name(m) {
                return Err(format!(
                    "INFERQ_SERVE_MODELS: `{m}` is not a valid model name"
                ));
            }
        }
        if self.api_keys.iter().any(|k| k.len() < 8) {
            return Err("INFERQ_API_KEYS: every key must be at least 8 characters".into());
        }
        Ok(())
    }

    /// The worker's part.
    pub fn worker(&self) -> WorkerConfig {
        WorkerConfig {
            models: self.serve_models.clone(),
            consumer: self.consumer.clone().unwrap_or_else(default_consumer),
            batch: BatchConfig {
                max_batch: self.max_batch,
                max_elements: self.max_batch_elements,
                max_wait: Duration::from_millis(self.max_wait_ms),
            },
            infer_threads: self.infer_threads,
            intra_threads: self.intra_threads,
            queue: self.queue(),
            drain_timeout: Duration::from_millis(self.drain_timeout_ms),
        }
    }

    /// The queue part.
    pub fn queue(&self) -> QueueConfig {
        QueueConfig {
            result_ttl_s: self.result_ttl_s,
            claim_after: Duration::from_millis(self.claim_after_ms),
            max_attempts: self.max_attempts,
            max_queue: self.max_queue,
            max_elements: self.max_elements,
            entry_limits: crate::protocol::job::EntryLimits {
                max_fields: self.max_entry_fields,
                max_bytes: self.max_entry_bytes,
            },
            dlq_retention_s: self.dlq_retention_s,
        }
    }
}

/// `host-pid`: unique per process, stable for a process's life.
pub fn default_consumer() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into());
    format!("{host}-{}", std::process::id())
}

mod file;
mod secrets;

pub use file::read_file;
pub use secrets::{SECRETS, is_secret, is_secret_variable, redact_url, secret_from_file};
