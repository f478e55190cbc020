//! Every dataplane metric: its name, help text, type and labels are defined here and
//! nowhere else.
//!
//! Each core owns one [`CoreMetrics`] block and is the only writer of it (a plain
//! load + store with `Relaxed`, no locked read-modify-write). A core serving
//! `/metrics` reads every core's block and sums: a read-only cross-core access, off the
//! per-event path. Blocks are cache-line aligned so cores never write the same line.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use clickgate_core::event::FIELDS;

use crate::http::Route;
use crate::response::Status;

/// Fields named in rejections (`clickgate_core::event::FIELDS`), then `body` for JSON
/// syntax errors (no field), then `other` for anything unexpected.
pub const REJECT_FIELDS: [&str; FIELDS.len() + 2] = {
    let mut out = [""; FIELDS.len() + 2];
    let mut i = 0;
    while i < FIELDS.len() {
        out[i] = FIELDS[i];
        i += 1;
    }
    out[FIELDS.len()] = "body";
    out[FIELDS.len() + 1] = "other";
    out
};

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
    /// The core holds `connections_per_core_max` connections.
    Connections,
    /// Writing or syncing the log failed.
    LogError,
    /// The dataplane is shutting down.
    Stopping,
    /// The core's request bytes buffered beyond each connection's first read buffer are
    /// at `inflight_body_bytes_max`.
    BodyBudget,
    /// The client address holds `connections_per_address_max` connections on this core.
    AddressConnections,
}

impl Unavailable {
    pub const ALL: [Unavailable; 6] = [
        Unavailable::LogFull,
        Unavailable::Connections,
        Unavailable::LogError,
        Unavailable::Stopping,
        Unavailable::BodyBudget,
        Unavailable::AddressConnections,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Unavailable::LogFull => "log_full",
            Unavailable::Connections => "connections",
            Unavailable::LogError => "log_error",
            Unavailable::Stopping => "stopping",
            Unavailable::BodyBudget => "body_budget",
            Unavailable::AddressConnections => "address_connections",
        }
    }

    /// The body's error text.
    pub fn message(self) -> &'static str {
        match self {
            Unavailable::LogFull => "log buffer full",
            Unavailable::Connections => "too many connections",
            Unavailable::LogError => "log write failed",
            Unavailable::Stopping => "shutting down",
            Unavailable::BodyBudget => "too many request bodies in flight",
            Unavailable::AddressConnections => "too many connections from this address",
        }
    }
}

/// Upper bounds of the 202 latency histogram buckets, in microseconds.
pub const LATENCY_BUCKETS_US: [u64; 14] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000,
];

/// Distinct rule ids a core labels `clickgate_fraud_clicks_total` with, at most (rule
/// ids come from operators: the label set must stay bounded). Past it, and across rule
/// sets, new ids count under `rule="other"`.
pub const FRAUD_RULE_LABELS_MAX: usize = 256;
/// The label of the slot past [`FRAUD_RULE_LABELS_MAX`].
pub const FRAUD_RULE_OTHER: &str = "other";
const NR_FRAUD_SLOTS: usize = FRAUD_RULE_LABELS_MAX + 1;

const NR_ROUTES: usize = Route::ALL.len();
const NR_STATUSES: usize = Status::ALL.len();
const NR_REASONS: usize = Unavailable::ALL.len();
const NR_BUCKETS: usize = LATENCY_BUCKETS_US.len() + 1;

/// Counters per fraud-rule label slot (arrays this long have no derived `Default`).
struct FraudSlots([AtomicU64; NR_FRAUD_SLOTS]);

impl Default for FraudSlots {
    fn default() -> Self {
        FraudSlots(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl std::ops::Index<usize> for FraudSlots {
    type Output = AtomicU64;
    fn index(&self, i: usize) -> &AtomicU64 {
        &self.0[i]
    }
}

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
    /// Connections cut at the header or body deadline.
    request_timeouts: [AtomicU64; 2],
    /// Request bytes buffered beyond each connection's first read buffer (a gauge kept
    /// by the core itself).
    inflight_body_bytes: AtomicU64,
    // Gauges refreshed by the owner core's ticker and on /metrics.
    log_pending_bytes: AtomicU64,
    log_written_bytes: AtomicU64,
    log_synced_lsn: AtomicU64,
    log_commits: AtomicU64,
    agg_keys: AtomicU64,
    agg_overflow: AtomicU64,
    log_write_nanos: AtomicU64,
    log_fsync_nanos: AtomicU64,
    dedup_memory_bytes: AtomicU64,
    dedup_bits_per_event_milli: AtomicU64,
    ratelimit_tracked: AtomicU64,
    // Fraud gate.
    fraud_events: AtomicU64,
    /// Per label slot (see `fraud_slot`); the last one is `other`.
    fraud_by_rule: FraudSlots,
    /// The rule id of each used slot, in slot order. Written when a rule set is
    /// loaded and read when `/metrics` is served: never on the per-event path.
    fraud_rule_names: Mutex<Vec<String>>,
    rules_version: AtomicU64,
    rules_count: AtomicU64,
    rules_loads: AtomicU64,
    rules_reload_failures: AtomicU64,
    ip_rate_tracked: AtomicU64,
    ip_rate_evictions: AtomicU64,
    runtime_config_version: AtomicU64,
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
    /// A connection cut at its head (`body = false`) or body deadline.
    pub fn request_timeout(&self, body: bool) {
        bump(&self.request_timeouts[body as usize], 1);
    }
    pub fn set_inflight_body_bytes(&self, v: u64) {
        self.inflight_body_bytes.store(v, Relaxed);
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
    pub fn set_log(&self, pending_bytes: u64, st: &crate::log::LogStats) {
        self.log_pending_bytes.store(pending_bytes, Relaxed);
        self.log_written_bytes.store(st.appended_bytes, Relaxed);
        self.log_synced_lsn.store(st.durable_lsn, Relaxed);
        self.log_commits.store(st.commits, Relaxed);
        self.log_write_nanos.store(st.write_nanos_sum, Relaxed);
        self.log_fsync_nanos.store(st.fsync_nanos_sum, Relaxed);
    }
    pub fn set_agg(&self, keys: u64, overflow_total: u64) {
        self.agg_keys.store(keys, Relaxed);
        self.agg_overflow.store(overflow_total, Relaxed);
    }
    pub fn set_dedup(&self, memory_bytes: u64, bits_per_event: f64) {
        self.dedup_memory_bytes.store(memory_bytes, Relaxed);
        self.dedup_bits_per_event_milli
            .store((bits_per_event * 1000.0) as u64, Relaxed);
    }
    pub fn set_ratelimit_tracked(&self, n: u64) {
        self.ratelimit_tracked.store(n, Relaxed);
    }
    /// One click judged fraud.
    #[inline]
    pub fn fraud_event(&self) {
        bump(&self.fraud_events, 1);
    }
    /// One fired rule of a fraud click, by its label slot.
    #[inline]
    pub fn fraud_rule(&self, slot: u16) {
        bump(&self.fraud_by_rule[slot as usize], 1);
    }
    /// The label slot of rule `id` on this core: its own while fewer than
    /// `FRAUD_RULE_LABELS_MAX` ids were seen, else `other`. Called when a rule set is
    /// loaded. A slot is never reused, so each labelled series only ever grows.
    pub fn fraud_slot(&self, id: &str) -> u16 {
        let mut names = self
            .fraud_rule_names
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(i) = names.iter().position(|n| n == id) {
            return i as u16;
        }
        if names.len() < FRAUD_RULE_LABELS_MAX {
            names.push(id.to_string());
            return (names.len() - 1) as u16;
        }
        FRAUD_RULE_LABELS_MAX as u16
    }
    pub fn rules_loaded(&self, version: u64, rules: u64) {
        self.rules_version.store(version, Relaxed);
        self.rules_count.store(rules, Relaxed);
        bump(&self.rules_loads, 1);
    }
    pub fn rules_reload_failed(&self) {
        bump(&self.rules_reload_failures, 1);
    }
    pub fn set_ip_rate(&self, tracked: u64, evictions: u64) {
        self.ip_rate_tracked.store(tracked, Relaxed);
        self.ip_rate_evictions.store(evictions, Relaxed);
    }
    pub fn set_runtime_config_version(&self, v: u64) {
        self.runtime_config_version.store(v, Relaxed);
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
    let name = "clickgate_ingest_request_timeouts_total";
    header(
        out,
        name,
        "counter",
        "Connections closed because a request head or body did not arrive whole in time.",
    );
    for (i, phase) in ["header", "body"].iter().enumerate() {
        let _ = writeln!(
            out,
            "{name}{{phase=\"{phase}\"}} {}",
            sum(cores, |c| &c.request_timeouts[i])
        );
    }
    let name = "clickgate_ingest_inflight_body_bytes";
    header(
        out,
        name,
        "gauge",
        "Request bytes buffered beyond each connection's first read buffer (bodies being received).",
    );
    let _ = writeln!(out, "{name} {}", sum(cores, |c| &c.inflight_body_bytes));
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
    let name = "clickgate_log_commits_total";
    header(
        out,
        name,
        "counter",
        "Group commits of the core's local log (one write of everything appended since the last).",
    );
    per_core(out, name, cores, |c| &c.log_commits);
    let name = "clickgate_log_write_seconds_total";
    header(
        out,
        name,
        "counter",
        "Time the core's local log spent in its O_DIRECT writes.",
    );
    per_core_seconds(out, name, cores, |c| &c.log_write_nanos);
    let name = "clickgate_log_fsync_seconds_total";
    header(
        out,
        name,
        "counter",
        "Time the core's local log spent in fdatasync.",
    );
    per_core_seconds(out, name, cores, |c| &c.log_fsync_nanos);
    let name = "clickgate_agg_keys";
    header(
        out,
        name,
        "gauge",
        "Aggregate keys the core holds since its last delta was drained (bound: agg_keys_max).",
    );
    per_core(out, name, cores, |c| &c.agg_keys);
    let name = "clickgate_agg_overflow_total";
    header(
        out,
        name,
        "counter",
        "Event updates refused at agg_keys_max: missing from the real-time counts only (the events are logged and billed).",
    );
    per_core(out, name, cores, |c| &c.agg_overflow);
    let name = "clickgate_dedup_memory_bytes";
    header(
        out,
        name,
        "gauge",
        "Memory held by the box's dedup bloom filter.",
    );
    let _ = writeln!(out, "{name} {}", sum(cores, |c| &c.dedup_memory_bytes));
    // Bytes, not bits: Prometheus names carry base units (promtool check metrics).
    let name = "clickgate_dedup_bytes_per_event";
    header(
        out,
        name,
        "gauge",
        "Bloom filter bytes per event at the configured false-positive rate.",
    );
    let bits = cores
        .first()
        .map(|c| c.dedup_bits_per_event_milli.load(Relaxed))
        .unwrap_or(0);
    let _ = writeln!(out, "{name} {}", bits as f64 / 8000.0);
    let name = "clickgate_ratelimit_tracked_addresses";
    header(
        out,
        name,
        "gauge",
        "Client addresses tracked by the box's rate limiter.",
    );
    let _ = writeln!(out, "{name} {}", sum(cores, |c| &c.ratelimit_tracked));
    render_fraud(cores, out);
}

fn render_fraud(cores: &[CoreMetrics], out: &mut String) {
    let name = "clickgate_fraud_events_total";
    header(
        out,
        name,
        "counter",
        "Accepted (non-duplicate) events judged fraudulent: answered 202, logged with the fraud flag, not billable.",
    );
    let _ = writeln!(out, "{name} {}", sum(cores, |c| &c.fraud_events));
    let name = "clickgate_fraud_clicks_total";
    header(
        out,
        name,
        "counter",
        "Fraudulent clicks by rule that fired (a click firing several rules counts under each); ids past the label bound count as rule=\"other\".",
    );
    let mut by_rule: BTreeMap<String, u64> = BTreeMap::new();
    for c in cores {
        let names = c
            .fraud_rule_names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for (i, n) in names.iter().enumerate() {
            *by_rule.entry(n.clone()).or_default() += c.fraud_by_rule[i].load(Relaxed);
        }
        let other = c.fraud_by_rule[FRAUD_RULE_LABELS_MAX].load(Relaxed);
        if other > 0 {
            *by_rule.entry(FRAUD_RULE_OTHER.to_string()).or_default() += other;
        }
    }
    for (rule, v) in by_rule {
        let _ = writeln!(out, "{name}{{rule=\"{rule}\"}} {v}");
    }
    let name = "clickgate_fraud_rules_version";
    header(
        out,
        name,
        "gauge",
        "Version of the fraud rule set each core judges with (0: none applied yet).",
    );
    per_core(out, name, cores, |c| &c.rules_version);
    let name = "clickgate_fraud_rules";
    header(
        out,
        name,
        "gauge",
        "Rules in the set each core judges with.",
    );
    per_core(out, name, cores, |c| &c.rules_count);
    let name = "clickgate_fraud_rules_loads_total";
    header(
        out,
        name,
        "counter",
        "Rule sets loaded by the cores (start-up and hot swaps).",
    );
    let _ = writeln!(out, "{name} {}", sum(cores, |c| &c.rules_loads));
    let name = "clickgate_fraud_rules_reload_failures_total";
    header(
        out,
        name,
        "counter",
        "Rule or runtime-settings files the cores could not load (the previous ones stay in force).",
    );
    let _ = writeln!(out, "{name} {}", sum(cores, |c| &c.rules_reload_failures));
    let name = "clickgate_fraud_ip_rate_tracked_addresses";
    header(
        out,
        name,
        "gauge",
        "Addresses held by the box's per-minute click counters (ip_rate).",
    );
    let _ = writeln!(out, "{name} {}", sum(cores, |c| &c.ip_rate_tracked));
    let name = "clickgate_fraud_ip_rate_evictions_total";
    header(
        out,
        name,
        "counter",
        "Addresses evicted from the per-minute click counters to make room (their count restarts).",
    );
    let _ = writeln!(out, "{name} {}", sum(cores, |c| &c.ip_rate_evictions));
    let name = "clickgate_runtime_config_version";
    header(
        out,
        name,
        "gauge",
        "Version of the runtime settings (control API SetConfig) each core applies (0: none).",
    );
    per_core(out, name, cores, |c| &c.runtime_config_version);
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

/// Like `per_core`, for a counter kept in nanoseconds and exported in seconds.
fn per_core_seconds(
    out: &mut String,
    name: &str,
    cores: &[CoreMetrics],
    f: impl Fn(&CoreMetrics) -> &AtomicU64,
) {
    for (k, c) in cores.iter().enumerate() {
        let secs = f(c).load(Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}{{core=\"{k}\"}} {secs:.6}");
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
        cores[1].set_agg(5, 3);
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
        assert!(out.contains("clickgate_dedup_bytes_per_event 1.8\n"));
        assert!(out.contains("clickgate_log_pending_bytes{core=\"1\"} 0\n"));
        assert!(out.contains("clickgate_agg_keys{core=\"1\"} 5\n"), "{out}");
        assert!(out.contains("clickgate_agg_overflow_total{core=\"1\"} 3\n"));
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
    fn fraud_labels_are_bounded_and_summed_by_name() {
        let cores: Vec<CoreMetrics> = (0..2).map(|_| CoreMetrics::default()).collect();
        // The same id may hold different slots on different cores.
        let a0 = cores[0].fraud_slot("a");
        let b1 = cores[1].fraud_slot("b");
        let a1 = cores[1].fraud_slot("a");
        assert_eq!((a0, b1, a1), (0, 0, 1));
        assert_eq!(cores[0].fraud_slot("a"), 0);
        cores[0].fraud_rule(a0);
        cores[1].fraud_rule(a1);
        cores[1].fraud_rule(b1);
        for i in 1..FRAUD_RULE_LABELS_MAX {
            assert_eq!(cores[0].fraud_slot(&format!("r{i}")) as usize, i);
        }
        let other = cores[0].fraud_slot("one-too-many");
        assert_eq!(other as usize, FRAUD_RULE_LABELS_MAX);
        cores[0].fraud_rule(other);
        let mut out = String::new();
        render(&cores, &mut out);
        assert!(
            out.contains("clickgate_fraud_clicks_total{rule=\"a\"} 2\n"),
            "{out}"
        );
        assert!(out.contains("clickgate_fraud_clicks_total{rule=\"b\"} 1\n"));
        assert!(out.contains("clickgate_fraud_clicks_total{rule=\"other\"} 1\n"));
        let series = out
            .lines()
            .filter(|l| l.starts_with("clickgate_fraud_clicks_total{"))
            .count();
        assert!(series <= FRAUD_RULE_LABELS_MAX + 2, "{series}");
    }

    #[test]
    fn field_index() {
        assert_eq!(REJECT_FIELDS[reject_field_index(Some("ip"))], "ip");
        assert_eq!(REJECT_FIELDS[reject_field_index(None)], "body");
        assert_eq!(REJECT_FIELDS[reject_field_index(Some("zzz"))], "other");
        assert_eq!(&REJECT_FIELDS[..FIELDS.len()], &FIELDS);
    }
}
