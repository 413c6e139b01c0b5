//! The deployment files, checked offline: the Dockerfile, `docker-compose.yml` and the
//! Kubernetes manifests in `deploy/k8s/`.
//!
//! - Kubernetes objects pass `kubernetes-validate --strict` (the Kubernetes JSON
//!   schemas); KEDA's ScaledObject and TriggerAuthentication pass the schema of KEDA's
//!   API types (`@kubernetes-models/keda`) with unknown fields refused, and their Redis
//!   Streams triggers use only the scaler's documented parameters;
//! - `docker-compose config` (Debian's 1.29) accepts the compose file;
//! - every `INFERQ_*` variable in these files is one the binary documents, and every
//!   command they run is a real `inferq` subcommand or a script the image installs;
//! - the policy the issue asks for (loopback-only ports, AOF always + noeviction,
//!   read-only registry, probes, drain period, lag-based scaling, no secret values …).
//!
//! The validators live in `.tools/deploy-validate/` (installed by `scripts/setup.sh`
//! through `deploy/validate/install.sh`). A missing validator fails the test with that
//! instruction: nothing is skipped. Each validator is also shown a broken input, so a
//! validator that accepts everything cannot pass the suite.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{inferq_command, repo_root, run, run_ok};
use serde_json::Value;

// ------------------------------------------------------------------ tools

/// Paths of the offline validators; panics with the way to install them.
struct Tools {
    python: PathBuf,
    kubernetes_validate: PathBuf,
    node_modules: PathBuf,
}

fn tools() -> Tools {
    let base = repo_root().join(".tools/deploy-validate");
    let t = Tools {
        python: base.join("venv/bin/python"),
        kubernetes_validate: base.join("venv/bin/kubernetes-validate"),
        node_modules: base.join("node_modules"),
    };
    let missing: Vec<String> = [
        &t.python,
        &t.kubernetes_validate,
        &t.node_modules.join("@kubernetes-models/keda/package.json"),
        &t.node_modules.join("dockerfile-utils/package.json"),
    ]
    .into_iter()
    .filter(|p| !p.exists())
    .map(|p| p.display().to_string())
    .collect();
    assert!(
        missing.is_empty(),
        "deployment validators are not installed ({}): run scripts/setup.sh \
         (or bash deploy/validate/install.sh)",
        missing.join(", ")
    );
    let node = Command::new("node").arg("--version").output();
    assert!(
        node.as_ref().is_ok_and(|o| o.status.success()),
        "`node` is not runnable ({node:?}): the KEDA and Dockerfile validators need Node.js"
    );
    t
}

fn validate_dir() -> PathBuf {
    repo_root().join("deploy/validate")
}

fn k8s_dir() -> PathBuf {
    repo_root().join("deploy/k8s")
}

/// One YAML document of a file.
#[derive(Debug, Clone)]
struct Doc {
    doc: Value,
}

impl Doc {
    fn kind(&self) -> &str {
        self.doc["kind"].as_str().unwrap_or_default()
    }
    fn name(&self) -> &str {
        self.doc["metadata"]["name"].as_str().unwrap_or_default()
    }
}

/// Every YAML document of `files`, parsed by PyYAML (the validators' venv).
fn yaml_docs(files: &[PathBuf]) -> Vec<Doc> {
    let t = tools();
    let out = run_ok(
        Command::new(&t.python)
            .arg(validate_dir().join("yaml2json.py"))
            .args(files),
    );
    let v: Value = serde_json::from_str(&out).expect("yaml2json prints JSON");
    v.as_array()
        .expect("an array")
        .iter()
        .map(|d| Doc {
            doc: d["doc"].clone(),
        })
        .collect()
}

/// The files kustomization.yaml lists, as paths.
fn k8s_files() -> Vec<PathBuf> {
    let kust = yaml_docs(&[k8s_dir().join("kustomization.yaml")]);
    kust[0].doc["resources"]
        .as_array()
        .expect("kustomization resources")
        .iter()
        .map(|r| k8s_dir().join(r.as_str().expect("a path")))
        .collect()
}

fn k8s_docs() -> Vec<Doc> {
    yaml_docs(&k8s_files())
}

fn find<'a>(docs: &'a [Doc], kind: &str, name: &str) -> &'a Value {
    &docs
        .iter()
        .find(|d| d.kind() == kind && d.name() == name)
        .unwrap_or_else(|| panic!("no {kind}/{name} in deploy/k8s"))
        .doc
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The demo model names (testdata/models/*.onnx), which the image ships and loads.
fn demo_models() -> BTreeSet<String> {
    std::fs::read_dir(repo_root().join("testdata/models"))
        .expect("testdata/models")
        .filter_map(|e| {
            let p = e.ok()?.path();
            (p.extension()? == "onnx").then(|| p.file_stem()?.to_str().map(str::to_owned))?
        })
        .collect()
}

// ------------------------------------------------------------------ Kubernetes

#[test]
fn kustomization_lists_every_manifest() {
    let listed: BTreeSet<PathBuf> = k8s_files().into_iter().collect();
    let on_disk: BTreeSet<PathBuf> = std::fs::read_dir(k8s_dir())
        .expect("deploy/k8s")
        .map(|e| e.expect("entry").path())
        .filter(|p| {
            p.extension().is_some_and(|x| x == "yaml")
                && p.file_name().is_some_and(|n| n != "kustomization.yaml")
        })
        .collect();
    assert_eq!(listed, on_disk, "kustomization.yaml resources vs files");
    let kust = yaml_docs(&[k8s_dir().join("kustomization.yaml")]);
    assert_eq!(kust[0].doc["namespace"], "inferq");
}

#[test]
fn kubernetes_objects_pass_strict_schema_validation() {
    let t = tools();
    let files = k8s_files();
    let out = run(Command::new(&t.kubernetes_validate)
        .arg("--strict")
        .args(&files));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "kubernetes-validate failed:\n{text}");
    // Only KEDA's kinds may lack a Kubernetes schema (they are checked below).
    for line in text.lines().filter(|l| !l.starts_with("INFO ")) {
        let keda = line.contains("Couldn't find schema for kind")
            && line.contains("with api version keda.sh/v1alpha1")
            && (line.contains("kind ScaledObject ")
                || line.contains("kind TriggerAuthentication "));
        assert!(
            keda,
            "unexpected kubernetes-validate output: {line}\n{text}"
        );
    }
    let non_keda = k8s_docs()
        .iter()
        .filter(|d| {
            !d.doc["apiVersion"]
                .as_str()
                .unwrap_or("")
                .starts_with("keda.sh/")
        })
        .count();
    let passed = text
        .lines()
        .filter(|l| l.contains(" passed for resource "))
        .count();
    assert!(non_keda >= 15, "too few objects found: {non_keda}");
    assert_eq!(passed, non_keda, "every non-KEDA object passes:\n{text}");

    // The validator really is strict: an unknown field in a pod spec fails.
    let dir = tempfile::tempdir().expect("temp dir");
    let broken = dir.path().join("gateway.yaml");
    let text = read(&k8s_dir().join("gateway.yaml")).replacen(
        "imagePullPolicy: IfNotPresent",
        "imagePullPolicy: IfNotPresent\n          imagePullPolicyy: Always",
        1,
    );
    std::fs::write(&broken, text).expect("write");
    let out = run(Command::new(&t.kubernetes_validate)
        .arg("--strict")
        .arg(&broken));
    assert!(
        !out.status.success(),
        "kubernetes-validate --strict accepted an unknown field: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Runs deploy/validate/keda.mjs on the documents of `files`.
fn keda_check(files: &[PathBuf]) -> (bool, String) {
    let t = tools();
    let json = run_ok(
        Command::new(&t.python)
            .arg(validate_dir().join("yaml2json.py"))
            .args(files),
    );
    let mut child = Command::new("node")
        .arg(validate_dir().join("keda.mjs"))
        .arg(&t.node_modules)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run node");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(json.as_bytes()).expect("write documents");
    }
    let out = child.wait_with_output().expect("node output");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn keda_objects_pass_kedas_schema_and_the_scalers_parameters() {
    let (ok, text) = keda_check(&k8s_files());
    assert!(ok, "KEDA validation failed:\n{text}");
    assert!(
        text.contains("1 KEDA object(s) checked, 0 problem(s)"),
        "expected the ScaledObject to be checked:\n{text}"
    );

    // Broken copies are refused: unknown spec field, wrong type, unknown scaler
    // parameter, a required parameter missing, a threshold that is not a number.
    let dir = tempfile::tempdir().expect("temp dir");
    let worker = read(&k8s_dir().join("worker.yaml"));
    for (what, from, to) in [
        (
            "unknown field",
            "  pollingInterval: 15",
            "  pollingInterval: 15\n  pollInterval: 10",
        ),
        (
            "wrong type",
            "  maxReplicaCount: 20",
            "  maxReplicaCount: \"20\"",
        ),
        (
            "unknown parameter",
            "        ignoreNullValues: \"false\"",
            "        ignoreNullValues: \"false\"\n        lagCount: \"5\"",
        ),
        ("missing query", "        query: ", "        quer: "),
        ("bad threshold", "threshold: \"256\"", "threshold: \"lots\""),
    ] {
        assert!(
            worker.contains(from),
            "worker.yaml no longer contains {from:?}"
        );
        let p = dir.path().join("worker.yaml");
        std::fs::write(&p, worker.replacen(from, to, 1)).expect("write");
        let (ok, text) = keda_check(&[p]);
        assert!(
            !ok,
            "the KEDA check accepted a ScaledObject with {what}:\n{text}"
        );
    }
}

/// The query of the worker ScaledObject's one trigger.
fn scaling_query(docs: &[Doc]) -> String {
    let so = find(docs, "ScaledObject", "inferq-worker");
    so["spec"]["triggers"][0]["metadata"]["query"]
        .as_str()
        .expect("a query")
        .to_owned()
}

#[test]
fn workers_scale_on_the_summed_lag_of_every_model() {
    let docs = k8s_docs();
    let so = find(&docs, "ScaledObject", "inferq-worker");
    let spec = &so["spec"];
    assert_eq!(spec["scaleTargetRef"]["name"], "inferq-worker");
    find(&docs, "Deployment", "inferq-worker");
    let (min, max) = (
        spec["minReplicaCount"].as_u64(),
        spec["maxReplicaCount"].as_u64(),
    );
    assert!(min >= Some(1) && max > min, "{spec}");
    // Inert at minReplicaCount >= 1 (they act only between 0 and 1): not set.
    assert!(spec.get("cooldownPeriod").is_none(), "{spec}");
    // A failing scaler holds a fixed pool within the bounds, not the minimum.
    let fallback = &spec["fallback"];
    assert!(fallback["failureThreshold"].as_u64() >= Some(1), "{spec}");
    let replicas = fallback["replicas"].as_u64();
    assert!(replicas > min && replicas <= max, "{spec}");

    // One Prometheus trigger over every model (no model named): a new model counts
    // without a trigger of its own. Its namespace is the kustomization's.
    let triggers = spec["triggers"].as_array().expect("triggers");
    assert_eq!(triggers.len(), 1, "{triggers:?}");
    let t = &triggers[0];
    assert_eq!(t["type"], "prometheus", "{t}");
    let md = &t["metadata"];
    assert!(
        md.get("activationThreshold").is_none(),
        "inert at min 1: {t}"
    );
    assert_eq!(
        md["ignoreNullValues"], "false",
        "no series must mean fallback: {t}"
    );
    let query = scaling_query(&docs);
    assert!(
        query.starts_with("sum(") && query.contains("inferq_consumer_lag{"),
        "{query}"
    );
    assert!(!query.contains("model="), "no model is named: {query}");
    let kust = yaml_docs(&[k8s_dir().join("kustomization.yaml")]);
    let ns = kust[0].doc["namespace"].as_str().expect("namespace");
    assert!(query.contains(&format!("namespace=\"{ns}\"")), "{query}");
    let threshold: f64 = md["threshold"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .expect("a numeric threshold");
    let max_batch: f64 = config_map(&docs)["INFERQ_MAX_BATCH"]
        .parse()
        .expect("max batch");
    assert!(
        threshold >= max_batch,
        "a target below one batch per worker: {threshold}"
    );
    // The reasoning stays with the ScaledObject.
    let worker = read(&k8s_dir().join("worker.yaml"));
    assert!(worker.contains("pending counts only entries already delivered"));
    assert!(worker.contains("KEDA\n# 2.11 or later"));
    let readme = read(&k8s_dir().join("README.md"));
    assert!(readme.contains("KEDA 2.11"), "deploy/k8s/README.md");
}

/// Bytes of a memory size as Redis (`768mb`: powers of 1024), Kubernetes (`2Gi`) or
/// compose (`1g`, or a plain byte count after `docker-compose config`) write it.
fn bytes(size: &str) -> u64 {
    let digits = size.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let n: u64 = digits
        .parse()
        .unwrap_or_else(|_| panic!("not a memory size: {size}"));
    let unit = match size[digits.len()..].to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "ki" => 1 << 10,
        "m" | "mb" | "mi" => 1 << 20,
        "g" | "gb" | "gi" => 1 << 30,
        other => panic!("unknown unit {other} in {size}"),
    };
    n * unit
}

/// Redis' command line (a YAML/JSON list) keeps every acknowledged job and evicts
/// none: AOF with `appendfsync always`, `noeviction`, and a `maxmemory` (without which
/// `noeviction` never acts) at most 80 % of the container's memory limit `limit`, so
/// that an AOF rewrite's fork has room.
fn assert_durable_redis(args: &Value, limit: &str, whose: &str) {
    let args: Vec<&str> = args
        .as_array()
        .unwrap_or_else(|| panic!("{whose}: redis arguments are a list"))
        .iter()
        .map(|a| a.as_str().expect("string argument"))
        .collect();
    for pair in [
        ["--appendonly", "yes"],
        ["--appendfsync", "always"],
        ["--maxmemory-policy", "noeviction"],
    ] {
        assert!(
            args.windows(2).any(|w| w == pair),
            "{whose}: redis {args:?} lacks {pair:?}"
        );
    }
    let maxmemory = args
        .windows(2)
        .find(|w| w[0] == "--maxmemory")
        .map(|w| bytes(w[1]))
        .unwrap_or_else(|| panic!("{whose}: redis {args:?} has no --maxmemory"));
    assert!(
        maxmemory > 0 && maxmemory * 5 <= bytes(limit) * 4,
        "{whose}: maxmemory {maxmemory} is not below 80 % of the memory limit {limit}"
    );
}

/// The pod templates of every workload: (kind/name, pod spec).
fn pod_specs(docs: &[Doc]) -> Vec<(String, Value)> {
    docs.iter()
        .filter(|d| matches!(d.kind(), "Deployment" | "StatefulSet" | "Job"))
        .map(|d| {
            (
                format!("{}/{}", d.kind(), d.name()),
                d.doc["spec"]["template"]["spec"].clone(),
            )
        })
        .collect()
}

fn config_map(docs: &[Doc]) -> BTreeMap<String, String> {
    find(docs, "ConfigMap", "inferq-config")["data"]
        .as_object()
        .expect("data")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().expect("string value").to_owned()))
        .collect()
}

#[test]
fn pods_are_hardened_probed_and_drain_in_time() {
    let docs = k8s_docs();
    let cm = config_map(&docs);
    let specs = pod_specs(&docs);
    assert_eq!(
        specs.len(),
        4,
        "gateway, worker, redis, loader job: {specs:?}"
    );
    for (what, spec) in &specs {
        assert_eq!(spec["securityContext"]["runAsNonRoot"], true, "{what}");
        for c in spec["containers"].as_array().expect("containers") {
            let sc = &c["securityContext"];
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{what}");
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{what}");
            assert_eq!(sc["capabilities"]["drop"][0], "ALL", "{what}");
            for kind in ["requests", "limits"] {
                for r in ["cpu", "memory"] {
                    assert!(c["resources"][kind][r].is_string(), "{what}: {kind}.{r}");
                }
            }
        }
    }
    let metrics_port: u64 = cm["INFERQ_METRICS_LISTEN"]
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("INFERQ_METRICS_LISTEN port");
    for name in ["inferq-gateway", "inferq-worker"] {
        let d = find(&docs, "Deployment", name);
        let spec = &d["spec"]["template"]["spec"];
        let c = &spec["containers"][0];
        let ports: BTreeMap<&str, u64> = c["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .map(|p| {
                (
                    p["name"].as_str().expect("name"),
                    p["containerPort"].as_u64().expect("port"),
                )
            })
            .collect();
        assert_eq!(ports["metrics"], metrics_port, "{name}");
        assert_eq!(
            c["readinessProbe"]["httpGet"]["path"], "/v2/health/ready",
            "{name}"
        );
        assert_eq!(
            c["livenessProbe"]["httpGet"]["path"], "/v2/health/live",
            "{name}"
        );
        for probe in ["readinessProbe", "livenessProbe"] {
            assert_eq!(c[probe]["httpGet"]["port"], "metrics", "{name} {probe}");
        }
        // The registry: a PVC mounted read-only, both in the volume and the mount.
        let vol = spec["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .find(|v| v["name"] == "models")
            .expect("models volume");
        assert_eq!(
            vol["persistentVolumeClaim"]["claimName"], "inferq-models",
            "{name}"
        );
        assert_eq!(vol["persistentVolumeClaim"]["readOnly"], true, "{name}");
        let mount = c["volumeMounts"]
            .as_array()
            .expect("mounts")
            .iter()
            .find(|m| m["name"] == "models")
            .expect("models mount");
        assert_eq!(mount["readOnly"], true, "{name}");
        assert_eq!(
            mount["mountPath"].as_str(),
            Some(cm["INFERQ_MODELS"].as_str()),
            "{name}"
        );
        // Drain: the kubelet waits longer than the worker's drain deadline.
        let grace = spec["terminationGracePeriodSeconds"]
            .as_u64()
            .expect("grace period");
        let drain_ms: u64 = cm["INFERQ_DRAIN_TIMEOUT_MS"].parse().expect("drain ms");
        assert!(
            grace * 1000 > drain_ms,
            "{name}: {grace} s vs {drain_ms} ms"
        );
    }
    // A Deployment an HPA or KEDA owns has no `replicas` (apply would reset the count).
    let scaled: Vec<&str> = docs
        .iter()
        .filter(|d| matches!(d.kind(), "HorizontalPodAutoscaler" | "ScaledObject"))
        .map(|d| {
            d.doc["spec"]["scaleTargetRef"]["name"]
                .as_str()
                .expect("target")
        })
        .collect();
    assert_eq!(scaled, ["inferq-gateway", "inferq-worker"]);
    for name in &scaled {
        let d = find(&docs, "Deployment", name);
        assert!(d["spec"].get("replicas").is_none(), "{name} sets replicas");
    }
    // The gateway keeps accepting while endpoints drain, then drains within the grace.
    let gateway = &find(&docs, "Deployment", "inferq-gateway")["spec"]["template"]["spec"];
    let delay: u64 = gateway["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
        .as_array()
        .filter(|c| c.len() == 2 && c[0] == "sleep")
        .and_then(|c| c[1].as_str()?.parse().ok())
        .expect("gateway preStop: [sleep, N]");
    let drain_s = cm["INFERQ_DRAIN_TIMEOUT_MS"].parse::<u64>().expect("ms") / 1000;
    let grace = gateway["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("grace");
    assert!(
        (5..=30).contains(&delay) && delay + drain_s < grace,
        "preStop {delay} s + drain {drain_s} s vs grace {grace} s"
    );
    // Workers spread over nodes and zones, selecting their own pods.
    let worker = &find(&docs, "Deployment", "inferq-worker")["spec"]["template"];
    let spread = worker["spec"]["topologySpreadConstraints"]
        .as_array()
        .expect("worker topologySpreadConstraints");
    let keys: BTreeSet<&str> = spread
        .iter()
        .map(|c| c["topologyKey"].as_str().expect("key"))
        .collect();
    assert_eq!(
        keys,
        BTreeSet::from(["kubernetes.io/hostname", "topology.kubernetes.io/zone"])
    );
    for c in spread {
        assert_eq!(
            c["labelSelector"]["matchLabels"], worker["metadata"]["labels"],
            "{c}"
        );
    }
    let hpa = find(&docs, "HorizontalPodAutoscaler", "inferq-gateway");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], "inferq-gateway");
    assert_eq!(hpa["spec"]["metrics"][0]["resource"]["name"], "cpu");
    for component in ["gateway", "worker"] {
        let pdb = find(&docs, "PodDisruptionBudget", &format!("inferq-{component}"));
        assert_eq!(
            pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"],
            component
        );
        // A NotReady pod (all of them, in a Redis outage) never blocks a drain.
        assert_eq!(
            pdb["spec"]["unhealthyPodEvictionPolicy"], "AlwaysAllow",
            "{component}"
        );
    }
    let svc = find(&docs, "Service", "inferq-gateway");
    let ingress = find(&docs, "Ingress", "inferq-gateway");
    assert_eq!(
        ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"],
        svc["metadata"]["name"]
    );
    // Redis: AOF always, noeviction, on a persistent volume.
    let redis = find(&docs, "StatefulSet", "redis");
    let container = &redis["spec"]["template"]["spec"]["containers"][0];
    assert_durable_redis(
        &container["args"],
        container["resources"]["limits"]["memory"]
            .as_str()
            .expect("a memory limit"),
        "the StatefulSet",
    );
    assert!(redis["spec"]["volumeClaimTemplates"].is_array());
}

#[test]
fn no_secret_value_is_in_the_files() {
    let docs = k8s_docs();
    assert!(
        docs.iter().all(|d| d.kind() != "Secret"),
        "a Secret object would carry values: create it with kubectl (deploy/k8s/README.md)"
    );
    for (what, spec) in pod_specs(&docs) {
        for c in spec["containers"].as_array().expect("containers") {
            for e in c["env"].as_array().into_iter().flatten() {
                let name = e["name"].as_str().expect("env name");
                if name.contains("PASSWORD") || name.contains("API_KEYS") {
                    assert!(
                        e.get("value").is_none(),
                        "{what}: {name} has a literal value"
                    );
                    assert_eq!(
                        e["valueFrom"]["secretKeyRef"]["name"], "inferq-secrets",
                        "{what}"
                    );
                }
                if let Some(v) = e["value"].as_str() {
                    assert!(
                        !v.contains('@') || v.contains("$(REDIS_PASSWORD)@"),
                        "{what}: {name} embeds a credential: {v}"
                    );
                }
            }
        }
    }
    let compose = read(&repo_root().join("docker-compose.yml"));
    assert!(compose.contains("GF_SECURITY_ADMIN_PASSWORD: ${GRAFANA_ADMIN_PASSWORD:?"));
}

#[test]
fn network_policies_confine_redis_and_workers() {
    let docs = k8s_docs();
    let deny = find(&docs, "NetworkPolicy", "default-deny");
    assert_eq!(deny["spec"]["podSelector"], serde_json::json!({}));
    let redis = find(&docs, "NetworkPolicy", "redis");
    let from = &redis["spec"]["ingress"][0]["from"];
    let allowed = &from[0]["podSelector"]["matchExpressions"][0];
    assert_eq!(allowed["key"], "app.kubernetes.io/component");
    assert_eq!(allowed["values"], serde_json::json!(["gateway", "worker"]));
    assert_eq!(redis["spec"]["ingress"][0]["ports"][0]["port"], 6379);
    // Nothing else: KEDA reads the lag from Prometheus, not from Redis.
    assert_eq!(from.as_array().map(Vec::len), Some(1), "{from}");
    let worker = find(&docs, "NetworkPolicy", "worker");
    assert!(
        worker["spec"]["policyTypes"]
            .as_array()
            .expect("types")
            .contains(&"Egress".into())
    );
    let egress = worker["spec"]["egress"].as_array().expect("worker egress");
    assert_eq!(egress.len(), 2, "Redis and DNS only: {egress:?}");
    assert_eq!(
        egress[0]["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"],
        "redis"
    );
    assert_eq!(
        egress[0]["ports"],
        serde_json::json!([{"protocol": "TCP", "port": 6379}])
    );
    for p in egress[1]["ports"].as_array().expect("dns ports") {
        assert_eq!(p["port"], 53, "the second rule is DNS only");
    }
}

// ------------------------------------------------------------------ binary contract

/// `INFERQ_*` variables `inferq --help` documents.
fn known_variables() -> BTreeSet<String> {
    let help = run_ok(inferq_command().arg("--help"));
    let known: BTreeSet<String> = help
        .match_indices("[env: ")
        .filter_map(|(i, _)| {
            // `[env: NAME=value]`, or `[env: NAME]` for a secret whose value is hidden.
            let rest = &help[i + 6..];
            let end = rest.find(['=', ']'])?;
            Some(rest[..end].to_owned())
        })
        .filter(|v| v.starts_with("INFERQ_"))
        // A secret may come from the file its `_FILE` variable names.
        .flat_map(|v| {
            let file = inferq::config::is_secret_variable(&v).then(|| format!("{v}_FILE"));
            std::iter::once(v).chain(file)
        })
        .collect();
    assert!(
        known.len() >= 20,
        "could not read the variables from --help: {known:?}"
    );
    known
}

/// `INFERQ_[A-Z0-9_]+` words in `text`.
fn variables_in(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (i, _) in text.match_indices("INFERQ_") {
        let end = text[i..]
            .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
            .map_or(text.len(), |e| i + e);
        let var = text[i..end].trim_end_matches('_');
        // `INFERQ_*` in prose names no variable.
        if var.len() > "INFERQ_".len() {
            found.insert(var.to_owned());
        }
    }
    found
}

#[test]
fn every_inferq_variable_in_the_deployment_files_is_known_to_the_binary() {
    let known = known_variables();
    let mut files = vec![
        repo_root().join("docker-compose.yml"),
        repo_root().join("Dockerfile"),
        repo_root().join("scripts/stack.sh"),
        repo_root().join("deploy/docker/healthcheck.sh"),
        repo_root().join("deploy/docker/load-models.sh"),
    ];
    files.extend(k8s_files());
    let mut seen = 0;
    for f in &files {
        // INFERQ_BIN is load-models.sh's own knob (which binary to run), not a setting.
        for v in variables_in(&read(f))
            .into_iter()
            .filter(|v| v != "INFERQ_BIN")
        {
            seen += 1;
            assert!(
                known.contains(&v),
                "{}: {v} is not a variable `inferq --help` documents",
                f.display()
            );
        }
    }
    assert!(
        seen >= 20,
        "too few variables found ({seen}): is the scan broken?"
    );
    // The ConfigMap sets nothing the binary would not read.
    for k in config_map(&k8s_docs()).keys() {
        assert!(known.contains(k), "configmap key {k}");
    }
}

/// `docker-compose config` output for the repository's file, parsed.
fn compose_config(env: &[(&str, &str)]) -> (bool, String) {
    let mut cmd = Command::new("docker-compose");
    cmd.current_dir(repo_root())
        .args(["-f", "docker-compose.yml", "config"])
        .env_remove("GRAFANA_ADMIN_PASSWORD")
        .env_remove("INFERQ_API_KEYS")
        .env_remove("PUBLISH_ADDR")
        .env_remove("COMPOSE_FILE")
        .env_remove("COMPOSE_PROJECT_NAME");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run docker-compose (run scripts/setup.sh, which installs it): {e}")
    });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn compose_services() -> serde_json::Map<String, Value> {
    let (ok, text) = compose_config(&[("GRAFANA_ADMIN_PASSWORD", "x")]);
    assert!(
        ok,
        "docker-compose config refused docker-compose.yml:\n{text}"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let p = dir.path().join("config.yml");
    std::fs::write(&p, &text).expect("write");
    yaml_docs(&[p])[0].doc["services"]
        .as_object()
        .expect("services")
        .clone()
}

#[test]
fn docker_compose_accepts_the_file_and_it_has_the_stack() {
    let version = run_ok(Command::new("docker-compose").arg("version"));
    assert!(
        version.contains("1.29"),
        "expected Debian's docker-compose 1.29: {version}"
    );
    let services = compose_services();
    let names: BTreeSet<&str> = services.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        BTreeSet::from([
            "redis",
            "models",
            "gateway",
            "worker",
            "prometheus",
            "alertmanager",
            "redis-exporter",
            "grafana"
        ])
    );
    // No password, no start.
    let (ok, text) = compose_config(&[]);
    assert!(!ok && text.contains("GRAFANA_ADMIN_PASSWORD"), "{text}");

    // Only the gateway and Grafana are published, on loopback.
    for (name, s) in &services {
        let ports = s["ports"].as_array().map(Vec::as_slice).unwrap_or_default();
        match name.as_str() {
            "gateway" | "grafana" => {
                assert_eq!(ports.len(), 1, "{name}: {ports:?}");
                let p = ports[0].as_str().expect("short port syntax");
                assert!(
                    p.starts_with("127.0.0.1:"),
                    "{name} published beyond loopback: {p}"
                );
            }
            _ => assert!(ports.is_empty(), "{name} must not be published: {ports:?}"),
        }
    }
    for (name, s) in &services {
        // Every long-running service has a memory limit and rotated logs.
        if name != "models" {
            assert!(s["mem_limit"].is_string(), "{name}: no mem_limit");
            assert_eq!(s["logging"]["driver"], "json-file", "{name}");
            assert!(s["logging"]["options"]["max-size"].is_string(), "{name}");
        }
    }
    let redis_limit = services["redis"]["mem_limit"].as_str().expect("mem_limit");
    assert_durable_redis(&services["redis"]["command"], redis_limit, "compose");
    // A broken copy fails the check: a limit below maxmemory.
    let low = std::panic::catch_unwind(|| {
        assert_durable_redis(&services["redis"]["command"], "800m", "compose")
    });
    assert!(low.is_err(), "maxmemory 768mb under an 800m limit passed");
    assert!(
        services["redis"]["healthcheck"]["test"]
            .to_string()
            .contains("ping")
    );
    assert!(
        services["redis"]["volumes"][0]
            .as_str()
            .is_some_and(|v| v.starts_with("redis-data:/data"))
    );
    assert_eq!(services["worker"]["deploy"]["replicas"], 2);
    for name in ["gateway", "worker"] {
        let s = &services[name];
        // Docker's SIGKILL comes after the drain deadline, not in the middle of it.
        let grace = s["stop_grace_period"]
            .as_str()
            .and_then(|g| g.strip_suffix('s')?.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{name}: stop_grace_period in seconds"));
        let drain_ms: u64 = s["environment"]["INFERQ_DRAIN_TIMEOUT_MS"]
            .as_str()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name}: INFERQ_DRAIN_TIMEOUT_MS"));
        assert!(
            grace * 1000 >= drain_ms + 5000,
            "{name}: stop_grace_period {grace} s vs drain {drain_ms} ms"
        );
        assert_eq!(
            s["depends_on"]["redis"]["condition"], "service_healthy",
            "{name}"
        );
        assert_eq!(
            s["depends_on"]["models"]["condition"], "service_completed_successfully",
            "{name}"
        );
        assert_eq!(
            s["volumes"][0], "models:/models:ro",
            "{name}: registry read-only"
        );
        assert_eq!(
            s["environment"]["INFERQ_REDIS_URL"], "redis://redis:6379",
            "{name}"
        );
    }
    assert_eq!(services["models"]["volumes"][0], "models:/models:rw");
    let grafana = &services["grafana"];
    assert_eq!(
        grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"],
        "/var/lib/grafana/dashboards/inferq.json"
    );
    let targets: Vec<String> = grafana["volumes"]
        .as_array()
        .expect("grafana volumes")
        .iter()
        .map(|v| v.as_str().expect("short syntax").to_owned())
        .collect();
    let root = repo_root();
    for (src, dst) in [
        (
            root.join("grafana/provisioning"),
            "/etc/grafana/provisioning:ro",
        ),
        (
            root.join("grafana/dashboards"),
            "/var/lib/grafana/dashboards:ro",
        ),
    ] {
        let want = format!("{}:{dst}", src.display());
        assert!(
            targets.contains(&want),
            "grafana volumes {targets:?} lack {want}"
        );
    }
    let prom: Vec<String> = services["prometheus"]["volumes"]
        .as_array()
        .expect("prometheus volumes")
        .iter()
        .map(|v| v.as_str().expect("short syntax").to_owned())
        .collect();
    for (src, dst) in [
        ("prometheus.yml", "/etc/prometheus/prometheus.yml:ro"),
        ("prometheus/alerts.yml", "/etc/prometheus/alerts.yml:ro"),
    ] {
        let want = format!("{}:{dst}", root.join(src).display());
        assert!(
            prom.contains(&want),
            "prometheus volumes {prom:?} lack {want}"
        );
    }
}

#[test]
fn compose_bind_mounts_exist() {
    // The files the compose stack mounts from the repository (Prometheus configuration and
    // alert rules, Grafana provisioning and the inferq dashboard).
    for p in [
        "prometheus.yml",
        "prometheus/alerts.yml",
        "alertmanager/alertmanager.yml",
        "grafana/provisioning",
        "grafana/dashboards/inferq.json",
    ] {
        assert!(
            repo_root().join(p).exists(),
            "{p} is missing (docker-compose.yml mounts it)"
        );
    }
}

#[test]
fn every_command_the_deployment_runs_exists() {
    let services = compose_services();
    let dockerfile = read(&repo_root().join("Dockerfile"));
    let docs = k8s_docs();

    let mut subcommands: Vec<(String, String)> = Vec::new();
    for name in ["gateway", "worker"] {
        let cmd = services[name]["command"][0]
            .as_str()
            .expect("command")
            .to_owned();
        assert!(
            services[name].get("entrypoint").is_none(),
            "{name} runs the image's inferq"
        );
        subcommands.push((format!("compose {name}"), cmd));
    }
    for d in docs.iter().filter(|d| d.kind() == "Deployment") {
        let c = &d.doc["spec"]["template"]["spec"]["containers"][0];
        assert!(
            c.get("command").is_none(),
            "{}: runs the image's ENTRYPOINT",
            d.name()
        );
        let arg = c["args"][0].as_str().expect("args").to_owned();
        subcommands.push((format!("k8s {}", d.name()), arg));
    }
    // (The Dockerfile's CMD is `--help`: the_default_command_works_in_the_image.)
    for (what, sub) in &subcommands {
        run_ok(inferq_command().args([sub.as_str(), "--help"]));
        assert!(
            ["serve", "gateway", "worker"].contains(&sub.as_str()),
            "{what}: {sub}"
        );
    }

    // The loader: compose's `models` service and the k8s Job run the script the
    // Dockerfile installs, on the directory it copies the demo models to.
    assert!(
        dockerfile.contains("COPY deploy/docker/load-models.sh /usr/local/bin/inferq-load-models")
    );
    assert!(dockerfile.contains("COPY testdata/models/*.onnx /usr/share/inferq/demo-models/"));
    assert_eq!(
        services["models"]["entrypoint"],
        serde_json::json!(["inferq-load-models"])
    );
    assert_eq!(
        services["models"]["command"],
        serde_json::json!(["/usr/share/inferq/demo-models"])
    );
    let job = find(&docs, "Job", "inferq-load-models");
    assert_eq!(
        job["spec"]["template"]["spec"]["containers"][0]["command"],
        serde_json::json!(["inferq-load-models", "/usr/share/inferq/demo-models"])
    );
    for sub in [["models", "add"], ["models", "show"]] {
        run_ok(inferq_command().args(sub).arg("--help"));
    }

    // The script itself, natively: registers every demo model, then (run again) none.
    let registry = tempfile::tempdir().expect("temp dir");
    let load = || {
        run_ok(
            Command::new("bash")
                .arg(repo_root().join("deploy/docker/load-models.sh"))
                .arg(repo_root().join("testdata/models"))
                .env("INFERQ_BIN", env!("CARGO_BIN_EXE_inferq"))
                .env("INFERQ_MODELS", registry.path())
                .env("ORT_DYLIB_PATH", common::ort_lib()),
        )
    };
    let first = load();
    assert_eq!(
        first.matches("added ").count(),
        demo_models().len(),
        "{first}"
    );
    let second = load();
    assert_eq!(
        second.matches("added ").count(),
        0,
        "not idempotent:\n{second}"
    );
    assert_eq!(
        second.matches(" skipped").count(),
        demo_models().len(),
        "{second}"
    );
}

// ------------------------------------------------------------------ Dockerfile

#[test]
fn dockerfile_lints_clean_and_matches_the_setup() {
    let t = tools();
    let lint = |p: &Path| {
        run(Command::new("node")
            .arg(validate_dir().join("dockerfile.cjs"))
            .arg(&t.node_modules)
            .arg(p))
    };
    let out = lint(&repo_root().join("Dockerfile"));
    assert!(
        out.status.success(),
        "Dockerfile lint:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let broken = dir.path().join("Dockerfile");
    std::fs::write(
        &broken,
        "FROM debian:bookworm-slim\nRUNN true\nHEALTHCHECK --intervall=1s CMD true\n",
    )
    .expect("write");
    assert!(
        !lint(&broken).status.success(),
        "the linter accepted a broken Dockerfile"
    );

    let dockerfile = read(&repo_root().join("Dockerfile"));
    // The ONNX Runtime version is the one scripts/setup.sh installs, and the wheel path
    // the Dockerfile extracts is where that wheel keeps the library.
    let pinned = read(&repo_root().join("scripts/requirements.txt"))
        .lines()
        .find_map(|l| {
            l.strip_prefix("onnxruntime==")
                .map(str::trim)
                .map(str::to_owned)
        })
        .expect("onnxruntime pin");
    assert!(
        dockerfile.contains(&format!("ARG ORT_VERSION={pinned}")),
        "ORT {pinned}"
    );
    assert!(dockerfile.contains("/unpacked/onnxruntime/capi/libonnxruntime.so.${ORT_VERSION}"));
    let wheel_lib = std::fs::read_dir(repo_root().join(".venv/lib"))
        .expect(".venv/lib (run scripts/setup.sh)")
        .filter_map(Result::ok)
        .map(|e| {
            e.path().join(format!(
                "site-packages/onnxruntime/capi/libonnxruntime.so.{pinned}"
            ))
        })
        .find(|p| p.is_file());
    assert!(
        wheel_lib.is_some(),
        "onnxruntime/capi/libonnxruntime.so.{pinned} not in the wheel"
    );

    for needle in [
        "FROM rust:${RUST_VERSION}-bookworm AS chef",
        "FROM chef AS builder",
        "cargo build --release --locked",
        "COPY --from=ort /out/libonnxruntime.so /usr/local/lib/inferq/libonnxruntime.so",
        "ORT_DYLIB_PATH=/usr/local/lib/inferq/libonnxruntime.so",
        "INFERQ_LISTEN=0.0.0.0:8080",
        "INFERQ_METRICS_LISTEN=0.0.0.0:9464",
        "INFERQ_MODELS=/models",
        "useradd --system --uid 10001",
        "USER 10001:10001",
        "COPY deploy/docker/healthcheck.sh /usr/local/bin/inferq-healthcheck",
        "CMD [\"/usr/local/bin/inferq-healthcheck\"]",
    ] {
        assert!(dockerfile.contains(needle), "Dockerfile lacks {needle:?}");
    }
    // Every target Cargo.toml declares is in the build context and copied (cargo refuses
    // a manifest whose declared target file is missing).
    let manifest = read(&repo_root().join("Cargo.toml"));
    let mut section = String::new();
    let mut declared = Vec::new();
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line.trim_matches(|c| c == '[' || c == ']').to_owned();
        } else if let Some(v) = line.strip_prefix("path = ") {
            declared.push(v.trim_matches('"').to_owned());
        } else if let Some(v) = line.strip_prefix("name = ") {
            let dir = match section.as_str() {
                "bench" => "benches",
                "example" => "examples",
                "test" => "tests",
                _ => continue,
            };
            declared.push(format!("{dir}/{}.rs", v.trim_matches('"')));
        }
    }
    for target in &declared {
        let top = target.split('/').next().expect("a path");
        assert!(
            dockerfile.contains(&format!("COPY {top} ./{top}")),
            "Cargo.toml declares {target}: the Dockerfile must COPY {top}"
        );
        assert!(
            read(&repo_root().join(".dockerignore")).contains(&format!("!{top}/")),
            "Cargo.toml declares {target}: .dockerignore must allow {top}/"
        );
    }
    // .dockerignore is an allow-list: everything the Dockerfile copies from the context
    // must be allowed.
    let ignore = read(&repo_root().join(".dockerignore"));
    let allowed: Vec<&str> = ignore.lines().filter_map(|l| l.strip_prefix('!')).collect();
    for line in dockerfile
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from="))
    {
        let words: Vec<&str> = line.split_whitespace().collect();
        for src in &words[1..words.len() - 1] {
            assert!(
                allowed.iter().any(|a| {
                    let a = a.trim_end_matches('/');
                    src == &a || src.starts_with(&format!("{a}/"))
                }),
                ".dockerignore does not let {src} into the build context"
            );
        }
    }
}

/// One `FROM` stage of the Dockerfile: its base, its name, its instructions (line
/// continuations joined).
#[derive(Debug)]
struct Stage {
    from: String,
    name: Option<String>,
    lines: Vec<String>,
}

/// The Dockerfile's global `ARG` defaults and its stages, `${ARG}`s in `FROM`
/// resolved from those defaults (as `docker build` does without `--build-arg`).
fn dockerfile_stages() -> (BTreeMap<String, String>, Vec<Stage>) {
    let text = read(&repo_root().join("Dockerfile")).replace("\\\n", " ");
    let mut args: BTreeMap<String, String> = BTreeMap::new();
    let mut stages: Vec<Stage> = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line.strip_prefix("FROM ") {
            let words: Vec<&str> = rest.split_whitespace().collect();
            let mut from = words[0].to_owned();
            for (k, v) in &args {
                from = from.replace(&format!("${{{k}}}"), v.as_str());
            }
            let name = (words.len() == 3 && words[1] == "AS").then(|| words[2].to_owned());
            stages.push(Stage {
                from,
                name,
                lines: Vec::new(),
            });
        } else if let Some(stage) = stages.last_mut() {
            stage.lines.push(line.to_owned());
        } else if let Some((k, v)) = line.strip_prefix("ARG ").and_then(|a| a.split_once('=')) {
            args.insert(k.to_owned(), v.to_owned());
        }
    }
    (args, stages)
}

/// True for an image reference pinned at least to a minor release (`redis:7.4.2`,
/// `prom/prometheus:v2.53.2`, `rust:1.95.0-bookworm`), false for a floating tag
/// (`redis:7`, `rust:1-bookworm`, `debian:bookworm-slim`, `latest`, none) or a digest-less
/// name. A digest (`@sha256:`) pins too.
fn pinned(image: &str) -> bool {
    if image.contains("@sha256:") {
        return true;
    }
    let Some((_, tag)) = image.rsplit_once(':').filter(|(name, _)| !name.is_empty()) else {
        return false;
    };
    let version = tag
        .trim_start_matches('v')
        .split('-')
        .next()
        .unwrap_or_default();
    let parts: Vec<&str> = version.split('.').collect();
    parts.len() >= 2
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

#[test]
fn images_are_pinned_to_a_release() {
    for floating in [
        "redis:7",
        "rust:1-bookworm",
        "debian:bookworm-slim",
        "grafana/grafana",
        "x:latest",
        "python:3-slim",
    ] {
        assert!(!pinned(floating), "{floating} is floating");
    }
    for fixed in [
        "redis:7.4.2",
        "prom/prometheus:v2.53.2",
        "rust:1.95.0-bookworm",
        "debian:12.11-slim",
        "r@sha256:ab",
    ] {
        assert!(pinned(fixed), "{fixed} is pinned");
    }
    let (_, stages) = dockerfile_stages();
    let names: Vec<&str> = stages.iter().filter_map(|s| s.name.as_deref()).collect();
    let mut images: Vec<(String, String)> = stages
        .iter()
        .filter(|s| !names.contains(&s.from.as_str()))
        .map(|s| ("Dockerfile".to_owned(), s.from.clone()))
        .collect();
    assert!(
        images.len() >= 3,
        "rust, python and debian bases: {images:?}"
    );
    for (name, service) in compose_services() {
        if let Some(image) = service["image"].as_str() {
            images.push((format!("compose {name}"), image.to_owned()));
        }
    }
    for (what, spec) in pod_specs(&k8s_docs()) {
        for c in spec["containers"].as_array().into_iter().flatten() {
            images.push((what.clone(), c["image"].as_str().expect("image").to_owned()));
        }
    }
    for (what, image) in &images {
        // inferq's own image is built from this tree, tagged by whoever builds it.
        if image.starts_with("inferq:") {
            continue;
        }
        assert!(
            pinned(image),
            "{what}: `{image}` is a floating tag; pin a release"
        );
    }
    // The Dockerfile header names the versions it pins.
    let dockerfile = read(&repo_root().join("Dockerfile"));
    for (_, image) in images.iter().filter(|(w, _)| w == "Dockerfile") {
        let version = image
            .split(':')
            .nth(1)
            .and_then(|t| t.split('-').next())
            .unwrap_or_default();
        assert!(
            dockerfile.contains(version),
            "the header should name {image}"
        );
    }
}

#[test]
fn the_image_has_oci_labels_and_caches_dependencies_in_their_own_layer() {
    let (args, stages) = dockerfile_stages();
    let runtime = stages.last().expect("a runtime stage");
    let labels = runtime
        .lines
        .iter()
        .find(|l| l.starts_with("LABEL "))
        .expect("LABEL in the runtime stage");
    let runtime_args: BTreeMap<&str, &str> = runtime
        .lines
        .iter()
        .filter_map(|l| l.strip_prefix("ARG "))
        .map(|a| a.split_once('=').unwrap_or((a, "")))
        .collect();
    for (key, value) in [
        ("title", "\"inferq\""),
        ("licenses", "\"Apache-2.0\""),
        ("version", "\"${VERSION}\""),
        ("revision", "\"${REVISION}\""),
        ("created", "\"${CREATED}\""),
        ("source", "\"${SOURCE}\""),
    ] {
        let label = format!("org.opencontainers.image.{key}={value}");
        assert!(labels.contains(&label), "no {label} in {labels}");
    }
    assert!(
        labels.contains("org.opencontainers.image.description="),
        "{labels}"
    );
    for arg in ["REVISION", "CREATED", "SOURCE"] {
        assert!(
            runtime_args.contains_key(arg),
            "the runtime stage declares ARG {arg}"
        );
    }
    let crate_version = read(&repo_root().join("Cargo.toml"))
        .lines()
        .find_map(|l| l.strip_prefix("version = "))
        .map(|v| v.trim_matches('"').to_owned())
        .expect("Cargo.toml version");
    assert_eq!(
        runtime_args.get("VERSION"),
        Some(&crate_version.as_str()),
        "VERSION is Cargo.toml's"
    );
    let base = format!(
        "org.opencontainers.image.base.name=\"docker.io/library/{}\"",
        runtime.from
    );
    assert!(
        labels.contains(&base),
        "{labels} should name {}",
        runtime.from
    );

    // cargo-chef: the planner reduces the sources to a recipe; the builder cooks the
    // dependencies from the recipe alone, then copies the sources and builds.
    let stage = |name: &str| {
        stages
            .iter()
            .find(|s| s.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no stage {name}"))
    };
    let chef = stage("chef");
    assert!(
        chef.lines
            .iter()
            .any(|l| l
                == "RUN cargo install --locked cargo-chef --version \"${CARGO_CHEF_VERSION}\""),
        "{chef:?}"
    );
    assert!(
        pinned(&format!("cargo-chef:{}", args["CARGO_CHEF_VERSION"])),
        "cargo-chef is pinned"
    );
    let planner = stage("planner");
    assert_eq!(planner.from, "chef");
    assert_eq!(
        planner.lines.last().map(String::as_str),
        Some("RUN cargo chef prepare --recipe-path recipe.json")
    );
    let builder = stage("builder");
    assert_eq!(builder.from, "chef");
    let at = |needle: &str| {
        builder
            .lines
            .iter()
            .position(|l| l.starts_with(needle))
            .unwrap_or_else(|| panic!("builder lacks {needle}: {builder:?}"))
    };
    let recipe = at("COPY --from=planner /src/recipe.json recipe.json");
    let cook = at("RUN cargo chef cook --release --locked --bin inferq --recipe-path recipe.json");
    let sources = at("COPY src ./src");
    let build = at("RUN cargo build --release --locked --bin inferq");
    assert!(
        recipe < cook && cook < sources && sources < build,
        "{builder:?}"
    );
    assert_eq!(
        builder
            .lines
            .iter()
            .filter(|l| l.starts_with("COPY"))
            .count(),
        4,
        "{builder:?}"
    );
    // Plain syntax for the classic builder: no BuildKit-only features.
    let text = read(&repo_root().join("Dockerfile"));
    for buildkit in ["--mount=", "--chmod=", "--link", "# syntax=", "<<"] {
        assert!(!text.contains(buildkit), "BuildKit-only `{buildkit}`");
    }
}

#[test]
fn the_default_command_works_in_the_image() {
    let (_, stages) = dockerfile_stages();
    let runtime = stages.last().expect("a runtime stage");
    let instruction = |name: &str| -> Vec<String> {
        let line = runtime
            .lines
            .iter()
            .rfind(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name}"));
        serde_json::from_str(&line[name.len() + 1..]).unwrap_or_else(|e| panic!("{line}: {e}"))
    };
    assert_eq!(instruction("ENTRYPOINT"), ["inferq"]);
    let cmd = instruction("CMD");
    // The image's environment and nothing else of ours: no INFERQ_REDIS_URL, no
    // redis-server on PATH, as in a bare `docker run IMAGE`.
    let env: Vec<(String, String)> = runtime
        .lines
        .iter()
        .filter_map(|l| l.strip_prefix("ENV "))
        .flat_map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .map(|kv| {
            let (k, v) = kv.split_once('=').expect("ENV KEY=VALUE");
            (k.to_owned(), v.to_owned())
        })
        .collect();
    assert!(env.iter().any(|(k, _)| k == "INFERQ_MODELS"), "{env:?}");
    let empty_path = tempfile::tempdir().expect("temp dir");
    let out = run(inferq_command()
        .args(&cmd)
        .envs(env)
        .env("PATH", empty_path.path())
        .current_dir(empty_path.path()));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "`docker run IMAGE` (inferq {cmd:?}) fails: {}{}",
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("Usage: inferq"), "{text}");
    // What it prints points at the roles to pick.
    for role in ["serve", "gateway", "worker"] {
        assert!(text.contains(role), "{text}");
    }
}

#[test]
fn the_container_health_check_reports_live_and_dead() {
    let redis = common::RedisServer::start();
    let registry = common::TempRegistry::empty();
    let port = common::http::free_port();
    let mut gateway = inferq_command()
        .args(["--models"])
        .arg(registry.path())
        .args(["--redis-url", &redis.url()])
        .args([
            "--listen",
            &format!("127.0.0.1:{}", common::http::free_port()),
        ])
        .args(["--metrics-listen", &format!("127.0.0.1:{port}")])
        .arg("gateway")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start a gateway");
    let check = |listen: &str, args: &[&str]| {
        Command::new("bash")
            .arg(repo_root().join("deploy/docker/healthcheck.sh"))
            .args(args)
            .env("INFERQ_METRICS_LISTEN", listen)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run the health check")
            .success()
    };
    // As in the image: the listener on every interface, the check on loopback.
    let listen = format!("0.0.0.0:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check(&listen, &[]) {
        assert!(Instant::now() < deadline, "the gateway never became live");
        assert!(
            gateway.try_wait().expect("wait").is_none(),
            "the gateway exited"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(check(&listen, &[&port.to_string(), "/v2/health/ready"]));
    assert!(
        !check(&listen, &[&port.to_string(), "/no/such/route"]),
        "404 is not healthy"
    );
    let _ = gateway.kill();
    let _ = gateway.wait();
    assert!(!check(&listen, &[]), "a dead process must fail the check");
}

// ------------------------------------------------------------------ monitoring

fn monitoring_docs() -> Vec<Doc> {
    let dir = k8s_dir().join("monitoring");
    let kust = yaml_docs(&[dir.join("kustomization.yaml")]);
    assert_eq!(kust[0].doc["namespace"], "inferq");
    let files: Vec<PathBuf> = kust[0].doc["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| dir.join(r.as_str().expect("a path")))
        .collect();
    yaml_docs(&files)
}

/// The `job="…"` values the alerts select.
fn alert_jobs() -> BTreeSet<String> {
    let alerts = read(&repo_root().join("prometheus/alerts.yml"));
    alerts
        .match_indices("job=\"")
        .map(|(i, _)| {
            let rest = &alerts[i + 5..];
            rest[..rest.find('"').expect("closing quote")].to_owned()
        })
        .collect()
}

#[test]
fn kube_prometheus_objects_scrape_with_the_jobs_the_rules_expect() {
    let docs = monitoring_docs();
    let k8s = k8s_docs();
    let mut jobs = BTreeSet::new();
    for component in ["worker", "gateway"] {
        let name = format!("inferq-{component}");
        let pm = find(&docs, "PodMonitor", &name);
        assert_eq!(pm["apiVersion"], "monitoring.coreos.com/v1");
        // It selects the Deployment's pods, on a port the container names.
        let pod = &find(&k8s, "Deployment", &name)["spec"]["template"];
        assert_eq!(
            pm["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"],
            "{name}"
        );
        let endpoint = &pm["spec"]["podMetricsEndpoints"][0];
        let port = endpoint["port"].as_str().expect("a named port");
        assert!(
            pod["spec"]["containers"][0]["ports"]
                .as_array()
                .expect("ports")
                .iter()
                .any(|p| p["name"] == port),
            "{name}: no container port {port}"
        );
        assert_eq!(endpoint["path"], "/metrics");
        // `job` is set to the compose job name; nothing drops `namespace`.
        let relabel = endpoint["relabelings"].as_array().expect("relabelings");
        let job = relabel
            .iter()
            .find(|r| r["targetLabel"] == "job")
            .and_then(|r| r["replacement"].as_str())
            .unwrap_or_else(|| panic!("{name}: no relabeling sets job"));
        assert_eq!(job, name);
        assert!(
            relabel
                .iter()
                .all(|r| r["targetLabel"] != "namespace" && r["action"] != "labeldrop"),
            "{name}: {relabel:?}"
        );
        jobs.insert(job.to_owned());
    }
    // The alerts select exactly these jobs, which compose's scrape jobs are also named.
    assert_eq!(alert_jobs(), jobs);
    let prom = yaml_docs(&[repo_root().join("prometheus.yml")]);
    let compose_jobs: BTreeSet<String> = prom[0].doc["scrape_configs"]
        .as_array()
        .expect("scrape_configs")
        .iter()
        .filter_map(|c| c["job_name"].as_str().map(str::to_owned))
        .collect();
    assert!(compose_jobs.is_superset(&jobs), "{compose_jobs:?}");

    // The PrometheusRule holds prometheus/alerts.yml's groups, exactly.
    let rule = find(&docs, "PrometheusRule", "inferq");
    let alerts = yaml_docs(&[repo_root().join("prometheus/alerts.yml")]);
    assert!(
        rule["spec"]["groups"] == alerts[0].doc["groups"],
        "deploy/k8s/monitoring/prometheusrule.yaml differs from prometheus/alerts.yml: \
         run scripts/gen-prometheusrule.sh"
    );
    // The generator makes what is committed.
    let committed = read(&k8s_dir().join("monitoring/prometheusrule.yaml"));
    run_ok(Command::new("bash").arg(repo_root().join("scripts/gen-prometheusrule.sh")));
    assert_eq!(
        read(&k8s_dir().join("monitoring/prometheusrule.yaml")),
        committed,
        "scripts/gen-prometheusrule.sh changed the committed file"
    );
}

#[test]
fn kubernetes_runs_the_redis_exporter_beside_redis_and_scrapes_it_as_job_redis() {
    let k8s = k8s_docs();
    let pod = &find(&k8s, "StatefulSet", "redis")["spec"]["template"];
    let exporter = pod["spec"]["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .find(|c| c["name"] == "redis-exporter")
        .expect("a redis-exporter sidecar");
    // The same pinned image and flags as compose's, but for the address.
    let services = compose_services();
    assert_eq!(exporter["image"], services["redis-exporter"]["image"]);
    let flags = |v: &Value| -> Vec<String> {
        v.as_array()
            .expect("a list")
            .iter()
            .filter_map(|f| f.as_str())
            .filter(|f| !f.starts_with("--redis.addr="))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(
        flags(&exporter["args"]),
        flags(&services["redis-exporter"]["command"])
    );
    assert!(
        exporter["args"][0]
            .as_str()
            .is_some_and(|a| a == "--redis.addr=redis://localhost:6379"),
        "{exporter}"
    );
    assert_eq!(exporter["env"][0]["name"], "REDIS_PASSWORD", "it logs in");
    let monitoring = monitoring_docs();
    let pm = find(&monitoring, "PodMonitor", "inferq-redis");
    assert_eq!(
        pm["spec"]["selector"]["matchLabels"],
        pod["metadata"]["labels"]
    );
    let endpoint = &pm["spec"]["podMetricsEndpoints"][0];
    assert_eq!(endpoint["port"], exporter["ports"][0]["name"]);
    assert_eq!(endpoint["relabelings"][0]["replacement"], "redis");
    // Prometheus may reach it, and nothing else new may.
    let policy = find(&k8s, "NetworkPolicy", "redis");
    let scrape = &policy["spec"]["ingress"][1];
    assert_eq!(
        scrape["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        "monitoring"
    );
    assert_eq!(
        scrape["ports"],
        serde_json::json!([{"protocol": "TCP", "port": 9121}])
    );
    assert_eq!(policy["spec"]["ingress"].as_array().map(Vec::len), Some(2));
}

#[test]
fn alertmanager_and_redis_exporter_are_wired_and_pinned() {
    let services = compose_services();
    for name in ["alertmanager", "redis-exporter", "prometheus", "grafana"] {
        let image = services[name]["image"].as_str().expect("image");
        let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or("");
        assert!(
            tag.starts_with('v') || tag.chars().next().is_some_and(|c| c.is_ascii_digit()),
            "{name}: {image} is not pinned to a version"
        );
        assert!(tag.contains('.'), "{name}: {image}: pin a minor version");
    }
    // Prometheus sends alerts to the compose Alertmanager, and scrapes the exporter.
    let prom = yaml_docs(&[repo_root().join("prometheus.yml")]);
    let am = &prom[0].doc["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"][0];
    assert_eq!(am, "alertmanager:9093");
    let scrapes = prom[0].doc["scrape_configs"].as_array().expect("scrapes");
    let redis_job = scrapes
        .iter()
        .find(|c| c["job_name"] == "redis")
        .expect("a redis scrape job");
    assert_eq!(
        redis_job["static_configs"][0]["targets"][0],
        "redis-exporter:9121"
    );
    // Alertmanager's configuration is valid to Alertmanager's own checker.
    let config = repo_root().join("alertmanager/alertmanager.yml");
    let out = run_ok(Command::new("amtool").arg("check-config").arg(&config));
    assert!(out.contains("SUCCESS"), "{out}");
    let dir = tempfile::tempdir().expect("temp dir");
    let broken = dir.path().join("alertmanager.yml");
    std::fs::write(
        &broken,
        read(&config).replace(
            "receiver: default\n  group_by",
            "receiver: nobody\n  group_by",
        ),
    )
    .expect("write");
    assert!(
        !run(Command::new("amtool").arg("check-config").arg(&broken))
            .status
            .success(),
        "amtool accepted a route to an unknown receiver"
    );
    let mounted = services["alertmanager"]["volumes"][0]
        .as_str()
        .expect("volume");
    assert!(
        mounted.starts_with(&format!("{}:", config.display())),
        "{mounted}"
    );

    // The exporter's flags, run natively (Debian's prometheus-redis-exporter) against
    // a real Redis: it reads the memory limit and the models' streams.
    let redis = common::RedisServer::with(common::RedisOptions {
        tcp: true,
        args: ["--maxmemory", "64mb"].map(String::from).to_vec(),
        ..common::RedisOptions::default()
    });
    let mut conn = redis.connection();
    let stream = inferq::queue::Keys::new("tutorial-rf").jobs().to_owned();
    redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("v")
        .arg("1")
        .query::<String>(&mut conn)
        .expect("XADD");
    let port = common::http::free_port();
    let args: Vec<String> = services["redis-exporter"]["command"]
        .as_array()
        .expect("exporter command")
        .iter()
        .map(|a| {
            let a = a.as_str().expect("string");
            if a.starts_with("--redis.addr=") {
                format!("--redis.addr={}", redis.tcp_url().expect("tcp"))
            } else if a.starts_with("--web.listen-address=") {
                format!("--web.listen-address=127.0.0.1:{port}")
            } else {
                a.to_owned()
            }
        })
        .collect();
    assert!(
        args.iter().any(|a| a.starts_with("--check-streams=")),
        "{args:?}"
    );
    let mut exporter = Command::new("prometheus-redis-exporter")
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run prometheus-redis-exporter (scripts/setup.sh installs it)");
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        let got = std::net::TcpStream::connect(("127.0.0.1", port))
            .ok()
            .and_then(|mut s| {
                use std::io::{Read, Write};
                s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
                s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
                    .ok()?;
                let mut body = String::new();
                s.read_to_string(&mut body).ok()?;
                Some(body)
            });
        match got {
            Some(t) if t.contains("\nredis_up 1") => break t,
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "redis_exporter never reported redis_up 1"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = exporter.kill();
    let _ = exporter.wait();
    let max = text
        .lines()
        .find_map(|l| l.strip_prefix("redis_memory_max_bytes "))
        .and_then(|v| v.trim().parse::<f64>().ok());
    assert_eq!(
        max,
        Some(f64::from(64 << 20)),
        "the memory limit, as exported"
    );
    assert!(
        text.lines().any(|l| l.starts_with("redis_stream_length{")
            && l.contains(&format!("stream=\"{stream}\""))
            && l.ends_with(" 1")),
        "the models' streams are not exported:\n{}",
        text.lines()
            .filter(|l| l.contains("stream"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
