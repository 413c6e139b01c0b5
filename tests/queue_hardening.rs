//! What a producer writes can never wedge a model, and no write is retried for ever
//! (issue 13, AUDIT D1, D5, D7, D8, D12, D15, D19): entries over their bounds are
//! answered or dead-lettered without being copied, a result write that can never
//! succeed ends its job, trimming keeps up with a fast producer, reclaimed entries
//! keep exact delivery counts, made-up versions do not become metric labels, and a
//! cancelled job is never computed later.
//!
//! Each test has its own `redis-server`, registry (tutorial-rf) and in-process worker.

mod common;

use std::time::Duration;

use common::queue::*;
use common::{RedisOptions, inferq_command, run};
use inferq::protocol::job::JobEntry;
use inferq::queue::{Keys, janitor};

const WAIT: Duration = Duration::from_secs(30);

async fn setup() -> Setup {
    Setup::new("tutorial-rf", RedisOptions::default()).await
}

type Fields = Vec<(String, Vec<u8>)>;

/// The dead letters of a model: (entry id, fields).
async fn dead_letters(s: &mut Setup) -> Vec<(String, Vec<(String, String)>)> {
    redis::cmd("XRANGE")
        .arg(Keys::new(&s.model).dlq())
        .arg("-")
        .arg("+")
        .query_async(&mut s.conn)
        .await
        .expect("XRANGE dlq")
}

fn status(rec: &Record) -> &str {
    rec.get("status").map_or("", String::as_str)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_over_their_bounds_are_answered_and_acknowledged_and_nothing_wedges() {
    let mut s = setup().await;
    let worker = start_worker(&s.redis, &s.registry, worker_config(&s.model, "w")).await;
    s.warm_up(WAIT).await;
    // The audit's poison: 5,000 fields and no id (Lua's unpack limit once made its
    // dead letter fail for ever); the same with a valid id; a 10 KiB reply_to.
    let many: Fields = (0..5000)
        .map(|i| (format!("f{i}"), b"x".to_vec()))
        .collect();
    let mut with_id: Fields = vec![("id".into(), b"wide".to_vec())];
    with_id.extend(many.iter().cloned());
    let long_reply: Fields = vec![
        ("v".into(), b"1".to_vec()),
        ("id".into(), b"long-reply".to_vec()),
        ("body".into(), br#"{"features":[[0]]}"#.to_vec()),
        ("reply_to".into(), vec![b'r'; 10_240]),
    ];
    xadd(&mut s.conn, &s.model, &many).await;
    let before = s.produce_rows("before", 10).await;
    xadd(&mut s.conn, &s.model, &with_id).await;
    xadd(&mut s.conn, &s.model, &long_reply).await;
    let after = s.produce_rows("after", 10).await;
    for (i, rec) in wait_all_terminal(&mut s.conn, &s.model, &[before, after].concat(), WAIT)
        .await
        .iter()
        .enumerate()
    {
        assert_eq!(
            status(rec),
            "succeeded",
            "job {i} beside the poison: {rec:?}"
        );
    }
    let wide = wait_terminal(&mut s.conn, &s.model, "wide", WAIT).await;
    assert_eq!(status(&wide), "failed");
    assert_eq!(
        wide.get("error_kind").map(String::as_str),
        Some("too_large")
    );
    assert!(
        wide["error"].contains("5001 fields, over the bound of 32 (INFERQ_MAX_ENTRY_FIELDS)"),
        "{wide:?}"
    );
    let long = wait_terminal(&mut s.conn, &s.model, "long-reply", WAIT).await;
    assert!(
        long["error"].contains("field `reply_to` holds 10240 bytes, over the bound of 4096"),
        "{long:?}"
    );
    // The id-less one is dead-lettered, truncated to the bound, and acknowledged.
    let dead = dead_letters(&mut s).await;
    assert_eq!(dead.len(), 1, "one dead letter");
    assert!(dead[0].1.len() <= 32 + 3, "{} fields kept", dead[0].1.len());
    assert!(
        dead[0]
            .1
            .iter()
            .any(|(k, v)| k == "error" && v.contains("5000 fields"))
    );
    wait_no_pending(&mut s.conn, &s.model, WAIT).await;
    let refused = inferq::metrics::metrics()
        .render()
        .lines()
        .any(|l| l.starts_with("inferq_redis_errors_total{op=\"finish\"}") && !l.ends_with(" 0"));
    assert!(!refused, "no result write was refused, so none was retried");
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_list_of_the_wrong_type_costs_only_its_push() {
    let mut s = setup().await;
    // A producer made the reply list a string: RPUSH fails with WRONGTYPE every time.
    let bad_reply = reply_key(&s.model, "taken");
    let _: () = redis::cmd("SET")
        .arg(&bad_reply)
        .arg("not a list")
        .query_async(&mut s.conn)
        .await
        .expect("SET");
    let good_reply = reply_key(&s.model, "fine");
    let entries: Vec<JobEntry> = (0..6)
        .map(|i| JobEntry {
            reply_to: Some(if i == 2 {
                bad_reply.clone()
            } else {
                good_reply.clone()
            }),
            ..json_job(&format!("j{i}"), &s.rows(i, 1))
        })
        .collect();
    // Queued together: one batch, one script call that fails on job 2's reply list.
    produce_all(&mut s.conn, &s.model, &entries).await;
    let worker = start_worker(&s.redis, &s.registry, worker_config(&s.model, "w")).await;
    let ids: Vec<String> = (0..6).map(|i| format!("j{i}")).collect();
    for (i, rec) in wait_all_terminal(&mut s.conn, &s.model, &ids, WAIT)
        .await
        .iter()
        .enumerate()
    {
        assert_eq!(status(rec), "succeeded", "j{i}: {rec:?}");
    }
    assert_eq!(
        list(&mut s.conn, &good_reply).await.len(),
        5,
        "one push per other job"
    );
    wait_no_pending(&mut s.conn, &s.model, WAIT).await;
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_write_that_can_never_succeed_is_not_retried_for_ever() {
    let mut s = setup().await;
    // Limits far beyond what the result script can carry (the settings bound them;
    // this worker's are set directly): a dead letter of 4,500 fields exceeds Lua's
    // unpack limit on every try, as the audit's poison entry once did.
    let mut cfg = worker_config(&s.model, "w");
    cfg.queue.entry_limits.max_fields = 10_000;
    let poison: Fields = (0..4500)
        .map(|i| (format!("f{i}"), b"x".to_vec()))
        .collect();
    xadd(&mut s.conn, &s.model, &poison).await;
    let ids = s.produce_rows("ok", 5).await;
    let worker = start_worker(&s.redis, &s.registry, cfg).await;
    for rec in wait_all_terminal(&mut s.conn, &s.model, &ids, WAIT).await {
        assert_eq!(status(&rec), "succeeded", "{rec:?}");
    }
    wait_no_pending(&mut s.conn, &s.model, WAIT).await;
    assert!(
        dead_letters(&mut s).await.is_empty(),
        "the dead letter could not be written"
    );
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trim_removes_far_more_than_ten_thousand_acknowledged_entries() {
    let mut s = setup().await;
    let keys = Keys::new(&s.model);
    let _: () = redis::cmd("XGROUP")
        .arg(&["CREATE", keys.jobs(), inferq::queue::GROUP, "0", "MKSTREAM"])
        .query_async(&mut s.conn)
        .await
        .expect("XGROUP CREATE");
    for _ in 0..5 {
        let mut pipe = redis::pipe();
        for _ in 0..10_000 {
            pipe.cmd("XADD")
                .arg(keys.jobs())
                .arg("*")
                .arg("a")
                .arg("b")
                .ignore();
        }
        let _: () = pipe.query_async(&mut s.conn).await.expect("XADD");
    }
    // Delivered and acknowledged, as a fast worker would leave them.
    let ids: Vec<String> = {
        let reply: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
            .arg(&[
                "GROUP",
                inferq::queue::GROUP,
                "c",
                "COUNT",
                "50000",
                "STREAMS",
                keys.jobs(),
                ">",
            ])
            .query_async(&mut s.conn)
            .await
            .expect("XREADGROUP");
        reply.keys[0].ids.iter().map(|e| e.id.clone()).collect()
    };
    assert_eq!(ids.len(), 50_000);
    let _: i64 = redis::cmd("XACK")
        .arg(keys.jobs())
        .arg(inferq::queue::GROUP)
        .arg(&ids)
        .query_async(&mut s.conn)
        .await
        .expect("XACK");
    let target = inferq::queue::RedisTarget::parse(&s.redis.url()).expect("url");
    let mut conn = target
        .connect(Duration::from_secs(10))
        .await
        .expect("connect");
    let removed = janitor::trim(&mut conn, &keys).await.expect("trim");
    let left: u64 = redis::cmd("XLEN")
        .arg(keys.jobs())
        .query_async(&mut s.conn)
        .await
        .expect("XLEN");
    assert!(
        removed > 45_000,
        "one trim removed {removed} (Redis' default bound is 10,000)"
    );
    assert!(left < 5_000, "{left} left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reclaimed_entries_keep_their_exact_delivery_counts() {
    // The audit's setup (D8): w1 owns fresh entries inside the id range it reclaims.
    let mut s = setup().await;
    let keys = Keys::new(&s.model);
    let k = keys.jobs();
    let g = inferq::queue::GROUP;
    let q = |args: Vec<String>| {
        let mut c = redis::cmd(&args[0]);
        for a in &args[1..] {
            c.arg(a);
        }
        c
    };
    let words = |s: &str| s.split(' ').map(str::to_owned).collect::<Vec<_>>();
    let _: () = q(words(&format!("XGROUP CREATE {k} {g} 0 MKSTREAM")))
        .query_async(&mut s.conn)
        .await
        .expect("group");
    for i in 1..=6 {
        let _: String = q(words(&format!("XADD {k} {i}-0 v 1 id d{i} body x")))
            .query_async(&mut s.conn)
            .await
            .expect("XADD");
    }
    for consumer in ["dead", "w1", "dead"] {
        let _: redis::Value = q(words(&format!(
            "XREADGROUP GROUP {g} {consumer} COUNT 2 STREAMS {k} >"
        )))
        .query_async(&mut s.conn)
        .await
        .expect("XREADGROUP");
    }
    let _: redis::Value = q(words(&format!(
        "XCLAIM {k} {g} dead 0 1-0 2-0 5-0 6-0 RETRYCOUNT 5 JUSTID"
    )))
    .query_async(&mut s.conn)
    .await
    .expect("XCLAIM");
    tokio::time::sleep(Duration::from_millis(600)).await; // the entries must be idle
    let _: redis::Value = q(words(&format!("XCLAIM {k} {g} w1 0 3-0 4-0 JUSTID")))
        .query_async(&mut s.conn)
        .await
        .expect("refresh");
    let target = inferq::queue::RedisTarget::parse(&s.redis.url()).expect("url");
    let mut conn = target
        .connect(Duration::from_secs(10))
        .await
        .expect("connect");
    let r = janitor::reclaim(
        &mut conn,
        &keys,
        "w1",
        Duration::from_millis(500),
        "0-0",
        16,
    )
    .await
    .expect("reclaim");
    let counts: Vec<(String, u32)> = r
        .entries
        .iter()
        .map(|d| (d.entry_id.clone(), d.deliveries))
        .collect();
    assert_eq!(
        counts,
        ["1-0", "2-0", "5-0", "6-0"]
            .map(|id| (id.to_owned(), 6))
            .to_vec(),
        "every reclaimed entry has its real count"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_a_producer_makes_up_do_not_become_metric_labels() {
    let mut s = setup().await;
    let worker = start_worker(&s.redis, &s.registry, worker_config(&s.model, "w")).await;
    let entries: Vec<JobEntry> = (0..200)
        .map(|i| JobEntry {
            version: Some(1000 + i),
            ..json_job(&format!("v{i}"), &s.rows(0, 1))
        })
        .collect();
    produce_all(&mut s.conn, &s.model, &entries).await;
    let ids: Vec<String> = (0..200).map(|i| format!("v{i}")).collect();
    for rec in wait_all_terminal(&mut s.conn, &s.model, &ids, WAIT).await {
        assert_eq!(
            rec.get("error_kind").map(String::as_str),
            Some("not_found"),
            "{rec:?}"
        );
    }
    let label = format!("model=\"{}\"", s.model);
    let series = inferq::metrics::metrics()
        .render()
        .lines()
        .filter(|l| l.starts_with("inferq_jobs_finished_total{") && l.contains(&label))
        .count();
    assert_eq!(series, 1, "one series for all 200 unknown versions");
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicated_field_fails_the_entry_under_its_first_id() {
    let mut s = setup().await;
    let worker = start_worker(&s.redis, &s.registry, worker_config(&s.model, "w")).await;
    let body = inferq::protocol::oip::encode_request(&s.rows(0, 1));
    let fields: Vec<(&str, &[u8])> = vec![
        ("v", b"1"),
        ("id", b"victim-1"),
        ("id", b"attacker-1"),
        ("body", &body),
    ];
    xadd(&mut s.conn, &s.model, &fields).await;
    let rec = wait_terminal(&mut s.conn, &s.model, "victim-1", WAIT).await;
    assert!(rec["error"].contains("field `id` appears twice"), "{rec:?}");
    assert!(record(&mut s.conn, &s.model, "attacker-1").await.is_empty());
    worker.shutdown().await;
}

#[test]
fn a_models_batch_size_is_bounded_when_added() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = run(inferq_command()
        .arg("--models")
        .arg(dir.path())
        .args(["models", "add"])
        .arg(common::model_path("tutorial-rf"))
        .args(["--name", "big", "--batch-max-rows", "20000"]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--batch-max-rows must be 1 to 2048, not 20000"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_job_is_never_answered_after_its_record_would_have_expired() {
    let mut s = setup().await;
    let gw = common::http::Gateway::start(&s.redis, &s.registry, &["--result-ttl-s", "1"]).await;
    let c = gw.client();
    let body = common::http::infer_body(&s.rows(0, 1), serde_json::json!({ "id": "c1" }));
    c.post(&format!("/v1/models/{}/jobs", s.model), body)
        .await
        .expect(202);
    let path = format!("/v1/models/{}/jobs/c1", s.model);
    assert_eq!(
        c.delete(&path).await.expect(200).json()["status"],
        "cancelled"
    );
    // No worker yet: the entry waits in the stream past the 1 s result TTL. The
    // cancelled record is kept while it waits (before, it expired, and the worker
    // then computed the job and answered it `succeeded`).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(c.get(&path).await.expect(200).json()["status"], "cancelled");
    let mut cfg = worker_config(&s.model, "w");
    cfg.queue.result_ttl_s = 1;
    let worker = start_worker(&s.redis, &s.registry, cfg).await;
    s.warm_up(WAIT).await;
    wait_no_pending(&mut s.conn, &s.model, WAIT).await;
    // Taken and acknowledged: the record now expires with the result TTL, and is
    // never replaced by a result.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let r = c.get(&path).await;
        if r.status == 404 {
            break;
        }
        assert_eq!(r.expect(200).json()["status"], "cancelled");
        assert!(
            std::time::Instant::now() < deadline,
            "the cancelled record never expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let label = format!("model=\"{}\"", s.model);
    let succeeded: f64 = inferq::metrics::metrics()
        .render()
        .lines()
        .filter(|l| l.starts_with("inferq_jobs_finished_total{") && l.contains(&label))
        .filter(|l| l.contains("status=\"succeeded\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(succeeded, 1.0, "only the warm-up was answered");
    worker.shutdown().await;
    gw.stop();
}
