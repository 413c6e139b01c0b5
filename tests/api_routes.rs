//! The read-only routes of the front door over real sockets, with a real
//! redis-server: health, server and model metadata (OIP v2), the registry listing,
//! stats consistent with what was sent, 404 for unknown routes and 405 for wrong
//! methods, and CORS headers only when configured.

mod common;

use std::time::Duration;

use common::http::{Gateway, Resp, infer_body, start_worker, xlen};
use common::{RedisServer, Reference, TempRegistry, unique_name};
use hyper::Method;
use serde_json::{Value, json};

const RF: &str = "tutorial-rf";

/// A valid one-row body for tutorial-rf.
fn rf_row(r: &Reference, i: usize) -> String {
    infer_body(&r.input_rows(i..i + 1), json!({}))
}

fn tensor(name: &str, datatype: &str, shape: Value) -> Value {
    json!({ "name": name, "datatype": datatype, "shape": shape })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metadata_routes() {
    let redis = RedisServer::start();
    let reg = TempRegistry::with_models(&[RF, "iris-f64"]);
    reg.add(RF);
    let gw = Gateway::start(&redis, &reg, &[]).await;
    let c = gw.client();

    let live = c.get("/v2/health/live").await;
    assert_eq!(live.expect(200).json(), json!({ "live": true }));
    let ready = c.get("/v2/health/ready").await;
    assert_eq!(
        ready.expect(200).json(),
        json!({ "ready": true, "redis": true, "registry": true, "models_down": {} })
    );

    let v = c.get("/v2").await.expect(200).json();
    assert_eq!(v["name"], "inferq");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert!(
        v["extensions"].as_array().is_some_and(|e| !e.is_empty()),
        "{v}"
    );

    // OIP model metadata: the default (latest) version, every version, the signature.
    let v = c.get("/v2/models/tutorial-rf").await.expect(200).json();
    assert_eq!(v["name"], RF);
    assert_eq!(v["versions"], json!(["1", "2"]));
    assert_eq!(v["version"], "2");
    assert_eq!(v["platform"], "onnxruntime");
    assert_eq!(
        v["inputs"],
        json!([tensor("input", "FP32", json!([-1, 20]))])
    );
    assert_eq!(
        v["outputs"],
        json!([
            tensor("label", "INT64", json!([-1])),
            tensor("probabilities", "FP32", json!([-1, 2]))
        ])
    );
    assert_eq!(
        v["metadata"]["dataset"],
        Reference::load(RF).dataset.as_str()
    );
    let v1 = c
        .get("/v2/models/tutorial-rf/versions/1")
        .await
        .expect(200)
        .json();
    assert_eq!(
        (v1["version"].as_str(), v1["inputs"].clone()),
        (Some("1"), v["inputs"].clone())
    );
    let iris = c.get("/v2/models/iris-f64").await.expect(200).json();
    assert_eq!(iris["inputs"][0]["datatype"], "FP64", "{iris}");

    let ready = c
        .get("/v2/models/tutorial-rf/ready")
        .await
        .expect(200)
        .json();
    assert_eq!(ready, json!({ "name": RF, "version": "2", "ready": true }));
    let ready = c
        .get("/v2/models/tutorial-rf/versions/1/ready")
        .await
        .expect(200)
        .json();
    assert_eq!(ready, json!({ "name": RF, "version": "1", "ready": true }));

    // Unknown models and versions: 404 on every model route.
    for path in [
        "/v2/models/nope",
        "/v2/models/nope/ready",
        "/v2/models/..",
        "/v2/models/tutorial-rf/versions/9",
        "/v2/models/tutorial-rf/versions/0",
        "/v2/models/tutorial-rf/versions/abc",
        "/v2/models/tutorial-rf/versions/9/ready",
    ] {
        let msg = c.get(path).await.expect_error(404, "not_found");
        assert!(
            !msg.contains(&*reg.path().to_string_lossy()),
            "{path}: internal path in {msg}"
        );
    }
    let r = Reference::load(RF);
    for path in [
        "/v2/models/nope/infer",
        "/v1/models/nope/jobs",
        "/v2/models/tutorial-rf/versions/9/infer",
        "/v2/models/tutorial-rf/versions/0/infer",
    ] {
        let msg = c
            .post(path, rf_row(&r, 0))
            .await
            .expect_error(404, "not_found");
        assert!(
            msg.contains("nope") || msg.contains("version"),
            "{path}: {msg}"
        );
    }

    // The registry listing.
    let v = c.get("/v1/models").await.expect(200).json();
    let models = v["models"].as_array().expect("models");
    let names: Vec<_> = models
        .iter()
        .map(|m| m["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["iris-f64", RF]);
    let rf = &models[1];
    assert_eq!(
        (rf["versions"].clone(), rf["default"].clone()),
        (json!([1, 2]), json!(2))
    );
    assert_eq!(rf["pinned"], false);
    assert!(rf["size"].as_u64() > Some(0), "{rf}");
    assert_eq!(
        xlen(&redis, RF).await,
        0,
        "no route above enqueued anything"
    );
}

/// The value of the series of `name` whose labels include every one of `labels`.
fn series(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{'))
        })
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_are_consistent_with_what_was_sent() {
    let redis = RedisServer::start();
    let reg = TempRegistry::empty();
    let model = unique_name("stats");
    reg.add_as(RF, &model);
    let r = Reference::load(RF);
    let gw = Gateway::start(&redis, &reg, &[]).await;
    let c = gw.client();
    let jobs = format!("/v1/models/{model}/jobs");

    let before = c.get("/v1/stats").await.expect(200).json();
    assert_eq!(before["total_requests"], 1, "{before}");
    assert_eq!(before["queue_depth"][&model]["length"], 0, "{before}");
    let mut urls = Vec::new();
    for i in 0..3 {
        let v = c.post(&jobs, rf_row(&r, i)).await.expect(202).json();
        urls.push(v["status_url"].as_str().expect("url").to_owned());
    }
    c.post(&jobs, "{not json")
        .await
        .expect_error(400, "invalid");
    let queued = c.get("/v1/stats").await.expect(200).json();
    assert_eq!(queued["total_requests"], 6, "{queued}");
    assert_eq!(queued["queue_depth"][&model]["length"], 3, "{queued}");
    let submitted = |v: &Value| v["jobs_submitted"].as_u64().expect("jobs_submitted");
    assert!(
        submitted(&queued) >= submitted(&before) + 3,
        "{before} then {queued}"
    );

    let worker = start_worker(&redis, &reg, &gw.settings).await;
    for u in &urls {
        assert_eq!(
            c.wait_terminal(u, Duration::from_secs(30)).await["status"],
            "succeeded"
        );
    }
    let m = c.get("/metrics").await.expect(200).text();
    let label = format!("model=\"{model}\"");
    assert_eq!(
        series(&m, "inferq_jobs_submitted_total", &[&label]),
        3.0,
        "{m}"
    );
    let ok = ["status=\"succeeded\"", label.as_str()];
    assert_eq!(series(&m, "inferq_jobs_finished_total", &ok), 3.0, "{m}");
    assert_eq!(
        series(
            &m,
            "inferq_jobs_rejected_total",
            &[&label, "reason=\"invalid\""]
        ),
        1.0,
        "{m}"
    );

    let after = c.get("/v1/stats").await.expect(200).json();
    let depth = &after["queue_depth"][&model];
    assert_eq!(
        (depth["pending"].as_u64(), depth["lag"].as_u64()),
        (Some(0), Some(0)),
        "{after}"
    );
    let n = |k: &str| {
        after[k]
            .as_f64()
            .unwrap_or_else(|| panic!("{k} in {after}"))
    };
    assert!(
        n("successful_predictions") >= n("failed_predictions") + 3.0,
        "{after}"
    );
    let rate =
        n("successful_predictions") / (n("successful_predictions") + n("failed_predictions"));
    assert!((n("success_rate") - rate).abs() < 1e-9, "{after}");
    assert!(n("uptime_seconds") > 0.0 && n("memory_mb") > 1.0, "{after}");
    assert_eq!(after["loaded_models"], json!([model]));
    assert!(worker.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_are_404_and_wrong_methods_405() {
    let redis = RedisServer::start();
    let reg = TempRegistry::with_models(&[RF]);
    let gw = Gateway::start(&redis, &reg, &[]).await;
    let c = gw.client();
    for path in [
        "/",
        "/v3",
        "/v2/modelz",
        "/v1/models/tutorial-rf/jobs/a/b",
        "/v2/models/tutorial-rf/versions/1/infer/x",
    ] {
        for m in [Method::GET, Method::POST] {
            let msg = c
                .send(m.clone(), path, &[], "{}".into())
                .await
                .expect_error(404, "not_found");
            assert!(msg.contains("no route"), "{m} {path}: {msg}");
        }
    }
    for (m, path) in [
        (Method::PUT, "/v1/models/tutorial-rf/jobs"),
        (Method::GET, "/v1/models/tutorial-rf/jobs"),
        (Method::POST, "/v1/models/tutorial-rf/jobs/x"),
        (Method::DELETE, "/v2"),
        (Method::POST, "/v2/models/tutorial-rf"),
        (Method::GET, "/v2/models/tutorial-rf/infer"),
        (Method::PATCH, "/v1/stats"),
        (Method::POST, "/v2/health/live"),
        (Method::OPTIONS, "/v1/models"),
    ] {
        let msg = c
            .send(m.clone(), path, &[], Default::default())
            .await
            .expect_error(405, "method_not_allowed");
        assert!(msg.contains(m.as_str()), "{m} {path}: {msg}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_headers_only_when_configured() {
    let redis = RedisServer::start();
    let reg = TempRegistry::with_models(&[RF]);
    let plain = Gateway::start(&redis, &reg, &[]).await;
    let cors = Gateway::start(&redis, &reg, &["--cors-origin", "https://app.example"]).await;
    let has_cors = |r: &Resp| {
        r.headers
            .keys()
            .any(|k| k.as_str().starts_with("access-control-"))
    };
    for path in ["/v2", "/v2/models/nope", "/v2/health/live"] {
        let resp = plain.client().get(path).await;
        assert!(!has_cors(&resp), "{path}: {:?}", resp.headers);
        let resp = cors.client().get(path).await;
        assert_eq!(
            resp.header("access-control-allow-origin"),
            Some("https://app.example")
        );
        let methods = resp
            .header("access-control-allow-methods")
            .unwrap_or_default();
        assert!(
            methods.contains("POST") && methods.contains("DELETE"),
            "{methods}"
        );
        let headers = resp
            .header("access-control-allow-headers")
            .unwrap_or_default();
        assert!(
            headers.contains("authorization") && headers.contains("idempotency-key"),
            "{headers}"
        );
    }
    // A preflight is answered without a body (and without a key).
    let pre = cors
        .client()
        .send(
            Method::OPTIONS,
            "/v1/models/tutorial-rf/jobs",
            &[],
            Default::default(),
        )
        .await;
    pre.expect(204);
    assert_eq!(
        pre.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    let pre = plain
        .client()
        .send(
            Method::OPTIONS,
            "/v1/models/tutorial-rf/jobs",
            &[],
            Default::default(),
        )
        .await;
    pre.expect_error(405, "method_not_allowed");
    assert!(!has_cors(&pre));
}
