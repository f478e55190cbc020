//! Replay (Kappa): raw records back through the stream's aggregation code into the store.
//!
//! Reads `raw_clicks` through a consumer group (offsets committed after the store made
//! the counts durable), or the local log when no broker is configured, keeps the records
//! in the range, removes duplicates exactly by `event_id` (the earliest copy wins, as in
//! billing), counts with `core::agg::Aggregator` exactly as a dataplane core does (the
//! record's fraud decision counts as it did live), and sends the deltas to the
//! controlplane over its control socket as frames of a replay instance of their own.
//! Replaying a range that the store already counted counts it again: replay into a
//! fresh store, or over a range the store lost.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use clickgate_core::agg::{AggConfig, Aggregator};
use clickgate_core::EventId;
use clickgate_proto::frames::{access_ack, encode_delta, frame_len, frames_from_delta};
use clickgate_proto::record;
use clickgate_proto::segment::{self, LogReader};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::KafkaConfig;

/// A position in the source: a Kafka offset (the local log: an LSN) or a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Position {
    Offset(i64),
    /// ms since the Unix epoch (the record's receive time).
    TimeMs(i64),
}

/// Integers below this are offsets; at or above, ms since the epoch (2001-09-09 on).
const TIME_MS_MIN: i64 = 1_000_000_000_000;

impl std::str::FromStr for Position {
    type Err = String;
    /// `123` (offset), `1764201600123` (ms), or RFC 3339 `2026-11-28T03:00:00Z`.
    fn from_str(s: &str) -> Result<Position, String> {
        if let Ok(n) = s.parse::<i64>() {
            return match n {
                n if n < 0 => Err(format!("{s:?}: an offset or time cannot be negative")),
                n if n >= TIME_MS_MIN => Ok(Position::TimeMs(n)),
                n => Ok(Position::Offset(n)),
            };
        }
        clickgate_core::civil::parse_rfc3339_ms(s)
            .and_then(|ms| i64::try_from(ms).ok())
            .map(Position::TimeMs)
            .ok_or_else(|| format!("{s:?} is neither an offset, ms since the epoch, nor an RFC 3339 time (2026-11-28T03:00:00Z)"))
    }
}

#[derive(Clone, Debug)]
pub struct ReplayConfig {
    pub from: Position,
    /// Exclusive; `None`: up to the end as it is when the replay starts.
    pub to: Option<Position>,
    /// Consumer group id (Kafka source).
    pub group: String,
    /// `Some`: read the topic; `None`: read the local log under `data_dir`.
    pub kafka: Option<KafkaConfig>,
    pub data_dir: PathBuf,
    /// The controlplane's Unix socket.
    pub control_socket: PathBuf,
    /// Distinct event ids remembered for exact dedup, at most (memory: ~16 B each).
    pub dedup_events_max: usize,
    /// Aggregate keys held between two deltas sent, at most.
    pub keys_max: usize,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReplaySummary {
    pub records: u64,
    pub duplicates: u64,
    pub frames: u64,
}

/// Sends deltas to the controlplane and waits for each ack (the store made it durable).
struct Sink {
    sock: UnixStream,
    box_id: u64,
    instance_id: u64,
    next_delta_id: u64,
    frames: u64,
}

impl Sink {
    fn connect(path: &Path) -> anyhow::Result<Sink> {
        let sock = UnixStream::connect(path).with_context(|| {
            format!(
                "connecting to the controlplane at {} (is it running?)",
                path.display()
            )
        })?;
        sock.set_read_timeout(Some(Duration::from_secs(60)))?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        Ok(Sink {
            sock,
            // A box id of its own, so replay deltas never collide with a dataplane's marks.
            box_id: 0x5245_504c_4159_0000 ^ (std::process::id() as u64),
            instance_id: nanos,
            next_delta_id: 1,
            frames: 0,
        })
    }

    fn send(&mut self, agg: &mut Aggregator) -> anyhow::Result<()> {
        if agg.is_empty() {
            return Ok(());
        }
        let delta = agg.drain_delta();
        let frames =
            frames_from_delta(self.box_id, self.instance_id, 0, self.next_delta_id, &delta);
        let mut wire = Vec::new();
        for f in &frames {
            wire.clear();
            encode_delta(f, &mut wire)?;
            self.sock.write_all(&wire)?;
            let mut prefix = [0u8; 4];
            self.sock
                .read_exact(&mut prefix)
                .context("waiting for the controlplane's ack")?;
            let mut body = vec![0u8; frame_len(prefix, 1 << 20)?];
            self.sock.read_exact(&mut body)?;
            let ack = access_ack(&body)?;
            if ack.delta_id != f.delta_id {
                bail!(
                    "controlplane acked delta {} for {}",
                    ack.delta_id,
                    f.delta_id
                );
            }
            self.frames += 1;
        }
        self.next_delta_id += frames.len() as u64;
        agg.recycle(delta);
        Ok(())
    }
}

/// Counts one record; `false` when it is outside the range.
struct Counter {
    seen: HashSet<EventId>,
    dedup_max: usize,
    agg: Aggregator,
    summary: ReplaySummary,
}

impl Counter {
    fn add(&mut self, bytes: &[u8], sink: &mut Sink) -> anyhow::Result<()> {
        let rec = clickgate_proto::raw_pb::decode_value(bytes)
            .map_err(|e| anyhow!("record does not decode: {e}"))?;
        self.summary.records += 1;
        if !self.seen.insert(rec.click.event_id) {
            self.summary.duplicates += 1;
            return Ok(());
        }
        if self.seen.len() > self.dedup_max {
            bail!(
                "more than {} distinct events in the range (--dedup-events-max)",
                self.dedup_max
            );
        }
        let fraud = rec.flags.fraud();
        self.agg.add(&rec.click, !fraud, fraud);
        if self.agg.len() * 10 >= self.agg.config().keys_max * 9 {
            sink.send(&mut self.agg)?;
        }
        Ok(())
    }
}

pub fn run(cfg: &ReplayConfig) -> anyhow::Result<ReplaySummary> {
    let mut sink = Sink::connect(&cfg.control_socket)?;
    let mut c = Counter {
        seen: HashSet::new(),
        dedup_max: cfg.dedup_events_max,
        agg: Aggregator::new(AggConfig {
            keys_max: cfg.keys_max,
            ..AggConfig::default()
        }),
        summary: ReplaySummary::default(),
    };
    match &cfg.kafka {
        Some(k) => from_kafka(cfg, k, &mut c, &mut sink)?,
        None => from_log(cfg, &mut c, &mut sink)?,
    }
    sink.send(&mut c.agg)?;
    c.summary.frames = sink.frames;
    Ok(c.summary)
}

fn in_time(pos: Position, to: Option<Position>, recv_ms: i64) -> (bool, bool) {
    let after_from = match pos {
        Position::TimeMs(t) => recv_ms >= t,
        Position::Offset(_) => true,
    };
    let before_to = match to {
        Some(Position::TimeMs(t)) => recv_ms < t,
        _ => true,
    };
    (after_from, before_to)
}

fn from_log(cfg: &ReplayConfig, c: &mut Counter, sink: &mut Sink) -> anyhow::Result<()> {
    let root = cfg.data_dir.join("log");
    for (core, dir) in segment::core_dirs(&root)? {
        let start = match cfg.from {
            Position::Offset(lsn) => lsn as u64,
            Position::TimeMs(_) => 0,
        };
        let mut r = LogReader::open(&dir, start)
            .with_context(|| format!("core {core}: opening {}", dir.display()))?;
        while let Some((lsn, bytes)) = r.next()? {
            if matches!(cfg.to, Some(Position::Offset(end)) if lsn as i64 >= end) {
                break;
            }
            let recv = record::decode(bytes).map(|r| r.recv_ms as i64).unwrap_or(0);
            let (after, before) = in_time(cfg.from, cfg.to, recv);
            if after && before {
                c.add(bytes, sink)
                    .with_context(|| format!("core {core} lsn {lsn}"))?;
            }
        }
    }
    Ok(())
}

fn from_kafka(
    cfg: &ReplayConfig,
    k: &KafkaConfig,
    c: &mut Counter,
    sink: &mut Sink,
) -> anyhow::Result<()> {
    let timeout = k.start_timeout();
    let consumer: BaseConsumer = k
        .client_config()
        .set("group.id", &cfg.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .create()?;
    let md = consumer
        .fetch_metadata(Some(&k.topic), timeout)
        .map_err(|e| anyhow!("topic {:?} on {}: {e}", k.topic, k.brokers))?;
    let parts = md
        .topics()
        .iter()
        .find(|t| t.name() == k.topic && t.error().is_none())
        .map(|t| t.partitions().len() as i32)
        .filter(|&n| n > 0)
        .ok_or_else(|| anyhow!("topic {:?} does not exist on {}", k.topic, k.brokers))?;
    let mut tpl = TopicPartitionList::new();
    let mut ends = std::collections::HashMap::new();
    for p in 0..parts {
        let (low, high) = consumer.fetch_watermarks(&k.topic, p, timeout)?;
        let start = match cfg.from {
            Position::Offset(o) => o.max(low),
            Position::TimeMs(_) => low,
        };
        let end = match cfg.to {
            Some(Position::Offset(o)) => o.min(high),
            _ => high,
        };
        if start < end {
            tpl.add_partition_offset(&k.topic, p, Offset::Offset(start))?;
            ends.insert(p, end);
        }
    }
    if ends.is_empty() {
        return Ok(());
    }
    consumer.assign(&tpl)?;
    let mut open: HashSet<i32> = ends.keys().copied().collect();
    let mut idle_since = Instant::now();
    let mut done = std::collections::HashMap::new();
    // Without `--to` the end is soft: tansu's high watermark can lag what a fetch
    // returns, so read on until a poll comes back empty.
    let hard_end = matches!(cfg.to, Some(Position::Offset(_)));
    loop {
        let Some(m) = consumer.poll(Duration::from_millis(300)) else {
            if open.is_empty() {
                break;
            }
            if idle_since.elapsed() > timeout {
                bail!(
                    "no records from {:?} on {} for {} ms before the end of the range",
                    k.topic,
                    k.brokers,
                    k.start_timeout_ms
                );
            }
            continue;
        };
        idle_since = Instant::now();
        let m = m.map_err(|e| anyhow!("reading {:?}: {e}", k.topic))?;
        let (p, o) = (m.partition(), m.offset());
        let Some(&end) = ends.get(&p) else { continue };
        if o >= end && hard_end {
            open.remove(&p);
            continue;
        }
        if o + 1 >= end {
            open.remove(&p);
        }
        let bytes = m.payload().unwrap_or_default();
        let recv = m.timestamp().to_millis().unwrap_or(0);
        let (after, before) = in_time(cfg.from, cfg.to, recv);
        if after && before {
            c.add(bytes, sink)
                .with_context(|| format!("partition {p} offset {o}"))?;
        }
        done.insert(p, o + 1);
    }
    sink.send(&mut c.agg)?;
    // Committed only once the store acknowledged the counts.
    if !done.is_empty() {
        let mut tpl = TopicPartitionList::new();
        for (p, o) in done {
            tpl.add_partition_offset(&k.topic, p, Offset::Offset(o))?;
        }
        consumer.commit(&tpl, CommitMode::Sync)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_parse() {
        assert_eq!("42".parse(), Ok(Position::Offset(42)));
        assert_eq!(
            "1764201600123".parse(),
            Ok(Position::TimeMs(1_764_201_600_123))
        );
        assert_eq!(
            "2025-11-27T00:00:00Z".parse(),
            Ok(Position::TimeMs(1_764_201_600_000))
        );
        assert_eq!(
            "2025-11-27T01:00:00.5+01:00".parse(),
            Ok(Position::TimeMs(1_764_201_600_500))
        );
        assert!("-1".parse::<Position>().is_err());
        assert!("yesterday"
            .parse::<Position>()
            .unwrap_err()
            .contains("RFC 3339"));
    }
}
