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

/// `--help` headings: the settings grouped by the part of clickgate that reads them.
pub const COMMON: &str = "Common";
pub const DATAPLANE: &str = "Dataplane (ingest)";
pub const KAFKA: &str = "Dataplane: Kafka";
pub const QUERY: &str = "Controlplane: query API and dashboard";
pub const CONTROL: &str = "Controlplane: control API";
pub const STORE: &str = "Controlplane: counter store";
pub const REDIS: &str = "Controlplane: Redis";
pub const ARCHIVE: &str = "Controlplane: archive";

/// How log lines are written to stderr.
#[derive(clap::ValueEnum, serde::Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines
    #[default]
    Text,
    /// One JSON object per line (tracing-subscriber's JSON format)
    Json,
}

/// Whether `clickgate <subcommand> --help` lists the setting `id` of group `heading`:
/// each subcommand shows the settings it reads (all are still accepted everywhere, so a
/// shared config file or environment works with every subcommand).
pub fn shown_in(subcommand: &str, id: &str, heading: Option<&str>) -> bool {
    let h = heading.unwrap_or("");
    match subcommand {
        "dataplane" => [COMMON, DATAPLANE, KAFKA].contains(&h),
        "controlplane" => [COMMON, QUERY, CONTROL, STORE, REDIS, ARCHIVE].contains(&h),
        "billing" => matches!(id, "data_dir" | "archive_url" | "log_format"),
        "replay" => h == COMMON || h == KAFKA || id == "agg_keys_max",
        // Clients: their own flags only.
        "rules" | "tune" => id == "log_format",
        _ => true,
    }
}

/// Every knob of clickgate. In the TOML file use the same names with `_` (e.g.
/// `data_dir = "/var/lib/clickgate"`); on the command line with `-`; in the environment
/// as `CLICKGATE_` + upper case.
#[derive(clap::Args, serde::Deserialize, Debug, Default, Clone)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Log format on stderr (the level comes from CLICKGATE_LOG, e.g. `info`) [default: text]
    #[arg(long, env = "CLICKGATE_LOG_FORMAT", global = true, help_heading = COMMON)]
    pub log_format: Option<LogFormat>,

    /// Data directory: local log, counter store, archive [default: ./clickgate-data]
    #[arg(long, env = "CLICKGATE_DATA_DIR", global = true, help_heading = COMMON)]
    pub data_dir: Option<PathBuf>,

    /// Ingest (dataplane HTTP) address [default: 0.0.0.0:8080]
    #[arg(long, env = "CLICKGATE_INGEST_ADDR", global = true, help_heading = DATAPLANE)]
    pub ingest_addr: Option<SocketAddr>,

    /// Query API (controlplane HTTP) address [default: 127.0.0.1:8081]
    #[arg(long, env = "CLICKGATE_QUERY_ADDR", global = true, help_heading = QUERY)]
    pub query_addr: Option<SocketAddr>,

    /// Control API (gRPC) address; a non-loopback one with a token needs TLS (--control-tls-cert, --control-tls-key) or --control-insecure (the token would cross the network in clear) [default: 127.0.0.1:50051]
    #[arg(long, env = "CLICKGATE_CONTROL_ADDR", global = true, help_heading = CONTROL)]
    pub control_addr: Option<SocketAddr>,

    /// Dataplane cores: `all`, a count `N` (the first N online CPUs), or CPU ids `0,2-3` [default: all]
    #[arg(long, env = "CLICKGATE_CORES", global = true, help_heading = DATAPLANE)]
    pub cores: Option<String>,

    /// Kafka bootstrap brokers, comma-separated; empty: the local log [default: empty]
    #[arg(long, env = "CLICKGATE_KAFKA_BROKERS", global = true, help_heading = KAFKA)]
    pub kafka_brokers: Option<String>,

    /// Kafka topic of the raw records [default: raw_clicks]
    #[arg(long, env = "CLICKGATE_KAFKA_TOPIC", global = true, help_heading = KAFKA)]
    pub kafka_topic: Option<String>,

    /// Partitions of the Kafka topic when clickgate creates it (1..=10000) [default: 6]
    #[arg(long, env = "CLICKGATE_KAFKA_PARTITIONS", global = true, help_heading = KAFKA)]
    pub kafka_partitions: Option<u32>,

    /// Replication factor of the Kafka topic when clickgate creates it (1..=16) [default: 1]
    #[arg(long, env = "CLICKGATE_KAFKA_REPLICATION", global = true, help_heading = KAFKA)]
    pub kafka_replication: Option<u16>,

    /// Kafka producer linger (librdkafka linger.ms), in ms (0..=1000) [default: 5]
    #[arg(long, env = "CLICKGATE_KAFKA_LINGER_MS", global = true, help_heading = KAFKA)]
    pub kafka_linger_ms: Option<u32>,

    /// Kafka producer batch size per partition (librdkafka batch.size), in bytes (1024..=16777216) [default: 1048576]
    #[arg(long, env = "CLICKGATE_KAFKA_BATCH_BYTES", global = true, help_heading = KAFKA)]
    pub kafka_batch_bytes: Option<u32>,

    /// Records per core produced to Kafka and not yet acknowledged, at most; the rest waits in the local log (1..=1000000) [default: 100000]
    #[arg(long, env = "CLICKGATE_KAFKA_INFLIGHT_RECORDS_MAX", global = true, help_heading = KAFKA)]
    pub kafka_inflight_records_max: Option<u32>,

    /// Start-up gives up when the Kafka brokers do not answer (topic check, recovery) within this many ms [default: 10000]
    #[arg(long, env = "CLICKGATE_KAFKA_START_TIMEOUT_MS", global = true, help_heading = KAFKA)]
    pub kafka_start_timeout_ms: Option<u64>,

    /// How clients reach the brokers: plaintext, ssl (TLS; brokers checked against kafka_ssl_ca or the system's trust store), sasl_ssl (TLS plus SASL login) or sasl_plaintext [default: plaintext]
    #[arg(long, env = "CLICKGATE_KAFKA_SECURITY_PROTOCOL", global = true, help_heading = KAFKA)]
    pub kafka_security_protocol: Option<String>,

    /// Certificate authority (PEM) that brokers are checked against with kafka_security_protocol = ssl; unset: the system's trust store [default: none]
    #[arg(long, env = "CLICKGATE_KAFKA_SSL_CA", global = true, help_heading = KAFKA)]
    pub kafka_ssl_ca: Option<PathBuf>,

    /// SASL mechanism with kafka_security_protocol sasl_*: SCRAM-SHA-512, SCRAM-SHA-256 or PLAIN (not over sasl_plaintext) [default: SCRAM-SHA-512]
    #[arg(long, env = "CLICKGATE_KAFKA_SASL_MECHANISM", global = true, help_heading = KAFKA)]
    pub kafka_sasl_mechanism: Option<String>,

    /// SASL user name with kafka_security_protocol sasl_* [default: none]
    #[arg(long, env = "CLICKGATE_KAFKA_SASL_USERNAME", global = true, help_heading = KAFKA)]
    pub kafka_sasl_username: Option<String>,

    /// SASL password with kafka_security_protocol sasl_* (prefer the environment variable or the settings file to the command line) [default: none]
    #[arg(
        long,
        env = "CLICKGATE_KAFKA_SASL_PASSWORD",
        global = true, help_heading = KAFKA,
        hide_env_values = true
    )]
    pub kafka_sasl_password: Option<String>,

    /// With ack = kafka, a request's 202s become 503s when the broker has not acknowledged them within this many ms [default: 5000]
    #[arg(long, env = "CLICKGATE_KAFKA_ACK_TIMEOUT_MS", global = true, help_heading = KAFKA)]
    pub kafka_ack_timeout_ms: Option<u64>,

    /// With ack = kafka, how often a waiting connection checks the broker's acknowledgement, in microseconds (1..=100000) [default: 250]
    #[arg(long, env = "CLICKGATE_KAFKA_ACK_POLL_US", global = true, help_heading = KAFKA)]
    pub kafka_ack_poll_us: Option<u64>,

    /// Redis URL(s), comma-separated, redis:// or rediss:// (TLS); empty: the embedded counter store [default: empty]
    #[arg(long, env = "CLICKGATE_REDIS_URL", global = true, help_heading = REDIS)]
    pub redis_url: Option<String>,

    /// Certificate authority (PEM) that rediss:// servers are checked against; unset: the system's trust store [default: none]
    #[arg(long, env = "CLICKGATE_REDIS_TLS_CA", global = true, help_heading = REDIS)]
    pub redis_tls_ca: Option<PathBuf>,

    /// Stable id of this box in delta frames and Redis marks; unset: generated once and kept in <data dir>/box_id [default: generated]
    #[arg(long, env = "CLICKGATE_BOX_ID", global = true, help_heading = COMMON)]
    pub box_id: Option<u64>,

    /// Redis: prefix put in front of every key (several deployments or tests on one Redis) [default: empty]
    #[arg(long, env = "CLICKGATE_REDIS_KEY_PREFIX", global = true, help_heading = REDIS)]
    pub redis_key_prefix: Option<String>,

    /// Redis: the flusher writes applied deltas this often, in ms (1..=1000) [default: 500]
    #[arg(long, env = "CLICKGATE_REDIS_FLUSH_INTERVAL_MS", global = true, help_heading = REDIS)]
    pub redis_flush_interval_ms: Option<u64>,

    /// Redis: commands per pipeline (one round trip), at most (100..=100000) [default: 4000]
    #[arg(long, env = "CLICKGATE_REDIS_PIPELINE_COMMANDS_MAX", global = true, help_heading = REDIS)]
    pub redis_pipeline_commands_max: Option<usize>,

    /// Redis: 5m bucket keys expire this long after the bucket ends, in seconds (at least 86400) [default: 86400]
    #[arg(long, env = "CLICKGATE_REDIS_TTL_5M_SECS", global = true, help_heading = REDIS)]
    pub redis_ttl_5m_secs: Option<u64>,

    /// Redis: 1h bucket keys expire this long after the bucket ends, in seconds [default: 604800]
    #[arg(long, env = "CLICKGATE_REDIS_TTL_1H_SECS", global = true, help_heading = REDIS)]
    pub redis_ttl_1h_secs: Option<u64>,

    /// Redis: 1d bucket keys expire this long after the bucket ends, in seconds [default: 7776000]
    #[arg(long, env = "CLICKGATE_REDIS_TTL_1D_SECS", global = true, help_heading = REDIS)]
    pub redis_ttl_1d_secs: Option<u64>,

    /// Redis: deltas not yet in Redis kept on disk (<data dir>/redis), at most, in bytes; past it they are dropped for Redis and counted (at least 1048576) [default: 1073741824]
    #[arg(long, env = "CLICKGATE_REDIS_SPILL_BYTES_MAX", global = true, help_heading = REDIS)]
    pub redis_spill_bytes_max: Option<u64>,

    /// Redis: first retry delay after a failed flush, doubled up to the max, in ms [default: 100]
    #[arg(long, env = "CLICKGATE_REDIS_RETRY_BACKOFF_MIN_MS", global = true, help_heading = REDIS)]
    pub redis_retry_backoff_min_ms: Option<u64>,

    /// Redis: longest retry delay after failed flushes, in ms [default: 10000]
    #[arg(long, env = "CLICKGATE_REDIS_RETRY_BACKOFF_MAX_MS", global = true, help_heading = REDIS)]
    pub redis_retry_backoff_max_ms: Option<u64>,

    /// Redis: bound on a connect, a flush pipeline and a query, in ms (1..=600000) [default: 5000]
    #[arg(long, env = "CLICKGATE_REDIS_TIMEOUT_MS", global = true, help_heading = REDIS)]
    pub redis_timeout_ms: Option<u64>,

    /// Archive location, a directory or s3://bucket/prefix [default: <data dir>/archive]
    #[arg(long, env = "CLICKGATE_ARCHIVE_URL", global = true, help_heading = ARCHIVE)]
    pub archive_url: Option<String>,

    /// When a 202 is sent: memory, disk (fsync'd local log) or kafka (broker ack) [default: disk]
    #[arg(long, env = "CLICKGATE_ACK", global = true, help_heading = DATAPLANE)]
    pub ack: Option<AckMode>,

    /// Trusted publisher networks (CIDRs, comma-separated), exempt from the rate limit [default: none]
    #[arg(
        long,
        env = "CLICKGATE_TRUSTED_CIDRS",
        value_delimiter = ',',
        global = true, help_heading = DATAPLANE
    )]
    pub trusted_cidrs: Option<Vec<String>>,

    /// Bearer token of the control API; without one the control API refuses all calls [default: none]
    #[arg(
        long,
        env = "CLICKGATE_CONTROL_TOKEN",
        global = true, help_heading = CONTROL,
        hide_env_values = true
    )]
    pub control_token: Option<String>,

    /// Accept the control token in clear text on a non-loopback control address [default: false]
    #[arg(
        long,
        env = "CLICKGATE_CONTROL_INSECURE",
        global = true, help_heading = CONTROL,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub control_insecure: Option<bool>,

    /// TLS certificate chain (PEM) of the control API; with control_tls_key the API speaks gRPC over TLS only, and a token may then be used on a non-loopback address [default: none]
    #[arg(long, env = "CLICKGATE_CONTROL_TLS_CERT", global = true, help_heading = CONTROL)]
    pub control_tls_cert: Option<PathBuf>,

    /// TLS private key (PEM) of control_tls_cert [default: none]
    #[arg(long, env = "CLICKGATE_CONTROL_TLS_KEY", global = true, help_heading = CONTROL)]
    pub control_tls_key: Option<PathBuf>,

    /// Failed control-token attempts per client address per minute before it is refused for the rest of the minute (1..=1000000) [default: 10]
    #[arg(long, env = "CLICKGATE_CONTROL_AUTH_FAILURES_PER_MINUTE_MAX", global = true, help_heading = CONTROL)]
    pub control_auth_failures_per_minute_max: Option<u32>,

    /// Control calls in progress on one connection, at most; further ones wait (1..=100000) [default: 64]
    #[arg(long, env = "CLICKGATE_CONTROL_REQUESTS_CONCURRENT_MAX", global = true, help_heading = CONTROL)]
    pub control_requests_concurrent_max: Option<usize>,

    /// A control call must be answered within this long, else DEADLINE_EXCEEDED (1..=3600000) [default: 10000]
    #[arg(long, env = "CLICKGATE_CONTROL_REQUEST_TIMEOUT_MS", global = true, help_heading = CONTROL)]
    pub control_request_timeout_ms: Option<u64>,

    /// Events per `POST /v1/clicks`, at most [default: 10000]
    #[arg(long, env = "CLICKGATE_BATCH_EVENTS_MAX", global = true, help_heading = DATAPLANE)]
    pub batch_events_max: Option<usize>,

    /// Request body size, at most, in bytes [default: 8388608]
    #[arg(long, env = "CLICKGATE_BODY_BYTES_MAX", global = true, help_heading = DATAPLANE)]
    pub body_bytes_max: Option<usize>,

    /// Request line + headers size, at most, in bytes [default: 16384]
    #[arg(long, env = "CLICKGATE_HEADER_BYTES_MAX", global = true, help_heading = DATAPLANE)]
    pub header_bytes_max: Option<usize>,

    /// Open connections per dataplane core, at most; past it: 503 and close [default: 10000]
    #[arg(long, env = "CLICKGATE_CONNECTIONS_PER_CORE_MAX", global = true, help_heading = DATAPLANE)]
    pub connections_per_core_max: Option<usize>,

    /// Idle keep-alive connections are closed after this many ms [default: 60000]
    #[arg(long, env = "CLICKGATE_IDLE_TIMEOUT_MS", global = true, help_heading = DATAPLANE)]
    pub idle_timeout_ms: Option<u64>,

    /// A request head must arrive whole within this many ms of its first byte; past it the connection is closed [default: 10000]
    #[arg(long, env = "CLICKGATE_HEADER_TIMEOUT_MS", global = true, help_heading = DATAPLANE)]
    pub header_timeout_ms: Option<u64>,

    /// A request body must arrive whole within this many ms of its head; past it the connection is closed [default: 30000]
    #[arg(long, env = "CLICKGATE_BODY_TIMEOUT_MS", global = true, help_heading = DATAPLANE)]
    pub body_timeout_ms: Option<u64>,

    /// Connections one client address may hold per dataplane core (trusted_cidrs exempt); past it: 503 and close [default: 256]
    #[arg(long, env = "CLICKGATE_CONNECTIONS_PER_ADDRESS_MAX", global = true, help_heading = DATAPLANE)]
    pub connections_per_address_max: Option<usize>,

    /// Request bytes per dataplane core buffered beyond each connection's first 16 KiB (bodies being received), at most; past it: 503 and close [default: 67108864]
    #[arg(long, env = "CLICKGATE_INFLIGHT_BODY_BYTES_MAX", global = true, help_heading = DATAPLANE)]
    pub inflight_body_bytes_max: Option<usize>,

    /// Retry-After sent with 429 and 503, in seconds [default: 1]
    #[arg(long, env = "CLICKGATE_RETRY_AFTER_SECS", global = true, help_heading = DATAPLANE)]
    pub retry_after_secs: Option<u32>,

    /// Events whose ts is further than this in the future are rejected, in ms [default: 300000]
    #[arg(long, env = "CLICKGATE_TS_SKEW_MS", global = true, help_heading = DATAPLANE)]
    pub ts_skew_ms: Option<u64>,

    /// Events per second per client address; past it: 429 [default: 1000]
    #[arg(long, env = "CLICKGATE_RATE_LIMIT_EVENTS_PER_SEC", global = true, help_heading = DATAPLANE)]
    pub rate_limit_events_per_sec: Option<u32>,

    /// Client addresses tracked by the rate limiter per core, at most [default: 65536]
    #[arg(long, env = "CLICKGATE_RATE_LIMIT_ADDRESSES_MAX", global = true, help_heading = DATAPLANE)]
    pub rate_limit_addresses_max: Option<usize>,

    /// Dedup window, in seconds [default: 600]
    #[arg(long, env = "CLICKGATE_DEDUP_WINDOW_SECS", global = true, help_heading = DATAPLANE)]
    pub dedup_window_secs: Option<u64>,

    /// Peak accepted events/s of the box; sizes the box's dedup bloom filter [default: 50000]
    #[arg(long, env = "CLICKGATE_DEDUP_PEAK_EVENTS_PER_SEC", global = true, help_heading = DATAPLANE)]
    pub dedup_peak_events_per_sec: Option<u64>,

    /// Dedup false-positive rate at the peak rate [default: 0.001]
    #[arg(long, env = "CLICKGATE_DEDUP_FP_RATE", global = true, help_heading = DATAPLANE)]
    pub dedup_fp_rate: Option<f64>,

    /// Bloom generations rotated over the dedup window [default: 4]
    #[arg(long, env = "CLICKGATE_DEDUP_GENERATIONS", global = true, help_heading = DATAPLANE)]
    pub dedup_generations: Option<u32>,

    /// Capacity of each cross-core channel, in messages [default: 1024]
    #[arg(long, env = "CLICKGATE_XCORE_CHANNEL_CAPACITY", global = true, help_heading = DATAPLANE)]
    pub xcore_channel_capacity: Option<usize>,

    /// Bytes per core appended but not yet on disk, at most; past it: 503 [default: 67108864]
    #[arg(long, env = "CLICKGATE_LOG_BUFFER_BYTES_MAX", global = true, help_heading = DATAPLANE)]
    pub log_buffer_bytes_max: Option<usize>,

    /// Local log segment size, in bytes [default: 268435456]
    #[arg(long, env = "CLICKGATE_LOG_SEGMENT_BYTES", global = true, help_heading = DATAPLANE)]
    pub log_segment_bytes: Option<u64>,

    /// Local log retained per core, in bytes (0: no size bound) [default: 17179869184]
    #[arg(long, env = "CLICKGATE_LOG_RETENTION_BYTES", global = true, help_heading = DATAPLANE)]
    pub log_retention_bytes: Option<u64>,

    /// Local log retention, in seconds (0: no time bound) [default: 604800]
    #[arg(long, env = "CLICKGATE_LOG_RETENTION_SECS", global = true, help_heading = DATAPLANE)]
    pub log_retention_secs: Option<u64>,

    /// Longest a group commit waits to gather records, in microseconds [default: 200]
    #[arg(long, env = "CLICKGATE_LOG_COMMIT_INTERVAL_US", global = true, help_heading = DATAPLANE)]
    pub log_commit_interval_us: Option<u64>,

    /// With `--ack memory`, the local log is fdatasync'd at most this long after a write,
    /// in ms (what a power loss can take) [default: 200]
    #[arg(long, env = "CLICKGATE_LOG_MEMORY_SYNC_INTERVAL_MS", global = true, help_heading = DATAPLANE)]
    pub log_memory_sync_interval_ms: Option<u64>,

    /// On SIGTERM/SIGINT, in-flight requests get this long to finish, in ms [default: 10000]
    #[arg(long, env = "CLICKGATE_DRAIN_TIMEOUT_MS", global = true, help_heading = DATAPLANE)]
    pub drain_timeout_ms: Option<u64>,

    /// Unix socket between the planes (aggregate deltas) [default: <data dir>/control.sock]
    #[arg(long, env = "CLICKGATE_CONTROL_SOCKET", global = true, help_heading = COMMON)]
    pub control_socket: Option<PathBuf>,

    /// Each dataplane core ships its aggregate deltas this often, in ms (at most 1000) [default: 500]
    #[arg(long, env = "CLICKGATE_AGG_FLUSH_INTERVAL_MS", global = true, help_heading = DATAPLANE)]
    pub agg_flush_interval_ms: Option<u64>,

    /// Aggregate keys a dataplane core holds between two flushes, at most [default: 400000]
    #[arg(long, env = "CLICKGATE_AGG_KEYS_MAX", global = true, help_heading = DATAPLANE)]
    pub agg_keys_max: Option<usize>,

    /// Deltas a core keeps unacknowledged by the controlplane, at most [default: 64]
    #[arg(long, env = "CLICKGATE_SHIP_UNACKED_FRAMES_MAX", global = true, help_heading = DATAPLANE)]
    pub ship_unacked_frames_max: Option<usize>,

    /// 5-minute buckets are kept this long, in seconds [default: 86400]
    #[arg(long, env = "CLICKGATE_RETENTION_5M_SECS", global = true, help_heading = STORE)]
    pub retention_5m_secs: Option<u64>,

    /// 1-hour buckets are kept this long, in seconds [default: 604800]
    #[arg(long, env = "CLICKGATE_RETENTION_1H_SECS", global = true, help_heading = STORE)]
    pub retention_1h_secs: Option<u64>,

    /// 1-day buckets are kept this long, in seconds [default: 7776000]
    #[arg(long, env = "CLICKGATE_RETENTION_1D_SECS", global = true, help_heading = STORE)]
    pub retention_1d_secs: Option<u64>,

    /// Counter cells (window x bucket x campaign x dimension) the store holds, at most [default: 4000000]
    #[arg(long, env = "CLICKGATE_STORE_CELLS_MAX", global = true, help_heading = STORE)]
    pub store_cells_max: Option<usize>,

    /// The store writes a snapshot at least this often while deltas arrive, in seconds [default: 60]
    #[arg(long, env = "CLICKGATE_SNAPSHOT_INTERVAL_SECS", global = true, help_heading = STORE)]
    pub snapshot_interval_secs: Option<u64>,

    /// Archive: raw record bytes a log stream buffers before its Parquet files are written (the archiver's memory per core) [default: 134217728]
    #[arg(long, env = "CLICKGATE_ARCHIVE_ROLL_BYTES", global = true, help_heading = ARCHIVE)]
    pub archive_roll_bytes: Option<u64>,

    /// Archive: buffered records are written at most this long after the first one was read, in seconds, 1..=60 [default: 30]
    #[arg(long, env = "CLICKGATE_ARCHIVE_ROLL_SECS", global = true, help_heading = ARCHIVE)]
    pub archive_roll_secs: Option<u64>,

    /// Archive: hour partitions (open files) one range of a stream may touch, at most [default: 48]
    #[arg(long, env = "CLICKGATE_ARCHIVE_OPEN_FILES_MAX", global = true, help_heading = ARCHIVE)]
    pub archive_open_files_max: Option<usize>,

    /// Archive: rows per Parquet row group, at most [default: 1048576]
    #[arg(long, env = "CLICKGATE_ARCHIVE_ROW_GROUP_ROWS", global = true, help_heading = ARCHIVE)]
    pub archive_row_group_rows: Option<usize>,

    /// Archive: how often the local log is polled for new records, in ms (1..=60000) [default: 200]
    #[arg(long, env = "CLICKGATE_ARCHIVE_POLL_MS", global = true, help_heading = ARCHIVE)]
    pub archive_poll_ms: Option<u64>,

    /// Query API keys file: lines `key = advertiser_id` or `key = "admin"` (keys of 16..=128 printable bytes); with keys every query call and the dashboard need `Authorization: Bearer <key>` [default: none]
    #[arg(long, env = "CLICKGATE_API_KEYS_FILE", global = true, help_heading = QUERY)]
    pub api_keys_file: Option<PathBuf>,

    /// Query API keys inline, `key=advertiser_id,key=admin` (added to api_keys_file's) [default: none]
    #[arg(
        long,
        env = "CLICKGATE_API_KEYS",
        global = true, help_heading = QUERY,
        hide_env_values = true
    )]
    pub api_keys: Option<String>,

    /// Serve the query API without API keys on a non-loopback address (every tenant's data to anyone who reaches it); refused otherwise [default: false]
    #[arg(
        long,
        env = "CLICKGATE_QUERY_INSECURE",
        global = true, help_heading = QUERY,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub query_insecure: Option<bool>,

    /// Failed query API key attempts per client address per minute before it gets 429 for the rest of the minute (1..=1000000) [default: 10]
    #[arg(
        long,
        env = "CLICKGATE_QUERY_AUTH_FAILURES_PER_MINUTE_MAX",
        global = true, help_heading = QUERY
    )]
    pub query_auth_failures_per_minute_max: Option<u32>,

    /// Client addresses whose failed key attempts are tracked, at most (1..=10000000) [default: 4096]
    #[arg(long, env = "CLICKGATE_QUERY_AUTH_ADDRESSES_MAX", global = true, help_heading = QUERY)]
    pub query_auth_addresses_max: Option<usize>,

    /// Query API connections open at once, at most; past it a new connection is closed at once (1..=1000000) [default: 1024]
    #[arg(long, env = "CLICKGATE_QUERY_CONNECTIONS_MAX", global = true, help_heading = QUERY)]
    pub query_connections_max: Option<usize>,

    /// Query API connections open at once from one client address, at most (1..=1000000) [default: 64]
    #[arg(long, env = "CLICKGATE_QUERY_CONNECTIONS_PER_ADDRESS_MAX", global = true, help_heading = QUERY)]
    pub query_connections_per_address_max: Option<usize>,

    /// A query API request head must arrive whole within this long (an idle keep-alive connection is closed after it) (1..=3600000) [default: 10000]
    #[arg(long, env = "CLICKGATE_QUERY_HEADER_TIMEOUT_MS", global = true, help_heading = QUERY)]
    pub query_header_timeout_ms: Option<u64>,

    /// A query API request must be answered within this long, else 503 (1..=3600000) [default: 10000]
    #[arg(long, env = "CLICKGATE_QUERY_REQUEST_TIMEOUT_MS", global = true, help_heading = QUERY)]
    pub query_request_timeout_ms: Option<u64>,
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
                log_format,
                data_dir,
                ingest_addr,
                query_addr,
                control_addr,
                cores,
                kafka_brokers,
                kafka_topic,
                kafka_partitions,
                kafka_replication,
                kafka_linger_ms,
                kafka_batch_bytes,
                kafka_inflight_records_max,
                kafka_start_timeout_ms,
                kafka_security_protocol,
                kafka_ssl_ca,
                kafka_sasl_mechanism,
                kafka_sasl_username,
                kafka_sasl_password,
                kafka_ack_timeout_ms,
                kafka_ack_poll_us,
                redis_url,
                redis_tls_ca,
                box_id,
                redis_key_prefix,
                redis_flush_interval_ms,
                redis_pipeline_commands_max,
                redis_ttl_5m_secs,
                redis_ttl_1h_secs,
                redis_ttl_1d_secs,
                redis_spill_bytes_max,
                redis_retry_backoff_min_ms,
                redis_retry_backoff_max_ms,
                redis_timeout_ms,
                archive_url,
                ack,
                trusted_cidrs,
                control_token,
                batch_events_max,
                body_bytes_max,
                header_bytes_max,
                connections_per_core_max,
                idle_timeout_ms,
                header_timeout_ms,
                body_timeout_ms,
                connections_per_address_max,
                inflight_body_bytes_max,
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
                log_memory_sync_interval_ms,
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
                api_keys_file,
                api_keys,
                query_insecure,
                query_auth_failures_per_minute_max,
                query_auth_addresses_max,
                control_insecure,
                control_tls_cert,
                control_tls_key,
                control_auth_failures_per_minute_max,
                control_requests_concurrent_max,
                control_request_timeout_ms,
                query_connections_max,
                query_connections_per_address_max,
                query_header_timeout_ms,
                query_request_timeout_ms,
            ]
        )
    }

    /// The data directory, made absolute against the working directory: glommio opens
    /// directories through io_uring, which refuses a relative path (EBADF).
    pub fn data_dir(&self) -> PathBuf {
        let dir = self
            .data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("./clickgate-data"));
        std::path::absolute(&dir).unwrap_or(dir)
    }

    /// Checks the settings that this build cannot honour yet, so none is silently ignored.
    pub fn check_supported(&self) -> anyhow::Result<()> {
        if self.ack == Some(AckMode::Kafka) && self.kafka()?.is_none() {
            bail!("ack = kafka needs kafka_brokers (--kafka-brokers); use memory or disk without Kafka");
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
            header_timeout_ms: self.header_timeout_ms.unwrap_or(d.header_timeout_ms),
            body_timeout_ms: self.body_timeout_ms.unwrap_or(d.body_timeout_ms),
            connections_per_address_max: self
                .connections_per_address_max
                .unwrap_or(d.connections_per_address_max),
            inflight_body_bytes_max: self
                .inflight_body_bytes_max
                .unwrap_or(d.inflight_body_bytes_max),
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
            log_memory_sync_interval_ms: self
                .log_memory_sync_interval_ms
                .unwrap_or(d.log_memory_sync_interval_ms),
            drain_timeout_ms: self.drain_timeout_ms.unwrap_or(d.drain_timeout_ms),
            control_socket: self.control_socket.clone(),
            agg_flush_interval_ms: self
                .agg_flush_interval_ms
                .unwrap_or(d.agg_flush_interval_ms),
            agg_keys_max: self.agg_keys_max.unwrap_or(d.agg_keys_max),
            ship_unacked_frames_max: self
                .ship_unacked_frames_max
                .unwrap_or(d.ship_unacked_frames_max),
            box_id: self.box_id()?,
            kafka_ack_timeout_ms: self.kafka_ack_timeout_ms.unwrap_or(d.kafka_ack_timeout_ms),
            kafka_ack_poll_us: self.kafka_ack_poll_us.unwrap_or(d.kafka_ack_poll_us),
            ..d
        };
        cfg.validate().map_err(anyhow::Error::msg)?;
        Ok(cfg)
    }
}

impl Settings {
    /// Kafka settings; `None` when `kafka_brokers` is empty (no Kafka at all).
    pub fn kafka(&self) -> anyhow::Result<Option<clickgate_kafka::KafkaConfig>> {
        let Some(brokers) = self
            .kafka_brokers
            .as_deref()
            .map(str::trim)
            .filter(|b| !b.is_empty())
        else {
            return Ok(None);
        };
        let d = clickgate_kafka::KafkaConfig::default();
        let cfg = clickgate_kafka::KafkaConfig {
            brokers: brokers.to_string(),
            topic: self.kafka_topic.clone().unwrap_or(d.topic),
            partitions: self.kafka_partitions.unwrap_or(d.partitions),
            replication: self.kafka_replication.unwrap_or(d.replication),
            linger_ms: self.kafka_linger_ms.unwrap_or(d.linger_ms),
            batch_bytes: self.kafka_batch_bytes.unwrap_or(d.batch_bytes),
            inflight_records_max: self
                .kafka_inflight_records_max
                .unwrap_or(d.inflight_records_max),
            start_timeout_ms: self.kafka_start_timeout_ms.unwrap_or(d.start_timeout_ms),
            security_protocol: self
                .kafka_security_protocol
                .clone()
                .unwrap_or(d.security_protocol),
            ssl_ca: self.kafka_ssl_ca.clone(),
            sasl_mechanism: self
                .kafka_sasl_mechanism
                .clone()
                .unwrap_or(d.sasl_mechanism),
            sasl_username: self.kafka_sasl_username.clone().filter(|u| !u.is_empty()),
            sasl_password: self
                .kafka_sasl_password
                .clone()
                .filter(|p| !p.is_empty())
                .map(clickgate_kafka::Secret),
        };
        cfg.validate().map_err(anyhow::Error::msg)?;
        Ok(Some(cfg))
    }

    /// The archive's location (a directory or `s3://`) and bounds; a bad one is exit 2.
    pub fn archive(&self) -> anyhow::Result<clickgate_controlplane::archive::ArchiveConfig> {
        use clickgate_controlplane::archive::{ArchiveConfig, ArchiveLocation};
        let d = ArchiveConfig::default();
        let loc = ArchiveLocation::parse(self.archive_url.as_deref(), &self.data_dir())
            .map_err(anyhow::Error::msg)?;
        let cfg = ArchiveConfig {
            location: loc,
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
        match (&self.control_tls_cert, &self.control_tls_key) {
            (Some(_), None) => anyhow::bail!("control_tls_cert is set without control_tls_key"),
            (None, Some(_)) => anyhow::bail!("control_tls_key is set without control_tls_cert"),
            _ => {}
        }
        let cfg = ControlplaneConfig {
            data_dir: self.data_dir(),
            query_addr: self.query_addr.unwrap_or(d.query_addr),
            control_addr: self.control_addr.unwrap_or(d.control_addr),
            control_token: self.control_token.clone().filter(|t| !t.is_empty()),
            control_insecure: self.control_insecure.unwrap_or(d.control_insecure),
            control_tls: match (&self.control_tls_cert, &self.control_tls_key) {
                (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
                _ => None,
            },
            control_auth_failures_per_minute_max: self
                .control_auth_failures_per_minute_max
                .unwrap_or(d.control_auth_failures_per_minute_max),
            control_requests_concurrent_max: self
                .control_requests_concurrent_max
                .unwrap_or(d.control_requests_concurrent_max),
            control_request_timeout_ms: self
                .control_request_timeout_ms
                .unwrap_or(d.control_request_timeout_ms),
            query_serve: clickgate_controlplane::serve::ServeLimits {
                connections_max: self
                    .query_connections_max
                    .unwrap_or(d.query_serve.connections_max),
                connections_per_address_max: self
                    .query_connections_per_address_max
                    .unwrap_or(d.query_serve.connections_per_address_max),
                header_timeout_ms: self
                    .query_header_timeout_ms
                    .unwrap_or(d.query_serve.header_timeout_ms),
                request_timeout_ms: self
                    .query_request_timeout_ms
                    .unwrap_or(d.query_serve.request_timeout_ms),
            },
            control_socket: self.control_socket.clone(),
            retention_5m_secs: self.retention_5m_secs.unwrap_or(d.retention_5m_secs),
            retention_1h_secs: self.retention_1h_secs.unwrap_or(d.retention_1h_secs),
            retention_1d_secs: self.retention_1d_secs.unwrap_or(d.retention_1d_secs),
            store_cells_max: self.store_cells_max.unwrap_or(d.store_cells_max),
            snapshot_interval_secs: self
                .snapshot_interval_secs
                .unwrap_or(d.snapshot_interval_secs),
            redis: self.redis()?,
            archive: self.archive()?,
            auth: self.query_auth()?,
            ..d
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

impl Settings {
    /// `box_id`, or the one kept in `<data_dir>/box_id` (created on first use).
    pub fn box_id(&self) -> anyhow::Result<u64> {
        let dir = self.data_dir();
        clickgate_proto::box_id::resolve(&dir, self.box_id)
            .with_context(|| format!("box id in {}", dir.display()))
    }

    /// Redis settings; `None` when `redis_url` is empty (the embedded store).
    pub fn redis(
        &self,
    ) -> anyhow::Result<Option<clickgate_controlplane::redis_store::RedisConfig>> {
        use clickgate_controlplane::redis_store::RedisConfig;
        let urls = RedisConfig::parse_urls(self.redis_url.as_deref().unwrap_or(""));
        if urls.is_empty() {
            return Ok(None);
        }
        let d = RedisConfig::default();
        let tls_ca = match &self.redis_tls_ca {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    anyhow::anyhow!("redis_tls_ca {}: cannot read: {e}", path.display())
                })?;
                if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
                    anyhow::bail!(
                        "redis_tls_ca {}: not a PEM file holding a certificate",
                        path.display()
                    );
                }
                Some(pem)
            }
            None => None,
        };
        let c = RedisConfig {
            urls,
            tls_ca,
            key_prefix: self.redis_key_prefix.clone().unwrap_or_default(),
            flush_interval_ms: self.redis_flush_interval_ms.unwrap_or(d.flush_interval_ms),
            pipeline_commands_max: self
                .redis_pipeline_commands_max
                .unwrap_or(d.pipeline_commands_max),
            ttl_5m_secs: self.redis_ttl_5m_secs.unwrap_or(d.ttl_5m_secs),
            ttl_1h_secs: self.redis_ttl_1h_secs.unwrap_or(d.ttl_1h_secs),
            ttl_1d_secs: self.redis_ttl_1d_secs.unwrap_or(d.ttl_1d_secs),
            spill_bytes_max: self.redis_spill_bytes_max.unwrap_or(d.spill_bytes_max),
            retry_backoff_min_ms: self
                .redis_retry_backoff_min_ms
                .unwrap_or(d.retry_backoff_min_ms),
            retry_backoff_max_ms: self
                .redis_retry_backoff_max_ms
                .unwrap_or(d.retry_backoff_max_ms),
            timeout_ms: self.redis_timeout_ms.unwrap_or(d.timeout_ms),
            ..d
        };
        c.validate().map_err(anyhow::Error::msg)?;
        Ok(Some(c))
    }
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

impl Settings {
    /// API keys and their bounds: `api_keys_file` and `api_keys` together.
    pub fn query_auth(&self) -> anyhow::Result<clickgate_controlplane::auth::AuthConfig> {
        use clickgate_controlplane::auth::{ApiKeys, AuthConfig};
        let d = AuthConfig::default();
        let mut keys = match &self.api_keys_file {
            Some(path) => ApiKeys::from_file(path).map_err(anyhow::Error::msg)?,
            None => ApiKeys::default(),
        };
        if let Some(list) = self.api_keys.as_deref() {
            let inline = ApiKeys::parse_list(list, "api_keys (CLICKGATE_API_KEYS)")
                .map_err(anyhow::Error::msg)?;
            keys = keys.merge(inline).map_err(anyhow::Error::msg)?;
        }
        let cfg = AuthConfig {
            keys,
            query_insecure: self.query_insecure.unwrap_or(d.query_insecure),
            failures_per_minute_max: self
                .query_auth_failures_per_minute_max
                .unwrap_or(d.failures_per_minute_max),
            failures_addresses_max: self
                .query_auth_addresses_max
                .unwrap_or(d.failures_addresses_max),
        };
        if !(1..=1_000_000).contains(&cfg.failures_per_minute_max) {
            bail!(
                "query_auth_failures_per_minute_max must be 1..=1000000, got {}",
                cfg.failures_per_minute_max
            );
        }
        if !(1..=10_000_000).contains(&cfg.failures_addresses_max) {
            bail!(
                "query_auth_addresses_max must be 1..=10000000, got {}",
                cfg.failures_addresses_max
            );
        }
        Ok(cfg)
    }
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

    /// The typed configs settings resolve to, as text (for comparisons).
    fn resolved_settings(s: &Settings) -> String {
        format!(
            "{:?}\n{:?}\n{:?}\n{:?}",
            s.dataplane().unwrap_or_else(|e| panic!("{s:?}\n{e:#}")),
            s.controlplane().unwrap_or_else(|e| panic!("{s:?}\n{e:#}")),
            s.kafka().unwrap_or_else(|e| panic!("{s:?}\n{e:#}")),
            s.log_format.unwrap_or_default(),
        )
    }

    /// [`resolved_settings`] of a TOML text.
    fn resolved(text: &str) -> String {
        let s: Settings = toml::from_str(text).unwrap_or_else(|e| panic!("{text}\n{e}"));
        resolved_settings(&s)
    }

    /// The ids of every setting (the clap argument ids are the TOML keys).
    fn setting_ids() -> Vec<String> {
        use clap::Args;
        Settings::augment_args(clap::Command::new("t"))
            .get_arguments()
            .map(|a| a.get_id().to_string())
            .collect()
    }

    /// deploy/clickgate.toml names every setting, parses with the real loader, and holds
    /// the defaults (but for data_dir), as its header says.
    #[test]
    fn the_example_file_has_every_setting_and_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/clickgate.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let ids = setting_ids();
        assert!(ids.len() >= 70, "{ids:?}");
        for id in &ids {
            let key = format!("{id} = ");
            assert!(
                text.lines()
                    .any(|l| l.starts_with(&key) || l.starts_with(&format!("# {key}"))),
                "deploy/clickgate.toml does not name the setting {id}"
            );
        }
        let mut file = Settings::from_file(&path).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(file.data_dir, Some(PathBuf::from("/var/lib/clickgate")));
        file.data_dir = None;
        file.box_id = Some(7);
        let defaults = Settings {
            box_id: Some(7),
            ..Settings::default()
        };
        assert_eq!(resolved_settings(&file), resolved_settings(&defaults));
        // The commented-out settings are valid keys with values of the right type.
        let uncommented: String = text
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest) if ids.iter().any(|id| rest.starts_with(&format!("{id} = "))) => rest,
                _ => l,
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let all: Settings = toml::from_str(&uncommented).unwrap_or_else(|e| panic!("{e}"));
        assert!(all.control_token.is_some() && all.box_id.is_some() && all.archive_url.is_some());
    }

    /// Every setting's help ends in `[default: X]`, and X is what the code uses when the
    /// setting is absent: setting it to X explicitly resolves to the same typed configs
    /// (the planes' `Default` impls and every fallback on the way).
    #[test]
    fn help_defaults_match_the_code() {
        use clap::Args as _;
        let cmd = Settings::augment_args(clap::Command::new("t"));
        // Kafka and Redis settings resolve only with brokers / a URL; a fixed box id keeps
        // the test off the file system.
        let base = [
            ("box_id", "7"),
            ("kafka_brokers", "\"127.0.0.1:9\""),
            ("redis_url", "\"redis://127.0.0.1:9\""),
        ];
        let data_dir = Settings::default().data_dir().display().to_string();
        let mut checked = 0;
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            let heading = arg.get_help_heading();
            assert!(heading.is_some(), "--{id} has no help heading");
            let default = help
                .rsplit_once("[default: ")
                .and_then(|(_, d)| d.strip_suffix(']'))
                .unwrap_or_else(|| panic!("--{id}: help has no [default: ...]: {help:?}"));
            let base_text: String = base
                .iter()
                .filter(|(k, _)| *k != id)
                .map(|(k, v)| format!("{k} = {v}\n"))
                .collect();
            // Defaults that are not a value: what they stand for, or nothing to write.
            let literal = match (id, default) {
                ("box_id", "generated")
                | (
                    "api_keys_file" | "control_tls_cert" | "control_tls_key" | "redis_tls_ca"
                    | "kafka_ssl_ca",
                    "none",
                ) => continue,
                ("control_socket", "<data dir>/control.sock") => {
                    // Kept unresolved in the configs: check where both planes put it.
                    let s = Settings {
                        box_id: Some(7),
                        ..Settings::default()
                    };
                    let want = Path::new(&data_dir).join("control.sock");
                    assert_eq!(s.dataplane().unwrap().control_socket_path(), want);
                    assert_eq!(s.controlplane().unwrap().control_socket_path(), want);
                    checked += 1;
                    continue;
                }
                (_, "empty") => "\"\"".to_string(),
                ("trusted_cidrs", "none") => "[]".to_string(),
                (
                    "control_token" | "api_keys" | "kafka_sasl_username" | "kafka_sasl_password",
                    "none",
                ) => "\"\"".to_string(),
                (_, d) if d.parse::<f64>().is_ok() || d == "true" || d == "false" => d.to_string(),
                (_, d) => format!("{:?}", d.replace("<data dir>", &data_dir)),
            };
            let with = format!("{base_text}{id} = {literal}\n");
            assert_eq!(
                resolved(&base_text),
                resolved(&with),
                "--{id}: its help says [default: {default}], but setting that differs from leaving it unset"
            );
            checked += 1;
        }
        assert!(checked >= 65, "only {checked} settings checked");
    }

    /// A value other than the default does change the configs: the comparison above can fail.
    #[test]
    fn a_changed_setting_changes_the_configs() {
        let base = "box_id = 7\n";
        assert_ne!(
            resolved(base),
            resolved("box_id = 7\nbatch_events_max = 9999\n")
        );
        assert_ne!(
            resolved(base),
            resolved("box_id = 7\nretention_1h_secs = 1\n")
        );
        assert_ne!(
            resolved(base),
            resolved("box_id = 7\nlog_format = \"json\"\n")
        );
    }

    #[test]
    fn subcommands_show_their_own_settings() {
        assert!(shown_in("dataplane", "ingest_addr", Some(DATAPLANE)));
        assert!(!shown_in("dataplane", "query_addr", Some(QUERY)));
        assert!(shown_in("controlplane", "redis_url", Some(REDIS)));
        assert!(!shown_in("controlplane", "cores", Some(DATAPLANE)));
        assert!(shown_in("billing", "archive_url", Some(ARCHIVE)));
        assert!(!shown_in("billing", "archive_roll_bytes", Some(ARCHIVE)));
        assert!(!shown_in("billing", "kafka_brokers", Some(KAFKA)));
        assert!(shown_in("run", "kafka_brokers", Some(KAFKA)));
        assert!(!shown_in("rules", "data_dir", Some(COMMON)));
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
