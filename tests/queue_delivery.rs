//! Deliveries that go wrong (RELIABILITY.md, "Faults and bad inputs"): a result written
//! but never acknowledged (2), connections cut during blocking reads (13), Redis
//! SIGKILLed and restarted under load (10). Whatever happens to a delivery, each job
//! ends with one visible result: one terminal write, one reply push, nothing pending.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::queue::*;
use common::{RedisOptions, assert_outputs};
use inferq::protocol::job::JobEntry;
use inferq::queue::{Keys, janitor};

const WAIT: Duration = Duration::from_secs(30);

async fn setup(opts: RedisOptions) -> Setup {
    Setup::new("tutorial-rf", opts).await
}

/// Fault 2: the worker died after writing a result but before acknowledging it. The
/// next delivery finds the job terminal: it only acknowledges, the result stays, no
/// second push, no second completion count; a duplicate is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_written_but_not_acknowledged_is_only_acknowledged_later() {
    written_but_not_acknowledged(true).await;
}

/// Fault 2 for a polled job (no reply list), whose results take the transaction
/// instead of the script: the same promises.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_polled_result_written_but_not_acknowledged_is_only_acknowledged_later() {
    written_but_not_acknowledged(false).await;
}

async fn written_but_not_acknowledged(with_reply: bool) {
    let mut s = setup(RedisOptions::default()).await;
    let keys = Keys::new(&s.model);
    let reply = reply_key(&s.model, "done-once");
    let job = JobEntry {
        reply_to: with_reply.then(|| reply.clone()),
        ..json_job("done-once", &cycled_inputs(&s.reference, 3, 1))
    };
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(keys.jobs())
        .arg(inferq::queue::GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut s.conn)
        .await
        .unwrap();
    produce_entry(&mut s.conn, &s.model, &job).await;
    // The dead worker's part: it read the entry and ran the finish script's writes,
    // then died before the acknowledgement.
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(inferq::queue::GROUP)
        .arg("dead")
        .arg("COUNT")
        .arg(1)
        .arg("STREAMS")
        .arg(keys.jobs())
        .arg(">")
        .query_async(&mut s.conn)
        .await
        .unwrap();
    let first = serde_json::json!({
        "id": "done-once", "status": "succeeded", "model": s.model, "version": 1,
        "attempts": 1, "finished_ms": inferq::now_ms(),
        "outputs": {"model_name": "first", "model_version": "1", "id": "done-once", "outputs": []},
    });
    let _: () = redis::cmd("SET")
        .arg(keys.result("done-once"))
        .arg(first.to_string())
        .query_async(&mut s.conn)
        .await
        .unwrap();
    if with_reply {
        let _: () = redis::cmd("RPUSH")
            .arg(&reply)
            .arg(r#"{"id":"done-once","status":"succeeded"}"#)
            .query_async(&mut s.conn)
            .await
            .unwrap();
    }
    let before = record(&mut s.conn, &s.model, "done-once").await;
    assert_eq!(pending(&mut s.conn, &s.model).await.len(), 1);

    let mut cfg = worker_config(&s.model, "w");
    cfg.queue.claim_after = Duration::from_millis(300);
    let worker = start_worker(&s.redis, &s.registry, cfg).await;
    produce(
        &mut s.conn,
        &s.model,
        "other",
        &cycled_inputs(&s.reference, 4, 1),
    )
    .await;
    wait_no_pending(&mut s.conn, &s.model, WAIT).await;
    assert_eq!(
        wait_terminal(&mut s.conn, &s.model, "other", WAIT).await["status"],
        "succeeded"
    );
    assert!(worker.shutdown().await);

    assert_eq!(
        record(&mut s.conn, &s.model, "done-once").await,
        before,
        "the result changed"
    );
    assert_eq!(
        list(&mut s.conn, &reply).await.len(),
        usize::from(with_reply),
        "a second reply was pushed"
    );
    assert_eq!(metric("inferq_duplicate_deliveries_total", &s.model), 1.0);
    assert_eq!(
        metric("inferq_jobs_finished_total", &s.model),
        1.0,
        "only `other` counts as finished"
    );
}

/// Fault 13: connections cut (`CLIENT KILL TYPE normal`) while the worker blocks on
/// the stream: every job still completes once. An entry delivered into a reply that
/// never arrived stays in the consumer's pending list and comes back through the
/// reclaim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_killed_during_blocking_reads_lose_no_job() {
    let mut s = setup(RedisOptions::default()).await;
    let mut cfg = worker_config(&s.model, "w");
    cfg.queue.claim_after = Duration::from_millis(400);
    let worker = start_worker(&s.redis, &s.registry, cfg).await;
    s.warm_up(WAIT).await;

    // A delivery whose reply is lost: the entry is read under the worker's consumer
    // name (here by us, inside the transaction that adds it, so the worker cannot
    // take it first) and the reply never reaches the worker.
    let keys = Keys::new(&s.model);
    let mut tx = redis::pipe();
    tx.atomic()
        .add_command(entry_cmd(
            &s.model,
            &json_job("unheard", &cycled_inputs(&s.reference, 1, 1)),
        ))
        .cmd("XREADGROUP")
        .arg("GROUP")
        .arg(inferq::queue::GROUP)
        .arg("w")
        .arg("COUNT")
        .arg(1)
        .arg("STREAMS")
        .arg(keys.jobs())
        .arg(">");
    let _: (String, redis::Value) = tx.query_async(&mut s.conn).await.unwrap();
    let rec = wait_terminal(&mut s.conn, &s.model, "unheard", WAIT).await;
    assert_eq!(rec["status"], "succeeded", "{rec:?}");
    assert_eq!(
        attempts(&rec),
        2,
        "it came back from the pending list: {rec:?}"
    );
    assert_outputs(&outputs_of(&rec), &s.reference.output_rows(1..2), "unheard");

    // The kill right behind the job, in one pipeline, while the worker blocks: Redis
    // serves the blocked read after the XADD, then frees the client before its reply
    // is written.
    for round in 0..3 {
        let deadline = Instant::now() + WAIT;
        loop {
            let clients: String = redis::cmd("CLIENT")
                .arg("LIST")
                .query_async(&mut s.conn)
                .await
                .unwrap();
            let blocked = |l: &str| {
                l.split_whitespace()
                    .any(|f| f.strip_prefix("flags=").is_some_and(|f| f.contains('b')))
            };
            if clients.lines().any(blocked) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: the worker never blocked on the stream:\n{clients}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let id = format!("cut-{round}");
        let mut pipe = redis::pipe();
        pipe.add_command(entry_cmd(
            &s.model,
            &json_job(&id, &cycled_inputs(&s.reference, round, 1)),
        ));
        pipe.cmd("CLIENT").arg("KILL").arg("TYPE").arg("normal");
        let _: (String, u64) = pipe.query_async(&mut s.conn).await.unwrap();
        let rec = wait_terminal(&mut s.conn, &s.model, &id, WAIT).await;
        assert_eq!(rec["status"], "succeeded", "{rec:?}");
        assert_outputs(
            &outputs_of(&rec),
            &s.reference.output_rows(round..round + 1),
            &id,
        );
    }

    // A storm: every connection but ours killed every 30 ms while 300 jobs flow.
    let reply = reply_key(&s.model, "storm");
    let ids: Vec<String> = (0..300).map(|i| format!("storm-{i}")).collect();
    // Our own connection sends the kills (CLIENT KILL skips the caller), so it stays.
    for (n, chunk) in ids.chunks(20).enumerate() {
        let mut pipe = redis::pipe();
        for (i, id) in chunk.iter().enumerate() {
            let job = JobEntry {
                reply_to: Some(reply.clone()),
                ..json_job(id, &cycled_inputs(&s.reference, n * 20 + i, 1))
            };
            pipe.add_command(entry_cmd(&s.model, &job));
        }
        let _: Vec<String> = pipe.query_async(&mut s.conn).await.unwrap();
        tokio::time::sleep(Duration::from_millis(15)).await;
        let _: u64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("normal")
            .query_async(&mut s.conn)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    let recs = wait_all_terminal(&mut s.conn, &s.model, &ids, WAIT).await;
    for (i, (id, rec)) in ids.iter().zip(&recs).enumerate() {
        assert_eq!(rec["status"], "succeeded", "{id}: {rec:?}");
        assert_outputs(
            &outputs_of(rec),
            &s.reference.output_rows(i % 32..i % 32 + 1),
            id,
        );
    }
    let mut pushes: HashMap<String, usize> = HashMap::new();
    for id in reply_ids(&mut s.conn, &reply).await {
        *pushes.entry(id).or_default() += 1;
    }
    assert_eq!(pushes.len(), ids.len(), "every job pushed");
    assert!(
        pushes.values().all(|&n| n == 1),
        "a job pushed twice: {pushes:?}"
    );
    wait_no_pending(&mut s.conn, &s.model, WAIT).await;
    assert!(worker.shutdown().await);
}

/// Fault 10: Redis (AOF, `appendfsync always`) SIGKILLed and restarted while two
/// worker processes run and a producer writes: every job whose XADD was acknowledged
/// ends with exactly one result; workers reconnect on their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_mid_run_loses_no_acknowledged_job() {
    let mut s = setup(RedisOptions {
        aof: true,
        ..RedisOptions::default()
    })
    .await;
    let env = [("INFERQ_CLAIM_AFTER_MS", "800")];
    let a = s.worker_process("a", &env, WAIT).await;
    let b = s.worker_process("b", &env, WAIT).await;
    let reply = reply_key(&s.model, "p");
    let (model, reference, redis_client) = (s.model.clone(), s.reference.clone(), s.redis.client());

    let producer = tokio::spawn(async move {
        let cfg =
            redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(5)));
        let mut conn = None;
        let (mut acked, mut unsure) = (Vec::new(), Vec::new());
        for n in 0..150 {
            let ids: Vec<String> = (0..10).map(|i| format!("j-{}", n * 10 + i)).collect();
            let mut pipe = redis::pipe();
            for (i, id) in ids.iter().enumerate() {
                let job = JobEntry {
                    reply_to: Some(reply.clone()),
                    ..json_job(id, &cycled_inputs(&reference, n * 10 + i, 1))
                };
                pipe.add_command(entry_cmd(&model, &job));
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            if conn.is_none() {
                while conn.is_none() {
                    conn = redis_client
                        .get_multiplexed_async_connection_with_config(&cfg)
                        .await
                        .ok();
                    assert!(Instant::now() < deadline, "Redis never came back");
                    if conn.is_none() {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            let c = conn.as_mut().expect("connected above");
            match pipe.query_async::<Vec<String>>(c).await {
                Ok(_) => acked.extend(ids),
                Err(_) => {
                    unsure.extend(ids);
                    conn = None;
                }
            }
            tokio::time::sleep(Duration::from_millis(4)).await;
        }
        (acked, unsure)
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    s.redis.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    tokio::task::block_in_place(|| s.redis.restart());
    let (acked, unsure) = producer.await.unwrap();
    let mut conn = connect(&s.redis).await;
    println!(
        "{} jobs acknowledged, {} unsure across the crash",
        acked.len(),
        unsure.len()
    );
    assert!(
        acked.len() >= 1000,
        "the producer mostly ran after the restart"
    );

    let recs = tokio::time::timeout(
        Duration::from_secs(60),
        wait_all_terminal(&mut conn, &s.model, &acked, WAIT),
    )
    .await
    .unwrap_or_else(|_| panic!("jobs not finished\na:\n{}\nb:\n{}", a.log(), b.log()));
    for (id, rec) in acked.iter().zip(&recs) {
        assert_eq!(rec["status"], "succeeded", "{id}: {rec:?}");
        let i: usize = id[2..].parse().unwrap();
        assert_outputs(
            &outputs_of(rec),
            &s.reference.output_rows(i % 32..i % 32 + 1),
            id,
        );
    }
    wait_no_pending(&mut conn, &s.model, WAIT).await;
    let mut pushes: HashMap<String, usize> = HashMap::new();
    for id in reply_ids(&mut conn, &reply_key(&s.model, "p")).await {
        *pushes.entry(id).or_default() += 1;
    }
    for id in &acked {
        assert_eq!(pushes.get(id), Some(&1), "{id}: reply pushes");
    }
    assert!(
        pushes.values().all(|&n| n == 1),
        "a job has two visible results"
    );
    assert!(
        pushes
            .keys()
            .all(|id| acked.contains(id) || unsure.contains(id)),
        "a result for a job never submitted"
    );
}

/// Consumers come and go with pods: one that holds nothing and has been idle long
/// enough is removed from the group; one that still holds a pending entry is kept,
/// or that entry could never be claimed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_consumers_without_pending_jobs_are_removed() {
    let mut s = Setup::new("tutorial-rf", RedisOptions::default()).await;
    let keys = Keys::new(&s.model);
    let mut conn = inferq::queue::RedisTarget::parse(&s.redis.url())
        .unwrap()
        .connect(Duration::from_secs(5))
        .await
        .unwrap();
    inferq::queue::consume::ensure_group(&mut conn, &keys)
        .await
        .unwrap();
    xadd(
        &mut s.conn,
        &s.model,
        &[("v", "1"), ("id", "held"), ("body", "{}")],
    )
    .await;
    // "holder" takes the entry and never acknowledges it; "ghost" holds nothing.
    let taken = inferq::queue::consume::read_new(&mut conn, &keys, "holder", 1, None)
        .await
        .unwrap();
    assert_eq!(taken.len(), 1);
    create_consumer(&mut s.conn, &keys, "ghost").await;
    tokio::time::sleep(Duration::from_millis(30)).await;
    let removed =
        janitor::remove_stale_consumers(&mut conn, &keys, Duration::from_millis(10), "live")
            .await
            .unwrap();
    assert_eq!(
        removed, 1,
        "only the idle consumer without pending entries goes"
    );
    let consumers = consumer_names(&mut s.conn, &keys).await;
    assert_eq!(consumers, vec!["holder".to_owned()]);

    // A worker does the same on its own, at ten times claim_after (at least 10 s).
    create_consumer(&mut s.conn, &keys, "ghost2").await;
    let w = start_worker(&s.redis, &s.registry, worker_config(&s.model, "live")).await;
    let deadline = Instant::now() + Duration::from_secs(25);
    loop {
        let now = consumer_names(&mut s.conn, &keys).await;
        if !now.contains(&"ghost2".to_owned()) {
            assert!(now.contains(&"live".to_owned()), "{now:?}");
            break;
        }
        assert!(Instant::now() < deadline, "ghost2 still there: {now:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(w.shutdown().await);
}

/// Adds an idle consumer that holds nothing to the model's group.
async fn create_consumer(conn: &mut redis::aio::MultiplexedConnection, keys: &Keys, name: &str) {
    let created: i64 = redis::cmd("XGROUP")
        .arg("CREATECONSUMER")
        .arg(keys.jobs())
        .arg(inferq::queue::GROUP)
        .arg(name)
        .query_async(conn)
        .await
        .unwrap();
    assert_eq!(created, 1, "consumer {name} created");
}

async fn consumer_names(conn: &mut redis::aio::MultiplexedConnection, keys: &Keys) -> Vec<String> {
    let v: redis::Value = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(keys.jobs())
        .arg("inferq")
        .query_async(conn)
        .await
        .unwrap();
    let redis::Value::Array(list) = v else {
        return Vec::new();
    };
    list.iter()
        .filter_map(|c| {
            let redis::Value::Array(kv) = c else {
                return None;
            };
            kv.chunks_exact(2).find_map(|p| match (&p[0], &p[1]) {
                (redis::Value::BulkString(k), redis::Value::BulkString(v)) if k == b"name" => {
                    Some(String::from_utf8_lossy(v).into_owned())
                }
                _ => None,
            })
        })
        .collect()
}

/// A Redis that may evict keys can silently drop jobs and results, and one without
/// `maxmemory` never refuses a write (noeviction acts only under a limit), so it grows
/// until the kernel kills it: every long-running role says so at start, naming the
/// policy; with `noeviction` under a limit it says nothing.
#[test]
fn an_evicting_or_unlimited_redis_is_flagged_at_start_by_every_role() {
    const EVICTS: &str = "maxmemory-policy is not noeviction";
    const UNLIMITED: &str = "maxmemory is 0 (no limit)";
    let reg = common::TempRegistry::with_models(&["tutorial-rf"]);
    for (policy, maxmemory, evicts, unlimited) in [
        ("allkeys-lru", "64mb", true, false),
        ("noeviction", "0", false, true),
        ("noeviction", "64mb", false, false),
    ] {
        let redis = common::RedisServer::with(RedisOptions {
            args: vec![
                "--maxmemory-policy".into(),
                policy.into(),
                "--maxmemory".into(),
                maxmemory.into(),
            ],
            ..RedisOptions::default()
        });
        for (role, started) in [
            ("worker", "serving model"),
            ("gateway", "HTTP front door listening"),
            ("serve", "serving model"),
        ] {
            let w = WorkerProcess::spawn_role(role, &redis, reg.path(), "w", &[]);
            let deadline = Instant::now() + Duration::from_secs(20);
            while !w.log().contains(started) {
                assert!(
                    Instant::now() < deadline,
                    "{role} did not start: {}",
                    w.log()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            let log = w.log();
            let what = format!("{role}, {policy}, maxmemory {maxmemory}: {log}");
            assert_eq!(log.contains(EVICTS), evicts, "{what}");
            assert_eq!(log.contains(UNLIMITED), unlimited, "{what}");
            if evicts {
                assert!(log.contains(policy), "{what}");
            }
        }
    }
}

/// The worker's own read socket logs in and selects the database its URL names, as the
/// crate's connections do: a job produced into db 3 of a password-protected server over
/// TCP is answered there, and nothing lands in db 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_and_a_database_in_the_url_are_honoured() {
    common::init_ort();
    let mut s = setup(RedisOptions {
        tcp: true,
        ..RedisOptions::default()
    })
    .await;
    // The setup's connection stays logged in; every new one needs the password.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("s3cret")
        .query_async(&mut s.conn)
        .await
        .unwrap();
    let tcp = s.redis.tcp_url().expect("started with tcp");
    let url = format!("{}/3", tcp.replacen("redis://", "redis://:s3cret@", 1));
    let worker = inferq::worker::Worker::start(
        worker_config(&s.model, "w"),
        s.registry.registry.clone(),
        inferq::queue::RedisTarget::parse(&url).unwrap(),
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .unwrap_or_else(|e| panic!("start a worker on {url}: {e}"));
    let mut db3 = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let inputs = cycled_inputs(&s.reference, 2, 1);
    produce(&mut db3, &s.model, "in-db3", &inputs).await;
    let rec = wait_terminal(&mut db3, &s.model, "in-db3", WAIT).await;
    assert_eq!(rec["status"], "succeeded", "{rec:?}");
    assert_outputs(&outputs_of(&rec), &s.reference.output_rows(2..3), "in-db3");
    let in_db0: bool = redis::cmd("EXISTS")
        .arg(Keys::new(&s.model).result("in-db3"))
        .query_async(&mut s.conn)
        .await
        .unwrap();
    assert!(!in_db0, "the result landed in db 0");
    assert!(worker.shutdown().await);
}
