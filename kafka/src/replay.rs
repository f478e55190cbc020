//! Replay (Kappa): raw records back through the stream's aggregation code into the store.
//!
//! Reads `raw_clicks` through a consumer group (offsets committed after the store made
//! the counts durable), or the local log when no broker is configured, keeps the records
//! in the range, removes duplicates exactly by `event_id` (the earliest copy wins, as in
//! billing: the smallest receive time, then stream name as bytes, then position; a first
//! pass finds each id's earliest copy, a second pass over exactly the same records
//! counts those copies, so the read order of partitions or cores never matters), counts with `core::agg::Aggregator` exactly as a dataplane core does (the
//! record's fraud decision counts as it did live), and sends the deltas to the
//! controlplane over its control socket as frames of a replay instance of their own.
//! Replaying a range that the store already counted counts it again: replay into a
//! fresh store, or over a range the store lost.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use clickgate_core::agg::{AggConfig, Aggregator};
use clickgate_core::EventId;
use clickgate_proto::frames::{access_ack, encode_delta, frame_len, frames_from_delta};
use clickgate_proto::record::RawRecord;
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
    /// Distinct event ids remembered for exact dedup, at most (memory: ~48 B each).
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

/// Where a copy of an event sits: `(recv_ms, stream rank, position)` packed so that
/// integer order is billing's order (`recv_ts`, then the stream's name as bytes, then
/// the LSN or offset): the smallest is the earliest copy, whatever order the source is
/// read in.
fn copy_key(recv_ms: u64, rank: u16, pos: u64) -> anyhow::Result<u128> {
    if pos >= 1 << 48 {
        bail!("position {pos} is past 2^48");
    }
    Ok(u128::from(recv_ms) << 64 | u128::from(rank) << 48 | u128::from(pos))
}

/// Ranks of the stream names (`core-<k>`, `<topic>-p<p>`) in byte order, as billing
/// ranks an archive's `source` column.
fn ranks(names: &[String]) -> anyhow::Result<Vec<u16>> {
    if names.len() > usize::from(u16::MAX) {
        bail!("more than {} streams", u16::MAX);
    }
    let mut order: Vec<usize> = (0..names.len()).collect();
    order.sort_by(|&a, &b| names[a].as_bytes().cmp(names[b].as_bytes()));
    let mut rank = vec![0u16; names.len()];
    for (r, i) in order.into_iter().enumerate() {
        rank[i] = r as u16;
    }
    Ok(rank)
}

/// Pass 1: the earliest copy of every event id in the range (≈ 48 B per id).
struct Winners {
    best: HashMap<EventId, u128>,
    max: usize,
}

impl Winners {
    fn note(&mut self, id: EventId, key: u128) -> anyhow::Result<()> {
        let full = self.max <= self.best.len();
        match self.best.entry(id) {
            Entry::Occupied(mut e) => {
                if key < *e.get() {
                    e.insert(key);
                }
            }
            Entry::Vacant(e) => {
                if full {
                    bail!(
                        "more than {} distinct events in the range (--dedup-events-max)",
                        self.max
                    );
                }
                e.insert(key);
            }
        }
        Ok(())
    }

    fn wins(&self, id: &EventId, key: u128) -> bool {
        self.best.get(id) == Some(&key)
    }
}

/// Pass 2: counts the winners with the stream's aggregation code.
struct Counter {
    winners: Winners,
    counted: u64,
    agg: Aggregator,
    summary: ReplaySummary,
}

impl Counter {
    fn add(&mut self, rec: &RawRecord<'_>, key: u128, sink: &mut Sink) -> anyhow::Result<()> {
        self.summary.records += 1;
        if !self.winners.wins(&rec.click.event_id, key) {
            self.summary.duplicates += 1;
            return Ok(());
        }
        self.counted += 1;
        let fraud = rec.flags.fraud();
        self.agg.add(&rec.click, !fraud, fraud);
        if self.agg.len() * 10 >= self.agg.config().keys_max * 9 {
            sink.send(&mut self.agg)?;
        }
        Ok(())
    }
}

fn decode(bytes: &[u8]) -> anyhow::Result<RawRecord<'_>> {
    clickgate_proto::raw_pb::decode_value(bytes).map_err(|e| anyhow!("record does not decode: {e}"))
}

/// One pass over the range: every record in it, with its copy key. The first pass
/// notes where each stream ended; the second reads exactly that far.
trait Source {
    fn pass(
        &mut self,
        first: bool,
        each: &mut dyn FnMut(&RawRecord<'_>, u128) -> anyhow::Result<()>,
    ) -> anyhow::Result<()>;
}

/// Two passes, so that the earliest copy of an event wins however the source
/// interleaves its streams (a retry can be read before the copy it repeats: Kafka hands
/// out partitions in any order, and each core's log is read whole in turn).
pub fn run(cfg: &ReplayConfig) -> anyhow::Result<ReplaySummary> {
    let mut sink = Sink::connect(&cfg.control_socket)?;
    match &cfg.kafka {
        Some(k) => {
            let mut src = KafkaSource::open(cfg, k)?;
            let summary = count(cfg, &mut src, &mut sink)?;
            src.commit()?;
            Ok(summary)
        }
        None => count(cfg, &mut LogSource::open(cfg)?, &mut sink),
    }
}

fn count(
    cfg: &ReplayConfig,
    src: &mut dyn Source,
    sink: &mut Sink,
) -> anyhow::Result<ReplaySummary> {
    let winners = find_winners(cfg.dedup_events_max, src)?;
    let mut c = Counter {
        winners,
        counted: 0,
        agg: Aggregator::new(AggConfig {
            keys_max: cfg.keys_max,
            ..AggConfig::default()
        }),
        summary: ReplaySummary::default(),
    };
    src.pass(false, &mut |rec, key| c.add(rec, key, sink))?;
    let events = c.winners.best.len() as u64;
    if c.counted != events {
        bail!(
            "{} of {events} events were not there on the second read of the range \
             (did retention delete records while the replay ran?); the counts sent so far \
             stay in the store and the group's offsets were not committed",
            events - c.counted
        );
    }
    sink.send(&mut c.agg)?;
    c.summary.frames = sink.frames;
    Ok(c.summary)
}

/// Pass 1 over `src`.
fn find_winners(max: usize, src: &mut dyn Source) -> anyhow::Result<Winners> {
    let mut winners = Winners {
        best: HashMap::new(),
        max,
    };
    src.pass(true, &mut |rec, key| winners.note(rec.click.event_id, key))?;
    Ok(winners)
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

/// The local log of every core under `data_dir` (streams `core-<k>`).
struct LogSource {
    from: Position,
    to: Option<Position>,
    cores: Vec<(usize, PathBuf)>,
    ranks: Vec<u16>,
    /// Per core, the LSN after the last record of the first pass.
    stops: Vec<Option<u64>>,
}

impl LogSource {
    fn open(cfg: &ReplayConfig) -> anyhow::Result<LogSource> {
        let cores = segment::core_dirs(&cfg.data_dir.join("log"))?;
        let names: Vec<String> = cores.iter().map(|(k, _)| format!("core-{k}")).collect();
        Ok(LogSource {
            from: cfg.from,
            to: cfg.to,
            ranks: ranks(&names)?,
            stops: vec![None; cores.len()],
            cores,
        })
    }
}

impl Source for LogSource {
    fn pass(
        &mut self,
        first: bool,
        each: &mut dyn FnMut(&RawRecord<'_>, u128) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let stops = &mut self.stops;
        for (i, (core, dir)) in self.cores.iter().enumerate() {
            let start = match self.from {
                Position::Offset(lsn) => lsn as u64,
                Position::TimeMs(_) => 0,
            };
            let mut r = LogReader::open(dir, start)
                .with_context(|| format!("core {core}: opening {}", dir.display()))?;
            while let Some((lsn, bytes)) = r.next()? {
                if matches!(self.to, Some(Position::Offset(end)) if lsn as i64 >= end) {
                    break;
                }
                // The second pass ends where the first did (the log keeps growing).
                if !first && stops[i].is_none_or(|end| lsn >= end) {
                    break;
                }
                if first {
                    stops[i] = Some(lsn + 1);
                }
                let rec = decode(bytes);
                let recv = rec.as_ref().map(|r| r.recv_ms).unwrap_or(0);
                let (after, before) = in_time(self.from, self.to, recv as i64);
                if after && before {
                    copy_key(recv, self.ranks[i], lsn)
                        .and_then(|key| each(&rec?, key))
                        .with_context(|| format!("core {core} lsn {lsn}"))?;
                }
            }
        }
        Ok(())
    }
}

/// `raw_clicks` (streams `<topic>-p<p>`), read through the replay's consumer group.
struct KafkaSource {
    consumer: BaseConsumer,
    topic: String,
    brokers: String,
    timeout: Duration,
    timeout_ms: u64,
    from: Position,
    to: Option<Position>,
    /// Partition → (start, end as the replay starts).
    range: std::collections::BTreeMap<i32, (i64, i64)>,
    ranks: Vec<u16>,
    /// Partition → the offset after the last record read (what is committed).
    done: HashMap<i32, i64>,
}

impl KafkaSource {
    fn open(cfg: &ReplayConfig, k: &KafkaConfig) -> anyhow::Result<KafkaSource> {
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
        let mut range = std::collections::BTreeMap::new();
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
                range.insert(p, (start, end));
            }
        }
        let names: Vec<String> = (0..parts).map(|p| format!("{}-p{p}", k.topic)).collect();
        Ok(KafkaSource {
            consumer,
            topic: k.topic.clone(),
            brokers: k.brokers.clone(),
            timeout,
            timeout_ms: k.start_timeout_ms,
            from: cfg.from,
            to: cfg.to,
            range,
            ranks: ranks(&names)?,
            done: HashMap::new(),
        })
    }

    /// Commits what was read: only once the store acknowledged the counts.
    fn commit(&self) -> anyhow::Result<()> {
        if self.done.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for (&p, &o) in &self.done {
            tpl.add_partition_offset(&self.topic, p, Offset::Offset(o))?;
        }
        self.consumer.commit(&tpl, CommitMode::Sync)?;
        Ok(())
    }
}

impl Source for KafkaSource {
    fn pass(
        &mut self,
        first: bool,
        each: &mut dyn FnMut(&RawRecord<'_>, u128) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        // Pass 1 ends where the range does; without `--to` the end is soft: tansu's
        // high watermark can lag what a fetch returns, so it reads on until a poll
        // comes back empty. Pass 2 ends exactly where pass 1 did.
        let mut ends: HashMap<i32, i64> = if first {
            self.range.iter().map(|(&p, &(_, e))| (p, e)).collect()
        } else {
            self.done.clone()
        };
        let hard_end = !first || matches!(self.to, Some(Position::Offset(_)));
        let mut tpl = TopicPartitionList::new();
        for (&p, &(start, _)) in &self.range {
            if ends.get(&p).is_some_and(|&e| start < e) {
                tpl.add_partition_offset(&self.topic, p, Offset::Offset(start))?;
            } else {
                ends.remove(&p);
            }
        }
        if ends.is_empty() {
            return Ok(());
        }
        self.consumer.assign(&tpl)?;
        let mut open: HashSet<i32> = ends.keys().copied().collect();
        let mut idle_since = Instant::now();
        loop {
            if !first && open.is_empty() {
                break;
            }
            let Some(m) = self.consumer.poll(Duration::from_millis(300)) else {
                if open.is_empty() {
                    break;
                }
                if idle_since.elapsed() > self.timeout {
                    bail!(
                        "no records from {:?} on {} for {} ms before the end of the range",
                        self.topic,
                        self.brokers,
                        self.timeout_ms
                    );
                }
                continue;
            };
            idle_since = Instant::now();
            let m = m.map_err(|e| anyhow!("reading {:?}: {e}", self.topic))?;
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
            let (after, before) = in_time(self.from, self.to, recv);
            if after && before {
                let rank = self.ranks.get(p as usize).copied().unwrap_or(u16::MAX);
                copy_key(recv.max(0) as u64, rank, o.max(0) as u64)
                    .and_then(|key| each(&decode(bytes)?, key))
                    .with_context(|| format!("partition {p} offset {o}"))?;
            }
            if first {
                self.done.insert(p, o + 1);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records handed out in a fixed order, as a source that interleaves its streams
    /// would: (record bytes, recv_ms, stream rank, position).
    struct Fixed(Vec<(Vec<u8>, u64, u16, u64)>);

    impl Source for Fixed {
        fn pass(
            &mut self,
            _first: bool,
            each: &mut dyn FnMut(&RawRecord<'_>, u128) -> anyhow::Result<()>,
        ) -> anyhow::Result<()> {
            for (bytes, recv, rank, pos) in &self.0 {
                each(&decode(bytes)?, copy_key(*recv, *rank, *pos)?)?;
            }
            Ok(())
        }
    }

    fn rec(id: u8, campaign: u64, recv_ms: u64) -> Vec<u8> {
        let c = clickgate_core::event::Click {
            event_id: EventId([id; 16]),
            ts_ms: recv_ms,
            campaign_id: campaign,
            ad_id: 1,
            publisher_id: 1,
            advertiser_id: 1,
            user_id: "u".into(),
            ip: std::net::IpAddr::from([203, 0, 113, 7]),
            user_agent: "".into(),
            country: *b"US",
            device: clickgate_core::event::Device::Mobile,
            cost_micros: 1,
        };
        let mut out = Vec::new();
        clickgate_proto::record::encode(&c, Default::default(), recv_ms, &[], &mut out).unwrap();
        out
    }

    /// A retry read before the copy it repeats still loses to it: the earliest copy
    /// wins (receive time, then the stream's name as bytes, then the position), as in
    /// billing, whatever the read order.
    #[test]
    fn the_earliest_copy_wins_whatever_the_read_order() {
        let names: Vec<String> = ["core-2", "core-10", "core-0"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let r = ranks(&names).unwrap();
        assert_eq!(r, vec![2, 1, 0], "byte order: core-0 < core-10 < core-2");
        let mut src = Fixed(vec![
            // The retry (campaign 3, received later) comes first in read order.
            (rec(1, 3, 2_000), 2_000, r[0], 7),
            (rec(2, 3, 2_000), 2_000, r[0], 8),
            (rec(1, 2, 1_000), 1_000, r[1], 900),
            // Event 2's copies share a receive time: core-10 sorts before core-2.
            (rec(2, 4, 2_000), 2_000, r[1], 901),
            // Same stream and time: the smaller position wins.
            (rec(3, 5, 3_000), 3_000, r[2], 41),
            (rec(3, 6, 3_000), 3_000, r[2], 40),
        ]);
        let w = find_winners(10, &mut src).unwrap();
        assert_eq!(w.best.len(), 3);
        assert!(w.wins(&EventId([1; 16]), copy_key(1_000, r[1], 900).unwrap()));
        assert!(!w.wins(&EventId([1; 16]), copy_key(2_000, r[0], 7).unwrap()));
        assert!(w.wins(&EventId([2; 16]), copy_key(2_000, r[1], 901).unwrap()));
        assert!(!w.wins(&EventId([2; 16]), copy_key(2_000, r[0], 8).unwrap()));
        assert!(w.wins(&EventId([3; 16]), copy_key(3_000, r[2], 40).unwrap()));
        let err = find_winners(2, &mut src).err().unwrap();
        assert!(err.to_string().contains("--dedup-events-max"), "{err}");
        assert!(copy_key(1, 0, 1 << 48).is_err());
    }

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
