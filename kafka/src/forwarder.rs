//! One forwarder thread per dataplane core: local log → `raw_clicks`.
//!
//! Each thread owns an rdkafka `BaseProducer` (acks=all, idempotent, LZ4, murmur2
//! partitioner; [`crate::topic::producer_config`]) and a `LogReader` on its core's log.
//! It keeps at most `inflight_records_max` records produced and not yet acknowledged, in
//! LSN order; the acknowledged prefix is published to the dataplane
//! (`SinkStatus::set_acked_lsn`, for `ack = kafka`) and written as the `kafka` cursor
//! (so the log keeps everything after it). Key: the campaign id as decimal text; value:
//! the record as Protocol Buffers (`clickgate.raw.v1.RawClick`, `proto::raw_pb`; a log
//! record that does not decode goes as its bytes, which `raw_pb::decode_value` tells
//! apart); timestamp: the receive time; headers: box id, core, LSN.
//!
//! Exactly once across a crash: records between the cursor and what the broker has were
//! produced but their cursor was not written. With the cursor, the forwarder writes per
//! partition the offset from which its records after the cursor can be found (the
//! partition's end when the run started, then past each acknowledged record of the
//! prefix). A restarted forwarder reads each partition from there to its end, collects
//! the LSNs carrying its own (box, core) headers, and skips them. Idempotence covers
//! the retries within a run.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use clickgate_proto::cursor;
use clickgate_proto::segment::{self, LogReader, FRAME_HEADER_BYTES};
use clickgate_proto::sink::{SinkState, SinkStatus};
use clickgate_proto::{raw_pb, record};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};

use crate::topic::{producer_config, remaining};
use crate::{KafkaConfig, CURSOR_CONSUMER, HEADER_BOX, HEADER_CORE, HEADER_LSN};

/// The cursor is written at most this often (an fsync each time).
const CURSOR_INTERVAL: Duration = Duration::from_millis(100);
/// An idle forwarder waits this long for deliveries or new records.
const IDLE_POLL: Duration = Duration::from_millis(2);
/// While the broker is unreachable and nothing is in flight, it is probed this often.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// After a failed delivery, the forwarder waits this long before producing again.
const RETRY_BACKOFF: Duration = Duration::from_millis(200);

pub struct Forwarder {
    stop: Arc<AtomicBool>,
    threads: Vec<(usize, JoinHandle<()>)>,
}

impl Forwarder {
    /// Checks the topic, recovers each core's position, and starts one thread per core
    /// log found under `<data_dir>/log/` (start it after the dataplane opened its logs).
    /// `box_id`: the box's id (`clickgate_proto::box_id`, shared with the delta frames),
    /// carried in every record's `cg-box` header.
    pub fn start(
        cfg: KafkaConfig,
        data_dir: &Path,
        box_id: u64,
        status: Arc<SinkStatus>,
    ) -> anyhow::Result<Forwarder> {
        let partitions = crate::topic::ensure_topic(&cfg)?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (core, dir) in segment::core_dirs(&data_dir.join("log"))? {
            let from = cursor::read_cursor(data_dir, CURSOR_CONSUMER, core as u32)?.unwrap_or(0);
            let mut core_fwd =
                CoreForwarder::new(&cfg, data_dir, dir, core, box_id, from, status.clone())
                    .with_context(|| format!("kafka forwarder of core {core}"))?;
            core_fwd.recover(partitions)?;
            let stop = stop.clone();
            let t = thread::Builder::new()
                .name(format!("cg-kafka-{core}"))
                .spawn(move || core_fwd.run(&stop))?;
            threads.push((core, t));
        }
        tracing::info!(topic = %cfg.topic, partitions, cores = threads.len(), box_id = format_args!("{box_id:016x}"), "kafka: forwarding the local log");
        Ok(Forwarder { stop, threads })
    }

    /// Delivers what is in the logs (call after the dataplane stopped appending), writes
    /// the cursors and stops. Records not delivered by `timeout` stay in the log and go
    /// out at the next start.
    pub fn stop(self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        self.stop.store(true, Ordering::Release);
        for (core, t) in self.threads {
            while !t.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(5));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                tracing::warn!(core, "kafka forwarder did not finish delivering before the drain timeout; the rest stays in the local log");
            }
        }
    }
}

struct Delivery {
    lsn: u64,
    partition: i32,
    offset: i64,
    error: Option<KafkaError>,
}

/// The producer's context. Delivery reports land in a vector the forwarder swaps out
/// once per loop (one uncontended lock per report, no channel node, no allocation after
/// warm-up).
struct Ctx {
    deliveries: Mutex<Vec<Delivery>>,
    status: Arc<SinkStatus>,
    core: usize,
}

impl Ctx {
    fn new(status: Arc<SinkStatus>, core: usize) -> Ctx {
        Ctx {
            deliveries: Mutex::new(Vec::new()),
            status,
            core,
        }
    }
}

impl ClientContext for Ctx {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.status.set_state(SinkState::Unreachable);
        }
        tracing::warn!(core = self.core, error = %error, reason, "kafka client error");
    }
}

impl ProducerContext for Ctx {
    /// The record's LSN, carried as the opaque pointer value itself (no box per record).
    type DeliveryOpaque = usize;
    fn delivery(&self, r: &DeliveryResult<'_>, lsn: usize) {
        let lsn = lsn as u64;
        let d = match r {
            Ok(m) => Delivery {
                lsn,
                partition: m.partition(),
                offset: m.offset(),
                error: None,
            },
            Err((e, m)) => Delivery {
                lsn,
                partition: m.partition(),
                offset: -1,
                error: Some(e.clone()),
            },
        };
        self.deliveries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(d);
    }
}

struct Inflight {
    lsn: u64,
    end: u64,
    done: bool,
    failed: bool,
    /// (partition, offset) once delivered.
    at: Option<(i32, i64)>,
}

struct CoreForwarder {
    cfg: KafkaConfig,
    data_dir: PathBuf,
    dir: PathBuf,
    core: usize,
    box_id: u64,
    producer: BaseProducer<Ctx>,
    /// Delivery reports taken from the context, reused.
    reports: Vec<Delivery>,
    reader: LogReader,
    inflight: VecDeque<Inflight>,
    /// LSNs already in the topic (found by `recover`), skipped once.
    skip: HashSet<u64>,
    acked: u64,
    /// Per partition: where this core's records after `acked` can start.
    scan_from: HashMap<i32, i64>,
    status: Arc<SinkStatus>,
    /// The record's `raw_clicks` value (protobuf), reused for every record (the
    /// producer copies it on send).
    value: Vec<u8>,
}

impl CoreForwarder {
    #[allow(clippy::too_many_arguments)]
    fn new(
        cfg: &KafkaConfig,
        data_dir: &Path,
        dir: PathBuf,
        core: usize,
        box_id: u64,
        from: u64,
        status: Arc<SinkStatus>,
    ) -> anyhow::Result<CoreForwarder> {
        let ctx = Ctx::new(status.clone(), core);
        let producer: BaseProducer<Ctx> = producer_config(cfg).create_with_context(ctx)?;
        let reader = LogReader::open(&dir, from)
            .with_context(|| format!("opening {} at the kafka cursor {from}", dir.display()))?;
        status.set_acked_lsn(core, from);
        Ok(CoreForwarder {
            cfg: cfg.clone(),
            data_dir: data_dir.to_owned(),
            dir,
            core,
            box_id,
            producer,
            reports: Vec::new(),
            reader,
            inflight: VecDeque::new(),
            skip: HashSet::new(),
            acked: from,
            scan_from: HashMap::new(),
            status,
            value: Vec::with_capacity(512),
        })
    }

    fn offsets_path(&self) -> PathBuf {
        self.data_dir
            .join("kafka")
            .join(format!("core-{}.offsets", self.core))
    }

    /// Finds this core's records after the cursor that the broker already has (see the
    /// module doc), then records the partitions' ends as the next scan start.
    fn recover(&mut self, partitions: u32) -> anyhow::Result<()> {
        let deadline = Instant::now() + self.cfg.start_timeout();
        let consumer: BaseConsumer = self
            .cfg
            .client_config()
            .set("group.id", "clickgate-forwarder-recovery")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .create()?;
        let mut ends = HashMap::new();
        for p in 0..partitions as i32 {
            let (_, high) = consumer
                .fetch_watermarks(&self.cfg.topic, p, remaining(deadline))
                .map_err(|e| {
                    anyhow!(
                        "watermarks of {}/{p} on {}: {e}",
                        self.cfg.topic,
                        self.cfg.brokers
                    )
                })?;
            ends.insert(p, high);
        }
        let saved = match fs::read_to_string(self.offsets_path()) {
            Ok(s) => Some(
                parse_offsets(&s).with_context(|| format!("{}", self.offsets_path().display()))?,
            ),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e.into()),
        };
        let mut tpl = TopicPartitionList::new();
        if let Some(saved) = &saved {
            for (&p, &from) in saved {
                if ends.get(&p).is_some_and(|&end| end > from) {
                    tpl.add_partition_offset(&self.cfg.topic, p, Offset::Offset(from))?;
                }
            }
        }
        let mut found = 0u64;
        if tpl.count() > 0 {
            consumer.assign(&tpl)?;
            let mut open: HashSet<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            // tansu's high watermark can lag what a fetch returns: read on past it until
            // a poll comes back empty.
            loop {
                if Instant::now() >= deadline {
                    bail!("kafka forwarder of core {}: reading back {} on {} did not finish within {} ms", self.core, self.cfg.topic, self.cfg.brokers, self.cfg.start_timeout_ms);
                }
                let Some(m) = consumer.poll(Duration::from_millis(300)) else {
                    if open.is_empty() {
                        break;
                    }
                    // Gaps (no record at end-1): done when the position reached the end.
                    if let Ok(pos) = consumer.position() {
                        for e in pos.elements() {
                            if let Offset::Offset(o) = e.offset() {
                                if o >= ends[&e.partition()] {
                                    open.remove(&e.partition());
                                }
                            }
                        }
                    }
                    continue;
                };
                let m = m.map_err(|e| anyhow!("reading back {}: {e}", self.cfg.topic))?;
                if m.offset() + 1 >= ends.get(&m.partition()).copied().unwrap_or(0) {
                    open.remove(&m.partition());
                }
                if let Some(lsn) = own_lsn(&m, self.box_id, self.core) {
                    if lsn >= self.acked && self.skip.insert(lsn) {
                        found += 1;
                    }
                }
            }
        }
        if found > 0 {
            tracing::info!(
                core = self.core,
                found,
                from_lsn = self.acked,
                "kafka: records after the cursor already in the topic; not producing them again"
            );
        }
        self.scan_from = ends;
        clickgate_proto::fsutil::write_atomic(
            &self.offsets_path(),
            format_offsets(&self.scan_from).as_bytes(),
        )?;
        Ok(())
    }

    fn run(mut self, stop: &AtomicBool) {
        let mut last_cursor = Instant::now();
        let mut cursor_written = self.acked;
        let mut last_probe = Instant::now();
        let mut retry_at: Option<Instant> = None;
        loop {
            let stopping = stop.load(Ordering::Acquire);
            let mut produced = 0;
            if retry_at.is_none_or(|t| Instant::now() >= t) {
                retry_at = None;
                match self.produce_available() {
                    Ok(n) => produced = n,
                    Err(e) => {
                        tracing::error!(core = self.core, error = %e, "kafka forwarder: reading the local log failed; retrying");
                        retry_at = Some(Instant::now() + RETRY_BACKOFF);
                    }
                }
            }
            self.producer.poll(if produced > 0 {
                Duration::ZERO
            } else {
                IDLE_POLL
            });
            if self.take_deliveries() {
                retry_at = Some(Instant::now() + RETRY_BACKOFF);
            }
            let at_end = produced == 0 && self.inflight.is_empty();
            if self.acked != cursor_written && (last_cursor.elapsed() >= CURSOR_INTERVAL || at_end)
            {
                match self.write_cursor() {
                    Ok(()) => cursor_written = self.acked,
                    Err(e) => {
                        tracing::error!(core = self.core, error = %e, "kafka forwarder: writing the cursor failed")
                    }
                }
                last_cursor = Instant::now();
            }
            if self.status.state() != SinkState::Ready
                && self.inflight.is_empty()
                && last_probe.elapsed() >= PROBE_INTERVAL
            {
                last_probe = Instant::now();
                if self
                    .producer
                    .client()
                    .fetch_metadata(Some(&self.cfg.topic), Duration::from_millis(500))
                    .is_ok()
                {
                    self.status.set_state(SinkState::Ready);
                }
            }
            if stopping && at_end && cursor_written == self.acked && retry_at.is_none() {
                return;
            }
        }
    }

    /// Produces the log's new records while the in-flight bound allows; how many.
    fn produce_available(&mut self) -> io::Result<usize> {
        let mut n = 0;
        let mut key = itoa::Buffer::new();
        let mut lsn_text = itoa::Buffer::new();
        let box_text = format!("{:016x}", self.box_id);
        let core_text = self.core.to_string();
        while self.inflight.len() < self.cfg.inflight_records_max as usize {
            let Some((lsn, payload)) = self.reader.next()? else {
                break;
            };
            let end = lsn + (FRAME_HEADER_BYTES + payload.len()) as u64;
            if !self.skip.is_empty() && self.skip.remove(&lsn) {
                self.status
                    .recovered_records
                    .fetch_add(1, Ordering::Relaxed);
                self.inflight.push_back(Inflight {
                    lsn,
                    end,
                    done: true,
                    failed: false,
                    at: None,
                });
                continue;
            }
            let (k, ts, value) = match record::decode(payload) {
                Ok(r) => {
                    self.value.clear();
                    raw_pb::encode(&r, &mut self.value);
                    (
                        Some(crate::murmur2::campaign_key(r.click.campaign_id, &mut key)),
                        Some(r.recv_ms as i64),
                        &self.value[..],
                    )
                }
                Err(e) => {
                    self.status
                        .undecodable_records
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::error!(core = self.core, lsn, error = %e, "kafka forwarder: log record does not decode; producing its bytes as they are, without a key");
                    (None, None, payload)
                }
            };
            let headers = OwnedHeaders::new_with_capacity(3)
                .insert(Header {
                    key: HEADER_BOX,
                    value: Some(box_text.as_bytes()),
                })
                .insert(Header {
                    key: HEADER_CORE,
                    value: Some(core_text.as_bytes()),
                })
                .insert(Header {
                    key: HEADER_LSN,
                    value: Some(lsn_text.format(lsn).as_bytes()),
                });
            let mut rec =
                BaseRecord::<[u8], [u8], usize>::with_opaque_to(&self.cfg.topic, lsn as usize)
                    .payload(value)
                    .headers(headers);
            if let Some(k) = k {
                rec = rec.key(k);
            }
            if let Some(ts) = ts {
                rec = rec.timestamp(ts);
            }
            loop {
                match self.producer.send(rec) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        rec = back;
                        self.producer.poll(IDLE_POLL);
                    }
                    Err((e, _)) => {
                        // Not queued (e.g. too large for the broker): counted, logged, and
                        // retried from this record after a backoff (it stays in the log).
                        self.status
                            .delivery_failures
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::error!(core = self.core, lsn, error = %e, "kafka forwarder: produce refused");
                        self.inflight.push_back(Inflight {
                            lsn,
                            end,
                            done: false,
                            failed: true,
                            at: None,
                        });
                        return Ok(n);
                    }
                }
            }
            self.inflight.push_back(Inflight {
                lsn,
                end,
                done: false,
                failed: false,
                at: None,
            });
            n += 1;
        }
        Ok(n)
    }

    /// Applies delivery reports; moves the acknowledged prefix. True when a failure made
    /// the forwarder rewind (it then produces again from the first failed record).
    fn take_deliveries(&mut self) -> bool {
        std::mem::swap(
            &mut *self
                .producer
                .context()
                .deliveries
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
            &mut self.reports,
        );
        let mut reports = std::mem::take(&mut self.reports);
        for d in reports.drain(..) {
            let Ok(i) = self.inflight.binary_search_by_key(&d.lsn, |f| f.lsn) else {
                continue;
            };
            let f = &mut self.inflight[i];
            match d.error {
                None => {
                    f.done = true;
                    f.at = Some((d.partition, d.offset));
                    self.status
                        .delivered_records
                        .fetch_add(1, Ordering::Relaxed);
                }
                Some(e) => {
                    f.failed = true;
                    self.status
                        .delivery_failures
                        .fetch_add(1, Ordering::Relaxed);
                    self.status.set_state(SinkState::Failing);
                    tracing::error!(core = self.core, lsn = d.lsn, error = %e, "kafka delivery failed; it will be produced again");
                }
            }
        }
        self.reports = reports;
        let mut moved = false;
        while let Some(f) = self.inflight.front() {
            if !f.done {
                break;
            }
            if let Some((p, o)) = f.at {
                // Held back by the in-flight bound: the offsets a broker reports for a
                // batch's records need not be exact (tansu's are not always), and
                // reading a few more records at recovery is cheap.
                let slack = i64::from(self.cfg.inflight_records_max);
                let s = self.scan_from.entry(p).or_insert(0);
                *s = (*s).max(o + 1 - slack);
            }
            self.acked = f.end;
            self.inflight.pop_front();
            moved = true;
        }
        if moved {
            self.status.set_acked_lsn(self.core, self.acked);
            if self.status.state() != SinkState::Ready && !self.inflight.iter().any(|f| f.failed) {
                self.status.set_state(SinkState::Ready);
            }
        }
        // Rewind once nothing failed is still waiting for its report.
        let Some(first_failed) = self.inflight.iter().position(|f| f.failed) else {
            return false;
        };
        if self.inflight.iter().any(|f| !f.done && !f.failed) {
            return false;
        }
        let from = self.inflight[first_failed].lsn;
        for f in self.inflight.iter().skip(first_failed) {
            if f.done {
                self.skip.insert(f.lsn);
            }
        }
        self.inflight.clear();
        // A fatal producer error (e.g. the idempotence state lost by a broker) never
        // clears: start a new producer; the skip set keeps what was delivered.
        if let Some((code, why)) = self.producer.client().fatal_error() {
            tracing::error!(
                core = self.core,
                ?code,
                why,
                "kafka producer hit a fatal error; starting a new one"
            );
            let ctx = Ctx::new(self.status.clone(), self.core);
            match producer_config(&self.cfg).create_with_context(ctx) {
                Ok(p) => self.producer = p,
                Err(e) => {
                    tracing::error!(core = self.core, error = %e, "kafka producer could not be recreated")
                }
            }
        }
        match LogReader::open(&self.dir, from) {
            Ok(r) => self.reader = r,
            Err(e) => {
                tracing::error!(core = self.core, error = %e, "kafka forwarder: cannot reopen the log")
            }
        }
        // The prefix before the failure is acknowledged: already published above.
        let _ = first_failed;
        true
    }

    fn write_cursor(&self) -> io::Result<()> {
        cursor::write_cursor(
            &self.data_dir,
            CURSOR_CONSUMER,
            self.core as u32,
            self.acked,
        )?;
        // After the cursor: a stale offsets file only makes the next recovery read more.
        clickgate_proto::fsutil::write_atomic(
            &self.offsets_path(),
            format_offsets(&self.scan_from).as_bytes(),
        )
    }
}

/// The LSN of a record this (box, core) produced, from its headers.
fn own_lsn(m: &impl Message, box_id: u64, core: usize) -> Option<u64> {
    let h = m.headers()?;
    let (mut b, mut c, mut l) = (None, None, None);
    for x in h.iter() {
        let v = std::str::from_utf8(x.value?).ok()?;
        match x.key {
            HEADER_BOX => b = u64::from_str_radix(v, 16).ok(),
            HEADER_CORE => c = v.parse::<usize>().ok(),
            HEADER_LSN => l = v.parse::<u64>().ok(),
            _ => {}
        }
    }
    (b? == box_id && c? == core).then_some(l?)
}

fn format_offsets(m: &HashMap<i32, i64>) -> String {
    let mut v: Vec<_> = m.iter().collect();
    v.sort();
    v.iter().map(|(p, o)| format!("{p} {o}\n")).collect()
}

fn parse_offsets(s: &str) -> anyhow::Result<HashMap<i32, i64>> {
    let mut m = HashMap::new();
    for (i, line) in s.lines().enumerate() {
        let mut it = line.split_whitespace();
        let (Some(p), Some(o), None) = (it.next(), it.next(), it.next()) else {
            bail!("line {}: expected `<partition> <offset>`", i + 1);
        };
        m.insert(
            p.parse()
                .map_err(|_| anyhow!("line {}: bad partition {p:?}", i + 1))?,
            o.parse()
                .map_err(|_| anyhow!("line {}: bad offset {o:?}", i + 1))?,
        );
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_file_round_trips_and_names_bad_lines() {
        let m: HashMap<i32, i64> = [(0, 10), (3, 0), (1, 7)].into();
        assert_eq!(parse_offsets(&format_offsets(&m)).unwrap(), m);
        let e = parse_offsets("0 1\n2 x\n").unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("bad offset"), "{e}");
    }
}
