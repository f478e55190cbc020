//! The archive's Arrow schema and one Parquet file written atomically.
//!
//! One row per raw record, every field kept (contract §5): the event, the dataplane's
//! duplicate/fraud flags, the fired rule ids, the receive time, and where the record came
//! from (`source`, `lsn`) so billing's tie-break between copies received in the same
//! millisecond is deterministic. Times are `TIMESTAMP(MILLIS, UTC)` and ids `UINT64`, so
//! Spark, Trino and DuckDB read the files as they are.

use std::fs::{self, File};
use std::io::{self, BufWriter};
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use arrow_array::builder::{ListBuilder, StringBuilder};
use arrow_array::{
    ArrayRef, BooleanArray, RecordBatch, StringArray, TimestampMillisecondArray, UInt64Array,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use clickgate_proto::record::{self, RawRecord};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

/// Column names, in file order.
pub const COLUMNS: [&str; 18] = [
    "event_id",
    "ts",
    "recv_ts",
    "campaign_id",
    "ad_id",
    "publisher_id",
    "advertiser_id",
    "user_id",
    "ip",
    "user_agent",
    "country",
    "device",
    "cost_micros",
    "duplicate",
    "fraud",
    "rules",
    "source",
    "lsn",
];

fn ts_type() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

fn rule_item() -> Arc<Field> {
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

/// Builds one record batch from raw records `(lsn, encoded record)` of one source stream.
pub fn batch<'a>(
    stream: &str,
    rows: impl ExactSizeIterator<Item = (u64, &'a [u8])> + Clone,
) -> anyhow::Result<RecordBatch> {
    let n = rows.len();
    let mut recs: Vec<(u64, RawRecord<'a>)> = Vec::with_capacity(n);
    for (lsn, bytes) in rows {
        let r = record::decode(bytes).with_context(|| format!("{stream}: record at LSN {lsn}"))?;
        recs.push((lsn, r));
    }
    let u64s = |f: &dyn Fn(&RawRecord) -> u64| -> ArrayRef {
        Arc::new(UInt64Array::from_iter_values(
            recs.iter().map(|(_, r)| f(r)),
        ))
    };
    let ts = |f: &dyn Fn(&RawRecord) -> u64| -> ArrayRef {
        Arc::new(
            TimestampMillisecondArray::from_iter_values(recs.iter().map(|(_, r)| f(r) as i64))
                .with_timezone("UTC"),
        )
    };
    let mut id = [0u8; 36];
    let mut ids = StringBuilder::with_capacity(n, n * 36);
    let mut ip = StringBuilder::with_capacity(n, n * 15);
    let mut text = String::with_capacity(40);
    let mut rules = ListBuilder::new(StringBuilder::new()).with_field(rule_item());
    for (_, r) in &recs {
        r.click.event_id.write_text(&mut id);
        ids.append_value(std::str::from_utf8(&id).expect("uuid text is ASCII"));
        text.clear();
        write_ip(&mut text, r.click.ip);
        ip.append_value(&text);
        for id in &r.rules {
            rules.values().append_value(id);
        }
        rules.append(true);
    }
    let strs = |f: &dyn Fn(&RawRecord) -> String| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(
            recs.iter().map(|(_, r)| f(r)),
        ))
    };
    let columns: Vec<ArrayRef> = vec![
        Arc::new(ids.finish()),
        ts(&|r| r.click.ts_ms),
        ts(&|r| r.recv_ms),
        u64s(&|r| r.click.campaign_id),
        u64s(&|r| r.click.ad_id),
        u64s(&|r| r.click.publisher_id),
        u64s(&|r| r.click.advertiser_id),
        Arc::new(StringArray::from_iter_values(
            recs.iter().map(|(_, r)| &*r.click.user_id),
        )),
        Arc::new(ip.finish()),
        Arc::new(StringArray::from_iter_values(
            recs.iter().map(|(_, r)| &*r.click.user_agent),
        )),
        strs(&|r| r.click.country_str().to_owned()),
        Arc::new(StringArray::from_iter_values(
            recs.iter().map(|(_, r)| r.click.device.as_str()),
        )),
        u64s(&|r| r.click.cost_micros),
        Arc::new(BooleanArray::from_iter(
            recs.iter().map(|(_, r)| Some(r.flags.duplicate())),
        )),
        Arc::new(BooleanArray::from_iter(
            recs.iter().map(|(_, r)| Some(r.flags.fraud())),
        )),
        Arc::new(rules.finish()),
        Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
            stream, n,
        ))),
        Arc::new(UInt64Array::from_iter_values(recs.iter().map(|(l, _)| *l))),
    ];
    Ok(RecordBatch::try_new(schema(), columns)?)
}

fn write_ip(out: &mut String, ip: IpAddr) {
    use std::fmt::Write;
    let _ = write!(out, "{ip}");
}

/// Writer settings: Snappy, row groups of at most `row_group_rows`.
pub fn properties(row_group_rows: usize) -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(row_group_rows))
        .build()
}

/// Writes `batches` as `dir/name` atomically and durably: `dir/.name.tmp`, fsync, rename,
/// fsync of `dir`. Readers never see a partial file (they skip dot-files). Returns the
/// file's size in bytes.
pub fn write_file(
    dir: &Path,
    name: &str,
    batches: &[RecordBatch],
    row_group_rows: usize,
) -> anyhow::Result<u64> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut w = ArrowWriter::try_new(
        BufWriter::with_capacity(1 << 20, file),
        schema(),
        Some(properties(row_group_rows)),
    )?;
    for b in batches {
        w.write(b)?;
    }
    let file = w
        .into_inner()
        .with_context(|| format!("writing {}", tmp.display()))?
        .into_inner()
        .map_err(|e| e.into_error())?;
    file.sync_all()
        .with_context(|| format!("fsync {}", tmp.display()))?;
    let len = file.metadata()?.len();
    drop(file);
    let path = dir.join(name);
    fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
    sync_dir(dir)?;
    Ok(len)
}

pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

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
