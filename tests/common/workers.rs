//! Workers for the queue tests: in-process ones (this process's metrics are then
//! theirs) and `inferq worker` processes that can be killed, stopped, resumed and
//! scraped; plus reading metrics.

use std::path::Path;
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use inferq::config::{BatchConfig, QueueConfig, WorkerConfig};
use inferq::queue::RedisTarget;
use inferq::worker::Worker;
use tokio_util::sync::CancellationToken;

use super::{RedisServer, TempRegistry, inferq_command};

/// Worker settings for tests: one inference thread, `max_batch` 64, no `max_wait`,
/// `claim_after` 500 ms, 3 attempts, a 10 s drain.
pub fn worker_config(model: &str, consumer: &str) -> WorkerConfig {
    WorkerConfig {
        models: vec![model.to_owned()],
        consumer: consumer.to_owned(),
        batch: BatchConfig {
            max_batch: 64,
            max_elements: 16_384,
            max_wait: Duration::ZERO,
        },
        infer_threads: 1,
        intra_threads: 1,
        queue: QueueConfig {
            result_ttl_s: 3600,
            claim_after: Duration::from_millis(500),
            max_attempts: 3,
            max_queue: 100_000,
            max_elements: 4_000_000,
            entry_limits: inferq::protocol::job::EntryLimits {
                max_fields: 32,
                max_bytes: 64 << 20,
            },
            dlq_retention_s: 7 * 24 * 3600,
        },
        drain_timeout: Duration::from_secs(10),
    }
}

/// Starts an in-process worker (this process's metrics then show its counters).
pub async fn start_worker(
    redis: &RedisServer,
    registry: &TempRegistry,
    cfg: WorkerConfig,
) -> Worker {
    super::init_ort();
    let target = RedisTarget::parse(&redis.url()).expect("a valid redis URL");
    Worker::start(
        cfg,
        registry.registry.clone(),
        target,
        CancellationToken::new(),
    )
    .await
    .unwrap_or_else(|e| panic!("start an in-process worker: {e}"))
}

/// A loopback port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Sum of the series of metric `name` with `model="<model>"` in a `/metrics` text.
pub fn metric_in(text: &str, name: &str, model: &str) -> f64 {
    let label = format!("model=\"{model}\"");
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{'))
                && l.contains(&label)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>()
        + 0.0 // an empty sum is -0.0
}

/// Sum of every series of metric `name` (a counter, or a histogram's `_sum`/`_count`)
/// whose `model` label is `model`, in this process.
pub fn metric(name: &str, model: &str) -> f64 {
    metric_in(&inferq::metrics::metrics().render(), name, model)
}

/// The cumulative buckets (`le`, count) of histogram `name` for `model`.
pub fn histogram_buckets(name: &str, model: &str) -> Vec<(String, f64)> {
    let label = format!("model=\"{model}\"");
    let prefix = format!("{name}_bucket{{");
    inferq::metrics::metrics()
        .render()
        .lines()
        .filter(|l| l.starts_with(&prefix) && l.contains(&label))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?.to_owned();
            Some((le, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect()
}

/// An `inferq worker` process on a test Redis and registry, its log in a temporary
/// file. Killed (SIGKILL) on drop.
#[derive(Debug)]
pub struct WorkerProcess {
    child: Child,
    consumer: String,
    metrics_port: u16,
    log: tempfile::NamedTempFile,
    exit: Option<ExitStatus>,
}

impl WorkerProcess {
    /// Starts `inferq worker` as consumer `consumer`, serving every model of
    /// `models`, with `env` (e.g. `INFERQ_CLAIM_AFTER_MS`) on top of the defaults
    /// (metrics on a free port, logs at info).
    pub fn spawn(
        redis: &RedisServer,
        models: &Path,
        consumer: &str,
        env: &[(&str, &str)],
    ) -> WorkerProcess {
        WorkerProcess::spawn_role("worker", redis, models, consumer, env)
    }

    /// Like [`WorkerProcess::spawn`], for any long-running role (`worker`, `gateway`,
    /// `serve`); the HTTP listener of the latter two is on a free port.
    pub fn spawn_role(
        role: &str,
        redis: &RedisServer,
        models: &Path,
        consumer: &str,
        env: &[(&str, &str)],
    ) -> WorkerProcess {
        let log = tempfile::NamedTempFile::new().expect("log file");
        let metrics_port = free_port();
        let mut cmd = inferq_command();
        cmd.arg(role)
            .env("INFERQ_LISTEN", format!("127.0.0.1:{}", free_port()))
            .env("INFERQ_REDIS_URL", redis.url())
            .env("INFERQ_MODELS", models)
            .env("INFERQ_CONSUMER", consumer)
            .env("INFERQ_METRICS_LISTEN", format!("127.0.0.1:{metrics_port}"))
            .env("RUST_LOG", "inferq=info")
            .stdout(Stdio::null())
            .stderr(log.reopen().expect("log file handle"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start inferq {role}: {e}"));
        WorkerProcess {
            child,
            consumer: consumer.to_owned(),
            metrics_port,
            log,
            exit: None,
        }
    }

    /// Its consumer name.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its `/metrics` text, or `None` when the listener does not answer.
    pub fn metrics(&self) -> Option<String> {
        use std::io::{Read, Write};
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.metrics_port));
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        (head.split_whitespace().nth(1) == Some("200")).then(|| body.to_owned())
    }

    /// Its log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// Sends a signal (`-STOP`, `-CONT`, `-TERM`, `-KILL`).
    pub fn signal(&self, sig: &str) {
        let status = std::process::Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {sig} {} failed", self.pid());
    }

    /// A signal ready to go: a shell already waits to send it, so [`Armed::fire`]
    /// delivers it within a fraction of a millisecond (spawning `kill` takes several).
    pub fn arm(&self, sig: &str) -> Armed {
        let child = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("read _ && exec kill {sig} {}", self.pid()))
            .stdin(Stdio::piped())
            .spawn()
            .expect("spawn sh");
        Armed(child)
    }

    /// SIGSTOP: frozen with its connections open, as a paused VM or a long GC looks.
    pub fn stop(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT.
    pub fn cont(&self) {
        self.signal("-CONT");
    }

    /// SIGTERM: the orderly shutdown request.
    pub fn term(&self) {
        self.signal("-TERM");
    }

    /// SIGKILL, then reaps it: a crash with nothing flushed.
    pub fn kill(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            self.exit = self.child.wait().ok();
        }
    }

    /// Asserts the process exits 0 no later than `within` after `since` (the signal),
    /// waiting at most `wait` for it.
    pub fn expect_clean_exit(&mut self, since: Instant, within: Duration, wait: Duration) {
        let status = tokio::task::block_in_place(|| self.wait_exit(wait));
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(0),
            "exit after SIGTERM:\n{}",
            self.log()
        );
        assert!(since.elapsed() < within, "took {:?}", since.elapsed());
    }

    /// Waits at most `timeout` for it to exit; its status, or `None` if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while self.exit.is_none() {
            self.exit = self.child.try_wait().expect("try_wait");
            if self.exit.is_some() || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.exit
    }
}

/// A signal about to be sent; see [`WorkerProcess::arm`].
#[derive(Debug)]
pub struct Armed(Child);

impl Armed {
    /// Sends the signal and waits for `kill` to finish.
    pub fn fire(mut self) {
        use std::io::Write;
        let mut stdin = self.0.stdin.take().expect("piped stdin");
        stdin.write_all(b"go\n").expect("arm the signal");
        drop(stdin);
        let status = self.0.wait().expect("kill ran");
        assert!(status.success(), "kill failed: {status}");
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
