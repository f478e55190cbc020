//! The per-core pipeline of one event, without the network and the disk:
//! parse + validate → dedup (bloom shard) → fraud gate → raw record encode + frame crc
//! (what `CoreLog::append_with` does in memory; the write itself is the async group
//! commit) → pre-aggregation (`clickgate_bench::pipeline`). Budget (design.md): ≥ 2 M events/s per core.
//!
//! `cargo bench -p clickgate-bench --bench pipeline`
//!
//! Every iteration gives each line a fresh event id (8 hex digits patched in place, a few
//! ns), so the bloom shard sees new events and aggregation runs, as in live traffic.

use std::hint::black_box;

use clickgate_bench::corpus::{lines, set_generation, NOW_MS, RULES_JSON};
use clickgate_bench::pipeline::Pipeline;
use clickgate_core::bloom::RotatingBloom;
use clickgate_core::hash::event_hash;
use clickgate_core::parse::parse_click;
use clickgate_proto::record::{encode_into, encoded_len};
use clickgate_proto::segment::{put_frame_header, FRAME_HEADER_BYTES};
use clickgate_proto::Flags;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const LINES: usize = 10_000;

fn pipeline(c: &mut Criterion) {
    let mut lines = lines(LINES);
    let mut bloom = RotatingBloom::new(600_000, 4, 10_000_000, 0.001, NOW_MS);
    let mut log = vec![0u8; 4 << 20];
    let mut generation = 0u32;

    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(LINES as u64));
    // Every stage the dataplane runs per event, with a rule set of every kind (contract §4).
    for (name, rules) in [
        (
            "parse_validate_dedup_fraud_encode_aggregate",
            Some(RULES_JSON),
        ),
        ("parse_validate_dedup_encode_aggregate", None),
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
    // The same without aggregation, to show what each stage costs.
    group.bench_function("parse_validate_dedup_encode", |b| {
        b.iter(|| {
            generation = generation.wrapping_add(1);
            set_generation(&mut lines, generation);
            let mut at = 0usize;
            for &(s, e, _) in &lines.spans {
                let click = parse_click(&lines.buf[s..e], NOW_MS, 300_000).expect("valid");
                let dup = bloom.check_and_insert(event_hash(&click.event_id), NOW_MS);
                let len = encoded_len(&click, &[]);
                if at + FRAME_HEADER_BYTES + len > log.len() {
                    at = 0;
                }
                let (head, payload) =
                    log[at..at + FRAME_HEADER_BYTES + len].split_at_mut(FRAME_HEADER_BYTES);
                encode_into(
                    &click,
                    Flags::default().with_duplicate(dup),
                    NOW_MS,
                    &[],
                    payload,
                )
                .expect("encode");
                put_frame_header(head, payload);
                at += FRAME_HEADER_BYTES + len;
            }
            black_box(at);
        })
    });
    group.bench_function("parse_validate", |b| {
        b.iter(|| {
            for &(s, e, _) in &lines.spans {
                black_box(parse_click(&lines.buf[s..e], NOW_MS, 300_000).expect("valid"));
            }
        })
    });
    group.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
