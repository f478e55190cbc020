//! The dataplane's settings: one typed struct, every bound named with its unit last.
//! The `clickgate` binary fills it from flags, `CLICKGATE_*` env and the TOML file.

use std::net::SocketAddr;
use std::path::PathBuf;

/// When a 202 may be sent (docs/api.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AckMode {
    /// Once the event is in the in-memory batch.
    Memory,
    /// Once the event is in an fsync'd local write-ahead log.
    Disk,
    /// Once the Kafka broker acknowledged it with acks=all.
    Kafka,
}

impl std::str::FromStr for AckMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "memory" => Ok(AckMode::Memory),
            "disk" => Ok(AckMode::Disk),
            "kafka" => Ok(AckMode::Kafka),
            _ => Err(format!(
                "unknown ack mode {s:?}: expected memory, disk or kafka"
            )),
        }
    }
}

/// Longest `agg_flush_interval_ms`: deltas ship at least every second.
pub const AGG_FLUSH_INTERVAL_MS_MAX: u64 = 1000;
/// Largest `agg_keys_max` the aggregator's table indexes (it uses u32 slots).
pub const AGG_KEYS_MAX_LIMIT: usize = 100_000_000;
/// Smallest `log_segment_bytes`.
pub const LOG_SEGMENT_BYTES_MIN: u64 = 1 << 20;
/// Largest `kafka_ack_poll_us` (0.1 s).
pub const KAFKA_ACK_POLL_US_MAX: u64 = 100_000;

/// The dataplane's settings: [`Default`] holds every default, [`DataplaneConfig::validate`]
/// every bound; the binary maps its flags onto them.
#[derive(Clone, Debug)]
pub struct DataplaneConfig {
    pub ingest_addr: SocketAddr,
    /// CPU ids to run one executor on each; empty means every online CPU.
    pub cores: Vec<usize>,
    pub data_dir: PathBuf,
    pub ack: AckMode,
    /// Publisher networks exempt from the per-address rate limit, as CIDR text.
    pub trusted_cidrs: Vec<String>,

    // --- request limits (docs/api.md) ---
    pub batch_events_max: usize,
    pub body_bytes_max: usize,
    pub header_bytes_max: usize,
    pub connections_per_core_max: usize,
    /// Idle keep-alive connections are closed after this long.
    pub idle_timeout_ms: u64,
    /// A request head must arrive whole within this long of its first byte (bytes
    /// trickled one at a time do not extend it); past it the connection is closed.
    pub header_timeout_ms: u64,
    /// A request body must arrive whole within this long of its head; past it the
    /// connection is closed.
    pub body_timeout_ms: u64,
    /// Connections one client address may hold on one core (`trusted_cidrs` exempt);
    /// past it: 503 and close.
    pub connections_per_address_max: usize,
    /// Request bytes a core holds buffered beyond each connection's first read buffer
    /// (16 KiB): bodies being received. A read that would need more answers 503 and
    /// closes the connection. Buffers grow as bytes arrive, not as a head announces.
    pub inflight_body_bytes_max: usize,
    /// `Retry-After` sent with 429 and 503, in seconds.
    pub retry_after_secs: u32,

    // --- validation ---
    /// Events more than this far in the future are rejected.
    pub ts_skew_ms: u64,

    // --- per-address rate limit ---
    pub rate_limit_events_per_sec: u32,
    /// Addresses tracked for the whole box (one table every core shares, 40 bytes per
    /// address); past it the least recently seen in its set is evicted.
    pub rate_limit_addresses_max: usize,

    // --- fraud gate ---
    /// Addresses whose clicks per minute the box counts (the `ip_rate` rule and model
    /// feature; one table every core shares, 56 bytes per address); past it the least
    /// recently seen in its set is evicted and starts again from 0.
    pub fraud_ip_rate_addresses_max: usize,

    // --- dedup ---
    pub dedup_window_secs: u64,
    /// Peak accepted events/s for the whole box; sizes the box's one bloom filter
    /// (≈ 32 bits per event of the window at the defaults: G + 1 generations).
    pub dedup_peak_events_per_sec: u64,
    pub dedup_fp_rate: f64,
    pub dedup_generations: u32,
    /// Unused since dedup takes no cross-core message (every core checks the shared
    /// bloom in place); still accepted so existing configuration files load.
    pub xcore_channel_capacity: usize,

    // --- local log ---
    /// Bytes a core may hold in memory not yet written to its log; past it: 503.
    pub log_buffer_bytes_max: usize,
    pub log_segment_bytes: u64,
    /// Oldest segments are deleted past either bound (0 = no bound of that kind).
    pub log_retention_bytes: u64,
    pub log_retention_secs: u64,
    /// Longest a group commit waits to gather more records, in microseconds.
    pub log_commit_interval_us: u64,
    /// `ack = memory`: commits only write; the log is fdatasync'd at most this many ms
    /// after a write (disk and kafka fdatasync every commit: answers wait for it).
    pub log_memory_sync_interval_ms: u64,

    // --- shutdown ---
    pub drain_timeout_ms: u64,

    // --- io_uring executors ---
    /// Memory each core's executor registers with io_uring (locked memory: keep the sum
    /// under `ulimit -l` unless running with CAP_IPC_LOCK).
    pub io_memory_bytes: usize,
    /// Submission queue entries of each core's io_uring rings.
    pub ring_depth: usize,

    // --- aggregation and shipping to the controlplane ---
    /// The controlplane's Unix socket; `None`: `<data_dir>/control.sock`.
    pub control_socket: Option<PathBuf>,
    /// Stable id of this box, carried in every delta frame (`clickgate_proto::box_id`):
    /// two boxes flushing to one Redis must not share it. 0 only in tests.
    pub box_id: u64,
    /// Each core ships its aggregate delta this often (at most
    /// [`AGG_FLUSH_INTERVAL_MS_MAX`] ms).
    pub agg_flush_interval_ms: u64,
    /// Aggregate keys a core holds between two flushes; past it new keys are counted as
    /// overflow (the events stay in the log and can be replayed).
    pub agg_keys_max: usize,
    /// Deltas a core keeps unacknowledged by the controlplane; past it deltas merge.
    pub ship_unacked_frames_max: usize,

    // --- external sink (Kafka) ---
    /// Set when a forwarder ships the log to Kafka: its per-core acknowledged LSNs
    /// (`ack = kafka` waits on them) and its state (`/readyz`). `None`: no Kafka.
    pub sink: Option<std::sync::Arc<crate::sink::SinkStatus>>,
    /// With `ack = kafka`, how long a request waits for the broker's ack before its 202s
    /// become 503s (the events stay in the log and are delivered later), in ms.
    pub kafka_ack_timeout_ms: u64,
    /// With `ack = kafka`, how often a waiting connection checks the acknowledged LSN, in
    /// microseconds (a glommio timer; the latency it adds is at most this).
    pub kafka_ack_poll_us: u64,
}

impl Default for DataplaneConfig {
    fn default() -> Self {
        DataplaneConfig {
            ingest_addr: "0.0.0.0:8080".parse().expect("literal"),
            cores: Vec::new(),
            data_dir: PathBuf::from("./clickgate-data"),
            ack: AckMode::Disk,
            trusted_cidrs: Vec::new(),
            batch_events_max: 10_000,
            body_bytes_max: 8 << 20,
            header_bytes_max: 16 << 10,
            connections_per_core_max: 10_000,
            idle_timeout_ms: 60_000,
            header_timeout_ms: 10_000,
            body_timeout_ms: 30_000,
            connections_per_address_max: 256,
            inflight_body_bytes_max: 64 << 20,
            retry_after_secs: 1,
            ts_skew_ms: 5 * 60 * 1000,
            rate_limit_events_per_sec: 1000,
            rate_limit_addresses_max: 65_536,
            fraud_ip_rate_addresses_max: 65_536,
            dedup_window_secs: 600,
            dedup_peak_events_per_sec: 50_000,
            dedup_fp_rate: 0.001,
            dedup_generations: 4,
            xcore_channel_capacity: 1024,
            log_buffer_bytes_max: 64 << 20,
            log_segment_bytes: 256 << 20,
            log_retention_bytes: 16 << 30,
            log_retention_secs: 7 * 24 * 3600,
            log_commit_interval_us: 200,
            log_memory_sync_interval_ms: 200,
            drain_timeout_ms: 10_000,
            io_memory_bytes: 1 << 20,
            ring_depth: 128,
            control_socket: None,
            box_id: 0,
            agg_flush_interval_ms: 500,
            agg_keys_max: 400_000,
            ship_unacked_frames_max: 64,
            sink: None,
            kafka_ack_timeout_ms: 5_000,
            kafka_ack_poll_us: 250,
        }
    }
}

impl DataplaneConfig {
    /// Checks every bound; the error names the setting. [`crate::Dataplane::start`] calls
    /// it, and so does the binary before starting anything (a bad setting is exit 2).
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("batch_events_max", self.batch_events_max as u64),
            ("body_bytes_max", self.body_bytes_max as u64),
            ("header_bytes_max", self.header_bytes_max as u64),
            (
                "connections_per_core_max",
                self.connections_per_core_max as u64,
            ),
            ("header_timeout_ms", self.header_timeout_ms),
            ("body_timeout_ms", self.body_timeout_ms),
            (
                "connections_per_address_max",
                self.connections_per_address_max as u64,
            ),
            (
                "inflight_body_bytes_max",
                self.inflight_body_bytes_max as u64,
            ),
            (
                "rate_limit_events_per_sec",
                self.rate_limit_events_per_sec as u64,
            ),
            (
                "rate_limit_addresses_max",
                self.rate_limit_addresses_max as u64,
            ),
            ("dedup_window_secs", self.dedup_window_secs),
            ("dedup_peak_events_per_sec", self.dedup_peak_events_per_sec),
            ("xcore_channel_capacity", self.xcore_channel_capacity as u64),
            ("log_buffer_bytes_max", self.log_buffer_bytes_max as u64),
            ("log_segment_bytes", self.log_segment_bytes),
            (
                "log_memory_sync_interval_ms",
                self.log_memory_sync_interval_ms,
            ),
            ("agg_flush_interval_ms", self.agg_flush_interval_ms),
            ("agg_keys_max", self.agg_keys_max as u64),
            (
                "ship_unacked_frames_max",
                self.ship_unacked_frames_max as u64,
            ),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("{name} must be greater than 0"));
            }
        }
        if !(self.dedup_fp_rate > 0.0 && self.dedup_fp_rate < 1.0) {
            return Err(format!(
                "dedup_fp_rate must be in (0, 1), got {}",
                self.dedup_fp_rate
            ));
        }
        if self.dedup_generations < 2 {
            return Err(format!(
                "dedup_generations must be at least 2, got {}",
                self.dedup_generations
            ));
        }
        if self.agg_keys_max > AGG_KEYS_MAX_LIMIT {
            return Err(format!(
                "agg_keys_max must be at most {AGG_KEYS_MAX_LIMIT}, got {}",
                self.agg_keys_max
            ));
        }
        if self.agg_flush_interval_ms > AGG_FLUSH_INTERVAL_MS_MAX {
            return Err(format!(
                "agg_flush_interval_ms must be at most {AGG_FLUSH_INTERVAL_MS_MAX} (deltas ship at least every second)"
            ));
        }
        if self.log_segment_bytes < LOG_SEGMENT_BYTES_MIN {
            return Err(format!(
                "log_segment_bytes must be at least 1 MiB, got {}",
                self.log_segment_bytes
            ));
        }
        if !(1..=KAFKA_ACK_POLL_US_MAX).contains(&self.kafka_ack_poll_us) {
            return Err(format!(
                "kafka_ack_poll_us must be 1..={KAFKA_ACK_POLL_US_MAX}, got {}",
                self.kafka_ack_poll_us
            ));
        }
        Ok(())
    }

    pub fn control_socket_path(&self) -> PathBuf {
        self.control_socket
            .clone()
            .unwrap_or_else(|| self.data_dir.join("control.sock"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid_and_each_bound_is_checked() {
        let d = DataplaneConfig::default();
        assert_eq!(d.validate(), Ok(()));
        let bad = |f: fn(&mut DataplaneConfig)| {
            let mut c = DataplaneConfig::default();
            f(&mut c);
            c.validate().unwrap_err()
        };
        assert!(bad(|c| c.agg_flush_interval_ms = 0).contains("agg_flush_interval_ms"));
        assert!(
            bad(|c| c.agg_flush_interval_ms = AGG_FLUSH_INTERVAL_MS_MAX + 1)
                .contains("agg_flush_interval_ms must be at most 1000")
        );
        assert!(bad(|c| c.agg_keys_max = AGG_KEYS_MAX_LIMIT + 1).contains("agg_keys_max"));
        assert!(bad(|c| c.log_segment_bytes = LOG_SEGMENT_BYTES_MIN - 1).contains("1 MiB"));
        assert!(bad(|c| c.dedup_generations = 1).contains("dedup_generations"));
        assert!(bad(|c| c.dedup_fp_rate = 1.0).contains("dedup_fp_rate"));
        assert!(bad(|c| c.header_timeout_ms = 0).contains("header_timeout_ms"));
        assert!(bad(|c| c.inflight_body_bytes_max = 0).contains("inflight_body_bytes_max"));
    }
}
