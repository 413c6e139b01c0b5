//! Redis connections that go silent without a reset (AUDIT D4): through a real TCP
//! proxy that stops forwarding the connections it holds, a worker replaces its
//! connections and answers every job exactly once, and the completion subscription
//! notices by `PING`, resubscribes, and wakes its waiters.

mod common;

use std::time::{Duration, Instant};

use common::proxy::Proxy;
use common::queue::*;
use common::{RedisOptions, RedisServer};
use inferq::protocol::job::JobEntry;
use inferq::queue::RedisTarget;
use inferq::queue::notify::Notifier;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(90);

async fn proxied(redis: &RedisServer) -> Proxy {
    let url = redis.tcp_url().expect("a TCP port");
    let addr = url
        .trim_start_matches("redis://")
        .parse()
        .expect("host:port");
    Proxy::start(addr).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_connections_go_silent_answers_every_job_exactly_once() {
    let mut s = Setup::new(
        "tutorial-rf",
        RedisOptions {
            tcp: true,
            ..RedisOptions::default()
        },
    )
    .await;
    let proxy = proxied(&s.redis).await;
    common::init_ort();
    let worker = inferq::worker::Worker::start(
        worker_config(&s.model, "w"),
        s.registry.registry.clone(),
        RedisTarget::parse(&proxy.url()).expect("url"),
        CancellationToken::new(),
    )
    .await
    .expect("start the worker");
    s.warm_up(WAIT).await;
    // Every connection the worker holds now swallows what is sent, in both directions.
    proxy.blackhole();
    let reply = reply_key(&s.model, "silence");
    let entries: Vec<JobEntry> = (0..20)
        .map(|i| JobEntry {
            reply_to: Some(reply.clone()),
            ..json_job(&format!("s{i}"), &s.rows(i, 1))
        })
        .collect();
    let t0 = Instant::now();
    produce_all(&mut s.conn, &s.model, &entries).await;
    let ids: Vec<String> = (0..20).map(|i| format!("s{i}")).collect();
    for rec in wait_all_terminal(&mut s.conn, &s.model, &ids, WAIT).await {
        assert_eq!(
            rec.get("status").map(String::as_str),
            Some("succeeded"),
            "{rec:?}"
        );
    }
    eprintln!(
        "answered {:?} after the connections went silent",
        t0.elapsed()
    );
    let mut pushed = reply_ids(&mut s.conn, &reply).await;
    pushed.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(pushed, want, "one reply per job");
    wait_no_pending(&mut s.conn, &s.model, WAIT).await;
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_completion_subscription_is_replaced_and_its_waiters_woken() {
    let redis = RedisServer::with(RedisOptions {
        tcp: true,
        ..RedisOptions::default()
    });
    let proxy = proxied(&redis).await;
    let mut direct = connect(&redis).await;
    // Clients holding a pattern subscription (the silent one stays open too).
    let numpat = |conn: &mut redis::aio::MultiplexedConnection| {
        let mut conn = conn.clone();
        async move {
            let list: String = redis::cmd("CLIENT")
                .arg("LIST")
                .query_async(&mut conn)
                .await
                .expect("CLIENT LIST");
            list.lines().filter(|l| l.contains(" psub=1 ")).count()
        }
    };
    let notifier = Notifier::default();
    let stop = CancellationToken::new();
    tokio::spawn(
        notifier
            .clone()
            .run(RedisTarget::parse(&proxy.url()).expect("url"), stop.clone()),
    );
    let deadline = Instant::now() + WAIT;
    while numpat(&mut direct).await < 1 {
        assert!(Instant::now() < deadline, "never subscribed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut waiter = notifier.register("m", "job-1");
    proxy.blackhole();
    // Published while the subscription is silent: lost on it.
    let _: i64 = redis::cmd("PUBLISH")
        .arg("inferq:{m}:done")
        .arg("job-1")
        .query_async(&mut direct)
        .await
        .expect("PUBLISH");
    let t0 = Instant::now();
    tokio::time::timeout(Duration::from_secs(30), waiter.changed())
        .await
        .expect("the waiter is woken once the subscription is replaced");
    eprintln!(
        "woken {:?} after the subscription went silent",
        t0.elapsed()
    );
    // The new subscription works: a later completion arrives (published until it does,
    // since the moment it is in place cannot be told apart from outside).
    let mut next = notifier.register("m", "job-2");
    loop {
        let _: i64 = redis::cmd("PUBLISH")
            .arg("inferq:{m}:done")
            .arg("job-2")
            .query_async(&mut direct)
            .await
            .expect("PUBLISH");
        if tokio::time::timeout(Duration::from_millis(200), next.changed())
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no completion arrived on the new subscription"
        );
    }
    stop.cancel();
}
