//! A private `redis-server` per test, on a unix socket in a temporary directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What a [`RedisServer`] runs with.
#[derive(Debug, Clone, Default)]
pub struct RedisOptions {
    /// Append-only file with `appendfsync always` (the shipped durability settings):
    /// every acknowledged write survives [`RedisServer::kill`] + [`RedisServer::restart`].
    /// Without it the server keeps nothing on disk and a restart starts empty.
    pub aof: bool,
    /// Also listen on a free loopback TCP port, for clients that need `redis://`.
    /// [`RedisServer::url`] stays the unix socket; see [`RedisServer::tcp_url`].
    pub tcp: bool,
    /// More `redis-server` arguments, e.g. `["--maxmemory", "2mb"]`.
    pub args: Vec<String>,
}

/// A private `redis-server` on a unix socket in its own temporary directory (which is
/// also its `--dir` and holds `redis.log`). Dropping it kills the server and removes
/// the directory. The server stays in the test's process group, so nextest's timeout
/// (or Ctrl-C) ends it with the test even if the test process dies without unwinding.
#[derive(Debug)]
pub struct RedisServer {
    dir: tempfile::TempDir,
    opts: RedisOptions,
    port: Option<u16>,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server without persistence, reachable on its unix socket.
    pub fn start() -> RedisServer {
        RedisServer::with(RedisOptions::default())
    }

    /// Starts a server with `opts` and waits until it answers `PING`.
    pub fn with(opts: RedisOptions) -> RedisServer {
        let mut dir = tempfile::Builder::new()
            .prefix("inferq-redis-")
            .tempdir()
            .expect("temp dir");
        // A unix socket path must fit in 108 bytes; a long $TMPDIR would not.
        if dir.path().join("redis.sock").as_os_str().len() > 100 {
            dir = tempfile::Builder::new()
                .prefix("inferq-redis-")
                .tempdir_in("/tmp")
                .expect("temp dir in /tmp");
        }
        let mut server = RedisServer {
            dir,
            opts,
            port: None,
            child: None,
        };
        // A port found free may be taken before redis binds it: try a few.
        for attempt in 0.. {
            if server.opts.tcp {
                server.port = Some(free_port());
            }
            match server.launch() {
                Ok(()) => break,
                Err(e) if server.opts.tcp && attempt < 5 => eprintln!("retrying redis: {e}"),
                Err(e) => panic!("{e}"),
            }
        }
        server
    }

    /// The unix socket path.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("redis.sock")
    }

    /// The server's `--dir` (AOF and logs live here).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `redis+unix:///…/redis.sock`, the form the `redis` crate and
    /// `INFERQ_REDIS_URL` accept.
    pub fn url(&self) -> String {
        format!("redis+unix://{}", self.socket().display())
    }

    /// `redis://127.0.0.1:<port>` when started with [`RedisOptions::tcp`].
    pub fn tcp_url(&self) -> Option<String> {
        self.port.map(|p| format!("redis://127.0.0.1:{p}"))
    }

    /// A client for [`RedisServer::url`].
    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).expect("a valid redis URL")
    }

    /// A new synchronous connection.
    pub fn connection(&self) -> redis::Connection {
        self.client()
            .get_connection()
            .unwrap_or_else(|e| panic!("connect to {}: {e}\n{}", self.url(), self.log()))
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    /// Kills the server with SIGKILL (a crash: no shutdown save, no goodbye to
    /// clients) and waits for it to be gone. No-op when it is not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the server if it runs, then starts it again on the same socket, port and
    /// directory (with AOF, it reloads what it had) and waits until it answers.
    pub fn restart(&mut self) {
        self.kill();
        if let Err(e) = self.launch() {
            panic!("{e}");
        }
    }

    /// Stops the process (SIGSTOP) without closing its sockets: clients see a Redis
    /// that accepts connections and never answers. Undo with [`RedisServer::thaw`].
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Resumes a frozen server (SIGCONT).
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self.pid().expect("the server is not running");
        let status = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {sig} {pid} failed");
    }

    fn launch(&mut self) -> Result<(), String> {
        let dir = self.dir.path();
        let port = self.port.unwrap_or(0).to_string();
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port, "--bind", "127.0.0.1"])
            .arg("--unixsocket")
            .arg(self.socket())
            .args(["--unixsocketperm", "700", "--daemonize", "no", "--save", ""])
            .arg("--dir")
            .arg(dir)
            .arg("--logfile")
            .arg(dir.join("redis.log"));
        if self.opts.aof {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        cmd.args(&self.opts.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start redis-server (run scripts/setup.sh): {e}"))?;
        self.child = Some(child);
        self.wait_ready()
    }

    /// Polls `PING` until `PONG` (a server loading its AOF answers `LOADING`).
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(15);
        let client = self.client();
        loop {
            let child = self.child.as_mut().expect("launched");
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Err(format!(
                    "redis-server exited ({status}) at start:\n{}",
                    self.log()
                ));
            }
            let pong = client
                .get_connection_with_timeout(Duration::from_millis(500))
                .and_then(|mut c| {
                    c.set_read_timeout(Some(Duration::from_millis(500)))?;
                    redis::cmd("PING").query::<String>(&mut c)
                });
            if pong.as_deref() == Ok("PONG") {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(format!(
                    "redis-server did not answer PING within 15 s ({pong:?}):\n{}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A loopback port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}
