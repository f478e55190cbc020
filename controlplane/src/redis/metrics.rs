//! The Redis side's counters and their Prometheus text (appended to `/metrics`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::outbox::Outbox;

/// `/metrics` and `/readyz` state of the Redis side.
#[derive(Debug, Default)]
pub struct RedisStats {
    pub up: AtomicBool,
    pub flushed_frames: AtomicU64,
    pub skipped_groups: AtomicU64,
    pub script_calls: AtomicU64,
    pub commands: AtomicU64,
    pub round_trips: AtomicU64,
    pub flush_errors: AtomicU64,
    pub late_entries: AtomicU64,
    pub query_errors: AtomicU64,
    /// Cell updates read from frames (an entry's 5m, 1h and 1d cells), before merging.
    pub cell_updates: AtomicU64,
    /// Cells written (one per key and round, after merging).
    pub cells_written: AtomicU64,
    pub pfadd_registers: AtomicU64,
    pub merged_sketches: AtomicU64,
    pub duplicate_frames: AtomicU64,
    /// Tags whose merged share was partly in Redis (redone frame by frame).
    pub mixed_groups: AtomicU64,
}

/// The Prometheus text of the Redis side (appended to `/metrics`).
pub fn render_metrics(stats: &RedisStats, outbox: &Outbox, out: &mut String) {
    use std::fmt::Write as _;
    let g = |v: &AtomicU64| v.load(Ordering::Relaxed);
    let lines: [(&str, &str, &str, u64); 18] = [
        ("clickgate_redis_up", "gauge", "1 when the last Redis flush or ping succeeded", stats.up.load(Ordering::Relaxed) as u64),
        ("clickgate_redis_flushed_deltas_total", "counter", "Delta frames written to Redis (or found already there)", g(&stats.flushed_frames)),
        ("clickgate_redis_script_calls_total", "counter", "Exactly-once apply scripts run (one per flush round and hash tag)", g(&stats.script_calls)),
        ("clickgate_redis_duplicate_calls_total", "counter", "Apply scripts that found their deltas already applied (retries, replays)", g(&stats.skipped_groups)),
        ("clickgate_redis_mixed_calls_total", "counter", "Apply scripts that found their deltas partly applied (redone frame by frame)", g(&stats.mixed_groups)),
        ("clickgate_redis_commands_total", "counter", "Redis commands sent by the flusher, scripts' inner commands included", g(&stats.commands)),
        ("clickgate_redis_round_trips_total", "counter", "Pipelines sent to Redis", g(&stats.round_trips)),
        ("clickgate_redis_flush_errors_total", "counter", "Failed flush rounds (the deltas stay in the outbox and are retried)", g(&stats.flush_errors)),
        ("clickgate_redis_late_entries_total", "counter", "Cell updates whose Redis keys had already expired; not written", g(&stats.late_entries)),
        ("clickgate_redis_cell_updates_total", "counter", "Cell updates read from delta frames (each 5m entry's 5m, 1h and 1d cell), before merging per key", g(&stats.cell_updates)),
        ("clickgate_redis_cells_written_total", "counter", "Cells written to Redis (one per key and flush round)", g(&stats.cells_written)),
        ("clickgate_redis_pfadd_registers_total", "counter", "Sketch registers written with PFADD", g(&stats.pfadd_registers)),
        ("clickgate_redis_merged_sketches_total", "counter", "Sketches written whole with PFMERGE", g(&stats.merged_sketches)),
        ("clickgate_redis_duplicate_frames_total", "counter", "Outbox frames left out of a round as already taken (crash duplicates)", g(&stats.duplicate_frames)),
        ("clickgate_redis_query_errors_total", "counter", "Queries that Redis failed to answer", g(&stats.query_errors)),
        ("clickgate_redis_outbox_bytes", "gauge", "Bytes of the on-disk Redis outbox", g(&outbox.stats.bytes)),
        ("clickgate_redis_outbox_backlog_bytes", "gauge", "Outbox bytes not yet in Redis", outbox.backlog_bytes()),
        ("clickgate_redis_outbox_dropped_deltas_total", "counter", "Deltas not kept for Redis because the outbox was full or failed (still in the embedded store)", g(&outbox.stats.dropped_deltas)),
    ];
    for (name, kind, help, v) in lines {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
        );
    }
    let name = "clickgate_redis_flush_lag_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Age of the oldest delta not yet written to Redis (0 when caught up)\n# TYPE {name} gauge\n{name} {}",
        flush_lag_seconds(outbox)
    );
}

/// Age of the oldest frame in the outbox not yet in Redis, 0 when caught up.
pub fn flush_lag_seconds(outbox: &Outbox) -> f64 {
    let since = outbox.stats.pending_since_ms.load(Ordering::Relaxed);
    if since == 0 {
        0.0
    } else {
        crate::now_ms().saturating_sub(since) as f64 / 1000.0
    }
}
