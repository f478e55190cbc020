//! Column builders filled straight from decoded log records: one [`Columns`] per open
//! archive file, appended to row by row and turned into an Arrow record batch every
//! [`BATCH_ROWS`] rows. No per-row allocation: strings are copied once, from the record
//! (which borrows the log's bytes) into the column's value buffer; ids and times go into
//! plain vectors handed to Arrow without a copy.

use std::net::IpAddr;
use std::sync::Arc;

use arrow_array::builder::{BooleanBufferBuilder, ListBuilder, StringBuilder};
use arrow_array::{ArrayRef, BooleanArray, RecordBatch, TimestampMillisecondArray, UInt64Array};
use clickgate_proto::record::RawRecord;

use super::writer::{rule_item, schema};

/// Rows of one record batch handed to the Parquet writer (chosen by measurement,
/// bench/ARCHIVE.md): large enough that per-batch costs vanish, small enough that the
/// builders of every open file stay a few MiB.
pub const BATCH_ROWS: usize = 16 * 1024;

/// The builders of one batch of archive rows.
pub struct Columns {
    rows: usize,
    event_id: StringBuilder,
    ts: Vec<i64>,
    recv_ts: Vec<i64>,
    campaign_id: Vec<u64>,
    ad_id: Vec<u64>,
    publisher_id: Vec<u64>,
    advertiser_id: Vec<u64>,
    user_id: StringBuilder,
    ip: StringBuilder,
    user_agent: StringBuilder,
    country: StringBuilder,
    device: StringBuilder,
    cost_micros: Vec<u64>,
    duplicate: BooleanBufferBuilder,
    fraud: BooleanBufferBuilder,
    rules: ListBuilder<StringBuilder>,
    lsn: Vec<u64>,
}

impl Default for Columns {
    fn default() -> Self {
        Columns::new()
    }
}

impl Columns {
    pub fn new() -> Columns {
        let n = BATCH_ROWS;
        Columns {
            rows: 0,
            event_id: StringBuilder::with_capacity(n, n * 36),
            ts: Vec::with_capacity(n),
            recv_ts: Vec::with_capacity(n),
            campaign_id: Vec::with_capacity(n),
            ad_id: Vec::with_capacity(n),
            publisher_id: Vec::with_capacity(n),
            advertiser_id: Vec::with_capacity(n),
            user_id: StringBuilder::with_capacity(n, n * 16),
            ip: StringBuilder::with_capacity(n, n * 15),
            user_agent: StringBuilder::with_capacity(n, n * 64),
            country: StringBuilder::with_capacity(n, n * 2),
            device: StringBuilder::with_capacity(n, n * 7),
            cost_micros: Vec::with_capacity(n),
            duplicate: BooleanBufferBuilder::new(n),
            fraud: BooleanBufferBuilder::new(n),
            rules: ListBuilder::new(StringBuilder::new()).with_field(rule_item()),
            lsn: Vec::with_capacity(n),
        }
    }

    pub fn len(&self) -> usize {
        self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Appends one record read at position `lsn` of its source.
    #[inline]
    pub fn push(&mut self, r: &RawRecord<'_>, lsn: u64) {
        let c = &r.click;
        let mut id = [0u8; 36];
        c.event_id.write_text(&mut id);
        // The UUID text is ASCII hex digits and dashes.
        self.event_id
            .append_value(std::str::from_utf8(&id).unwrap_or_default());
        self.ts.push(c.ts_ms as i64);
        self.recv_ts.push(r.recv_ms as i64);
        self.campaign_id.push(c.campaign_id);
        self.ad_id.push(c.ad_id);
        self.publisher_id.push(c.publisher_id);
        self.advertiser_id.push(c.advertiser_id);
        self.user_id.append_value(&c.user_id);
        let mut ip = [0u8; 45];
        let n = write_ip(&mut ip, c.ip);
        self.ip
            .append_value(std::str::from_utf8(&ip[..n]).unwrap_or_default());
        self.user_agent.append_value(&c.user_agent);
        self.country.append_value(c.country_str());
        self.device.append_value(c.device.as_str());
        self.cost_micros.push(c.cost_micros);
        self.duplicate.append(r.flags.duplicate());
        self.fraud.append(r.flags.fraud());
        for id in &r.rules {
            self.rules.values().append_value(id);
        }
        self.rules.append(true);
        self.lsn.push(lsn);
        self.rows += 1;
    }

    /// The rows appended so far as one batch (column `source` = `stream`); the builders
    /// are empty again afterwards.
    pub fn finish(&mut self, stream: &str) -> anyhow::Result<RecordBatch> {
        let n = self.rows;
        self.rows = 0;
        let take = |v: &mut Vec<u64>| -> ArrayRef {
            Arc::new(UInt64Array::from(std::mem::replace(
                v,
                Vec::with_capacity(BATCH_ROWS),
            )))
        };
        let ts = |v: &mut Vec<i64>| -> ArrayRef {
            Arc::new(
                TimestampMillisecondArray::from(std::mem::replace(
                    v,
                    Vec::with_capacity(BATCH_ROWS),
                ))
                .with_timezone("UTC"),
            )
        };
        let mut source = StringBuilder::with_capacity(n, n * stream.len());
        for _ in 0..n {
            source.append_value(stream);
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.event_id.finish()),
            ts(&mut self.ts),
            ts(&mut self.recv_ts),
            take(&mut self.campaign_id),
            take(&mut self.ad_id),
            take(&mut self.publisher_id),
            take(&mut self.advertiser_id),
            Arc::new(self.user_id.finish()),
            Arc::new(self.ip.finish()),
            Arc::new(self.user_agent.finish()),
            Arc::new(self.country.finish()),
            Arc::new(self.device.finish()),
            take(&mut self.cost_micros),
            Arc::new(BooleanArray::new(self.duplicate.finish(), None)),
            Arc::new(BooleanArray::new(self.fraud.finish(), None)),
            Arc::new(self.rules.finish()),
            Arc::new(source.finish()),
            take(&mut self.lsn),
        ];
        Ok(RecordBatch::try_new(schema(), columns)?)
    }
}

/// Writes the text form of `ip` (as `Display` does) into `out`; returns its length.
/// IPv4, the common case, without the formatting machinery.
pub fn write_ip(out: &mut [u8; 45], ip: IpAddr) -> usize {
    match ip {
        IpAddr::V4(a) => {
            let mut at = 0;
            for (i, o) in a.octets().into_iter().enumerate() {
                if i > 0 {
                    out[at] = b'.';
                    at += 1;
                }
                if o >= 100 {
                    out[at] = b'0' + o / 100;
                    at += 1;
                }
                if o >= 10 {
                    out[at] = b'0' + o / 10 % 10;
                    at += 1;
                }
                out[at] = b'0' + o % 10;
                at += 1;
            }
            at
        }
        IpAddr::V6(a) => {
            use std::io::Write;
            let mut w = &mut out[..];
            let _ = write!(w, "{a}");
            45 - w.len()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_text_matches_display() {
        for s in [
            "0.0.0.0",
            "1.2.3.4",
            "10.0.99.100",
            "255.255.255.255",
            "203.0.113.7",
            "::1",
            "2001:db8::1",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "::ffff:1.2.3.4",
        ] {
            let ip: IpAddr = s.parse().unwrap();
            let mut b = [0u8; 45];
            let n = write_ip(&mut b, ip);
            assert_eq!(std::str::from_utf8(&b[..n]).unwrap(), ip.to_string());
        }
    }
}
