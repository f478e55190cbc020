//! `clickgate billing`, black-box: a day with known ground truth (duplicates, copies with
//! altered fields, every fraud kind of contract §6, events on hour and day boundaries,
//! late events) is ingested over HTTP, the box stops cleanly, and the day's invoice must
//! equal the truth computed here, independently, to the micro-unit; a second run gives
//! the same bytes.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
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
        let blocked = e
            .s("ip")
            .parse::<Ipv4Addr>()
            .is_ok_and(|a| a.octets()[..3] == [198, 51, 100]);
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

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn billing(data_dir: &Path, args: &[&str]) -> Out {
    let out = Command::new(BIN)
        .arg("billing")
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env_remove("CLICKGATE_CONFIG")
        .env_remove("CLICKGATE_ARCHIVE_URL")
        .env("CLICKGATE_LOG", "warn")
        .output()
        .expect("run clickgate billing");
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn date_of(ms: u64) -> String {
    let (y, m, d) = common::civil_date(ms);
    format!("{y:04}-{m:02}-{d:02}")
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

#[test]
fn a_day_is_billed_exactly_as_the_ground_truth_and_twice_the_same() {
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

    let date = date_of(day_start);
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
