//! Ingest API black-box tests (docs/schema.md, docs/api.md): the real binary over real sockets.

mod common;

use std::collections::HashSet;

use clickgate_proto::record;
use clickgate_proto::segment::{core_dirs, LogReader};
use common::*;
use serde_json::{json, Value};

fn post_click(cg: &Clickgate, body: &str) -> Response {
    cg.request("POST", "/v1/click", body)
}

fn post_clicks(cg: &Clickgate, lines: &[String]) -> Response {
    cg.request("POST", "/v1/clicks", &lines.join("\n"))
}

/// Every event id in the data directory's local log, with its duplicate flag.
fn logged_events(cg: &Clickgate) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    for (_core, dir) in core_dirs(&cg.data_dir.join("log")).expect("log dirs") {
        let mut reader = LogReader::open(&dir, 0).expect("open log");
        while let Some((_lsn, bytes)) = reader.next().expect("read log") {
            let rec = record::decode(bytes).expect("decode record");
            out.push((rec.click.event_id.to_string(), rec.flags.duplicate()));
        }
    }
    out
}

#[test]
fn single_event_is_accepted_with_the_contract_body() {
    let cg = Clickgate::dataplane(&[]);
    let r = post_click(&cg, &event(&uuid(1), 12345, |_| {}));
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.json(), json!({"accepted":1,"duplicates":0,"rejected":[]}));
}

#[test]
fn batch_keeps_good_lines_and_names_bad_ones() {
    let cg = Clickgate::dataplane(&[]);
    let lines = vec![
        event(&uuid(1), 1, |_| {}),
        event(&uuid(2), 1, |v| v["country"] = json!("usa")),
        event(&uuid(3), 2, |_| {}),
        "{not json".to_string(),
        String::new(), // blank lines are skipped, not counted
        event(&uuid(4), 3, |v| {
            v.as_object_mut().unwrap().remove("ts");
        }),
        event(&uuid(5), 3, |_| {}),
    ];
    let r = post_clicks(&cg, &lines);
    assert_eq!(r.status, 202, "{}", r.body);
    let v = r.json();
    assert_eq!(v["accepted"], 3, "{v}");
    assert_eq!(v["duplicates"], 0, "{v}");
    let rejected = v["rejected"].as_array().unwrap();
    let lines: Vec<u64> = rejected
        .iter()
        .map(|e| e["line"].as_u64().unwrap())
        .collect();
    assert_eq!(lines, vec![1, 3, 5], "{v}");
    assert!(
        rejected[0]["error"].as_str().unwrap().contains("country"),
        "{v}"
    );
    assert!(rejected[2]["error"].as_str().unwrap().contains("ts"), "{v}");
}

#[test]
fn batch_with_nothing_valid_is_400() {
    let cg = Clickgate::dataplane(&[]);
    let r = post_clicks(&cg, &["{".to_string(), event("nope", 1, |_| {})]);
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.json()["error"].is_string());
}

/// One invalid field at a time: the 400 names exactly that field.
#[test]
fn each_invalid_field_is_named() {
    let cg = Clickgate::dataplane(&[]);
    let future = now_ms() + 10 * 60 * 1000;
    let cases: Vec<(&str, Value)> = vec![
        ("event_id", json!("6f1c2f4e-8a3b-4c1d-9e2f")),
        ("event_id", json!(12)),
        ("ts", json!("yesterday")),
        ("ts", json!(future)),
        ("ts", json!(-1)),
        ("campaign_id", json!(-5)),
        ("campaign_id", json!("12345")),
        ("ad_id", json!(1.5)),
        ("publisher_id", json!(null)),
        ("advertiser_id", json!([7])),
        ("user_id", json!("")),
        ("user_id", json!("u".repeat(65))),
        ("ip", json!("999.0.113.7")),
        ("ip", json!("example.com")),
        ("user_agent", json!("a".repeat(513))),
        ("country", json!("us")),
        ("country", json!("USA")),
        ("device", json!("phone")),
        ("cost_micros", json!(1_000_000_000_001u64)),
        ("cost_micros", json!(-1)),
    ];
    for (field, bad) in cases {
        let body = event(&uuid(7), 1, |v| v[field] = bad.clone());
        let r = post_click(&cg, &body);
        assert_eq!(r.status, 400, "{field}={bad}: {}", r.body);
        let v = r.json();
        assert_eq!(v["field"], json!(field), "{field}={bad}: {v}");
        assert!(!v["error"].as_str().unwrap().is_empty());
    }
    // Missing field.
    let body = event(&uuid(8), 1, |v| {
        v.as_object_mut().unwrap().remove("device");
    });
    let r = post_click(&cg, &body);
    assert_eq!(
        (r.status, r.json()["field"].clone()),
        (400, json!("device")),
        "{}",
        r.body
    );
    // Malformed JSON: no field to blame.
    let r = post_click(&cg, "{\"event_id\": ");
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["field"], Value::Null, "{}", r.body);
}

#[test]
fn edge_values_and_unknown_fields_are_accepted() {
    let cg = Clickgate::dataplane(&[]);
    let cases: Vec<(&str, Value)> = vec![
        ("user_id", json!("u".repeat(64))),
        ("user_agent", json!("")),
        ("user_agent", json!("a".repeat(512))),
        ("ip", json!("2001:db8::7")),
        ("cost_micros", json!(0)),
        ("cost_micros", json!(1_000_000_000_000u64)),
        ("campaign_id", json!(u64::MAX)),
        ("device", json!("ctv")),
        ("extra_field", json!({"nested": [1, 2]})),
    ];
    for (i, (field, good)) in cases.into_iter().enumerate() {
        let body = event(&uuid(100 + i as u64), 1, |v| v[field] = good.clone());
        let r = post_click(&cg, &body);
        assert_eq!(r.status, 202, "{field}={good}: {}", r.body);
    }
}

#[test]
fn missing_length_is_411_and_oversize_is_413() {
    let cg = Clickgate::dataplane(&["--body-bytes-max", "2048", "--batch-events-max", "5"]);
    let mut c = cg.connect();
    c.send_raw(b"POST /v1/click HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\r\n");
    let r = c.read_response();
    assert_eq!(r.status, 411, "{}", r.body);
    assert!(r.json()["error"].is_string());

    let big = event(&uuid(1), 1, |v| v["pad"] = json!("x".repeat(4000)));
    let r = post_click(&cg, &big);
    assert_eq!(r.status, 413, "{}", r.body);
    assert!(r.json()["error"].is_string());

    let six: Vec<String> = (0..6).map(|i| event(&uuid(10 + i), 1, |_| {})).collect();
    let r = post_clicks(&cg, &six);
    assert_eq!(r.status, 413, "{}", r.body);
    let five: Vec<String> = (0..5).map(|i| event(&uuid(20 + i), 1, |_| {})).collect();
    assert_eq!(post_clicks(&cg, &five).status, 202);
}

#[test]
fn rate_limit_answers_429_and_trusted_networks_are_exempt() {
    let limited = Clickgate::dataplane(&["--rate-limit-events-per-sec", "10"]);
    let mut c = limited.connect();
    let batch = |base: u64| -> String {
        (0..10)
            .map(|i| event(&uuid(base + i), 1, |_| {}))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(c.request("POST", "/v1/clicks", &batch(0)).status, 202);
    let r = c.request("POST", "/v1/clicks", &batch(100));
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.json(), json!({"error":"rate limited"}));
    let retry: u64 = r
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!(retry >= 1);

    let trusted = Clickgate::dataplane(&[
        "--rate-limit-events-per-sec",
        "10",
        "--trusted-cidrs",
        "10.0.0.0/8,127.0.0.0/8",
    ]);
    let mut c = trusted.connect();
    for round in 0..5 {
        let r = c.request("POST", "/v1/clicks", &batch(1000 + round * 100));
        assert_eq!(r.status, 202, "round {round}: {}", r.body);
    }
}

/// The same event sent on many connections (SO_REUSEPORT spreads them over both cores):
/// only the first is accepted, whichever core owns its bloom shard.
#[test]
fn duplicates_are_caught_across_connections_and_cores() {
    let cg = Clickgate::dataplane(&[]);
    let ids: Vec<String> = (0..8).map(|i| uuid(500 + i)).collect();
    let first: Vec<String> = ids.iter().map(|id| event(id, 9, |_| {})).collect();
    let r = post_clicks(&cg, &first);
    assert_eq!(r.json()["accepted"], 8, "{}", r.body);
    for conn in 0..24 {
        let mut c = cg.connect();
        // Altered non-key fields do not make a retry a new event.
        let again: Vec<String> = ids
            .iter()
            .map(|id| event(id, 9, |v| v["cost_micros"] = json!(conn)))
            .collect();
        let r = c.request("POST", "/v1/clicks", &again.join("\n"));
        assert_eq!(r.status, 202, "{}", r.body);
        assert_eq!(
            r.json(),
            json!({"accepted":0,"duplicates":8,"rejected":[]}),
            "conn {conn}"
        );
        let r = c.request("POST", "/v1/click", &first[conn % 8]);
        assert_eq!(
            r.json(),
            json!({"accepted":0,"duplicates":1,"rejected":[]}),
            "conn {conn}"
        );
    }
    // Within one body too.
    let id = uuid(900);
    let twice = vec![event(&id, 1, |_| {}), event(&id, 1, |_| {})];
    assert_eq!(
        post_clicks(&cg, &twice).json(),
        json!({"accepted":1,"duplicates":1,"rejected":[]})
    );
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let cg = Clickgate::dataplane(&[]);
    let mut c = cg.connect();
    let mut bytes = Vec::new();
    let mut expect = Vec::new();
    for i in 0..60u64 {
        match i % 4 {
            0 => {
                bytes.extend(Conn::request_bytes(
                    "POST",
                    "/v1/click",
                    &event(&uuid(i), 1, |_| {}),
                ));
                expect.push((202, Some(1)));
            }
            1 => {
                let body = format!(
                    "{}\n{}",
                    event(&uuid(i), 2, |_| {}),
                    event(&uuid(i + 1000), 2, |_| {})
                );
                bytes.extend(Conn::request_bytes("POST", "/v1/clicks", &body));
                expect.push((202, Some(2)));
            }
            2 => {
                bytes.extend(Conn::request_bytes("POST", "/v1/click", "{}"));
                expect.push((400, None));
            }
            _ => {
                bytes.extend(Conn::request_bytes("GET", "/healthz", ""));
                expect.push((200, None));
            }
        }
    }
    // One write: the server sees many requests in one read.
    c.send_raw(&bytes);
    for (i, (status, accepted)) in expect.into_iter().enumerate() {
        let r = c.read_response();
        assert_eq!(r.status, status, "response {i}: {}", r.body);
        if let Some(n) = accepted {
            assert_eq!(r.json()["accepted"], n, "response {i}");
        }
    }
}

#[test]
fn full_log_buffer_answers_503_with_retry_after() {
    // A 4 KiB in-memory log buffer cannot take a 100-event batch.
    let cg = Clickgate::dataplane(&["--log-buffer-bytes-max", "4096", "--ack", "memory"]);
    let lines: Vec<String> = (0..100).map(|i| event(&uuid(i), 1, |_| {})).collect();
    let r = post_clicks(&cg, &lines);
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.json()["error"].is_string());
    assert!(r.header("retry-after").is_some());
    // Small requests still go through.
    assert_eq!(post_click(&cg, &event(&uuid(1000), 1, |_| {})).status, 202);
}

#[test]
fn routes_health_metrics_and_errors() {
    let cg = Clickgate::dataplane(&[]);
    assert_eq!(cg.request("GET", "/healthz", "").status, 200);
    assert_eq!(cg.request("GET", "/readyz", "").status, 200);
    let r = cg.request("GET", "/nope", "");
    assert_eq!(r.status, 404);
    assert!(r.json()["error"].is_string());
    let r = cg.request("GET", "/v1/click", "");
    assert_eq!(r.status, 405);
    assert!(r.header("allow").is_some_and(|a| a.contains("POST")));
    post_click(&cg, &event(&uuid(1), 1, |_| {}));
    let m = cg.metrics();
    assert!(m.contains("# HELP"), "{m}");
    assert!(m.contains("# TYPE"), "{m}");
    // Malformed request line: 400 and the connection is closed.
    let mut c = cg.connect();
    c.send_raw(b"GARBAGE\r\n\r\n");
    let r = c.read_response();
    assert_eq!(r.status, 400);
    assert!(c.is_closed());
}

/// SIGTERM drains and flushes: every 202'd event is in the log, exit status 0; a restart
/// on the same directory keeps the log and appends to it.
#[test]
fn sigterm_flushes_and_restart_keeps_the_log() {
    let mut cg = Clickgate::dataplane(&["--ack", "memory"]);
    let mut sent = HashSet::new();
    for b in 0..3u64 {
        let lines: Vec<String> = (0..50)
            .map(|i| {
                let id = uuid(b * 100 + i);
                sent.insert(id.clone());
                event(&id, b, |_| {})
            })
            .collect();
        assert_eq!(post_clicks(&cg, &lines).json()["accepted"], 50);
    }
    let status = cg.sigterm_and_wait();
    assert!(status.success(), "exit status {status}");
    let logged: HashSet<String> = logged_events(&cg).into_iter().map(|(id, _)| id).collect();
    assert_eq!(logged, sent);

    cg.restart();
    let id = uuid(10_000);
    assert_eq!(post_click(&cg, &event(&id, 1, |_| {})).status, 202);
    sent.insert(id);
    assert!(cg.sigterm_and_wait().success());
    let logged = logged_events(&cg);
    assert_eq!(logged.len(), 151);
    assert_eq!(
        logged.into_iter().map(|(id, _)| id).collect::<HashSet<_>>(),
        sent
    );
}

/// With ack=disk, a 202 means fsync'd: `kill -9` loses none of them.
#[test]
fn kill9_in_disk_mode_loses_no_acknowledged_event() {
    let mut cg = Clickgate::dataplane(&["--ack", "disk"]);
    let mut acked = HashSet::new();
    let mut c = cg.connect();
    for b in 0..40u64 {
        let ids: Vec<String> = (0..25).map(|i| uuid(b * 100 + i)).collect();
        let body: Vec<String> = ids.iter().map(|id| event(id, 3, |_| {})).collect();
        let r = c.request("POST", "/v1/clicks", &body.join("\n"));
        assert_eq!(r.status, 202, "{}", r.body);
        acked.extend(ids);
    }
    // Requests in flight at the kill may or may not be logged; acknowledged ones must be.
    c.send_raw(&Conn::request_bytes(
        "POST",
        "/v1/click",
        &event(&uuid(99_999), 3, |_| {}),
    ));
    cg.kill9();
    let logged: HashSet<String> = logged_events(&cg).into_iter().map(|(id, _)| id).collect();
    let missing: Vec<_> = acked.difference(&logged).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged events missing after kill -9",
        missing.len()
    );
    // The torn tail (if any) is cut at restart and the log keeps taking appends.
    cg.restart();
    assert_eq!(
        post_click(&cg, &event(&uuid(77_777), 3, |_| {})).status,
        202
    );
}

#[test]
fn duplicates_are_logged_with_their_flag() {
    let mut cg = Clickgate::dataplane(&["--ack", "disk"]);
    let id = uuid(42);
    post_click(&cg, &event(&id, 1, |_| {}));
    post_click(&cg, &event(&id, 1, |_| {}));
    assert!(cg.sigterm_and_wait().success());
    let mut flags: Vec<bool> = logged_events(&cg)
        .into_iter()
        .filter(|(i, _)| *i == id)
        .map(|(_, d)| d)
        .collect();
    flags.sort();
    assert_eq!(flags, vec![false, true]);
}
