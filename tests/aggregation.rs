//! Real-time aggregation black-box tests (docs/api.md): clicks posted over HTTP must come
//! back from the query API exactly (clicks, cost) or within 2% (unique users), in aligned
//! ascending buckets, filtered, ranked, and across a controlplane `kill -9`.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const M5: u64 = 5 * 60_000;
const H1: u64 = 3_600_000;
const D1: u64 = 86_400_000;
/// Longest a click may take to show in the query API before the test fails (contract: 5 s).
const VISIBLE_WITHIN: Duration = Duration::from_secs(15);
/// These tests post faster than the per-address limit: loopback is a trusted publisher.
const TRUSTED: [&str; 2] = ["--trusted-cidrs", "127.0.0.0/8"];

#[derive(Clone)]
struct Ev {
    id: String,
    ts: u64,
    campaign: u64,
    ad: u64,
    publisher: u64,
    user: String,
    country: &'static str,
    device: &'static str,
    cost: u64,
}

impl Ev {
    fn json(&self) -> String {
        event(&self.id, self.campaign, |v| {
            v["ts"] = json!(self.ts);
            v["ad_id"] = json!(self.ad);
            v["publisher_id"] = json!(self.publisher);
            v["user_id"] = json!(self.user);
            v["country"] = json!(self.country);
            v["device"] = json!(self.device);
            v["cost_micros"] = json!(self.cost);
        })
    }
}

/// A deterministic data set spread over the last three hours (so every event is "late"
/// relative to its arrival but well inside retention).
fn data_set(n: u64) -> Vec<Ev> {
    let countries = ["US", "DE", "FR", "JP"];
    let devices = ["mobile", "desktop", "tablet", "ctv", "other"];
    let now = now_ms();
    let start = now - 3 * H1;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..n)
        .map(|i| {
            let campaign = 1 + next() % 5;
            Ev {
                id: uuid(i),
                ts: start + next() % (3 * H1 - 60_000),
                campaign,
                ad: campaign * 100 + next() % 3,
                publisher: 1 + next() % 4,
                user: format!("u-{}", next() % 300),
                country: countries[(next() % 4) as usize],
                device: devices[(next() % 5) as usize],
                cost: 1 + next() % 1_000_000,
            }
        })
        .collect()
}

#[derive(Default, Debug)]
struct Cell {
    clicks: u64,
    cost: u64,
    users: HashSet<String>,
}

/// The reference model: bucket start → counts, for the events `keep` selects.
fn expected(
    evs: &[Ev],
    campaign: u64,
    len: u64,
    keep: impl Fn(&Ev) -> bool,
) -> BTreeMap<u64, Cell> {
    let mut m: BTreeMap<u64, Cell> = BTreeMap::new();
    for e in evs.iter().filter(|e| e.campaign == campaign && keep(e)) {
        let c = m.entry(e.ts - e.ts % len).or_default();
        c.clicks += 1;
        c.cost += e.cost;
        c.users.insert(e.user.clone());
    }
    m
}

fn window_len(w: &str) -> u64 {
    match w {
        "5m" => M5,
        "1h" => H1,
        "1d" => D1,
        _ => unreachable!(),
    }
}

/// Compares one query answer with the model; Err says what differs.
fn compare(got: &Value, want: &BTreeMap<u64, Cell>, len: u64) -> Result<(), String> {
    let buckets = got["buckets"].as_array().ok_or("no buckets array")?;
    let starts: Vec<u64> = buckets
        .iter()
        .map(|b| b["start"].as_u64().unwrap())
        .collect();
    let want_starts: Vec<u64> = want.keys().copied().collect();
    if starts != want_starts {
        return Err(format!("bucket starts {starts:?} != {want_starts:?}"));
    }
    for (b, (start, cell)) in buckets.iter().zip(want) {
        assert_eq!(start % len, 0, "bucket {start} not aligned to {len}");
        let (clicks, cost) = (
            b["clicks"].as_u64().unwrap(),
            b["cost_micros"].as_u64().unwrap(),
        );
        if (clicks, cost) != (cell.clicks, cell.cost) {
            return Err(format!(
                "bucket {start}: clicks/cost {clicks}/{cost} != {}/{}",
                cell.clicks, cell.cost
            ));
        }
        if b["fraud_clicks"] != 0 {
            return Err(format!(
                "bucket {start}: fraud_clicks {}",
                b["fraud_clicks"]
            ));
        }
        let users = b["unique_users"].as_u64().unwrap() as f64;
        let truth = cell.users.len() as f64;
        if (users - truth).abs() > truth * 0.02 + 1.0 {
            return Err(format!(
                "bucket {start}: unique_users {users} vs {truth} (> 2%)"
            ));
        }
    }
    Ok(())
}

/// Retries `check` until it passes or VISIBLE_WITHIN runs out (then fails with its error).
fn eventually(what: &str, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + VISIBLE_WITHIN;
    loop {
        match check() {
            Ok(()) => return,
            Err(e) if Instant::now() > deadline => panic!("{what}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Posts every event in batches of 50 over `conns` connections (spread over both cores).
fn post_all(cg: &Clickgate, evs: &[Ev], conns: usize) -> (u64, u64) {
    let mut pool: Vec<Conn> = (0..conns).map(|_| cg.connect()).collect();
    let (mut accepted, mut dups) = (0, 0);
    for (i, chunk) in evs.chunks(50).enumerate() {
        let body: Vec<String> = chunk.iter().map(Ev::json).collect();
        let r = pool[i % conns].request("POST", "/v1/clicks", &body.join("\n"));
        assert_eq!(r.status, 202, "{}", r.body);
        accepted += r.json()["accepted"].as_u64().unwrap();
        dups += r.json()["duplicates"].as_u64().unwrap();
    }
    (accepted, dups)
}

fn metrics_url(campaign: u64, window: &str, filter: &str) -> String {
    let to = now_ms() + 1;
    let from = to - 2 * D1;
    format!("/v1/campaigns/{campaign}/metrics?window={window}&from={from}&to={to}{filter}")
}

#[test]
fn query_api_answers_exact_counts_per_window_and_filter() {
    let cg = Clickgate::run(&TRUSTED);
    let evs = data_set(2000);
    let (accepted, dups) = post_all(&cg, &evs, 12);
    assert_eq!((accepted, dups), (2000, 0));
    // Publisher retries, some with altered fields: never counted again.
    let retries: Vec<Ev> = evs
        .iter()
        .step_by(10)
        .map(|e| Ev {
            cost: 7,
            ..e.clone()
        })
        .collect();
    let (accepted, dups) = post_all(&cg, &retries, 5);
    assert_eq!((accepted, dups), (0, retries.len() as u64));

    for campaign in 1..=5 {
        for window in ["5m", "1h", "1d"] {
            let len = window_len(window);
            let want = expected(&evs, campaign, len, |_| true);
            eventually(&format!("campaign {campaign} window {window}"), || {
                let r = cg.query(&metrics_url(campaign, window, ""));
                if r.status != 200 {
                    return Err(format!("status {}: {}", r.status, r.body));
                }
                let v = r.json();
                assert_eq!(v["campaign_id"], campaign);
                assert_eq!(v["window"], window);
                compare(&v, &want, len)
            });
        }
    }
    // Every dimension filter, on one campaign, per window.
    let campaign = 3;
    type Keep = Box<dyn Fn(&Ev) -> bool>;
    let filters: Vec<(String, Keep)> = vec![
        ("&country=DE".into(), Box::new(|e: &Ev| e.country == "DE")),
        (
            "&device=tablet".into(),
            Box::new(|e: &Ev| e.device == "tablet"),
        ),
        ("&ad_id=301".into(), Box::new(|e: &Ev| e.ad == 301)),
        (
            "&publisher_id=2".into(),
            Box::new(|e: &Ev| e.publisher == 2),
        ),
    ];
    for (filter, keep) in &filters {
        for window in ["5m", "1h"] {
            let len = window_len(window);
            let want = expected(&evs, campaign, len, keep);
            eventually(&format!("filter {filter} window {window}"), || {
                compare(
                    &cg.query(&metrics_url(campaign, window, filter)).json(),
                    &want,
                    len,
                )
            });
        }
    }
    // A campaign with no clicks: an empty list, not an error.
    let r = cg.query(&metrics_url(999, "1h", ""));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["buckets"], json!([]));
}

#[test]
fn top_ads_are_ranked_by_billable_clicks() {
    let cg = Clickgate::run(&TRUSTED);
    let evs = data_set(1500);
    post_all(&cg, &evs, 8);
    // The hour holding the most events.
    let at = evs[0].ts;
    let hour = at - at % H1;
    let mut counts: BTreeMap<(u64, u64), u64> = BTreeMap::new();
    for e in evs.iter().filter(|e| e.ts - e.ts % H1 == hour) {
        *counts.entry((e.ad, e.campaign)).or_default() += 1;
    }
    let mut ranked: Vec<((u64, u64), u64)> = counts.into_iter().collect();
    ranked.sort_by(|a, b| {
        b.1.cmp(&a.1)
            .then(a.0 .1.cmp(&b.0 .1))
            .then(a.0 .0.cmp(&b.0 .0))
    });
    let want: Vec<Value> = ranked
        .iter()
        .take(4)
        .map(|((ad, campaign), clicks)| json!({"ad_id": ad, "campaign_id": campaign, "clicks": clicks}))
        .collect();
    eventually("top 4 ads", || {
        let r = cg.query(&format!("/v1/top?window=1h&n=4&at={at}"));
        if r.status != 200 {
            return Err(format!("status {}: {}", r.status, r.body));
        }
        let v = r.json();
        assert_eq!(v["window"], "1h");
        assert_eq!(v["start"], hour);
        if v["ads"] != json!(want) {
            return Err(format!("{} != {}", v["ads"], json!(want)));
        }
        Ok(())
    });
}

#[test]
fn bad_queries_are_400_with_a_reason() {
    let cg = Clickgate::run(&TRUSTED);
    let now = now_ms();
    let cases = [
        format!("/v1/campaigns/1/metrics?window=2m&from=0&to={now}"),
        format!("/v1/campaigns/x/metrics?window=5m&from=0&to={now}"),
        format!("/v1/campaigns/1/metrics?window=5m&from={now}&to=0"),
        "/v1/campaigns/1/metrics?window=5m&from=yesterday&to=now".to_string(),
        format!(
            "/v1/campaigns/1/metrics?window=1h&from={}&to={now}&country=usa",
            now - H1
        ),
        format!(
            "/v1/campaigns/1/metrics?window=1h&from={}&to={now}&device=phone",
            now - H1
        ),
        format!(
            "/v1/campaigns/1/metrics?window=1h&from={}&to={now}&ad_id=-1",
            now - H1
        ),
        format!(
            "/v1/campaigns/1/metrics?window=1h&from={}&to={now}&country=US&device=ctv",
            now - H1
        ),
        "/v1/top?window=5m&n=0".to_string(),
        "/v1/top?window=7d&n=3".to_string(),
    ];
    for path in cases {
        let r = cg.query(&path);
        assert_eq!(r.status, 400, "{path}: {}", r.body);
        assert!(
            !r.json()["error"].as_str().unwrap_or("").is_empty(),
            "{path}: {}",
            r.body
        );
    }
    // RFC 3339 bounds are accepted.
    let r = cg.query(
        "/v1/campaigns/1/metrics?window=1d&from=2026-01-01T00:00:00Z&to=2026-01-03T00:00:00Z",
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let m = cg.query("/metrics");
    assert_eq!(m.status, 200);
    assert!(m.body.contains("# TYPE"), "{}", m.body);
}

fn total_clicks(cg: &Clickgate, campaigns: std::ops::RangeInclusive<u64>) -> Result<u64, String> {
    let mut sum = 0;
    for c in campaigns {
        let r = cg.query(&metrics_url(c, "1d", ""));
        if r.status != 200 {
            return Err(format!("status {}", r.status));
        }
        sum += r.json()["buckets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["clicks"].as_u64().unwrap())
            .sum::<u64>();
    }
    Ok(sum)
}

/// Two processes; the controlplane is `kill -9`ed mid-traffic and restarted: the
/// dataplane keeps its unacknowledged deltas and resends them, the store applies each
/// once, and the final counts are exact.
#[test]
fn controlplane_kill9_mid_traffic_loses_and_doubles_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = Clickgate::spawn("controlplane", dir.path(), &[]);
    let dp = Clickgate::spawn(
        "dataplane",
        dir.path(),
        &["--agg-flush-interval-ms", "100", TRUSTED[0], TRUSTED[1]],
    );
    let evs = data_set(3000);
    let sender = {
        let evs = evs.clone();
        let addr = dp.ingest;
        std::thread::spawn(move || {
            let mut conns: Vec<Conn> = (0..6).map(|_| Conn::new(addr)).collect();
            let mut accepted = 0;
            for (i, chunk) in evs.chunks(50).enumerate() {
                let body: Vec<String> = chunk.iter().map(Ev::json).collect();
                let r = conns[i % 6].request("POST", "/v1/clicks", &body.join("\n"));
                assert_eq!(r.status, 202, "ingest must not stop: {}", r.body);
                accepted += r.json()["accepted"].as_u64().unwrap();
                std::thread::sleep(Duration::from_millis(60));
            }
            accepted
        })
    };
    std::thread::sleep(Duration::from_millis(1200));
    cp.kill9();
    std::thread::sleep(Duration::from_millis(800));
    cp.restart();
    let accepted = sender.join().unwrap();
    assert_eq!(accepted, 3000);
    eventually("exact totals after the controlplane restart", || {
        let got = total_clicks(&cp, 1..=5)?;
        if got != accepted {
            return Err(format!("{got} clicks counted, {accepted} accepted"));
        }
        Ok(())
    });
    // And per bucket, exactly.
    for campaign in 1..=5 {
        let want = expected(&evs, campaign, M5, |_| true);
        compare(
            &cp.query(&metrics_url(campaign, "5m", "")).json(),
            &want,
            M5,
        )
        .unwrap();
    }
}

/// The embedded store survives a clean restart of `clickgate run`.
#[test]
fn counts_survive_a_restart() {
    let mut cg = Clickgate::run(&TRUSTED);
    let evs = data_set(500);
    post_all(&cg, &evs, 4);
    eventually("visible before restart", || {
        let got = total_clicks(&cg, 1..=5)?;
        (got == 500).then_some(()).ok_or(format!("{got}"))
    });
    assert!(cg.sigterm_and_wait().success());
    cg.restart();
    assert_eq!(total_clicks(&cg, 1..=5).unwrap(), 500);
    for campaign in 1..=5 {
        let want = expected(&evs, campaign, H1, |_| true);
        compare(
            &cg.query(&metrics_url(campaign, "1h", "")).json(),
            &want,
            H1,
        )
        .unwrap();
    }
}

/// Every non-duplicate record in the local log, across cores.
fn logged_clicks(dir: &std::path::Path) -> u64 {
    use clickgate_proto::record;
    use clickgate_proto::segment::{core_dirs, LogReader};
    let mut n = 0;
    for (_core, d) in core_dirs(&dir.join("log")).expect("log dirs") {
        let mut reader = LogReader::open(&d, 0).expect("open log");
        while let Some((_lsn, bytes)) = reader.next().expect("read log") {
            if !record::decode(bytes).expect("record").flags.duplicate() {
                n += 1;
            }
        }
    }
    n
}

/// `kill -9` of the dataplane (ack=disk) mid-traffic: the counts its cores never shipped
/// are refilled from the local log when it comes back, so the real-time counters equal
/// exactly what the log holds (a superset of everything answered 202).
#[test]
fn dataplane_kill9_counts_are_refilled_from_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let cp = Clickgate::spawn("controlplane", dir.path(), &[]);
    let mut dp = Clickgate::spawn(
        "dataplane",
        dir.path(),
        &[
            "--ack",
            "disk",
            "--agg-flush-interval-ms",
            "1000",
            TRUSTED[0],
            TRUSTED[1],
        ],
    );
    let evs = data_set(4000);
    let sender = {
        let evs = evs[..3000].to_vec();
        let addr = dp.ingest;
        std::thread::spawn(move || {
            let mut conns: Vec<Conn> = (0..4).map(|_| Conn::new(addr)).collect();
            let mut acked = 0u64;
            for (i, chunk) in evs.chunks(20).enumerate() {
                let body: Vec<String> = chunk.iter().map(Ev::json).collect();
                let c = &mut conns[i % 4];
                // The kill cuts connections: stop at the first failure.
                if c.stream
                    .write_all_checked(&Conn::request_bytes("POST", "/v1/clicks", &body.join("\n")))
                    .is_err()
                {
                    break;
                }
                match c.try_read_response() {
                    Some(r) if r.status == 202 => acked += r.json()["accepted"].as_u64().unwrap(),
                    _ => break,
                }
                std::thread::sleep(Duration::from_millis(15));
            }
            acked
        })
    };
    std::thread::sleep(Duration::from_millis(1500));
    dp.kill9();
    let acked = sender.join().unwrap();
    assert!(acked > 0, "nothing was accepted before the kill");
    dp.restart();
    // The new run's first delta carries its start position: that triggers the refill.
    let (more, _) = post_all(&dp, &evs[3000..], 2);
    assert_eq!(more, 1000);
    let in_log = logged_clicks(dir.path());
    assert!(
        in_log >= acked + 1000,
        "log holds {in_log}, {acked}+1000 were acknowledged"
    );
    eventually("counts equal the log after the dataplane crash", || {
        let got = total_clicks(&cp, 1..=5)?;
        (got == in_log)
            .then_some(())
            .ok_or(format!("{got} counted, {in_log} in the log"))
    });
    let m = cp.query("/metrics").body;
    assert!(
        metric_sum(&m, "clickgate_refills_total") >= 1.0,
        "no refill happened:\n{m}"
    );
    assert_eq!(metric_sum(&m, "clickgate_refill_failures_total"), 0.0);
}
