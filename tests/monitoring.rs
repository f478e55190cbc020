//! Operator monitoring: the Prometheus alert rules are valid (`promtool check rules`, env
//! `CLICKGATE_TEST_PROMTOOL`), the `/metrics` text of every process passes `promtool check
//! metrics` (the embedded defaults, and with Kafka and Redis configured so their families
//! are there too), and every metric the alerts and the Grafana dashboard use is exported by
//! a live clickgate or named in deploy/README.md's list of metrics other components export
//! (so a renamed metric breaks this test, not the pager).

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::{event, uuid, Clickgate};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Metric-like names (`clickgate_*`, `redis_*`) in a text.
fn metric_names(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|t| t.starts_with("clickgate_") || t.starts_with("redis_"))
        .map(str::to_string)
        .collect()
}

/// The PromQL expressions of the alert file (`expr:` values, folded blocks included).
fn alert_exprs(yaml: &str) -> String {
    let mut out = String::new();
    let mut in_expr = false;
    for line in yaml.lines() {
        let t = line.trim_start();
        if let Some(rest) = t.strip_prefix("expr:") {
            out.push_str(rest);
            out.push('\n');
            in_expr = rest.trim() == "|";
        } else if in_expr && line.starts_with("          ") {
            out.push_str(t);
            out.push('\n');
        } else {
            in_expr = false;
        }
    }
    out
}

fn grafana_exprs(json: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(json).expect("grafana JSON parses");
    let mut out = String::new();
    for p in v["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().expect("targets") {
            out.push_str(t["expr"].as_str().expect("expr"));
            out.push('\n');
        }
    }
    out
}

/// Names declared (`# TYPE`) in Prometheus text, with a histogram's series names.
fn exported(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for l in text.lines() {
        let mut w = l.split_whitespace();
        if (w.next(), w.next()) == (Some("#"), Some("TYPE")) {
            let (name, kind) = (w.next().unwrap(), w.next().unwrap_or(""));
            out.insert(name.to_string());
            if kind == "histogram" || kind == "summary" {
                for s in ["_bucket", "_sum", "_count"] {
                    out.insert(format!("{name}{s}"));
                }
            }
        }
    }
    out
}

fn promtool() -> String {
    std::env::var("CLICKGATE_TEST_PROMTOOL").unwrap_or_else(|_| {
        panic!("CLICKGATE_TEST_PROMTOOL is not set: run the tests with scripts/test.sh (it installs promtool and sets it)")
    })
}

fn env_or_panic(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the tests with scripts/test.sh (it starts the services)")
    })
}

/// `promtool check metrics` over `text` (stdin): (success, its output).
fn check_metrics(text: &str) -> (bool, String) {
    let tool = promtool();
    let mut child = Command::new(&tool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), said)
}

/// Both planes' `/metrics` pass `promtool check metrics`, lint included.
fn assert_promtool_clean(cg: &Clickgate, what: &str) {
    let r = cg.request("POST", "/v1/click", &event(&uuid(7), 5, |_| {}));
    assert_eq!(r.status, 202, "{}", r.body);
    let q = cg.query("/metrics");
    assert_eq!(q.status, 200, "{}", q.body);
    let mut problems = String::new();
    for (plane, text) in [("dataplane", cg.metrics()), ("controlplane", q.body)] {
        assert!(text.contains("# TYPE "), "{what} {plane}: {text}");
        let (ok, said) = check_metrics(&text);
        if !ok || !said.trim().is_empty() {
            problems.push_str(&format!("{plane} (exit ok: {ok}):\n{said}\n"));
        }
    }
    assert!(
        problems.is_empty(),
        "{what}: promtool check metrics:\n{problems}"
    );
}

#[test]
fn promtool_accepts_every_process_metrics() {
    // promtool does notice bad text (the check can fail).
    let (ok, said) = check_metrics("# TYPE clickgate_x counter\nclickgate_x 1\n");
    assert!(!ok || !said.trim().is_empty(), "{said}");

    let cg = Clickgate::run(&[]);
    assert_promtool_clean(&cg, "embedded defaults");
    drop(cg);

    let kafka = env_or_panic("CLICKGATE_TEST_KAFKA");
    let redis = env_or_panic("CLICKGATE_TEST_REDIS");
    let tag = format!("{}_{}", std::process::id(), common::now_ms());
    let topic = format!("t_promtool_{tag}");
    let prefix = format!("t{tag}-promtool:");
    let cg = Clickgate::run(&[
        "--kafka-brokers",
        &kafka,
        "--kafka-topic",
        &topic,
        "--kafka-partitions",
        "1",
        "--redis-url",
        &redis,
        "--redis-key-prefix",
        &prefix,
    ]);
    let text = cg.metrics();
    assert!(text.contains("clickgate_kafka_up"), "{text}");
    assert!(cg.query("/metrics").body.contains("clickgate_redis_up"));
    assert_promtool_clean(&cg, "with Kafka and Redis");
}

#[test]
fn promtool_accepts_the_alert_rules() {
    let promtool = promtool();
    let out = Command::new(&promtool)
        .arg("check")
        .arg("rules")
        .arg(root().join("deploy/prometheus/alerts.yml"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {promtool}: {e}"));
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("SUCCESS"), "{stdout}");
}

#[test]
fn every_metric_the_alerts_and_dashboard_use_is_exported_or_agreed() {
    let readme = read("deploy/README.md");
    let agreed_block = readme
        .split("<!-- agreed-metrics:begin -->")
        .nth(1)
        .and_then(|s| s.split("<!-- agreed-metrics:end -->").next())
        .expect("deploy/README.md has the agreed-metrics list");
    let agreed = metric_names(agreed_block);
    assert!(agreed.contains("clickgate_kafka_delivery_lag_records"));
    assert!(agreed.contains("clickgate_redis_flush_lag_seconds"));
    assert!(agreed.contains("clickgate_archive_lag_records"));

    let used_alerts = metric_names(&alert_exprs(&read("deploy/prometheus/alerts.yml")));
    let used_grafana = metric_names(&grafana_exprs(&read("deploy/grafana/clickgate.json")));
    // The seed's alerts are all there.
    for m in [
        "clickgate_ingest_events_accepted_total",
        "clickgate_freshness_seconds",
        "redis_memory_used_bytes",
        "clickgate_archive_lag_records",
        "clickgate_fraud_events_total",
    ] {
        assert!(used_alerts.contains(m), "no alert uses {m}");
    }

    let cg = Clickgate::run(&[]);
    let r = cg.request("POST", "/v1/click", &event(&uuid(1), 5, |_| {}));
    assert_eq!(r.status, 202, "{}", r.body);
    let q = cg.query("/metrics");
    assert_eq!(q.status, 200, "{}", q.body);
    let mut live = exported(&cg.metrics());
    live.extend(exported(&q.body));
    // Every exported metric has help text.
    for text in [cg.metrics(), q.body.clone()] {
        for name in exported(&text)
            .iter()
            .filter(|n| text.contains(&format!("# TYPE {n} ")))
        {
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "{name} has no HELP"
            );
        }
    }
    let missing: Vec<_> = used_alerts
        .union(&used_grafana)
        .filter(|m| !live.contains(*m) && !agreed.contains(*m))
        .collect();
    assert!(
        missing.is_empty(),
        "used by alerts/dashboard but neither exported nor agreed: {missing:?}"
    );
}
