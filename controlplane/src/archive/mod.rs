//! The Parquet archive (docs/schema.md): every raw record of the local log, once, in
//! Hive-style hour partitions by event time, for billing and for any SQL engine.
//!
//! ```text
//! <archive>/year=YYYY/month=MM/day=DD/hour=HH/<stream>-<from>-<to>.parquet
//!   stream  the source stream: `core-<k>` for the local log of core k
//!   from,to the source range [from, to) (LSNs, 20 digits) the file's records come from
//! ```
//!
//! - [`source`]: where records come from ([`RecordSource`]); the local log
//!   ([`source::LocalLogSource`]) today, a `raw_clicks` consumer-group source next.
//! - [`writer`]: the Arrow schema and one Parquet file written atomically.
//! - [`archiver`]: the loop that cuts a stream into ranges, writes each range's records as
//!   one file per hour partition, and commits the source position only after every file
//!   of the range is durable.
//!
//! Why the names carry the range: a crash between "files durable" and "position
//! committed" leaves files for a range the source will hand out again. On restart the
//! archiver finds them, redoes exactly that range and rewrites the same names with the
//! same bytes, so the archive never holds a record twice and never misses one.

pub mod archiver;
pub mod columns;
pub mod source;
pub mod store;
pub mod writer;

use std::path::{Path, PathBuf};

use clickgate_proto::record::{RawRecord, RecordError};

pub use archiver::{Archiver, ArchiverHandle};
pub use source::{LocalLogSource, RecordSource};
pub use store::{ArchiveFile, ArchiveLocation, ArchiveReader, FileData};

/// Decodes a record as a source hands it out: the local log's layout or a `raw_clicks`
/// protobuf value (`proto::raw_pb`).
#[inline]
pub fn decode_value(bytes: &[u8]) -> Result<RawRecord<'_>, RecordError> {
    clickgate_proto::raw_pb::decode_value(bytes)
}

/// The consumer name of the archiver's cursors on the local log (`proto::cursor`).
pub const CURSOR_CONSUMER: &str = "archive";

const HOUR_MS: u64 = 3_600_000;
pub const DAY_MS: u64 = 24 * HOUR_MS;

/// The archiver's settings, every bound with its unit last.
#[derive(Clone, Debug)]
pub struct ArchiveConfig {
    /// Where the files go: a local directory (empty: `<data_dir>/archive`) or S3.
    pub location: ArchiveLocation,
    /// Raw record bytes a stream buffers before its range is written; also the memory
    /// bound of the archiver per stream (Parquet + Snappy files come out ~3-4x smaller).
    pub roll_bytes: u64,
    /// A range is written at most this long after its first record was read, in seconds
    /// (1..=60: the archive is at most about a minute behind the log).
    pub roll_secs: u64,
    /// Hour partitions one range may touch (files open at once), at most; an older event
    /// beyond it closes the range early.
    pub open_files_max: usize,
    /// Rows per Parquet row group, at most (scans read row groups in parallel).
    pub row_group_rows: usize,
    /// How often the log is polled for new records when idle, in ms.
    pub poll_ms: u64,
}

impl Default for ArchiveConfig {
    fn default() -> Self {
        ArchiveConfig {
            location: ArchiveLocation::Dir(PathBuf::new()),
            roll_bytes: 128 << 20,
            roll_secs: 30,
            open_files_max: 48,
            row_group_rows: 1 << 20,
            poll_ms: 200,
        }
    }
}

/// Largest `roll_secs`.
pub const ROLL_SECS_MAX: u64 = 60;

impl ArchiveConfig {
    /// The location, an empty directory meaning `<data_dir>/archive`.
    pub fn location_or_default(&self, data_dir: &Path) -> ArchiveLocation {
        match &self.location {
            ArchiveLocation::Dir(d) if d.as_os_str().is_empty() => {
                ArchiveLocation::Dir(data_dir.join("archive"))
            }
            l => l.clone(),
        }
    }

    /// Checks the bounds (a bad one is a settings error naming the setting).
    pub fn validate(&self) -> Result<(), String> {
        if self.roll_bytes == 0 {
            return Err("archive_roll_bytes must be greater than 0".into());
        }
        if !(1..=ROLL_SECS_MAX).contains(&self.roll_secs) {
            return Err(format!(
                "archive_roll_secs must be 1..={ROLL_SECS_MAX} (the archive's bound on how far it is behind), got {}",
                self.roll_secs
            ));
        }
        if self.open_files_max == 0 {
            return Err("archive_open_files_max must be greater than 0".into());
        }
        if self.row_group_rows == 0 {
            return Err("archive_row_group_rows must be greater than 0".into());
        }
        if self.poll_ms == 0 || self.poll_ms > 60_000 {
            return Err("archive_poll_ms must be between 1 and 60000".into());
        }
        Ok(())
    }
}

/// A UTC civil date.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Date {
    pub year: i32,
    pub month: u32,
    pub day: u32,
}

impl Date {
    /// The date of a day number (days since 1970-01-01).
    pub fn from_days(z: i64) -> Date {
        let (year, month, day) = clickgate_core::civil::civil_from_days(z);
        Date {
            year: year as i32,
            month,
            day,
        }
    }

    /// Days since 1970-01-01.
    pub fn to_days(self) -> i64 {
        clickgate_core::civil::days_from_civil(
            i64::from(self.year),
            u64::from(self.month),
            u64::from(self.day),
        )
    }

    /// Parses `YYYY-MM-DD` (a real calendar date, 1970 or later).
    pub fn parse(s: &str) -> Result<Date, String> {
        let bad = || format!("{s:?} is not a date like 2026-11-27 (YYYY-MM-DD)");
        let b = s.as_bytes();
        if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
            return Err(bad());
        }
        let num = |r: std::ops::Range<usize>| -> Result<u32, String> {
            let t = &s[r];
            if !t.bytes().all(|c| c.is_ascii_digit()) {
                return Err(bad());
            }
            t.parse().map_err(|_| bad())
        };
        let (year, month, day) = (num(0..4)? as i32, num(5..7)?, num(8..10)?);
        let d = Date { year, month, day };
        if year < 1970
            || !(1..=12).contains(&month)
            || day == 0
            || Date::from_days(d.to_days()) != d
        {
            return Err(format!("{s:?} is not a calendar date from 1970 on"));
        }
        Ok(d)
    }

    /// Start of the day, ms since the epoch.
    pub fn start_ms(self) -> u64 {
        self.to_days().max(0) as u64 * DAY_MS
    }
}

impl std::fmt::Display for Date {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }
}

/// The hour partition holding event time `ts_ms`: its start, ms since the epoch.
pub fn hour_start(ts_ms: u64) -> u64 {
    ts_ms - ts_ms % HOUR_MS
}

/// `year=YYYY/month=MM/day=DD/hour=HH` of the hour starting at `hour_ms`.
pub fn partition_path(hour_ms: u64) -> PathBuf {
    let d = Date::from_days((hour_ms / DAY_MS) as i64);
    let h = (hour_ms % DAY_MS) / HOUR_MS;
    PathBuf::from(format!(
        "year={:04}/month={:02}/day={:02}/hour={h:02}",
        d.year, d.month, d.day
    ))
}

/// `core-3-00000000000000004096-00000000000000081920.parquet`.
pub fn file_name(stream: &str, from: u64, to: u64) -> String {
    format!("{stream}-{from:020}-{to:020}.parquet")
}

/// (stream, from, to) of an archive file name; `None` for any other name.
pub fn parse_file_name(name: &str) -> Option<(&str, u64, u64)> {
    let stem = name.strip_suffix(".parquet")?;
    let (rest, to) = stem.rsplit_once('-')?;
    let (stream, from) = rest.rsplit_once('-')?;
    if from.len() != 20 || to.len() != 20 || stream.is_empty() {
        return None;
    }
    Some((stream, from.parse().ok()?, to.parse().ok()?))
}

/// The hour partition directories of one UTC day that exist under `root`, ascending.
pub fn day_partitions(root: &Path, day: Date) -> Vec<PathBuf> {
    let start = day.start_ms();
    (0..24)
        .map(|h| root.join(partition_path(start + h * HOUR_MS)))
        .filter(|p| p.is_dir())
        .collect()
}

/// The archive files (`*.parquet`, no temporaries) of a partition directory, sorted by name.
pub fn partition_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        if name.to_str().and_then(parse_file_name).is_some() {
            out.push(e.path());
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_round_trip_and_partitions() {
        for days in [0i64, 59, 365, 11_016, 20_419, 20_454, 30_000] {
            assert_eq!(Date::from_days(days).to_days(), days);
        }
        let d = Date::parse("2025-11-27").unwrap();
        assert_eq!(d.to_string(), "2025-11-27");
        assert_eq!(d.start_ms(), 1_764_201_600_000);
        assert_eq!(
            partition_path(hour_start(1_764_201_600_000 - 1)),
            PathBuf::from("year=2025/month=11/day=26/hour=23")
        );
        assert_eq!(
            partition_path(hour_start(1_764_201_600_123)),
            PathBuf::from("year=2025/month=11/day=27/hour=00")
        );
        for bad in [
            "2026-02-30",
            "2026-13-01",
            "26-11-27",
            "2026-1-027",
            "1969-12-31",
            "x",
        ] {
            assert!(Date::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Date::parse("2024-02-29").unwrap().day, 29);
    }

    #[test]
    fn file_names_round_trip() {
        let n = file_name("core-3", 4096, 81920);
        assert_eq!(parse_file_name(&n), Some(("core-3", 4096, 81920)));
        assert_eq!(parse_file_name(".core-3-1-2.parquet.tmp"), None);
        assert_eq!(parse_file_name("core-3-1-2.parquet"), None);
    }

    #[test]
    fn locations() {
        let d = Path::new("/data");
        assert_eq!(
            ArchiveLocation::parse(None, d).unwrap(),
            ArchiveLocation::Dir(PathBuf::from("/data/archive"))
        );
        assert_eq!(
            ArchiveLocation::parse(Some("file:///a"), d).unwrap(),
            ArchiveLocation::Dir(PathBuf::from("/a"))
        );
        assert_eq!(
            ArchiveLocation::parse(Some("s3://my-bucket/a/b/"), d).unwrap(),
            ArchiveLocation::S3 {
                bucket: "my-bucket".into(),
                prefix: "a/b".into()
            }
        );
        assert_eq!(
            ArchiveLocation::parse(Some("s3://my-bucket"), d).unwrap(),
            ArchiveLocation::S3 {
                bucket: "my-bucket".into(),
                prefix: String::new()
            }
        );
        for bad in [
            "s3://",
            "s3://B!/x",
            "s3://bucket/a//b",
            "s3://bucket/../x",
            "gs://b/p",
        ] {
            let e = ArchiveLocation::parse(Some(bad), d).unwrap_err();
            assert!(e.contains("archive_url"), "{e}");
        }
    }
}
