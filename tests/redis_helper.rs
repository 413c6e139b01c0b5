//! The private `redis-server` every queue test relies on (`common::RedisServer`):
//! it answers on its socket, survives a crash with AOF, starts empty without it, can
//! be frozen, and leaves nothing running or on disk when dropped.

mod common;

use std::time::Duration;

use common::{RedisOptions, RedisServer};
use redis::Commands;

fn process_alive(pid: u32) -> bool {
    // A reaped process has no /proc entry; a zombie would show state Z.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.split_whitespace().nth(2) != Some("Z"))
}

#[test]
fn answers_on_its_own_socket_and_is_gone_after_drop() {
    let a = RedisServer::start();
    let b = RedisServer::start();
    assert_ne!(a.url(), b.url(), "each server has its own socket");
    assert!(a.url().starts_with("redis+unix:///"), "{}", a.url());
    assert!(a.tcp_url().is_none());

    let mut conn = a.connection();
    let _: () = conn.set("k", "v").expect("SET");
    let v: Option<String> = b.connection().get("k").expect("GET");
    assert_eq!(v, None, "servers share nothing");
    let v: String = conn.get("k").expect("GET");
    assert_eq!(v, "v");

    let (pid, dir) = (a.pid().expect("running"), a.dir().to_path_buf());
    assert!(process_alive(pid));
    drop(a);
    assert!(
        !process_alive(pid),
        "redis-server {pid} outlived its helper"
    );
    assert!(!dir.exists(), "{} left behind", dir.display());
}

#[test]
fn with_aof_a_killed_server_restarts_with_every_acknowledged_write() {
    let mut server = RedisServer::with(RedisOptions {
        aof: true,
        ..RedisOptions::default()
    });
    let mut conn = server.connection();
    for i in 0..100 {
        let _: () = conn.rpush("list", i).expect("RPUSH");
    }
    let first_pid = server.pid();
    server.kill();
    assert!(server.pid().is_none());
    assert!(
        redis::cmd("PING").query::<String>(&mut conn).is_err(),
        "a killed server does not answer"
    );
    server.restart();
    assert_ne!(server.pid(), first_pid);
    let len: usize = server.connection().llen("list").expect("LLEN");
    assert_eq!(len, 100);
}

#[test]
fn without_aof_a_restart_starts_empty() {
    let mut server = RedisServer::start();
    let _: () = server.connection().set("k", 1).expect("SET");
    server.restart();
    let v: Option<i64> = server.connection().get("k").expect("GET");
    assert_eq!(v, None);
}

#[test]
fn tcp_and_extra_arguments() {
    let server = RedisServer::with(RedisOptions {
        tcp: true,
        args: vec!["--maxmemory".into(), "2mb".into()],
        ..RedisOptions::default()
    });
    let url = server.tcp_url().expect("a TCP port");
    assert!(url.starts_with("redis://127.0.0.1:"), "{url}");
    let mut tcp = redis::Client::open(url)
        .expect("url")
        .get_connection()
        .expect("connect over TCP");
    let cfg: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory")
        .query(&mut tcp)
        .expect("CONFIG GET");
    assert_eq!(cfg, ["maxmemory", "2097152"]);
}

#[test]
fn a_frozen_server_accepts_but_never_answers_until_thawed() {
    let server = RedisServer::start();
    let conn = server.connection();
    conn.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let mut conn = conn;
    server.freeze();
    let frozen = redis::cmd("PING").query::<String>(&mut conn);
    assert!(frozen.is_err(), "{frozen:?}");
    server.thaw();
    let mut fresh = server.connection();
    let pong: String = redis::cmd("PING").query(&mut fresh).expect("PING");
    assert_eq!(pong, "PONG");
}

#[tokio::test]
async fn async_clients_connect_through_the_url() {
    let server = RedisServer::start();
    let mut conn = server
        .client()
        .get_multiplexed_async_connection()
        .await
        .expect("async connection");
    let id: String = redis::cmd("XADD")
        .arg("s")
        .arg("*")
        .arg("f")
        .arg("v")
        .query_async(&mut conn)
        .await
        .expect("XADD");
    assert!(id.contains('-'), "{id}");
}
