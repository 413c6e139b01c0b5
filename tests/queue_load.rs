//! The queue under load and at rest: 10,000 one-row jobs from four producers through
//! two workers (one exact result each, batches forming on their own), results and
//! reply lists expiring after their TTL, and the latency of a lone job with and
//! without `max_wait`.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::queue::*;
use common::{RedisOptions, assert_outputs};
use inferq::protocol::job::JobEntry;
use inferq::queue::Keys;

const WAIT: Duration = Duration::from_secs(20);

/// A Redis and a registry holding tutorial-rf (FP32 `[?, 20]`) under a fresh name.
async fn setup() -> Setup {
    Setup::new("tutorial-rf", RedisOptions::default()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_jobs_from_four_producers_through_two_workers() {
    const PRODUCERS: usize = 4;
    const PER_PRODUCER: usize = 2500;
    let mut s = setup().await;
    let mut workers = Vec::new();
    for name in ["w1", "w2"] {
        let mut cfg = worker_config(&s.model, name);
        cfg.queue.claim_after = Duration::from_secs(30);
        workers.push(start_worker(&s.redis, &s.registry, cfg).await);
    }
    s.warm_up(WAIT).await;
    let warm_rows = metric("inferq_batch_rows_sum", &s.model);
    let warm_batches = metric("inferq_batch_rows_count", &s.model);

    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..PRODUCERS {
        let mut conn = connect(&s.redis).await;
        let (model, reference) = (s.model.clone(), s.reference.clone());
        tasks.push(tokio::spawn(async move {
            let reply = reply_key(&model, &format!("p{p}"));
            for chunk in 0..PER_PRODUCER / 50 {
                let mut pipe = redis::pipe();
                for i in 0..50 {
                    let n = p * PER_PRODUCER + chunk * 50 + i;
                    let job = JobEntry {
                        reply_to: Some(reply.clone()),
                        ..json_job(&format!("j{n}"), &cycled_inputs(&reference, n, 1))
                    };
                    pipe.add_command(entry_cmd(&model, &job));
                }
                let _: Vec<String> = pipe.query_async(&mut conn).await.expect("XADD");
            }
        }));
    }
    for t in tasks {
        t.await.expect("producer");
    }
    let produced = t0.elapsed();
    // Each producer hears back through its reply list: all of its jobs, once each.
    let deadline = Instant::now() + Duration::from_secs(90);
    for p in 0..PRODUCERS {
        let key = reply_key(&s.model, &format!("p{p}"));
        loop {
            let n: usize = redis::cmd("LLEN")
                .arg(&key)
                .query_async(&mut s.conn)
                .await
                .unwrap();
            if n >= PER_PRODUCER {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "producer {p} has {n} of {PER_PRODUCER} replies"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let done = t0.elapsed();
    let mut pushes: HashMap<String, usize> = HashMap::new();
    for p in 0..PRODUCERS {
        for id in reply_ids(&mut s.conn, &reply_key(&s.model, &format!("p{p}"))).await {
            *pushes.entry(id).or_default() += 1;
        }
    }
    assert_eq!(
        pushes.len(),
        PRODUCERS * PER_PRODUCER,
        "distinct jobs answered"
    );
    assert!(pushes.values().all(|&n| n == 1), "a job answered twice");

    let ids: Vec<String> = (0..PRODUCERS * PER_PRODUCER)
        .map(|n| format!("j{n}"))
        .collect();
    let recs = records(&mut s.conn, &s.model, &ids).await;
    for (n, rec) in recs.iter().enumerate() {
        assert_eq!(
            rec.get("status").map(String::as_str),
            Some("succeeded"),
            "j{n}: {rec:?}"
        );
        assert_eq!(attempts(rec), 1, "j{n}: {rec:?}");
        let row = n % s.reference.rows();
        assert_outputs(
            &outputs_of(rec),
            &s.reference.output_rows(row..row + 1),
            &ids[n],
        );
    }
    let keys = Keys::new(&s.model);
    let mut pipe = redis::pipe();
    for id in &ids {
        pipe.cmd("PTTL").arg(keys.result(id));
    }
    let ttls: Vec<i64> = pipe.query_async(&mut s.conn).await.unwrap();
    assert!(
        ttls.iter().all(|&t| t > 0 && t <= 3_600_000),
        "every result expires"
    );
    wait_no_pending(&mut s.conn, &s.model, WAIT).await;
    let finished = metric("inferq_jobs_finished_total", &s.model);
    assert_eq!(
        finished,
        (PRODUCERS * PER_PRODUCER + 1) as f64,
        "each job counted once"
    );
    assert_eq!(metric("inferq_duplicate_deliveries_total", &s.model), 0.0);

    let rows = metric("inferq_batch_rows_sum", &s.model) - warm_rows;
    let batches = metric("inferq_batch_rows_count", &s.model) - warm_batches;
    let mean = rows / batches;
    println!(
        "10,000 jobs: produced in {produced:?}, all answered after {done:?}; {batches} batches, \
         mean {mean:.1} rows"
    );
    let mut previous = 0.0;
    for (le, count) in histogram_buckets("inferq_batch_rows", &s.model) {
        println!("  batches of <= {le:>4} rows: {}", count - previous);
        previous = count;
    }
    assert_eq!(
        rows,
        (PRODUCERS * PER_PRODUCER) as f64,
        "every row inferred once"
    );
    assert!(mean > 1.0, "batches formed under load: mean {mean:.2} rows");
    for w in workers {
        assert!(w.shutdown().await, "a worker drains");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_and_reply_lists_expire_after_their_ttl() {
    let mut s = setup().await;
    let mut cfg = worker_config(&s.model, "w");
    cfg.queue.result_ttl_s = 1;
    let worker = start_worker(&s.redis, &s.registry, cfg).await;
    let keys = Keys::new(&s.model);
    let reply = reply_key(&s.model, "mine");
    let mut entries: Vec<JobEntry> = (0..5)
        .map(|i| JobEntry {
            reply_to: Some(reply.clone()),
            ..json_job(&format!("ok-{i}"), &cycled_inputs(&s.reference, i, 1))
        })
        .collect();
    // Failed and expired results expire too.
    entries.push(JobEntry {
        reply_to: Some(reply.clone()),
        ..json_job("bad", &[])
    });
    entries.push(JobEntry {
        reply_to: Some(reply.clone()),
        deadline_ms: Some(1),
        ..json_job("late", &cycled_inputs(&s.reference, 0, 1))
    });
    produce_all(&mut s.conn, &s.model, &entries).await;
    let ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
    let recs = wait_all_terminal(&mut s.conn, &s.model, &ids, WAIT).await;
    let statuses: Vec<&str> = recs.iter().map(|r| r["status"].as_str()).collect();
    assert_eq!(
        statuses,
        [
            "succeeded",
            "succeeded",
            "succeeded",
            "succeeded",
            "succeeded",
            "failed",
            "expired"
        ]
    );
    let mut all_keys: Vec<String> = ids.iter().map(|id| keys.result(id)).collect();
    all_keys.push(reply.clone());
    for key in &all_keys {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut s.conn)
            .await
            .unwrap();
        assert!(ttl > 0 && ttl <= 1000, "{key}: PTTL {ttl}");
    }
    assert_eq!(list(&mut s.conn, &reply).await.len(), 7);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left: usize = redis::cmd("EXISTS")
            .arg(&all_keys)
            .query_async(&mut s.conn)
            .await
            .unwrap();
        if left == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{left} keys outlived their TTL");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Gone means unknown: nothing else of these jobs stays behind.
    let keys_left: Vec<String> = redis::cmd("KEYS")
        .arg(format!("inferq:{{{}}}:*", s.model))
        .query_async(&mut s.conn)
        .await
        .unwrap();
    let mut keys_left: Vec<&str> = keys_left.iter().map(String::as_str).collect();
    keys_left.sort_unstable();
    assert_eq!(keys_left, [keys.jobs()], "only the stream stays");
    assert!(worker.shutdown().await);
}

/// Ms from XADD to the reply being popped, for one job on an idle worker.
async fn round_trip(s: &mut Setup, id: &str, row: usize) -> (Duration, Record) {
    let reply = reply_key(&s.model, id);
    let job = JobEntry {
        reply_to: Some(reply.clone()),
        ..json_job(id, &cycled_inputs(&s.reference, row, 1))
    };
    let t0 = Instant::now();
    produce_entry(&mut s.conn, &s.model, &job).await;
    let popped: Option<(String, String)> = redis::cmd("BLPOP")
        .arg(&reply)
        .arg(5)
        .query_async(&mut s.conn)
        .await
        .unwrap();
    let elapsed = t0.elapsed();
    assert!(popped.is_some(), "{id}: no reply within 5 s");
    (elapsed, record(&mut s.conn, &s.model, id).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_job_is_not_held_back_when_max_wait_is_zero() {
    let mut s = setup().await;
    let worker = start_worker(&s.redis, &s.registry, worker_config(&s.model, "w")).await;
    s.warm_up(WAIT).await;
    let mut times = Vec::new();
    for i in 0..5 {
        // Idle: the worker is blocked on the stream when the job arrives.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (elapsed, rec) = round_trip(&mut s, &format!("lone-{i}"), i).await;
        assert_eq!(rec["status"], "succeeded", "{rec:?}");
        assert_outputs(
            &outputs_of(&rec),
            &s.reference.output_rows(i..i + 1),
            "lone",
        );
        times.push(elapsed);
    }
    times.sort();
    println!("lone job round trips with max_wait 0: {times:?}");
    assert!(
        times[times.len() - 1] < Duration::from_millis(200),
        "a lone job waited: {times:?}"
    );
    assert!(worker.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_max_wait_a_lone_job_waits_about_max_wait_and_latecomers_join_it() {
    let mut s = setup().await;
    let mut cfg = worker_config(&s.model, "w");
    cfg.batch.max_wait = Duration::from_millis(300);
    let worker = start_worker(&s.redis, &s.registry, cfg).await;
    s.warm_up(WAIT).await;
    let mut times = Vec::new();
    for i in 0..3 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (elapsed, rec) = round_trip(&mut s, &format!("alone-{i}"), i).await;
        assert_eq!(rec["status"], "succeeded", "{rec:?}");
        times.push(elapsed);
    }
    println!("lone job round trips with max_wait 300 ms: {times:?}");
    for t in &times {
        assert!(
            *t >= Duration::from_millis(290) && *t < Duration::from_millis(500),
            "a lone job should wait about 300 ms: {times:?}"
        );
    }
    // Jobs arriving within the window join the first one's batch.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let batches = metric("inferq_batch_jobs_count", &s.model);
    let jobs = metric("inferq_batch_jobs_sum", &s.model);
    let ids: Vec<String> = (0..3).map(|i| format!("joined-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        produce(
            &mut s.conn,
            &s.model,
            id,
            &cycled_inputs(&s.reference, i, 1),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(80)).await;
    }
    let recs = wait_all_terminal(&mut s.conn, &s.model, &ids, WAIT).await;
    assert!(recs.iter().all(|r| r["status"] == "succeeded"), "{recs:?}");
    assert_eq!(
        (
            metric("inferq_batch_jobs_count", &s.model) - batches,
            metric("inferq_batch_jobs_sum", &s.model) - jobs
        ),
        (1.0, 3.0),
        "the three jobs ran as one batch"
    );
    assert!(worker.shutdown().await);
}

/// A model's own batching settings (from its manifest) override the worker's:
/// registered with batches of at most 4 rows, 40 waiting one-row jobs run in at least
/// 10 batches although the worker's default is 64 rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_models_manifest_batching_overrides_the_worker_default() {
    let mut s = setup().await;
    // Version 2 of the model, same file, with its own batch size.
    let file = common::model_path("tutorial-rf");
    let new = inferq::registry::NewVersion {
        batching: Some(inferq::registry::Batching {
            max_batch: Some(4),
            ..Default::default()
        }),
        ..Default::default()
    };
    let m = s
        .registry
        .registry
        .add(&file, &s.model, new, common::inspect)
        .unwrap();
    assert_eq!(m.version, 2);
    let entries: Vec<JobEntry> = (0..40)
        .map(|i| json_job(&format!("small-{i}"), &cycled_inputs(&s.reference, i, 1)))
        .collect();
    let ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
    produce_all(&mut s.conn, &s.model, &entries).await;
    let worker = start_worker(&s.redis, &s.registry, worker_config(&s.model, "w")).await;
    let records = wait_all_terminal(&mut s.conn, &s.model, &ids, WAIT).await;
    assert!(
        records
            .iter()
            .all(|r| r["status"] == "succeeded" && r["version"] == "2"),
        "{records:?}"
    );
    let batches = metric("inferq_batch_rows_count", &s.model);
    let rows = metric("inferq_batch_rows_sum", &s.model);
    assert_eq!(rows, 40.0);
    assert!(
        batches >= 10.0,
        "{batches} batches for 40 rows at max 4 rows each"
    );
    assert!(worker.shutdown().await);
}
