//! Redis flush and query figures (bench/REDIS.md): Redis commands per flushed delta,
//! flush throughput, and query latency from Redis next to the embedded store, on the same
//! frames.
//!
//! `cargo run --release -p clickgate-controlplane --example redis_bench -- redis://127.0.0.1:16379 [frames]`
//!
//! Writes under a fresh key prefix (`bench-<pid>-<ms>:`) and deletes nothing (the keys
//! expire with their TTLs); never FLUSHALLs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clickgate_controlplane::redis_store::{
    calls_for_frame, Applier, RedisConfig, RedisConn, RedisQuery, RedisStats,
};
use clickgate_controlplane::store::{Retention, Store};
use clickgate_core::agg::{AggConfig, Aggregator, Dim};
use clickgate_core::window::Window;
use clickgate_proto::frames::{access_delta, aligned, encode_delta, frames_from_delta};

const CAMPAIGNS: u64 = 200;
const CLICKS_PER_FRAME: u64 = 2_000;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Frames like a core ships every 500 ms at 4k clicks/s: 2000 clicks over 200 campaigns,
/// 8 ads each, 4 countries, 3 devices, 5 publishers, fresh users.
fn frames(n: u64, ts: u64) -> Vec<rkyv::util::AlignedVec> {
    let mut a = Aggregator::new(AggConfig::default());
    let mut out = Vec::new();
    let countries = ["US", "DE", "FR", "JP"];
    let devices = ["mobile", "desktop", "tablet"];
    for f in 0..n {
        for i in 0..CLICKS_PER_FRAME {
            let x = f * CLICKS_PER_FRAME + i;
            let line = format!(
                r#"{{"event_id":"6f1c2f4e-8a3b-4c1d-9e2f-{x:012x}","ts":{ts},"campaign_id":{},"ad_id":{},"publisher_id":{},"advertiser_id":7,"user_id":"u{}","ip":"203.0.113.7","user_agent":"","country":"{}","device":"{}","cost_micros":{}}}"#,
                x % CAMPAIGNS,
                x % 8,
                x % 5,
                x % 50_000,
                countries[(x % 4) as usize],
                devices[(x % 3) as usize],
                1000 + x % 997,
            );
            let c = clickgate_core::parse::parse_click(line.as_bytes(), ts, 300_000).unwrap();
            a.add(&c, true, false);
        }
        let mut buf = Vec::new();
        encode_delta(
            &frames_from_delta(1, 1, 0, f + 1, &a.drain_delta())[0],
            &mut buf,
        )
        .unwrap();
        out.push(aligned(&buf[4..]));
    }
    out
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort_unstable();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let url = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "redis://127.0.0.1:16379".into());
    let n: u64 = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(100);
    let now = now_ms();
    let cfg = RedisConfig {
        urls: RedisConfig::parse_urls(&url),
        key_prefix: format!("bench-{}-{now}:", std::process::id()),
        ..RedisConfig::default()
    };
    let fs = frames(n, now);
    let entries: usize = fs
        .iter()
        .map(|b| access_delta(b).unwrap().entries.len())
        .sum();
    let stats = Arc::new(RedisStats::default());
    let applier = Applier::new(cfg.clone(), stats.clone());
    let mut conn = RedisConn::connect(&cfg.urls, Duration::from_secs(5)).await?;

    let t = Instant::now();
    let mut calls = Vec::new();
    for b in &fs {
        calls.extend(calls_for_frame(b, &cfg, &applier.keys, now)?.0);
    }
    let build = t.elapsed();
    let t = Instant::now();
    // As the flusher does: 256 frames per round at most.
    applier.apply(&mut conn, &calls).await?;
    let flush = t.elapsed();
    let s = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    println!("redis: {url}  frames: {n}  entries (5m, per campaign x dim): {entries}");
    println!(
        "scripts: {}  commands: {}  round trips: {}",
        calls.len(),
        s(&stats.commands),
        s(&stats.round_trips)
    );
    println!(
        "commands per frame: {:.0}  per 5m entry: {:.2} (entry rolled up into 5m+1h+1d, counters + HLL + top)",
        s(&stats.commands) as f64 / n as f64,
        s(&stats.commands) as f64 / entries as f64
    );
    println!(
        "build calls: {:.1} ms  flush: {:.1} ms  => {:.0} frames/s, {:.0} entries/s",
        build.as_secs_f64() * 1e3,
        flush.as_secs_f64() * 1e3,
        n as f64 / (build + flush).as_secs_f64(),
        entries as f64 / (build + flush).as_secs_f64()
    );
    let t = Instant::now();
    let again = applier.apply(&mut conn, &calls).await?;
    println!(
        "replay of the same frames: {again} applied, {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );

    // Queries: the same frames in the embedded store.
    let mut store = Store::new(Retention::default(), 10_000_000);
    for b in &fs {
        store.apply_frame(access_delta(b)?, now)?;
    }
    let q = RedisQuery::new(&cfg, stats.clone());
    let day = 24 * 3600 * 1000;
    for (label, w, from) in [
        ("5m over 24 h (288 buckets)", Window::M5, now - day),
        ("1h over 24 h (24 buckets)", Window::H1, now - day),
    ] {
        let (mut r, mut e) = (Vec::new(), Vec::new());
        for i in 0..1000u64 {
            let c = i % CAMPAIGNS;
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
