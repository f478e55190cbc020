//! A `raw_clicks` consumer-group member that hands records out per partition, for the
//! Kafka-fed archivers (`clickgate archive --from-kafka`).
//!
//! ```text
//! subscribe(topic) as group G ─▶ assigned partitions = streams "<topic>-p<k>"
//! poll ─▶ each record's value appended to its partition's buffer (one copy, no
//!         allocation per record; all buffers together at most `buffer_bytes_max`)
//! next(k) ─▶ (offset, offset + 1, value) borrowed from the buffer
//! commit(k, to) ─▶ synchronous offset commit, only after the caller's files are durable
//! rebalance ─▶ revoked partitions' buffers dropped and reported by `take_revoked`
//! ```
//!
//! Offsets are committed only by [`PartitionConsumer::commit`] (no auto-commit, no
//! offset store), so a member that dies (kill -9) or loses a partition leaves the
//! committed offset at the end of the last range it made durable; the next owner starts
//! there (and redoes an interrupted range under the same name, see the archive docs).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};

use crate::KafkaConfig;

/// Settings of a consumer-group member.
#[derive(Clone, Debug)]
pub struct ConsumerConfig {
    pub kafka: KafkaConfig,
    /// Consumer group id: archivers of one archive share one group.
    pub group: String,
    /// Record bytes buffered across partitions, at most (then polling waits for the
    /// caller to drain them).
    pub buffer_bytes_max: usize,
    /// librdkafka `session.timeout.ms`: a member silent this long is removed from the
    /// group and its partitions reassigned.
    pub session_timeout_ms: u32,
    /// librdkafka `max.poll.interval.ms`: the longest the caller may go without
    /// polling (a range's write and upload must fit in it).
    pub max_poll_interval_ms: u32,
}

impl ConsumerConfig {
    pub fn new(kafka: KafkaConfig, group: &str) -> ConsumerConfig {
        ConsumerConfig {
            kafka,
            group: group.to_owned(),
            buffer_bytes_max: 64 << 20,
            session_timeout_ms: 10_000,
            max_poll_interval_ms: 300_000,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        self.kafka.validate()?;
        let g = &self.group;
        if g.is_empty() || g.len() > 249 || g.chars().any(char::is_control) {
            return Err(format!(
                "archive group {g:?} must be 1-249 printable characters"
            ));
        }
        if !self
            .kafka
            .topic
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        {
            return Err(format!(
                "kafka_topic {:?}: the archive names files after the topic; use [a-z0-9._-]",
                self.kafka.topic
            ));
        }
        if !(1 << 20..=1 << 30).contains(&self.buffer_bytes_max) {
            return Err("the consumer buffer must be 1 MiB..=1 GiB".into());
        }
        Ok(())
    }
}

struct Ctx {
    revoked: Mutex<Vec<i32>>,
}

impl ClientContext for Ctx {}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let mut r = self.revoked.lock().unwrap_or_else(|e| e.into_inner());
            r.extend(tpl.elements().iter().map(|e| e.partition()));
            tracing::info!(partitions = ?tpl.elements().iter().map(|e| e.partition()).collect::<Vec<_>>(), "raw_clicks consumer: partitions revoked");
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                tracing::info!(partitions = ?tpl.elements().iter().map(|e| e.partition()).collect::<Vec<_>>(), "raw_clicks consumer: partitions assigned")
            }
            Rebalance::Error(e) => {
                tracing::error!(error = %e, "raw_clicks consumer: rebalance failed")
            }
            Rebalance::Revoke(_) => {}
        }
    }
}

/// The records of one partition read and not yet handed out.
#[derive(Default)]
struct Buf {
    bytes: Vec<u8>,
    /// (offset, end in `bytes`)
    recs: Vec<(i64, usize)>,
    /// Next record of `recs` to hand out.
    next: usize,
    /// Where the next record handed out must be; records before it (fetched before a
    /// seek) are dropped.
    want: Option<i64>,
}

impl Buf {
    fn clear(&mut self) {
        self.bytes.clear();
        self.recs.clear();
        self.next = 0;
    }
    fn buffered(&self) -> usize {
        self.bytes.len()
    }
}

/// A member of the archivers' consumer group on `raw_clicks`.
pub struct PartitionConsumer {
    cfg: ConsumerConfig,
    consumer: BaseConsumer<Ctx>,
    bufs: BTreeMap<i32, Buf>,
    buffered: usize,
    revoked: Vec<i32>,
}

impl PartitionConsumer {
    /// Joins the group and subscribes (the first assignment arrives with later polls).
    pub fn subscribe(cfg: ConsumerConfig) -> anyhow::Result<PartitionConsumer> {
        cfg.validate().map_err(anyhow::Error::msg)?;
        crate::topic::ensure_topic(&cfg.kafka)?;
        let consumer: BaseConsumer<Ctx> = cfg
            .kafka
            .client_config()
            .set("group.id", &cfg.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", cfg.session_timeout_ms.to_string())
            .set("max.poll.interval.ms", cfg.max_poll_interval_ms.to_string())
            .set(
                "queued.max.messages.kbytes",
                (cfg.buffer_bytes_max / 1024)
                    .clamp(1024, 2_097_151)
                    .to_string(),
            )
            .create_with_context(Ctx {
                revoked: Mutex::new(Vec::new()),
            })
            .with_context(|| format!("creating a consumer of group {:?}", cfg.group))?;
        consumer
            .subscribe(&[&cfg.kafka.topic])
            .with_context(|| format!("subscribing to {:?}", cfg.kafka.topic))?;
        Ok(PartitionConsumer {
            cfg,
            consumer,
            bufs: BTreeMap::new(),
            buffered: 0,
            revoked: Vec::new(),
        })
    }

    pub fn topic(&self) -> &str {
        &self.cfg.kafka.topic
    }

    /// The stream name of partition `p`: `<topic>-p<p>`.
    pub fn stream_name(&self, p: i32) -> String {
        format!("{}-p{p}", self.cfg.kafka.topic)
    }

    /// The partition of a stream name of this topic.
    pub fn partition_of(&self, stream: &str) -> anyhow::Result<i32> {
        stream
            .strip_prefix(self.cfg.kafka.topic.as_str())
            .and_then(|s| s.strip_prefix("-p"))
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| {
                anyhow!(
                    "{stream:?} is not a partition stream of {:?}",
                    self.cfg.kafka.topic
                )
            })
    }

    /// Polls for records and group events until nothing more is ready now (or the
    /// buffers are full), waiting at most `wait` for the first.
    pub fn fill(&mut self, wait: Duration) -> anyhow::Result<()> {
        let mut timeout = wait;
        while self.buffered < self.cfg.buffer_bytes_max {
            let Some(m) = self.consumer.poll(timeout) else {
                break;
            };
            timeout = Duration::ZERO;
            match m {
                Ok(m) => {
                    let (p, o) = (m.partition(), m.offset());
                    let b = self.bufs.entry(p).or_default();
                    if b.want.is_none_or(|w| o >= w) {
                        b.want = None;
                        let v = m.payload().unwrap_or_default();
                        b.bytes.extend_from_slice(v);
                        b.recs.push((o, b.bytes.len()));
                        self.buffered += v.len();
                    }
                }
                // Transient broker errors are reported here and retried by librdkafka.
                Err(e) => tracing::warn!(error = %e, "raw_clicks consumer: poll error"),
            }
            // After the message: a revocation seen by this poll drops its buffer too.
            self.take_revocations();
        }
        self.take_revocations();
        Ok(())
    }

    fn take_revocations(&mut self) {
        let r: Vec<i32> = std::mem::take(
            &mut *self
                .consumer
                .context()
                .revoked
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        if r.is_empty() {
            return;
        }
        for p in r {
            self.bufs.remove(&p);
            self.revoked.push(p);
        }
        self.buffered = self.bufs.values().map(Buf::buffered).sum();
    }

    /// Partitions revoked since the last call.
    pub fn take_revoked(&mut self) -> Vec<i32> {
        std::mem::take(&mut self.revoked)
    }

    /// The partitions assigned to this member now, ascending.
    pub fn assigned(&mut self) -> anyhow::Result<Vec<i32>> {
        self.fill(Duration::ZERO)?;
        let tpl = self
            .consumer
            .assignment()
            .context("reading the assignment")?;
        let set: BTreeSet<i32> = tpl
            .elements_for_topic(&self.cfg.kafka.topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        Ok(set.into_iter().collect())
    }

    /// The group's committed offset of `p` (none yet: the partition's low watermark).
    pub fn committed(&mut self, p: i32) -> anyhow::Result<i64> {
        let topic = &self.cfg.kafka.topic;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, p);
        let t = self.cfg.kafka.start_timeout();
        let got = self
            .consumer
            .committed_offsets(tpl, t)
            .with_context(|| format!("reading the committed offset of {topic} partition {p}"))?;
        let off = got
            .find_partition(topic, p)
            .map(|e| e.offset())
            .unwrap_or(Offset::Invalid);
        match off {
            Offset::Offset(o) if o >= 0 => Ok(o),
            _ => {
                let (low, _) = self
                    .consumer
                    .fetch_watermarks(topic, p, t)
                    .with_context(|| format!("reading the offsets of {topic} partition {p}"))?;
                Ok(low.max(0))
            }
        }
    }

    /// Positions `p` at `offset`: buffered records are dropped, and records fetched
    /// before the seek that arrive later are skipped.
    pub fn seek(&mut self, p: i32, offset: i64) -> anyhow::Result<()> {
        let b = self.bufs.entry(p).or_default();
        self.buffered -= b.buffered();
        b.clear();
        b.want = Some(offset);
        let t = self.cfg.kafka.start_timeout();
        let topic = self.cfg.kafka.topic.clone();
        // Right after an assignment the partition may not be fetching yet: retry briefly.
        let mut last = None;
        for _ in 0..20 {
            match self.consumer.seek(&topic, p, Offset::Offset(offset), t) {
                Ok(()) => return Ok(()),
                Err(e) => last = Some(e),
            }
            self.fill(Duration::from_millis(50))?;
        }
        bail!(
            "seeking {topic} partition {p} to {offset}: {}",
            last.map(|e| e.to_string()).unwrap_or_default()
        )
    }

    /// Whether a record of `p` is buffered.
    pub fn has_next(&self, p: i32) -> bool {
        self.bufs.get(&p).is_some_and(|b| b.next < b.recs.len())
    }

    /// The next buffered record of `p`: (offset, value); `None` when none is buffered
    /// (call [`PartitionConsumer::fill`]).
    pub fn next(&mut self, p: i32) -> Option<(i64, &[u8])> {
        let b = self.bufs.get_mut(&p)?;
        if b.next >= b.recs.len() {
            if !b.recs.is_empty() {
                self.buffered -= b.buffered();
                b.clear();
            }
            return None;
        }
        let start = if b.next == 0 { 0 } else { b.recs[b.next - 1].1 };
        let (o, end) = b.recs[b.next];
        b.next += 1;
        Some((o, &b.bytes[start..end]))
    }

    /// Commits `offset` (the next to read) of `p` for the group, synchronously.
    pub fn commit(&mut self, p: i32, offset: i64) -> anyhow::Result<()> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.cfg.kafka.topic, p, Offset::Offset(offset))?;
        self.consumer
            .commit(&tpl, CommitMode::Sync)
            .with_context(|| {
                format!(
                    "committing offset {offset} of {} partition {p} for group {:?}",
                    self.cfg.kafka.topic, self.cfg.group
                )
            })
    }

    /// Leaves the group (its partitions go to the other members at once).
    pub fn close(self) {
        self.consumer.unsubscribe();
        let _ = self.consumer.poll(Duration::from_millis(100));
    }
}
