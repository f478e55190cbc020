//! Fraud gate and control API black-box tests (docs/api.md, docs/fraud.md): the real binary, rules
//! pushed with the real CLI and over gRPC, verdicts read back from the local log.

mod common;

use std::collections::HashMap;
use std::io::Write as _;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clickgate_proto::control::control_client::ControlClient;
use clickgate_proto::control::{ApplyRulesRequest, ListRulesRequest};
use clickgate_proto::record;
use clickgate_proto::segment::{core_dirs, LogReader};
use common::*;
use serde_json::json;

const TOKEN: &str = "t0ken-for-tests-0001";

fn run_with_token() -> Clickgate {
    Clickgate::run(&["--control-token", TOKEN])
}

struct CliOut {
    code: i32,
    stdout: String,
    stderr: String,
}

/// `clickgate rules --url <cg> [--token T] <args>`, with no token in the environment.
fn cli(cg: &Clickgate, token: Option<&str>, args: &[&str]) -> CliOut {
    let url = format!("http://{}", cg.control.expect("control API"));
    cli_at(&url, token, args)
}

fn cli_at(url: &str, token: Option<&str>, args: &[&str]) -> CliOut {
    let mut cmd = Command::new(BIN);
    cmd.arg("rules").arg("--url").arg(url);
    if let Some(t) = token {
        cmd.arg("--token").arg(t);
    }
    let out = cmd
        .args(args)
        .env_remove("CLICKGATE_CONTROL_TOKEN")
        .env_remove("CLICKGATE_CONTROL_URL")
        .env_remove("CLICKGATE_CONFIG")
        .env("CLICKGATE_LOG", "warn")
        .output()
        .expect("run clickgate rules");
    CliOut {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn rules_file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    f.write_all(text.as_bytes()).expect("write rules");
    f
}

/// Applies `text` with the CLI and waits until every dataplane core judges with it.
fn apply(cg: &Clickgate, text: &str) -> u64 {
    let f = rules_file(text);
    let out = cli(
        cg,
        Some(TOKEN),
        &["apply", "--file", f.path().to_str().unwrap()],
    );
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let version: u64 = out
        .stdout
        .split_whitespace()
        .nth(4)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no version in {:?}", out.stdout));
    wait_rules_version(cg, version);
    version
}

/// Waits until every core reports rule-set `version` in `/metrics`.
fn wait_rules_version(cg: &Clickgate, version: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = cg.metrics();
        let versions: Vec<u64> = m
            .lines()
            .filter(|l| l.starts_with("clickgate_fraud_rules_version{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        if !versions.is_empty() && versions.iter().all(|&v| v == version) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "cores did not reach rules v{version}: {versions:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[derive(Debug, Clone)]
struct Logged {
    duplicate: bool,
    fraud: bool,
    rules: Vec<String>,
    core: usize,
    recv_ms: u64,
}

/// Every record in the local log by event id (the last one wins for duplicates' ids
/// unless it is flagged duplicate).
fn logged(cg: &Clickgate) -> HashMap<String, Logged> {
    let mut out = HashMap::new();
    for (core, dir) in core_dirs(&cg.data_dir.join("log")).expect("log dirs") {
        let mut reader = LogReader::open(&dir, 0).expect("open log");
        while let Some((_lsn, bytes)) = reader.next().expect("read log") {
            let rec = record::decode(bytes).expect("decode record");
            let l = Logged {
                duplicate: rec.flags.duplicate(),
                fraud: rec.flags.fraud(),
                rules: rec.rules.iter().map(|s| s.to_string()).collect(),
                core,
                recv_ms: rec.recv_ms,
            };
            let id = rec.click.event_id.to_string();
            if !l.duplicate || !out.contains_key(&id) {
                out.insert(id, l);
            }
        }
    }
    out
}

/// Polls the query API until the campaign's 1d bucket shows `clicks` billable clicks.
fn wait_counts(cg: &Clickgate, campaign: u64, clicks: u64, fraud: u64) {
    let from = now_ms() - 2 * 86_400_000;
    let to = now_ms() + 86_400_000;
    let path = format!("/v1/campaigns/{campaign}/metrics?window=1d&from={from}&to={to}");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = cg.query(&path);
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json();
        let sum = |k: &str| -> u64 {
            v["buckets"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b[k].as_u64().unwrap())
                .sum()
        };
        if sum("clicks") == clicks && sum("fraud_clicks") == fraud {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "campaign {campaign}: want clicks={clicks} fraud={fraud}, got {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

const ALL_KINDS: &str = r#"{"rules":[
  {"id":"blocklist","kind":"ip_block","cidrs":["198.51.100.0/24","2001:db8::/32"]},
  {"id":"bots","kind":"user_agent","patterns":["bot","crawler","HeadlessChrome"]},
  {"id":"honeypots","kind":"honeypot","ad_ids":[999001,999002]},
  {"id":"burst","kind":"ip_rate"},
  {"id":"risk","kind":"risk_model","threshold":0.5,"model":{"bias":-10.0,"weights":{"cost_units":1.0}}}
]}"#;

#[test]
fn each_rule_kind_flags_exactly_its_clicks() {
    let cg = run_with_token();
    apply(&cg, ALL_KINDS);
    let campaign = 7001;
    type Tweak = Box<dyn Fn(&mut serde_json::Value)>;
    let ip = |s: &'static str| -> Tweak { Box::new(move |v| v["ip"] = json!(s)) };
    let cases: Vec<(Tweak, &[&str])> = vec![
        (ip("198.51.100.0"), &["blocklist"]),
        (ip("198.51.100.255"), &["blocklist"]),
        (ip("198.51.99.255"), &[]),
        (ip("198.51.101.0"), &[]),
        (ip("::ffff:198.51.100.20"), &["blocklist"]),
        (ip("2001:db8::"), &["blocklist"]),
        (ip("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff"), &["blocklist"]),
        (ip("2001:db7:ffff:ffff:ffff:ffff:ffff:ffff"), &[]),
        (ip("2001:db9::"), &[]),
        (
            Box::new(|v| v["user_agent"] = json!("Googlebot/2.1")),
            &["bots"],
        ),
        (
            Box::new(|v| v["user_agent"] = json!("mozilla HEADLESSCHROME/120")),
            &["bots"],
        ),
        (
            Box::new(|v| v["user_agent"] = json!("Mozilla/5.0 (iPhone)")),
            &[],
        ),
        (Box::new(|v| v["ad_id"] = json!(999001)), &["honeypots"]),
        (Box::new(|v| v["ad_id"] = json!(999003)), &[]),
        // σ(-10 + 10) = 0.5: at the threshold is fraud; σ(-1) is not.
        (
            Box::new(|v| v["cost_micros"] = json!(10_000_000)),
            &["risk"],
        ),
        (Box::new(|v| v["cost_micros"] = json!(9_000_000)), &[]),
        (
            Box::new(|v| {
                v["ip"] = json!("198.51.100.7");
                v["ad_id"] = json!(999002);
            }),
            &["blocklist", "honeypots"],
        ),
    ];
    let mut lines = Vec::new();
    let mut want = HashMap::new();
    for (i, (tweak, rules)) in cases.iter().enumerate() {
        let id = uuid(1000 + i as u64);
        lines.push(event(&id, campaign, |v| {
            // Every clean click from its own address: the rate rule stays quiet.
            v["ip"] = json!(format!("203.0.113.{}", 10 + i));
            tweak(v);
        }));
        want.insert(id, *rules);
    }
    let r = cg.request("POST", "/v1/clicks", &lines.join("\n"));
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(
        r.json(),
        json!({"accepted": cases.len(), "duplicates": 0, "rejected": []}),
        "fraud is answered like any other click"
    );
    let log = logged(&cg);
    for (id, rules) in &want {
        let l = &log[id];
        assert_eq!(l.fraud, !rules.is_empty(), "{id} {rules:?} {l:?}");
        assert_eq!(l.rules, *rules, "{id}");
    }
    let fraud = want.values().filter(|r| !r.is_empty()).count() as u64;
    wait_counts(&cg, campaign, cases.len() as u64 - fraud, fraud);
    let m = cg.metrics();
    assert_eq!(metric_sum(&m, "clickgate_fraud_events_total"), fraud as f64);
    assert!(
        m.contains("clickgate_fraud_clicks_total{rule=\"blocklist\"} 6\n"),
        "{m}"
    );
    assert!(m.contains("clickgate_fraud_clicks_total{rule=\"honeypots\"} 2\n"));
}

#[test]
fn the_101st_click_of_an_ip_in_a_minute_is_fraud_and_retries_do_not_count() {
    let cg = run_with_token();
    apply(&cg, r#"{"rules":[{"id":"burst","kind":"ip_rate"}]}"#);
    let minute = now_ms() / 60_000 * 60_000;
    let campaign = 7002;
    // uuid() is salted with the clock: take every id once.
    let ids: Vec<String> = (0..=101).map(uuid).collect();
    let ev = |n: usize| {
        event(&ids[n], campaign, |v| {
            v["ts"] = json!(minute + n as u64);
            v["ip"] = json!("192.0.2.200");
        })
    };
    // One connection: one core, one counter.
    let mut conn = cg.connect();
    let lines: Vec<String> = (1..=100).map(ev).collect();
    let r = conn.request("POST", "/v1/clicks", &lines.join("\n"));
    assert_eq!(r.status, 202, "{}", r.body);
    // A publisher's retry of click 1 is a duplicate: it does not count toward the rate.
    let r = conn.request("POST", "/v1/click", &ev(1));
    assert_eq!(r.json()["duplicates"], 1, "{}", r.body);
    let r = conn.request("POST", "/v1/click", &ev(101));
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.json(), json!({"accepted":1,"duplicates":0,"rejected":[]}));
    let log = logged(&cg);
    for n in 1..=100 {
        assert!(!log[&ids[n]].fraud, "click {n}");
    }
    let l = &log[&ids[101]];
    assert!(l.fraud && l.rules == ["burst"], "{l:?}");
    wait_counts(&cg, campaign, 100, 1);
}

#[test]
fn a_rule_pushed_mid_traffic_applies_within_a_second_on_every_core() {
    // Loopback is trusted so that the per-address rate limit never answers 429 here.
    let cg = Clickgate::run(&["--control-token", TOKEN, "--trusted-cidrs", "127.0.0.0/8"]);
    let stop = Arc::new(AtomicBool::new(false));
    // (event id, send time ms, status) of every request.
    let sent: Arc<Mutex<Vec<(String, u64, u16)>>> = Arc::new(Mutex::new(Vec::new()));
    let mut threads = Vec::new();
    for t in 0..16u64 {
        let (addr, stop, sent) = (cg.ingest, stop.clone(), sent.clone());
        threads.push(std::thread::spawn(move || {
            let mut conn = Conn::new(addr);
            let mut n = 0u64;
            let deadline = Instant::now() + Duration::from_secs(20);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let id = uuid(t << 32 | n);
                n += 1;
                let at = now_ms();
                let r = conn.request(
                    "POST",
                    "/v1/click",
                    &event(&id, 7003, |v| v["ip"] = json!("192.0.2.77")),
                );
                sent.lock().unwrap().push((id, at, r.status));
                std::thread::sleep(Duration::from_millis(5));
            }
        }));
    }
    std::thread::sleep(Duration::from_millis(1500));
    let f = rules_file(
        r#"{"rules":[{"id":"late-block","kind":"ip_block","cidrs":["192.0.2.77/32"]}]}"#,
    );
    let out = cli(
        &cg,
        Some(TOKEN),
        &["apply", "--file", f.path().to_str().unwrap()],
    );
    let pushed_ms = now_ms();
    assert_eq!(out.code, 0, "{}", out.stderr);
    std::thread::sleep(Duration::from_millis(2500));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("traffic thread");
    }
    let sent = sent.lock().unwrap();
    assert!(
        sent.iter().all(|s| s.2 == 202),
        "every request answered 202"
    );
    let log = logged(&cg);
    let mut after_by_core: HashMap<usize, usize> = HashMap::new();
    let mut first_flag: HashMap<usize, u64> = HashMap::new();
    for (id, at, _) in sent.iter() {
        let l = &log[id];
        if l.fraud {
            let e = first_flag.entry(l.core).or_insert(l.recv_ms);
            *e = (*e).min(l.recv_ms);
        }
        if *at >= pushed_ms + 1000 {
            *after_by_core.entry(l.core).or_default() += 1;
            assert!(
                l.fraud && l.rules == ["late-block"],
                "sent {} ms after the push, not flagged: {l:?}",
                at - pushed_ms
            );
        }
    }
    assert_eq!(
        after_by_core.len(),
        2,
        "traffic on both cores: {after_by_core:?}"
    );
    for (core, ms) in &first_flag {
        eprintln!(
            "core {core}: first flagged click {} ms after the push returned",
            *ms as i64 - pushed_ms as i64
        );
    }
}

#[test]
fn wrong_missing_or_unset_tokens_are_refused() {
    let cg = run_with_token();
    let f = rules_file(ALL_KINDS);
    let file = f.path().to_str().unwrap();
    for token in [Some("wrong"), None] {
        let out = cli(&cg, token, &["apply", "--file", file]);
        assert_eq!(out.code, 3, "{token:?}: {}", out.stderr);
        assert!(out.stderr.contains("refused the token"), "{}", out.stderr);
        let out = cli(&cg, token, &["list"]);
        assert_eq!(out.code, 3, "{}", out.stderr);
    }
    let out = cli(&cg, Some(TOKEN), &["list"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("\"version\":0"), "{}", out.stdout);

    // Over gRPC directly.
    let url = format!("http://{}", cg.control.unwrap());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = ControlClient::connect(url.clone()).await.unwrap();
        let e = c.list_rules(ListRulesRequest {}).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let mut req = tonic::Request::new(ListRulesRequest {});
        req.metadata_mut()
            .insert("authorization", "Bearer nope".parse().unwrap());
        assert_eq!(
            c.list_rules(req).await.unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    });

    // No token configured: every call refused, and told how to fix it.
    let open = Clickgate::run(&[]);
    let out = cli(&open, Some("anything"), &["list"]);
    assert_eq!(out.code, 3, "{}", out.stderr);
    assert!(
        out.stderr.contains("CLICKGATE_CONTROL_TOKEN"),
        "{}",
        out.stderr
    );

    // Nobody listening.
    let out = cli_at("http://127.0.0.1:1", Some(TOKEN), &["list"]);
    assert_eq!(out.code, 4, "{}", out.stderr);
    assert!(
        out.stderr.contains("cannot reach the control API"),
        "{}",
        out.stderr
    );
}

#[test]
fn a_malformed_rule_file_is_refused_whole_and_the_running_set_stays() {
    let cg = run_with_token();
    let good = r#"{"rules":[{"id":"blocklist","kind":"ip_block","cidrs":["198.51.100.0/24"]}]}"#;
    assert_eq!(apply(&cg, good), 1);
    let bad = r#"{"rules":[
  {"id":"bots","kind":"user_agent","patterns":["bot"]},
  {"id":"broken","kind":"ip_block","cidrs":["10.0.0.0/33"]}
]}"#;
    let f = rules_file(bad);
    let out = cli(
        &cg,
        Some(TOKEN),
        &["apply", "--file", f.path().to_str().unwrap()],
    );
    assert_eq!(out.code, 2, "{}", out.stderr);
    for w in [
        "rule \"broken\"",
        "prefix length 33 exceeds 32",
        "nothing was applied",
    ] {
        assert!(out.stderr.contains(w), "{w}: {}", out.stderr);
    }
    let f = rules_file("{\"rules\":[\n  {\"id\":\"x\",\"kind\":\"ip_rate\",}\n]}");
    let out = cli(
        &cg,
        Some(TOKEN),
        &["apply", "--file", f.path().to_str().unwrap()],
    );
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("line 2, column"), "{}", out.stderr);

    // The server refuses it too (no client-side check in front).
    let url = format!("http://{}", cg.control.unwrap());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = ControlClient::connect(url).await.unwrap();
        let mut req = tonic::Request::new(ApplyRulesRequest {
            rules_json: bad.into(),
        });
        req.metadata_mut()
            .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
        let e = c.apply_rules(req).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("rule \"broken\""), "{}", e.message());
    });

    let out = cli(&cg, Some(TOKEN), &["list"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let listed: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(listed["version"], 1);
    assert_eq!(listed["rules"][0]["id"], "blocklist");
    assert_eq!(listed["rules"].as_array().unwrap().len(), 1);
    // Traffic is still judged by the old set.
    std::thread::sleep(Duration::from_millis(500));
    let id = uuid(1);
    let r = cg.request(
        "POST",
        "/v1/click",
        &event(&id, 7004, |v| v["ip"] = json!("198.51.100.9")),
    );
    assert_eq!(r.status, 202);
    let l = &logged(&cg)[&id];
    assert!(l.fraud && l.rules == ["blocklist"], "{l:?}");
}

#[test]
fn rules_survive_controlplane_and_dataplane_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut cp = Clickgate::spawn("controlplane", dir, &["--control-token", TOKEN]);
    let mut dp = Clickgate::spawn("dataplane", dir, &[]);
    let f = rules_file(r#"{"rules":[{"id":"hp","kind":"honeypot","ad_ids":[424242]}]}"#);
    let out = cli(
        &cp,
        Some(TOKEN),
        &["apply", "--file", f.path().to_str().unwrap()],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    wait_rules_version(&dp, 1);

    let flagged = |dp: &Clickgate, n: u64| {
        let id = uuid(n);
        let r = dp.request(
            "POST",
            "/v1/click",
            &event(&id, 7005, |v| v["ad_id"] = json!(424242)),
        );
        assert_eq!(r.status, 202, "{}", r.body);
        let l = &logged(dp)[&id];
        assert!(l.fraud && l.rules == ["hp"], "{l:?}");
    };
    // The controlplane dies: the dataplane keeps judging with the rules it has.
    cp.kill9();
    flagged(&dp, 1);
    // The dataplane restarts without a controlplane: it starts with the last rules.
    dp.sigterm_and_wait();
    dp.restart();
    flagged(&dp, 2);
    // The controlplane comes back with the same set, and versions go on from there.
    cp.restart();
    let out = cli(&cp, Some(TOKEN), &["list"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let listed: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(listed["version"], 1, "{listed}");
    assert_eq!(listed["rules"][0]["id"], "hp");
    let f = rules_file(r#"{"rules":[]}"#);
    let out = cli(
        &cp,
        Some(TOKEN),
        &["apply", "--file", f.path().to_str().unwrap()],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("version 2"), "{}", out.stdout);
    wait_rules_version(&dp, 2);
}

/// Cores serving the dataplane, from `/metrics`.
fn core_count(cg: &Clickgate) -> usize {
    cg.metrics()
        .lines()
        .filter(|l| l.starts_with("clickgate_log_pending_bytes{core="))
        .count()
}

/// One open connection per dataplane core: connections are opened until each core has
/// answered one (SO_REUSEPORT spreads them by port), found by where a probe event of
/// `probe_campaign` was logged. Bounded: 200 connections at most.
fn conns_on_every_core(cg: &Clickgate, probe_campaign: u64) -> Vec<Conn> {
    let cores = core_count(cg);
    assert!(cores >= 2, "these tests need at least 2 cores, got {cores}");
    let mut by_core: HashMap<usize, Conn> = HashMap::new();
    for n in 0..200u64 {
        let id = uuid(1 << 40 | n);
        let mut conn = cg.connect();
        let r = conn.request(
            "POST",
            "/v1/click",
            &event(&id, probe_campaign, |v| v["ip"] = json!("192.0.2.250")),
        );
        assert_eq!(r.status, 202, "probe: {}", r.body);
        let core = logged(cg)[&id].core;
        by_core.entry(core).or_insert(conn);
        if by_core.len() == cores {
            let mut conns: Vec<(usize, Conn)> = by_core.into_iter().collect();
            conns.sort_by_key(|c| c.0);
            return conns.into_iter().map(|c| c.1).collect();
        }
    }
    panic!("200 connections reached only cores {:?}", by_core.keys());
}

#[test]
fn ip_rate_is_the_boxs_threshold_whatever_core_receives_the_clicks() {
    const N: usize = 60;
    // Loopback trusted: the per-address rate limit stays out of this test.
    let cg = Clickgate::run(&["--control-token", TOKEN, "--trusted-cidrs", "127.0.0.0/8"]);
    apply(
        &cg,
        &format!(r#"{{"rules":[{{"id":"burst","kind":"ip_rate","max_clicks_per_minute":{N}}}]}}"#),
    );
    let campaign = 7010;
    let conns = conns_on_every_core(&cg, 7011);
    let cores = conns.len();
    // 3N clicks of one IP, all in one minute, sent at once from one thread per core.
    let minute = now_ms() / 60_000 * 60_000;
    let ids: Vec<String> = (0..3 * N as u64).map(uuid).collect();
    let threads: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(k, mut conn)| {
            let mine: Vec<(usize, String)> = ids
                .iter()
                .cloned()
                .enumerate()
                .filter(|(i, _)| i % cores == k)
                .collect();
            std::thread::spawn(move || {
                for (i, id) in mine {
                    let body = event(&id, campaign, |v| {
                        v["ts"] = json!(minute + i as u64);
                        v["ip"] = json!("192.0.2.201");
                    });
                    let r = conn.request("POST", "/v1/click", &body);
                    assert_eq!(r.status, 202, "{}", r.body);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("sender thread");
    }
    let log = logged(&cg);
    let mut flagged = 0;
    let mut on_core: HashMap<usize, usize> = HashMap::new();
    for id in &ids {
        let l = &log[id];
        *on_core.entry(l.core).or_default() += 1;
        if l.fraud {
            assert_eq!(l.rules, ["burst"], "{l:?}");
            flagged += 1;
        }
    }
    assert_eq!(
        on_core.len(),
        cores,
        "clicks reached every core: {on_core:?}"
    );
    // Exactly N pass: the count is the box's, not N per core.
    assert_eq!(flagged, 2 * N, "flagged in the raw records");
    wait_counts(&cg, campaign, N as u64, 2 * N as u64);
}

#[test]
fn the_per_address_rate_limit_is_the_boxs_whatever_core_answers() {
    const LIMIT: u64 = 100;
    let cg = Clickgate::run(&[
        "--control-token",
        TOKEN,
        "--rate-limit-events-per-sec",
        &LIMIT.to_string(),
    ]);
    let started = Instant::now();
    let conns = conns_on_every_core(&cg, 7021);
    let probes = conns.len() as u64;
    // Far over the limit, from every core at once: 3 × LIMIT per core.
    let threads: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(k, mut conn)| {
            std::thread::spawn(move || {
                let (mut ok, mut limited) = (0u64, 0u64);
                for n in 0..3 * LIMIT {
                    let id = uuid((k as u64) << 32 | n);
                    let r = conn.request("POST", "/v1/click", &event(&id, 7020, |_| {}));
                    match r.status {
                        202 => ok += 1,
                        429 => {
                            assert!(r.header("retry-after").is_some(), "429 without Retry-After");
                            limited += 1;
                        }
                        s => panic!("status {s}: {}", r.body),
                    }
                }
                (ok, limited)
            })
        })
        .collect();
    let results: Vec<(u64, u64)> = threads
        .into_iter()
        .map(|t| t.join().expect("sender thread"))
        .collect();
    let elapsed_ms = started.elapsed().as_millis() as u64;
    let accepted: u64 = probes + results.iter().map(|r| r.0).sum::<u64>();
    // One bucket for the box: its capacity plus what refilled while the test ran. Per
    // core, it would be at least cores × LIMIT.
    let bound = LIMIT + LIMIT * elapsed_ms / 1000 + 1;
    assert!(
        accepted <= bound,
        "{accepted} accepted in {elapsed_ms} ms over {probes} cores: bound {bound}"
    );
    assert!(
        accepted >= LIMIT,
        "{accepted} accepted: the bucket holds {LIMIT}"
    );
    for (k, (_, limited)) in results.iter().enumerate() {
        assert!(*limited > 0, "core {k} never answered 429: {results:?}");
    }
}
