//! The Redis real-time store against real Redis: a single node
//! (`CLICKGATE_TEST_REDIS`), a 3-node Redis Cluster (`CLICKGATE_TEST_REDIS_CLUSTER`) and
//! private `redis-server`s started here for outages (`CLICKGATE_TEST_REDIS_SERVER`).
//! `scripts/test.sh` (scripts/services.sh) provides all three. Every test writes under its
//! own key prefix, so tests share the servers without FLUSHALL.

mod common;

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{event, now_ms, uuid, Clickgate};

fn env_or_panic(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the tests through scripts/test.sh (it starts Redis and sets it)")
    })
}

fn redis_url() -> String {
    env_or_panic("CLICKGATE_TEST_REDIS")
}

fn prefix(name: &str) -> String {
    format!("t{}-{}-{name}:", std::process::id(), now_ms())
}

/// `clickgate run` flushing to `urls` under `prefix`, without the per-address rate limit.
fn boxed(urls: &str, prefix: &str, extra: &[&str]) -> Clickgate {
    let mut args = vec![
        "--redis-url",
        urls,
        "--redis-key-prefix",
        prefix,
        "--trusted-cidrs",
        "127.0.0.0/8",
        "--redis-flush-interval-ms",
        "100",
    ];
    args.extend_from_slice(extra);
    Clickgate::run(&args)
}

/// Posts events `users` (one click each, user `u{n}`, ad `10 + n % ads`) to `campaign`.
fn send(cg: &Clickgate, campaign: u64, users: std::ops::Range<u64>, ads: u64, id_base: u64) {
    let all: Vec<u64> = users.collect();
    for chunk in all.chunks(500) {
        let body: String = chunk
            .iter()
            .map(|&n| {
                event(&uuid(id_base + n), campaign, |v| {
                    v["user_id"] = format!("u{n}").into();
                    v["ad_id"] = (10 + n % ads).into();
                    v["cost_micros"] = (1000 + n).into();
                }) + "\n"
            })
            .collect();
        let r = cg.connect().request("POST", "/v1/clicks", &body);
        assert_eq!(r.status, 202, "{}", r.body);
        assert_eq!(r.json()["accepted"], chunk.len(), "{}", r.body);
    }
}

fn metrics_query(cg: &Clickgate, campaign: u64, window: &str, filter: &str) -> common::Response {
    let to = now_ms() + 3_600_000;
    cg.query(&format!(
        "/v1/campaigns/{campaign}/metrics?window={window}&from={}&to={to}{filter}",
        to - 3 * 24 * 3_600_000
    ))
}

/// (clicks, cost, fraud, unique) summed over the buckets of a 1d query.
fn totals(cg: &Clickgate, campaign: u64) -> Option<(u64, u64, u64, u64)> {
    let r = metrics_query(cg, campaign, "1d", "");
    if r.status != 200 {
        return None;
    }
    let j = r.json();
    let b = j["buckets"].as_array().unwrap();
    let sum = |f: &str| b.iter().map(|x| x[f].as_u64().unwrap()).sum::<u64>();
    Some((
        sum("clicks"),
        sum("cost_micros"),
        sum("fraud_clicks"),
        sum("unique_users"),
    ))
}

/// Polls until `totals` has `clicks`; fails loudly after a generous deadline.
fn wait_clicks(cg: &Clickgate, campaign: u64, clicks: u64) -> (u64, u64, u64, u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let t = totals(cg, campaign);
        if let Some(t) = t {
            if t.0 >= clicks {
                return t;
            }
        }
        assert!(
            Instant::now() < deadline,
            "Redis never showed {clicks} clicks (last {t:?})"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn cost_of(users: std::ops::Range<u64>) -> u64 {
    users.map(|n| 1000 + n).sum()
}

fn within_2pct(est: u64, truth: u64) -> bool {
    (est as f64 - truth as f64).abs() <= 0.02 * truth as f64
}

#[test]
fn two_boxes_add_up_and_merge_unique_users() {
    let url = redis_url();
    let p = prefix("two-boxes");
    let a = boxed(&url, &p, &[]);
    let b = boxed(&url, &p, &[]);
    let id = |cg: &Clickgate| std::fs::read_to_string(cg.data_dir.join("box_id")).unwrap();
    assert_ne!(id(&a), id(&b), "two boxes got the same box id");
    // Users 0..6000 on box a, 4000..10000 on box b: 12000 clicks, 10000 distinct users.
    send(&a, 1, 0..6000, 7, 0);
    send(&b, 1, 4000..10_000, 7, 1_000_000);
    let t = wait_clicks(&a, 1, 12_000);
    assert_eq!(t.0, 12_000, "clicks");
    assert_eq!(t.1, cost_of(0..6000) + cost_of(4000..10_000), "cost_micros");
    assert!(within_2pct(t.3, 10_000), "unique users {} for 10000", t.3);
    // Both boxes answer the same from Redis.
    assert_eq!(totals(&b, 1), Some(t));
}

/// A private redis-server on a free port, its data kept in `dir` across restarts.
struct PrivateRedis {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl PrivateRedis {
    fn start() -> PrivateRedis {
        let port = common::free_port();
        let mut r = PrivateRedis {
            child: None,
            port,
            dir: tempfile::tempdir().unwrap(),
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let bin = env_or_panic("CLICKGATE_TEST_REDIS_SERVER");
        let child = Command::new(bin)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.client().and_then(|c| c.get_connection()).is_err() {
            assert!(
                Instant::now() < deadline,
                "private redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn client(&self) -> redis::RedisResult<redis::Client> {
        redis::Client::open(self.url())
    }

    fn stop(&mut self) {
        let mut c = self.child.take().expect("running");
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        c.wait().unwrap();
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn redis_down_mid_traffic_then_exact_counts_after_recovery() {
    let mut r = PrivateRedis::start();
    let p = prefix("outage");
    let cg = boxed(
        &r.url(),
        &p,
        &[
            "--redis-timeout-ms",
            "500",
            "--redis-retry-backoff-max-ms",
            "500",
        ],
    );
    send(&cg, 5, 0..1000, 3, 0);
    wait_clicks(&cg, 5, 1000);
    r.stop();
    send(&cg, 5, 1000..3000, 3, 0);
    // Ingest never stopped; readyz and the metric say Redis is down, queries say 503.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = cg.query("/readyz");
        if ready.body.contains("unreachable") {
            assert_eq!(
                ready.status, 200,
                "buffering within bounds is ready: {}",
                ready.body
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "readyz never said Redis is down: {}",
            ready.body
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let m = cg.query("/metrics").body;
    assert_eq!(common::metric_sum(&m, "clickgate_redis_up"), 0.0);
    assert!(m.contains("\nclickgate_redis_flush_lag_seconds "), "{m}");
    assert_eq!(metrics_query(&cg, 5, "5m", "").status, 503);
    send(&cg, 5, 3000..4000, 3, 0);
    r.spawn();
    let t = wait_clicks(&cg, 5, 4000);
    assert_eq!((t.0, t.1), (4000, cost_of(0..4000)), "exact after recovery");
    assert!(within_2pct(t.3, 4000), "unique users {}", t.3);
    let m = cg.query("/metrics").body;
    assert!(common::metric_sum(&m, "clickgate_redis_flush_errors_total") > 0.0);
    assert_eq!(
        common::metric_sum(&m, "clickgate_redis_outbox_dropped_deltas_total"),
        0.0
    );
    // Caught up: the lag gauge goes back to 0, and the counts stay exact (nothing applied
    // twice by the retries).
    let deadline = Instant::now() + Duration::from_secs(60);
    while common::metric_sum(
        &cg.query("/metrics").body,
        "clickgate_redis_flush_lag_seconds",
    ) != 0.0
    {
        assert!(Instant::now() < deadline, "flush lag never went back to 0");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(totals(&cg, 5).unwrap().0, 4000);
}

/// One frame of clicks for campaign 9 by users `users` as `(box 1, instance 1, core,
/// delta_id)`.
fn frame_of(
    core: u32,
    delta_id: u64,
    users: std::ops::Range<u64>,
) -> impl std::ops::Deref<Target = [u8]> {
    use clickgate_core::agg::{AggConfig, Aggregator};
    let mut a = Aggregator::new(AggConfig::default());
    let ts = now_ms();
    for i in users {
        let line = event(&uuid(i), 9, |v| {
            v["ts"] = ts.into();
            v["user_id"] = format!("u{i}").into();
        });
        let c = clickgate_core::parse::parse_click(line.as_bytes(), ts, 300_000).unwrap();
        a.add(&c, true, false);
    }
    let mut buf = Vec::new();
    let f = &clickgate_proto::frames::frames_from_delta(1, 1, core, delta_id, &a.drain_delta())[0];
    clickgate_proto::frames::encode_delta(f, &mut buf).unwrap();
    clickgate_proto::frames::aligned(&buf[4..])
}

/// One frame of `n` clicks (users `u0..`) for campaign 9 from core 0.
fn frame(delta_id: u64, n: u64) -> impl std::ops::Deref<Target = [u8]> {
    frame_of(0, delta_id, 0..n)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Campaign 9's `all` bucket of the current 5m window: (clicks, cost, unique users).
async fn all_5m(q: &clickgate_controlplane::redis_store::RedisQuery) -> (u64, u64, u64) {
    let now = now_ms();
    let w = clickgate_core::window::Window::M5;
    let b = q
        .series(
            9,
            w,
            clickgate_core::agg::Dim::All,
            w.bucket_start(now),
            now + 1,
        )
        .await
        .unwrap();
    assert!(b.len() <= 1);
    b.first()
        .map_or((0, 0, 0), |b| (b.clicks, b.cost_micros, b.unique_users))
}

#[test]
fn a_flush_retried_after_a_timeout_is_applied_once() {
    use clickgate_controlplane::redis_store::*;
    let r = PrivateRedis::start();
    rt().block_on(async {
        let cfg = RedisConfig {
            urls: vec![r.url()],
            key_prefix: prefix("once"),
            timeout_ms: 300,
            ..RedisConfig::default()
        };
        let stats = std::sync::Arc::new(RedisStats::default());
        let applier = Applier::new(cfg.clone(), stats.clone());
        let conn = RedisConn::connect(&cfg.urls, Duration::from_secs(5))
            .await
            .unwrap();
        let f7 = frame(7, 50);
        // Redis takes the pipeline but answers after our timeout (the scripts are loaded,
        // so the paused EVALSHAs really apply once the pause ends).
        let mut admin = r.client().unwrap().get_connection().unwrap();
        for s in FLUSH_SCRIPTS {
            redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(s)
                .exec(&mut admin)
                .unwrap();
        }
        redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(1000)
            .arg("ALL")
            .exec(&mut admin)
            .unwrap();
        assert!(
            applier
                .apply_round(&conn, &[&f7[..]], now_ms())
                .await
                .is_err(),
            "should time out"
        );
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let conn = RedisConn::connect(&cfg.urls, Duration::from_secs(5))
            .await
            .unwrap();
        let q = RedisQuery::new(&cfg, stats.clone());
        assert_eq!(all_5m(&q).await.0, 50, "the timed-out flush did apply");
        // The retry finds it applied; so does a replay of the same frame, and an older one.
        assert_eq!(
            applier
                .apply_round(&conn, &[&f7[..]], now_ms())
                .await
                .unwrap(),
            0
        );
        let f6 = frame(6, 50);
        assert_eq!(
            applier
                .apply_round(&conn, &[&f6[..]], now_ms())
                .await
                .unwrap(),
            0
        );
        assert_eq!(all_5m(&q).await, (50, 50 * 500_000, 50));
        // A newer frame still applies.
        let f8 = frame(8, 5);
        assert!(
            applier
                .apply_round(&conn, &[&f8[..]], now_ms())
                .await
                .unwrap()
                > 0
        );
        assert_eq!(all_5m(&q).await.0, 55);
    });
}

/// Rounds merge frames of several cores per key; a round cut differently from one that
/// partly reached Redis (a crash before the cursor moved) adds each frame once; a frame
/// the outbox holds twice counts once.
#[test]
fn merged_rounds_apply_each_frame_once_however_they_are_cut() {
    use clickgate_controlplane::redis_store::*;
    let cfg = RedisConfig {
        urls: vec![redis_url()],
        key_prefix: prefix("rounds"),
        ..RedisConfig::default()
    };
    rt().block_on(async {
        let stats = std::sync::Arc::new(RedisStats::default());
        let applier = Applier::new(cfg.clone(), stats.clone());
        let conn = RedisConn::connect(&cfg.urls, Duration::from_secs(5))
            .await
            .unwrap();
        let q = RedisQuery::new(&cfg, stats.clone());
        let (a1, a2, a3) = (
            frame_of(0, 1, 0..100),
            frame_of(0, 2, 100..130),
            frame_of(0, 3, 130..140),
        );
        let (b1, b2) = (frame_of(1, 1, 1000..1200), frame_of(1, 2, 1200..1207));
        let now = now_ms();
        // Round 1 reached Redis; its cursor did not move; round 2 is cut longer.
        assert!(
            applier
                .apply_round(&conn, &[&a1[..], &b1[..]], now)
                .await
                .unwrap()
                > 0
        );
        assert_eq!(all_5m(&q).await.0, 300);
        let round2: Vec<&[u8]> = vec![&a1, &b1, &a2, &b2, &a2, &a3];
        assert!(applier.apply_round(&conn, &round2, now).await.unwrap() > 0);
        assert!(
            stats
                .mixed_groups
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0
        );
        assert_eq!(
            stats
                .duplicate_frames
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        let (clicks, _, users) = all_5m(&q).await;
        assert_eq!(clicks, 100 + 30 + 10 + 200 + 7);
        assert!(within_2pct(users, 347), "{users} unique users");
        // The whole of it again, merged: nothing applies.
        assert_eq!(applier.apply_round(&conn, &round2, now).await.unwrap(), 0);
        assert_eq!(all_5m(&q).await.0, 347);
    });
}

/// Sketches written as PFADD of crafted elements land on the very registers a PFMERGE
/// of the whole sketch sets: every key's `PFCOUNT` agrees, and matches the truth.
#[test]
fn pfadd_of_registers_equals_pfmerge_of_sketches() {
    use clickgate_controlplane::redis_store::*;
    rt().block_on(async {
        let frames: Vec<_> = (0..4u64)
            .map(|k| frame_of(k as u32, 1, k * 6000..k * 6000 + 500 + k * 1500))
            .collect();
        let bodies: Vec<&[u8]> = frames.iter().map(|f| &f[..]).collect();
        let mut counts = Vec::new();
        for (name, registers_max) in [("pfadd", 16_384), ("pfmerge", 0)] {
            let cfg = RedisConfig {
                urls: vec![redis_url()],
                key_prefix: prefix(name),
                pfadd_registers_max: registers_max,
                ..RedisConfig::default()
            };
            let stats = std::sync::Arc::new(RedisStats::default());
            let applier = Applier::new(cfg.clone(), stats.clone());
            let conn = RedisConn::connect(&cfg.urls, Duration::from_secs(5))
                .await
                .unwrap();
            // One frame per round, so keys get several writes each.
            for b in &bodies {
                applier.apply_round(&conn, &[*b], now_ms()).await.unwrap();
            }
            let s = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
            if registers_max == 0 {
                assert_eq!(s(&stats.pfadd_registers), 0);
            } else {
                assert_eq!(s(&stats.merged_sketches), 0);
            }
            let mut con = redis::Client::open(redis_url().as_str())
                .unwrap()
                .get_connection()
                .unwrap();
            let keys: BTreeSet<String> = redis::cmd("KEYS")
                .arg(format!("{}users:*", cfg.key_prefix))
                .query(&mut con)
                .unwrap();
            assert!(keys.len() >= 15, "{keys:?}");
            let mut c = Vec::new();
            for k in &keys {
                let n: u64 = redis::cmd("PFCOUNT").arg(k).query(&mut con).unwrap();
                c.push((k[cfg.key_prefix.len()..].to_string(), n));
            }
            counts.push(c);
        }
        assert_eq!(counts[0], counts[1]);
        let all = counts[0]
            .iter()
            .find(|(k, _)| k.ends_with(":all") && k.contains(":5m:"));
        assert!(
            within_2pct(all.unwrap().1, 500 + 2000 + 3500 + 5000),
            "{all:?}"
        );
    });
}

#[test]
fn cluster_answers_like_single_node_and_the_embedded_store_and_keys_carry_ttls() {
    let (single, cluster) = (redis_url(), env_or_panic("CLICKGATE_TEST_REDIS_CLUSTER"));
    let p = prefix("same");
    let s = boxed(&single, &p, &[]);
    let c = boxed(&cluster, &p, &[]);
    let e = Clickgate::run(&["--trusted-cidrs", "127.0.0.0/8"]);
    let campaigns = [21u64, 22, 23];
    for (i, cg) in [&s, &c, &e].into_iter().enumerate() {
        for (k, &campaign) in campaigns.iter().enumerate() {
            let k = k as u64;
            send(
                cg,
                campaign,
                k * 100..k * 100 + 300 + k * 50,
                5 + k,
                i as u64 * 10_000_000 + k * 100_000,
            );
        }
    }
    for &campaign in &campaigns {
        let n = 300 + (campaign - 21) * 50;
        for cg in [&s, &c, &e] {
            wait_clicks(cg, campaign, n);
        }
    }
    let queries: Vec<(u64, &str, &str)> = campaigns
        .iter()
        .flat_map(|&k| {
            [
                ("5m", ""),
                ("1h", ""),
                ("1d", ""),
                ("5m", "&country=US"),
                ("1h", "&device=mobile"),
                ("5m", "&ad_id=11"),
                ("1d", "&publisher_id=42"),
            ]
            .into_iter()
            .map(move |(w, f)| (k, w, f))
        })
        .collect();
    for (campaign, w, f) in queries {
        let [js, jc, je] = [&s, &c, &e].map(|cg| {
            let r = metrics_query(cg, campaign, w, f);
            assert_eq!(r.status, 200, "{}", r.body);
            r.json()
        });
        assert_eq!(js, jc, "single vs cluster: campaign {campaign} {w}{f}");
        let strip = |j: &serde_json::Value| {
            j["buckets"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| {
                    (
                        b["start"].clone(),
                        b["clicks"].clone(),
                        b["cost_micros"].clone(),
                        b["fraud_clicks"].clone(),
                    )
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(
            strip(&js),
            strip(&je),
            "redis vs embedded: campaign {campaign} {w}{f}"
        );
        for (a, b) in js["buckets"]
            .as_array()
            .unwrap()
            .iter()
            .zip(je["buckets"].as_array().unwrap())
        {
            let (a, b) = (
                a["unique_users"].as_u64().unwrap(),
                b["unique_users"].as_u64().unwrap(),
            );
            assert!(within_2pct(a, b), "unique users {a} vs {b}");
        }
    }
    for w in ["5m", "1h", "1d"] {
        let top = |cg: &Clickgate| {
            let r = cg.query(&format!("/v1/top?window={w}&n=4"));
            assert_eq!(r.status, 200, "{}", r.body);
            r.json()
        };
        let (ts, tc, te) = (top(&s), top(&c), top(&e));
        assert_eq!(ts, tc, "top {w}: single vs cluster");
        assert_eq!(ts["ads"], te["ads"], "top {w}: redis vs embedded");
        assert_eq!(ts["ads"].as_array().unwrap().len(), 4);
    }
    // TTLs: bucket end + 24 h (5m), + 7 d (1h), + 90 d (1d).
    let mut con = redis::Client::open(single.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let keys: BTreeSet<String> = redis::cmd("KEYS")
        .arg(format!("{p}*"))
        .query(&mut con)
        .unwrap();
    assert!(
        keys.iter()
            .any(|k| k.starts_with(&format!("{p}counter:{{21}}:5m:"))),
        "{keys:?}"
    );
    let now = now_ms() as i64;
    for k in &keys {
        let pttl: i64 = redis::cmd("PTTL").arg(k).query(&mut con).unwrap();
        assert!(pttl > 0, "{k} has no TTL");
        let ttl_of = |w: &str| match w {
            "5m" => (300_000i64, 24 * 3_600_000i64),
            "1h" => (3_600_000, 7 * 24 * 3_600_000),
            _ => (86_400_000, 90 * 24 * 3_600_000),
        };
        let parts: Vec<&str> = k[p.len()..].split(':').collect();
        if matches!(parts[0], "counter" | "users") {
            let (len, ttl) = ttl_of(parts[2]);
            let start: i64 = parts[3].parse().unwrap();
            let expected = start + len + ttl - now;
            assert!(
                (pttl - expected).abs() < 120_000,
                "{k}: PTTL {pttl}, expected about {expected}"
            );
        }
    }
}

/// `rediss://`: a private redis-server speaking TLS only, with a certificate from a CA the
/// box is given (`--redis-tls-ca`). Counts flushed and read back over TLS are exact; a
/// box that does not trust the CA keeps its deltas and reports Redis unreachable.
#[test]
fn rediss_flushes_and_reads_over_tls_with_the_given_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let (cert, key) = common::localhost_cert(tmp.path());
    let port = common::free_port();
    let bin = env_or_panic("CLICKGATE_TEST_REDIS_SERVER");
    let mut server = Command::new(bin)
        .args(["--port", "0", "--bind", "127.0.0.1", "--save", ""])
        .args(["--tls-port", &port.to_string(), "--tls-auth-clients", "no"])
        .arg("--tls-cert-file")
        .arg(&cert)
        .arg("--tls-key-file")
        .arg(&key)
        .arg("--tls-ca-cert-file")
        .arg(&cert)
        .arg("--dir")
        .arg(tmp.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start redis-server with TLS (Debian's is built with it)");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "TLS redis-server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let url = format!("rediss://localhost:{port}");
    let p = prefix("tls");
    let ca = cert.display().to_string();
    let cg = boxed(&url, &p, &["--redis-tls-ca", &ca]);
    send(&cg, 1, 0..500, 3, 0);
    let t = wait_clicks(&cg, 1, 500);
    assert_eq!((t.0, t.1), (500, cost_of(0..500)));
    assert_eq!(cg.query("/readyz").status, 200);

    // The system's trust store does not know this CA: the box keeps its deltas (they
    // fit the outbox, so it stays ready) and says Redis is unreachable.
    let untrusting = boxed(&url, &prefix("tls-untrusted"), &[]);
    send(&untrusting, 2, 0..10, 1, 5_000);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = untrusting.query("/readyz");
        let j = r.json();
        if j["redis"] == "unreachable" && j["redis_backlog_bytes"].as_u64() > Some(0) {
            break;
        }
        assert!(Instant::now() < deadline, "/readyz: {}", r.body);
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = server.kill();
    let _ = server.wait();
}

/// Chaos: Redis down long enough to fill the outbox (its 1 MiB floor). Deltas past it are
/// not kept for Redis, and that is marked: counted in
/// `clickgate_redis_outbox_dropped_deltas_total` and `/readyz` 503 (`redis_outbox_full`)
/// while it lasts; ingest never stops. When Redis returns, what the outbox kept is
/// written, the box is ready again, and counts written before the outage are exact.
#[test]
fn chaos_redis_down_until_the_outbox_is_full_is_counted_and_marked() {
    let mut r = PrivateRedis::start();
    let p = prefix("outbox-full");
    let cg = boxed(
        &r.url(),
        &p,
        &[
            "--redis-spill-bytes-max",
            "1048576",
            "--redis-retry-backoff-max-ms",
            "500",
        ],
    );
    send(&cg, 5, 0..300, 3, 0);
    wait_clicks(&cg, 5, 300);
    r.stop();
    let dropped = |cg: &Clickgate| {
        common::metric_sum(
            &cg.query("/metrics").body,
            "clickgate_redis_outbox_dropped_deltas_total",
        )
    };
    let mut campaign = 100u64;
    let mut full_seen = false;
    while dropped(&cg) == 0.0 {
        assert!(campaign < 400, "1 MiB of outbox never filled");
        // Many campaigns and users per round: large deltas.
        for c in campaign..campaign + 10 {
            send(&cg, c, 0..200, 20, c * 1_000_000);
        }
        campaign += 10;
        std::thread::sleep(Duration::from_millis(150));
        let ready = cg.query("/readyz");
        full_seen |= ready.status == 503 && ready.body.contains("\"redis_outbox_full\":true");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !full_seen {
        let ready = cg.query("/readyz");
        full_seen = ready.status == 503 && ready.body.contains("\"redis_outbox_full\":true");
        assert!(
            Instant::now() < deadline,
            "/readyz never said the outbox is full: {}",
            ready.body
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    r.spawn();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = cg.query("/readyz");
        if ready.status == 200 && ready.body.contains("\"redis\":\"up\"") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never ready again: {}",
            ready.body
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(dropped(&cg) > 0.0);
    let t = wait_clicks(&cg, 5, 300);
    assert_eq!(
        (t.0, t.1),
        (300, cost_of(0..300)),
        "counts before the outage"
    );
}
