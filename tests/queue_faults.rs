//! Worker faults the queue must survive (RELIABILITY.md, "Faults and bad inputs"):
//! workers killed, frozen, restarted or stopped mid-batch, a stream trimmed below the
//! entries a frozen worker holds, and a worker holding more work than it finishes
//! within `claim_after`. Outcomes are assertions: one terminal result per job, one
//! reply push, nothing left pending. Delivery faults (a result never acknowledged,
//! cut connections, a Redis crash) are in `queue_delivery.rs`.
//!
//! Mid-batch faults use heavy-mlp (FP32 `[?, 256]`) jobs of 1,024 rows sent as `bin`:
//! each takes about 100 ms of inference, so a worker holding four of them is still
//! busy when the test stops or kills it right after seeing them in its pending list.

mod common;

use std::time::{Duration, Instant};

use common::queue::*;
use common::{RedisOptions, assert_outputs};
use inferq::protocol::job::JobEntry;
use inferq::queue::Keys;
use redis::aio::MultiplexedConnection;

const WAIT: Duration = Duration::from_secs(30);
const HEAVY_ROWS: usize = 1024;
const HEAVY_JOBS: usize = 4;
/// `claim_after` of workers that reclaim: well above the ~0.4 s (plus session load,
/// on a busy machine) a worker needs for the four heavy jobs it takes at once, since a
/// worker holding jobs longer than that reclaims them from itself (see
/// `a_worker_busy_longer_than_claim_after_keeps_its_jobs`).
const CLAIM_MS: &str = "2000";

async fn setup() -> Setup {
    Setup::new("heavy-mlp", RedisOptions::default()).await
}

/// The heavy-job steps the mid-batch faults share.
impl Setup {
    /// Starts a worker process and waits until it has served one job.
    async fn worker(&mut self, consumer: &str, env: &[(&str, &str)]) -> WorkerProcess {
        self.worker_process(consumer, env, WAIT).await
    }

    /// `HEAVY_JOBS` big jobs `<prefix>-<i>`, each with its own reply list, added in one
    /// MULTI so a waiting worker takes them all in one read. Returns their ids.
    async fn produce_heavy(&mut self, prefix: &str) -> Vec<String> {
        self.produce_heavy_to(prefix, true).await
    }

    /// [`Setup::produce_heavy`], with or without reply lists (without: the worker's
    /// results take the transaction instead of the script).
    async fn produce_heavy_to(&mut self, prefix: &str, replies: bool) -> Vec<String> {
        let entries: Vec<JobEntry> = (0..HEAVY_JOBS)
            .map(|i| {
                let id = format!("{prefix}-{i}");
                JobEntry {
                    reply_to: replies.then(|| reply_key(&self.model, &id)),
                    ..bin_job(&id, &cycled_inputs(&self.reference, i * 7, HEAVY_ROWS))
                }
            })
            .collect();
        produce_all(&mut self.conn, &self.model, &entries).await;
        entries.into_iter().map(|e| e.id).collect()
    }

    /// Waits until consumer `who` holds `n` pending entries.
    async fn held_by(&mut self, who: &str, n: usize) -> Vec<Pending> {
        wait_pending(
            &mut self.conn,
            &self.model,
            WAIT,
            &format!("{n} entries held by {who}"),
            |p| p.iter().filter(|e| e.consumer == who).count() >= n,
        )
        .await
    }

    /// Waits until the inflight index holds `n` entries: the worker indexes what it
    /// read one round trip after the read (docs/DECISIONS.md).
    async fn wait_indexed(&mut self, n: usize) {
        let inflight = Keys::new(&self.model).inflight().to_owned();
        let deadline = Instant::now() + WAIT;
        while redis::cmd("HLEN")
            .arg(&inflight)
            .query_async::<usize>(&mut self.conn)
            .await
            .unwrap()
            < n
        {
            assert!(Instant::now() < deadline, "the reads were never indexed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The ids among `ids` whose record is not terminal yet, read once a result
    /// script the worker sent just before it was stopped or killed has landed.
    async fn unfinished(&mut self, ids: &[String]) -> Vec<String> {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let recs = records(&mut self.conn, &self.model, ids).await;
        ids.iter()
            .zip(&recs)
            .filter(|(_, r)| !is_terminal(r))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Checks that every heavy job succeeded with the reference outputs, was pushed to
    /// its reply list exactly once, and that nothing is left pending.
    async fn assert_heavy_done(&mut self, ids: &[String], recs: &[Record]) {
        self.assert_heavy_pushed(ids, recs, 1).await;
    }

    /// [`Setup::assert_heavy_done`] with `pushes` replies per job (0 for polled jobs).
    async fn assert_heavy_pushed(&mut self, ids: &[String], recs: &[Record], pushes: usize) {
        for (i, (id, rec)) in ids.iter().zip(recs).enumerate() {
            assert_eq!(rec["status"], "succeeded", "{id}: {rec:?}");
            let expected = cycled_outputs(&self.reference, i * 7, HEAVY_ROWS);
            assert_outputs(&outputs_of(rec), &expected, id);
            let pushed = list(&mut self.conn, &reply_key(&self.model, id)).await;
            assert_eq!(pushed.len(), pushes, "{id}: reply pushes");
        }
        wait_no_pending(&mut self.conn, &self.model, WAIT).await;
    }
}

/// Fault 1: SIGKILL after the read, before any result: another worker reclaims every
/// job after `claim_after`; one result each, the second delivery counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_batch_loses_nothing() {
    let mut s = setup().await;
    let claim = [("INFERQ_CLAIM_AFTER_MS", CLAIM_MS)];
    let mut a = s.worker("a", &claim).await;
    let ids = s.produce_heavy("k").await;
    s.held_by("a", HEAVY_JOBS).await;
    a.kill();
    let unfinished = s.unfinished(&ids).await;
    assert!(
        !unfinished.is_empty(),
        "a finished everything before the kill"
    );
    assert!(
        pending(&mut s.conn, &s.model)
            .await
            .iter()
            .all(|p| p.deliveries == 1),
        "delivered once so far"
    );

    let b = WorkerProcess::spawn(&s.redis, s.registry.path(), "b", &claim);
    // While b works, the pending list shows the reclaimed entries' second delivery.
    let seen = wait_pending(&mut s.conn, &s.model, WAIT, "a second delivery to b", |p| {
        p.iter().any(|e| e.consumer == "b" && e.deliveries == 2)
    })
    .await;
    assert!(seen.iter().all(|e| e.deliveries == 2), "{seen:?}");
    let recs = wait_all_terminal(&mut s.conn, &s.model, &ids, WAIT).await;
    for (id, rec) in ids.iter().zip(&recs) {
        let expected = if unfinished.contains(id) { 2 } else { 1 };
        assert_eq!(attempts(rec), expected, "{id}: {rec:?}\n{}", b.log());
    }
    s.assert_heavy_done(&ids, &recs).await;
}

/// Fault 4: a worker restarted under the same consumer name finishes its own pending
/// entries at once (no `claim_after` wait, here 60 s) and before any new job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_worker_drains_its_own_pending_entries_first() {
    let mut s = setup().await;
    let env = [("INFERQ_CLAIM_AFTER_MS", "60000")];
    let mut a = s.worker("w1", &env).await;
    let ids = s.produce_heavy("own").await;
    s.held_by("w1", HEAVY_JOBS).await;
    a.kill();
    let unfinished = s.unfinished(&ids).await;
    assert!(
        !unfinished.is_empty(),
        "w1 finished everything before the kill"
    );
    // New work arrives while w1 is down.
    let fresh = s.produce_rows("fresh", 3).await;

    let t0 = Instant::now();
    let again = WorkerProcess::spawn(&s.redis, s.registry.path(), "w1", &env);
    let recs = wait_all_terminal(&mut s.conn, &s.model, &ids, WAIT).await;
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "own pending entries waited for a claim: {:?}",
        t0.elapsed()
    );
    for (id, rec) in ids.iter().zip(&recs) {
        if unfinished.contains(id) {
            assert_eq!(
                attempts(rec),
                2,
                "{id}: the history re-read counts: {rec:?}"
            );
        }
    }
    let fresh_recs = wait_all_terminal(&mut s.conn, &s.model, &fresh, WAIT).await;
    let own_last = unfinished
        .iter()
        .map(|id| {
            ms(
                &recs[ids.iter().position(|x| x == id).unwrap()],
                "started_ms",
            )
        })
        .max()
        .unwrap();
    for (id, rec) in fresh.iter().zip(&fresh_recs) {
        assert_eq!(rec["status"], "succeeded", "{id}: {rec:?}");
        assert!(
            ms(rec, "started_ms") >= own_last,
            "{id} started before the restarted worker's own pending jobs:\n{}",
            again.log()
        );
    }
    s.assert_heavy_done(&ids, &recs).await;
}

/// Fault 3: a worker frozen (SIGSTOP) past `claim_after` while another finishes its
/// jobs, then resumed: its late writes find the jobs terminal and only acknowledge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_worker_resumed_late_only_acknowledges() {
    let mut s = setup().await;
    let a = s.worker("a", &[("INFERQ_CLAIM_AFTER_MS", CLAIM_MS)]).await;
    let duplicates = |a: &WorkerProcess, model: &str| {
        let text = a
            .metrics()
            .unwrap_or_else(|| panic!("a's /metrics:\n{}", a.log()));
        metric_in(&text, "inferq_duplicate_deliveries_total", model)
    };
    assert_eq!(duplicates(&a, &s.model), 0.0);
    let ids = s.produce_heavy("z").await;
    let held: Vec<String> = s
        .held_by("a", HEAVY_JOBS)
        .await
        .into_iter()
        .map(|p| p.entry_id)
        .collect();
    // Freeze it while it computes (its first batch marked running), so it holds all
    // four jobs in memory: frozen any earlier, its read's reply could still be in
    // flight, and after a long freeze that read times out and nothing is written late.
    let deadline = Instant::now() + WAIT;
    while !records(&mut s.conn, &s.model, &ids)
        .await
        .iter()
        .any(|r| r.get("status").is_some_and(|st| st == "running"))
    {
        assert!(
            Instant::now() < deadline,
            "a never ran the jobs:\n{}",
            a.log()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    a.stop();
    let unfinished = s.unfinished(&ids).await;
    assert!(
        !unfinished.is_empty(),
        "a finished everything before it froze"
    );

    let mut cfg = worker_config(&s.model, "b");
    cfg.queue.claim_after = Duration::from_millis(CLAIM_MS.parse().unwrap());
    let b = start_worker(&s.redis, &s.registry, cfg).await;
    let recs = wait_all_terminal(&mut s.conn, &s.model, &ids, WAIT).await;
    wait_no_pending(&mut s.conn, &s.model, WAIT).await;
    assert!(b.shutdown().await, "b drains");

    // Every command from now on is logged, so a's late result scripts show.
    for (k, v) in [
        ("slowlog-log-slower-than", "0"),
        ("slowlog-max-len", "100000"),
    ] {
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg(k)
            .arg(v)
            .query_async(&mut s.conn)
            .await
            .unwrap();
    }
    let _: () = redis::cmd("SLOWLOG")
        .arg("RESET")
        .query_async(&mut s.conn)
        .await
        .unwrap();
    a.cont();
    let late: Vec<&String> = held
        .iter()
        .zip(&ids)
        .filter(|(_, id)| unfinished.contains(id))
        .map(|(e, _)| e)
        .collect();
    let dlq = Keys::new(&s.model).dlq().to_owned();
    let deadline = Instant::now() + WAIT;
    loop {
        // The result script is the one call that names the dead-letter stream.
        let written: Vec<String> = finish_calls(&mut s.conn, &dlq).await;
        if late
            .iter()
            .all(|e| written.iter().any(|call| call.contains(e.as_str())))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a never wrote its late results:\n{}",
            a.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // a's writes changed nothing: same records, one push each, nothing pending.
    let after = records(&mut s.conn, &s.model, &ids).await;
    assert_eq!(after, recs, "a late write overwrote a result");
    for (id, rec) in ids.iter().zip(&recs) {
        let expected = if unfinished.contains(id) { 2 } else { 1 };
        assert_eq!(attempts(rec), expected, "{id}: {rec:?}");
    }
    s.assert_heavy_done(&ids, &recs).await;
    // ... and a counted each as a duplicate delivery.
    let deadline = Instant::now() + Duration::from_secs(5);
    while duplicates(&a, &s.model) < unfinished.len() as f64 {
        assert!(
            Instant::now() < deadline,
            "a counted {} duplicates",
            duplicates(&a, &s.model)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(duplicates(&a, &s.model), unfinished.len() as f64);
}

/// The arguments of every logged EVAL/EVALSHA that names `dlq_key` (the result
/// script), one string per call.
async fn finish_calls(conn: &mut MultiplexedConnection, dlq_key: &str) -> Vec<String> {
    let log: Vec<redis::Value> = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg(-1)
        .query_async(conn)
        .await
        .unwrap();
    log.iter()
        .filter_map(|entry| match entry {
            redis::Value::Array(parts) => match parts.get(3) {
                Some(redis::Value::Array(args)) => Some(
                    args.iter()
                        .filter_map(|a| redis::from_redis_value::<String>(a.clone()).ok())
                        .collect::<Vec<_>>()
                        .join(" "),
                ),
                _ => None,
            },
            _ => None,
        })
        .filter(|call| call.starts_with("EVAL") && call.contains(dlq_key))
        .collect()
}

/// Fault 5: SIGTERM mid-batch: the worker stops reading, finishes and acknowledges
/// what it holds within the drain deadline, and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_batch_drains_and_exits_cleanly() {
    let mut s = setup().await;
    let mut a = s.worker("a", &[("INFERQ_DRAIN_TIMEOUT_MS", "10000")]).await;
    let sigterm = a.arm("-TERM");
    let ids = s.produce_heavy("t").await;
    // The moment its read is served: the jobs are delivered, the reply (4 MB) still
    // on its way to the worker.
    s.held_by("a", HEAVY_JOBS).await;
    let t0 = Instant::now();
    sigterm.fire();
    let late = s.produce_rows("late", 2).await;
    a.expect_clean_exit(t0, Duration::from_secs(10), Duration::from_secs(12));
    let recs = records(&mut s.conn, &s.model, &ids).await;
    println!("worker a:\n{}", a.log());
    for (id, rec) in ids.iter().zip(&recs) {
        assert_eq!(attempts(rec), 1, "{id}: {rec:?}");
    }
    s.assert_heavy_done(&ids, &recs).await;
    // Jobs added after SIGTERM were never taken: the next worker gets them first.
    let b = WorkerProcess::spawn(&s.redis, s.registry.path(), "b", &[]);
    let recs = wait_all_terminal(&mut s.conn, &s.model, &late, WAIT).await;
    for rec in &recs {
        assert_eq!(
            (rec["status"].as_str(), attempts(rec)),
            ("succeeded", 1),
            "{rec:?}\n{}",
            b.log()
        );
    }
}

/// Fault 5, past the deadline: the worker still exits 0 in time; what it could not
/// finish stays pending and another worker completes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_past_the_drain_deadline_leaves_the_rest_pending() {
    let mut s = setup().await;
    let env = [
        ("INFERQ_DRAIN_TIMEOUT_MS", "20"),
        ("INFERQ_CLAIM_AFTER_MS", CLAIM_MS),
    ];
    let mut a = s.worker("a", &env).await;
    let ids = s.produce_heavy("d").await;
    s.held_by("a", HEAVY_JOBS).await;
    let t0 = Instant::now();
    a.term();
    a.expect_clean_exit(t0, Duration::from_secs(2), Duration::from_secs(5));
    let left = s.unfinished(&ids).await;
    assert!(
        !left.is_empty(),
        "a finished 4 heavy jobs within a 20 ms drain"
    );
    let held = pending(&mut s.conn, &s.model).await;
    assert_eq!(
        held.len(),
        left.len(),
        "unfinished jobs stay pending: {held:?}"
    );
    assert!(held.iter().all(|p| p.consumer == "a"), "{held:?}");
    let consumers: Vec<redis::Value> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(Keys::new(&s.model).jobs())
        .arg(inferq::queue::GROUP)
        .query_async(&mut s.conn)
        .await
        .unwrap();
    assert!(
        format!("{consumers:?}").contains("\"a\""),
        "a consumer with pending entries was deleted"
    );

    let _b = WorkerProcess::spawn(&s.redis, s.registry.path(), "b", &env);
    let recs = wait_all_terminal(&mut s.conn, &s.model, &ids, WAIT).await;
    for (id, rec) in ids.iter().zip(&recs) {
        let expected = if left.contains(id) { 2 } else { 1 };
        assert_eq!(attempts(rec), expected, "{id}: {rec:?}");
    }
    s.assert_heavy_done(&ids, &recs).await;
}

/// Fault 17: the stream trimmed (XTRIM MAXLEN 0) below entries a frozen worker holds:
/// the reclaiming worker answers each lost job `failed`/`lost` and counts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_trimmed_away_while_pending_are_answered_as_lost() {
    let mut s = setup().await;
    let a = s.worker("a", &[("INFERQ_CLAIM_AFTER_MS", CLAIM_MS)]).await;
    let ids = s.produce_heavy("lost").await;
    s.held_by("a", HEAVY_JOBS).await;
    s.wait_indexed(HEAVY_JOBS).await;
    a.stop();
    let unfinished = s.unfinished(&ids).await;
    assert!(
        !unfinished.is_empty(),
        "a finished everything before it froze"
    );
    let trimmed: u64 = redis::cmd("XTRIM")
        .arg(Keys::new(&s.model).jobs())
        .arg("MAXLEN")
        .arg(0)
        .query_async(&mut s.conn)
        .await
        .unwrap();
    assert!(trimmed >= HEAVY_JOBS as u64, "trimmed {trimmed}");

    let mut cfg = worker_config(&s.model, "b");
    cfg.queue.claim_after = Duration::from_millis(CLAIM_MS.parse().unwrap());
    let b = start_worker(&s.redis, &s.registry, cfg).await;
    // Claim after 2 s, then one script: 10 s is plenty.
    let recs = wait_all_terminal(&mut s.conn, &s.model, &unfinished, Duration::from_secs(10)).await;
    for (id, rec) in unfinished.iter().zip(&recs) {
        assert_eq!(rec["status"], "failed", "{id}: {rec:?}");
        assert_eq!(rec["error_kind"], "lost", "{id}: {rec:?}");
        assert!(rec["error"].contains("vanished"), "{id}: {rec:?}");
        let pushed = list(&mut s.conn, &reply_key(&s.model, id)).await;
        assert_eq!(
            pushed.len(),
            1,
            "{id}: the producer hears about the loss once"
        );
    }
    assert_eq!(
        metric("inferq_jobs_lost_total", &s.model),
        unfinished.len() as f64
    );
    wait_no_pending(&mut s.conn, &s.model, WAIT).await;
    assert!(b.shutdown().await);
    drop(a);
}

/// A worker that took more work at once than it finishes within `claim_after` (here
/// eight heavy jobs, ~0.8 s, against 400 ms) must not reclaim its own jobs from
/// itself: each job is delivered and computed once, nothing is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_busy_longer_than_claim_after_keeps_its_jobs() {
    let mut s = setup().await;
    let mut ids = s.produce_heavy("busy").await;
    ids.extend(s.produce_heavy("busier").await);
    let mut cfg = worker_config(&s.model, "w");
    cfg.queue.claim_after = Duration::from_millis(400);
    let worker = start_worker(&s.redis, &s.registry, cfg).await;
    let recs = wait_all_terminal(&mut s.conn, &s.model, &ids, WAIT).await;
    let attempts: Vec<u32> = recs.iter().map(attempts).collect();
    let statuses: Vec<&str> = recs.iter().map(|r| r["status"].as_str()).collect();
    wait_no_pending(&mut s.conn, &s.model, WAIT).await;
    assert!(worker.shutdown().await);
    println!(
        "attempts {attempts:?}, statuses {statuses:?}, duplicates {}, dead-lettered {}, rows inferred {}",
        metric("inferq_duplicate_deliveries_total", &s.model),
        metric("inferq_jobs_dead_lettered_total", &s.model),
        metric("inferq_rows_inferred_total", &s.model),
    );
    assert!(
        statuses.iter().all(|s| *s == "succeeded"),
        "statuses {statuses:?}"
    );
    assert!(attempts.iter().all(|&a| a == 1), "attempts {attempts:?}");
    assert_eq!(metric("inferq_duplicate_deliveries_total", &s.model), 0.0);
    assert_eq!(
        metric("inferq_rows_inferred_total", &s.model),
        (ids.len() * HEAVY_ROWS) as f64,
        "each job computed once"
    );
}

/// Fault 16 on the worker's side: Redis reaches `maxmemory` (noeviction) while a batch
/// computes. Its result write is refused whole (the script, or the transaction's
/// EXECABORT): nothing is acknowledged without its result and no reply is pushed; once
/// memory frees, the same write lands, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_refused_under_oom_are_written_once_memory_frees() {
    for replies in [true, false] {
        let mut s = setup().await;
        let mut w = s.worker("w", &[("INFERQ_CLAIM_AFTER_MS", "60000")]).await;
        let ids = s
            .produce_heavy_to(if replies { "oom-r" } else { "oom-p" }, replies)
            .await;
        s.held_by("w", HEAVY_JOBS).await;
        s.wait_indexed(HEAVY_JOBS).await;
        set_maxmemory(&mut s.conn, "1").await;
        // Long enough for the ~0.4 s of compute and several refused writes.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let written: Vec<Record> = records(&mut s.conn, &s.model, &ids).await;
        assert!(
            written.iter().all(|r| !is_terminal(r)),
            "replies {replies}: a result was written under OOM: {written:?}"
        );
        assert_eq!(
            pending(&mut s.conn, &s.model).await.len(),
            HEAVY_JOBS,
            "replies {replies}: a job was acknowledged without its result"
        );
        for id in &ids {
            let pushed = list(&mut s.conn, &reply_key(&s.model, id)).await;
            assert!(
                pushed.is_empty(),
                "replies {replies}: {id} pushed under OOM"
            );
        }
        assert!(
            w.log().contains("cannot write results yet") && w.log().contains("OOM"),
            "replies {replies}: no refused result write in the log:\n{}",
            w.log()
        );
        set_maxmemory(&mut s.conn, "0").await;
        let recs = wait_all_terminal(&mut s.conn, &s.model, &ids, WAIT).await;
        s.assert_heavy_pushed(&ids, &recs, usize::from(replies))
            .await;
        w.term();
        w.expect_clean_exit(Instant::now(), WAIT, WAIT);
    }
}

/// Fault 16 before the read: Redis is full when an idle worker takes jobs. The read
/// itself is not refused (XREADGROUP may run under OOM), the inflight index is: the
/// worker keeps what it read and retries the index instead of reading more, then
/// computes each job once, at its first attempt, as soon as memory frees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_read_while_redis_is_full_are_kept_and_run_once() {
    let mut s = setup().await;
    let mut w = s.worker("w", &[]).await;
    w.stop();
    let ids = s.produce_heavy_to("full", false).await;
    set_maxmemory(&mut s.conn, "1").await;
    w.cont();
    s.held_by("w", HEAVY_JOBS).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        records(&mut s.conn, &s.model, &ids)
            .await
            .iter()
            .all(|r| !is_terminal(r)),
        "a result was written under OOM"
    );
    assert!(
        w.log().contains("cannot index the jobs read yet"),
        "no refused index write in the log:\n{}",
        w.log()
    );
    set_maxmemory(&mut s.conn, "0").await;
    let recs = wait_all_terminal(&mut s.conn, &s.model, &ids, WAIT).await;
    assert!(recs.iter().all(|r| attempts(r) == 1), "{recs:?}");
    s.assert_heavy_pushed(&ids, &recs, 0).await;
    w.term();
    w.expect_clean_exit(Instant::now(), WAIT, WAIT);
}
