//! `rediss://` (AUDIT D24): a worker reaches a real `redis-server` over TLS with a
//! certificate authority made in the test, answers jobs through it, and refuses a
//! server its trust store does not vouch for.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::queue::*;
use common::{RedisOptions, inferq_command};

const WAIT: Duration = Duration::from_secs(60);

/// A CA and a server certificate for 127.0.0.1 signed by it, made with openssl.
fn certificates(dir: &Path) {
    let sh = format!(
        r#"set -e
cd {dir}
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=inferq-test-ca -keyout ca.key -out ca.crt
openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout server.key -out server.csr
printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' > ext.cnf
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -extfile ext.cnf -out server.crt
"#,
        dir = dir.display()
    );
    let out = Command::new("bash")
        .args(["-c", &sh])
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind")
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_serves_jobs_over_tls_and_refuses_an_unknown_authority() {
    let certs = tempfile::tempdir().expect("temp dir");
    certificates(certs.path());
    let port = free_port();
    let file = |name: &str| certs.path().join(name).display().to_string();
    let mut s = Setup::new(
        "tutorial-rf",
        RedisOptions {
            args: vec![
                "--tls-port".into(),
                port.to_string(),
                "--tls-cert-file".into(),
                file("server.crt"),
                "--tls-key-file".into(),
                file("server.key"),
                "--tls-ca-cert-file".into(),
                file("ca.crt"),
                "--tls-auth-clients".into(),
                "no".into(),
            ],
            ..RedisOptions::default()
        },
    )
    .await;
    let url = format!("rediss://127.0.0.1:{port}");
    let log = tempfile::NamedTempFile::new().expect("log");
    let mut worker = inferq_command()
        .arg("worker")
        .env("INFERQ_REDIS_URL", &url)
        .env("INFERQ_REDIS_CA_FILE", file("ca.crt"))
        .env("INFERQ_MODELS", s.registry.path())
        .env("INFERQ_CONSUMER", "tls")
        .env(
            "INFERQ_METRICS_LISTEN",
            format!("127.0.0.1:{}", free_port()),
        )
        .env("RUST_LOG", "inferq=info")
        .stderr(log.reopen().expect("log handle"))
        .spawn()
        .expect("start the worker");
    // Produced on the plain unix socket; read, computed and answered over TLS.
    let ids = s.produce_rows("tls", 5).await;
    let recs = tokio::time::timeout(WAIT, wait_all_terminal(&mut s.conn, &s.model, &ids, WAIT))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "no answer over TLS:\n{}",
                std::fs::read_to_string(log.path()).unwrap_or_default()
            )
        });
    for rec in &recs {
        assert_eq!(
            rec.get("status").map(String::as_str),
            Some("succeeded"),
            "{rec:?}"
        );
    }
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut s.conn)
        .await
        .expect("CLIENT LIST");
    assert!(
        clients
            .lines()
            .any(|l| l.contains(&format!("laddr=127.0.0.1:{port}"))),
        "the worker's connections are on the TLS port: {clients}"
    );
    let _ = worker.kill();
    let _ = worker.wait();

    // Without the test's CA the server's certificate is not trusted: the worker
    // cannot start, and says why.
    let t0 = Instant::now();
    let out = inferq_command()
        .arg("worker")
        .env("INFERQ_REDIS_URL", &url)
        .env("INFERQ_MODELS", s.registry.path())
        .env(
            "INFERQ_METRICS_LISTEN",
            format!("127.0.0.1:{}", free_port()),
        )
        .output()
        .expect("run the worker");
    assert!(!out.status.success(), "started without trusting the server");
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(err.contains("certificate") || err.contains("tls"), "{err}");
    assert!(t0.elapsed() < WAIT, "gave up in time");
}
