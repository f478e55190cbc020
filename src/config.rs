//! Settings: flags > `CLICKGATE_*` environment > TOML file (`--config`) > defaults.
//!
//! One struct, [`Settings`], is both the clap argument group (flags and env) and the
//! TOML file's schema; every field is optional there, and [`Settings::resolve`] layers
//! them over the libraries' defaults into the typed configs the planes take.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clickgate_controlplane::ControlplaneConfig;
use clickgate_dataplane::{AckMode, DataplaneConfig};

/// Every knob of clickgate. In the TOML file use the same names with `_` (e.g.
/// `data_dir = "/var/lib/clickgate"`); on the command line with `-`; in the environment
/// as `CLICKGATE_` + upper case.
#[derive(clap::Args, serde::Deserialize, Debug, Default, Clone)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Data directory: local log, counter store, archive [default: ./clickgate-data]
    #[arg(long, env = "CLICKGATE_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,

    /// Ingest (dataplane HTTP) address [default: 0.0.0.0:8080]
    #[arg(long, env = "CLICKGATE_INGEST_ADDR", global = true)]
    pub ingest_addr: Option<SocketAddr>,

    /// Query API (controlplane HTTP) address [default: 127.0.0.1:8081]
    #[arg(long, env = "CLICKGATE_QUERY_ADDR", global = true)]
    pub query_addr: Option<SocketAddr>,

    /// Control API (gRPC) address [default: 0.0.0.0:50051]
    #[arg(long, env = "CLICKGATE_CONTROL_ADDR", global = true)]
    pub control_addr: Option<SocketAddr>,

    /// Dataplane cores: `all`, a count `N` (the first N online CPUs), or CPU ids `0,2-3` [default: all]
    #[arg(long, env = "CLICKGATE_CORES", global = true)]
    pub cores: Option<String>,

    /// Kafka bootstrap brokers, comma-separated; empty: the local log [default: empty]
    #[arg(long, env = "CLICKGATE_KAFKA_BROKERS", global = true)]
    pub kafka_brokers: Option<String>,

    /// Redis URL(s), comma-separated; empty: the embedded counter store [default: empty]
    #[arg(long, env = "CLICKGATE_REDIS_URL", global = true)]
    pub redis_url: Option<String>,

    /// Archive location, a directory or s3://bucket/prefix [default: <data dir>/archive]
    #[arg(long, env = "CLICKGATE_ARCHIVE_URL", global = true)]
    pub archive_url: Option<String>,

    /// When a 202 is sent: memory, disk (fsync'd local log) or kafka (broker ack) [default: disk]
    #[arg(long, env = "CLICKGATE_ACK", global = true)]
    pub ack: Option<AckMode>,

    /// Trusted publisher networks (CIDRs, comma-separated), exempt from the rate limit [default: none]
    #[arg(
        long,
        env = "CLICKGATE_TRUSTED_CIDRS",
        value_delimiter = ',',
        global = true
    )]
    pub trusted_cidrs: Option<Vec<String>>,

    /// Bearer token of the control API; without one the control API refuses all calls [default: none]
    #[arg(
        long,
        env = "CLICKGATE_CONTROL_TOKEN",
        global = true,
        hide_env_values = true
    )]
    pub control_token: Option<String>,

    /// Events per `POST /v1/clicks`, at most [default: 10000]
    #[arg(long, env = "CLICKGATE_BATCH_EVENTS_MAX", global = true)]
    pub batch_events_max: Option<usize>,

    /// Request body size, at most, in bytes [default: 8388608]
    #[arg(long, env = "CLICKGATE_BODY_BYTES_MAX", global = true)]
    pub body_bytes_max: Option<usize>,

    /// Request line + headers size, at most, in bytes [default: 16384]
    #[arg(long, env = "CLICKGATE_HEADER_BYTES_MAX", global = true)]
    pub header_bytes_max: Option<usize>,

    /// Open connections per dataplane core, at most; past it: 503 and close [default: 10000]
    #[arg(long, env = "CLICKGATE_CONNECTIONS_PER_CORE_MAX", global = true)]
    pub connections_per_core_max: Option<usize>,

    /// Idle keep-alive connections are closed after this many ms [default: 60000]
    #[arg(long, env = "CLICKGATE_IDLE_TIMEOUT_MS", global = true)]
    pub idle_timeout_ms: Option<u64>,

    /// Retry-After sent with 429 and 503, in seconds [default: 1]
    #[arg(long, env = "CLICKGATE_RETRY_AFTER_SECS", global = true)]
    pub retry_after_secs: Option<u32>,

    /// Events whose ts is further than this in the future are rejected, in ms [default: 300000]
    #[arg(long, env = "CLICKGATE_TS_SKEW_MS", global = true)]
    pub ts_skew_ms: Option<u64>,

    /// Events per second per client address; past it: 429 [default: 1000]
    #[arg(long, env = "CLICKGATE_RATE_LIMIT_EVENTS_PER_SEC", global = true)]
    pub rate_limit_events_per_sec: Option<u32>,

    /// Client addresses tracked by the rate limiter per core, at most [default: 65536]
    #[arg(long, env = "CLICKGATE_RATE_LIMIT_ADDRESSES_MAX", global = true)]
    pub rate_limit_addresses_max: Option<usize>,

    /// Dedup window, in seconds [default: 600]
    #[arg(long, env = "CLICKGATE_DEDUP_WINDOW_SECS", global = true)]
    pub dedup_window_secs: Option<u64>,

    /// Peak accepted events/s of the box; sizes the dedup bloom shards [default: 50000]
    #[arg(long, env = "CLICKGATE_DEDUP_PEAK_EVENTS_PER_SEC", global = true)]
    pub dedup_peak_events_per_sec: Option<u64>,

    /// Dedup false-positive rate at the peak rate [default: 0.001]
    #[arg(long, env = "CLICKGATE_DEDUP_FP_RATE", global = true)]
    pub dedup_fp_rate: Option<f64>,

    /// Bloom generations rotated over the dedup window [default: 4]
    #[arg(long, env = "CLICKGATE_DEDUP_GENERATIONS", global = true)]
    pub dedup_generations: Option<u32>,

    /// Capacity of each cross-core channel, in messages [default: 1024]
    #[arg(long, env = "CLICKGATE_XCORE_CHANNEL_CAPACITY", global = true)]
    pub xcore_channel_capacity: Option<usize>,

    /// Bytes per core appended but not yet on disk, at most; past it: 503 [default: 67108864]
    #[arg(long, env = "CLICKGATE_LOG_BUFFER_BYTES_MAX", global = true)]
    pub log_buffer_bytes_max: Option<usize>,

    /// Local log segment size, in bytes [default: 268435456]
    #[arg(long, env = "CLICKGATE_LOG_SEGMENT_BYTES", global = true)]
    pub log_segment_bytes: Option<u64>,

    /// Local log retained per core, in bytes (0: no size bound) [default: 17179869184]
    #[arg(long, env = "CLICKGATE_LOG_RETENTION_BYTES", global = true)]
    pub log_retention_bytes: Option<u64>,

    /// Local log retention, in seconds (0: no time bound) [default: 604800]
    #[arg(long, env = "CLICKGATE_LOG_RETENTION_SECS", global = true)]
    pub log_retention_secs: Option<u64>,

    /// Longest a group commit waits to gather records, in microseconds [default: 200]
    #[arg(long, env = "CLICKGATE_LOG_COMMIT_INTERVAL_US", global = true)]
    pub log_commit_interval_us: Option<u64>,

    /// On SIGTERM/SIGINT, in-flight requests get this long to finish, in ms [default: 10000]
    #[arg(long, env = "CLICKGATE_DRAIN_TIMEOUT_MS", global = true)]
    pub drain_timeout_ms: Option<u64>,

    /// Unix socket between the planes (aggregate deltas) [default: <data dir>/control.sock]
    #[arg(long, env = "CLICKGATE_CONTROL_SOCKET", global = true)]
    pub control_socket: Option<PathBuf>,

    /// Each dataplane core ships its aggregate deltas this often, in ms (at most 1000) [default: 500]
    #[arg(long, env = "CLICKGATE_AGG_FLUSH_INTERVAL_MS", global = true)]
    pub agg_flush_interval_ms: Option<u64>,

    /// Aggregate keys a dataplane core holds between two flushes, at most [default: 100000]
    #[arg(long, env = "CLICKGATE_AGG_KEYS_MAX", global = true)]
    pub agg_keys_max: Option<usize>,

    /// Deltas a core keeps unacknowledged by the controlplane, at most [default: 64]
    #[arg(long, env = "CLICKGATE_SHIP_UNACKED_FRAMES_MAX", global = true)]
    pub ship_unacked_frames_max: Option<usize>,

    /// 5-minute buckets are kept this long, in seconds [default: 86400]
    #[arg(long, env = "CLICKGATE_RETENTION_5M_SECS", global = true)]
    pub retention_5m_secs: Option<u64>,

    /// 1-hour buckets are kept this long, in seconds [default: 604800]
    #[arg(long, env = "CLICKGATE_RETENTION_1H_SECS", global = true)]
    pub retention_1h_secs: Option<u64>,

    /// 1-day buckets are kept this long, in seconds [default: 7776000]
    #[arg(long, env = "CLICKGATE_RETENTION_1D_SECS", global = true)]
    pub retention_1d_secs: Option<u64>,

    /// Counter cells (window x bucket x campaign x dimension) the store holds, at most [default: 4000000]
    #[arg(long, env = "CLICKGATE_STORE_CELLS_MAX", global = true)]
    pub store_cells_max: Option<usize>,

    /// The store writes a snapshot at least this often while deltas arrive, in seconds [default: 60]
    #[arg(long, env = "CLICKGATE_SNAPSHOT_INTERVAL_SECS", global = true)]
    pub snapshot_interval_secs: Option<u64>,

    /// Archive: raw record bytes a log stream buffers before its Parquet files are written (the archiver's memory per core) [default: 134217728]
    #[arg(long, env = "CLICKGATE_ARCHIVE_ROLL_BYTES", global = true)]
    pub archive_roll_bytes: Option<u64>,

    /// Archive: buffered records are written at most this long after the first one was read, in seconds [default: 300]
    #[arg(long, env = "CLICKGATE_ARCHIVE_ROLL_SECS", global = true)]
    pub archive_roll_secs: Option<u64>,

    /// Archive: hour partitions (open files) one range of a stream may touch, at most [default: 48]
    #[arg(long, env = "CLICKGATE_ARCHIVE_OPEN_FILES_MAX", global = true)]
    pub archive_open_files_max: Option<usize>,

    /// Archive: rows per Parquet row group, at most [default: 1048576]
    #[arg(long, env = "CLICKGATE_ARCHIVE_ROW_GROUP_ROWS", global = true)]
    pub archive_row_group_rows: Option<usize>,

    /// Archive: how often the local log is polled for new records, in ms (1..=60000) [default: 200]
    #[arg(long, env = "CLICKGATE_ARCHIVE_POLL_MS", global = true)]
    pub archive_poll_ms: Option<u64>,
}

/// Layers `$hi` over `$lo` field by field: a field set in `$hi` wins.
macro_rules! layer {
    ($hi:expr, $lo:expr, [$($f:ident),* $(,)?]) => {
        Settings { $($f: $hi.$f.or($lo.$f),)* }
    };
}

impl Settings {
    /// Reads a TOML settings file; unknown keys are an error naming the key.
    pub fn from_file(path: &Path) -> anyhow::Result<Settings> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("bad config file {}", path.display()))
    }

    /// `self` (flags and env, as clap parsed them) over `file`.
    pub fn over(self, file: Settings) -> Settings {
        layer!(
            self,
            file,
            [
                data_dir,
                ingest_addr,
                query_addr,
                control_addr,
                cores,
                kafka_brokers,
                redis_url,
                archive_url,
                ack,
                trusted_cidrs,
                control_token,
                batch_events_max,
                body_bytes_max,
                header_bytes_max,
                connections_per_core_max,
                idle_timeout_ms,
                retry_after_secs,
                ts_skew_ms,
                rate_limit_events_per_sec,
                rate_limit_addresses_max,
                dedup_window_secs,
                dedup_peak_events_per_sec,
                dedup_fp_rate,
                dedup_generations,
                xcore_channel_capacity,
                log_buffer_bytes_max,
                log_segment_bytes,
                log_retention_bytes,
                log_retention_secs,
                log_commit_interval_us,
                drain_timeout_ms,
                control_socket,
                agg_flush_interval_ms,
                agg_keys_max,
                ship_unacked_frames_max,
                retention_5m_secs,
                retention_1h_secs,
                retention_1d_secs,
                store_cells_max,
                snapshot_interval_secs,
                archive_roll_bytes,
                archive_roll_secs,
                archive_open_files_max,
                archive_row_group_rows,
                archive_poll_ms,
            ]
        )
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("./clickgate-data"))
    }

    /// Checks the settings that this build cannot honour yet, so none is silently ignored.
    pub fn check_supported(&self) -> anyhow::Result<()> {
        if self
            .kafka_brokers
            .as_deref()
            .is_some_and(|b| !b.trim().is_empty())
        {
            bail!("kafka_brokers is set, but this build has no Kafka producer yet (issue #4): leave it empty to use the local log");
        }
        if self
            .redis_url
            .as_deref()
            .is_some_and(|r| !r.trim().is_empty())
        {
            bail!("redis_url is set, but this build has no Redis store yet (issue #5): leave it empty to use the embedded store");
        }
        if self.ack == Some(AckMode::Kafka) {
            bail!("ack = kafka needs the Kafka producer (issue #4); use memory or disk");
        }
        Ok(())
    }

    pub fn dataplane(&self) -> anyhow::Result<DataplaneConfig> {
        let d = DataplaneConfig::default();
        let cfg = DataplaneConfig {
            ingest_addr: self.ingest_addr.unwrap_or(d.ingest_addr),
            cores: parse_cores(self.cores.as_deref().unwrap_or("all"), online_cpus())?,
            data_dir: self.data_dir(),
            ack: self.ack.unwrap_or(d.ack),
            trusted_cidrs: self.trusted_cidrs.clone().unwrap_or_default(),
            batch_events_max: self.batch_events_max.unwrap_or(d.batch_events_max),
            body_bytes_max: self.body_bytes_max.unwrap_or(d.body_bytes_max),
            header_bytes_max: self.header_bytes_max.unwrap_or(d.header_bytes_max),
            connections_per_core_max: self
                .connections_per_core_max
                .unwrap_or(d.connections_per_core_max),
            idle_timeout_ms: self.idle_timeout_ms.unwrap_or(d.idle_timeout_ms),
            retry_after_secs: self.retry_after_secs.unwrap_or(d.retry_after_secs),
            ts_skew_ms: self.ts_skew_ms.unwrap_or(d.ts_skew_ms),
            rate_limit_events_per_sec: self
                .rate_limit_events_per_sec
                .unwrap_or(d.rate_limit_events_per_sec),
            rate_limit_addresses_max: self
                .rate_limit_addresses_max
                .unwrap_or(d.rate_limit_addresses_max),
            dedup_window_secs: self.dedup_window_secs.unwrap_or(d.dedup_window_secs),
            dedup_peak_events_per_sec: self
                .dedup_peak_events_per_sec
                .unwrap_or(d.dedup_peak_events_per_sec),
            dedup_fp_rate: self.dedup_fp_rate.unwrap_or(d.dedup_fp_rate),
            dedup_generations: self.dedup_generations.unwrap_or(d.dedup_generations),
            xcore_channel_capacity: self
                .xcore_channel_capacity
                .unwrap_or(d.xcore_channel_capacity),
            log_buffer_bytes_max: self.log_buffer_bytes_max.unwrap_or(d.log_buffer_bytes_max),
            log_segment_bytes: self.log_segment_bytes.unwrap_or(d.log_segment_bytes),
            log_retention_bytes: self.log_retention_bytes.unwrap_or(d.log_retention_bytes),
            log_retention_secs: self.log_retention_secs.unwrap_or(d.log_retention_secs),
            log_commit_interval_us: self
                .log_commit_interval_us
                .unwrap_or(d.log_commit_interval_us),
            drain_timeout_ms: self.drain_timeout_ms.unwrap_or(d.drain_timeout_ms),
            control_socket: self.control_socket.clone(),
            agg_flush_interval_ms: self
                .agg_flush_interval_ms
                .unwrap_or(d.agg_flush_interval_ms),
            agg_keys_max: self.agg_keys_max.unwrap_or(d.agg_keys_max),
            ship_unacked_frames_max: self
                .ship_unacked_frames_max
                .unwrap_or(d.ship_unacked_frames_max),
            ..d
        };
        validate_dataplane(&cfg)?;
        Ok(cfg)
    }
}

impl Settings {
    /// The archive's directory and bounds (issue #7); `s3://` is refused here (exit 2).
    pub fn archive(&self) -> anyhow::Result<clickgate_controlplane::archive::ArchiveConfig> {
        use clickgate_controlplane::archive::{ArchiveConfig, ArchiveLocation};
        let d = ArchiveConfig::default();
        let loc = ArchiveLocation::parse(self.archive_url.as_deref(), &self.data_dir())
            .map_err(anyhow::Error::msg)?;
        let cfg = ArchiveConfig {
            dir: loc.dir().to_path_buf(),
            roll_bytes: self.archive_roll_bytes.unwrap_or(d.roll_bytes),
            roll_secs: self.archive_roll_secs.unwrap_or(d.roll_secs),
            open_files_max: self.archive_open_files_max.unwrap_or(d.open_files_max),
            row_group_rows: self.archive_row_group_rows.unwrap_or(d.row_group_rows),
            poll_ms: self.archive_poll_ms.unwrap_or(d.poll_ms),
        };
        cfg.validate().map_err(anyhow::Error::msg)?;
        Ok(cfg)
    }

    pub fn controlplane(&self) -> anyhow::Result<ControlplaneConfig> {
        let d = ControlplaneConfig::default();
        let cfg = ControlplaneConfig {
            data_dir: self.data_dir(),
            query_addr: self.query_addr.unwrap_or(d.query_addr),
            control_addr: self.control_addr.unwrap_or(d.control_addr),
            control_token: self.control_token.clone().filter(|t| !t.is_empty()),
            control_socket: self.control_socket.clone(),
            retention_5m_secs: self.retention_5m_secs.unwrap_or(d.retention_5m_secs),
            retention_1h_secs: self.retention_1h_secs.unwrap_or(d.retention_1h_secs),
            retention_1d_secs: self.retention_1d_secs.unwrap_or(d.retention_1d_secs),
            store_cells_max: self.store_cells_max.unwrap_or(d.store_cells_max),
            snapshot_interval_secs: self
                .snapshot_interval_secs
                .unwrap_or(d.snapshot_interval_secs),
            archive: self.archive()?,
            ..d
        };
        // Contract §3: 5m buckets are answerable for at least 24 h.
        if cfg.retention_5m_secs < 24 * 3600 {
            bail!("retention_5m_secs must be at least 86400 (contract: 5m buckets kept 24 h)");
        }
        if cfg.store_cells_max == 0 {
            bail!("store_cells_max must be greater than 0");
        }
        Ok(cfg)
    }
}

/// Largest `agg_keys_max` the aggregator's table indexes (it uses u32 slots).
const AGG_KEYS_MAX_LIMIT: usize = 100_000_000;

fn validate_dataplane(c: &DataplaneConfig) -> anyhow::Result<()> {
    let positive = [
        ("batch_events_max", c.batch_events_max as u64),
        ("body_bytes_max", c.body_bytes_max as u64),
        ("header_bytes_max", c.header_bytes_max as u64),
        (
            "connections_per_core_max",
            c.connections_per_core_max as u64,
        ),
        (
            "rate_limit_events_per_sec",
            c.rate_limit_events_per_sec as u64,
        ),
        (
            "rate_limit_addresses_max",
            c.rate_limit_addresses_max as u64,
        ),
        ("dedup_window_secs", c.dedup_window_secs),
        ("dedup_peak_events_per_sec", c.dedup_peak_events_per_sec),
        ("xcore_channel_capacity", c.xcore_channel_capacity as u64),
        ("log_buffer_bytes_max", c.log_buffer_bytes_max as u64),
        ("log_segment_bytes", c.log_segment_bytes),
        ("agg_flush_interval_ms", c.agg_flush_interval_ms),
        ("agg_keys_max", c.agg_keys_max as u64),
        ("ship_unacked_frames_max", c.ship_unacked_frames_max as u64),
    ];
    for (name, v) in positive {
        if v == 0 {
            bail!("{name} must be greater than 0");
        }
    }
    if !(c.dedup_fp_rate > 0.0 && c.dedup_fp_rate < 1.0) {
        bail!("dedup_fp_rate must be in (0, 1), got {}", c.dedup_fp_rate);
    }
    if c.dedup_generations < 2 {
        bail!(
            "dedup_generations must be at least 2, got {}",
            c.dedup_generations
        );
    }
    if c.agg_keys_max > AGG_KEYS_MAX_LIMIT {
        bail!(
            "agg_keys_max must be at most {AGG_KEYS_MAX_LIMIT}, got {}",
            c.agg_keys_max
        );
    }
    if c.agg_flush_interval_ms > 1000 {
        bail!("agg_flush_interval_ms must be at most 1000 (deltas ship at least every second)");
    }
    if c.log_segment_bytes < 1 << 20 {
        bail!(
            "log_segment_bytes must be at least 1 MiB, got {}",
            c.log_segment_bytes
        );
    }
    Ok(())
}

fn online_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// `all` | `N` (count: CPUs 0..N) | a list of ids and ranges, `0,2-3`.
pub fn parse_cores(spec: &str, online: usize) -> anyhow::Result<Vec<usize>> {
    let spec = spec.trim();
    if spec.is_empty() || spec == "all" {
        return Ok((0..online).collect());
    }
    if !spec.contains([',', '-']) {
        let n: usize = spec
            .parse()
            .with_context(|| format!("cores: {spec:?} is not `all`, a count or a CPU list"))?;
        if n == 0 || n > online {
            bail!("cores: {n} is not between 1 and the {online} online CPUs");
        }
        return Ok((0..n).collect());
    }
    let mut ids = Vec::new();
    for part in spec.split(',') {
        let part = part.trim();
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let bad = || format!("cores: {part:?} is not a CPU id or range like 2-3");
        let (a, b): (usize, usize) = (a.parse().with_context(bad)?, b.parse().with_context(bad)?);
        if a > b {
            bail!("cores: range {part:?} is empty");
        }
        for id in a..=b {
            if id >= online {
                bail!("cores: CPU {id} is not online (this host has CPUs 0..{online})");
            }
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cores_spec() {
        assert_eq!(parse_cores("all", 4).unwrap(), vec![0, 1, 2, 3]);
        assert_eq!(parse_cores("2", 4).unwrap(), vec![0, 1]);
        assert_eq!(parse_cores("0,2-3", 4).unwrap(), vec![0, 2, 3]);
        assert!(parse_cores("5", 4).is_err());
        assert!(parse_cores("0", 4).is_err());
        assert!(parse_cores("3-1", 4).is_err());
        assert!(parse_cores("x", 4).is_err());
        assert!(parse_cores("1,7", 4).is_err());
    }

    #[test]
    fn flags_win_over_file() {
        let file: Settings =
            toml::from_str("data_dir = \"/f\"\nbatch_events_max = 5\nack = \"memory\"").unwrap();
        let flags = Settings {
            batch_events_max: Some(7),
            ..Settings::default()
        };
        let s = flags.over(file);
        assert_eq!(s.batch_events_max, Some(7));
        assert_eq!(s.data_dir, Some(PathBuf::from("/f")));
        assert_eq!(s.ack, Some(AckMode::Memory));
    }

    #[test]
    fn unknown_file_key_is_an_error() {
        let e = toml::from_str::<Settings>("batch_events = 5")
            .unwrap_err()
            .to_string();
        assert!(e.contains("batch_events"), "{e}");
    }

    #[test]
    fn zero_bounds_are_refused() {
        let s = Settings {
            batch_events_max: Some(0),
            ..Settings::default()
        };
        let e = s.dataplane().unwrap_err().to_string();
        assert!(e.contains("batch_events_max"), "{e}");
    }
}
