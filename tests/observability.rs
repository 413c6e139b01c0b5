//! Observability end to end: a private redis-server (with a password), `inferq serve`
//! (the binary, JSON logs), and a real Prometheus (the Debian package) scraping its
//! metrics listener every second with the shipped alert rules loaded. The test drives
//! a few thousand jobs over HTTP (with invalid, oversized, unauthorized, expired,
//! cancelled and dead-lettered ones), then:
//!
//! - runs every expression of `grafana/dashboards/inferq.json` (template variables
//!   substituted) through Prometheus' HTTP API: each parses and returns data;
//! - runs every alert rule Prometheus loaded from `prometheus/alerts.yml`: each
//!   parses and evaluates healthy; the dead-letter alert is active, the outage alerts
//!   are not;
//! - checks that the figures agree with what was sent (jobs by status, rejections by
//!   reason, HTTP answers by route and status, rows and batches, p95 against the
//!   latencies the client measured), and that `GET /v1/stats` agrees with `/metrics`;
//! - runs `promtool check config`, `check rules`, `test rules` on the shipped files
//!   and `promtool check metrics` on a live `/metrics`;
//! - reads the JSON log: every job's id and model are on its lines, and neither the
//!   API key nor the Redis password appears.
//!
//! Every wait is bounded; Prometheus and inferq are killed on drop.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::http::{Client, free_port, infer_body};
use common::queue::{cycled_inputs, xadd_cmd};
use common::{RedisOptions, RedisServer, Reference, TempRegistry, inferq_command, repo_root};
use hyper::Method;
use serde_json::{Value, json};

const MODEL: &str = "tutorial-rf";
const JOBS: &str = "/v1/models/tutorial-rf/jobs";
const API_KEY: &str = "observability-test-key-5f1c2a";
const REDIS_PASSWORD: &str = "observability-redis-pw-93d0e7";

/// Valid asynchronous jobs (1 to 3 rows each); every 10th is cancelled at once.
const JOBS_OK: usize = 2400;
/// A cancel races the worker and wins about one time in ten, so 240 tries make a
/// run without any won cancel practically impossible (24 tries failed ~8% of runs).
const CANCEL_EVERY: usize = 10;
/// Jobs whose `deadline_ms` has passed when submitted: the worker expires them.
const JOBS_EXPIRED: usize = 100;
/// Synchronous infers (`POST /v2/models/{m}/infer`, 200 with the outputs).
const JOBS_SYNC: usize = 20;
/// Refusals at the door, by reason.
const INVALID: usize = 40;
const TOO_LARGE: usize = 3;
const UNAUTHORIZED: usize = 5;
/// Submits to a model the registry does not know (404, reason invalid, model label
/// `_unknown`).
const UNKNOWN_MODEL: usize = 2;
/// Client tasks submitting and long-polling at once.
const LANES: usize = 48;
/// `INFERQ_MAX_BODY_BYTES` of the server.
const MAX_BODY: usize = 65_536;

/// Grafana's built-in variables and what the test puts for them: Prometheus scrapes
/// every second here, so one minute holds plenty of samples.
/// Longer names first: `$__range` is a prefix of `$__range_s`.
const BUILTINS: [(&str, &str); 4] = [
    ("$__rate_interval", "1m"),
    ("$__interval", "15s"),
    ("$__range_s", "300"),
    ("$__range", "5m"),
];

/// Metric families the dashboard may leave out: virtual memory says nothing about
/// what a process costs.
const NOT_ON_DASHBOARD: [&str; 2] = [
    "process_virtual_memory_bytes",
    "process_virtual_memory_max_bytes",
];

/// What the dashboard's `namespace`, `job` and `instance` variables are set to: the
/// test's Prometheus labels its one target `namespace="inferq"` as a PodMonitor would.
const NAMESPACE: &str = "inferq";
const JOB: &str = "inferq-worker";

/// Metric prefixes of cAdvisor and kube-state-metrics, which exist only on
/// Kubernetes: their queries must parse here, but may return nothing.
const KUBERNETES_ONLY: [&str; 2] = ["container_", "kube_"];

/// A child process, killed and reaped on drop; its output goes to `log`.
struct Proc {
    child: Child,
    what: &'static str,
    log: PathBuf,
}

impl Proc {
    fn spawn(cmd: &mut Command, what: &'static str, log: PathBuf) -> Proc {
        let out = File::create(&log).expect("create a log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what} (run scripts/setup.sh): {e}"));
        Proc { child, what, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics with the log when the process has exited.
    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            panic!(
                "{} exited ({status}):\n{}",
                self.what,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `addr` accepts TCP connections and `GET path` answers 200.
async fn wait_http_ok(proc: &mut Proc, addr: SocketAddr, path: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        proc.assert_running();
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            let r = Client::new(addr).get(path).await;
            if r.status.as_u16() == 200 {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} did not answer 200 on {path} within {timeout:?}:\n{}",
            proc.what,
            proc.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `application/x-www-form-urlencoded` encoding of one value.
fn form_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Prometheus' HTTP API.
struct Prom {
    client: Client,
}

impl Prom {
    /// An instant query: the result vector, or Prometheus' error.
    async fn query(&self, q: &str) -> Result<Vec<Value>, String> {
        let body = format!("query={}", form_encode(q));
        let r = self
            .client
            .send(
                Method::POST,
                "/api/v1/query",
                &[("content-type", "application/x-www-form-urlencoded")],
                body.into(),
            )
            .await;
        let v: Value = serde_json::from_slice(&r.body)
            .map_err(|e| format!("{}: not JSON ({e}): {}", r.status, r.text()))?;
        if v["status"] != "success" {
            return Err(format!("{}: {}", r.status, v));
        }
        match &v["data"]["result"] {
            Value::Array(list) => Ok(list.clone()),
            // A scalar or string result: one value.
            other => Ok(vec![json!({ "metric": {}, "value": other })]),
        }
    }

    /// The single value of `q` (NaN when the result is empty); panics on an error or
    /// on more than one series.
    async fn value(&self, q: &str) -> f64 {
        let list = self.query(q).await.unwrap_or_else(|e| panic!("{q}: {e}"));
        match list.as_slice() {
            [] => f64::NAN,
            [one] => sample_value(one),
            _ => panic!("{q} returned {} series: {list:?}", list.len()),
        }
    }

    /// Values of `q` by the value of `label`.
    async fn by(&self, q: &str, label: &str) -> BTreeMap<String, f64> {
        self.query(q)
            .await
            .unwrap_or_else(|e| panic!("{q}: {e}"))
            .iter()
            .map(|s| {
                (
                    s["metric"][label].as_str().unwrap_or_default().to_owned(),
                    sample_value(s),
                )
            })
            .collect()
    }

    /// Polls until `q` has the value `want`; panics with the last value after `timeout`.
    async fn wait_value(&self, q: &str, want: f64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.value(q).await;
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{q} is {got}, expected {want} (waited {timeout:?})"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// `GET path` as JSON, asserting `status: success`.
    async fn get(&self, path: &str) -> Value {
        let r = self.client.get(path).await;
        let v = r.json();
        assert_eq!(v["status"], "success", "GET {path}: {v}");
        v
    }
}

fn sample_value(sample: &Value) -> f64 {
    let v = &sample["value"][1];
    v.as_str()
        .and_then(|s| s.parse().ok())
        .or_else(|| v.as_f64())
        .unwrap_or_else(|| panic!("no value in {sample}"))
}

/// The dashboard's expressions as `(panel title, expression)`, from every panel's
/// targets (rows' nested panels included).
fn dashboard_exprs(dash: &Value) -> Vec<(String, String)> {
    fn walk(panels: &Value, out: &mut Vec<(String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or_default();
            if p["type"] == "row" {
                walk(&p["panels"], out);
                continue;
            }
            let targets = p["targets"].as_array().cloned().unwrap_or_default();
            assert!(!targets.is_empty(), "panel `{title}` has no query");
            assert_eq!(
                p["datasource"]["uid"], "${datasource}",
                "panel `{title}` uses the datasource variable"
            );
            for t in targets {
                let expr = t["expr"]
                    .as_str()
                    .unwrap_or_else(|| panic!("panel `{title}`: a target without expr"));
                out.push((title.to_owned(), expr.to_owned()));
            }
        }
    }
    let mut out = Vec::new();
    walk(&dash["panels"], &mut out);
    for a in dash["annotations"]["list"].as_array().into_iter().flatten() {
        if let Some(expr) = a["expr"].as_str() {
            let name = a["name"].as_str().unwrap_or_default();
            assert_eq!(a["datasource"]["uid"], "${datasource}", "annotation {name}");
            // An annotation marks events (`… > 0`), none of which this run has: its
            // series, the part before the comparison, must have data.
            let series = expr.rsplit_once(" > ").map_or(expr, |(series, _)| series);
            out.push((format!("annotation {name}"), series.to_owned()));
        }
    }
    out
}

/// An expression with the `model` variable and Grafana's built-ins substituted.
fn substitute(expr: &str) -> String {
    let mut out = expr
        .replace("${model:regex}", MODEL)
        .replace("${model}", MODEL)
        .replace("$model", MODEL)
        .replace("$namespace", NAMESPACE)
        .replace("$job", JOB)
        .replace("$instance", ".*");
    for (var, value) in BUILTINS {
        out = out.replace(var, value);
    }
    assert!(!out.contains('$'), "unsubstituted variable in {expr}");
    out
}

/// Runs `promtool` with `args`; panics with its output unless it succeeds. Returns
/// stdout and stderr together.
fn promtool(args: &[&str], stdin: Option<&str>) -> String {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(repo_root())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool (run scripts/setup.sh)");
    let mut pipe = child.stdin.take().expect("stdin");
    pipe.write_all(stdin.unwrap_or_default().as_bytes())
        .expect("write to promtool");
    drop(pipe);
    let out = child.wait_with_output().expect("promtool output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

/// Sum of the samples of `name` in a `/metrics` text whose labels include every one
/// of `labels` (`k="v"`).
fn exposed(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// What the client saw of one asynchronous job.
#[derive(Debug, Clone)]
struct Seen {
    id: String,
    status: String,
    rows: usize,
    /// Submit sent → terminal record received.
    client_latency: Duration,
    /// The record's `finished_ms - enqueued_ms` (none for a cancelled job).
    recorded_ms: Option<u64>,
}

/// Submits one job; cancels it at once when asked (a 409 means it already
/// finished); long-polls it to its end.
async fn run_job(c: &Client, body: String, rows: usize, cancel: bool) -> Seen {
    let t0 = Instant::now();
    let r = c.post(JOBS, body).await;
    r.expect(202);
    let v = r.json();
    let id = v["id"].as_str().expect("id").to_owned();
    let url = v["status_url"].as_str().expect("status_url").to_owned();
    if cancel {
        let d = c.delete(&url).await;
        match d.status.as_u16() {
            200 => {
                return Seen {
                    id,
                    status: "cancelled".into(),
                    rows,
                    client_latency: t0.elapsed(),
                    recorded_ms: None,
                };
            }
            409 => {}
            other => panic!("DELETE {url}: {other} {}", d.text()),
        }
    }
    for _ in 0..10 {
        let rec = c.get(&format!("{url}?wait=20")).await.expect(200).json();
        let status = rec["status"].as_str().unwrap_or_default().to_owned();
        if matches!(
            status.as_str(),
            "succeeded" | "failed" | "expired" | "cancelled"
        ) {
            let ms = |k: &str| rec[k].as_u64();
            return Seen {
                id,
                status,
                rows,
                client_latency: t0.elapsed(),
                recorded_ms: ms("finished_ms")
                    .zip(ms("enqueued_ms"))
                    .map(|(f, e)| f.saturating_sub(e)),
            };
        }
    }
    panic!("job {url} not terminal after 10 long-polls of 20 s");
}

/// The `q` quantile of sorted values (nearest rank).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_panel_and_alert_query_runs_against_a_real_prometheus() {
    // --- The shipped files, checked statically -------------------------------------
    let root = repo_root();
    let dir = tempfile::tempdir().expect("temp dir");
    let alerts = root.join("prometheus/alerts.yml");
    promtool(&["check", "rules", "prometheus/alerts.yml"], None);
    promtool(&["test", "rules", "prometheus/alerts.test.yml"], None);
    let shipped = std::fs::read_to_string(root.join("prometheus.yml")).expect("prometheus.yml");
    assert!(
        shipped.contains("/etc/prometheus/alerts.yml"),
        "prometheus.yml loads the rules where compose mounts them"
    );
    let local = dir.path().join("prometheus.yml");
    let alerts_json = serde_json::to_string(&alerts.to_string_lossy()).expect("a path");
    std::fs::write(
        &local,
        shipped.replace(
            "/etc/prometheus/alerts.yml",
            &alerts_json[1..alerts_json.len() - 1],
        ),
    )
    .expect("write a prometheus.yml copy");
    let checked = promtool(
        &["check", "config", local.to_str().expect("utf-8 path")],
        None,
    );
    assert!(checked.contains("SUCCESS: 1 rule files found"), "{checked}");

    // --- Redis (with a password the logs must never show), inferq, Prometheus ---------
    let redis = RedisServer::with(RedisOptions {
        tcp: true,
        ..RedisOptions::default()
    });
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg(REDIS_PASSWORD)
        .query::<()>(&mut redis.connection())
        .expect("CONFIG SET requirepass");
    let tcp = redis.tcp_url().expect("tcp");
    let redis_url = tcp.replace("redis://", &format!("redis://:{REDIS_PASSWORD}@"));
    let reg = TempRegistry::with_models(&[MODEL]);
    let reference = Reference::load(MODEL);

    let api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let ops: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let mut server = Proc::spawn(
        inferq_command()
            .env("INFERQ_REDIS_URL", &redis_url)
            .env("INFERQ_MODELS", reg.path())
            .env("INFERQ_LISTEN", api.to_string())
            .env("INFERQ_METRICS_LISTEN", ops.to_string())
            .env("INFERQ_API_KEYS", API_KEY)
            .env("INFERQ_MAX_BODY_BYTES", MAX_BODY.to_string())
            .env("INFERQ_DATA_DIR", dir.path().join("data"))
            .env("INFERQ_LOG_FORMAT", "json")
            .env("RUST_LOG", "info,inferq=debug")
            .arg("serve"),
        "inferq serve",
        dir.path().join("inferq.log"),
    );
    wait_http_ok(
        &mut server,
        ops,
        "/v2/health/ready",
        Duration::from_secs(30),
    )
    .await;
    wait_http_ok(
        &mut server,
        api,
        "/v2/health/ready",
        Duration::from_secs(30),
    )
    .await;

    let prom_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let prom_config = dir.path().join("prometheus-test.yml");
    std::fs::write(
        &prom_config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {alerts_json}\n\
             scrape_configs:\n  - job_name: inferq-worker\n    static_configs:\n      - targets: [\"{ops}\"]\n        labels: {{namespace: {NAMESPACE}}}\n"
        ),
    )
    .expect("write the test prometheus config");
    promtool(
        &["check", "config", prom_config.to_str().expect("utf-8 path")],
        None,
    );
    let mut prometheus = Proc::spawn(
        Command::new("prometheus")
            .arg(format!("--config.file={}", prom_config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={prom_addr}"))
            .arg("--log.level=warn"),
        "prometheus",
        dir.path().join("prometheus.log"),
    );
    wait_http_ok(
        &mut prometheus,
        prom_addr,
        "/-/ready",
        Duration::from_secs(30),
    )
    .await;
    let prom = Prom {
        client: Client::new(prom_addr),
    };
    // The target is up, and the model's series exist at zero before the first job
    // (so rate() and increase() see every increment).
    let up = r#"up{job="inferq-worker"}"#;
    prom.wait_value(up, 1.0, Duration::from_secs(30)).await;
    let zero = format!(r#"sum(inferq_jobs_dead_lettered_total{{model="{MODEL}"}})"#);
    prom.wait_value(&zero, 0.0, Duration::from_secs(30)).await;

    // --- Load ---------------------------------------------------------------------
    let c = Client::new(api).with_key(API_KEY);
    let mut specs: Vec<(String, usize, bool)> = Vec::new(); // body, rows, cancel
    let mut expired_left = JOBS_EXPIRED;
    for i in 0..JOBS_OK {
        let rows = 1 + i % 3;
        let inputs = cycled_inputs(&reference, i, rows);
        specs.push((
            infer_body(&inputs, json!({})),
            rows,
            i % CANCEL_EVERY == CANCEL_EVERY / 2,
        ));
        if i % (JOBS_OK / JOBS_EXPIRED) == 0 && expired_left > 0 {
            expired_left -= 1;
            let inputs = cycled_inputs(&reference, i, 1);
            specs.push((infer_body(&inputs, json!({ "deadline_ms": 1 })), 1, false));
        }
    }
    assert_eq!(expired_left, 0);
    let specs = std::sync::Arc::new(specs);
    let started = Instant::now();
    let mut lanes = tokio::task::JoinSet::new();
    for lane in 0..LANES {
        let (c, specs) = (c.clone(), std::sync::Arc::clone(&specs));
        lanes.spawn(async move {
            let mut seen = Vec::new();
            for (body, rows, cancel) in specs.iter().skip(lane).step_by(LANES) {
                seen.push(run_job(&c, body.clone(), *rows, *cancel).await);
            }
            seen
        });
    }
    // Refusals and the dead letter while the jobs run.
    let width = reference.inputs[0].row_len();
    for i in 0..INVALID {
        let body = if i % 2 == 0 {
            "{not json".to_owned()
        } else {
            let narrow = json!([{ "name": "input", "shape": [1, width - 1], "datatype": "FP32",
                                  "data": vec![0.5; width - 1] }]);
            json!({ "inputs": narrow }).to_string()
        };
        c.post(JOBS, body).await.expect_error(400, "invalid");
    }
    let huge = json!({ "padding": "x".repeat(MAX_BODY + 100) }).to_string();
    for _ in 0..TOO_LARGE {
        c.post(JOBS, huge.clone())
            .await
            .expect_error(413, "too_large");
    }
    let anonymous = Client::new(api);
    let one_row = infer_body(&cycled_inputs(&reference, 0, 1), json!({}));
    for _ in 0..UNAUTHORIZED {
        anonymous
            .post(JOBS, one_row.clone())
            .await
            .expect_error(401, "unauthorized");
    }
    for _ in 0..UNKNOWN_MODEL {
        c.post("/v1/models/no-such-model/jobs", one_row.clone())
            .await
            .expect_error(404, "not_found");
    }
    // An entry without a job id cannot be answered: the worker dead-letters it.
    let mut conn = redis::Client::open(redis_url.as_str())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect with the password");
    let _: String = xadd_cmd(MODEL, &[("junk", "1")])
        .query_async(&mut conn)
        .await
        .expect("XADD a junk entry");

    let mut seen: Vec<Seen> = Vec::new();
    while let Some(lane) = lanes.join_next().await {
        seen.extend(lane.expect("a client lane panicked"));
    }
    let mut sync_rows = 0;
    for i in 0..JOBS_SYNC {
        let rows = 1 + i % 3;
        sync_rows += rows;
        let body = infer_body(&cycled_inputs(&reference, i, rows), json!({}));
        c.post("/v2/models/tutorial-rf/infer", body)
            .await
            .expect(200);
    }
    let elapsed = started.elapsed();
    eprintln!(
        "drove {} jobs in {elapsed:?}",
        seen.len() + JOBS_SYNC + INVALID + TOO_LARGE + UNAUTHORIZED + UNKNOWN_MODEL
    );

    // What the client saw.
    let count = |status: &str| seen.iter().filter(|s| s.status == status).count();
    let cancelled = count("cancelled");
    eprintln!(
        "cancels that won the race: {cancelled} of {}",
        JOBS_OK / CANCEL_EVERY
    );
    assert_eq!(
        count("expired"),
        JOBS_EXPIRED,
        "every past-deadline job expired"
    );
    assert_eq!(
        count("succeeded"),
        JOBS_OK - cancelled,
        "every other job succeeded"
    );
    assert!(
        cancelled > 0,
        "no cancel came before its job finished; the test needs one"
    );
    let submitted = (JOBS_OK + JOBS_EXPIRED + JOBS_SYNC) as f64;
    let succeeded = (JOBS_OK - cancelled + JOBS_SYNC) as f64;

    // --- Wait for Prometheus to hold the final figures ----------------------------
    let wait = Duration::from_secs(60);
    let fin = |status: &str| {
        format!(r#"sum(inferq_jobs_finished_total{{model="{MODEL}", status="{status}"}})"#)
    };
    prom.wait_value(&fin("succeeded"), succeeded, wait).await;
    prom.wait_value(&fin("failed"), 1.0, wait).await;
    // The queue is drained (sampled every 5 s): cancelled jobs' entries too.
    let drained = format!(
        r#"max(inferq_consumer_lag{{model="{MODEL}"}}) + max(inferq_pending_jobs{{model="{MODEL}"}})"#
    );
    prom.wait_value(&drained, 0.0, wait).await;
    // A few more scrapes, so every rate window holds the end of the run.
    tokio::time::sleep(Duration::from_secs(3)).await;
    server.assert_running();
    prometheus.assert_running();

    // --- Every dashboard expression parses and returns data -----------------------
    let dash_text =
        std::fs::read_to_string(root.join("grafana/dashboards/inferq.json")).expect("dashboard");
    let dash: Value = serde_json::from_str(&dash_text).expect("the dashboard is JSON");
    assert_eq!(dash["uid"], "inferq");
    // The datasource is a variable (the dashboard imports into any Grafana), and each
    // query variable lists what this stack has.
    let vars = dash["templating"]["list"].as_array().expect("variables");
    assert!(
        vars.iter().any(|v| v["name"] == "datasource"
            && v["type"] == "datasource"
            && v["query"] == "prometheus"),
        "a `datasource` variable of type prometheus"
    );
    let ops_instance = ops.to_string();
    for (name, want) in [
        ("namespace", NAMESPACE),
        ("job", JOB),
        ("instance", ops_instance.as_str()),
        ("model", MODEL),
    ] {
        let var = vars
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("a `{name}` template variable"));
        assert_eq!(var["datasource"]["uid"], "${datasource}", "{name}");
        assert_eq!(
            var["allValue"], ".*",
            "{name}: All matches a missing label too"
        );
        let def = substitute(var["definition"].as_str().expect("variable definition"));
        let (metric, label) = def
            .strip_prefix("label_values(")
            .and_then(|s| s.strip_suffix(')'))
            .and_then(|s| s.rsplit_once(", "))
            .unwrap_or_else(|| panic!("`{def}` is not label_values(metric, label)"));
        let values = prom
            .get(&format!(
                "/api/v1/label/{label}/values?match[]={}",
                form_encode(metric)
            ))
            .await;
        assert!(
            values["data"]
                .as_array()
                .is_some_and(|l| l.iter().any(|v| v == want)),
            "the {name} variable lists {want}: {values}"
        );
    }
    let exprs = dashboard_exprs(&dash);
    assert!(exprs.len() >= 30, "{} dashboard queries", exprs.len());
    let mut failures = Vec::new();
    for (title, expr) in &exprs {
        let q = substitute(expr);
        let kubernetes_only = KUBERNETES_ONLY.iter().any(|p| q.contains(p));
        match prom.query(&q).await {
            Ok(result) if result.is_empty() && !kubernetes_only => {
                failures.push(format!("panel `{title}`: no data for {q}"));
            }
            Ok(_) => {}
            Err(e) => failures.push(format!("panel `{title}`: {q}: {e}")),
        }
    }
    // Every metric family the server exports is on the dashboard.
    let exposition = Client::new(ops).get("/metrics").await.expect(200).text();
    for family in exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
    {
        if !NOT_ON_DASHBOARD.contains(&family) && !exprs.iter().any(|(_, e)| e.contains(family)) {
            failures.push(format!("metric {family} is on no panel"));
        }
    }
    assert!(failures.is_empty(), "dashboard:\n{}", failures.join("\n"));

    // --- Every alert rule loaded, healthy, and its expression runs ----------------
    let rules = prom.get("/api/v1/rules").await;
    let loaded: Vec<&Value> = rules["data"]["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .collect();
    let alerts_text = std::fs::read_to_string(&alerts).expect("alerts.yml");
    let declared = alerts_text.matches("- alert: ").count();
    let records = alerts_text.matches("- record: ").count();
    assert_eq!(
        loaded.len(),
        declared + records,
        "every rule of alerts.yml is loaded"
    );
    assert_eq!(
        alerts_text.matches("\n        for: ").count(),
        declared,
        "every alert has a `for:`"
    );
    let runbooks = std::fs::read_to_string(root.join("docs/RUNBOOKS.md")).expect("runbooks");
    let names: HashSet<&str> = loaded.iter().filter_map(|r| r["name"].as_str()).collect();
    for wanted in [
        "InferqBacklogGrowing",
        "InferqEndToEndLatencyHigh",
        "InferqJobsFailing",
        "InferqRejecting",
        "InferqGatewayErrors",
        "InferqDeadLetters",
        "InferqWorkerDown",
        "InferqNoWorkers",
        "InferqRedisUnreachable",
        "InferqJobsLost",
    ] {
        assert!(names.contains(wanted), "alert {wanted} missing: {names:?}");
    }
    for rule in &loaded {
        let name = rule["name"].as_str().unwrap_or_default();
        assert_eq!(rule["health"], "ok", "{name}: {rule}");
        let q = rule["query"].as_str().expect("query");
        if rule["type"] == "recording" {
            // Recording rules are named level:metric:operations and have data here.
            assert_eq!(name.matches(':').count(), 2, "{name}");
            match prom.query(name).await {
                Ok(r) if r.is_empty() => failures.push(format!("rule {name}: no data")),
                Ok(_) => {}
                Err(e) => failures.push(format!("rule {name}: {e}")),
            }
            continue;
        }
        assert_eq!(rule["type"], "alerting", "{rule}");
        assert!(
            matches!(
                rule["labels"]["severity"].as_str(),
                Some("critical" | "warning")
            ),
            "{name}: severity: {rule}"
        );
        for a in ["summary", "description"] {
            assert!(
                rule["annotations"][a]
                    .as_str()
                    .is_some_and(|s| !s.is_empty()),
                "{name}: annotation {a}: {rule}"
            );
        }
        // Every alert links its own section of docs/RUNBOOKS.md.
        let anchor = name.to_lowercase();
        assert_eq!(
            rule["annotations"]["runbook_url"].as_str(),
            Some(format!("https://inferq.example.com/docs/RUNBOOKS.md#{anchor}").as_str()),
            "{name}: runbook_url"
        );
        assert!(
            runbooks.contains(&format!("\n## {name}\n")),
            "docs/RUNBOOKS.md has no section {name}"
        );
        if let Err(e) = prom.query(q).await {
            failures.push(format!("alert {name}: {q}: {e}"));
        }
    }
    // KEDA's scaling query (deploy/k8s/worker.yaml) runs and gives one figure for all
    // models. (Not exactly 0: once a cancel has deleted an entry Redis may report the
    // group's lag as unknown, and the sampler then reports the stream's length.)
    let worker_yaml =
        std::fs::read_to_string(root.join("deploy/k8s/worker.yaml")).expect("worker.yaml");
    let keda = worker_yaml
        .lines()
        .find_map(|l| l.trim().strip_prefix("query: "))
        .expect("the ScaledObject's query");
    match prom.query(keda).await.as_deref() {
        Ok([one]) => {
            let v = sample_value(one);
            assert!((0.0..=submitted).contains(&v), "{keda}: {v}");
        }
        other => failures.push(format!("KEDA query {keda}: {other:?}")),
    }
    assert!(failures.is_empty(), "alert rules:\n{}", failures.join("\n"));
    // The dead letter makes its alert active (pending for its `for:`, then firing);
    // nothing here is down or lost.
    let deadline = Instant::now() + Duration::from_secs(20);
    let active = loop {
        let v = prom.get("/api/v1/alerts").await;
        let active: BTreeMap<String, String> = v["data"]["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| {
                (
                    a["labels"]["alertname"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                    a["state"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        if active.contains_key("InferqDeadLetters") || Instant::now() > deadline {
            break active;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        active.contains_key("InferqDeadLetters"),
        "the dead letter should make InferqDeadLetters active: {active:?}"
    );
    for quiet in [
        "InferqJobsFailing",
        "InferqRejecting",
        "InferqGatewayErrors",
        "InferqWorkerDown",
        "InferqNoWorkers",
        "InferqRedisUnreachable",
        "InferqRedisErrors",
        "InferqJobsLost",
        "InferqRedisDataLoss",
    ] {
        assert!(!active.contains_key(quiet), "{quiet} is active: {active:?}");
    }

    // --- The figures agree with what was sent -------------------------------------
    let m = format!(r#"model="{MODEL}""#);
    let statuses = prom
        .by(
            &format!("sum by (status) (inferq_jobs_finished_total{{{m}}})"),
            "status",
        )
        .await;
    let expected_statuses: BTreeMap<String, f64> = [
        ("succeeded", succeeded),
        ("failed", 1.0),
        ("expired", JOBS_EXPIRED as f64),
        ("cancelled", cancelled as f64),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(statuses, expected_statuses, "jobs finished by status");
    assert_eq!(
        prom.value(&format!("sum(inferq_jobs_submitted_total{{{m}}})"))
            .await,
        submitted
    );
    assert_eq!(
        statuses.values().sum::<f64>(),
        submitted + 1.0,
        "each job counted once (plus the junk entry)"
    );
    assert_eq!(
        prom.value(&format!("sum(inferq_jobs_dead_lettered_total{{{m}}})"))
            .await,
        1.0
    );
    let duplicates = prom
        .value(&format!("sum(inferq_duplicate_deliveries_total{{{m}}})"))
        .await;
    assert!(
        duplicates <= cancelled as f64,
        "only cancelled jobs are delivered after their end: {duplicates} > {cancelled}"
    );
    assert_eq!(
        prom.value(&format!("sum(inferq_jobs_lost_total{{{m}}})"))
            .await,
        0.0
    );
    let reasons = prom
        .by(
            &format!("sum by (reason) (inferq_jobs_rejected_total{{{m}}})"),
            "reason",
        )
        .await;
    let expected_reasons: BTreeMap<String, f64> = [
        ("invalid", INVALID),
        ("too_large", TOO_LARGE),
        ("unauthorized", UNAUTHORIZED),
        ("queue_full", 0),
        ("unavailable", 0),
        ("timeout", 0),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v as f64))
    .collect();
    assert_eq!(reasons, expected_reasons, "rejections by reason");
    let by_model = prom
        .by("sum by (model) (inferq_jobs_rejected_total)", "model")
        .await;
    assert_eq!(
        by_model.get("_unknown"),
        Some(&(UNKNOWN_MODEL as f64)),
        "a model the registry does not know is labelled _unknown: {by_model:?}"
    );
    assert!(!by_model.contains_key("no-such-model"), "{by_model:?}");
    let http = prom
        .by(
            r#"sum by (route_status) (label_join(inferq_http_request_duration_seconds_count, "route_status", " ", "route", "status"))"#,
            "route_status",
        )
        .await;
    for (key, want) in [
        ("/v1/models/{m}/jobs 202", JOBS_OK + JOBS_EXPIRED),
        ("/v1/models/{m}/jobs 400", INVALID),
        ("/v1/models/{m}/jobs 413", TOO_LARGE),
        ("/v1/models/{m}/jobs 404", UNKNOWN_MODEL),
        ("unauthorized 401", UNAUTHORIZED),
        ("/v2/models/{m}/infer 200", JOBS_SYNC),
    ] {
        assert_eq!(http.get(key), Some(&(want as f64)), "HTTP {key}: {http:?}");
    }

    // Rows and batches: every computed row is counted once, in both places.
    let rows_done: usize = seen
        .iter()
        .filter(|s| s.status == "succeeded")
        .map(|s| s.rows)
        .sum::<usize>()
        + sync_rows;
    let rows_cancelled: usize = seen
        .iter()
        .filter(|s| s.status == "cancelled")
        .map(|s| s.rows)
        .sum();
    let rows = prom
        .value(&format!("sum(inferq_rows_inferred_total{{{m}}})"))
        .await;
    assert!(
        rows >= rows_done as f64 && rows <= (rows_done + rows_cancelled) as f64,
        "rows inferred {rows}, expected {rows_done} (+ up to {rows_cancelled} cancelled)"
    );
    for (a, b) in [
        (
            format!("sum(inferq_batch_rows_sum{{{m}}})"),
            format!("sum(inferq_rows_inferred_total{{{m}}})"),
        ),
        (
            format!("sum(inferq_batch_rows_count{{{m}}})"),
            format!("sum(inferq_batches_total{{{m}}})"),
        ),
        (
            format!("sum(inferq_batch_jobs_sum{{{m}}})"),
            format!("sum(inferq_queue_wait_seconds_count{{{m}}})"),
        ),
    ] {
        assert_eq!(prom.value(&a).await, prom.value(&b).await, "{a} vs {b}");
    }
    let batches = prom
        .value(&format!("sum(inferq_batches_total{{{m}}})"))
        .await;
    assert!(
        batches >= 1.0 && batches < rows,
        "{batches} batches for {rows} rows: no batching?"
    );

    // p95 end-to-end from the histogram against what the client measured.
    let p95 = prom
        .value(&format!(
            "histogram_quantile(0.95, sum by (le) (inferq_end_to_end_seconds_bucket{{{m}}}))"
        ))
        .await;
    let mut client: Vec<f64> = seen
        .iter()
        .filter(|s| s.status != "cancelled")
        .map(|s| s.client_latency.as_secs_f64())
        .collect();
    client.sort_by(f64::total_cmp);
    let mut recorded: Vec<f64> = seen
        .iter()
        .filter_map(|s| s.recorded_ms)
        .map(|ms| ms as f64 / 1000.0)
        .collect();
    recorded.sort_by(f64::total_cmp);
    let (lo, hi) = (client[0], client[client.len() - 1]);
    let rec_p95 = quantile(&recorded, 0.95);
    eprintln!(
        "p95 end-to-end: histogram {p95:.4} s, records {rec_p95:.4} s; client {lo:.4}..{hi:.4} s (p95 {:.4} s)",
        quantile(&client, 0.95)
    );
    let (lo_bound, hi_bound) = (lo / 2.0, hi.mul_add(1.5, 0.01));
    assert!(
        (lo_bound..=hi_bound).contains(&p95),
        "histogram p95 {p95} s outside the client's range {lo}..{hi} s"
    );
    // Buckets are at most 2x apart: the interpolated p95 is within that of the
    // records' own p95 (the records' timestamps are the server's, in ms).
    let (lo_bound, hi_bound) = (rec_p95 / 2.0 - 0.002, rec_p95.mul_add(2.0, 0.002));
    assert!(
        (lo_bound..=hi_bound).contains(&p95),
        "histogram p95 {p95} s vs {rec_p95} s from the job records"
    );

    // --- /metrics is clean, and /v1/stats agrees with it --------------------------
    let lint = promtool(&["check", "metrics"], Some(&exposition));
    assert!(lint.trim().is_empty(), "promtool check metrics:\n{lint}");
    for family in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
        "inferq_redis_up",
    ] {
        let v = exposed(&exposition, family, &[]);
        assert!(v > 0.0, "{family} is {v}");
    }
    let build = exposition
        .lines()
        .find(|l| l.starts_with("inferq_build_info{"))
        .expect("build info");
    assert!(
        build.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION")))
            && !build.contains("onnxruntime=\"unknown\"")
            && !build.contains("onnxruntime=\"unavailable\""),
        "{build}"
    );
    let stats = c.get("/v1/stats").await.expect(200).json();
    let text = c.get("/metrics").await.expect(200).text();
    let finished = |status: &str| {
        exposed(
            &text,
            "inferq_jobs_finished_total",
            &[&format!("status=\"{status}\"")],
        )
    };
    let stat = |k: &str| stats[k].as_f64().unwrap_or_else(|| panic!("{k}: {stats}"));
    assert_eq!(
        stat("successful_predictions"),
        finished("succeeded"),
        "{stats}"
    );
    assert_eq!(stat("successful_predictions"), succeeded, "{stats}");
    assert_eq!(stat("failed_predictions"), finished("failed"), "{stats}");
    assert_eq!(
        stat("jobs_submitted"),
        exposed(&text, "inferq_jobs_submitted_total", &[]),
        "{stats}"
    );
    assert_eq!(stat("jobs_submitted"), submitted, "{stats}");
    assert_eq!(stats["queue_depth"][MODEL]["lag"], 0, "{stats}");
    assert_eq!(stats["queue_depth"][MODEL]["pending"], 0, "{stats}");
    assert!(stat("memory_mb") > 0.0, "{stats}");

    // --- Logs: JSON, job id and model on each job's lines, no secrets ------------
    drop(prometheus);
    drop(server);
    let log = std::fs::read_to_string(dir.path().join("inferq.log")).expect("inferq log");
    assert!(!log.contains(API_KEY), "the API key is in the log");
    assert!(
        !log.contains(REDIS_PASSWORD),
        "the Redis password is in the log"
    );
    let mut finished_ids = HashSet::new();
    let mut queued_ids = HashSet::new();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("a log line is not JSON ({e}): {line}"));
        let f = &v["fields"];
        let job = || {
            assert_eq!(f["model"], MODEL, "{line}");
            f["id"].as_str().unwrap_or_default().to_owned()
        };
        match f["message"].as_str() {
            Some("job finished") => {
                finished_ids.insert(job());
            }
            Some("job queued") => {
                queued_ids.insert(job());
            }
            _ => {}
        }
    }
    for s in &seen {
        assert!(
            queued_ids.contains(&s.id),
            "no `job queued` line for {}",
            s.id
        );
        if s.status != "cancelled" {
            assert!(
                finished_ids.contains(&s.id),
                "no `job finished` line for {}",
                s.id
            );
        }
    }
}

#[test]
fn substitution_leaves_valid_promql_shapes() {
    assert_eq!(
        substitute(r#"rate(x{model=~"$model"}[$__rate_interval])"#),
        r#"rate(x{model=~"tutorial-rf"}[1m])"#
    );
    assert_eq!(substitute("increase(x[$__range])"), "increase(x[5m])");
    assert_eq!(form_encode("a b{c=\"d\"}"), "a%20b%7Bc%3D%22d%22%7D");
    assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0], 0.5), 2.0);
    assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0], 0.95), 4.0);
}
