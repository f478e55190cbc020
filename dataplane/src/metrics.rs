//! Every dataplane metric: its name, help text, type and labels are defined here and
//! nowhere else.
//!
//! Each core owns one [`CoreMetrics`] block and is the only writer of it (a plain
//! load + store with `Relaxed`, no locked read-modify-write). A core serving
//! `/metrics` reads every core's block and sums: a read-only cross-core access, off the
//! per-event path. Blocks are cache-line aligned so cores never write the same line.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::http::Route;
use crate::response::Status;

/// Fields named in rejections (contract §1), then `body` for JSON syntax errors (no
/// field), then `other` for anything unexpected.
pub const REJECT_FIELDS: [&str; 14] = [
    "event_id",
    "ts",
    "campaign_id",
    "ad_id",
    "publisher_id",
    "advertiser_id",
    "user_id",
    "ip",
    "user_agent",
    "country",
    "device",
    "cost_micros",
    "body",
    "other",
];

pub fn reject_field_index(field: Option<&str>) -> usize {
    match field {
        None => REJECT_FIELDS.len() - 2,
        Some(f) => REJECT_FIELDS[..REJECT_FIELDS.len() - 2]
            .iter()
            .position(|&x| x == f)
            .unwrap_or(REJECT_FIELDS.len() - 1),
    }
}

/// Why a request was answered 503.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unavailable {
    /// The core's log buffer is at `log_buffer_bytes_max`.
    LogFull,
    /// A cross-core dedup channel is full.
    XcoreFull,
    /// The core holds `connections_per_core_max` connections.
    Connections,
    /// Writing or syncing the log failed.
    LogError,
    /// The dataplane is shutting down.
    Stopping,
}

impl Unavailable {
    pub const ALL: [Unavailable; 5] = [
        Unavailable::LogFull,
        Unavailable::XcoreFull,
        Unavailable::Connections,
        Unavailable::LogError,
        Unavailable::Stopping,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Unavailable::LogFull => "log_full",
            Unavailable::XcoreFull => "xcore_full",
            Unavailable::Connections => "connections",
            Unavailable::LogError => "log_error",
            Unavailable::Stopping => "stopping",
        }
    }

    /// The body's error text.
    pub fn message(self) -> &'static str {
        match self {
            Unavailable::LogFull => "log buffer full",
            Unavailable::XcoreFull => "dedup channel full",
            Unavailable::Connections => "too many connections",
            Unavailable::LogError => "log write failed",
            Unavailable::Stopping => "shutting down",
        }
    }
}

/// Upper bounds of the 202 latency histogram buckets, in microseconds.
pub const LATENCY_BUCKETS_US: [u64; 14] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000,
];

const NR_ROUTES: usize = Route::ALL.len();
const NR_STATUSES: usize = Status::ALL.len();
const NR_REASONS: usize = Unavailable::ALL.len();
const NR_BUCKETS: usize = LATENCY_BUCKETS_US.len() + 1;

#[derive(Default)]
#[repr(align(128))]
pub struct CoreMetrics {
    requests: [[AtomicU64; NR_STATUSES]; NR_ROUTES],
    events_accepted: AtomicU64,
    events_duplicate: AtomicU64,
    events_rejected: [AtomicU64; REJECT_FIELDS.len()],
    bytes_in: AtomicU64,
    rate_limited: AtomicU64,
    unavailable: [AtomicU64; NR_REASONS],
    latency_buckets: [AtomicU64; NR_BUCKETS],
    latency_sum_us: AtomicU64,
    latency_count: AtomicU64,
    connections_open: AtomicU64,
    connections_total: AtomicU64,
    // Gauges refreshed by the owner core's ticker and on /metrics.
    log_pending_bytes: AtomicU64,
    log_written_bytes: AtomicU64,
    log_synced_lsn: AtomicU64,
    dedup_memory_bytes: AtomicU64,
    dedup_bits_per_event_milli: AtomicU64,
    dedup_remote_lookups: AtomicU64,
    ratelimit_tracked: AtomicU64,
}

/// Single-writer increment: only the owner core writes its block.
#[inline]
fn bump(c: &AtomicU64, n: u64) {
    c.store(c.load(Relaxed).wrapping_add(n), Relaxed);
}

impl CoreMetrics {
    #[inline]
    pub fn request(&self, route: Route, status: Status) {
        bump(&self.requests[route.index()][status.index()], 1);
    }
    #[inline]
    pub fn accepted(&self, n: u64) {
        bump(&self.events_accepted, n);
    }
    #[inline]
    pub fn duplicates(&self, n: u64) {
        bump(&self.events_duplicate, n);
    }
    #[inline]
    pub fn rejected(&self, field: Option<&str>) {
        bump(&self.events_rejected[reject_field_index(field)], 1);
    }
    #[inline]
    pub fn bytes_in(&self, n: u64) {
        bump(&self.bytes_in, n);
    }
    #[inline]
    pub fn rate_limited(&self) {
        bump(&self.rate_limited, 1);
    }
    #[inline]
    pub fn unavailable(&self, why: Unavailable) {
        bump(&self.unavailable[why as usize], 1);
    }
    #[inline]
    pub fn remote_lookups(&self, n: u64) {
        bump(&self.dedup_remote_lookups, n);
    }
    #[inline]
    /// `n` responses answered 202 after `us` microseconds.
    pub fn latency_202(&self, us: u64, n: u64) {
        let b = LATENCY_BUCKETS_US
            .iter()
            .position(|&ub| us <= ub)
            .unwrap_or(LATENCY_BUCKETS_US.len());
        bump(&self.latency_buckets[b], n);
        bump(&self.latency_sum_us, us * n);
        bump(&self.latency_count, n);
    }
    pub fn connection_opened(&self) {
        bump(&self.connections_open, 1);
        bump(&self.connections_total, 1);
    }
    pub fn connection_closed(&self) {
        self.connections_open.store(
            self.connections_open.load(Relaxed).saturating_sub(1),
            Relaxed,
        );
    }
    pub fn connections_open(&self) -> u64 {
        self.connections_open.load(Relaxed)
    }
    pub fn set_log(&self, pending_bytes: u64, written_bytes: u64, synced_lsn: u64) {
        self.log_pending_bytes.store(pending_bytes, Relaxed);
        self.log_written_bytes.store(written_bytes, Relaxed);
        self.log_synced_lsn.store(synced_lsn, Relaxed);
    }
    pub fn set_dedup(&self, memory_bytes: u64, bits_per_event: f64) {
        self.dedup_memory_bytes.store(memory_bytes, Relaxed);
        self.dedup_bits_per_event_milli
            .store((bits_per_event * 1000.0) as u64, Relaxed);
    }
    pub fn set_ratelimit_tracked(&self, n: u64) {
        self.ratelimit_tracked.store(n, Relaxed);
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sum(cores: &[CoreMetrics], f: impl Fn(&CoreMetrics) -> &AtomicU64) -> u64 {
    cores.iter().map(|c| f(c).load(Relaxed)).sum()
}

/// Renders every core's metrics in the Prometheus text format (version 0.0.4).
pub fn render(cores: &[CoreMetrics], out: &mut String) {
    let name = "clickgate_ingest_requests_total";
    header(
        out,
        name,
        "counter",
        "HTTP requests answered, by route and status.",
    );
    for route in Route::ALL {
        for status in Status::ALL {
            let v = sum(cores, |c| &c.requests[route.index()][status.index()]);
            if v > 0 {
                let _ = writeln!(
                    out,
                    "{name}{{route=\"{}\",status=\"{}\"}} {v}",
                    route.label(),
                    status.code()
                );
            }
        }
    }
    let name = "clickgate_ingest_events_accepted_total";
    header(
        out,
        name,
        "counter",
        "Valid, new events written to the log.",
    );
    let _ = writeln!(out, "{name} {}", sum(cores, |c| &c.events_accepted));
    let name = "clickgate_ingest_events_duplicate_total";
    header(
        out,
        name,
        "counter",
        "Valid events already seen within the dedup window (logged with the duplicate flag).",
    );
    let _ = writeln!(out, "{name} {}", sum(cores, |c| &c.events_duplicate));
    let name = "clickgate_ingest_events_rejected_total";
    header(
        out,
        name,
        "counter",
        "Invalid events, by the field at fault (body: JSON syntax).",
    );
    for (i, f) in REJECT_FIELDS.iter().enumerate() {
        let _ = writeln!(
            out,
            "{name}{{field=\"{f}\"}} {}",
            sum(cores, |c| &c.events_rejected[i])
        );
    }
    let name = "clickgate_ingest_bytes_total";
    header(
        out,
        name,
        "counter",
        "Request bytes received (heads and bodies).",
    );
    let _ = writeln!(out, "{name} {}", sum(cores, |c| &c.bytes_in));
    let name = "clickgate_ingest_rate_limited_total";
    header(
        out,
        name,
        "counter",
        "Requests answered 429 (client address over its rate limit).",
    );
    let _ = writeln!(out, "{name} {}", sum(cores, |c| &c.rate_limited));
    let name = "clickgate_ingest_unavailable_total";
    header(out, name, "counter", "Requests answered 503, by reason.");
    for why in Unavailable::ALL {
        let _ = writeln!(
            out,
            "{name}{{reason=\"{}\"}} {}",
            why.label(),
            sum(cores, |c| &c.unavailable[why as usize])
        );
    }
    let name = "clickgate_ingest_accept_latency_seconds";
    header(
        out,
        name,
        "histogram",
        "Time from receiving a request's last bytes to its 202 being ready to write (after the log sync with ack=disk).",
    );
    let mut cumulative = 0;
    for (i, ub) in LATENCY_BUCKETS_US.iter().enumerate() {
        cumulative += sum(cores, |c| &c.latency_buckets[i]);
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"{}\"}} {cumulative}",
            *ub as f64 / 1e6
        );
    }
    cumulative += sum(cores, |c| &c.latency_buckets[LATENCY_BUCKETS_US.len()]);
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
    let _ = writeln!(
        out,
        "{name}_sum {}",
        sum(cores, |c| &c.latency_sum_us) as f64 / 1e6
    );
    let _ = writeln!(out, "{name}_count {}", sum(cores, |c| &c.latency_count));
    let name = "clickgate_ingest_connections_open";
    header(out, name, "gauge", "Open client connections.");
    let _ = writeln!(out, "{name} {}", sum(cores, |c| &c.connections_open));
    let name = "clickgate_ingest_connections_total";
    header(out, name, "counter", "Client connections accepted.");
    let _ = writeln!(out, "{name} {}", sum(cores, |c| &c.connections_total));
    let name = "clickgate_log_pending_bytes";
    header(
        out,
        name,
        "gauge",
        "Bytes held in memory not yet written to the core's local log.",
    );
    per_core(out, name, cores, |c| &c.log_pending_bytes);
    let name = "clickgate_log_written_bytes";
    header(
        out,
        name,
        "gauge",
        "Bytes written to the core's local log since start.",
    );
    per_core(out, name, cores, |c| &c.log_written_bytes);
    let name = "clickgate_log_synced_lsn";
    header(
        out,
        name,
        "gauge",
        "Log position known durable (fsync'd) on the core.",
    );
    per_core(out, name, cores, |c| &c.log_synced_lsn);
    let name = "clickgate_dedup_memory_bytes";
    header(
        out,
        name,
        "gauge",
        "Memory held by the dedup bloom filters, all cores.",
    );
    let _ = writeln!(out, "{name} {}", sum(cores, |c| &c.dedup_memory_bytes));
    let name = "clickgate_dedup_bits_per_event";
    header(
        out,
        name,
        "gauge",
        "Bloom filter bits per event at the configured false-positive rate.",
    );
    let bits = cores
        .first()
        .map(|c| c.dedup_bits_per_event_milli.load(Relaxed))
        .unwrap_or(0);
    let _ = writeln!(out, "{name} {}", bits as f64 / 1000.0);
    let name = "clickgate_dedup_remote_lookups_total";
    header(
        out,
        name,
        "counter",
        "Event ids sent to another core's dedup shard.",
    );
    let _ = writeln!(out, "{name} {}", sum(cores, |c| &c.dedup_remote_lookups));
    let name = "clickgate_ratelimit_tracked_addresses";
    header(
        out,
        name,
        "gauge",
        "Client addresses tracked by the per-core rate limiters.",
    );
    let _ = writeln!(out, "{name} {}", sum(cores, |c| &c.ratelimit_tracked));
}

fn per_core(
    out: &mut String,
    name: &str,
    cores: &[CoreMetrics],
    f: impl Fn(&CoreMetrics) -> &AtomicU64,
) {
    for (k, c) in cores.iter().enumerate() {
        let _ = writeln!(out, "{name}{{core=\"{k}\"}} {}", f(c).load(Relaxed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_sums_over_cores() {
        let cores: Vec<CoreMetrics> = (0..2).map(|_| CoreMetrics::default()).collect();
        cores[0].request(Route::Click, Status::Accepted);
        cores[1].request(Route::Click, Status::Accepted);
        cores[1].rejected(Some("ts"));
        cores[0].rejected(None);
        cores[0].latency_202(80, 1);
        cores[1].latency_202(2_000_000, 1);
        cores[0].set_dedup(1024, 14.4);
        let mut out = String::new();
        render(&cores, &mut out);
        assert!(
            out.contains("clickgate_ingest_requests_total{route=\"/v1/click\",status=\"202\"} 2\n"),
            "{out}"
        );
        assert!(out.contains("clickgate_ingest_events_rejected_total{field=\"ts\"} 1\n"));
        assert!(out.contains("clickgate_ingest_events_rejected_total{field=\"body\"} 1\n"));
        assert!(out.contains("clickgate_ingest_accept_latency_seconds_bucket{le=\"0.0001\"} 1\n"));
        assert!(out.contains("clickgate_ingest_accept_latency_seconds_bucket{le=\"+Inf\"} 2\n"));
        assert!(out.contains("clickgate_dedup_bits_per_event 14.4\n"));
        assert!(out.contains("clickgate_log_pending_bytes{core=\"1\"} 0\n"));
        // Every sample line belongs to a declared metric.
        for line in out.lines().filter(|l| !l.starts_with('#')) {
            let metric = line.split(['{', ' ']).next().unwrap();
            let base = metric
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            assert!(out.contains(&format!("# TYPE {base} ")), "{line}");
        }
    }

    #[test]
    fn field_index() {
        assert_eq!(REJECT_FIELDS[reject_field_index(Some("ip"))], "ip");
        assert_eq!(REJECT_FIELDS[reject_field_index(None)], "body");
        assert_eq!(REJECT_FIELDS[reject_field_index(Some("zzz"))], "other");
    }
}
