//! clickgate-kafka: the Kafka backbone of docs/schema.md.
//!
//! The dataplane never talks to Kafka. Every core appends to its local log as always;
//! one forwarder thread per core ([`forwarder`]) tails that log with `LogReader` from its
//! cursor (consumer `kafka`, `proto::cursor`), produces each record to `raw_clicks` with
//! rdkafka (whose own threads do the network I/O), and moves the cursor over the prefix
//! the broker acknowledged (acks=all). A broker that is down or slow leaves the records
//! in the log — the log is the spill — and the log's retention keeps every segment the
//! cursor has not passed (past its size bound the log refuses new records: 503).
//! [`topic`] creates and checks the topic at start; [`replay`] consumes it back through
//! the same aggregation code.

pub mod consumer;
pub mod forwarder;
pub mod murmur2;
pub mod replay;
pub mod topic;

use std::time::Duration;

/// The consumer name of the forwarder's cursors (`<data_dir>/cursors/kafka/core-<k>`).
pub const CURSOR_CONSUMER: &str = "kafka";

/// Record headers the forwarder writes, so a record can be traced to its origin and a
/// restarted forwarder can tell which of its records the broker already has.
pub const HEADER_BOX: &str = "cg-box";
pub const HEADER_CORE: &str = "cg-core";
pub const HEADER_LSN: &str = "cg-lsn";

/// A password: never shown by `Debug` (settings are logged).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

/// Kafka settings; every bound with its unit last. Filled from `Settings` by the binary.
#[derive(Clone, Debug)]
pub struct KafkaConfig {
    /// Bootstrap brokers, `host:port,...`.
    pub brokers: String,
    pub topic: String,
    /// Partitions and replication factor used when the topic has to be created.
    pub partitions: u32,
    pub replication: u16,
    /// librdkafka `linger.ms`: how long a batch waits to fill.
    pub linger_ms: u32,
    /// librdkafka `batch.size`: bytes of one partition's batch, at most.
    pub batch_bytes: u32,
    /// Records a core's forwarder has produced and the broker not yet acknowledged, at
    /// most (also librdkafka's `queue.buffering.max.messages`). Past it the forwarder
    /// waits; the records wait in the local log.
    pub inflight_records_max: u32,
    /// Start-up (topic check, recovery scan) gives up after this long, in ms.
    pub start_timeout_ms: u64,
    /// librdkafka `security.protocol`: `plaintext`, `ssl`, `sasl_ssl` or `sasl_plaintext`.
    pub security_protocol: String,
    /// With `sasl_*`: `SCRAM-SHA-512`, `SCRAM-SHA-256` or `PLAIN` (not over plaintext).
    pub sasl_mechanism: String,
    pub sasl_username: Option<String>,
    pub sasl_password: Option<Secret>,
    /// With `ssl`: the certificate authority (PEM) brokers are checked against; `None`:
    /// the system's trust store.
    pub ssl_ca: Option<std::path::PathBuf>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: String::new(),
            topic: "raw_clicks".into(),
            partitions: 6,
            replication: 1,
            linger_ms: 5,
            batch_bytes: 1 << 20,
            inflight_records_max: 100_000,
            start_timeout_ms: 10_000,
            security_protocol: "plaintext".into(),
            ssl_ca: None,
            sasl_mechanism: "SCRAM-SHA-512".into(),
            sasl_username: None,
            sasl_password: None,
        }
    }
}

impl KafkaConfig {
    /// Checks every bound; the message names the setting.
    pub fn validate(&self) -> Result<(), String> {
        let t = &self.topic;
        if t.is_empty()
            || t.len() > 249
            || !t
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(format!("kafka_topic {t:?} must be 1-249 of [a-zA-Z0-9._-]"));
        }
        let bound = |name: &str, v: u64, lo: u64, hi: u64| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(format!("{name} must be {lo}..={hi}, got {v}"))
            }
        };
        bound("kafka_partitions", self.partitions.into(), 1, 10_000)?;
        bound("kafka_replication", self.replication.into(), 1, 16)?;
        bound("kafka_linger_ms", self.linger_ms.into(), 0, 1_000)?;
        bound("kafka_batch_bytes", self.batch_bytes.into(), 1024, 16 << 20)?;
        bound(
            "kafka_inflight_records_max",
            self.inflight_records_max.into(),
            1,
            1_000_000,
        )?;
        bound(
            "kafka_start_timeout_ms",
            self.start_timeout_ms,
            100,
            600_000,
        )?;
        let proto = self.security_protocol.as_str();
        let sasl = proto.starts_with("sasl_");
        if sasl {
            if !["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"].contains(&self.sasl_mechanism.as_str())
            {
                return Err(format!(
                    "kafka_sasl_mechanism must be SCRAM-SHA-512, SCRAM-SHA-256 or PLAIN, got {:?}",
                    self.sasl_mechanism
                ));
            }
            if self.sasl_username.as_deref().is_none_or(str::is_empty)
                || self.sasl_password.as_ref().is_none_or(|p| p.0.is_empty())
            {
                return Err(format!(
                    "kafka_security_protocol {proto} needs kafka_sasl_username and kafka_sasl_password"
                ));
            }
            if proto == "sasl_plaintext" && self.sasl_mechanism == "PLAIN" {
                return Err("kafka_sasl_mechanism PLAIN over sasl_plaintext would send the password in clear: use sasl_ssl or SCRAM".into());
            }
        } else if self.sasl_username.is_some() || self.sasl_password.is_some() {
            return Err(format!(
                "kafka_sasl_username/kafka_sasl_password are set but kafka_security_protocol is {proto}"
            ));
        }
        match proto {
            "plaintext" | "sasl_plaintext" => {
                if self.ssl_ca.is_some() {
                    return Err(format!(
                        "kafka_ssl_ca is set but kafka_security_protocol is {proto}"
                    ));
                }
            }
            "ssl" | "sasl_ssl" => {
                if let Some(ca) = &self.ssl_ca {
                    let pem = std::fs::read(ca)
                        .map_err(|e| format!("kafka_ssl_ca {}: cannot read: {e}", ca.display()))?;
                    if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
                        return Err(format!(
                            "kafka_ssl_ca {}: not a PEM file holding a certificate",
                            ca.display()
                        ));
                    }
                }
            }
            other => {
                return Err(format!(
                    "kafka_security_protocol must be plaintext, ssl, sasl_ssl or sasl_plaintext, got {other:?}"
                ))
            }
        }
        Ok(())
    }

    pub fn start_timeout(&self) -> Duration {
        Duration::from_millis(self.start_timeout_ms)
    }

    /// librdkafka settings shared by every client clickgate makes.
    pub fn client_config(&self) -> rdkafka::ClientConfig {
        let mut c = rdkafka::ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set(
                "socket.timeout.ms",
                self.start_timeout_ms.clamp(10, 300_000).to_string(),
            )
            .set("log_level", "4")
            .set("security.protocol", &self.security_protocol);
        if matches!(self.security_protocol.as_str(), "ssl" | "sasl_ssl") {
            match &self.ssl_ca {
                Some(ca) => c.set("ssl.ca.location", ca.display().to_string()),
                None => c.set("ssl.ca.location", "probe"),
            };
        }
        if self.security_protocol.starts_with("sasl_") {
            c.set("sasl.mechanism", &self.sasl_mechanism);
            if let Some(u) = &self.sasl_username {
                c.set("sasl.username", u);
            }
            if let Some(p) = &self.sasl_password {
                c.set("sasl.password", &p.0);
            }
        }
        c
    }
}

/// The rdkafka the forwarder is built with, for tests and tools that read the topic.
pub use rdkafka;
