//! Aggregation step of the per-event path: `Aggregator::add` on a realistic mix
//! (1000 campaigns with Zipf-like popularity, 10 ads each, 100 publishers, 20 countries,
//! 5 devices, 100k users, event times over two 5-minute buckets), drained and recycled once
//! per 100k events as the shipper would once per flush interval.
//!
//! Run: `cargo bench -p clickgate-bench --bench aggregate`.

use std::borrow::Cow;

use clickgate_core::agg::{AggConfig, Aggregator};
use clickgate_core::hash::mix64;
use clickgate_core::hll::Hll;
use clickgate_core::{Click, Device, EventId};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};

const EVENTS: usize = 100_000;
const CAMPAIGNS: usize = 1000;
const T0: u64 = 1_764_201_600_000;
const COUNTRIES: [&[u8; 2]; 20] = [
    b"US", b"GB", b"DE", b"FR", b"JP", b"BR", b"IN", b"CA", b"AU", b"ES", b"IT", b"NL", b"SE",
    b"MX", b"KR", b"PL", b"TR", b"AR", b"ZA", b"NG",
];

/// Deterministic generator state (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.0)
    }
}

/// Campaign index with P(k) ∝ 1/k^1.1, by inverse CDF over precomputed weights.
fn zipf_cdf() -> Vec<f64> {
    let mut acc = 0.0;
    let mut cdf: Vec<f64> = (1..=CAMPAIGNS)
        .map(|k| {
            acc += 1.0 / (k as f64).powf(1.1);
            acc
        })
        .collect();
    for c in &mut cdf {
        *c /= acc;
    }
    cdf
}

fn events(users: &[String]) -> Vec<Click<'_>> {
    let cdf = zipf_cdf();
    let mut rng = Rng(42);
    (0..EVENTS)
        .map(|_| {
            let u = (rng.next() >> 11) as f64 / (1u64 << 53) as f64;
            let campaign = cdf.partition_point(|&c| c < u) as u64 + 1;
            let r = rng.next();
            Click {
                event_id: EventId::default(),
                ts_ms: T0 + r % 600_000,
                campaign_id: campaign,
                ad_id: campaign * 10 + (r >> 20) % 10,
                publisher_id: (r >> 24) % 100,
                advertiser_id: campaign / 10,
                user_id: Cow::Borrowed(users[((r >> 32) % users.len() as u64) as usize].as_str()),
                ip: "203.0.113.7".parse().expect("literal"),
                user_agent: Cow::Borrowed("Mozilla/5.0"),
                country: *COUNTRIES[((r >> 40) % 20) as usize],
                device: Device::ALL[((r >> 48) % 5) as usize],
                cost_micros: 1 + (r >> 52) % 1_000_000,
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let users: Vec<String> = (0..100_000).map(|i| format!("u-{i}")).collect();
    let evs = events(&users);
    let mut g = c.benchmark_group("aggregate");
    g.throughput(Throughput::Elements(EVENTS as u64));
    g.sample_size(20);

    let mut agg = Aggregator::new(AggConfig::default());
    g.bench_function("add_100k_then_drain", |b| {
        b.iter(|| {
            for e in &evs {
                agg.add(e, true, false);
            }
            let d = agg.drain_delta();
            black_box(d.entries.len());
            agg.recycle(d);
        })
    });
    eprintln!("keys per 100k-event interval: {}", {
        for e in &evs {
            agg.add(e, true, false);
        }
        let d = agg.drain_delta();
        d.entries.len()
    });

    // One drain per 1M events (1 s at 1M events/s): the same 100k events ten times, so
    // keys repeat across the interval as they would at that rate.
    let mut agg = Aggregator::new(AggConfig::default());
    g.throughput(Throughput::Elements(10 * EVENTS as u64));
    g.bench_function("add_1m_then_drain", |b| {
        b.iter(|| {
            for _ in 0..10 {
                for e in &evs {
                    agg.add(e, true, false);
                }
            }
            let d = agg.drain_delta();
            black_box(d.entries.len());
            agg.recycle(d);
        })
    });
    g.throughput(Throughput::Elements(EVENTS as u64));

    let mut agg = Aggregator::new(AggConfig::default());
    g.bench_function("add_fraud_only_100k", |b| {
        b.iter(|| {
            for e in &evs {
                agg.add(e, false, true);
            }
            let d = agg.drain_delta();
            agg.recycle(d);
        })
    });

    // A plain baseline: hashing the user id once per event, the least any unique-user
    // count must do.
    g.bench_function("baseline_user_hash_100k", |b| {
        b.iter(|| {
            let mut h = Hll::new();
            for e in &evs {
                h.insert_hash(clickgate_core::hash::bytes_hash(e.user_id.as_bytes()));
            }
            black_box(h.estimate())
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
