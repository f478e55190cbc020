//! The load generator itself (`clickgate-bench`) against a live clickgate: its report must
//! add up and agree with the server's own counters. Correctness of the tool, not a speed
//! threshold: nothing here depends on how fast the box is.

mod common;

use std::process::{Command, Stdio};

use common::{bench_binary, metric_sum, Clickgate};
use serde_json::Value;

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("report field {key:?} is not a count: {v}"))
}

fn f(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("report field {key:?} is not a number: {v}"))
}

#[test]
fn bench_report_adds_up_and_agrees_with_the_server() {
    let bench = bench_binary();
    let cg = Clickgate::run(&["--trusted-cidrs", "127.0.0.0/8"]);
    let query = cg.query.expect("clickgate run serves the query API");
    let tmp = tempfile::tempdir().expect("tempdir");
    let json_path = tmp.path().join("report.json");
    let batch = 50u64;
    let out = Command::new(&bench)
        .args(["--url", &format!("http://{}", cg.ingest)])
        .args(["--mode", "batch", "--batch-size", &batch.to_string()])
        .args([
            "--connections",
            "4",
            "--duration",
            "2s",
            "--warmup",
            "500ms",
        ])
        .args(["--dup-share", "0.05", "--invalid-share", "0.02"])
        .args(["--freshness-url", &format!("http://{query}")])
        .args(["--freshness-interval", "100ms"])
        .arg("--json")
        .arg(&json_path)
        .arg("--quiet")
        .stdin(Stdio::null())
        .output()
        .expect("run clickgate-bench");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "clickgate-bench failed ({}):\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&std::fs::read(&json_path).expect("JSON report"))
        .expect("the JSON report parses");
    let ctx = format!("text report:\n{text}");

    // Every answer is a 202: invalid lines are per-line rejections inside a batch.
    let status = r["status"].as_object().expect("status object");
    assert!(u(&r, "requests") > 0, "no requests measured; {ctx}");
    assert_eq!(
        status.keys().collect::<Vec<_>>(),
        ["202"],
        "non-202 answers; {ctx}"
    );
    assert_eq!(status["202"].as_u64(), Some(u(&r, "requests")), "{ctx}");
    assert_eq!(u(&r, "connection_errors"), 0, "{ctx}");
    assert_eq!(u(&r, "protocol_errors"), 0, "{ctx}");

    // Counts add up.
    assert_eq!(u(&r["config"], "batch_size"), batch);
    assert_eq!(u(&r, "requests") * batch, u(&r, "events"), "{ctx}");
    assert_eq!(
        u(&r, "accepted") + u(&r, "duplicates") + u(&r, "rejected"),
        u(&r, "events"),
        "every event sent is accepted, a duplicate or rejected; {ctx}"
    );
    assert!(
        u(&r, "duplicates") > 0 && u(&r, "rejected") > 0,
        "the mix asked for duplicates and invalid lines; {ctx}"
    );

    // Percentiles ordered.
    let l = &r["latency_us"];
    let (p50, p90, p99, p999, max) = (
        f(l, "p50"),
        f(l, "p90"),
        f(l, "p99"),
        f(l, "p999"),
        f(l, "max"),
    );
    assert!(p50 > 0.0, "{ctx}");
    assert!(
        p50 <= p90 && p90 <= p99 && p99 <= p999 && p999 <= max,
        "percentiles out of order: {l}"
    );

    // Freshness probes ran, none timed out, and their percentiles are ordered too.
    let fr = &r["freshness"];
    assert!(fr.is_object(), "no freshness object; {ctx}");
    assert!(u(fr, "probes") > 0, "no freshness probe; {ctx}");
    assert_eq!(u(fr, "timeouts"), 0, "{ctx}");
    assert_eq!(u(fr, "post_errors"), 0, "{ctx}");
    assert!(
        f(fr, "p50_ms") <= f(fr, "p99_ms") && f(fr, "p99_ms") <= f(fr, "max_ms"),
        "{fr}"
    );
    assert!(text.contains("freshness (ms)"), "{ctx}");

    // The whole run (warm-up and drain included) against the server's own counters.
    let w = &r["whole_run"];
    assert_eq!(u(w, "lost"), 0, "{ctx}");
    assert_eq!(u(w, "unanswered"), 0, "{ctx}");
    assert_eq!(u(w, "responses"), u(w, "requests_sent"), "{ctx}");
    assert_eq!(u(w, "requests_sent") * batch, u(w, "events_sent"), "{ctx}");
    assert_eq!(
        u(w, "accepted") + u(w, "duplicates") + u(w, "rejected"),
        u(w, "events_sent"),
        "{ctx}"
    );
    let metrics = cg.metrics();
    let server_accepted = metric_sum(&metrics, "clickgate_ingest_events_accepted_total") as u64;
    let server_dups = metric_sum(&metrics, "clickgate_ingest_events_duplicate_total") as u64;
    assert_eq!(
        server_accepted,
        u(w, "accepted") + u(fr, "events_accepted"),
        "the server's accepted counter against the tool's (load + {} probe events); {ctx}",
        u(fr, "events_accepted")
    );
    assert_eq!(server_dups, u(w, "duplicates"), "{ctx}");
}
