//! The archive's Arrow schema and one Parquet file written atomically.
//!
//! One row per raw record, every field kept (docs/schema.md): the event, the dataplane's
//! duplicate/fraud flags, the fired rule ids, the receive time, and where the record came
//! from (`source`, `lsn`) so billing's tie-break between copies received in the same
//! millisecond is deterministic. Times are `TIMESTAMP(MILLIS, UTC)` and ids `UINT64`, so
//! Spark, Trino and DuckDB read the files as they are.

use std::fs::{self, File};
use std::io::{self, BufWriter};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use arrow_array::RecordBatch;
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use clickgate_core::event::FIELDS;
use clickgate_proto::record::{self, RawRecord};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;

use super::columns::{Columns, BATCH_ROWS};

/// What the dataplane added to the event, the last columns.
const DECISION_COLUMNS: [&str; 5] = ["duplicate", "fraud", "rules", "source", "lsn"];

/// Column names, in file order: the event's fields (`clickgate_core::event::FIELDS`) with
/// `recv_ts` after `ts`, then [`DECISION_COLUMNS`].
pub const COLUMNS: [&str; FIELDS.len() + 1 + DECISION_COLUMNS.len()] = {
    let mut out = [""; FIELDS.len() + 1 + DECISION_COLUMNS.len()];
    let (mut i, mut at) = (0, 0);
    while i < FIELDS.len() {
        out[at] = FIELDS[i];
        at += 1;
        if i == 1 {
            // `recv_ts` follows `ts`, FIELDS[1].
            out[at] = "recv_ts";
            at += 1;
        }
        i += 1;
    }
    i = 0;
    while i < DECISION_COLUMNS.len() {
        out[at] = DECISION_COLUMNS[i];
        at += 1;
        i += 1;
    }
    out
};

fn ts_type() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

pub(crate) fn rule_item() -> Arc<Field> {
    Arc::new(Field::new("item", DataType::Utf8, false))
}

/// The archive schema (every column required).
pub fn schema() -> SchemaRef {
    let f = |name: &str, t: DataType| Field::new(name, t, false);
    Arc::new(Schema::new(vec![
        f("event_id", DataType::Utf8),
        f("ts", ts_type()),
        f("recv_ts", ts_type()),
        f("campaign_id", DataType::UInt64),
        f("ad_id", DataType::UInt64),
        f("publisher_id", DataType::UInt64),
        f("advertiser_id", DataType::UInt64),
        f("user_id", DataType::Utf8),
        f("ip", DataType::Utf8),
        f("user_agent", DataType::Utf8),
        f("country", DataType::Utf8),
        f("device", DataType::Utf8),
        f("cost_micros", DataType::UInt64),
        f("duplicate", DataType::Boolean),
        f("fraud", DataType::Boolean),
        f("rules", DataType::List(rule_item())),
        f("source", DataType::Utf8),
        f("lsn", DataType::UInt64),
    ]))
}

/// Builds one record batch from raw records `(lsn, encoded record)` of one source stream
/// (tests and tools; the archiver fills [`Columns`] as it reads).
pub fn batch<'a>(
    stream: &str,
    rows: impl ExactSizeIterator<Item = (u64, &'a [u8])>,
) -> anyhow::Result<RecordBatch> {
    let mut cols = Columns::new();
    for (lsn, bytes) in rows {
        let r = record::decode(bytes).with_context(|| format!("{stream}: record at LSN {lsn}"))?;
        cols.push(&r, lsn);
    }
    cols.finish(stream)
}

/// Writer settings (chosen by measurement, bench/ARCHIVE.md): Snappy; row groups of at
/// most `row_group_rows`; no dictionary for the columns of (nearly) unique values, where
/// building one only to drop it costs time; min/max statistics per column chunk, not per
/// page (readers prune by row group and by hour partition).
pub fn properties(row_group_rows: usize) -> WriterProperties {
    let mut b = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(row_group_rows))
        .set_statistics_enabled(EnabledStatistics::Chunk);
    for c in ["event_id", "lsn", "recv_ts", "ts"] {
        b = b.set_column_dictionary_enabled(ColumnPath::from(c), false);
    }
    b.build()
}

/// One archive file being written: rows go into [`Columns`], every [`BATCH_ROWS`] rows
/// into the Parquet writer (which cuts row groups), and [`PartFile::finish`] makes the
/// file durable under its staging name.
pub struct PartFile {
    path: PathBuf,
    w: ArrowWriter<BufWriter<File>>,
    cols: Columns,
    rows: u64,
}

impl PartFile {
    pub fn create(path: &Path, row_group_rows: usize) -> anyhow::Result<PartFile> {
        let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let w = ArrowWriter::try_new(
            BufWriter::with_capacity(1 << 20, file),
            schema(),
            Some(properties(row_group_rows)),
        )?;
        Ok(PartFile {
            path: path.to_path_buf(),
            w,
            cols: Columns::new(),
            rows: 0,
        })
    }

    #[inline]
    pub fn push(&mut self, r: &RawRecord<'_>, lsn: u64, stream: &str) -> anyhow::Result<()> {
        self.cols.push(r, lsn);
        self.rows += 1;
        if self.cols.len() >= BATCH_ROWS {
            let b = self.cols.finish(stream)?;
            self.w
                .write(&b)
                .with_context(|| format!("writing {}", self.path.display()))?;
        }
        Ok(())
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Writes the last rows and the footer, fsyncs; returns (path, bytes).
    pub fn finish(mut self, stream: &str) -> anyhow::Result<(PathBuf, u64)> {
        if !self.cols.is_empty() {
            let b = self.cols.finish(stream)?;
            self.w.write(&b)?;
        }
        let file = self
            .w
            .into_inner()
            .with_context(|| format!("writing {}", self.path.display()))?
            .into_inner()
            .map_err(|e| e.into_error())?;
        file.sync_all()
            .with_context(|| format!("fsync {}", self.path.display()))?;
        let len = file.metadata()?.len();
        Ok((self.path, len))
    }
}

pub use clickgate_proto::fsutil::sync_dir;

/// Creates `root/rel` and fsyncs every directory it created and its parent, so the new
/// partition survives a crash along with the file renamed into it.
pub fn create_partition_dir(root: &Path, rel: &Path) -> io::Result<()> {
    let full = root.join(rel);
    if full.is_dir() {
        return Ok(());
    }
    fs::create_dir_all(&full)?;
    let mut d = full.as_path();
    while let Some(parent) = d.parent() {
        sync_dir(parent)?;
        if parent == root || !parent.starts_with(root) {
            break;
        }
        d = parent;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_the_event_fields_then_the_decision_and_name_the_schema() {
        assert_eq!(&COLUMNS[..3], &["event_id", "ts", "recv_ts"]);
        assert_eq!(&COLUMNS[3..FIELDS.len() + 1], &FIELDS[2..]);
        assert_eq!(&COLUMNS[FIELDS.len() + 1..], &DECISION_COLUMNS);
        let schema = schema();
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(names, COLUMNS);
    }
}
