//! Redis connections: one type for a single node or a cluster, reconnecting on its
//! own, with response timeouts long enough for blocking reads.
//!
//! A connection that stops answering without being closed (a failover, a NAT or
//! load balancer dropping the flow without a reset) is replaced: redis-rs's
//! connection manager reconnects after an I/O error, not after a response timeout,
//! so [`Healing`] builds a fresh manager when a command times out (AUDIT D4).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

use super::QueueError;

/// A multiplexed, self-reconnecting connection to a node or a cluster.
#[derive(Clone)]
pub enum Conn {
    /// One Redis node.
    Single(Healing),
    /// Redis Cluster; commands route by their first key's slot.
    Cluster(ClusterConnection),
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Conn::Single(_) => "Conn::Single",
            Conn::Cluster(_) => "Conn::Cluster",
        })
    }
}

/// TCP keepalive and user timeout for every Redis socket: an idle connection whose
/// peer vanished is found by keepalive probes (about 20 s), and one with data in
/// flight and no acknowledgement gives up after the user timeout, so the kernel ends
/// dead connections that no reset announced.
pub fn tcp_settings() -> redis::io::tcp::TcpSettings {
    redis::io::tcp::TcpSettings::default()
        .set_nodelay(true)
        .set_keepalive(keepalive())
        .set_user_timeout(USER_TIMEOUT)
}

/// See [`tcp_settings`]; also applied to the worker's own read socket.
pub fn keepalive() -> socket2::TcpKeepalive {
    socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(10))
        .with_interval(Duration::from_secs(5))
        .with_retries(2)
}

/// How long unacknowledged data may wait before the kernel drops the connection.
pub const USER_TIMEOUT: Duration = Duration::from_secs(20);

/// How to reach Redis; parsed once from `INFERQ_REDIS_URL`.
#[derive(Debug, Clone)]
pub struct RedisTarget {
    urls: Vec<String>,
    /// Certificates for `rediss://` (`None`: the system's trust store, no client cert).
    tls: Option<Arc<Tls>>,
}

/// PEM bytes for TLS connections.
struct Tls {
    root: Option<Vec<u8>>,
    client: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("root", &self.root.is_some())
            .field("client", &self.client.is_some())
            .finish()
    }
}

impl Tls {
    fn certificates(&self) -> redis::TlsCertificates {
        redis::TlsCertificates {
            client_tls: self
                .client
                .as_ref()
                .map(|(cert, key)| redis::ClientTlsConfig {
                    client_cert: cert.clone(),
                    client_key: key.clone(),
                }),
            root_cert: self.root.clone(),
        }
    }
}

/// Installs the process's TLS cryptography (ring) once, before the first TLS client.
fn tls_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // ring builds from crates.io with a C compiler alone (aws-lc-rs, rustls'
        // default, needs cmake); it lacks only the post-quantum key exchanges, hence
        // the deprecation note. Installing fails only when a provider is already set.
        #[allow(deprecated)]
        let provider = rustls::crypto::ring::default_provider();
        let _ = provider.install_default();
    });
}

impl RedisTarget {
    /// One URL, or a comma-separated list of cluster node URLs.
    pub fn parse(url: &str) -> Result<RedisTarget, QueueError> {
        let urls: Vec<String> = url
            .split(',')
            .map(|u| u.trim().replace("redis+unix://", "unix://"))
            .filter(|u| !u.is_empty())
            .collect();
        if urls.is_empty() {
            return Err(QueueError::Config("INFERQ_REDIS_URL is empty".into()));
        }
        Ok(RedisTarget { urls, tls: None })
    }

    /// Trusts the authorities in `ca` (PEM) for `rediss://`, and presents a client
    /// certificate when `cert` and `key` are given. Files are read once, here.
    pub fn with_tls_files(
        mut self,
        ca: Option<&std::path::Path>,
        cert: Option<&std::path::Path>,
        key: Option<&std::path::Path>,
    ) -> Result<RedisTarget, QueueError> {
        let read = |what: &str, p: &std::path::Path| {
            std::fs::read(p).map_err(|e| QueueError::Config(format!("{what} {}: {e}", p.display())))
        };
        let client = match (cert, key) {
            (Some(c), Some(k)) => Some((
                read("INFERQ_REDIS_CLIENT_CERT_FILE", c)?,
                read("INFERQ_REDIS_CLIENT_KEY_FILE", k)?,
            )),
            (None, None) => None,
            _ => {
                return Err(QueueError::Config(
                    "INFERQ_REDIS_CLIENT_CERT_FILE and INFERQ_REDIS_CLIENT_KEY_FILE go together"
                        .into(),
                ));
            }
        };
        let root = ca.map(|p| read("INFERQ_REDIS_CA_FILE", p)).transpose()?;
        if root.is_some() || client.is_some() {
            self.tls = Some(Arc::new(Tls { root, client }));
        }
        Ok(self)
    }

    /// True for a cluster (several node URLs).
    pub fn is_cluster(&self) -> bool {
        self.urls.len() > 1
    }

    /// The first node's URL, for pub/sub (classic PUBLISH reaches every node).
    pub fn first_url(&self) -> &str {
        &self.urls[0]
    }

    /// Opens a connection whose replies may take up to `response_timeout`.
    pub async fn connect(&self, response_timeout: Duration) -> Result<Conn, QueueError> {
        if self.is_cluster() {
            if self.urls.iter().any(|u| u.starts_with("rediss://")) {
                tls_provider();
            }
            let mut builder = ClusterClient::builder(self.urls.clone());
            if let Some(tls) = &self.tls {
                builder = builder.certs(tls.certificates());
            }
            let client = builder
                .tcp_settings(tcp_settings())
                .response_timeout(response_timeout)
                .connection_timeout(Duration::from_secs(2))
                .build()
                .map_err(QueueError::redis("connect to the cluster"))?;
            let conn = client
                .get_async_connection()
                .await
                .map_err(QueueError::redis("connect to the cluster"))?;
            return Ok(Conn::Cluster(conn));
        }
        let client = self.client(&self.urls[0])?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(response_timeout))
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_max_delay(Duration::from_secs(2))
            .set_number_of_retries(2);
        let conn = client
            .get_connection_manager_with_config(config.clone())
            .await
            .map_err(QueueError::redis("connect to Redis"))?;
        Ok(Conn::Single(Healing {
            inner: Arc::new(HealingInner {
                client,
                config,
                current: Mutex::new((0, conn)),
            }),
        }))
    }

    /// A client for one node, its sockets with [`tcp_settings`], and the configured
    /// certificates for `rediss://`.
    fn client(&self, url: &str) -> Result<redis::Client, QueueError> {
        use redis::IntoConnectionInfo;
        let info = url
            .into_connection_info()
            .map_err(QueueError::redis("parse INFERQ_REDIS_URL"))?
            .set_tcp_settings(tcp_settings());
        if !url.starts_with("rediss://") {
            return redis::Client::open(info).map_err(QueueError::redis("parse INFERQ_REDIS_URL"));
        }
        tls_provider();
        match &self.tls {
            Some(tls) => redis::Client::build_with_tls(info, tls.certificates()),
            None => redis::Client::open(info),
        }
        .map_err(QueueError::redis("set up TLS for INFERQ_REDIS_URL"))
    }

    /// A pub/sub connection (to the first node).
    pub async fn pubsub(&self) -> Result<redis::aio::PubSub, QueueError> {
        let client = self.client(self.first_url())?;
        client
            .get_async_pubsub()
            .await
            .map_err(QueueError::redis("subscribe"))
    }
}

/// A connection manager that is replaced when a command times out: the silent
/// socket is dropped with it (in-flight commands on it fail with their own
/// timeouts), and the next command goes to a fresh connection.
#[derive(Clone)]
pub struct Healing {
    inner: Arc<HealingInner>,
}

impl std::fmt::Debug for Healing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Healing(generation {})", self.current().0)
    }
}

struct HealingInner {
    client: redis::Client,
    config: ConnectionManagerConfig,
    /// The generation (bumped per replacement) and the manager in use.
    current: Mutex<(u64, ConnectionManager)>,
}

impl Healing {
    fn current(&self) -> (u64, ConnectionManager) {
        self.inner
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces generation `seen` with a fresh connection, unless another command
    /// already did; a failed connect leaves it for the next timeout to retry.
    async fn replace(&self, seen: u64) {
        if self.current().0 != seen {
            return;
        }
        match self
            .inner
            .client
            .get_connection_manager_with_config(self.inner.config.clone())
            .await
        {
            Ok(fresh) => {
                let mut cur = self
                    .inner
                    .current
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if cur.0 == seen {
                    *cur = (seen + 1, fresh);
                    tracing::warn!(
                        generation = seen + 1,
                        "a Redis command timed out; replaced its connection"
                    );
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "a Redis command timed out and no new connection could be made yet");
            }
        }
    }

    /// Runs `f` on the current manager; a timeout replaces it.
    fn run<'a, T: Send + 'a>(
        &'a self,
        f: impl FnOnce(ConnectionManager) -> RedisFuture<'a, T> + Send + 'a,
    ) -> RedisFuture<'a, T> {
        Box::pin(async move {
            let (generation, manager) = self.current();
            let result = f(manager).await;
            if result.as_ref().is_err_and(redis::RedisError::is_timeout) {
                self.replace(generation).await;
            }
            result
        })
    }
}

impl ConnectionLike for Healing {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        self.run(move |mut m| Box::pin(async move { m.req_packed_command(cmd).await }))
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        self.run(move |mut m| {
            Box::pin(async move { m.req_packed_commands(pipeline, offset, count).await })
        })
    }

    fn get_db(&self) -> i64 {
        self.current().1.get_db()
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}
