//! `docs/openapi.yaml` against the gateway: it parses as OpenAPI 3.0 with every
//! `$ref` resolving; it documents exactly the routes of the router (read from
//! `src/api/meta.rs`); and on a live gateway every documented operation answers with
//! a status it documents (never 404-no-route or 405), with the required fields of its
//! documented schema, while the methods it does not document answer 405.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::http::{Gateway, infer_body};
use common::{RedisServer, Reference, TempRegistry, repo_root};
use hyper::Method;
use serde_json::{Value, json};

const METHODS: [&str; 5] = ["get", "post", "put", "delete", "patch"];
const KEY: &str = "key-openapi-1";

fn spec() -> Value {
    let path = repo_root().join("docs/openapi.yaml");
    let text = std::fs::read_to_string(&path).expect("docs/openapi.yaml");
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `/v2/models/{m}` and `/v2/models/{model}` both become `/v2/models/{}`.
fn normalize(template: &str) -> String {
    template
        .split('/')
        .map(|s| {
            if s.starts_with('{') && s.ends_with('}') {
                "{}"
            } else {
                s
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// (METHOD, normalized template) → (path as documented, operation).
fn operations(spec: &Value) -> BTreeMap<(String, String), (String, Value)> {
    let mut ops = BTreeMap::new();
    for (path, item) in spec["paths"].as_object().expect("paths") {
        for m in METHODS {
            if let Some(op) = item.get(m) {
                ops.insert(
                    (m.to_uppercase(), normalize(path)),
                    (path.clone(), op.clone()),
                );
            }
        }
    }
    ops
}

/// The router's routes: in `App::route`, each arm `(Method::X, [...])` names its
/// template in the first `routed("/…")` or `Routed::named("/…")` before the next arm.
fn router_routes() -> BTreeSet<(String, String)> {
    let src = std::fs::read_to_string(repo_root().join("src/api/meta.rs")).expect("meta.rs");
    let start = src.find("async fn route").expect("App::route in meta.rs");
    let end = start
        + src[start..]
            .find("async fn ready")
            .expect("route ends before ready");
    let body = &src[start..end];
    let mut routes = BTreeSet::new();
    let arms: Vec<usize> = body.match_indices("Method::").map(|(i, _)| i).collect();
    for (k, &at) in arms.iter().enumerate() {
        let rest = &body[at + "Method::".len()..];
        let method: String = rest.chars().take_while(char::is_ascii_uppercase).collect();
        if !rest[method.len()..].starts_with(", [") {
            continue;
        }
        let arm = &body[at..arms.get(k + 1).copied().unwrap_or(body.len())];
        let template = ["routed(\"/", "named(\"/"].iter().find_map(|open| {
            let from = arm.find(open)? + open.len() - 1;
            Some(arm[from..].split('"').next()?.to_owned())
        });
        if let Some(t) = template {
            routes.insert((method, normalize(&t)));
        }
    }
    assert!(
        routes.len() >= 10,
        "could not read the router's routes: {routes:?}"
    );
    routes
}

/// Every `$ref` in the document, with where it appears.
fn refs(v: &Value, at: &str, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(o) => {
            for (k, x) in o {
                if k == "$ref" {
                    out.push((
                        at.to_owned(),
                        x.as_str().expect("a $ref is a string").to_owned(),
                    ));
                } else {
                    refs(x, &format!("{at}/{k}"), out);
                }
            }
        }
        Value::Array(a) => a
            .iter()
            .enumerate()
            .for_each(|(i, x)| refs(x, &format!("{at}/{i}"), out)),
        _ => {}
    }
}

/// Follows `$ref`s (local ones only) to the object they name.
fn resolve<'a>(spec: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let ptr = r
                .strip_prefix('#')
                .unwrap_or_else(|| panic!("non-local $ref {r}"));
            let target = spec
                .pointer(ptr)
                .unwrap_or_else(|| panic!("{r} does not resolve"));
            resolve(spec, target)
        }
        None => v,
    }
}

#[test]
fn the_document_is_openapi_3_and_every_ref_resolves() {
    let spec = spec();
    assert!(
        spec["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.0.")),
        "{}",
        spec["openapi"]
    );
    assert!(spec["info"]["title"].is_string() && spec["info"]["version"].is_string());
    assert_eq!(
        spec["components"]["securitySchemes"]["bearerAuth"],
        json!({
            "type": "http", "scheme": "bearer",
            "description": spec["components"]["securitySchemes"]["bearerAuth"]["description"],
        })
    );
    assert_eq!(spec["security"], json!([{ "bearerAuth": [] }]));
    let mut all = Vec::new();
    refs(&spec, "", &mut all);
    assert!(all.len() > 50, "few $refs: {}", all.len());
    for (at, r) in &all {
        let ptr = r
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("{at}: non-local $ref {r}"));
        assert!(spec.pointer(ptr).is_some(), "{at}: {r} does not resolve");
    }
    let error = &spec["components"]["schemas"]["Error"];
    assert_eq!(error["required"], json!(["error", "kind"]));
    let mut ids = BTreeSet::new();
    for ((m, p), (_, op)) in operations(&spec) {
        let id = op["operationId"]
            .as_str()
            .unwrap_or_else(|| panic!("{m} {p}: no operationId"));
        assert!(ids.insert(id.to_owned()), "operationId {id} twice");
        let responses = op["responses"]
            .as_object()
            .unwrap_or_else(|| panic!("{m} {p}: no responses"));
        let open = op.get("security") == Some(&json!([]));
        assert_eq!(
            open,
            p.starts_with("/v2/health/"),
            "{m} {p}: only health is open"
        );
        if !open {
            for code in ["401", "403"] {
                assert!(
                    responses.contains_key(code),
                    "{m} {p} does not document {code}"
                );
            }
        }
        // Every error response documents the error schema.
        for (code, resp) in responses {
            let schema = &resolve(&spec, resp)["content"]["application/json"]["schema"];
            if code.starts_with('4') || code.starts_with('5') && p != "/v2/health/ready" {
                assert_eq!(
                    schema["$ref"], "#/components/schemas/Error",
                    "{m} {p} {code}"
                );
            }
        }
    }
}

#[test]
fn every_route_of_the_router_is_documented_and_nothing_else() {
    let documented: BTreeSet<_> = operations(&spec()).into_keys().collect();
    let routed = router_routes();
    let undocumented: Vec<_> = routed.difference(&documented).collect();
    let unrouted: Vec<_> = documented.difference(&routed).collect();
    assert!(
        undocumented.is_empty(),
        "routes missing from docs/openapi.yaml: {undocumented:?}"
    );
    assert!(
        unrouted.is_empty(),
        "documented but not routed: {unrouted:?}"
    );
}

/// The documented path with its parameters filled in.
fn concrete(path: &str, job: &str) -> String {
    path.replace("{model}", "tutorial-rf")
        .replace("{version}", "1")
        .replace("{id}", job)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_operation_answers_on_a_live_gateway() {
    let spec = spec();
    let redis = RedisServer::start();
    let reg = TempRegistry::with_models(&["tutorial-rf"]);
    let r = Reference::load("tutorial-rf");
    let args = ["--api-keys", KEY, "--sync-timeout-ms", "100"];
    let gw = Gateway::start(&redis, &reg, &args).await;
    let (anon, c) = (gw.client(), gw.client().with_key(KEY));
    let body = infer_body(&r.input_rows(0..1), json!({}));
    let job = c
        .post("/v1/models/tutorial-rf/jobs", body.clone())
        .await
        .expect(202)
        .json();
    let job = job["id"].as_str().expect("id").to_owned();

    let ops = operations(&spec);
    // DELETE last, so the GETs see the job before it is cancelled.
    let mut order: Vec<_> = ops.iter().collect();
    order.sort_by_key(|((m, _), _)| m == "DELETE");
    for ((m, _), (path, op)) in order {
        let url = concrete(path, &job);
        let method = Method::from_bytes(m.as_bytes()).expect("method");
        let payload = if method == Method::POST {
            body.clone()
        } else {
            String::new()
        };
        let headers = [("content-type", "application/json")];
        let resp = c
            .send(method.clone(), &url, &headers, payload.clone().into())
            .await;
        let code = resp.status.as_str().to_owned();
        let what = format!("{m} {url} → {code} {}", resp.text());
        assert!(!matches!(resp.status.as_u16(), 404 | 405), "{what}");
        let documented = &op["responses"][&code];
        assert!(!documented.is_null(), "{what}: status not documented");
        let schema = resolve(
            &spec,
            &resolve(&spec, documented)["content"]["application/json"]["schema"],
        );
        if let Some(required) = schema["required"].as_array() {
            let v = resp.json();
            for field in required {
                let field = field.as_str().expect("field name");
                assert!(v.get(field).is_some(), "{what}: no `{field}`");
            }
        }
        // The documented security: health is open, the rest need the key.
        let anon_resp = anon.send(method, &url, &headers, payload.into()).await;
        if op.get("security") == Some(&json!([])) {
            anon_resp.expect(200);
        } else {
            anon_resp.expect_error(401, "unauthorized");
        }
    }

    // Methods a path does not document are refused with 405.
    let paths: BTreeSet<_> = ops.values().map(|(p, _)| p.clone()).collect();
    for path in paths {
        for m in METHODS {
            if spec["paths"][&path].get(m).is_some() {
                continue;
            }
            let url = concrete(&path, &job);
            let method = Method::from_bytes(m.to_uppercase().as_bytes()).expect("method");
            let resp = c.send(method, &url, &[], Default::default()).await;
            resp.expect_error(405, "method_not_allowed");
        }
    }
}
