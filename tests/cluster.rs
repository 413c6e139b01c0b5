//! inferq on a real Redis Cluster: three `redis-server --cluster-enabled yes` on
//! loopback joined with `redis-cli --cluster create`, `inferq gateway` and
//! `inferq worker` given the three node URLs (comma-separated `INFERQ_REDIS_URL`).
//!
//! Three models are registered under names whose hash tags put their keys on three
//! different nodes. Jobs for each complete through the gateway (async submit +
//! long-poll, and the synchronous infer route), through a direct `XADD` with a
//! `reply_to` list, and through `inferq submit`; stats and dead-letter listing work;
//! no CROSSSLOT error appears in any answer or log.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::http::{Client, free_port, infer_body, response_outputs};
use common::queue::xadd_cmd;
use common::{Reference, TempRegistry, assert_outputs, inferq_command, run, run_ok};
use redis::Commands;
use serde_json::Value;

/// A direct (non-cluster) connection to one node.
fn node(port: u16) -> redis::Connection {
    redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .expect("url")
        .get_connection()
        .expect("connect to a node")
}

/// Three cluster nodes in a temporary directory; killed on drop.
struct Cluster {
    dir: tempfile::TempDir,
    ports: Vec<u16>,
    nodes: Vec<Child>,
}

impl Cluster {
    fn start() -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("iq-cluster-")
            .tempdir()
            .expect("temp dir");
        let mut cluster = Cluster {
            dir,
            ports: Vec::new(),
            nodes: Vec::new(),
        };
        for i in 0..3 {
            // A cluster node also listens on port + 10000 (the cluster bus).
            let port = loop {
                let p = free_port();
                if p < 55_000 && std::net::TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
                    break p;
                }
            };
            let node_dir = cluster.dir.path().join(format!("node-{i}"));
            std::fs::create_dir(&node_dir).expect("node dir");
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "5000"])
                .arg("--cluster-config-file")
                .arg(node_dir.join("nodes.conf"))
                .arg("--dir")
                .arg(&node_dir)
                .arg("--logfile")
                .arg(node_dir.join("redis.log"))
                .args(["--appendonly", "no", "--save", "", "--daemonize", "no"])
                // As shipped: a memory limit under which noeviction acts (without it
                // every role warns at start, and the test refuses warnings).
                .args(["--maxmemory", "256mb", "--maxmemory-policy", "noeviction"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start redis-server (run scripts/setup.sh)");
            cluster.ports.push(port);
            cluster.nodes.push(child);
        }
        for &p in &cluster.ports {
            let deadline = Instant::now() + Duration::from_secs(15);
            while redis::Client::open(format!("redis://127.0.0.1:{p}"))
                .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
                .is_err()
            {
                assert!(Instant::now() < deadline, "node {p} did not start");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let addrs: Vec<String> = cluster
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        run_ok(
            Command::new("redis-cli")
                .args(["--cluster", "create"])
                .args(&addrs)
                .args(["--cluster-replicas", "0", "--cluster-yes"]),
        );
        for &p in &cluster.ports {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query(&mut node(p))
                    .expect("CLUSTER INFO");
                if info.contains("cluster_state:ok") {
                    break;
                }
                assert!(Instant::now() < deadline, "node {p}: {info}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        cluster
    }

    /// `INFERQ_REDIS_URL` for the cluster: every node's URL, comma-separated.
    fn url(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A cluster-aware client connection.
    fn connection(&self) -> redis::cluster::ClusterConnection {
        redis::cluster::ClusterClient::new(
            self.ports
                .iter()
                .map(|p| format!("redis://127.0.0.1:{p}"))
                .collect::<Vec<_>>(),
        )
        .expect("cluster client")
        .get_connection()
        .expect("connect to the cluster")
    }

    /// The port of the node that owns `slot`.
    fn owner(&self, slot: u16) -> u16 {
        let slots: Vec<Vec<redis::Value>> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query(&mut node(self.ports[0]))
            .expect("CLUSTER SLOTS");
        for range in slots {
            let lo: u16 = redis::from_redis_value(range[0].clone()).expect("start");
            let hi: u16 = redis::from_redis_value(range[1].clone()).expect("end");
            if (lo..=hi).contains(&slot) {
                let master: Vec<redis::Value> =
                    redis::from_redis_value(range[2].clone()).expect("master");
                return redis::from_redis_value(master[1].clone()).expect("port");
            }
        }
        panic!("slot {slot} has no owner");
    }

    /// The slot of a key, as the cluster computes it.
    fn slot(&self, key: &str) -> u16 {
        redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut node(self.ports[0]))
            .expect("CLUSTER KEYSLOT")
    }

    fn logs(&self) -> String {
        (0..3)
            .map(|i| {
                std::fs::read_to_string(self.dir.path().join(format!("node-{i}/redis.log")))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in &mut self.nodes {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// An `inferq` role as a child process, logging (info, JSON lines) to a file; killed on
/// drop.
struct Role {
    child: Child,
    log: PathBuf,
}

impl Role {
    fn start(
        role: &str,
        cluster: &Cluster,
        registry: &Path,
        dir: &Path,
        metrics: u16,
        listen: u16,
    ) -> Role {
        let log = dir.join(format!("{role}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let child = inferq_command()
            .arg("--models")
            .arg(registry)
            .args(["--redis-url", &cluster.url()])
            .args(["--listen", &format!("127.0.0.1:{listen}")])
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics}")])
            .args(["--claim-after-ms", "2000", "--log-format", "json"])
            .arg(role)
            .env("RUST_LOG", "info")
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("start inferq {role}: {e}"));
        Role { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM (a clean, draining stop) and wait.
    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().expect("wait").is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.wait();
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `GET /v2/health/ready` on a metrics port answers 200 (the container
/// health-check script, pointed at the ready route).
fn wait_ready(port: u16, role: &mut Role) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ok = Command::new("bash")
            .arg(common::repo_root().join("deploy/docker/healthcheck.sh"))
            .args([&port.to_string(), "/v2/health/ready"])
            .stderr(Stdio::null())
            .status()
            .expect("run the health check")
            .success();
        if ok {
            return;
        }
        assert!(
            role.child.try_wait().expect("wait").is_none(),
            "the process exited:\n{}",
            role.log()
        );
        assert!(
            Instant::now() < deadline,
            "not ready on {port}:\n{}",
            role.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn no_crossslot(what: &str, text: &str) {
    let lower = text.to_lowercase();
    assert!(
        !lower.contains("crossslot") && !lower.contains("crossed slots"),
        "{what} mentions a CROSSSLOT error:\n{text}"
    );
}

#[test]
fn jobs_for_models_on_three_cluster_nodes_complete() {
    let cluster = Cluster::start();
    let work = tempfile::tempdir().expect("temp dir");

    // Names whose jobs streams land on three different nodes.
    let registry = TempRegistry::empty();
    let mut placed: BTreeMap<String, (String, u16)> = BTreeMap::new(); // name -> (model, node)
    for model in ["tutorial-rf", "digits-mlp", "iris-f64"] {
        let name = (0..50)
            .map(|i| {
                if i == 0 {
                    model.to_owned()
                } else {
                    format!("{model}-{i}")
                }
            })
            .find(|n| {
                let node = cluster.owner(cluster.slot(inferq::queue::Keys::new(n).jobs()));
                !placed.values().any(|(_, used)| *used == node)
            })
            .expect("a name on a free node");
        let node = cluster.owner(cluster.slot(inferq::queue::Keys::new(&name).jobs()));
        registry.add_as(model, &name);
        placed.insert(name, (model.to_owned(), node));
    }
    let nodes: std::collections::BTreeSet<u16> = placed.values().map(|(_, n)| *n).collect();
    assert_eq!(nodes.len(), 3, "models spread over three nodes: {placed:?}");
    // Every key of a model shares its slot (the hash tag).
    for name in placed.keys() {
        let k = inferq::queue::Keys::new(name);
        let slot = cluster.slot(k.jobs());
        for key in [
            k.dlq().to_owned(),
            k.inflight().to_owned(),
            k.job("x"),
            k.result("x"),
            format!("{}me", k.reply_prefix()),
        ] {
            assert_eq!(cluster.slot(&key), slot, "{key}");
        }
    }

    eprintln!("models and the node owning their slot: {placed:?}");
    let (g_metrics, g_listen, w_metrics) = (free_port(), free_port(), free_port());
    let mut gateway = Role::start(
        "gateway",
        &cluster,
        registry.path(),
        work.path(),
        g_metrics,
        g_listen,
    );
    let mut worker = Role::start(
        "worker",
        &cluster,
        registry.path(),
        work.path(),
        w_metrics,
        free_port(),
    );

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let http = Client::new(([127, 0, 0, 1], g_listen).into());
    wait_ready(g_metrics, &mut gateway);
    wait_ready(w_metrics, &mut worker);

    let mut answers = String::new();
    for (name, (model, _)) in &placed {
        let reference = Reference::load(model);
        let n = reference.rows();

        // 1. Through the gateway: async submit + long-poll, several jobs.
        rt.block_on(async {
            let mut ids = Vec::new();
            for j in 0..4 {
                let range = j * n / 4..(j + 1) * n / 4;
                let body = infer_body(&reference.input_rows(range.clone()), serde_json::json!({}));
                let r = http.post(&format!("/v1/models/{name}/jobs"), body).await;
                answers.push_str(&r.text());
                r.expect(202);
                ids.push((r.json()["id"].as_str().expect("id").to_owned(), range));
            }
            for (id, range) in ids {
                let r = http
                    .get(&format!("/v1/models/{name}/jobs/{id}?wait=30"))
                    .await;
                answers.push_str(&r.text());
                r.expect(200);
                let v = r.json();
                assert_eq!(v["status"], "succeeded", "{name} via the gateway: {v}");
                assert_outputs(
                    &response_outputs(&v["outputs"]),
                    &reference.output_rows(range),
                    name,
                );
            }
            // 2. The synchronous route.
            let body = infer_body(&reference.input_rows(0..n), serde_json::json!({}));
            let r = http.post(&format!("/v2/models/{name}/infer"), body).await;
            answers.push_str(&r.text());
            r.expect(200);
            assert_outputs(
                &response_outputs(&r.json()),
                &reference.output_rows(0..n),
                name,
            );
        });

        // 3. A direct producer: XADD with a reply_to list, on the cluster.
        let keys = inferq::queue::Keys::new(name);
        let reply = format!("{}direct", keys.reply_prefix());
        let mut conn = cluster.connection();
        let body = infer_body(&reference.input_rows(0..n), serde_json::json!({}));
        let fields = [
            ("v", "1"),
            ("id", "direct-1"),
            ("body", body.as_str()),
            ("reply_to", reply.as_str()),
        ];
        let _: String = xadd_cmd(name, &fields).query(&mut conn).expect("XADD");
        let popped: Option<(String, String)> = conn.blpop(&reply, 30.0).expect("BLPOP");
        let (_, record) =
            popped.unwrap_or_else(|| panic!("no reply for {name}:\n{}", worker.log()));
        answers.push_str(&record);
        let v: Value = serde_json::from_str(&record).expect("record JSON");
        assert_eq!(v["status"], "succeeded", "{name} direct: {v}");
        assert_eq!(v["id"], "direct-1");
        assert_outputs(
            &response_outputs(&v["outputs"]),
            &reference.output_rows(0..n),
            name,
        );
        // The keys live on the node that owns the model's slot.
        let owner = placed[name].1;
        let on_owner: i64 = redis::cmd("EXISTS")
            .arg(keys.jobs())
            .arg(keys.result("direct-1"))
            .query(&mut node(owner))
            .expect("EXISTS");
        assert_eq!(on_owner, 2, "{name}'s keys are on node {owner}");

        // 4. The CLI producer.
        let rows = match &reference.input_rows(0..1)[0].data {
            inferq::protocol::TensorData::Fp32(v) => serde_json::json!([v]),
            inferq::protocol::TensorData::Fp64(v) => serde_json::json!([v]),
            other => panic!("unexpected input type {other:?}"),
        };
        let out = run_ok(
            inferq_command()
                .arg("--models")
                .arg(registry.path())
                .args(["--redis-url", &cluster.url()])
                .args([
                    "submit",
                    name.as_str(),
                    "--rows",
                    &rows.to_string(),
                    "--wait",
                    "30",
                ]),
        );
        answers.push_str(&out);
        let v: Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("submit printed {out}: {e}"));
        assert_eq!(v["status"], "succeeded", "{name} via inferq submit: {v}");
        assert_outputs(
            &response_outputs(&v["outputs"]),
            &reference.output_rows(0..1),
            name,
        );

        // 5. Dead letters can be listed (read-only; none here).
        let out = run(inferq_command()
            .arg("--models")
            .arg(registry.path())
            .args(["--redis-url", &cluster.url()])
            .args(["dlq", "list", name.as_str()]));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "dlq list {name}: {text}");
        assert!(text.contains("0 dead letter(s)"), "{text}");
        answers.push_str(&text);
    }

    // Dead letters on the cluster: an entry without a valid id is dead-lettered; listing,
    // replaying (MULTI/EXEC on the model's slot) and purging it work.
    let first = placed.keys().next().expect("a model").clone();
    let _: String = xadd_cmd(&first, &[("v", "1"), ("id", "not a valid id!")])
        .query(&mut cluster.connection())
        .expect("XADD");
    let dlq = |args: &[&str]| {
        let out = run(inferq_command()
            .arg("--models")
            .arg(registry.path())
            .args(["--redis-url", &cluster.url(), "dlq"])
            .args(args));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "dlq {args:?}: {text}");
        text
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !dlq(&["list", &first]).contains("1 dead letter(s)") {
        assert!(
            Instant::now() < deadline,
            "no dead letter:\n{}",
            worker.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    answers.push_str(&dlq(&["replay", &first]));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !dlq(&["list", &first]).contains("1 dead letter(s)") {
        assert!(
            Instant::now() < deadline,
            "the replayed entry was not dead-lettered again"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    answers.push_str(&dlq(&["purge", &first]));
    assert!(dlq(&["list", &first]).contains("0 dead letter(s)"));

    // Stats read every model's queue depth (one slot each).
    rt.block_on(async {
        let r = http.get("/v1/stats").await;
        answers.push_str(&r.text());
        r.expect(200);
        let m = Client::new(([127, 0, 0, 1], w_metrics).into())
            .get("/metrics")
            .await;
        r.expect(200);
        answers.push_str(&m.text());
    });
    // Let the janitors and depth samplers run a round on the cluster before stopping.
    std::thread::sleep(Duration::from_secs(6));
    gateway.stop();
    worker.stop();

    no_crossslot("an answer", &answers);
    no_crossslot("the gateway log", &gateway.log());
    no_crossslot("the worker log", &worker.log());
    no_crossslot("the cluster nodes' logs", &cluster.logs());
    for (what, log) in [("gateway", gateway.log()), ("worker", worker.log())] {
        assert!(
            log.contains(r#""level":"INFO""#),
            "the {what} log was not captured:\n{log}"
        );
        let errors: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(r#""level":"WARN""#) || l.contains(r#""level":"ERROR""#))
            .collect();
        assert!(
            errors.is_empty(),
            "the {what} logged warnings or errors:\n{}",
            errors.join("\n")
        );
    }
}
