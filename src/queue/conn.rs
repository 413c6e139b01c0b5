//! Redis connections: one type for a single node or a cluster, reconnecting on its
//! own, with response timeouts long enough for blocking reads.

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
    Single(ConnectionManager),
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

/// How to reach Redis; parsed once from `INFERQ_REDIS_URL`.
#[derive(Debug, Clone)]
pub struct RedisTarget {
    urls: Vec<String>,
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
        Ok(RedisTarget { urls })
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
            let client = ClusterClient::builder(self.urls.clone())
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
        let client = redis::Client::open(self.urls[0].as_str())
            .map_err(QueueError::redis("parse INFERQ_REDIS_URL"))?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(response_timeout))
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_max_delay(Duration::from_secs(2))
            .set_number_of_retries(2);
        let conn = client
            .get_connection_manager_with_config(config)
            .await
            .map_err(QueueError::redis("connect to Redis"))?;
        Ok(Conn::Single(conn))
    }

    /// A pub/sub connection (to the first node).
    pub async fn pubsub(&self) -> Result<redis::aio::PubSub, QueueError> {
        let client = redis::Client::open(self.first_url())
            .map_err(QueueError::redis("parse INFERQ_REDIS_URL"))?;
        client
            .get_async_pubsub()
            .await
            .map_err(QueueError::redis("subscribe"))
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
