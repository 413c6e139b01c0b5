//! Lua scripts, sent by hash and re-sent by source when Redis lost its script cache
//! (a restart): every script here is safe to run again.

use redis::{Cmd, Value};
use sha1_smol::Sha1;

use super::{Conn, QueueError};

/// A script with its sha1, computed once.
#[derive(Debug)]
pub(crate) struct Script {
    source: &'static str,
    sha: String,
}

impl Script {
    pub(crate) fn new(source: &'static str) -> Script {
        Script {
            source,
            sha: Sha1::from(source).digest().to_string(),
        }
    }

    /// `EVALSHA` (or `EVAL` with the source) with these keys and arguments.
    pub(crate) fn cmd(&self, keys: &[&str], args: &[&[u8]], by_source: bool) -> Cmd {
        let mut cmd = if by_source {
            redis::cmd("EVAL")
        } else {
            redis::cmd("EVALSHA")
        };
        cmd.arg(if by_source {
            self.source
        } else {
            self.sha.as_str()
        })
        .arg(keys.len())
        .arg(keys);
        for a in args {
            cmd.arg(*a);
        }
        cmd
    }

    /// Runs once, falling back to the source on `NOSCRIPT`.
    pub(crate) async fn run(
        &self,
        conn: &mut Conn,
        keys: &[&str],
        args: &[&[u8]],
        action: &'static str,
    ) -> Result<Value, QueueError> {
        match self.cmd(keys, args, false).query_async::<Value>(conn).await {
            Err(e) if e.code() == Some("NOSCRIPT") => self
                .cmd(keys, args, true)
                .query_async(conn)
                .await
                .map_err(QueueError::redis(action)),
            other => other.map_err(QueueError::redis(action)),
        }
    }
}

/// The scripts of the protocol, loaded once per process.
#[derive(Debug)]
pub(crate) struct Scripts {
    pub(crate) submit: Script,
    pub(crate) running: Script,
    pub(crate) finish: Script,
    pub(crate) cancel: Script,
    pub(crate) trim: Script,
}

pub(crate) fn scripts() -> &'static Scripts {
    static SCRIPTS: std::sync::OnceLock<Scripts> = std::sync::OnceLock::new();
    SCRIPTS.get_or_init(|| Scripts {
        submit: Script::new(include_str!("lua/submit.lua")),
        running: Script::new(include_str!("lua/running.lua")),
        finish: Script::new(include_str!("lua/finish.lua")),
        cancel: Script::new(include_str!("lua/cancel.lua")),
        trim: Script::new(include_str!("lua/trim.lua")),
    })
}
