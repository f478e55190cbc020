//! `clickgate billing`, black-box: a day with known ground truth (duplicates, copies with
//! altered fields, every fraud kind of docs/fraud.md, events on hour and day boundaries,
//! late events) is ingested over HTTP, the box stops cleanly, and the day's invoice must
//! equal the truth computed here, independently, to the micro-unit; a second run gives
//! the same bytes.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const TOKEN: &str = "billing-test-token";
const DAY_MS: u64 = 86_400_000;
const MINUTE_MS: u64 = 60_000;
const RATE_MAX: usize = 5;
const IP_CAMPAIGNS_MAX: usize = 3;

const RULES: &str = r#"{"rules":[
  {"id":"blocklist","kind":"ip_block","cidrs":["198.51.100.0/24"]},
  {"id":"bots","kind":"user_agent","patterns":["bot","crawler","HeadlessChrome"]},
  {"id":"honeypots","kind":"honeypot","ad_ids":[999001,999002]},
  {"id":"burst","kind":"ip_rate","max_clicks_per_minute":5},
  {"id":"risk","kind":"risk_model","threshold":0.5,"model":{"bias":-10.0,"weights":{"cost_units":1.0}}}
]}"#;

/// One copy of an event as sent.
#[derive(Clone, Debug)]
struct Sent {
    id: String,
    json: Value,
}

impl Sent {
    fn u(&self, f: &str) -> u64 {
        self.json[f].as_u64().unwrap()
    }
    fn s(&self, f: &str) -> &str {
        self.json[f].as_str().unwrap()
    }
}

struct Day {
    start: u64,
    n: u64,
    /// Requests in send order; copies in a later request are received later.
    rounds: Vec<Vec<Sent>>,
}

impl Day {
    fn ev(&mut self, campaign: u64, ts: u64, tweak: impl FnOnce(&mut Value)) -> Sent {
        self.n += 1;
        let id = uuid(self.n);
        let adv = campaign / 10;
        let mut v: Value = serde_json::from_str(&event(&id, campaign, |v| {
            v["ts"] = json!(ts);
            v["advertiser_id"] = json!(adv);
            v["ad_id"] = json!(campaign * 100 + self.n % 3);
            v["user_id"] = json!(format!("u-{}", self.n));
            v["ip"] = json!(format!("10.1.{}.{}", self.n / 250, self.n % 250));
            v["cost_micros"] = json!(1_000 + self.n * 7);
        }))
        .unwrap();
        tweak(&mut v);
        Sent { id, json: v }
    }
}

/// The day's events: (rounds of requests, the day's start).
fn generate(day_start: u64) -> Day {
    let mut d = Day {
        start: day_start,
        n: 0,
        rounds: vec![Vec::new(), Vec::new()],
    };
    let h = |x: u64| day_start + x * 3_600_000;
    let mut first = Vec::new();
    let mut later = Vec::new();
    // Clean clicks over every hour, on and around hour boundaries.
    for k in 0..96u64 {
        let campaign = [11, 12, 21][(k % 3) as usize];
        let ts = h(k / 4) + [0, 1_234, 3_599_999, 1_800_000][(k % 4) as usize];
        first.push(d.ev(campaign, ts, |_| {}));
    }
    // Day boundaries: first and last ms are in, the ms either side is not.
    for ts in [
        day_start,
        day_start + DAY_MS - 1,
        day_start - 1,
        day_start + DAY_MS,
    ] {
        first.push(d.ev(12, ts, |_| {}));
    }
    // Retries (same bytes) and copies with altered fields, received later: the first
    // received copy wins.
    for i in 0..10 {
        later.push(first[i].clone());
        let mut altered = first[10 + i].clone();
        altered.json["cost_micros"] = json!(999_999);
        altered.json["campaign_id"] = json!(31);
        altered.json["ts"] = json!(altered.u("ts") + 1_000);
        later.push(altered);
    }
    // A copy whose ts was moved across midnight, each way.
    let x1 = d.ev(21, day_start + DAY_MS - 500, |_| {});
    let mut c1 = x1.clone();
    c1.json["ts"] = json!(day_start + DAY_MS + 500);
    c1.json["campaign_id"] = json!(11);
    let x2 = d.ev(21, day_start + DAY_MS + 200, |_| {});
    let mut c2 = x2.clone();
    c2.json["ts"] = json!(day_start + DAY_MS - 200);
    c2.json["campaign_id"] = json!(12);
    first.extend([x1, x2]);
    later.extend([c1, c2]);
    // Every fraud kind.
    let t = h(5);
    for i in 0..3u64 {
        first.push(d.ev(31, t + i, |v| {
            v["ip"] = json!(format!("198.51.100.{}", i + 1))
        }));
        first.push(d.ev(11, t + i, |v| {
            v["ip"] = json!(format!("198.51.100.{}", i + 9))
        }));
        first.push(d.ev(31, t + i, |v| {
            v["user_agent"] = json!("Mozilla/5.0 (compatible; Googlebot/2.1)")
        }));
    }
    first.push(d.ev(12, t, |v| v["ad_id"] = json!(999001)));
    first.push(d.ev(12, t, |v| v["ad_id"] = json!(999002)));
    first.push(d.ev(21, t, |v| v["cost_micros"] = json!(10_000_000))); // σ(0) = 0.5: fraud
    first.push(d.ev(21, t, |v| v["cost_micros"] = json!(9_000_000))); // σ(-1): billable
                                                                      // Per-IP rate (5/min): 7 in a minute are all fraud in billing; exactly 5 are not;
                                                                      // 4 + 4 across a minute boundary are not; 5 plus 2 retries are not.
    let m = h(10);
    let ip = |v: &mut Value, s: &str| v["ip"] = json!(s);
    for i in 0..7 {
        first.push(d.ev(21, m + i * 1_000, |v| ip(v, "10.9.0.1")));
    }
    for i in 0..5 {
        first.push(d.ev(21, m + i * 1_000, |v| ip(v, "10.9.0.2")));
    }
    for i in 0..8 {
        first.push(d.ev(21, m + 2 * MINUTE_MS + 50_000 + i * 2_500, |v| {
            ip(v, "10.9.0.3")
        }));
    }
    for i in 0..5 {
        let e = d.ev(21, m + 4 * MINUTE_MS + i * 1_000, |v| ip(v, "10.9.0.4"));
        if i < 2 {
            later.push(e.clone());
        }
        first.push(e);
    }
    // IPv6 clicks, and an IPv4-mapped address inside the IPv4 blocklist.
    for (i, a) in ["2001:db8::7", "2001:db8::7", "2001:db8:1::9"]
        .iter()
        .enumerate()
    {
        first.push(d.ev(11, h(7) + i as u64 * 1_000, |v| ip(v, a)));
    }
    first.push(d.ev(12, h(7), |v| ip(v, "::ffff:198.51.100.77")));
    // Batch-only check: one IP on four campaigns in the day.
    for (i, c) in [11u64, 12, 21, 31].iter().enumerate() {
        first.push(d.ev(*c, h(20) + i as u64 * MINUTE_MS * 7, |v| ip(v, "10.8.0.1")));
    }
    // Late and out of order: send in a scrambled (deterministic) order.
    let n = first.len();
    for i in 0..n {
        first.swap(i, (i * 7919 + 13) % n);
    }
    d.rounds = vec![first, later];
    d
}

struct Truth {
    invoice: BTreeMap<(u64, u64), (u64, u64)>,
    adjusted: BTreeSet<String>,
}

/// The contract's semantics, computed directly from what was sent.
fn truth(d: &Day, batch_checks: bool) -> Truth {
    let in_day = |ts: u64| ts >= d.start && ts < d.start + DAY_MS;
    let mut winner: HashMap<String, Sent> = HashMap::new();
    for round in &d.rounds {
        for e in round {
            winner.entry(e.id.clone()).or_insert_with(|| e.clone());
        }
    }
    let clicks: Vec<&Sent> = winner.values().filter(|e| in_day(e.u("ts"))).collect();
    let mut per_minute: HashMap<(String, u64), usize> = HashMap::new();
    let mut campaigns: HashMap<String, BTreeSet<u64>> = HashMap::new();
    for e in &clicks {
        *per_minute
            .entry((e.s("ip").to_string(), e.u("ts") / MINUTE_MS))
            .or_default() += 1;
        campaigns
            .entry(e.s("ip").to_string())
            .or_default()
            .insert(e.u("campaign_id"));
    }
    let mut t = Truth {
        invoice: BTreeMap::new(),
        adjusted: BTreeSet::new(),
    };
    for e in clicks {
        let ua = e.s("user_agent").to_ascii_lowercase();
        let v4 = match e.s("ip").parse::<IpAddr>() {
            Ok(IpAddr::V4(a)) => Some(a),
            Ok(IpAddr::V6(a)) => a.to_ipv4_mapped(),
            Err(_) => None,
        };
        let blocked = v4.is_some_and(|a| a.octets()[..3] == [198, 51, 100]);
        let fraud = blocked
            || ["bot", "crawler", "headlesschrome"]
                .iter()
                .any(|p| ua.contains(p))
            || [999001, 999002].contains(&e.u("ad_id"))
            || e.u("cost_micros") >= 10_000_000
            || per_minute[&(e.s("ip").to_string(), e.u("ts") / MINUTE_MS)] > RATE_MAX;
        if fraud {
            continue;
        }
        if batch_checks && campaigns[e.s("ip")].len() > IP_CAMPAIGNS_MAX {
            t.adjusted.insert(e.id.clone());
            continue;
        }
        let row = t
            .invoice
            .entry((e.u("advertiser_id"), e.u("campaign_id")))
            .or_default();
        row.0 += 1;
        row.1 += e.u("cost_micros");
    }
    t
}

fn invoice_text(t: &Truth) -> String {
    let mut s = String::from("advertiser_id,campaign_id,clicks,cost_micros\n");
    for ((a, c), (n, cost)) in &t.invoice {
        s.push_str(&format!("{a},{c},{n},{cost}\n"));
    }
    s
}

fn apply_rules(cg: &Clickgate) {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), RULES).unwrap();
    let out = Command::new(BIN)
        .args(["rules", "--url"])
        .arg(format!("http://{}", cg.control.unwrap()))
        .args(["--token", TOKEN, "apply", "--file"])
        .arg(f.path())
        .env_remove("CLICKGATE_CONTROL_TOKEN")
        .env("CLICKGATE_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A box that ingested yesterday's generated day over HTTP and stopped cleanly.
fn ingested_day() -> (Clickgate, Day, String) {
    let mut cg = Clickgate::run(&[
        "--control-token",
        TOKEN,
        "--trusted-cidrs",
        "127.0.0.0/8",
        "--archive-roll-secs",
        "1",
    ]);
    apply_rules(&cg);
    let day_start = (now_ms() / DAY_MS - 1) * DAY_MS;
    let day = generate(day_start);
    for round in &day.rounds {
        for chunk in round.chunks(50) {
            let body: Vec<String> = chunk.iter().map(|e| e.json.to_string()).collect();
            let r = cg.request("POST", "/v1/clicks", &body.join("\n"));
            assert_eq!(r.status, 202, "{}", r.body);
            assert_eq!(r.json()["rejected"], json!([]), "{}", r.body);
        }
        // Later rounds are received later, whichever core takes them.
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(cg.sigterm_and_wait().success(), "clean stop");
    (cg, day, date_of(day_start))
}

#[test]
fn a_day_is_billed_exactly_as_the_ground_truth_and_twice_the_same() {
    let (cg, day, date) = ingested_day();
    let out1 = tempfile::tempdir().unwrap();
    let r = billing(
        &cg.data_dir,
        &["--day", &date, "--out", out1.path().to_str().unwrap()],
    );
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains("billable clicks"),
        "summary line: {}",
        r.stdout
    );
    let t = truth(&day, false);
    assert_eq!(t.invoice.len(), 4, "the generated day bills four campaigns");
    let invoices = std::fs::read_to_string(out1.path().join("invoices.csv")).unwrap();
    assert_eq!(invoices, invoice_text(&t));
    assert!(
        !out1.path().join("adjustments.csv").exists(),
        "batch checks are opt-in"
    );

    // Reconciliation: one row per campaign of the day, invoice columns equal the
    // invoice, real-time columns read from the stopped box's store, diff consistent.
    let rec = std::fs::read_to_string(out1.path().join("reconciliation.csv")).unwrap();
    let mut lines = rec.lines();
    assert_eq!(
        lines.next().unwrap(),
        "campaign_id,invoice_clicks,realtime_clicks,clicks_diff,clicks_diff_pct,\
         invoice_cost_micros,realtime_cost_micros,cost_diff_micros,cost_diff_pct"
    );
    let mut seen = BTreeSet::new();
    for l in lines {
        let f: Vec<&str> = l.split(',').collect();
        assert_eq!(f.len(), 9, "{l}");
        let camp: u64 = f[0].parse().unwrap();
        seen.insert(camp);
        let (clicks, cost) = t
            .invoice
            .iter()
            .filter(|((_, c), _)| *c == camp)
            .fold((0, 0), |a, (_, v)| (a.0 + v.0, a.1 + v.1));
        assert_eq!(f[1].parse::<u64>().unwrap(), clicks, "{l}");
        assert_eq!(f[5].parse::<u64>().unwrap(), cost, "{l}");
        for (inv, rt, diff) in [(1, 2, 3), (5, 6, 7)] {
            let (inv, rt): (i64, i64) = (f[inv].parse().unwrap(), f[rt].parse().unwrap());
            assert_eq!(f[diff].parse::<i64>().unwrap(), rt - inv, "{l}");
        }
    }
    assert_eq!(seen, BTreeSet::from([11, 12, 21, 31]));

    // Deterministic: a second run writes the same bytes.
    let out2 = tempfile::tempdir().unwrap();
    let r = billing(
        &cg.data_dir,
        &["--day", &date, "--out", out2.path().to_str().unwrap()],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    for f in ["invoices.csv", "reconciliation.csv"] {
        assert_eq!(
            std::fs::read(out1.path().join(f)).unwrap(),
            std::fs::read(out2.path().join(f)).unwrap(),
            "{f}"
        );
    }

    // Spilled sorted runs (a handful of rows each, any thread count) give the same bytes
    // as the in-memory plan.
    for (run_rows, threads) in [("1", "1"), ("7", "3"), ("50", "2")] {
        let out = tempfile::tempdir().unwrap();
        let r = billing(
            &cg.data_dir,
            &[
                "--day",
                &date,
                "--out",
                out.path().to_str().unwrap(),
                "--run-rows",
                run_rows,
                "--threads",
                threads,
            ],
        );
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert!(r.stdout.contains("sorted runs spilled"), "{}", r.stdout);
        for f in ["invoices.csv", "reconciliation.csv"] {
            assert_eq!(
                std::fs::read(out1.path().join(f)).unwrap(),
                std::fs::read(out.path().join(f)).unwrap(),
                "{f} with --run-rows {run_rows} --threads {threads}"
            );
        }
        assert!(!out.path().join(".billing-spill").exists(), "spill removed");
    }

    // Batch-only checks: the IP on four campaigns loses its billable clicks, each listed.
    let out3 = tempfile::tempdir().unwrap();
    let r = billing(
        &cg.data_dir,
        &[
            "--day",
            &date,
            "--out",
            out3.path().to_str().unwrap(),
            "--batch-checks",
            "--ip-campaigns-max",
            &IP_CAMPAIGNS_MAX.to_string(),
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let t = truth(&day, true);
    assert_eq!(t.adjusted.len(), 4);
    assert_eq!(
        std::fs::read_to_string(out3.path().join("invoices.csv")).unwrap(),
        invoice_text(&t)
    );
    let adj = std::fs::read_to_string(out3.path().join("adjustments.csv")).unwrap();
    let listed: BTreeSet<String> = adj
        .lines()
        .skip(1)
        .map(|l| {
            assert!(l.contains("ip_many_campaigns"), "{l}");
            l.split(',').next().unwrap().to_string()
        })
        .collect();
    assert_eq!(listed, t.adjusted);

    // The rules can come from a file instead of the box: no rules, no fraud.
    let none = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(none.path(), r#"{"rules":[]}"#).unwrap();
    let out4 = tempfile::tempdir().unwrap();
    let r = billing(
        &cg.data_dir,
        &[
            "--day",
            &date,
            "--out",
            out4.path().to_str().unwrap(),
            "--rules",
            none.path().to_str().unwrap(),
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let inv4 = std::fs::read_to_string(out4.path().join("invoices.csv")).unwrap();
    assert_ne!(inv4, invoices, "without rules the fraud clicks are billed");
    assert!(
        inv4.contains("\n3,31,"),
        "campaign 31 only had fraud: {inv4}"
    );
}

#[test]
fn bad_arguments_exit_2_naming_the_argument() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("archive")).unwrap();
    let out = tmp.path().join("out");
    let out = out.to_str().unwrap();
    for (args, names) in [
        (vec!["--day", "2026-02-30", "--out", out], "--day"),
        (vec!["--day", "yesterday", "--out", out], "--day"),
        (
            vec![
                "--day",
                "2026-02-03",
                "--out",
                out,
                "--rules",
                "/nonexistent/rules.json",
            ],
            "--rules",
        ),
        (
            vec![
                "--day",
                "2026-02-03",
                "--out",
                out,
                "--archive-url",
                "s3://bucket/p",
            ],
            "s3://",
        ),
        (
            vec![
                "--day",
                "2026-02-03",
                "--out",
                out,
                "--archive-url",
                "/nonexistent/dir",
            ],
            "--archive-url",
        ),
        (vec!["--out", out], "--day"),
    ] {
        let r = billing(tmp.path(), &args);
        assert_eq!(r.code, 2, "{args:?}: {}{}", r.stdout, r.stderr);
        assert!(r.stderr.contains(names), "{args:?}: {}", r.stderr);
    }
    // A bad rules file names the rule and the problem.
    let bad = tmp.path().join("bad.json");
    std::fs::write(
        &bad,
        r#"{"rules":[{"id":"x","kind":"ip_rate","max_clicks_per_minute":0}]}"#,
    )
    .unwrap();
    let r = billing(
        tmp.path(),
        &[
            "--day",
            "2026-02-03",
            "--out",
            out,
            "--rules",
            bad.to_str().unwrap(),
        ],
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("\"x\"") || r.stderr.contains(" x"),
        "{}",
        r.stderr
    );
    // An empty archive day is billed as an empty invoice.
    let r = billing(tmp.path(), &["--day", "2026-02-03", "--out", out]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        std::fs::read_to_string(Path::new(out).join("invoices.csv")).unwrap(),
        "advertiser_id,campaign_id,clicks,cost_micros\n"
    );
}

/// Every rule kind, the model reading most features (the exact per-minute count, IPv6,
/// a geo table, the user agent) so the two engines' arithmetic is compared on them.
const RICH_RULES: &str = r#"{"rules":[
  {"id":"blocklist","kind":"ip_block","cidrs":["198.51.100.0/24","2001:db8:1::/48"]},
  {"id":"bots","kind":"user_agent","patterns":["bot","crawler","HeadlessChrome"]},
  {"id":"honeypots","kind":"honeypot","ad_ids":[999001,999002]},
  {"id":"burst","kind":"ip_rate","max_clicks_per_minute":5},
  {"id":"risk","kind":"risk_model","threshold":0.5,"model":{"bias":-10.0,
    "weights":{"cost_units":1.0,"ip_rate":0.25,"ip_v6":2.0,"ua_short":0.5,"hour_night":0.125,
      "country_mismatch":0.5,"device_ctv":0.0625,"ua_bot":0.75,"ua_device_mismatch":0.3,
      "ua_empty":0.1,"device_other":0.2},
    "geo":{"DE":["10.1.0.0/24"]}}}
]}"#;

/// The Python with pyspark (scripts/services.sh installs it), and a Java runtime.
fn pyspark() -> String {
    let py = std::env::var("CLICKGATE_TEST_PYSPARK").unwrap_or_else(|_| {
        panic!(
            "CLICKGATE_TEST_PYSPARK is not set: the Spark billing test needs a Python with \
             pyspark (scripts/services.sh installs one) and a Java runtime"
        )
    });
    let ok = Command::new(&py)
        .args(["-c", "import pyspark"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "CLICKGATE_TEST_PYSPARK={py} cannot import pyspark");
    let java = Command::new("java").arg("-version").output();
    assert!(
        java.is_ok_and(|o| o.status.success()),
        "no Java runtime on PATH: the Spark billing test needs one (scripts/services.sh installs it)"
    );
    py
}

/// Runs the Spark job in local mode, bounded by `SPARK_TIMEOUT`.
fn spark_billing(py: &str, archive: &Path, date: &str, rules: &Path, out: &Path, extra: &[&str]) {
    const SPARK_TIMEOUT: Duration = Duration::from_secs(300);
    let job = Path::new(env!("CARGO_MANIFEST_DIR")).join("spark/billing.py");
    let log = out.with_extension("log");
    let mut child = Command::new(py)
        .arg(job)
        .args([
            "--master",
            "local[2]",
            "--shuffle-partitions",
            "4",
            "--archive",
        ])
        .arg(archive)
        .args(["--day", date, "--rules"])
        .arg(rules)
        .arg("--out")
        .arg(out)
        .args(extra)
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
        .spawn()
        .expect("start the Spark job");
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > SPARK_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the Spark job ran longer than {SPARK_TIMEOUT:?}: {}",
                std::fs::read_to_string(log.with_extension("err")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        status.success(),
        "Spark job failed: {}{}",
        std::fs::read_to_string(&log).unwrap_or_default(),
        std::fs::read_to_string(log.with_extension("err")).unwrap_or_default()
    );
}

#[test]
fn the_spark_job_bills_the_same_bytes_as_clickgate_billing() {
    let py = pyspark();
    let (cg, _day, date) = ingested_day();
    let archive = cg.data_dir.join("archive");
    let tmp = tempfile::tempdir().unwrap();
    let rules = tmp.path().join("rules.json");
    std::fs::write(&rules, RICH_RULES).unwrap();
    let rules_arg = rules.to_str().unwrap();

    // Plain, then with the batch check.
    for (name, extra) in [
        ("plain", vec![]),
        ("batch", vec!["--batch-checks", "--ip-campaigns-max", "3"]),
    ] {
        let ours = tmp.path().join(format!("{name}-clickgate"));
        let mut args = vec![
            "--day",
            &date,
            "--out",
            ours.to_str().unwrap(),
            "--rules",
            rules_arg,
        ];
        args.extend(extra.iter().copied());
        let r = billing(&cg.data_dir, &args);
        assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
        assert!(!r.stdout.contains(" 0 fraud"), "rules fired: {}", r.stdout);
        let theirs = tmp.path().join(format!("{name}-spark"));
        spark_billing(&py, &archive, &date, &rules, &theirs, &extra);
        let a = std::fs::read_to_string(ours.join("invoices.csv")).unwrap();
        let b = std::fs::read_to_string(theirs.join("invoices.csv")).unwrap();
        assert_eq!(a, b, "{name}: Spark's invoices differ from clickgate's");
        assert!(a.lines().count() > 3, "{name}: a real invoice: {a}");
        if name == "batch" {
            let lines = |p: &Path| -> BTreeSet<String> {
                std::fs::read_to_string(p.join("adjustments.csv"))
                    .unwrap()
                    .lines()
                    .map(str::to_string)
                    .collect()
            };
            let (x, y) = (lines(&ours), lines(&theirs));
            assert_eq!(x.len(), 5, "header and the four clicks of 10.8.0.1: {x:?}");
            assert_eq!(x, y, "the same adjustments, line for line");
        }

        // Reconciliation across engines: identical here, and a changed row is named.
        let cmp = tmp.path().join(format!("{name}-compare"));
        let mut args2 = args.clone();
        let cmp_s = cmp.to_str().unwrap().to_string();
        args2[3] = &cmp_s;
        let spark_inv = theirs.join("invoices.csv");
        let spark_inv_s = spark_inv.to_str().unwrap().to_string();
        args2.extend(["--compare-invoices", &spark_inv_s]);
        let r = billing(&cg.data_dir, &args2);
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert!(r.stdout.contains("0 invoice rows differ"), "{}", r.stdout);
        let engines = std::fs::read_to_string(cmp.join("engines.csv")).unwrap();
        assert_eq!(engines.lines().count(), a.lines().count());
        assert!(
            engines.lines().skip(1).all(|l| l.ends_with(",same")),
            "{engines}"
        );
    }

    // A changed figure in the other engine's invoice is reported, row by row.
    let ours = std::fs::read_to_string(tmp.path().join("plain-clickgate/invoices.csv")).unwrap();
    let second = ours.lines().nth(1).unwrap().to_string();
    let f: Vec<&str> = second.split(',').collect();
    let changed = format!(
        "{},{},{},{}",
        f[0],
        f[1],
        f[2].parse::<u64>().unwrap() + 1,
        f[3]
    );
    let bad = tmp.path().join("bad-invoices.csv");
    std::fs::write(&bad, ours.replacen(&second, &changed, 1)).unwrap();
    let out = tmp.path().join("bad-compare");
    let r = billing(
        &cg.data_dir,
        &[
            "--day",
            &date,
            "--out",
            out.to_str().unwrap(),
            "--rules",
            rules_arg,
            "--compare-invoices",
            bad.to_str().unwrap(),
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("1 invoice rows differ"), "{}", r.stdout);
    let engines = std::fs::read_to_string(out.join("engines.csv")).unwrap();
    let row = format!(
        "{},{},{},{},1,",
        f[0],
        f[1],
        f[2],
        changed.split(',').nth(2).unwrap()
    );
    assert!(
        engines
            .lines()
            .any(|l| l.starts_with(&row) && l.ends_with(",differs")),
        "{engines}"
    );
    // A malformed one is refused, naming the flag.
    std::fs::write(
        &bad,
        "advertiser_id,campaign_id,clicks,cost_micros\n1,2,x,4\n",
    )
    .unwrap();
    let r = billing(
        &cg.data_dir,
        &[
            "--day",
            &date,
            "--out",
            out.to_str().unwrap(),
            "--compare-invoices",
            bad.to_str().unwrap(),
        ],
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("--compare-invoices"), "{}", r.stderr);
}
