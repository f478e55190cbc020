//! Reading archive files back into raw records (the inverse of `archive::writer`).

use std::borrow::Cow;
use std::fs::File;
use std::path::Path;

use anyhow::{bail, Context};
use arrow_array::cast::AsArray;
use arrow_array::types::{TimestampMillisecondType, UInt64Type};
use arrow_array::Array;
use clickgate_core::{Click, Device, EventId};
use clickgate_proto::record::{Flags, RawRecord};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::archive::writer::{schema, COLUMNS};

/// Rows per batch decoded at once.
const READ_BATCH_ROWS: usize = 8192;

/// Rows in an archive file, from its footer.
pub fn file_rows(path: &Path) -> anyhow::Result<u64> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let b = ParquetRecordBatchReaderBuilder::try_new(f)
        .with_context(|| format!("{}: not a Parquet file", path.display()))?;
    Ok(b.metadata().file_metadata().num_rows().max(0) as u64)
}

/// Calls `each(record, source, lsn)` for every row of an archive file, in file order.
pub fn for_each_row(
    path: &Path,
    mut each: impl FnMut(&RawRecord<'_>, &str, u64) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let b = ParquetRecordBatchReaderBuilder::try_new(f)
        .with_context(|| format!("{}: not a Parquet file", path.display()))?;
    let want = schema();
    for (name, field) in COLUMNS.iter().zip(want.fields()) {
        match b.schema().field_with_name(name) {
            Ok(f) if f.data_type() == field.data_type() => {}
            Ok(f) => bail!(
                "{}: column {name} is {} (expected {})",
                path.display(),
                f.data_type(),
                field.data_type()
            ),
            Err(_) => bail!("{}: column {name} is missing", path.display()),
        }
    }
    let reader = b.with_batch_size(READ_BATCH_ROWS).build()?;
    for batch in reader {
        let batch = batch.with_context(|| format!("reading {}", path.display()))?;
        let col = |n: &str| batch.column_by_name(n).expect("schema checked");
        let event_id = col("event_id").as_string::<i32>();
        let ts = col("ts").as_primitive::<TimestampMillisecondType>();
        let recv = col("recv_ts").as_primitive::<TimestampMillisecondType>();
        let u = |n: &str| col(n).as_primitive::<UInt64Type>().clone();
        let (campaign, ad, publisher, advertiser, cost, lsn) = (
            u("campaign_id"),
            u("ad_id"),
            u("publisher_id"),
            u("advertiser_id"),
            u("cost_micros"),
            u("lsn"),
        );
        let user_id = col("user_id").as_string::<i32>();
        let ip = col("ip").as_string::<i32>();
        let ua = col("user_agent").as_string::<i32>();
        let country = col("country").as_string::<i32>();
        let device = col("device").as_string::<i32>();
        let dup = col("duplicate").as_boolean();
        let fraud = col("fraud").as_boolean();
        let rules = col("rules").as_list::<i32>();
        let source = col("source").as_string::<i32>();
        for i in 0..batch.num_rows() {
            let bad =
                |what: &str| anyhow::anyhow!("{}: row {i} of a batch: bad {what}", path.display());
            let id = EventId::parse(event_id.value(i)).ok_or_else(|| bad("event_id"))?;
            let c = country.value(i).as_bytes();
            let country: [u8; 2] = c.try_into().map_err(|_| bad("country"))?;
            let rule_list = rules.value(i);
            let rule_list = rule_list.as_string::<i32>();
            let rule_ids: Vec<&str> = (0..rule_list.len()).map(|j| rule_list.value(j)).collect();
            let rec = RawRecord {
                flags: Flags::default()
                    .with_duplicate(dup.value(i))
                    .with_fraud(fraud.value(i)),
                recv_ms: recv.value(i).max(0) as u64,
                click: Click {
                    event_id: id,
                    ts_ms: ts.value(i).max(0) as u64,
                    campaign_id: campaign.value(i),
                    ad_id: ad.value(i),
                    publisher_id: publisher.value(i),
                    advertiser_id: advertiser.value(i),
                    user_id: Cow::Borrowed(user_id.value(i)),
                    ip: ip.value(i).parse().map_err(|_| bad("ip"))?,
                    user_agent: Cow::Borrowed(ua.value(i)),
                    country,
                    device: Device::parse(device.value(i)).ok_or_else(|| bad("device"))?,
                    cost_micros: cost.value(i),
                },
                rules: rule_ids,
            };
            each(&rec, source.value(i), lsn.value(i))?;
        }
    }
    Ok(())
}
