//! The private `redis-server` that `inferq serve` starts when no Redis is configured:
//! a unix socket under the data directory, append-only file with `appendfsync always`
//! (no acknowledged job lost on a crash), `noeviction` under a `maxmemory` (without
//! one the policy never acts). Stopped when `serve` exits. One `serve` per data
//! directory: a second one refuses to start.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

/// A running private Redis.
#[derive(Debug)]
pub struct EmbeddedRedis {
    child: Child,
    socket: PathBuf,
    /// The data directory's lock, held for as long as this Redis runs.
    _lock: std::fs::File,
}

/// Locks `dir` for one `serve` (AUDIT D16): a second one there would unlink the
/// first one's socket and open the same append-only file. The lock is the kernel's
/// (flock), so it goes with the process however it ends, and the file keeps the
/// holder's pid for the message.
fn lock_data_dir(dir: &Path) -> Result<std::fs::File, String> {
    use std::io::Write;
    let path = dir.join("serve.lock");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let pid = std::fs::read_to_string(&path).unwrap_or_default();
            return Err(format!(
                "another `inferq serve` (pid {}) is using the data directory {}: stop it, or give this one a directory of its own with --data-dir (INFERQ_DATA_DIR)",
                pid.trim(),
                dir.display()
            ));
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(format!("cannot lock {}: {e}", path.display()));
        }
    }
    file.set_len(0)
        .and_then(|()| write!(file, "{}", std::process::id()))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(file)
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
        // Before anything in the directory is touched.
        let lock = lock_data_dir(&dir)?;
        let socket = dir.join("redis.sock");
        // A redis-server left running by a serve that was killed holds the same files.
        if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            return Err(format!(
                "a redis-server still listens on {} (left by an `inferq serve` that was killed?): stop it (redis-cli -s {} shutdown) before starting serve there",
                socket.display(),
                socket.display()
            ));
        }
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
        let mut redis = EmbeddedRedis {
            child,
            socket,
            _lock: lock,
        };
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
