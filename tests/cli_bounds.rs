//! Settings and flags that a request or the clock would overflow are refused when the
//! process starts, naming them, instead of panicking later (AUDIT D27): waits and
//! timeouts near u64::MAX, and `inferq submit --wait 1e30`, which panicked after its
//! job was enqueued (main's `parse_wait` bounds it now; this checks it before any
//! job is written).

mod common;

use common::http::xlen;
use common::{RedisServer, TempRegistry, inferq_command, run_exit};

#[test]
fn waits_and_timeouts_past_their_bounds_are_refused_naming_the_setting() {
    let max = u64::MAX.to_string();
    let cases: [(&[&str], &str); 5] = [
        (
            &["--max-poll-wait-s", &max],
            "INFERQ_MAX_POLL_WAIT_S must be at most 3600",
        ),
        (
            &["--sync-timeout-ms", &max],
            "INFERQ_SYNC_TIMEOUT_MS must be at most 3600000",
        ),
        (
            &["--body-timeout-ms", &max],
            "INFERQ_BODY_TIMEOUT_MS must be at most 3600000",
        ),
        (
            &["--header-timeout-ms", "0"],
            "INFERQ_HEADER_TIMEOUT_MS must be at least 1",
        ),
        (
            &["--max-body-bytes", "2000", "--max-inflight-bytes", "1000"],
            "INFERQ_MAX_INFLIGHT_BYTES (1000) must be at least INFERQ_MAX_BODY_BYTES (2000)",
        ),
    ];
    for (args, says) in cases {
        let text = run_exit(
            inferq_command()
                .args(["--redis-url", "redis://127.0.0.1:1"])
                .args(args)
                .arg("gateway"),
            2,
        );
        assert!(text.contains(says), "{args:?}: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_refuses_a_wait_it_cannot_count_before_it_enqueues() {
    let redis = RedisServer::start();
    let reg = TempRegistry::with_models(&["tutorial-rf"]);
    let rows = format!("[[{}]]", vec!["0.5"; 20].join(","));
    for wait in ["1e30", "inf", "-1", "NaN", "604801", "soon"] {
        let text = run_exit(
            inferq_command()
                .arg("--models")
                .arg(reg.path())
                .args(["--redis-url", &redis.url()])
                .args(["submit", "tutorial-rf", "--rows", &rows])
                .arg(format!("--wait={wait}")),
            2,
        );
        assert!(
            text.contains("--wait")
                && (text.contains("out of range") || text.contains("not a number of seconds")),
            "--wait {wait}: {text}"
        );
    }
    assert_eq!(xlen(&redis, "tutorial-rf").await, 0, "nothing was enqueued");
}
