//! Design invariant: no allocation per event on the hot path after warm-up. A counting
//! global allocator watches the dataplane's own per-request function
//! (`clickgate_dataplane::pipeline::ingest`: parse, dedup, fraud gate with a rule set of
//! every kind, record encode, aggregation), single events and 100-event batches, and the
//! shipper's drain + recycle, over rounds of fresh events once the maps and sketches are
//! warm.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use clickgate_bench::corpus::{lines, set_generation, RULES_JSON};
use clickgate_bench::pipeline::Pipeline;

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);
/// `CLICKGATE_ALLOC_TRACE=N`: print the stack of every Nth counted allocation.
static TRACE_EVERY: AtomicU64 = AtomicU64::new(0);

fn counted(size: usize) {
    let n = ALLOCS.fetch_add(1, Ordering::Relaxed);
    BYTES.fetch_add(size as u64, Ordering::Relaxed);
    let every = TRACE_EVERY.load(Ordering::Relaxed);
    if every > 0 && n.is_multiple_of(every) {
        COUNTING.store(false, Ordering::SeqCst);
        eprintln!(
            "allocation of {size} bytes:\n{}",
            std::backtrace::Backtrace::force_capture()
        );
        COUNTING.store(true, Ordering::SeqCst);
    }
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            counted(layout.size());
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            counted(new_size);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const LINES: usize = 10_000;
const WARMUP_ROUNDS: u32 = 4;
const MEASURED_ROUNDS: u32 = 6;

/// What the measured rounds allocated: on the per-event path, and in the shipper's
/// drain + recycle (once per delta, every ≤ 1 s in the dataplane).
struct Counted {
    events: u64,
    event_allocs: u64,
    event_bytes: u64,
    ship_allocs: u64,
    ships: u64,
}

fn count(on: bool) -> (u64, u64) {
    let got = (
        ALLOCS.load(Ordering::Relaxed),
        BYTES.load(Ordering::Relaxed),
    );
    ALLOCS.store(0, Ordering::Relaxed);
    BYTES.store(0, Ordering::Relaxed);
    COUNTING.store(on, Ordering::SeqCst);
    got
}

fn allocations_after_warmup(rules: Option<&str>) -> Counted {
    let mut corpus = lines(LINES);
    let mut p = Pipeline::new(rules);
    let mut c = Counted {
        events: 0,
        event_allocs: 0,
        event_bytes: 0,
        ship_allocs: 0,
        ships: 0,
    };
    for generation in 1..=WARMUP_ROUNDS + MEASURED_ROUNDS {
        let measured = generation > WARMUP_ROUNDS;
        set_generation(&mut corpus, generation);
        let before = p.accepted;
        count(measured);
        if generation % 2 == 0 {
            for &(s, e, _) in &corpus.spans {
                p.event(&corpus.buf[s..e]);
            }
        } else {
            for chunk in corpus.spans.chunks(100) {
                let (from, to) = (chunk[0].0, chunk[chunk.len() - 1].1);
                p.request(false, &corpus.buf[from..to]);
            }
        }
        let (allocs, bytes) = count(measured);
        p.ship();
        let (ship_allocs, _) = count(false);
        if measured {
            c.events += p.accepted - before;
            c.event_allocs += allocs;
            c.event_bytes += bytes;
            c.ship_allocs += ship_allocs;
            c.ships += 1;
        }
    }
    c
}

// One test function: the counter is process-global, so the two cases must not overlap.
#[test]
fn hot_path_allocates_nothing_per_event_after_warmup() {
    if let Some(n) = std::env::var("CLICKGATE_ALLOC_TRACE")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        TRACE_EVERY.store(n, Ordering::Relaxed);
    }
    for (name, rules) in [("no rules", None), ("every rule kind", Some(RULES_JSON))] {
        let c = allocations_after_warmup(rules);
        assert_eq!(
            c.events,
            u64::from(MEASURED_ROUNDS) * LINES as u64,
            "{name}: every measured event is new (fresh ids each round)"
        );
        assert_eq!(
            c.event_allocs, 0,
            "{name}: {} allocations ({} bytes) on the per-event path over {} events after warm-up",
            c.event_allocs, c.event_bytes, c.events
        );
        // The shipper's drain may allocate a little per delta (never per event): its
        // count must not grow with the events a delta holds (10k here).
        assert!(
            c.ship_allocs <= 4 * c.ships,
            "{name}: {} allocations over {} drains",
            c.ship_allocs,
            c.ships
        );
        eprintln!(
            "{name}: {} events, 0 allocations per event; {} allocations in {} drains",
            c.events, c.ship_allocs, c.ships
        );
    }
}
