//! The OpenAPI documents (docs/openapi/ingest.json, docs/openapi/query.json) against the
//! live routes of the real binary:
//!
//! - the documented paths are exactly the routes the code registers (the dataplane's
//!   `Route` list; every axum `.route("…")` of the controlplane);
//! - every documented operation, called as documented on a running `clickgate run`,
//!   answers one of its documented statuses, with the documented content type and a body
//!   that fits the documented schema; a bad parameter gets its documented 400;
//! - every other method on a documented path answers 405, and an undocumented path 404.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use common::{event, uuid, Clickgate, Conn, Response};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn load(name: &str) -> Value {
    let path = root().join("docs/openapi").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let doc: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "{name}: not OpenAPI 3"
    );
    check_refs(&doc, &doc, name);
    doc
}

/// Every `$ref` resolves.
fn check_refs(doc: &Value, v: &Value, name: &str) {
    match v {
        Value::Object(m) => {
            if let Some(r) = m.get("$ref").and_then(Value::as_str) {
                resolve(doc, r).unwrap_or_else(|| panic!("{name}: dangling $ref {r}"));
            }
            m.values().for_each(|x| check_refs(doc, x, name));
        }
        Value::Array(a) => a.iter().for_each(|x| check_refs(doc, x, name)),
        _ => {}
    }
}

fn resolve<'a>(doc: &'a Value, r: &str) -> Option<&'a Value> {
    doc.pointer(r.strip_prefix('#')?)
}

/// A small JSON-schema check: types, `nullable`, `enum`, `required`, `properties`, `items`.
fn fits(doc: &Value, schema: &Value, v: &Value, at: &str) -> Result<(), String> {
    if let Some(r) = schema["$ref"].as_str() {
        return fits(doc, resolve(doc, r).expect("checked"), v, at);
    }
    if v.is_null() && schema["nullable"].as_bool() == Some(true) {
        return Ok(());
    }
    let ok = match schema["type"].as_str() {
        Some("object") => v.is_object(),
        Some("array") => v.is_array(),
        Some("string") => v.is_string(),
        Some("integer") => v.is_u64() || v.is_i64(),
        Some("number") => v.is_number(),
        Some("boolean") => v.is_boolean(),
        _ => true,
    };
    if !ok {
        return Err(format!("{at}: {v} is not of type {}", schema["type"]));
    }
    if let Some(options) = schema["enum"].as_array() {
        if !options.contains(v) {
            return Err(format!("{at}: {v} is not one of {options:?}"));
        }
    }
    if let Some(req) = schema["required"].as_array() {
        for k in req {
            let k = k.as_str().unwrap();
            if v.get(k).is_none() {
                return Err(format!("{at}: required property {k} is missing in {v}"));
            }
        }
    }
    if let (Some(props), Some(obj)) = (schema["properties"].as_object(), v.as_object()) {
        for (k, s) in props {
            if let Some(x) = obj.get(k) {
                fits(doc, s, x, &format!("{at}.{k}"))?;
            }
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), v.as_array()) {
        for (i, x) in arr.iter().enumerate() {
            fits(doc, items, x, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

/// Checks a live answer against the operation's documented responses.
fn check_answer(doc: &Value, op: &Value, what: &str, r: &Response) {
    let documented = &op["responses"][r.status.to_string()];
    assert!(
        documented.is_object(),
        "{what}: status {} is not documented ({:?})",
        r.status,
        op["responses"]
            .as_object()
            .map(|m| m.keys().collect::<Vec<_>>())
    );
    let content = documented["content"].as_object().expect("content");
    let ctype = r.header("content-type").unwrap_or("");
    let (doc_type, media) = content
        .iter()
        .find(|(t, _)| ctype.starts_with(t.as_str()))
        .unwrap_or_else(|| panic!("{what}: content type {ctype:?} is not documented"));
    if doc_type == "application/json" {
        let body: Value = serde_json::from_str(&r.body)
            .unwrap_or_else(|e| panic!("{what}: body is not JSON ({e}): {}", r.body));
        fits(doc, &media["schema"], &body, what)
            .unwrap_or_else(|e| panic!("{what}: body does not fit the schema: {e}"));
    }
    if let Some(headers) = documented["headers"].as_object() {
        for h in headers.keys() {
            assert!(
                r.header(h).is_some(),
                "{what}: documented header {h} missing"
            );
        }
    }
}

/// `(path, method)` of every documented operation.
fn operations(doc: &Value) -> Vec<(String, String, Value)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().unwrap() {
            out.push((path.clone(), method.to_uppercase(), op.clone()));
        }
    }
    out
}

/// The request URI of an operation: path parameters and required query parameters
/// filled with their documented examples.
fn uri(path: &str, op: &Value) -> String {
    let mut p = path.to_string();
    let mut query = Vec::new();
    for param in op["parameters"].as_array().into_iter().flatten() {
        let name = param["name"].as_str().unwrap();
        let example = match &param["example"] {
            Value::String(s) => s.clone(),
            Value::Null => continue,
            other => other.to_string(),
        };
        match param["in"].as_str() {
            Some("path") => p = p.replace(&format!("{{{name}}}"), &example),
            Some("query") if param["required"] == true => query.push(format!("{name}={example}")),
            _ => {}
        }
    }
    assert!(!p.contains('{'), "{path}: a path parameter has no example");
    if query.is_empty() {
        p
    } else {
        format!("{p}?{}", query.join("&"))
    }
}

/// Every `.route("…")` path in the controlplane's sources.
fn controlplane_routes() -> BTreeSet<String> {
    let mut files = Vec::new();
    collect_rs(&root().join("controlplane/src"), &mut files);
    let mut out = BTreeSet::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for chunk in text.split(".route(").skip(1) {
            let chunk = chunk.trim_start();
            if let Some(rest) = chunk.strip_prefix('"') {
                out.insert(rest.split('"').next().unwrap().to_string());
            }
        }
    }
    out
}

fn collect_rs(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            collect_rs(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn paths(doc: &Value) -> BTreeSet<String> {
    doc["paths"].as_object().unwrap().keys().cloned().collect()
}

#[test]
fn documented_paths_are_the_routes_of_the_code() {
    let ingest = load("ingest.json");
    let live: BTreeSet<String> = clickgate_dataplane::http::Route::ALL
        .iter()
        .filter(|r| **r != clickgate_dataplane::http::Route::NotFound)
        .map(|r| r.label().to_string())
        .collect();
    assert_eq!(paths(&ingest), live, "ingest API: documented vs routed");

    let query = load("query.json");
    let routes = controlplane_routes();
    assert!(routes.len() >= 8, "{routes:?}");
    assert_eq!(paths(&query), routes, "query API: documented vs routed");
}

#[test]
fn the_live_binary_answers_as_documented() {
    let cg = Clickgate::run(&[]);
    let ingest = load("ingest.json");
    let query = load("query.json");
    let ingest_addr = cg.ingest;
    let query_addr = cg.query.expect("run serves the query API");
    // Something to count, so the query answers hold buckets and ads.
    let ev = event(&uuid(1), 12345, |_| {});
    let r = cg.request("POST", "/v1/click", &ev);
    assert_eq!(r.status, 202, "{}", r.body);

    for (doc, addr, name) in [
        (&ingest, ingest_addr, "ingest"),
        (&query, query_addr, "query"),
    ] {
        let ops = operations(doc);
        for (path, method, op) in &ops {
            let what = format!("{name} {method} {path}");
            let body = match (path.as_str(), method.as_str()) {
                ("/v1/click", "POST") => event(&uuid(2), 12345, |_| {}),
                ("/v1/clicks", "POST") => {
                    format!("{}\n{}\n", event(&uuid(3), 12345, |_| {}), "{\"x\":1}")
                }
                _ => String::new(),
            };
            let r = Conn::new(addr).request(method, &uri(path, op), &body);
            assert!(
                (200..300).contains(&r.status),
                "{what}: {} {}",
                r.status,
                r.body
            );
            check_answer(doc, op, &what, &r);
            if path == "/v1/clicks" {
                assert_eq!(r.json()["rejected"][0]["line"], 1, "{}", r.body);
            }
            // Other methods: 405 on the same path.
            for other in ["GET", "POST", "PUT", "DELETE"] {
                if ops.iter().any(|(p, m, _)| p == path && m == other) {
                    continue;
                }
                let r = Conn::new(addr).request(other, &uri(path, op), "");
                assert_eq!(r.status, 405, "{what}: {other} answered {}", r.status);
            }
            // A parameter that breaks the operation: its documented 400.
            if op["responses"]["400"].is_object() && method == "GET" {
                let broken = uri(path, op)
                    .replace("window=5m", "window=1w")
                    .replace("/12345/", "/not-a-number/");
                let broken = if broken.contains('?') {
                    broken
                } else {
                    format!("{broken}?window=1w")
                };
                let r = Conn::new(addr).request("GET", &broken, "");
                assert_eq!(r.status, 400, "{what} {broken}: {}", r.body);
                check_answer(doc, op, &format!("{what} (bad parameter)"), &r);
            }
        }
        // Invalid events: the documented 400.
        if name == "ingest" {
            let op = &ingest["paths"]["/v1/click"]["post"];
            let bad = event(&uuid(4), 12345, |v| v["country"] = "usa".into());
            let r = Conn::new(addr).request("POST", "/v1/click", &bad);
            assert_eq!(r.status, 400);
            check_answer(doc, op, "ingest POST /v1/click (invalid)", &r);
            assert_eq!(r.json()["field"], "country");
        }
        // An undocumented path: 404.
        let r = Conn::new(addr).request("GET", "/v1/undocumented", "");
        assert_eq!(r.status, 404, "{name}: {}", r.body);
    }
}
