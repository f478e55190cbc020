//! Hash-partitioned spill files: billing's bounded-memory group-by.
//!
//! Rows are appended to one of `P` files by a hash of their key; a later pass loads one
//! file at a time, so memory holds one partition (≈ rows/P rows), never the day.
//!
//! Entry layout: `u32 len | u64 lsn | u8 source length | source | raw record` where the
//! raw record is `proto::record`'s encoding (so the same decoder reads it back).

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use clickgate_proto::record::{self, RawRecord};

/// Write buffer per partition file, in bytes (P of them are open at once).
pub const SPILL_BUFFER_BYTES: usize = 16 << 10;

pub struct Spill {
    paths: Vec<PathBuf>,
    files: Vec<BufWriter<File>>,
    scratch: Vec<u8>,
    pub rows: u64,
}

impl Spill {
    pub fn create(dir: &Path, prefix: &str, partitions: usize) -> io::Result<Spill> {
        let mut paths = Vec::with_capacity(partitions);
        let mut files = Vec::with_capacity(partitions);
        for p in 0..partitions {
            let path = dir.join(format!("{prefix}-{p:06}"));
            files.push(BufWriter::with_capacity(
                SPILL_BUFFER_BYTES,
                File::create(&path)?,
            ));
            paths.push(path);
        }
        Ok(Spill {
            paths,
            files,
            scratch: Vec::with_capacity(1024),
            rows: 0,
        })
    }

    pub fn partitions(&self) -> usize {
        self.files.len()
    }

    /// Appends one row to partition `hash % P`.
    pub fn push(
        &mut self,
        hash: u64,
        rec: &RawRecord<'_>,
        source: &str,
        lsn: u64,
    ) -> anyhow::Result<()> {
        let p = (hash % self.files.len() as u64) as usize;
        let s = &mut self.scratch;
        s.clear();
        s.extend_from_slice(&[0; 4]);
        s.extend_from_slice(&lsn.to_le_bytes());
        let src = &source.as_bytes()[..source.len().min(255)];
        s.push(src.len() as u8);
        s.extend_from_slice(src);
        record::encode(&rec.click, rec.flags, rec.recv_ms, &rec.rules, s)?;
        let len = (s.len() - 4) as u32;
        s[..4].copy_from_slice(&len.to_le_bytes());
        self.files[p].write_all(s)?;
        self.rows += 1;
        Ok(())
    }

    /// Flushes and closes every file; returns their paths, in partition order.
    pub fn finish(self) -> io::Result<Vec<PathBuf>> {
        for f in self.files {
            f.into_inner().map_err(|e| e.into_error())?;
        }
        Ok(self.paths)
    }
}

/// One spilled row, borrowing the loaded partition.
pub struct Entry<'a> {
    pub lsn: u64,
    pub source: &'a str,
    pub rec: RawRecord<'a>,
}

/// Reads a whole partition file into memory (then removes it).
pub fn load(path: &Path) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    File::open(path)?.read_to_end(&mut buf)?;
    std::fs::remove_file(path)?;
    Ok(buf)
}

/// The entries of a loaded partition, in append order.
pub fn entries(buf: &[u8]) -> anyhow::Result<Vec<Entry<'_>>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < buf.len() {
        let bad = || anyhow::anyhow!("spill file corrupt at byte {at}");
        let len = u32::from_le_bytes(buf.get(at..at + 4).ok_or_else(bad)?.try_into()?) as usize;
        let e = buf.get(at + 4..at + 4 + len).ok_or_else(bad)?;
        let lsn = u64::from_le_bytes(e.get(..8).ok_or_else(bad)?.try_into()?);
        let sl = *e.get(8).ok_or_else(bad)? as usize;
        let source = std::str::from_utf8(e.get(9..9 + sl).ok_or_else(bad)?)?;
        let rec = record::decode(&e[9 + sl..])?;
        out.push(Entry { lsn, source, rec });
        at += 4 + len;
    }
    Ok(out)
}
