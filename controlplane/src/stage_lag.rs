//! Records behind each consumer of the local log, for `/metrics`:
//! `clickgate_kafka_delivery_lag_records` (the forwarder's `kafka` cursor) and
//! `clickgate_archive_lag_records` (the archiver's cursor), summed over the cores.
//!
//! A cursor is an LSN (a byte position), and records vary in size, so a background
//! thread reads each core's log once as it grows (one more sequential read from the page
//! cache, like each consumer does) and keeps a mark `(lsn, records before it)` every
//! [`MARK_EVERY`] records. A consumer's lag is the records counted up to the head minus
//! those before its cursor, interpolated by bytes between two marks (so within a few
//! records). Marks behind every cursor are dropped; at most [`MARKS_MAX`] per core
//! (past it the oldest go, and a consumer behind all marks is counted from the oldest,
//! i.e. too low, never too high).

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clickgate_proto::cursor;
use clickgate_proto::segment::{self, LogReader};

/// A mark every this many records.
pub const MARK_EVERY: u64 = 256;
/// Marks kept per core, at most (16 bytes each: 16 MiB per core).
pub const MARKS_MAX: usize = 1 << 20;
/// Records read per core per pass, at most (a long backlog is counted over several).
const READ_PER_PASS_MAX: u64 = 4_000_000;

/// The lag gauges this exports: (consumer, metric, help).
pub const CONSUMERS: [(&str, &str, &str); 2] = [
    (
        "kafka",
        "clickgate_kafka_delivery_lag_records",
        "Records in the local log not yet acknowledged by the Kafka brokers (after the forwarder's cursor), summed over the cores.",
    ),
    (
        "archive",
        "clickgate_archive_lag_records",
        "Records in the local log after the archiver's committed cursor, summed over the cores.",
    ),
];

struct CoreTail {
    dir: PathBuf,
    reader: Option<LogReader>,
    /// Records read so far (from where the reader started), and the LSN after them.
    count: u64,
    head_lsn: u64,
    marks: VecDeque<(u64, u64)>,
}

impl CoreTail {
    fn new(dir: PathBuf) -> CoreTail {
        CoreTail {
            dir,
            reader: None,
            count: 0,
            head_lsn: 0,
            marks: VecDeque::new(),
        }
    }

    /// Reads what the log gained since the last pass.
    fn advance(&mut self, start: u64) -> std::io::Result<()> {
        if self.reader.is_none() {
            let r = match LogReader::open(&self.dir, start) {
                Ok(r) => r,
                // The cursor's segment is gone (retention) or not there yet: the oldest.
                Err(_) => LogReader::open(&self.dir, 0)?,
            };
            self.marks.clear();
            self.count = 0;
            self.reader = Some(r);
        }
        let r = self.reader.as_mut().expect("opened above");
        if self.marks.is_empty() {
            self.marks.push_back((r.position(), 0));
        }
        let mut n = 0;
        self.head_lsn = r.position();
        loop {
            match r.next() {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    self.reader = None; // reopened next pass
                    return Err(e);
                }
            }
            self.count += 1;
            self.head_lsn = r.position();
            n += 1;
            if self.count.is_multiple_of(MARK_EVERY) {
                self.marks.push_back((r.position(), self.count));
                if self.marks.len() > MARKS_MAX {
                    self.marks.pop_front();
                }
            }
            if n >= READ_PER_PASS_MAX {
                break;
            }
        }
        Ok(())
    }

    /// Records between `lsn` and the head read so far.
    fn records_after(&self, lsn: u64) -> u64 {
        let (head_lsn, head_count) = (self.head_lsn, self.count);
        if lsn >= head_lsn || self.marks.is_empty() {
            return 0;
        }
        // Last mark at or before `lsn`, and the next point after it.
        let i = self.marks.partition_point(|m| m.0 <= lsn);
        let (a_lsn, a_count) = if i == 0 {
            self.marks[0]
        } else {
            self.marks[i - 1]
        };
        let (b_lsn, b_count) = self.marks.get(i).copied().unwrap_or((head_lsn, head_count));
        let before = if lsn <= a_lsn || b_lsn <= a_lsn {
            a_count
        } else {
            a_count
                + ((b_count - a_count) as u128 * (lsn - a_lsn) as u128 / (b_lsn - a_lsn) as u128)
                    as u64
        };
        head_count.saturating_sub(before)
    }

    /// Drops marks wholly behind `lsn` (keeps the one at or before it).
    fn trim(&mut self, lsn: u64) {
        while self.marks.len() > 1 && self.marks[1].0 <= lsn {
            self.marks.pop_front();
        }
    }
}

/// The gauges and the thread that keeps them.
pub struct StageLags {
    pub gauges: Vec<(&'static str, &'static str, Arc<AtomicU64>)>,
}

impl StageLags {
    /// Starts the counting thread (a pass every `interval`); it stops when `stop` is set.
    pub fn spawn(
        data_dir: &Path,
        interval: Duration,
        stop: Arc<std::sync::atomic::AtomicBool>,
    ) -> std::io::Result<StageLags> {
        let gauges: Vec<_> = CONSUMERS
            .iter()
            .map(|&(_, name, help)| (name, help, Arc::new(AtomicU64::new(0))))
            .collect();
        let out: Vec<Arc<AtomicU64>> = gauges.iter().map(|g| g.2.clone()).collect();
        let data_dir = data_dir.to_path_buf();
        std::thread::Builder::new()
            .name("cg-stage-lag".into())
            .spawn(move || {
                let mut tails: BTreeMap<usize, CoreTail> = BTreeMap::new();
                while !stop.load(Ordering::Relaxed) {
                    pass(&data_dir, &mut tails, &out);
                    std::thread::sleep(interval);
                }
            })?;
        Ok(StageLags { gauges })
    }
}

fn pass(data_dir: &Path, tails: &mut BTreeMap<usize, CoreTail>, out: &[Arc<AtomicU64>]) {
    let Ok(dirs) = segment::core_dirs(&data_dir.join("log")) else {
        return;
    };
    let mut sums = vec![0u64; CONSUMERS.len()];
    for (core, dir) in dirs {
        let cursors: Vec<Option<u64>> = CONSUMERS
            .iter()
            .map(|(c, _, _)| cursor::read_cursor(data_dir, c, core as u32).ok().flatten())
            .collect();
        let oldest = cursors.iter().flatten().copied().min().unwrap_or(0);
        let t = tails.entry(core).or_insert_with(|| CoreTail::new(dir));
        if let Err(e) = t.advance(oldest) {
            tracing::debug!(core, error = %e, "stage lag: reading the log failed; retrying");
            continue;
        }
        for (i, c) in cursors.iter().enumerate() {
            // No cursor yet: the consumer is off, or has taken nothing (all behind).
            sums[i] += match c {
                Some(lsn) => t.records_after(*lsn),
                None => 0,
            };
        }
        t.trim(oldest);
    }
    for (g, v) in out.iter().zip(sums) {
        g.store(v, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_after_interpolates_between_marks() {
        let mut t = CoreTail::new(PathBuf::new());
        // 1024 records of 100 bytes from LSN 0, marks every 256.
        t.marks = (0..=4).map(|k| (k * 25_600, k * 256)).collect();
        t.count = 1024;
        t.head_lsn = 102_400;
        assert_eq!(t.records_after(0), 1024);
        assert_eq!(t.records_after(25_600), 768);
        assert_eq!(t.records_after(30_000), 1024 - 300);
        assert_eq!(t.records_after(102_400), 0);
        assert_eq!(t.records_after(200_000), 0);
        t.trim(51_200);
        assert_eq!(t.marks.front(), Some(&(51_200, 512)));
        assert_eq!(t.records_after(60_000), 1024 - 600);
    }
}
