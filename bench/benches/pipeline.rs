//! The per-core pipeline of one event, without the network and the disk: the dataplane's
//! own `pipeline::ingest` (parse + validate → dedup in the box-wide bloom → fraud gate →
//! raw record encode + frame crc into an in-memory log → pre-aggregation), called as the
//! connection code calls it. Budget: ≥ 2 M events/s per core.
//!
//! `cargo bench -p clickgate-bench --bench pipeline`
//!
//! Every iteration gives each line a fresh event id (8 hex digits patched in place, a few
//! ns), so the bloom sees new events and aggregation runs, as in live traffic.

use std::hint::black_box;

use clickgate_bench::corpus::{lines, set_generation, NOW_MS, RULES_JSON};
use clickgate_bench::pipeline::{Pipeline, SKEW_MS};
use clickgate_core::parse::parse_click;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const LINES: usize = 10_000;
/// Events per request in the batched cases (`POST /v1/clicks`).
const BATCH: usize = 100;

fn pipeline(c: &mut Criterion) {
    let mut lines = lines(LINES);
    let mut generation = 0u32;

    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(LINES as u64));
    for (name, rules) in [
        ("single_event_all_rules", Some(RULES_JSON)),
        ("single_event_no_rules", None),
    ] {
        let mut p = Pipeline::new(rules);
        group.bench_function(name, |b| {
            b.iter(|| {
                generation = generation.wrapping_add(1);
                set_generation(&mut lines, generation);
                for &(s, e, _) in &lines.spans {
                    p.event(&lines.buf[s..e]);
                }
                // A core ships its delta every ≤ 1 s; shipping per 10k events overstates
                // the shipping cost, which keeps the figure honest.
                black_box(p.ship());
            })
        });
    }
    for (name, rules) in [
        ("batch100_all_rules", Some(RULES_JSON)),
        ("batch100_no_rules", None),
    ] {
        let mut p = Pipeline::new(rules);
        group.bench_function(name, |b| {
            b.iter(|| {
                generation = generation.wrapping_add(1);
                set_generation(&mut lines, generation);
                for chunk in lines.spans.chunks(BATCH) {
                    let (from, to) = (chunk[0].0, chunk[chunk.len() - 1].1);
                    p.request(false, &lines.buf[from..to]);
                }
                black_box(p.ship());
            })
        });
    }
    // Parse + validate alone, to show what the other stages cost.
    group.bench_function("parse_validate", |b| {
        b.iter(|| {
            for &(s, e, _) in &lines.spans {
                black_box(parse_click(&lines.buf[s..e], NOW_MS, SKEW_MS).expect("valid"));
            }
        })
    });
    group.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
