//! Event parsing: sonic-rs vs simd-json on the same serde struct, plus the shipped
//! `parse_click` (sonic-rs, hand-written visitor, full docs/schema.md validation).
//!
//! Run: `cargo bench -p clickgate-bench --bench parse`. Figures go to bench/PARSE.md.
//!
//! Before criterion runs, it prints the minimum time per event over many batches for the
//! serde struct and `parse_click`, side by side: on a shared box criterion's means move
//! 2x with the neighbours' load, while the minimum stays within a few ns run to run.
//!
//! Both libraries get the input the same way: copied into a reused scratch buffer each
//! iteration (simd-json parses in place, so it needs a mutable copy; sonic-rs pays the
//! same memcpy so that the difference is the parser alone). simd-json reuses its tape
//! buffers (`from_slice_with_buffers`), as a per-core dataplane would.

use std::borrow::Cow;
use std::hint::black_box;
use std::ops::Range;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use serde::Deserialize;

const NOW_MS: u64 = 1_764_201_600_123;
const SKEW_MS: u64 = 300_000;

/// The event of docs/schema.md, verbatim.
const SAMPLE: &str = r#"{
  "event_id": "6f1c2f4e-8a3b-4c1d-9e2f-0a1b2c3d4e5f",
  "ts": 1764201600123,
  "campaign_id": 12345,
  "ad_id": 678,
  "publisher_id": 42,
  "advertiser_id": 7,
  "user_id": "u-88121",
  "ip": "203.0.113.7",
  "user_agent": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X)",
  "country": "US",
  "device": "mobile",
  "cost_micros": 500000
}"#;

/// The same fields as `Click`, unvalidated: what each library's serde path produces.
#[allow(dead_code)]
#[derive(Deserialize)]
struct Event<'a> {
    #[serde(borrow)]
    event_id: Cow<'a, str>,
    ts: u64,
    campaign_id: u64,
    ad_id: u64,
    publisher_id: u64,
    advertiser_id: u64,
    #[serde(borrow)]
    user_id: Cow<'a, str>,
    #[serde(borrow)]
    ip: Cow<'a, str>,
    #[serde(borrow)]
    user_agent: Cow<'a, str>,
    #[serde(borrow)]
    country: Cow<'a, str>,
    #[serde(borrow)]
    device: Cow<'a, str>,
    cost_micros: u64,
}

const USER_AGENTS: [&str; 4] = [
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X)",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Mobile Safari/537.36",
    "Roku/DVP-12.5 (12.5.0.4174)",
];

/// 100 compact NDJSON lines with varied ids, users, addresses and agents.
fn batch() -> Vec<u8> {
    let devices = ["mobile", "desktop", "tablet", "ctv", "other"];
    let mut out = Vec::new();
    for i in 0u64..100 {
        let ip = if i % 4 == 0 {
            format!("2001:db8::{i:x}")
        } else {
            format!("203.0.113.{i}")
        };
        let country = ["US", "DE", "FR", "JP"][i as usize % 4];
        let device = devices[i as usize % devices.len()];
        let line = serde_json::json!({
            "event_id": format!("6f1c2f4e-8a3b-4c1d-9e2f-{:012x}", i * 7919),
            "ts": NOW_MS - i * 37,
            "campaign_id": 12_345 + i % 17,
            "ad_id": 678 + i,
            "publisher_id": 42 + i % 5,
            "advertiser_id": 7 + i % 3,
            "user_id": format!("u-{}", 88_121 + i * 13),
            "ip": ip,
            "user_agent": USER_AGENTS[i as usize % USER_AGENTS.len()],
            "country": country,
            "device": device,
            "cost_micros": 500_000 + i * 1_000,
        });
        serde_json::to_writer(&mut out, &line).expect("json");
        out.push(b'\n');
    }
    out
}

fn lines(buf: &[u8]) -> impl Iterator<Item = &[u8]> {
    buf.split(|&b| b == b'\n').filter(|l| !l.is_empty())
}

/// Byte ranges of the events in `buf`, found once so the split is not measured.
// One range for a single-event body: a list of ranges, not a mistaken `(0..n).collect()`.
#[allow(clippy::single_range_in_vec_init)]
fn event_ranges(buf: &[u8], ndjson: bool) -> Vec<Range<usize>> {
    if !ndjson {
        return vec![0..buf.len()];
    }
    let base = buf.as_ptr() as usize;
    lines(buf)
        .map(|l| {
            let start = l.as_ptr() as usize - base;
            start..start + l.len()
        })
        .collect()
}

/// The fastest of `rounds` passes over `events`, in ns per event.
fn min_ns_per_event(events: &[&[u8]], rounds: usize, parse: impl Fn(&[u8])) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..rounds {
        let start = Instant::now();
        for e in events {
            parse(e);
        }
        best = best.min(start.elapsed().as_nanos() as f64 / events.len() as f64);
    }
    best
}

fn print_minimums(batch: &[u8]) {
    let events: Vec<&[u8]> = lines(batch).collect();
    for _ in 0..2 {
        let serde = min_ns_per_event(&events, 3000, |l| {
            let ev: Event<'_> = sonic_rs::from_slice(l).expect("valid");
            black_box(&ev);
        });
        let click = min_ns_per_event(&events, 3000, |l| {
            black_box(clickgate_core::parse::parse_click(l, NOW_MS, SKEW_MS).expect("valid"));
        });
        eprintln!(
            "ndjson100, min of 3000 batches, ns/event: sonic-rs serde {serde:.0}, parse_click {click:.0}"
        );
    }
}

fn bench_parse(c: &mut Criterion) {
    let sample = SAMPLE.as_bytes().to_vec();
    let batch = batch();
    assert_eq!(lines(&batch).count(), 100);
    for line in lines(&batch) {
        clickgate_core::parse::parse_click(line, NOW_MS, SKEW_MS).expect("bench events are valid");
    }
    print_minimums(&batch);

    for (name, input, ndjson) in [("sample", &sample, false), ("ndjson100", &batch, true)] {
        let ranges = event_ranges(input, ndjson);
        let mut g = c.benchmark_group(format!("parse/{name}"));
        g.throughput(Throughput::Elements(ranges.len() as u64));
        let mut scratch = input.clone();

        g.bench_function("sonic-rs serde", |b| {
            b.iter(|| {
                scratch.copy_from_slice(input);
                for r in &ranges {
                    let ev: Event<'_> = sonic_rs::from_slice(&scratch[r.clone()]).expect("valid");
                    black_box(&ev);
                }
            })
        });

        let mut buffers = simd_json::Buffers::new(input.len());
        g.bench_function("simd-json serde", |b| {
            b.iter(|| {
                scratch.copy_from_slice(input);
                for r in &ranges {
                    let line = &mut scratch[r.clone()];
                    let ev: Event<'_> =
                        simd_json::serde::from_slice_with_buffers(line, &mut buffers)
                            .expect("valid");
                    black_box(&ev);
                }
            })
        });

        g.bench_function("parse_click (sonic-rs + validation)", |b| {
            b.iter(|| {
                scratch.copy_from_slice(input);
                for r in &ranges {
                    let click =
                        clickgate_core::parse::parse_click(&scratch[r.clone()], NOW_MS, SKEW_MS);
                    black_box(&click);
                }
            })
        });

        // simd-json's one-shot API, which allocates its buffers on every call.
        g.bench_function("simd-json serde (fresh buffers)", |b| {
            b.iter_batched_ref(
                || input.clone(),
                |buf| {
                    for r in &ranges {
                        let ev: Event<'_> =
                            simd_json::serde::from_slice(&mut buf[r.clone()]).expect("valid");
                        black_box(&ev);
                    }
                },
                BatchSize::SmallInput,
            )
        });
        g.finish();
    }
}

criterion_group!(benches, bench_parse);
criterion_main!(benches);
