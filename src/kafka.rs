//! Wiring of the Kafka forwarder around the dataplane: the topic is checked
//! before ingest starts, the forwarder threads start once the core logs are open, and
//! stop after the dataplane drained, delivering what its logs still hold.

use std::sync::Arc;
use std::time::Duration;

use clickgate_dataplane::{Dataplane, DataplaneConfig};
use clickgate_kafka::forwarder::Forwarder;
use clickgate_kafka::KafkaConfig;
use clickgate_proto::sink::SinkStatus;

/// Checks the topic (bounded by `kafka_start_timeout_ms`) and gives the dataplane the
/// status it reads for `ack = kafka` and `/readyz`.
pub fn prepare(cfg: &mut DataplaneConfig, kafka: &KafkaConfig) -> anyhow::Result<Arc<SinkStatus>> {
    clickgate_kafka::topic::ensure_topic(kafka)?;
    let status = Arc::new(SinkStatus::default());
    cfg.sink = Some(status.clone());
    Ok(status)
}

/// Starts the forwarder; on failure stops the dataplane it was started for.
pub fn start(
    dp: &Dataplane,
    kafka: KafkaConfig,
    cfg: &DataplaneConfig,
    status: Arc<SinkStatus>,
) -> anyhow::Result<Forwarder> {
    Forwarder::start(kafka, &cfg.data_dir, cfg.box_id, status)
        .inspect_err(|_| dp.shutdown_handle().trigger())
}

/// After the dataplane stopped: deliver the rest, within the drain timeout.
pub fn stop(fwd: Option<Forwarder>, drain_timeout_ms: u64) {
    if let Some(f) = fwd {
        tracing::info!("stopping: delivering the rest of the local log to kafka");
        f.stop(Duration::from_millis(drain_timeout_ms));
    }
}
