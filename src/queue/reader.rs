//! The worker's hot read, on a socket of its own: `XREADGROUP` written and its reply
//! parsed straight into [`Delivery`]s. The `redis` crate builds a `Value` tree with a
//! combinator parser, about a microsecond and a half of worker CPU per one-row job
//! (bench/RESULTS.md); this reader does the same read for a fraction of it. Only a
//! single node over TCP or a unix socket: a cluster or TLS target uses the crate.

use std::time::Duration;

use redis::{ConnectionAddr, IntoConnectionInfo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::consume::Delivery;
use super::{GROUP, Keys, QueueError, RedisTarget};

/// Bytes read from the socket at a time (a reply may span several reads).
const CHUNK: usize = 64 * 1024;
/// A reply this large is no stream read of ours: the connection is dropped.
const MAX_REPLY: usize = 1 << 30;
/// Buffer capacity kept between reads; a larger one (after a read of big entries) is
/// given back.
const KEEP: usize = 4 * 1024 * 1024;

trait Socket: AsyncRead + AsyncWrite + Unpin + Send + Sync {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> Socket for T {}

/// Where to connect and how to log in, from `INFERQ_REDIS_URL`.
#[derive(Debug, Clone)]
pub struct ReaderTarget {
    addr: ConnectionAddr,
    username: Option<String>,
    password: Option<String>,
    db: i64,
}

impl ReaderTarget {
    /// The target, or `None` when this reader cannot serve it (cluster, TLS).
    pub fn new(target: &RedisTarget) -> Option<ReaderTarget> {
        if target.is_cluster() {
            return None;
        }
        let info = target.first_url().into_connection_info().ok()?;
        let addr = info.addr().clone();
        if !matches!(addr, ConnectionAddr::Tcp(..) | ConnectionAddr::Unix(_)) {
            return None;
        }
        let settings = info.redis_settings();
        Some(ReaderTarget {
            addr,
            username: settings.username().map(str::to_owned),
            password: settings.password().map(str::to_owned),
            db: settings.db(),
        })
    }
}

/// One connection for `XREADGROUP`; reconnects on the next read after any failure.
pub struct StreamReader {
    target: ReaderTarget,
    socket: Option<Box<dyn Socket>>,
    buf: Vec<u8>,
}

impl std::fmt::Debug for StreamReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamReader")
            .field("target", &self.target.addr)
            .field("connected", &self.socket.is_some())
            .finish()
    }
}

impl StreamReader {
    /// A reader that connects on its first read.
    pub fn new(target: ReaderTarget) -> StreamReader {
        StreamReader {
            target,
            socket: None,
            buf: Vec::with_capacity(CHUNK),
        }
    }

    /// `XREADGROUP GROUP inferq <consumer> COUNT <count> [BLOCK <ms>] STREAMS <jobs> >`.
    /// A failure drops the connection; the next call opens a new one.
    pub async fn read_new(
        &mut self,
        keys: &Keys,
        consumer: &str,
        count: usize,
        block_ms: Option<u64>,
    ) -> Result<Vec<Delivery>, QueueError> {
        let count = count.max(1).to_string();
        let block = block_ms.map(|ms| ms.max(1).to_string());
        let mut args: Vec<&[u8]> = vec![
            b"XREADGROUP",
            b"GROUP",
            GROUP.as_bytes(),
            consumer.as_bytes(),
            b"COUNT",
            count.as_bytes(),
        ];
        if let Some(ms) = &block {
            args.extend([b"BLOCK".as_slice(), ms.as_bytes()]);
        }
        args.extend([b"STREAMS".as_slice(), keys.jobs().as_bytes(), b">"]);
        // The server answers a blocking read by BLOCK at the latest; the margin covers
        // a busy server, and a dead one is noticed instead of waited on forever.
        let limit = Duration::from_millis(block_ms.unwrap_or(0)) + Duration::from_secs(10);
        let result = match tokio::time::timeout(limit, self.request(&args)).await {
            Ok(r) => r.and_then(|()| parse_read(&self.buf)),
            Err(_) => Err(io_error(std::io::ErrorKind::TimedOut, "no reply in time")),
        };
        if self.buf.capacity() > KEEP {
            self.buf = Vec::with_capacity(CHUNK);
        }
        if result.is_err() {
            self.socket = None;
        }
        result
    }

    /// Sends one command and leaves its complete reply in `buf` (an error reply as `Err`).
    async fn request(&mut self, args: &[&[u8]]) -> Result<(), QueueError> {
        if self.socket.is_none() {
            self.socket = Some(self.open().await?);
        }
        let socket = self.socket.as_mut().expect("opened above");
        send(socket, &mut self.buf, args).await?;
        receive(socket, &mut self.buf).await
    }

    /// Connects and logs in (AUTH, SELECT) as the URL says.
    async fn open(&self) -> Result<Box<dyn Socket>, QueueError> {
        let connect = async {
            Ok::<Box<dyn Socket>, std::io::Error>(match &self.target.addr {
                ConnectionAddr::Unix(path) => {
                    Box::new(tokio::net::UnixStream::connect(path).await?)
                }
                ConnectionAddr::Tcp(host, port) => {
                    let s = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
                    s.set_nodelay(true)?;
                    let sock = socket2::SockRef::from(&s);
                    sock.set_tcp_keepalive(&super::conn::keepalive())?;
                    sock.set_tcp_user_timeout(Some(super::conn::USER_TIMEOUT))?;
                    Box::new(s)
                }
                _ => return Err(std::io::ErrorKind::Unsupported.into()),
            })
        };
        let mut socket = tokio::time::timeout(Duration::from_secs(2), connect)
            .await
            .map_err(|_| io_error(std::io::ErrorKind::TimedOut, "connect timed out"))?
            .map_err(|e| io_error(e.kind(), "connect"))?;
        let mut buf = Vec::new();
        if let Some(password) = &self.target.password {
            let mut auth: Vec<&[u8]> = vec![b"AUTH"];
            if let Some(user) = &self.target.username {
                auth.push(user.as_bytes());
            }
            auth.push(password.as_bytes());
            send(&mut socket, &mut buf, &auth).await?;
            receive(&mut socket, &mut buf).await?;
        }
        if self.target.db != 0 {
            let db = self.target.db.to_string();
            send(&mut socket, &mut buf, &[b"SELECT", db.as_bytes()]).await?;
            receive(&mut socket, &mut buf).await?;
        }
        Ok(socket)
    }
}

async fn send(
    socket: &mut Box<dyn Socket>,
    buf: &mut Vec<u8>,
    args: &[&[u8]],
) -> Result<(), QueueError> {
    buf.clear();
    buf.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        buf.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        buf.extend_from_slice(a);
        buf.extend_from_slice(b"\r\n");
    }
    socket
        .write_all(buf)
        .await
        .map_err(|e| io_error(e.kind(), "send a read"))
}

/// Reads until `buf` holds exactly one complete reply.
async fn receive(socket: &mut Box<dyn Socket>, buf: &mut Vec<u8>) -> Result<(), QueueError> {
    buf.clear();
    loop {
        match skip_value(buf, 0) {
            Ok(end) if end == buf.len() => break,
            Ok(_) => return Err(QueueError::Protocol("read new jobs (trailing bytes)")),
            Err(Incomplete) => {}
        }
        let start = buf.len();
        if start > MAX_REPLY {
            return Err(QueueError::Protocol("read new jobs (reply over 1 GiB)"));
        }
        buf.resize(start + CHUNK, 0);
        let n = socket
            .read(&mut buf[start..])
            .await
            .map_err(|e| io_error(e.kind(), "read a reply"))?;
        buf.truncate(start + n);
        if n == 0 {
            return Err(io_error(
                std::io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            ));
        }
    }
    if buf.first() == Some(&b'-') {
        return Err(error_reply(buf));
    }
    Ok(())
}

/// A complete `-CODE message` reply as the error it reports.
fn error_reply(buf: &[u8]) -> QueueError {
    match line(buf, 0) {
        Ok((head, _)) => server_error(&String::from_utf8_lossy(head.get(1..).unwrap_or_default())),
        Err(Incomplete) => MALFORMED,
    }
}

/// Not enough bytes yet for a whole reply.
#[derive(Debug, PartialEq)]
struct Incomplete;

/// The line starting at `at` (without CRLF) and the offset after it.
fn line(buf: &[u8], at: usize) -> Result<(&[u8], usize), Incomplete> {
    let rest = buf.get(at..).ok_or(Incomplete)?;
    let end = rest.iter().position(|&b| b == b'\n').ok_or(Incomplete)?;
    let text = &rest[..end];
    Ok((text.strip_suffix(b"\r").unwrap_or(text), at + end + 1))
}

/// The number after a type byte (`*3`, `$12`, `:-1`); malformed counts as -1.
fn number(line: &[u8]) -> i64 {
    std::str::from_utf8(line.get(1..).unwrap_or_default())
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(-1)
}

/// The offset just after the (RESP2) value starting at `at`.
fn skip_value(buf: &[u8], at: usize) -> Result<usize, Incomplete> {
    let (head, next) = line(buf, at)?;
    match head.first() {
        Some(b'$') => match usize::try_from(number(head)) {
            Err(_) => Ok(next),
            Ok(n) if buf.len() >= next + n + 2 => Ok(next + n + 2),
            Ok(_) => Err(Incomplete),
        },
        Some(b'*') => (0..number(head).max(0)).try_fold(next, |at, _| skip_value(buf, at)),
        _ => Ok(next),
    }
}

/// Reads a complete RESP2 reply value by value.
struct Cursor<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    /// The next header line's type byte and number, and for a bulk string its bytes.
    fn next(&mut self) -> Option<(u8, i64, &'a [u8])> {
        let (head, next) = line(self.buf, self.at).ok()?;
        self.at = next;
        let (kind, n) = (*head.first()?, number(head));
        if kind == b'$' && n >= 0 {
            let body = self.buf.get(next..next + n as usize)?;
            self.at = next + n as usize + 2;
            return Some((kind, n, body));
        }
        Some((kind, n, &[]))
    }

    /// An array's length, `None` for a nil (`*-1` or `$-1`).
    fn array(&mut self) -> Result<Option<usize>, QueueError> {
        match self.next() {
            Some((b'*', n, _)) => Ok(usize::try_from(n).ok()),
            Some((b'$', -1, _)) => Ok(None),
            _ => Err(MALFORMED),
        }
    }

    fn bulk(&mut self) -> Result<&'a [u8], QueueError> {
        match self.next() {
            Some((b'$', n, body)) if n >= 0 => Ok(body),
            _ => Err(MALFORMED),
        }
    }
}

const MALFORMED: QueueError = QueueError::Protocol("read new jobs");

/// `nil` | `[[stream, [[id, [f, v, …] | nil], …]]]`.
fn parse_read(reply: &[u8]) -> Result<Vec<Delivery>, QueueError> {
    let mut c = Cursor { buf: reply, at: 0 };
    let Some(streams) = c.array()? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for _ in 0..streams {
        if c.array()? != Some(2) {
            return Err(MALFORMED);
        }
        c.bulk()?;
        let entries = c.array()?.unwrap_or(0);
        out.reserve(entries);
        for _ in 0..entries {
            if c.array()? != Some(2) {
                return Err(MALFORMED);
            }
            let entry_id = String::from_utf8_lossy(c.bulk()?).into_owned();
            let fields = match c.array()? {
                None => None,
                Some(n) => {
                    let mut pairs = Vec::with_capacity(n / 2);
                    for _ in 0..n / 2 {
                        pairs.push((c.bulk()?.to_vec(), c.bulk()?.to_vec()));
                    }
                    Some(pairs)
                }
            };
            out.push(Delivery {
                entry_id,
                fields,
                deliveries: 1,
            });
        }
    }
    Ok(out)
}

fn io_error(kind: std::io::ErrorKind, what: &'static str) -> QueueError {
    QueueError::Redis {
        action: "read new jobs",
        source: redis::RedisError::from(std::io::Error::new(kind, what)),
    }
}

/// A server error line (`NOGROUP No such key …`) as the crate would report it, so
/// callers test its code the same way.
fn server_error(line: &str) -> QueueError {
    let parsed = redis::parse_redis_value(format!("-{line}\r\n").as_bytes());
    let source = match parsed {
        Ok(v) => match v.extract_error() {
            Err(e) => e,
            Ok(_) => redis::RedisError::from(std::io::Error::other(line.to_owned())),
        },
        Err(e) => e,
    };
    QueueError::redis("read new jobs")(source)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &[u8]) -> Vec<u8> {
        let mut v = format!("${}\r\n", s.len()).into_bytes();
        v.extend_from_slice(s);
        v.extend_from_slice(b"\r\n");
        v
    }

    type Fields<'a> = &'a [(&'a [u8], &'a [u8])];

    fn reply(entries: &[(&str, Fields<'_>)]) -> Vec<u8> {
        let mut v = b"*1\r\n*2\r\n".to_vec();
        v.extend(bulk(b"inferq:{m}:jobs"));
        v.extend(format!("*{}\r\n", entries.len()).into_bytes());
        for (id, fields) in entries {
            v.extend(b"*2\r\n");
            v.extend(bulk(id.as_bytes()));
            v.extend(format!("*{}\r\n", fields.len() * 2).into_bytes());
            for (k, val) in *fields {
                v.extend(bulk(k));
                v.extend(bulk(val));
            }
        }
        v
    }

    #[test]
    fn entries_parse_with_binary_fields() {
        let bin: &[u8] = b"IQT1\r\n\x00\xff";
        let r = reply(&[
            ("1-0", &[(b"v", b"1"), (b"id", b"a"), (b"bin", bin)]),
            ("1-1", &[(b"id", b"b")]),
        ]);
        assert_eq!(skip_value(&r, 0), Ok(r.len()));
        let d = parse_read(&r).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].entry_id, "1-0");
        let f = d[0].fields.as_ref().unwrap();
        assert_eq!(f[2], (b"bin".to_vec(), bin.to_vec()));
        assert_eq!(d[1].fields.as_ref().unwrap().len(), 1);
    }

    #[test]
    fn every_prefix_of_a_reply_is_incomplete() {
        let r = reply(&[("1-0", &[(b"id", b"a"), (b"bin", b"xyz")])]);
        for cut in 0..r.len() {
            assert_eq!(skip_value(&r[..cut], 0), Err(Incomplete), "cut at {cut}");
        }
    }

    #[test]
    fn nil_replies_and_nil_entries() {
        for nil in [&b"*-1\r\n"[..], b"$-1\r\n"] {
            assert_eq!(skip_value(nil, 0), Ok(nil.len()));
            assert!(parse_read(nil).unwrap().is_empty());
        }
        let mut r = b"*1\r\n*2\r\n".to_vec();
        r.extend(bulk(b"s"));
        r.extend(b"*1\r\n*2\r\n");
        r.extend(bulk(b"2-0"));
        r.extend(b"*-1\r\n");
        let d = parse_read(&r).unwrap();
        assert_eq!(d[0].fields, None);
    }

    #[test]
    fn malformed_replies_are_protocol_errors_not_panics() {
        for bad in [
            &b"*1\r\n*3\r\n"[..],
            b"*1\r\n:5\r\n",
            b"+OK\r\n",
            b"*1\r\n*2\r\n$1\r\ns\r\n*1\r\n*2\r\n:1\r\n",
            b"*1\r\n*2\r\n$1\r\ns\r\n*1\r\n*2\r\n$9\r\n1-0",
        ] {
            assert!(
                parse_read(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn error_lines_of_any_shape_do_not_panic() {
        for line in ["-\n", "-\r\n", "-ERR x\n", "-"] {
            assert!(
                matches!(
                    error_reply(line.as_bytes()),
                    QueueError::Redis { .. } | QueueError::Protocol(_)
                ),
                "{line:?}"
            );
        }
        assert!(error_reply(b"-NOGROUP no group\n").is_nogroup());
    }

    #[test]
    fn server_errors_keep_their_code() {
        let e = server_error("NOGROUP No such key 'x' or consumer group 'inferq'");
        assert!(e.is_nogroup(), "{e}");
        assert!(matches!(
            server_error("OOM command not allowed"),
            QueueError::OutOfMemory(_)
        ));
    }
}
