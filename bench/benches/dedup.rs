//! Dedup: `SharedBloom::check_and_insert` (the box-wide filter every core checks in
//! place, what the dataplane runs) and the single-owner `RotatingBloom`, sized for 10M
//! events per window at 0.1% false positives, against a naive rotation over separate
//! plain `BloomFilter`s.
//!
//! Run: `cargo bench -p clickgate-bench --bench dedup`.
//!
//! The filters are pre-filled to design load (one window of distinct events) so that
//! probes hit DRAM as they would in production, not a warm cache over an empty table.
//!
//! `RotatingBloom` is a blocked filter (one check reads G adjacent cache lines); the naive
//! rotation probes k random lines per generation and stops at the first clear bit. The
//! rotation group measures a call that crosses a generation boundary, which used to clear
//! a whole generation (a ~27 MiB memset) and now zeroes at most one block.

use std::hint::black_box;

use clickgate_core::bloom::{bloom_params, BloomFilter, RotatingBloom, SharedBloom};
use clickgate_core::hash::mix64;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const WINDOW_MS: u64 = 600_000;
const ITEMS_PER_WINDOW: u64 = 10_000_000;
const FP_RATE: f64 = 0.001;
const GENERATIONS: u32 = 4;

/// The obvious layout: G separate filters, each checked in turn.
struct NaiveRotating {
    gens: Vec<BloomFilter>,
    current: usize,
}

impl NaiveRotating {
    fn new() -> Self {
        let g = GENERATIONS as u64;
        let p_gen = 1.0 - (1.0 - FP_RATE).powf(1.0 / g as f64);
        let params = bloom_params(ITEMS_PER_WINDOW.div_ceil(g - 1), p_gen);
        NaiveRotating {
            gens: (0..g).map(|_| BloomFilter::new(params)).collect(),
            current: 0,
        }
    }

    fn check_and_insert(&mut self, h: u64) -> bool {
        let seen = self.gens.iter().any(|f| f.contains(h));
        self.gens[self.current].insert(h);
        seen
    }
}

fn bench_dedup(c: &mut Criterion) {
    let mut rotating = RotatingBloom::new(WINDOW_MS, GENERATIONS, ITEMS_PER_WINDOW, FP_RATE, 0);
    let mut naive = NaiveRotating::new();
    let shared = SharedBloom::new(WINDOW_MS, GENERATIONS, ITEMS_PER_WINDOW, FP_RATE, 0);
    eprintln!(
        "SharedBloom: G={} k={} {:.1} bits/event, {} MiB",
        shared.generations(),
        shared.hashes(),
        shared.bits_per_event(),
        shared.memory_bytes() >> 20
    );
    eprintln!(
        "RotatingBloom: G={} k={} {:.1} bits/event, {} MiB",
        rotating.generations(),
        rotating.hashes(),
        rotating.bits_per_event(),
        rotating.memory_bytes() >> 20
    );
    // One window of distinct events spread over its G-1 spans.
    let span = WINDOW_MS / (GENERATIONS as u64 - 1);
    let per_span = ITEMS_PER_WINDOW / (GENERATIONS as u64 - 1);
    for i in 0..ITEMS_PER_WINDOW {
        let now = (i / per_span) * span;
        rotating.check_and_insert(mix64(i), now);
        if i % per_span == 0 {
            while !shared.clear_ahead_step(now, 64) {}
        }
        shared.check_and_insert(&shared.view(now), mix64(i));
        if i / per_span != (i.saturating_sub(1)) / per_span {
            naive.current = (naive.current + 1) % naive.gens.len();
        }
        naive.check_and_insert(mix64(i));
    }
    let now = WINDOW_MS - 1;

    let mut g = c.benchmark_group("dedup/10M@0.1%");
    g.throughput(Throughput::Elements(1));
    let mut next = ITEMS_PER_WINDOW;
    g.bench_function("RotatingBloom new event", |b| {
        b.iter(|| {
            next += 1;
            black_box(rotating.check_and_insert(mix64(next), now))
        })
    });
    let mut dup = 0u64;
    g.bench_function("RotatingBloom duplicate", |b| {
        b.iter(|| {
            dup = (dup + 1) % ITEMS_PER_WINDOW;
            black_box(rotating.check_and_insert(mix64(dup), now))
        })
    });
    let view = shared.view(now);
    let mut next_shared = ITEMS_PER_WINDOW;
    g.bench_function("SharedBloom new event", |b| {
        b.iter(|| {
            next_shared += 1;
            black_box(shared.check_and_insert(&view, mix64(next_shared)))
        })
    });
    let mut dup_shared = 0u64;
    g.bench_function("SharedBloom duplicate", |b| {
        b.iter(|| {
            dup_shared = (dup_shared + 1) % ITEMS_PER_WINDOW;
            black_box(shared.check_and_insert(&view, mix64(dup_shared)))
        })
    });
    let mut next_naive = ITEMS_PER_WINDOW;
    g.bench_function("naive G plain filters new event", |b| {
        b.iter(|| {
            next_naive += 1;
            black_box(naive.check_and_insert(mix64(next_naive)))
        })
    });
    g.finish();

    // The stall a core takes at each generation boundary: every call crosses one.
    let mut g = c.benchmark_group("dedup/rotation");
    let mut t = now;
    g.bench_function("RotatingBloom call crossing a boundary", |b| {
        b.iter(|| {
            t += span;
            black_box(rotating.check_and_insert(1, t))
        })
    });
    g.finish();
}

criterion_group!(benches, bench_dedup);
criterion_main!(benches);
