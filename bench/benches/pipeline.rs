//! The per-core pipeline of one event, without the network and the disk:
//! parse + validate → dedup (bloom shard) → raw record encode + frame crc (what
//! `CoreLog::append_with` does in memory; the write itself is the async group commit)
//! → pre-aggregation. Budget (design.md): ≥ 2 M events/s per core.
//!
//! `cargo bench -p clickgate-bench --bench pipeline`
//!
//! Every iteration gives each line a fresh event id (8 hex digits patched in place, a few
//! ns), so the bloom shard sees new events and aggregation runs, as in live traffic.

use std::hint::black_box;

use clickgate_core::agg::{AggConfig, Aggregator};
use clickgate_core::bloom::RotatingBloom;
use clickgate_core::hash::event_hash;
use clickgate_core::parse::parse_click;
use clickgate_proto::record::{encode_into, encoded_len};
use clickgate_proto::segment::{put_frame_header, FRAME_HEADER_BYTES};
use clickgate_proto::Flags;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const LINES: usize = 10_000;
const NOW_MS: u64 = 1_764_201_600_000;

struct Lines {
    buf: Vec<u8>,
    /// (start, end, id offset) of each line.
    spans: Vec<(usize, usize, usize)>,
}

fn lines() -> Lines {
    let countries = ["US", "DE", "FR", "JP", "BR", "IN"];
    let devices = ["mobile", "desktop", "tablet", "ctv", "other"];
    let mut buf = Vec::new();
    let mut spans = Vec::new();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for i in 0..LINES {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Zipf-ish: low campaign ids far more often.
        let campaign = 1 + (x % 1000) * (x % 1000) / 1000;
        let start = buf.len();
        let line = format!(
            r#"{{"event_id":"00000000-8a3b-4c1d-9e2f-{i:012x}","ts":{ts},"campaign_id":{campaign},"ad_id":{ad},"publisher_id":{publisher},"advertiser_id":{adv},"user_id":"u-{user}","ip":"10.{a}.{b}.{c}","user_agent":"Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X)","country":"{country}","device":"{device}","cost_micros":{cost}}}"#,
            ts = NOW_MS - (x % 300_000),
            ad = campaign * 100 + x % 10,
            publisher = 1 + (x >> 8) % 100,
            adv = 1 + campaign % 50,
            user = (x >> 16) % 100_000,
            a = (x >> 24) as u8,
            b = (x >> 32) as u8,
            c = (x >> 40) as u8,
            country = countries[(x >> 48) as usize % countries.len()],
            device = devices[(x >> 52) as usize % devices.len()],
            cost = 1 + (x >> 20) % 1_000_000,
        );
        let id_at = start + line.find("00000000-").expect("id");
        buf.extend_from_slice(line.as_bytes());
        spans.push((start, buf.len(), id_at));
        buf.push(b'\n');
    }
    Lines { buf, spans }
}

fn set_generation(lines: &mut Lines, generation: u32) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for &(_, _, at) in &lines.spans {
        for k in 0..8 {
            lines.buf[at + k] = HEX[((generation >> (28 - 4 * k)) & 0xf) as usize];
        }
    }
}

fn pipeline(c: &mut Criterion) {
    let mut lines = lines();
    let mut bloom = RotatingBloom::new(600_000, 4, 10_000_000, 0.001, NOW_MS);
    let mut agg = Aggregator::new(AggConfig::default());
    let mut log = vec![0u8; 4 << 20];
    let mut generation = 0u32;

    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(LINES as u64));
    group.bench_function("parse_validate_dedup_encode_aggregate", |b| {
        b.iter(|| {
            generation = generation.wrapping_add(1);
            set_generation(&mut lines, generation);
            let mut at = 0usize;
            for &(s, e, _) in &lines.spans {
                let click = match parse_click(&lines.buf[s..e], NOW_MS, 300_000) {
                    Ok(c) => c,
                    Err(e) => panic!("bench event invalid: {e}"),
                };
                let dup = bloom.check_and_insert(event_hash(&click.event_id), NOW_MS);
                let flags = Flags::default().with_duplicate(dup);
                let len = encoded_len(&click, &[]);
                if at + FRAME_HEADER_BYTES + len > log.len() {
                    at = 0;
                }
                let (head, payload) =
                    log[at..at + FRAME_HEADER_BYTES + len].split_at_mut(FRAME_HEADER_BYTES);
                encode_into(&click, flags, NOW_MS, &[], payload).expect("encode");
                put_frame_header(head, payload);
                at += FRAME_HEADER_BYTES + len;
                if !dup {
                    agg.add(&click, true, false);
                }
            }
            // A core ships its delta every ≤ 1 s; draining per 10k events overstates the
            // shipping cost, which keeps the figure honest.
            let delta = agg.drain_delta();
            black_box(delta.entries.len());
            agg.recycle(delta);
        })
    });
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
