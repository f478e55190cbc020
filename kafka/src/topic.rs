//! Topic management at start: create `raw_clicks` with the configured partitions and
//! replication if it is missing, then check it. Bounded by `start_timeout_ms`; an
//! unreachable broker is an error that names the broker list.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::ClientConfig;

use crate::KafkaConfig;

/// Makes sure the topic exists and returns its partition count.
pub fn ensure_topic(cfg: &KafkaConfig) -> anyhow::Result<u32> {
    let deadline = Instant::now() + cfg.start_timeout();
    let admin: AdminClient<DefaultClientContext> = cfg.client_config().create()?;
    if let Some(n) = partitions(&admin, cfg, deadline)? {
        return Ok(n);
    }
    let new = NewTopic::new(
        &cfg.topic,
        cfg.partitions as i32,
        TopicReplication::Fixed(cfg.replication as i32),
    );
    let opts = AdminOptions::new().operation_timeout(Some(remaining(deadline)));
    let results = block_on(admin.create_topics([&new], &opts), deadline)
        .ok_or_else(|| unreachable(cfg))?
        .map_err(|e| anyhow!("creating topic {:?} on {}: {e}", cfg.topic, cfg.brokers))?;
    for r in results {
        match r {
            Ok(_) => {}
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, code)) => bail!("creating topic {t:?} on {}: {code}", cfg.brokers),
        }
    }
    tracing::info!(topic = %cfg.topic, partitions = cfg.partitions, replication = cfg.replication, brokers = %cfg.brokers, "kafka: created topic");
    // Metadata may lag the creation by a moment.
    while Instant::now() < deadline {
        if let Some(n) = partitions(&admin, cfg, deadline)? {
            return Ok(n);
        }
        thread::sleep(Duration::from_millis(50));
    }
    bail!(
        "topic {:?} was created on {} but does not show in its metadata within {} ms",
        cfg.topic,
        cfg.brokers,
        cfg.start_timeout_ms
    )
}

/// The topic's partition count, `None` when it does not exist.
fn partitions(
    admin: &AdminClient<DefaultClientContext>,
    cfg: &KafkaConfig,
    deadline: Instant,
) -> anyhow::Result<Option<u32>> {
    let md = admin
        .inner()
        .fetch_metadata(Some(&cfg.topic), remaining(deadline))
        .map_err(|e| anyhow!("{} ({e})", unreachable(cfg)))?;
    let Some(t) = md.topics().iter().find(|t| t.name() == cfg.topic) else {
        return Ok(None);
    };
    if t.error().is_some() || t.partitions().is_empty() {
        return Ok(None);
    }
    Ok(Some(t.partitions().len() as u32))
}

fn unreachable(cfg: &KafkaConfig) -> anyhow::Error {
    anyhow!(
        "no Kafka broker of {:?} answered within {} ms (--kafka-brokers, --kafka-start-timeout-ms)",
        cfg.brokers,
        cfg.start_timeout_ms
    )
}

pub(crate) fn remaining(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

/// Runs one of rdkafka's runtime-free futures (admin calls) on this thread; `None` when
/// it is not done by `deadline`.
pub(crate) fn block_on<F: Future>(f: F, deadline: Instant) -> Option<F::Output> {
    struct Unpark(Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Arc::new(Unpark(thread::current())).into();
    let mut cx = Context::from_waker(&waker);
    let mut f = pin!(f);
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::park_timeout(remaining(deadline).min(Duration::from_millis(100)));
    }
}

/// A producer config with the contract's guarantees (§5): acks=all, idempotence, LZ4,
/// and the Java client's partitioner (murmur2 of the key; see [`crate::murmur2`]).
pub fn producer_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = cfg.client_config();
    c.set("acks", "all")
        .set("enable.idempotence", "true")
        .set("compression.type", "lz4")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", cfg.linger_ms.to_string())
        .set("batch.size", cfg.batch_bytes.to_string())
        .set(
            "queue.buffering.max.messages",
            cfg.inflight_records_max.to_string(),
        )
        // Retry until delivered: a broker outage leaves records queued, in order, not
        // failed; what is not yet produced waits in the local log.
        .set("message.timeout.ms", "0");
    c
}
