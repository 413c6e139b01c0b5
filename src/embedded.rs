//! The private `redis-server` that `inferq serve` starts when no Redis is configured:
//! a unix socket under the data directory, append-only file with `appendfsync always`
//! (no acknowledged job lost on a crash), `noeviction` under a `maxmemory` (without
//! one the policy never acts). Stopped when `serve` exits.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

/// A running private Redis.
#[derive(Debug)]
pub struct EmbeddedRedis {
    child: Child,
    socket: PathBuf,
}

impl EmbeddedRedis {
    /// Starts `redis-server` from PATH with its files in `data_dir` and at most
    /// `maxmemory_mb` MiB of data, and waits until it answers. The error is one
    /// sentence saying what to do.
    pub async fn start(data_dir: &Path, maxmemory_mb: u64) -> Result<EmbeddedRedis, String> {
        std::fs::create_dir_all(data_dir).map_err(|e| {
            format!(
                "cannot create the data directory {}: {e}",
                data_dir.display()
            )
        })?;
        let dir = data_dir
            .canonicalize()
            .map_err(|e| format!("{}: {e}", data_dir.display()))?;
        let socket = dir.join("redis.sock");
        let _ = std::fs::remove_file(&socket);
        let child = Command::new("redis-server")
            .arg("--port").arg("0")
            .arg("--unixsocket").arg(&socket)
            .arg("--unixsocketperm").arg("700")
            .arg("--dir").arg(&dir)
            .arg("--appendonly").arg("yes")
            .arg("--appendfsync").arg("always")
            .arg("--save").arg("")
            .arg("--maxmemory").arg(format!("{maxmemory_mb}mb"))
            .arg("--maxmemory-policy").arg("noeviction")
            .arg("--logfile").arg(dir.join("redis.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    "redis-server is not on PATH: install it (apt-get install redis-server, or run scripts/setup.sh) or point INFERQ_REDIS_URL at a Redis".to_owned()
                } else {
                    format!("cannot start redis-server: {e}")
                }
            })?;
        let mut redis = EmbeddedRedis { child, socket };
        let started = Instant::now();
        loop {
            if let Ok(client) = redis::Client::open(redis.url())
                && let Ok(mut c) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok()
            {
                return Ok(redis);
            }
            if let Ok(Some(status)) = redis.child.try_wait() {
                return Err(format!(
                    "redis-server exited at start ({status}); see {}",
                    dir.join("redis.log").display()
                ));
            }
            if started.elapsed() > Duration::from_secs(10) {
                return Err(format!(
                    "redis-server did not answer within 10 s; see {}",
                    dir.join("redis.log").display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The URL to reach it.
    pub fn url(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Asks Redis to shut down (flushing its append-only file), then waits; kills it
    /// if it does not exit within 5 s.
    pub async fn stop(mut self) {
        if let Ok(client) = redis::Client::open(self.url())
            && let Ok(mut c) = client.get_multiplexed_async_connection().await
        {
            let _ = redis::cmd("SHUTDOWN").query_async::<()>(&mut c).await;
        }
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}
