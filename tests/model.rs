//! `clickgate billing --model`, against XGBoost itself: a labelled day is generated and
//! written as a Parquet archive, its feature vectors computed here independently from
//! what was generated (docs/model.md's table), a model trained on them by the xgboost
//! Python package; then another day is billed with that model and every score, every
//! removed click and the invoice must equal what xgboost and the contract's semantics
//! give, and a second run (other thread count, spilled plan) the same bytes. Also:
//! malformed and mismatched models are refused before billing starts, writing nothing.
//!
//! Needs `CLICKGATE_TEST_XGBOOST`: a Python with xgboost and numpy (scripts/services.sh
//! installs one). The test fails when it is missing, never skips.

mod common;

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::Path;
use std::process::Command;

use clickgate_controlplane::archive::writer::PartFile;
use clickgate_controlplane::archive::{file_name, hour_start, partition_path};
use clickgate_core::{Click, Device, EventId};
use clickgate_proto::record::{Flags, RawRecord};
use common::{billing, date_of};

const DAY_MS: u64 = 86_400_000;
const MINUTE_MS: u64 = 60_000;
const FEATURES: usize = 12;
const RULES: &str =
    r#"{"rules":[{"id":"crawler","kind":"user_agent","patterns":["evilcrawler"]}]}"#;

/// User agents: (text, contains a bot token, contains a mobile token) — by hand.
const UAS: [(&str, bool, bool); 10] = [
    (
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15",
        false,
        true,
    ),
    (
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/120.0",
        false,
        false,
    ),
    (
        "Mozilla/5.0 (Linux; Android 14; Pixel 8) Mobile Safari/537.36",
        false,
        true,
    ),
    ("Mozilla/5.0 (iPad; CPU OS 17_0 like Mac OS X)", false, true),
    ("python-requests/2.31", true, false),
    ("Mozilla/5.0 (compatible; Googlebot/2.1)", true, false),
    ("", false, false),
    ("curl/8.4", true, false),
    ("Mozilla/5.0 EvilCrawler/1.0", true, false),
    ("Roku/DVP-12.0", false, false),
];
/// The index in [`UAS`] of the one the rules remove.
const UA_RULE: usize = 8;

/// One archived row.
#[derive(Clone, Debug)]
struct Ev {
    id: [u8; 16],
    ts: u64,
    recv: u64,
    campaign: u64,
    ad: u64,
    adv: u64,
    ip: IpAddr,
    ua: usize,
    country: [u8; 2],
    device: Device,
    cost: u64,
}

impl Ev {
    fn id_text(&self) -> String {
        let mut t = [0u8; 36];
        EventId(self.id).write_text(&mut t);
        String::from_utf8(t.to_vec()).unwrap()
    }
}

/// splitmix64: the test's own generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A generated day: rows (copies included, some outside the day) in archive order.
fn generate(day_start: u64, seed: u64, scale: u64) -> Vec<Ev> {
    let mut r = Rng(seed);
    let mut n = 0u64;
    let mut out: Vec<Ev> = Vec::new();
    let devices = [
        Device::Mobile,
        Device::Desktop,
        Device::Tablet,
        Device::Ctv,
        Device::Other,
    ];
    let countries = [*b"US", *b"DE", *b"FR", *b"BR"];
    let mut ev = |r: &mut Rng, ts: u64, ip: IpAddr, campaign: u64| {
        n += 1;
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&seed.to_be_bytes());
        id[8..].copy_from_slice(&n.to_be_bytes());
        let ua = match r.below(100) {
            0..=3 => 4 + r.below(5) as usize, // bots, the empty one and the ruled one
            4..=9 => 9,
            k => (k % 4) as usize,
        };
        // The device mostly agrees with the user agent.
        let device = if r.below(10) == 0 {
            devices[r.below(5) as usize]
        } else {
            match ua {
                0 | 2 => Device::Mobile,
                3 => Device::Tablet,
                9 => Device::Ctv,
                1 => Device::Desktop,
                _ => Device::Other,
            }
        };
        Ev {
            id,
            ts,
            recv: ts + 40 + r.below(500),
            campaign,
            ad: campaign * 100 + r.below(3),
            adv: campaign / 10 + 1,
            ip,
            ua,
            country: countries[r.below(4) as usize],
            device,
            cost: 1_000 + r.below(3_000_000),
        }
    };
    let normal_ip = |r: &mut Rng| -> IpAddr {
        let k = r.below(440);
        match k {
            0..=399 => format!("10.{}.{}.{}", k % 3, k / 7, k % 251)
                .parse()
                .unwrap(),
            400..=429 => format!("2001:db8::{:x}", k).parse().unwrap(),
            _ => format!("::ffff:192.0.2.{}", k - 430).parse().unwrap(),
        }
    };
    for _ in 0..3000 * scale {
        let ts = day_start + r.below(DAY_MS);
        let ip = normal_ip(&mut r);
        let c = 1 + r.below(40);
        out.push(ev(&mut r, ts, ip, c));
    }
    // Bursts: one IP, many clicks in one minute.
    for b in 0..8 * scale {
        let ip: IpAddr = format!("172.16.0.{b}").parse().unwrap();
        let minute = day_start / MINUTE_MS + r.below(1440);
        for _ in 0..10 + r.below(16) {
            let c = 1 + r.below(40);
            let ts = minute * MINUTE_MS + r.below(MINUTE_MS);
            out.push(ev(&mut r, ts, ip, c));
        }
    }
    // Campaign hoppers: one IP, many campaigns over the day.
    for h in 0..8 * scale {
        let ip: IpAddr = format!("172.17.0.{h}").parse().unwrap();
        for k in 0..10 {
            let ts = day_start + r.below(DAY_MS);
            out.push(ev(&mut r, ts, ip, 1 + k * 4));
        }
    }
    // Outside the day, in the neighbouring hours billing reads.
    for k in 0..20 {
        let ip = normal_ip(&mut r);
        let ts = if k % 2 == 0 {
            day_start - 1 - r.below(3_600_000)
        } else {
            day_start + DAY_MS + r.below(3_600_000)
        };
        out.push(ev(&mut r, ts, ip, 5));
    }
    // Later copies of some events with another cost: they lose the dedup.
    let originals = out.len() as u64;
    for _ in 0..150 * scale {
        let mut c = out[r.below(originals) as usize].clone();
        c.recv += 5_000;
        c.cost = 999_999;
        out.push(c);
    }
    out
}

/// Writes the rows as an archive under `archive` (one file per hour partition, stream
/// `core-0`, LSNs in row order); returns each row's LSN.
fn write_archive(archive: &Path, rows: &[Ev]) -> Vec<u64> {
    let mut by_hour: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    for (i, e) in rows.iter().enumerate() {
        by_hour.entry(hour_start(e.ts)).or_default().push(i);
    }
    let mut lsns = vec![0u64; rows.len()];
    let mut lsn = 0u64;
    for (hour, idx) in by_hour {
        let dir = archive.join(partition_path(hour));
        std::fs::create_dir_all(&dir).unwrap();
        let from = lsn;
        let to = from + idx.len() as u64;
        let mut f = PartFile::create(&dir.join(file_name("core-0", from, to)), 256).unwrap();
        for i in idx {
            let e = &rows[i];
            let click = Click {
                event_id: EventId(e.id),
                ts_ms: e.ts,
                campaign_id: e.campaign,
                ad_id: e.ad,
                publisher_id: 1,
                advertiser_id: e.adv,
                user_id: Cow::Borrowed("u-1"),
                ip: e.ip,
                user_agent: Cow::Borrowed(UAS[e.ua].0),
                country: e.country,
                device: e.device,
                cost_micros: e.cost,
            };
            let rec = RawRecord {
                flags: Flags::default(),
                recv_ms: e.recv,
                click,
                rules: Vec::new(),
            };
            f.push(&rec, lsn, "core-0").unwrap();
            lsns[i] = lsn;
            lsn += 1;
        }
        f.finish("core-0").unwrap();
    }
    lsns
}

/// The day's clicks after dedup, each with its feature vector (docs/model.md's table,
/// computed here from what was generated) and whether the rules remove it.
struct Scored {
    ev: Ev,
    x: [f32; FEATURES],
    ruled: bool,
}

fn day_clicks(rows: &[Ev], lsns: &[u64], day_start: u64) -> Vec<Scored> {
    let mut winner: HashMap<[u8; 16], usize> = HashMap::new();
    for (i, e) in rows.iter().enumerate() {
        let w = winner.entry(e.id).or_insert(i);
        if (e.recv, lsns[i]) < (rows[*w].recv, lsns[*w]) {
            *w = i;
        }
    }
    let mut wins: Vec<usize> = winner
        .into_values()
        .filter(|&i| (day_start..day_start + DAY_MS).contains(&rows[i].ts))
        .collect();
    wins.sort_unstable();
    let mut minute: HashMap<(IpAddr, u64), u32> = HashMap::new();
    let mut day: HashMap<IpAddr, u32> = HashMap::new();
    let mut camps: HashMap<IpAddr, BTreeSet<u64>> = HashMap::new();
    for &i in &wins {
        let e = &rows[i];
        *minute.entry((e.ip, e.ts / MINUTE_MS)).or_default() += 1;
        *day.entry(e.ip).or_default() += 1;
        camps.entry(e.ip).or_default().insert(e.campaign);
    }
    wins.into_iter()
        .map(|i| {
            let e = rows[i].clone();
            let (ua, bot, mobile) = UAS[e.ua];
            let b = |v: bool| if v { 1.0f32 } else { 0.0 };
            let mismatch = match e.device {
                Device::Mobile | Device::Tablet => !mobile,
                Device::Desktop => mobile,
                _ => false,
            };
            let v6 = match e.ip {
                IpAddr::V6(a) => a.to_ipv4_mapped().is_none(),
                IpAddr::V4(_) => false,
            };
            let device = match e.device {
                Device::Mobile => 0.0,
                Device::Desktop => 1.0,
                Device::Tablet => 2.0,
                Device::Ctv => 3.0,
                Device::Other => 4.0,
            };
            let x = [
                ((e.ts / 3_600_000) % 24) as f32,
                b(bot),
                b(ua.is_empty()),
                ua.len() as f32,
                b(mismatch),
                b(v6),
                minute[&(e.ip, e.ts / MINUTE_MS)] as f32,
                day[&e.ip] as f32,
                camps[&e.ip].len() as f32,
                (e.cost as f64 / 1e6) as f32,
                device,
                (u32::from(e.country[0]) * 256 + u32::from(e.country[1])) as f32,
            ];
            Scored {
                ruled: e.ua == UA_RULE,
                ev: e,
                x,
            }
        })
        .collect()
}

/// The training label: what the generated fraud looks like.
fn label(x: &[f32; FEATURES]) -> f32 {
    let fraud =
        x[1] == 1.0 || x[6] >= 10.0 || x[8] >= 8.0 || (x[4] == 1.0 && x[9] > 2.0) || x[2] == 1.0;
    if fraud {
        1.0
    } else {
        0.0
    }
}

fn hex_rows(rows: impl Iterator<Item = Vec<f32>>) -> String {
    let mut s = String::new();
    for r in rows {
        let cells: Vec<String> = r.iter().map(|v| format!("{:08x}", v.to_bits())).collect();
        s.push_str(&cells.join(" "));
        s.push('\n');
    }
    s
}

/// Trains on train.x / train.y, saves model.json, predicts test.x into test.pred (f32
/// bit patterns in hex, one row per line), all in the directory argv[1].
const TRAIN: &str = r#"
import sys
import numpy as np
import xgboost as xgb

d = sys.argv[1]
def rows(name):
    return np.array([[int(v, 16) for v in l.split()] for l in open("%s/%s" % (d, name))],
                    dtype=np.uint32).view(np.float32)
X, y, T = rows("train.x"), rows("train.y")[:, 0], rows("test.x")
b = xgb.train({"objective": "binary:logistic", "max_depth": 4, "eta": 0.3, "seed": 7},
              xgb.DMatrix(X, label=y), 40)
b.save_model("%s/model.json" % d)
p = b.predict(xgb.DMatrix(T)).astype(np.float32)
open("%s/test.pred" % d, "w").write("".join("%08x\n" % v for v in p.view(np.uint32)))
print(xgb.__version__)
"#;

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn billing_scores_every_click_as_xgboost_and_removes_exactly_its_fraud() {
    let py = common::xgboost_python();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let day_a = 20_400 * DAY_MS; // 2025-11-09
    let day_b = day_a + DAY_MS;

    // Training day: features and labels computed here, from what was generated.
    let rows_a = generate(day_a, 11, 1);
    let lsn_a: Vec<u64> = (0..rows_a.len() as u64).collect();
    let train = day_clicks(&rows_a, &lsn_a, day_a);
    let positives = train.iter().filter(|s| label(&s.x) == 1.0).count();
    assert!(
        positives > 100 && positives < train.len() / 2,
        "{positives} of {}",
        train.len()
    );
    std::fs::write(
        dir.join("train.x"),
        hex_rows(train.iter().map(|s| s.x.to_vec())),
    )
    .unwrap();
    std::fs::write(
        dir.join("train.y"),
        hex_rows(train.iter().map(|s| vec![label(&s.x)])),
    )
    .unwrap();

    // The billed day, written as an archive.
    let data = dir.join("data");
    let rows_b = generate(day_b, 29, 1);
    let lsn_b = write_archive(&data.join("archive"), &rows_b);
    let clicks = day_clicks(&rows_b, &lsn_b, day_b);
    let scored: Vec<&Scored> = clicks.iter().filter(|s| !s.ruled).collect();
    std::fs::write(
        dir.join("test.x"),
        hex_rows(scored.iter().map(|s| s.x.to_vec())),
    )
    .unwrap();
    let out = Command::new(&py)
        .arg("-c")
        .arg(TRAIN)
        .arg(dir)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "training failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("xgboost {}", String::from_utf8_lossy(&out.stdout).trim());
    let preds: Vec<f32> = read(&dir.join("test.pred"))
        .lines()
        .map(|l| f32::from_bits(u32::from_str_radix(l, 16).unwrap()))
        .collect();
    assert_eq!(preds.len(), scored.len());

    // Ground truth: removed when xgboost's score is at least the default 0.5.
    let mut removed: BTreeMap<String, f32> = BTreeMap::new();
    let mut invoice: BTreeMap<(u64, u64), (u64, u64)> = BTreeMap::new();
    for (s, &p) in scored.iter().zip(&preds) {
        if f64::from(p) >= 0.5 {
            removed.insert(s.ev.id_text(), p);
        } else {
            let t = invoice.entry((s.ev.adv, s.ev.campaign)).or_default();
            t.0 += 1;
            t.1 += s.ev.cost;
        }
    }
    assert!(
        removed.len() > 50 && removed.len() < scored.len() / 2,
        "{} removed of {}",
        removed.len(),
        scored.len()
    );
    let mut want_invoice = String::from("advertiser_id,campaign_id,clicks,cost_micros\n");
    for ((a, c), (n, cost)) in &invoice {
        want_invoice.push_str(&format!("{a},{c},{n},{cost}\n"));
    }

    let rules = dir.join("rules.json");
    std::fs::write(&rules, RULES).unwrap();
    let model = dir.join("model.json");
    let date = date_of(day_b);
    let run = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "--day",
            &date,
            "--rules",
            rules.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--dump-features",
        ];
        let dump = out.join("features.csv");
        args.push(dump.to_str().unwrap());
        args.extend_from_slice(extra);
        let r = billing(&data, &args);
        assert_eq!(r.code, 0, "stderr: {}", r.stderr);
        r
    };
    let out1 = dir.join("out1");
    std::fs::create_dir_all(&out1).unwrap();
    let r = run(&out1, &[]);
    assert!(
        r.stdout.contains(&format!(
            "; {} removed by the model (adjustments.csv)",
            removed.len()
        )),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains(&format!(
            "{} fraud",
            clicks.iter().filter(|s| s.ruled).count()
        )),
        "{}",
        r.stdout
    );

    // Every scored click: its features exactly ours, its score xgboost's within 1e-6.
    let dump = read(&out1.join("features.csv"));
    let mut lines = dump.lines();
    assert_eq!(
        lines.next().unwrap(),
        "event_id,hour,ua_bot,ua_empty,ua_len,ua_device_mismatch,ip_v6,ip_minute_clicks,\
         ip_day_clicks,ip_day_campaigns,cost_units,device,country,score"
    );
    let mut dumped: HashMap<String, (Vec<f32>, f32)> = HashMap::new();
    for l in lines {
        let f: Vec<&str> = l.split(',').collect();
        assert_eq!(f.len(), FEATURES + 2, "{l}");
        let x: Vec<f32> = f[1..=FEATURES].iter().map(|v| v.parse().unwrap()).collect();
        let score: f32 = f[FEATURES + 1].parse().unwrap();
        assert!(dumped.insert(f[0].to_string(), (x, score)).is_none(), "{l}");
    }
    assert_eq!(
        dumped.len(),
        scored.len(),
        "every click the rules keep is scored once"
    );
    let mut worst = 0f32;
    for (s, &p) in scored.iter().zip(&preds) {
        let (x, score) = dumped
            .get(&s.ev.id_text())
            .unwrap_or_else(|| panic!("{} not scored", s.ev.id_text()));
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(x), bits(&s.x), "features of {}", s.ev.id_text());
        worst = worst.max((score - p).abs());
        assert!(
            (score - p).abs() <= 1e-6,
            "{}: clickgate {score}, xgboost {p}",
            s.ev.id_text()
        );
    }
    eprintln!(
        "{} clicks scored, largest difference from xgboost {worst:e}",
        scored.len()
    );

    // The removed clicks, each with its score and reason, and the invoice.
    let adj = read(&out1.join("adjustments.csv"));
    let mut got: BTreeMap<String, f32> = BTreeMap::new();
    for l in adj.lines().skip(1) {
        let f: Vec<&str> = l.split(',').collect();
        assert_eq!(f.len(), 9, "{l}");
        assert_eq!(f[7], "model", "{l}");
        let score: f32 = f[8]
            .strip_prefix("model score ")
            .and_then(|r| r.strip_suffix(" >= 0.5"))
            .unwrap_or_else(|| panic!("reason of {l}"))
            .parse()
            .unwrap();
        got.insert(f[0].to_string(), score);
    }
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        removed.keys().collect::<Vec<_>>(),
        "removed clicks"
    );
    for (id, s) in &got {
        assert!(
            (s - removed[id]).abs() <= 1e-6,
            "{id}: {s} vs {}",
            removed[id]
        );
    }
    assert_eq!(read(&out1.join("invoices.csv")), want_invoice);

    // Same bytes on one thread and on the spilled plan.
    for (name, extra) in [
        ("out2", &["--threads", "1"][..]),
        ("out3", &["--threads", "2", "--run-rows", "700"][..]),
    ] {
        let o = dir.join(name);
        std::fs::create_dir_all(&o).unwrap();
        let r = run(&o, extra);
        if name == "out3" {
            assert!(r.stdout.contains("sorted runs spilled"), "{}", r.stdout);
        }
        for f in ["invoices.csv", "adjustments.csv", "features.csv"] {
            assert!(
                read(&out1.join(f)) == read(&o.join(f)),
                "{f} differs in {name}"
            );
        }
    }
}

/// A hand-written XGBoost JSON model: one split on feature 0 (`hour < 12`).
fn tiny_model(objective: &str, num_feature: usize) -> String {
    split_model(objective, num_feature, 0, "12.0")
}

/// One split, `x[feature] < threshold` (or missing) left to -3, else right to +3.
fn split_model(objective: &str, num_feature: usize, feature: usize, threshold: &str) -> String {
    format!(
        r#"{{"version":[3,2,0],"learner":{{"objective":{{"name":"{objective}"}},"learner_model_param":{{"base_score":"5E-1","num_class":"0","num_feature":"{num_feature}","num_target":"1"}},"gradient_booster":{{"name":"gbtree","model":{{"gbtree_model_param":{{"num_trees":"1","num_parallel_tree":"1"}},"tree_info":[0],"trees":[{{"left_children":[1,-1,-1],"right_children":[2,-1,-1],"split_indices":[{feature},0,0],"split_conditions":[{threshold},-3.0,3.0],"default_left":[1,0,0],"tree_param":{{"num_nodes":"3","num_feature":"{num_feature}","size_leaf_vector":"1"}}}}]}}}}}}}}"#
    )
}

#[test]
fn bad_models_are_refused_before_billing_starts_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let day = 20_410 * DAY_MS;
    let data = dir.join("data");
    let rows = generate(day, 5, 1);
    write_archive(&data.join("archive"), &rows);
    let date = date_of(day);
    let model = dir.join("model.json");
    let out = dir.join("out");
    let bill = |text: Option<&str>, extra: &[&str]| {
        if let Some(t) = text {
            std::fs::write(&model, t).unwrap();
        } else {
            let _ = std::fs::remove_file(&model);
        }
        let mut args = vec![
            "--day",
            &date,
            "--model",
            model.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        billing(&data, &args)
    };

    let good = tiny_model("binary:logistic", FEATURES);
    let bad_json = &good[..good.len() / 2];
    let cases: Vec<(Option<String>, Vec<&str>, String)> = vec![
        (
            Some(bad_json.to_string()),
            vec![],
            "is not a valid XGBoost JSON model".into(),
        ),
        (
            Some(tiny_model("binary:logistic", 13)),
            vec![],
            "feature count mismatch: the model has 13 features (num_feature), billing's \
             feature vector has 16"
                .into(),
        ),
        (
            Some(tiny_model("binary:logistic", 5)),
            vec![],
            "feature count mismatch: the model has 5 features".into(),
        ),
        (
            Some(tiny_model("multi:softprob", FEATURES)),
            vec![],
            "unsupported objective `multi:softprob`".into(),
        ),
        (
            Some(tiny_model("reg:squarederror", FEATURES)),
            vec![],
            "unsupported objective `reg:squarederror`: billing needs a probability".into(),
        ),
        (None, vec![], "cannot read the model file".into()),
        (
            Some(good.clone()),
            vec!["--model-threshold", "1.5"],
            "--model-threshold must be between 0 and 1, got 1.5".into(),
        ),
    ];
    for (text, extra, want) in cases {
        let r = bill(text.as_deref(), &extra);
        assert_eq!(r.code, 2, "{want}: stderr {}", r.stderr);
        assert!(
            r.stderr.contains(&want),
            "wanted {want:?} in stderr: {}",
            r.stderr
        );
        if !want.starts_with("--model-threshold") {
            assert!(
                r.stderr.contains(&format!("--model {}", model.display())),
                "the error names the file: {}",
                r.stderr
            );
        }
        assert!(r.stdout.is_empty(), "{}", r.stdout);
        assert!(!out.exists(), "{want}: billing wrote {}", out.display());
    }

    // The same archive and a sound model: billed, every click after 12:00 removed
    // (score σ(-3) < 0.5 before noon, σ(3) ≥ 0.5 after).
    let r = bill(Some(&good), &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let adj = read(&out.join("adjustments.csv"));
    let n = adj.lines().skip(1).count();
    assert!(n > 100, "{adj}");
    for l in adj.lines().skip(1) {
        let f: Vec<&str> = l.split(',').collect();
        let ts: u64 = f[4].parse().unwrap();
        assert!((ts / 3_600_000) % 24 >= 12, "{l}");
        assert!(f[8].starts_with("model score 0.95257"), "{l}");
    }
    assert!(
        r.stdout.contains(&format!("; {n} removed by the model")),
        "{}",
        r.stdout
    );
}

/// The IP history's key order: IPv4 before IPv6, each in address order.
fn ip_order(ip: &IpAddr) -> (bool, u128) {
    match ip {
        IpAddr::V4(a) => (false, u128::from(u32::from(*a))),
        IpAddr::V6(a) => (true, u128::from(*a)),
    }
}

/// The test's own model of the history: IP → (first seen day, day → (clicks, removed)).
type Hist = BTreeMap<(bool, u128), (IpAddr, u64, BTreeMap<u64, (u64, u64)>)>;

fn hist_text(h: &Hist) -> String {
    let mut s = String::from("ip,first_seen,day,clicks,fraud_clicks\n");
    for (ip, first, days) in h.values() {
        for (d, (c, f)) in days {
            s.push_str(&format!(
                "{ip},{},{},{c},{f}\n",
                date_of(first * DAY_MS),
                date_of(d * DAY_MS)
            ));
        }
    }
    s
}

/// (days with clicks, clicks, removed, age in days) of `ip` before `day` in `h`, which
/// holds the window before `day` only.
fn past_of(h: &Hist, ip: &IpAddr, day: u64) -> (u64, u64, u64, u64) {
    match h.get(&ip_order(ip)) {
        None => (0, 0, 0, 0),
        Some((_, first, days)) => (
            days.len() as u64,
            days.values().map(|v| v.0).sum(),
            days.values().map(|v| v.1).sum(),
            day - first,
        ),
    }
}

#[test]
fn the_ip_history_carries_over_three_days_and_its_rule_and_features_change_the_third_invoice() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let first_day = 20_420u64; // 2025-11-29
    let window = 2u64;
    let rate_max = 12u32;
    let camps_max = 12u32;
    let rules = dir.join("rules.json");
    std::fs::write(
        &rules,
        format!(
            r#"{{"rules":[{{"id":"crawler","kind":"user_agent","patterns":["evilcrawler"]}},{{"id":"rate","kind":"ip_rate","max_clicks_per_minute":{rate_max}}}]}}"#
        ),
    )
    .unwrap();
    let window_s = window.to_string();
    let camps_s = camps_max.to_string();
    // History expected after each day, built here from the semantics of docs/billing.md.
    let mut hist: Hist = BTreeMap::new();
    let mut days_data = Vec::new();
    for k in 0..3u64 {
        let day = first_day + k;
        let data = dir.join(format!("data{k}"));
        let rows = generate(day * DAY_MS, 100 + k, 1);
        let lsns = write_archive(&data.join("archive"), &rows);
        days_data.push((day, data, day_clicks(&rows, &lsns, day * DAY_MS)));
    }
    // Evidence the stream's rules and the batch check give: removed, and counted so.
    let evidence = |s: &Scored| s.ruled || s.x[6] > rate_max as f32 || s.x[8] > camps_max as f32;
    let base = |date: &str, out: &Path| -> Vec<String> {
        [
            "--day",
            date,
            "--rules",
            rules.to_str().unwrap(),
            "--batch-checks",
            "--ip-campaigns-max",
            &camps_s,
            "--ip-history",
            "--ip-history-days",
            &window_s,
            "--out",
            out.to_str().unwrap(),
            "--no-progress",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    // The expected history after `day` from the one before and the day's outcome.
    let advance = |h: &Hist, day: u64, outcome: &[(IpAddr, bool)]| -> Hist {
        let mut n: Hist = BTreeMap::new();
        for (k, (ip, first, days)) in h {
            let kept: BTreeMap<u64, (u64, u64)> = days
                .range(day + 1 - window..)
                .map(|(d, v)| (*d, *v))
                .collect();
            if !kept.is_empty() {
                n.insert(*k, (*ip, *first, kept));
            }
        }
        for (ip, removed) in outcome {
            let e = n.entry(ip_order(ip)).or_insert_with(|| {
                (
                    *ip,
                    h.get(&ip_order(ip)).map_or(day, |e| e.1),
                    BTreeMap::new(),
                )
            });
            let v = e.2.entry(day).or_default();
            v.0 += 1;
            v.1 += u64::from(*removed);
        }
        n
    };
    let invoice_text = |billed: &[&Scored]| {
        let mut inv: BTreeMap<(u64, u64), (u64, u64)> = BTreeMap::new();
        for s in billed {
            let t = inv.entry((s.ev.adv, s.ev.campaign)).or_default();
            t.0 += 1;
            t.1 += s.ev.cost;
        }
        let mut t = String::from("advertiser_id,campaign_id,clicks,cost_micros\n");
        for ((a, c), (n, cost)) in &inv {
            t.push_str(&format!("{a},{c},{n},{cost}\n"));
        }
        t
    };

    // Days 1 and 2: rules and batch check only; the history is written and read back.
    let mut prev_out: Option<std::path::PathBuf> = None;
    for (day, data, clicks) in &days_data[..2] {
        let out = dir.join(format!("out{day}"));
        let mut args = base(&date_of(day * DAY_MS), &out);
        if let Some(p) = &prev_out {
            args.push("--ip-history-from".into());
            args.push(p.join("ip_history.csv").to_str().unwrap().into());
        }
        let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let r = billing(data, &a);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let outcome: Vec<(IpAddr, bool)> = clicks.iter().map(|s| (s.ev.ip, evidence(s))).collect();
        hist = advance(&hist, *day, &outcome);
        assert_eq!(
            read(&out.join("ip_history.csv")),
            hist_text(&hist),
            "day {day}"
        );
        assert!(
            r.stdout
                .contains(&format!("; {} IPs in ip_history.csv", hist.len())),
            "{}",
            r.stdout
        );
        prev_out = Some(out);
    }
    let history_2 = prev_out.unwrap().join("ip_history.csv");
    // Over the two days some IPs recur (the burst and campaign-hopping addresses are
    // the same every day) and some have more than half their clicks removed.
    let (day3, data3, clicks3) = &days_data[2];
    let (day3, date3) = (*day3, date_of(day3 * DAY_MS));
    let bad_ips = hist
        .values()
        .filter(|(ip, ..)| {
            let p = past_of(&hist, ip, day3);
            p.1 >= 5 && p.2 * 2 > p.1
        })
        .count();
    assert!(bad_ips >= 4, "{bad_ips} IPs with a bad reputation");

    // Day 3 with the reputation rule: share above 0.5 over at least 5 clicks.
    let out_a = dir.join("out3-reputation");
    let mut args = base(&date3, &out_a);
    args.extend(
        [
            "--ip-history-from",
            history_2.to_str().unwrap(),
            "--reputation-share",
            "0.5",
            "--reputation-min-clicks",
            "5",
        ]
        .map(String::from),
    );
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let r = billing(data3, &a);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let mut billed = Vec::new();
    let mut by_reputation = BTreeSet::new();
    let mut outcome = Vec::new();
    for s in clicks3 {
        let removed = evidence(s);
        outcome.push((s.ev.ip, removed));
        if removed {
            continue;
        }
        let p = past_of(&hist, &s.ev.ip, day3);
        if p.1 >= 5 && p.2 as f64 > 0.5 * p.1 as f64 {
            by_reputation.insert(s.ev.id_text());
        } else {
            billed.push(s);
        }
    }
    assert!(
        by_reputation.len() >= 5,
        "{} removed by reputation",
        by_reputation.len()
    );
    assert_eq!(read(&out_a.join("invoices.csv")), invoice_text(&billed));
    let adj = read(&out_a.join("adjustments.csv"));
    let got: BTreeSet<String> = adj
        .lines()
        .filter(|l| l.contains(",ip_reputation,ip fraud share "))
        .map(|l| l[..36].to_string())
        .collect();
    assert_eq!(got, by_reputation);
    assert!(
        r.stdout.contains(&format!(
            "; {} removed by IP reputation",
            by_reputation.len()
        )),
        "{}",
        r.stdout
    );
    // The rule's own removals are not evidence: the history counts them as clicks only.
    let hist3 = advance(&hist, day3, &outcome);
    assert_eq!(read(&out_a.join("ip_history.csv")), hist_text(&hist3));

    // Day 3 with a model over the history features: one split on
    // ip_hist_fraud_share (feature 14) at 0.3, a missing share (new IP) going left.
    let model = dir.join("hist-model.json");
    std::fs::write(&model, split_model("binary:logistic", 16, 14, "0.3")).unwrap();
    let run_model = |out: &Path, extra: &[&str]| {
        let mut args = base(&date3, out);
        args.extend(
            [
                "--ip-history-from",
                history_2.to_str().unwrap(),
                "--model",
                model.to_str().unwrap(),
                "--dump-features",
                out.join("features.csv").to_str().unwrap(),
            ]
            .map(String::from),
        );
        args.extend(extra.iter().map(|s| s.to_string()));
        let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let r = billing(data3, &a);
        assert_eq!(r.code, 0, "{}", r.stderr);
        r
    };
    let out_b = dir.join("out3-model");
    run_model(&out_b, &[]);
    let mut billed = Vec::new();
    let mut by_model = BTreeSet::new();
    let mut outcome = Vec::new();
    let mut want_past: BTreeMap<String, [f32; 4]> = BTreeMap::new();
    for s in clicks3 {
        if evidence(s) {
            outcome.push((s.ev.ip, true));
            continue;
        }
        let p = past_of(&hist, &s.ev.ip, day3);
        let share = if p.1 == 0 {
            f32::NAN
        } else {
            (p.2 as f64 / p.1 as f64) as f32
        };
        want_past.insert(s.ev.id_text(), [p.0 as f32, p.1 as f32, share, p.3 as f32]);
        let removed = share >= 0.3f32;
        outcome.push((s.ev.ip, removed));
        if removed {
            by_model.insert(s.ev.id_text());
        } else {
            billed.push(s);
        }
    }
    // A lower share and no minimum of clicks: at least the reputation rule's clicks.
    assert!(by_model.is_superset(&by_reputation), "{}", by_model.len());
    assert_eq!(read(&out_b.join("invoices.csv")), invoice_text(&billed));
    let got: BTreeSet<String> = read(&out_b.join("adjustments.csv"))
        .lines()
        .filter(|l| l.contains(",model,model score "))
        .map(|l| l[..36].to_string())
        .collect();
    assert_eq!(got, by_model);
    // Every scored click's history features, as computed here.
    let dump = read(&out_b.join("features.csv"));
    let mut lines = dump.lines();
    assert!(lines
        .next()
        .unwrap()
        .ends_with(",country,ip_hist_days,ip_hist_clicks,ip_hist_fraud_share,ip_age_days,score"));
    let mut seen = 0;
    for l in lines {
        let f: Vec<&str> = l.split(',').collect();
        assert_eq!(f.len(), 18, "{l}");
        let got: Vec<f32> = f[13..17].iter().map(|v| v.parse().unwrap()).collect();
        let want = want_past[f[0]];
        for (g, w) in got.iter().zip(want) {
            assert!(
                g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                "{l}: {want:?}"
            );
        }
        seen += 1;
    }
    assert_eq!(seen, want_past.len());
    // The model's removals are evidence for the next day.
    let hist3 = advance(&hist, day3, &outcome);
    assert_eq!(read(&out_b.join("ip_history.csv")), hist_text(&hist3));

    // The same bytes on one thread with spilled runs.
    let out_c = dir.join("out3-model-spilled");
    let r = run_model(&out_c, &["--threads", "1", "--run-rows", "300"]);
    assert!(r.stdout.contains("sorted runs spilled"), "{}", r.stdout);
    for f in [
        "invoices.csv",
        "adjustments.csv",
        "ip_history.csv",
        "features.csv",
    ] {
        assert!(read(&out_b.join(f)) == read(&out_c.join(f)), "{f} differs");
    }

    // Refusals, before anything is written: a history that is not an earlier day's, a
    // history model without the history, the rule without the history.
    let out_x = dir.join("out-refused");
    let (day2, data2, _) = &days_data[1];
    let mut args = base(&date_of(day2 * DAY_MS), &out_x);
    args.extend(
        [
            "--ip-history-from",
            out_b.join("ip_history.csv").to_str().unwrap(),
        ]
        .map(String::from),
    );
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let r = billing(data2, &a);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("--ip-history-from") && r.stderr.contains("is not before the day billed"),
        "{}",
        r.stderr
    );
    for (extra, want) in [
        (
            vec!["--model", model.to_str().unwrap()],
            "the model reads the IP history features",
        ),
        (
            vec!["--reputation-share", "0.5"],
            "--reputation-share needs --ip-history",
        ),
    ] {
        let mut a = vec!["--day", &date3, "--out", out_x.to_str().unwrap()];
        a.extend(extra);
        let r = billing(data3, &a);
        assert_eq!(r.code, 2, "{}", r.stderr);
        assert!(r.stderr.contains(want), "{}", r.stderr);
    }
    assert!(!out_x.exists());
}
