//! Tenant isolation of the query API: with API keys configured, an advertiser
//! sees only the campaigns its events named it for, through every route; another
//! advertiser's campaign is 404 (like a campaign that does not exist); admin sees all; no
//! key is 401; wrong keys are counted and rate-limited per client address; an
//! unauthenticated query API refuses a non-loopback address.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{campaign_ids, clicks_of, event, get_as, metric_sum, uuid, Clickgate, Response, BIN};

const KEY_A: &str = "advertiser-a-key-0001";
const KEY_B: &str = "advertiser-b-key-0002";
const KEY_ADMIN: &str = "admin-key-000000000003";
const ADV_A: u64 = 100;
const ADV_B: u64 = 200;
const CAMPAIGN_A: u64 = 11;
const CAMPAIGN_B: u64 = 22;

fn keys_file(dir: &Path) -> String {
    let path = dir.join("keys.toml");
    std::fs::write(
        &path,
        format!("# test keys\n\"{KEY_A}\" = {ADV_A}\n{KEY_B} = {ADV_B}\n{KEY_ADMIN} = \"admin\"\n"),
    )
    .unwrap();
    path.display().to_string()
}

/// Three clicks for A's campaign (ads 1101, 1102) and two for B's (ad 2201).
fn ingest(cg: &Clickgate) {
    let mut lines = Vec::new();
    for (i, (campaign, adv, ad)) in [
        (CAMPAIGN_A, ADV_A, 1101),
        (CAMPAIGN_A, ADV_A, 1101),
        (CAMPAIGN_A, ADV_A, 1102),
        (CAMPAIGN_B, ADV_B, 2201),
        (CAMPAIGN_B, ADV_B, 2201),
    ]
    .into_iter()
    .enumerate()
    {
        lines.push(event(&uuid(i as u64), campaign, |v| {
            v["advertiser_id"] = adv.into();
            v["ad_id"] = ad.into();
            v["user_id"] = format!("user-{i}").into();
        }));
    }
    let r = cg.request("POST", "/v1/clicks", &lines.join("\n"));
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.json()["accepted"], 5, "{}", r.body);
}

/// Polls (the store is fed asynchronously) until admin sees both campaigns' clicks.
fn wait_visible(cg: &Clickgate) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = cg.query_as("/v1/top?window=1d&n=10", Some(KEY_ADMIN));
        assert_eq!(r.status, 200, "{}", r.body);
        let clicks: u64 = r.json()["ads"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["clicks"].as_u64().unwrap())
            .sum();
        if clicks == 5 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "clicks never visible: {}",
            r.body
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn top_campaigns(r: &Response) -> Vec<u64> {
    assert_eq!(r.status, 200, "{}", r.body);
    let mut v: Vec<u64> = r.json()["ads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["campaign_id"].as_u64().unwrap())
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

fn metrics_path(campaign: u64) -> String {
    format!("/v1/campaigns/{campaign}/metrics?window=1d")
}

#[test]
fn advertisers_see_only_their_own_campaigns_through_every_route() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keys_file(tmp.path());
    let mut cg = Clickgate::run(&["--api-keys-file", &keys]);
    ingest(&cg);
    wait_visible(&cg);

    // No key: 401 JSON everywhere but the page and health.
    for path in [
        "/v1/campaigns".to_string(),
        "/v1/top?window=1d".into(),
        metrics_path(CAMPAIGN_A),
        format!("/v1/campaigns/{CAMPAIGN_A}/breakdown?window=1d&by=country"),
        "/metrics".into(),
        "/no/such/route".into(),
    ] {
        let r = cg.query_as(&path, None);
        assert_eq!(r.status, 401, "{path}: {}", r.body);
        assert!(
            r.json()["error"].as_str().unwrap().contains("key"),
            "{path}"
        );
    }
    assert_eq!(cg.query_as("/", None).status, 200);
    assert_eq!(cg.query_as("/healthz", None).status, 200);

    for (key, own, other) in [
        (KEY_A, CAMPAIGN_A, CAMPAIGN_B),
        (KEY_B, CAMPAIGN_B, CAMPAIGN_A),
    ] {
        let k = Some(key);
        assert_eq!(campaign_ids(&cg.query_as("/v1/campaigns", k)), vec![own]);
        assert!(clicks_of(&cg.query_as(&metrics_path(own), k)) > 0);
        // Another tenant's campaign answers exactly like one that does not exist.
        let theirs = cg.query_as(&metrics_path(other), k);
        let missing = cg.query_as(&metrics_path(999_999), k);
        assert_eq!(
            (theirs.status, missing.status),
            (404, 404),
            "{}",
            theirs.body
        );
        assert_eq!(theirs.body, missing.body);
        for by in ["country", "device"] {
            let p = format!("/v1/campaigns/{other}/breakdown?window=1d&by={by}");
            assert_eq!(cg.query_as(&p, k).status, 404, "{p}");
            let p = format!("/v1/campaigns/{own}/breakdown?window=1d&by={by}");
            assert_eq!(cg.query_as(&p, k).status, 200, "{p}");
        }
        let p = format!("/v1/campaigns/{other}/metrics?window=5m&country=US");
        assert_eq!(cg.query_as(&p, k).status, 404, "{p}");
        assert_eq!(
            top_campaigns(&cg.query_as("/v1/top?window=1d&n=10", k)),
            vec![own]
        );
        assert_eq!(cg.query_as("/metrics", k).status, 403);
    }
    // A's top is its own top n, not the global top n filtered: B's ad 2201 (2 clicks)
    // outranks A's 1102 (1 click) globally, yet n=2 still gives A both of its ads.
    let r = cg.query_as("/v1/top?window=1d&n=2", Some(KEY_A));
    let ads: Vec<u64> = r.json()["ads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["ad_id"].as_u64().unwrap())
        .collect();
    assert_eq!(ads, vec![1101, 1102], "{}", r.body);

    // Admin sees everything.
    let admin = Some(KEY_ADMIN);
    assert_eq!(
        campaign_ids(&cg.query_as("/v1/campaigns", admin)),
        vec![CAMPAIGN_A, CAMPAIGN_B]
    );
    assert_eq!(clicks_of(&cg.query_as(&metrics_path(CAMPAIGN_A), admin)), 3);
    assert_eq!(clicks_of(&cg.query_as(&metrics_path(CAMPAIGN_B), admin)), 2);
    assert_eq!(
        top_campaigns(&cg.query_as("/v1/top?window=1d&n=10", admin)),
        vec![CAMPAIGN_A, CAMPAIGN_B]
    );
    let m = cg.query_as("/metrics", admin);
    assert_eq!(m.status, 200);
    assert!(metric_sum(&m.body, "clickgate_query_auth_failures_total") >= 6.0);

    // Ownership survives a restart (store snapshot + WAL).
    assert!(cg.sigterm_and_wait().success());
    cg.restart();
    assert_eq!(
        campaign_ids(&cg.query_as("/v1/campaigns", Some(KEY_A))),
        vec![CAMPAIGN_A]
    );
    assert_eq!(
        cg.query_as(&metrics_path(CAMPAIGN_B), Some(KEY_A)).status,
        404
    );
}

#[test]
fn wrong_keys_are_counted_and_rate_limited_per_address() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keys_file(tmp.path());
    // Dual-stack, non-loopback bind: allowed because keys are configured. Clients on
    // 127.0.0.1 and ::1 are two addresses to the limiter.
    let cg = Clickgate::spawn(
        "run",
        tmp.path(),
        &[
            "--api-keys-file",
            &keys,
            "--query-auth-failures-per-minute-max",
            "3",
            "--query-addr",
            "[::]:0",
        ],
    );
    let port = cg.query.unwrap().port();
    let v4 = SocketAddr::from(([127, 0, 0, 1], port));
    let v6: SocketAddr = format!("[::1]:{port}").parse().unwrap();
    // The count is per minute: if a minute turns between two failures it restarts,
    // so at most 2 × 3 failures pass before the 429 (never more: one turn at most).
    let mut refused = 0;
    let limited = loop {
        let r = get_as(v4, "/v1/campaigns", Some("wrong-key-wrong-key"));
        if r.status == 429 {
            break r;
        }
        assert_eq!(r.status, 401, "{}", r.body);
        assert_eq!(r.json()["error"], "invalid API key");
        refused += 1;
        assert!(refused <= 6, "never rate-limited after {refused} failures");
    };
    assert!(refused >= 3, "limited after {refused} failures");
    assert!(limited.header("retry-after").is_some());
    assert!(limited.json()["error"].as_str().unwrap().contains("failed"));
    // While limited, even the right key is refused from that address…
    assert_eq!(get_as(v4, "/v1/campaigns", Some(KEY_ADMIN)).status, 429);
    // …but not from another one.
    let m = get_as(v6, "/metrics", Some(KEY_ADMIN));
    assert_eq!(m.status, 200, "{}", m.body);
    let sample = |reason: &str| {
        m.body
            .lines()
            .find(|l| {
                l.starts_with(&format!(
                    "clickgate_query_auth_failures_total{{reason=\"{reason}\"}}"
                ))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {reason} sample in {}", m.body))
    };
    assert_eq!(sample("invalid"), refused);
    assert_eq!(sample("rate_limited"), 2);
    assert_eq!(sample("missing"), 0);
}

#[test]
fn non_loopback_query_address_without_keys_is_refused_unless_insecure() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["run", "--data-dir"])
        .arg(tmp.path())
        .args([
            "--ingest-addr",
            "127.0.0.1:0",
            "--control-addr",
            "127.0.0.1:0",
            "--query-addr",
            "0.0.0.0:0",
            "--cores",
            "1",
        ])
        .env_remove("CLICKGATE_API_KEYS")
        .env_remove("CLICKGATE_API_KEYS_FILE")
        .env_remove("CLICKGATE_QUERY_INSECURE")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("0.0.0.0:0"), "{stderr}");
    assert!(stderr.contains("--query-insecure"), "{stderr}");

    // With the explicit flag it starts and the query API answers without a key.
    let cg = Clickgate::spawn(
        "run",
        tmp.path(),
        &["--query-insecure", "--query-addr", "0.0.0.0:0"],
    );
    let port = cg.query.unwrap().port();
    let r = get_as(
        SocketAddr::from(([127, 0, 0, 1], port)),
        "/v1/campaigns",
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["campaigns"], serde_json::json!([]));
}

/// Every spelling of a campaign id in the path is authorized as the id the handler
/// answers for: percent-encoded digits (either case of hex), a `+` sign (raw or encoded),
/// leading zeros. Another tenant's campaign stays 404 in every spelling, the caller's own
/// answers 200 in every spelling, and what is not an id is 400 — never someone's data.
#[test]
fn encoded_campaign_ids_are_checked_as_the_ids_they_decode_to() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keys_file(tmp.path());
    let cg = Clickgate::run(&["--api-keys-file", &keys]);
    ingest(&cg);
    wait_visible(&cg);

    fn spellings(id: u64) -> Vec<String> {
        let d = id.to_string();
        let enc_all: String = d.bytes().map(|b| format!("%{b:02X}")).collect();
        let enc_lower: String = d.bytes().map(|b| format!("%{b:02x}")).collect();
        let enc_first = format!("%{:02X}{}", d.as_bytes()[0], &d[1..]);
        vec![
            d.clone(),
            enc_all.clone(),
            enc_lower,
            enc_first,
            format!("+{d}"),
            format!("%2B{d}"),
            format!("%2b{enc_all}"),
            format!("0{d}"),
            format!("%30{d}"),
            format!("{}{d}", "0".repeat(18)),
        ]
    }
    let routes = |c: &str| {
        [
            format!("/v1/campaigns/{c}/metrics?window=1d"),
            format!("/v1/campaigns/{c}/metrics?window=5m&country=US"),
            format!("/v1/campaigns/{c}/breakdown?window=1d&by=country"),
            format!("/v1/campaigns/{c}/breakdown?window=1d&by=device"),
        ]
    };
    for (key, own, other) in [
        (KEY_A, CAMPAIGN_A, CAMPAIGN_B),
        (KEY_B, CAMPAIGN_B, CAMPAIGN_A),
    ] {
        for s in spellings(other) {
            for p in routes(&s) {
                let r = cg.query_as(&p, Some(key));
                assert_eq!(r.status, 404, "{key} {p}: {}", r.body);
                assert!(!r.body.contains("clicks"), "{p}: {}", r.body);
            }
            // Admin reaches the same campaign through the same spelling: the spelling
            // is a real route to it, so the 404 above is the tenant check.
            let p = format!("/v1/campaigns/{s}/metrics?window=1d");
            let r = cg.query_as(&p, Some(KEY_ADMIN));
            assert_eq!(r.status, 200, "admin {p}: {}", r.body);
            assert_eq!(r.json()["campaign_id"], other, "{p}");
        }
        for s in spellings(own) {
            for p in routes(&s) {
                let r = cg.query_as(&p, Some(key));
                assert_eq!(r.status, 200, "{key} {p}: {}", r.body);
                assert_eq!(r.json()["campaign_id"], own, "{p}");
            }
        }
    }
    // Not ids: 400 naming the field, for the tenant as for admin (nothing is looked up).
    for bad in ["%2532%2532", "22%00", "%FF", "2%202", "-22", "%2D22", "x"] {
        for key in [KEY_A, KEY_ADMIN] {
            let p = format!("/v1/campaigns/{bad}/metrics?window=1d");
            let r = cg.query_as(&p, Some(key));
            assert_eq!(r.status, 400, "{key} {p}: {}", r.body);
            assert!(!r.body.contains("clicks"), "{p}: {}", r.body);
        }
    }
}

/// With Redis as the query backend every tenant reads Redis through the same read
/// interface as admin: an advertiser's `/v1/top` is its own top `n` from Redis, and the
/// encoded-id check holds there too.
#[test]
fn tenants_read_redis_through_the_same_interface() {
    let redis = std::env::var("CLICKGATE_TEST_REDIS").unwrap_or_else(|_| {
        panic!("CLICKGATE_TEST_REDIS is not set: run the tests through scripts/test.sh (it starts Redis and sets it)")
    });
    let tmp = tempfile::tempdir().unwrap();
    let keys = keys_file(tmp.path());
    let prefix = format!("tenant{}-{}:", std::process::id(), common::now_ms());
    let cg = Clickgate::run(&[
        "--api-keys-file",
        &keys,
        "--redis-url",
        &redis,
        "--redis-key-prefix",
        &prefix,
        "--redis-flush-interval-ms",
        "100",
    ]);
    ingest(&cg);
    wait_visible(&cg);
    let ads = |key: &str, n: u64| -> Vec<(u64, u64)> {
        let r = cg.query_as(&format!("/v1/top?window=1d&n={n}"), Some(key));
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()["ads"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| (a["ad_id"].as_u64().unwrap(), a["clicks"].as_u64().unwrap()))
            .collect()
    };
    // Globally B's 2201 (2 clicks) outranks A's 1102 (1); A's own top 2 still has both
    // of its ads, and never B's.
    assert_eq!(ads(KEY_ADMIN, 2), vec![(1101, 2), (2201, 2)]);
    assert_eq!(ads(KEY_A, 2), vec![(1101, 2), (1102, 1)]);
    assert_eq!(ads(KEY_A, 1), vec![(1101, 2)]);
    assert_eq!(ads(KEY_B, 10), vec![(2201, 2)]);
    for p in [
        format!(
            "/v1/campaigns/%3{}%3{}/metrics?window=1d",
            CAMPAIGN_B / 10,
            CAMPAIGN_B % 10
        ),
        format!("/v1/campaigns/+{CAMPAIGN_B}/metrics?window=1d"),
    ] {
        assert_eq!(cg.query_as(&p, Some(KEY_A)).status, 404, "{p}");
        assert_eq!(cg.query_as(&p, Some(KEY_ADMIN)).status, 200, "{p}");
    }
}
