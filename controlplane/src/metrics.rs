//! The controlplane's metrics: one place for names, help texts and labels, rendered in
//! the Prometheus text format on `GET /metrics`.

use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use clickgate_core::window::Window;

use crate::store::Store;

/// Labels of `clickgate_query_auth_failures_total`: no key, a wrong key, a client address
/// over its failure limit, a non-admin key on an admin route.
pub const AUTH_FAILURE_REASONS: [&str; 4] = ["missing", "invalid", "rate_limited", "forbidden"];

#[derive(Default)]
pub struct Metrics {
    pub connections_total: AtomicU64,
    pub connections_open: AtomicU64,
    pub frames_received: AtomicU64,
    pub frames_rejected: AtomicU64,
    pub acks_sent: AtomicU64,
    pub wal_commits: AtomicU64,
    pub wal_bytes: AtomicU64,
    pub snapshots: AtomicU64,
    pub snapshot_failures: AtomicU64,
    pub snapshot_bytes: AtomicU64,
    pub queries_metrics: AtomicU64,
    pub queries_top: AtomicU64,
    pub queries_bad: AtomicU64,
    /// Gaps of crashed dataplane runs counted from the local log.
    pub refills: AtomicU64,
    pub refill_failures: AtomicU64,
    /// Query API calls refused by [`crate::auth`], by [`AUTH_FAILURE_REASONS`].
    pub auth_failures: [AtomicU64; 4],
    /// API keys configured (0: the query API is open, loopback only).
    pub api_keys: AtomicU64,
    pub queries_campaigns: AtomicU64,
    /// Query API connections closed at accept: over the connection cap or the per-address cap.
    pub query_connections_refused: AtomicU64,
    /// Time the writer spent in `Store::apply_frame` (ns) and the delta entries applied
    /// there: the store's apply cost per entry.
    pub store_apply_ns: AtomicU64,
    pub store_applied_entries: AtomicU64,
    /// Receipt on the socket → durable apply (WAL fdatasync) of the slowest frame of the
    /// writer's last group, in µs: the store apply lag.
    pub store_apply_lag_us: AtomicU64,
    /// Lag gauges of other stages (`clickgate_archive_lag_records`, ...), set by whoever
    /// runs them in this process: `(name, help, value)`.
    pub stage_lags: std::sync::Mutex<Vec<(&'static str, &'static str, std::sync::Arc<AtomicU64>)>>,
    writer_failed: AtomicBool,
    /// The WAL met a transient error (disk full, descriptors) and is being retried.
    writer_stalled: AtomicBool,
}

impl Metrics {
    pub fn inc(&self, c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn set_writer_failed(&self) {
        self.writer_failed.store(true, Ordering::Relaxed);
    }

    pub fn writer_failed(&self) -> bool {
        self.writer_failed.load(Ordering::Relaxed)
    }

    pub fn set_writer_stalled(&self, stalled: bool) {
        self.writer_stalled.store(stalled, Ordering::Relaxed);
    }

    pub fn writer_stalled(&self) -> bool {
        self.writer_stalled.load(Ordering::Relaxed)
    }

    pub fn render(&self, store: &Store) -> String {
        let mut out = String::with_capacity(4096);
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut one = |name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        };
        one(
            "clickgate_control_connections_total",
            "counter",
            "Dataplane connections accepted on the control socket.",
            g(&self.connections_total),
        );
        one(
            "clickgate_control_connections_open",
            "gauge",
            "Dataplane connections open now.",
            g(&self.connections_open),
        );
        one(
            "clickgate_delta_frames_received_total",
            "counter",
            "Delta frames received from dataplane cores.",
            g(&self.frames_received),
        );
        one(
            "clickgate_delta_frames_rejected_total",
            "counter",
            "Delta frames that failed validation (connection closed).",
            g(&self.frames_rejected),
        );
        one(
            "clickgate_query_connections_refused_total",
            "counter",
            "Query API connections closed at accept (over query_connections_max or query_connections_per_address_max).",
            g(&self.query_connections_refused),
        );
        one(
            "clickgate_refills_total",
            "counter",
            "Crashed dataplane runs whose unshipped counts were refilled from the local log.",
            g(&self.refills),
        );
        one(
            "clickgate_refill_failures_total",
            "counter",
            "Refills from the local log that failed (the gap is left to billing).",
            g(&self.refill_failures),
        );
        let s = store.stats();
        one(
            "clickgate_delta_frames_applied_total",
            "counter",
            "Delta frames merged into the store.",
            s.frames_applied,
        );
        one(
            "clickgate_delta_frames_duplicate_total",
            "counter",
            "Delta frames skipped as already applied (resends).",
            s.frames_duplicate,
        );
        one(
            "clickgate_delta_acks_sent_total",
            "counter",
            "Acks sent after the delta was durable.",
            g(&self.acks_sent),
        );
        one(
            "clickgate_store_wal_commits_total",
            "counter",
            "Group commits (write + fdatasync) of the store WAL.",
            g(&self.wal_commits),
        );
        one(
            "clickgate_store_wal_bytes",
            "gauge",
            "Bytes in the store WAL since the last snapshot.",
            g(&self.wal_bytes),
        );
        one(
            "clickgate_store_snapshots_total",
            "counter",
            "Store snapshots written.",
            g(&self.snapshots),
        );
        one(
            "clickgate_store_snapshot_failures_total",
            "counter",
            "Store snapshots that failed.",
            g(&self.snapshot_failures),
        );
        one(
            "clickgate_store_snapshot_bytes",
            "gauge",
            "Size of the last snapshot.",
            g(&self.snapshot_bytes),
        );
        one(
            "clickgate_store_cells",
            "gauge",
            "Cells (window x bucket x campaign x dimension) held.",
            store.cells() as u64,
        );
        one(
            "clickgate_store_buckets",
            "gauge",
            "Buckets (window x bucket start) held.",
            store.buckets() as u64,
        );
        one(
            "clickgate_store_overflow_total",
            "counter",
            "Delta entries refused at store_cells_max.",
            s.overflow,
        );
        one(
            "clickgate_store_evicted_buckets_total",
            "counter",
            "Buckets evicted past retention.",
            s.evicted_buckets,
        );
        let last_apply_ms = store.last_apply_ms();
        one(
            "clickgate_store_last_apply_timestamp_seconds",
            "gauge",
            "Unix time (s) at which the store last applied a delta frame from any dataplane core (0: never).",
            last_apply_ms / 1000,
        );
        one(
            "clickgate_freshness_seconds",
            "gauge",
            "Seconds since the store last applied a delta frame (0 before the first). While clicks are accepted, answers lag the ingest by at most this plus one flush interval; idle cores send nothing, so alert on it only together with an ingest rate.",
            if last_apply_ms == 0 {
                0
            } else {
                crate::now_ms().saturating_sub(last_apply_ms) / 1000
            },
        );
        one(
            "clickgate_store_applied_entries_total",
            "counter",
            "Delta entries the store writer applied.",
            g(&self.store_applied_entries),
        );
        one(
            "clickgate_store_writer_failed",
            "gauge",
            "1 when the store writer stopped on an I/O error.",
            self.writer_failed() as u64,
        );
        one(
            "clickgate_store_writer_stalled",
            "gauge",
            "1 while the store WAL cannot be written (disk full, no descriptors) and is retried; deltas are refused meanwhile and resent by the dataplane.",
            self.writer_stalled() as u64,
        );
        let _ = writeln!(
            out,
            "# HELP clickgate_late_dropped_total Clicks of delta entries whose bucket was past retention, not stored (still archived and billed).\n# TYPE clickgate_late_dropped_total counter"
        );
        for w in Window::ALL {
            let _ = writeln!(
                out,
                "clickgate_late_dropped_total{{window=\"{w}\"}} {}",
                s.late_dropped[w as usize]
            );
        }
        let _ = writeln!(out, "# HELP clickgate_queries_total Query API requests.\n# TYPE clickgate_queries_total counter");
        let _ = writeln!(
            out,
            "clickgate_queries_total{{route=\"metrics\"}} {}",
            g(&self.queries_metrics)
        );
        let _ = writeln!(
            out,
            "clickgate_queries_total{{route=\"top\"}} {}",
            g(&self.queries_top)
        );
        let _ = writeln!(
            out,
            "clickgate_queries_total{{route=\"campaigns\"}} {}",
            g(&self.queries_campaigns)
        );
        let _ = writeln!(out, "# HELP clickgate_query_auth_failures_total Query API calls refused by authentication, by reason.\n# TYPE clickgate_query_auth_failures_total counter");
        for (i, r) in AUTH_FAILURE_REASONS.iter().enumerate() {
            let _ = writeln!(
                out,
                "clickgate_query_auth_failures_total{{reason=\"{r}\"}} {}",
                g(&self.auth_failures[i])
            );
        }
        let _ = writeln!(
            out,
            "# HELP clickgate_query_api_keys API keys configured for the query API (0: open, loopback only).\n# TYPE clickgate_query_api_keys gauge\nclickgate_query_api_keys {}",
            g(&self.api_keys)
        );
        let _ = writeln!(out, "# HELP clickgate_query_errors_total Query API requests answered 400.\n# TYPE clickgate_query_errors_total counter");
        let _ = writeln!(out, "clickgate_query_errors_total {}", g(&self.queries_bad));
        let _ = writeln!(
            out,
            "# HELP clickgate_store_apply_seconds_total Time the store writer spent applying delta frames (with clickgate_store_applied_entries_total: the apply cost per entry).\n# TYPE clickgate_store_apply_seconds_total counter\nclickgate_store_apply_seconds_total {}",
            g(&self.store_apply_ns) as f64 / 1e9
        );
        let _ = writeln!(
            out,
            "# HELP clickgate_store_apply_lag_seconds Receipt to durable apply of the slowest delta frame of the store writer's last group commit.\n# TYPE clickgate_store_apply_lag_seconds gauge\nclickgate_store_apply_lag_seconds {}",
            g(&self.store_apply_lag_us) as f64 / 1e6
        );
        for (name, help, v) in self
            .stage_lags
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        out
    }
}
