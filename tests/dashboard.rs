//! The advertiser dashboard in headless Chromium: `clickgate run` with API
//! keys and a known data set (two campaigns of one advertiser, one of another; billable
//! and honeypot-fraud clicks over three hours), then `tests/browser/dashboard.mjs`
//! (playwright-core) checks that the page loads without console errors, that its charts,
//! tiles and tables show exactly what the query API answers, that the campaign and window
//! pickers work, that it refreshes by itself, and that a wrong key is refused. The
//! screenshot is kept in `target/test-artifacts/dashboard.png`.
//!
//! Needs `CLICKGATE_TEST_CHROMIUM` (a Chromium binary) and `CLICKGATE_TEST_NODE_PATH` (a
//! node_modules directory with playwright-core); `scripts/test.sh` sets both.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{event, now_ms, uuid, Clickgate, BIN};

const KEY_A: &str = "dashboard-advertiser-a-key";
const KEY_B: &str = "dashboard-advertiser-b-key";
const KEY_ADMIN: &str = "dashboard-admin-key-0000";
const TOKEN: &str = "dashboard-control-token";
const HONEYPOT_AD: u64 = 999_001;

fn required_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the tests with scripts/test.sh (it installs Chromium and playwright-core and sets it)")
    })
}

/// Pushes a honeypot rule and waits until every core judges with it.
fn apply_honeypot(cg: &Clickgate) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rules.json");
    std::fs::write(
        &file,
        format!(r#"{{"rules":[{{"id":"hp","kind":"honeypot","ad_ids":[{HONEYPOT_AD}]}}]}}"#),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["rules", "--url", &format!("http://{}", cg.control.unwrap())])
        .args(["--token", TOKEN, "apply", "--file"])
        .arg(&file)
        .env_remove("CLICKGATE_CONTROL_TOKEN")
        .env_remove("CLICKGATE_CONTROL_URL")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cg
        .metrics()
        .lines()
        .any(|l| l.starts_with("clickgate_fraud_rules_version{") && !l.ends_with(" 0"))
    {
        assert!(Instant::now() < deadline, "rules never reached the cores");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Every core: all samples non-zero.
    let deadline = Instant::now() + Duration::from_secs(30);
    while cg
        .metrics()
        .lines()
        .any(|l| l.starts_with("clickgate_fraud_rules_version{") && l.ends_with(" 0"))
    {
        assert!(Instant::now() < deadline, "rules never reached every core");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The data set: per campaign, clicks spread over the last three hours, several
/// countries, devices, ads and users, and a few honeypot (fraud) clicks.
fn ingest(cg: &Clickgate) -> u64 {
    let now = now_ms();
    let countries = ["US", "FR", "DE", "JP"];
    let devices = ["mobile", "desktop", "tablet"];
    let mut lines = Vec::new();
    let mut n = 0u64;
    for (campaign, advertiser, clicks) in [(11u64, 100u64, 40u64), (12, 100, 17), (22, 200, 9)] {
        for i in 0..clicks {
            let fraud = i % 10 == 9;
            lines.push(event(&uuid(n), campaign, |v| {
                v["advertiser_id"] = advertiser.into();
                v["ts"] = (now - (i % 3) * 3_600_000 - i * 7_000).into();
                v["country"] = countries[(i % 4) as usize].into();
                v["device"] = devices[(i % 3) as usize].into();
                v["ad_id"] = if fraud {
                    HONEYPOT_AD
                } else {
                    campaign * 100 + i % 3
                }
                .into();
                v["user_id"] = format!("user-{}", i % 13).into();
                v["cost_micros"] = (250_000 + i * 1_000).into();
            }));
            n += 1;
        }
    }
    let r = cg.request("POST", "/v1/clicks", &lines.join("\n"));
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.json()["accepted"], n, "{}", r.body);
    n
}

fn wait_counted(cg: &Clickgate, events: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut seen = 0;
        for c in [11, 12, 22] {
            let r = cg.query_as(
                &format!("/v1/campaigns/{c}/metrics?window=1d"),
                Some(KEY_ADMIN),
            );
            assert_eq!(r.status, 200, "{}", r.body);
            for b in r.json()["buckets"].as_array().unwrap() {
                seen += b["clicks"].as_u64().unwrap() + b["fraud_clicks"].as_u64().unwrap();
            }
        }
        if seen == events {
            return;
        }
        assert!(Instant::now() < deadline, "{seen} of {events} counted");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn dashboard_shows_the_api_numbers_in_chromium() {
    let chromium = required_env("CLICKGATE_TEST_CHROMIUM");
    let node_path = required_env("CLICKGATE_TEST_NODE_PATH");
    assert!(
        PathBuf::from(&node_path).join("playwright-core").is_dir(),
        "CLICKGATE_TEST_NODE_PATH={node_path} has no playwright-core: run scripts/test.sh"
    );
    let tmp = tempfile::tempdir().unwrap();
    let keys = tmp.path().join("keys.toml");
    std::fs::write(
        &keys,
        format!("{KEY_A} = 100\n{KEY_B} = 200\n{KEY_ADMIN} = \"admin\"\n"),
    )
    .unwrap();
    let cg = Clickgate::run(&[
        "--api-keys-file",
        keys.to_str().unwrap(),
        "--control-token",
        TOKEN,
    ]);
    apply_honeypot(&cg);
    let events = ingest(&cg);
    wait_counted(&cg, events);
    // The API itself tells the truth about the data set (the page is compared with it).
    let r = cg.query_as("/v1/campaigns/11/metrics?window=1d", Some(KEY_A));
    let (clicks, fraud) =
        r.json()["buckets"]
            .as_array()
            .unwrap()
            .iter()
            .fold((0, 0), |(c, f), b| {
                (
                    c + b["clicks"].as_u64().unwrap(),
                    f + b["fraud_clicks"].as_u64().unwrap(),
                )
            });
    assert_eq!((clicks, fraud), (36, 4), "{}", r.body);

    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let shot = root.join("target/test-artifacts/dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let out = Command::new("node")
        .arg(root.join("tests/browser/dashboard.mjs"))
        .env("NODE_PATH", &node_path)
        .env("CG_URL", format!("http://{}", cg.query.unwrap()))
        .env("CG_KEY", KEY_A)
        .env("CG_WRONG_KEY", "not-a-key-of-anyone-at-all")
        .env("CG_CAMPAIGNS", "11,12")
        .env("CG_CHROMIUM", &chromium)
        .env("CG_SCREENSHOT", &shot)
        .env("CG_PROFILE_DIR", tmp.path().join("chromium-profile"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run node (needed by the browser test): {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "browser checks failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("dashboard checks passed"), "{stdout}");
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(png.starts_with(b"\x89PNG"), "screenshot is a PNG");
}
