//! Fraud rules: `CompiledRules::evaluate` per click with 10k blocked CIDRs, 1k user-agent
//! patterns, 1k honeypot ads, the per-IP minute counter and a risk model — the whole
//! fraud gate of one click — against the same rules with only the exact `CidrSet` in
//! place of the bloom-fronted blocklist (the baseline the pre-check must beat).
//!
//! `gate_per_click_cached_user_agents` is the same gate as the dataplane runs it, with a
//! core's `UaCache` (the corpus has a few browser user agents, as a core sees them).
//!
//! Run: `cargo bench -p clickgate-bench --bench fraud`.
//!
//! Clicks are mostly clean (as real traffic is): random public IPv4/IPv6 addresses,
//! realistic browser user agents; 1 in 16 hits a rule. The figure is ns per click.

use std::borrow::Cow;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use clickgate_core::cidr::CidrSet;
use clickgate_core::fraud::{CompiledRules, IpBlocklist, IpRate, RuleSet, UaCache};
use clickgate_core::hash::mix64;
use clickgate_core::{Click, Device, EventId};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const CIDRS: usize = 10_000;
const PATTERNS: usize = 1_000;
const HONEYPOTS: u64 = 1_000;
const CLICKS: usize = 4096;

const UAS: [&str; 4] = [
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.0 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Safari/605.1.15",
];

fn rules_json() -> String {
    let mut cidrs = Vec::with_capacity(CIDRS);
    for i in 0..CIDRS as u64 {
        let r = mix64(i);
        // A realistic mix of prefix lengths: mostly /24 and /32, some /16, some IPv6.
        let s = match i % 10 {
            0..=4 => format!("{}/24", Ipv4Addr::from(r as u32 & 0xffff_ff00)),
            5..=7 => format!("{}/32", Ipv4Addr::from(r as u32)),
            8 => format!("{}/16", Ipv4Addr::from(r as u32 & 0xffff_0000)),
            _ => format!("{}/48", Ipv6Addr::from((r as u128) << 80 | 0x2001 << 112)),
        };
        cidrs.push(serde_json::Value::String(s));
    }
    let patterns: Vec<String> = (0..PATTERNS as u64)
        .map(|i| format!("badbot-{:08x}", mix64(i) as u32))
        .collect();
    let honeypots: Vec<u64> = (0..HONEYPOTS).map(|i| 1_000_000 + i).collect();
    serde_json::json!({"rules": [
        {"id": "blocklist", "kind": "ip_block", "cidrs": cidrs},
        {"id": "bots", "kind": "user_agent", "patterns": patterns},
        {"id": "honeypots", "kind": "honeypot", "ad_ids": honeypots},
        {"id": "burst", "kind": "ip_rate"},
        {"id": "risk", "kind": "risk_model", "threshold": 0.9, "model": {"bias": -4.0,
            "weights": {"ua_bot": 3.0, "ip_rate": 0.05, "hour_night": 0.5, "ua_device_mismatch": 1.0}}}
    ]})
    .to_string()
}

fn clicks() -> Vec<Click<'static>> {
    (0..CLICKS as u64)
        .map(|i| {
            let r = mix64(i ^ 0xabcdef);
            let ip = if i % 8 == 7 {
                IpAddr::V6(Ipv6Addr::from((r as u128) << 64 | 0x2a00 << 112))
            } else {
                IpAddr::V4(Ipv4Addr::from(r as u32))
            };
            let ua = if i % 16 == 5 {
                Cow::Owned(format!(
                    "Mozilla/5.0 BADBOT-{:08x}",
                    mix64(i % PATTERNS as u64) as u32
                ))
            } else {
                Cow::Borrowed(UAS[i as usize % UAS.len()])
            };
            Click {
                event_id: EventId([i as u8; 16]),
                ts_ms: 1_764_201_600_000 + i * 10,
                campaign_id: 12345,
                ad_id: if i % 16 == 9 {
                    1_000_000 + i % HONEYPOTS
                } else {
                    678
                },
                publisher_id: 42,
                advertiser_id: 7,
                user_id: Cow::Borrowed("u-88121"),
                ip,
                user_agent: ua,
                country: *b"US",
                device: Device::Mobile,
                cost_micros: 500_000,
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let set = RuleSet::parse(&rules_json()).expect("bench rules");
    let rules = CompiledRules::compile(&set).expect("compile");
    let clicks = clicks();
    let rate = IpRate::new(65_536);

    let mut g = c.benchmark_group("fraud");
    g.throughput(Throughput::Elements(CLICKS as u64));
    g.bench_function("evaluate_all_kinds_per_click", |b| {
        b.iter(|| {
            let mut fraud = 0u32;
            for c in &clicks {
                let n = rate.hit(c.ip, c.ts_ms);
                fraud += rules.evaluate(black_box(c), n).fraud() as u32;
            }
            black_box(fraud)
        })
    });

    // The dataplane's gate: the same rules with this core's user-agent cache (what
    // `dataplane::pipeline` calls per click).
    let mut cache = UaCache::new();
    g.bench_function("gate_per_click_cached_user_agents", |b| {
        b.iter(|| {
            let mut fraud = 0u32;
            for c in &clicks {
                let n = rate.hit(c.ip, c.ts_ms);
                fraud += rules.evaluate_cached(black_box(c), n, &mut cache).fraud() as u32;
            }
            black_box(fraud)
        })
    });

    // Each kind alone, to see where the time goes.
    for (i, name) in [
        "blocklist",
        "user_agent",
        "honeypot",
        "ip_rate",
        "risk_model",
    ]
    .iter()
    .enumerate()
    {
        let one = RuleSet {
            version: 0,
            rules: vec![set.rules[i].clone()],
        };
        let one = CompiledRules::compile(&one).unwrap();
        g.bench_function(format!("only_{name}"), |b| {
            b.iter(|| {
                clicks
                    .iter()
                    .filter(|c| one.evaluate(black_box(c), 1).fraud())
                    .count()
            })
        });
    }

    let cidrs: Vec<String> = match &set.rules[0].spec {
        clickgate_core::fraud::RuleSpec::IpBlock { cidrs } => cidrs.clone(),
        _ => unreachable!(),
    };
    let bl = IpBlocklist::parse_list(&cidrs).unwrap();
    let exact = CidrSet::parse_list(&cidrs).unwrap();
    g.bench_function("ip_blocklist_bloom_then_exact", |b| {
        b.iter(|| {
            clicks
                .iter()
                .filter(|c| bl.contains(black_box(c.ip)))
                .count()
        })
    });
    g.bench_function("ip_cidrset_exact_only", |b| {
        b.iter(|| {
            clicks
                .iter()
                .filter(|c| exact.contains(black_box(c.ip)))
                .count()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
