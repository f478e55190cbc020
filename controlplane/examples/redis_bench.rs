//! Redis flush and query figures (bench/REDIS.md): flush throughput in cell updates per
//! second with the flusher's own code (`Applier::apply_round`), Redis's CPU for it, and
//! query latency from Redis next to the embedded store, on the same frames.
//!
//! `cargo run --release -p clickgate-controlplane --example redis_bench -- \
//!     [redis://127.0.0.1:16379] [frames 64] [clicks per frame 20000] [campaigns 1000]`
//!
//! Frames are what two cores ship at the soak's traffic shape (campaigns Zipf-like,
//! 20 ads each, 8 countries, 3 devices, 50 publishers, users drawn from 100k), cut into
//! flush rounds of `flush_frames_max`. Three variants run side by side on the same
//! frames, each under a fresh key prefix: `per-frame` (rounds of one frame: no merging
//! across frames), `pfmerge` (rounds merged per key, every sketch sent whole), and
//! `shipped` (the defaults: merged, small sketches as `PFADD`). A replay of the shipped
//! rounds must apply nothing. Keys expire by their TTLs; nothing is deleted or flushed.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clickgate_controlplane::redis_store::{
    Applier, RedisConfig, RedisConn, RedisQuery, RedisStats,
};
use clickgate_controlplane::store::{Retention, Store};
use clickgate_core::agg::{AggConfig, Aggregator, Dim};
use clickgate_core::window::Window;
use clickgate_proto::frames::{access_delta, aligned, encode_delta, frames_from_delta};

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A small fixed PRNG (splitmix64): the same frames every run.
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
        self.next() % n.max(1)
    }
    /// Zipf-like (s ≈ 1) over `0..n`: `n^u - 1` for uniform `u`.
    fn skewed(&mut self, n: u64) -> u64 {
        let u = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        (((n as f64 + 1.0).powf(u) - 1.0) as u64).min(n - 1)
    }
}

/// `n` frames alternating between two cores, `clicks` each.
fn frames(n: u64, clicks: u64, campaigns: u64, ts: u64) -> Vec<rkyv::util::AlignedVec> {
    let mut cores = [
        Aggregator::new(AggConfig::default()),
        Aggregator::new(AggConfig::default()),
    ];
    let mut rng = Rng(42);
    let countries = ["US", "DE", "FR", "JP", "GB", "BR", "IN", "CA"];
    let devices = ["mobile", "desktop", "tablet"];
    let mut out = Vec::new();
    let mut next_id = [1u64, 1u64];
    let mut line = String::new();
    for f in 0..n {
        let core = (f % 2) as usize;
        for i in 0..clicks {
            let x = f * clicks + i;
            let campaign = 1 + rng.skewed(campaigns);
            line.clear();
            use std::fmt::Write as _;
            write!(
                line,
                r#"{{"event_id":"6f1c2f4e-8a3b-4c1d-9e2f-{x:012x}","ts":{ts},"campaign_id":{campaign},"ad_id":{},"publisher_id":{},"advertiser_id":7,"user_id":"u{}","ip":"203.0.113.7","user_agent":"","country":"{}","device":"{}","cost_micros":{}}}"#,
                campaign * 100 + rng.below(20),
                rng.below(50),
                rng.below(100_000),
                countries[rng.below(8) as usize],
                devices[rng.below(3) as usize],
                1000 + rng.below(997),
            )
            .unwrap();
            let c = clickgate_core::parse::parse_click(line.as_bytes(), ts, 300_000).unwrap();
            cores[core].add(&c, true, false);
        }
        let mut buf = Vec::new();
        let parts = frames_from_delta(1, 1, core as u32, next_id[core], &cores[core].drain_delta());
        next_id[core] += parts.len() as u64;
        for fr in parts {
            buf.clear();
            encode_delta(&fr, &mut buf).unwrap();
            out.push(aligned(&buf[4..]));
        }
    }
    out
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort_unstable();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Redis's own CPU seconds so far (`INFO cpu`, user + sys of the server process).
async fn redis_cpu(conn: &mut RedisConn) -> anyhow::Result<f64> {
    let mut cmd = redis::cmd("INFO");
    cmd.arg("cpu");
    let info: String = match conn {
        RedisConn::Single(c) => cmd.query_async(c).await?,
        RedisConn::Cluster(c) => cmd.query_async(c).await?,
    };
    let field = |name: &str| -> f64 {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':')?.trim().parse().ok())
            .unwrap_or(0.0)
    };
    Ok(field("used_cpu_user") + field("used_cpu_sys"))
}

struct Run {
    label: &'static str,
    secs: f64,
    /// Building the plans alone (client CPU), measured in a separate pass.
    plan_secs: f64,
    redis_cpu: f64,
    cell_updates: u64,
    cells: u64,
    commands: u64,
    round_trips: u64,
}

async fn flush(
    label: &'static str,
    cfg: RedisConfig,
    rounds: &[&[rkyv::util::AlignedVec]],
    now: u64,
) -> anyhow::Result<(Run, Applier, RedisConn)> {
    let stats = Arc::new(RedisStats::default());
    let applier = Applier::new(cfg.clone(), stats.clone());
    let mut conn = RedisConn::connect(&cfg.urls, Duration::from_secs(5)).await?;
    let t = Instant::now();
    for r in rounds {
        clickgate_controlplane::redis_store::plan_round(r, &cfg, &applier.keys, now);
    }
    let plan_secs = t.elapsed().as_secs_f64();
    let cpu0 = redis_cpu(&mut conn).await?;
    let t = Instant::now();
    for r in rounds {
        applier.apply_round(&conn, r, now).await?;
    }
    let secs = t.elapsed().as_secs_f64();
    let cpu = redis_cpu(&mut conn).await? - cpu0;
    let s = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let run = Run {
        label,
        secs,
        plan_secs,
        redis_cpu: cpu,
        cell_updates: s(&stats.cell_updates),
        cells: s(&stats.cells_written),
        commands: s(&stats.commands),
        round_trips: s(&stats.round_trips),
    };
    Ok((run, applier, conn))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let url = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "redis://127.0.0.1:16379".into());
    let arg = |i: usize, d: u64| -> anyhow::Result<u64> {
        Ok(args.get(i).map(|s| s.parse()).transpose()?.unwrap_or(d))
    };
    let (n, clicks, campaigns) = (arg(2, 64)?, arg(3, 20_000)?, arg(4, 1000)?);
    let now = now_ms();
    let base = RedisConfig {
        urls: RedisConfig::parse_urls(&url),
        ..RedisConfig::default()
    };
    let t = Instant::now();
    let fs = frames(n, clicks, campaigns, now);
    let entries: usize = fs
        .iter()
        .map(|b| access_delta(b).unwrap().entries.len())
        .sum();
    println!(
        "redis: {url}  frames: {} ({n} deltas of {clicks} clicks, 2 cores, {campaigns} campaigns)  5m entries: {entries}  (built in {:.1} s)",
        fs.len(),
        t.elapsed().as_secs_f64()
    );
    let prefix = |v: &str| format!("bench-{}-{now}-{v}:", std::process::id());
    let per_frame: Vec<&[rkyv::util::AlignedVec]> = fs.chunks(1).collect();
    let rounds: Vec<&[rkyv::util::AlignedVec]> = fs.chunks(base.flush_frames_max).collect();
    let mut runs = Vec::new();
    let (r, _, _) = flush(
        "per-frame",
        RedisConfig {
            key_prefix: prefix("frame"),
            ..base.clone()
        },
        &per_frame,
        now,
    )
    .await?;
    runs.push(r);
    let (r, _, _) = flush(
        "pfmerge",
        RedisConfig {
            key_prefix: prefix("pfmerge"),
            pfadd_registers_max: 0,
            ..base.clone()
        },
        &rounds,
        now,
    )
    .await?;
    runs.push(r);
    let cfg = RedisConfig {
        key_prefix: prefix("shipped"),
        ..base.clone()
    };
    let (r, applier, conn) = flush("shipped", cfg.clone(), &rounds, now).await?;
    runs.push(r);
    println!(
        "| variant | rounds | cell updates | cells written | commands | round trips | wall s (plans alone) | cell updates/s | Redis CPU s | Redis CPU µs per cell written |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in &runs {
        let rounds = if r.label == "per-frame" {
            per_frame.len()
        } else {
            rounds.len()
        };
        println!(
            "| {} | {rounds} | {} | {} | {} | {} | {:.2} ({:.2}) | {:.0} | {:.2} | {:.2} |",
            r.label,
            r.cell_updates,
            r.cells,
            r.commands,
            r.round_trips,
            r.secs,
            r.plan_secs,
            r.cell_updates as f64 / r.secs,
            r.redis_cpu,
            r.redis_cpu * 1e6 / r.cells as f64
        );
    }
    let t = Instant::now();
    let mut again = 0;
    for r in &rounds {
        again += applier.apply_round(&conn, r, now).await?;
    }
    println!(
        "replay of the shipped rounds: {again} scripts applied (must be 0), {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    anyhow::ensure!(again == 0, "a replay applied something");

    // Queries: the same frames in the embedded store.
    let mut store = Store::new(Retention::default(), 10_000_000);
    for b in &fs {
        store.apply_frame(access_delta(b)?, now)?;
    }
    let q = RedisQuery::new(&cfg, applier.stats.clone());
    let day = 24 * 3600 * 1000;
    for (label, w, from) in [
        ("5m over 24 h (288 buckets)", Window::M5, now - day),
        ("1h over 24 h (24 buckets)", Window::H1, now - day),
    ] {
        let (mut r, mut e) = (Vec::new(), Vec::new());
        for i in 0..1000u64 {
            let c = 1 + i % campaigns.min(200);
            let t = Instant::now();
            let a = q.series(c, w, Dim::All, from, now + 1).await?;
            r.push(t.elapsed());
            let t = Instant::now();
            let b = store.series(c, w, Dim::All, from, now + 1);
            e.push(t.elapsed());
            assert_eq!(
                a.iter().map(|x| x.clicks).sum::<u64>(),
                b.iter().map(|x| x.clicks).sum::<u64>()
            );
            assert_eq!(
                a.iter().map(|x| x.cost_micros).sum::<u64>(),
                b.iter().map(|x| x.cost_micros).sum::<u64>()
            );
        }
        println!(
            "query {label}: redis p50 {:?} p99 {:?} | embedded p50 {:?} p99 {:?}",
            pct(&mut r, 0.5),
            pct(&mut r, 0.99),
            pct(&mut e, 0.5),
            pct(&mut e, 0.99)
        );
    }
    let (mut r, mut e) = (Vec::new(), Vec::new());
    for _ in 0..1000 {
        let t = Instant::now();
        let a = q.top(Window::M5, Window::M5.bucket_start(now), 10).await?;
        r.push(t.elapsed());
        let t = Instant::now();
        let b = store.top_ads(Window::M5, Window::M5.bucket_start(now), 10);
        e.push(t.elapsed());
        assert_eq!(a, b);
    }
    println!(
        "query top 10 of 5m: redis p50 {:?} p99 {:?} | embedded p50 {:?} p99 {:?}",
        pct(&mut r, 0.5),
        pct(&mut r, 0.99),
        pct(&mut e, 0.5),
        pct(&mut e, 0.99)
    );
    Ok(())
}
