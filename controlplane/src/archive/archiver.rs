//! The archive loop: cut each source stream into ranges, write a range's records as one
//! Parquet file per hour partition, then commit the stream's position.
//!
//! ```text
//! range [from, to) of stream s:
//!   1. <data_dir>/archive-ranges/<s> := "from to"      (durable: the intent)
//!   2. per hour partition h touched: <archive>/<h>/<s>-<from>-<to>.parquet  (atomic, durable)
//!   3. commit(s, to)                                    (cursor file / consumer offset)
//! restart: intent.from == committed  ⇒  redo exactly [from, to): same names, same bytes
//! ```
//!
//! A range ends when its buffered record bytes reach `roll_bytes`, when it is
//! `roll_secs` old, when one more hour partition would pass `open_files_max`, or on stop.
//! Memory is bounded by `roll_bytes` per stream plus one row group being encoded.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clickgate_proto::record;

use super::writer::{batch, create_partition_dir, write_file};
use super::{file_name, hour_start, partition_path, ArchiveConfig, RecordSource};

/// Env var of the crash test hook: `after_file:N` aborts the process right after its
/// N-th archive file is durable (before the range's position is committed), the way
/// `kill -9` would. Only tests set it.
pub const FAILPOINT_ENV: &str = "CLICKGATE_ARCHIVE_FAILPOINT";

/// What the archiver did, for logs, metrics and the bench.
#[derive(Debug, Default)]
pub struct ArchiveStats {
    pub rows: AtomicU64,
    pub files: AtomicU64,
    pub file_bytes: AtomicU64,
    pub ranges: AtomicU64,
    pub errors: AtomicU64,
}

#[derive(Default)]
struct Part {
    buf: Vec<u8>,
    /// (lsn, offset in buf, length)
    rows: Vec<(u64, u32, u32)>,
}

struct StreamState {
    from: u64,
    to: u64,
    started: Option<Instant>,
    bytes: u64,
    parts: BTreeMap<u64, Part>,
    /// Redo exactly up to here (a range whose files may exist from before a crash).
    redo_to: Option<u64>,
}

pub struct Archiver<S: RecordSource> {
    cfg: ArchiveConfig,
    /// `<data_dir>/archive-ranges/`: the intent of each stream's range in flight.
    ranges_dir: PathBuf,
    src: S,
    streams: BTreeMap<String, StreamState>,
    stats: Arc<ArchiveStats>,
    abort_after_files: Option<u64>,
}

impl<S: RecordSource> Archiver<S> {
    pub fn new(cfg: ArchiveConfig, data_dir: &Path, src: S) -> Archiver<S> {
        let abort_after_files = std::env::var(FAILPOINT_ENV)
            .ok()
            .and_then(|v| v.strip_prefix("after_file:")?.parse().ok());
        Archiver {
            cfg,
            ranges_dir: data_dir.join("archive-ranges"),
            src,
            streams: BTreeMap::new(),
            stats: Arc::new(ArchiveStats::default()),
            abort_after_files,
        }
    }

    pub fn stats(&self) -> Arc<ArchiveStats> {
        self.stats.clone()
    }

    /// Reads every stream to its current end, writing ranges as they fill. With `flush`,
    /// also writes what is buffered (a clean stop, or a bench's last step).
    pub fn poll(&mut self, flush: bool) -> anyhow::Result<()> {
        let mut first_err = None;
        for s in self.src.streams()? {
            if let Err(e) = self.poll_stream(&s, flush) {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(stream = %s, error = %format!("{e:#}"), "archiving failed; retrying from the committed position");
                // Start over from the committed position and the intent on disk.
                self.streams.remove(&s);
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn init_stream(&mut self, s: &str) -> anyhow::Result<()> {
        if self.streams.contains_key(s) {
            return Ok(());
        }
        let from = self.src.committed(s)?;
        self.src.seek(s, from)?;
        let redo_to = match fs::read_to_string(self.ranges_dir.join(s)) {
            Ok(t) => {
                let mut it = t.split_whitespace().map(str::parse::<u64>);
                match (it.next(), it.next()) {
                    (Some(Ok(f)), Some(Ok(to))) if f == from && to > from => Some(to),
                    _ => None,
                }
            }
            Err(_) => None,
        };
        if let Some(to) = redo_to {
            tracing::info!(
                stream = s,
                from,
                to,
                "archive: redoing a range interrupted by a crash"
            );
        }
        self.streams.insert(
            s.to_owned(),
            StreamState {
                from,
                to: from,
                started: None,
                bytes: 0,
                parts: BTreeMap::new(),
                redo_to,
            },
        );
        Ok(())
    }

    fn poll_stream(&mut self, s: &str, flush: bool) -> anyhow::Result<()> {
        self.init_stream(s)?;
        while let Some((pos, after, bytes)) = self.src.next(s)? {
            let st = self.streams.get_mut(s).expect("initialised");
            let ts = record::decode(bytes)
                .with_context(|| format!("{s}: record at {pos}"))?
                .click
                .ts_ms;
            let hour = hour_start(ts);
            let new_part = !st.parts.contains_key(&hour);
            let bytes = bytes.to_vec();
            if st.redo_to.is_none() && new_part && st.parts.len() >= self.cfg.open_files_max {
                self.write_range(s)?;
            }
            let st = self.streams.get_mut(s).expect("initialised");
            let part = st.parts.entry(hour).or_default();
            part.rows
                .push((pos, part.buf.len() as u32, bytes.len() as u32));
            part.buf.extend_from_slice(&bytes);
            st.bytes += bytes.len() as u64;
            st.to = after;
            st.started.get_or_insert_with(Instant::now);
            let done = match st.redo_to {
                Some(t) => after >= t,
                None => st.bytes >= self.cfg.roll_bytes,
            };
            if done {
                self.write_range(s)?;
            }
        }
        let st = self.streams.get(s).expect("initialised");
        let old = st
            .started
            .is_some_and(|t| t.elapsed() >= Duration::from_secs(self.cfg.roll_secs));
        if st.redo_to.is_none() && (flush || old) {
            self.write_range(s)?;
        }
        Ok(())
    }

    /// Writes the buffered range of `s` and commits its end.
    fn write_range(&mut self, s: &str) -> anyhow::Result<()> {
        let st = self.streams.get_mut(s).expect("initialised");
        if st.parts.is_empty() {
            return Ok(());
        }
        let (from, to) = (st.from, st.to);
        let parts = std::mem::take(&mut st.parts);
        fs::create_dir_all(&self.ranges_dir)?;
        clickgate_proto::control_files::write_atomic(
            &self.ranges_dir.join(s),
            format!("{from} {to}\n").as_bytes(),
        )
        .context("writing the range intent")?;
        let name = file_name(s, from, to);
        let mut rows_total = 0u64;
        for (hour, part) in &parts {
            let rel = partition_path(*hour);
            create_partition_dir(&self.cfg.dir, &rel)
                .with_context(|| format!("creating {}", self.cfg.dir.join(&rel).display()))?;
            let mut batches = Vec::new();
            for chunk in part.rows.chunks(self.cfg.row_group_rows) {
                let rows = chunk
                    .iter()
                    .map(|&(lsn, off, len)| (lsn, &part.buf[off as usize..(off + len) as usize]));
                batches.push(batch(s, rows)?);
            }
            let len = write_file(
                &self.cfg.dir.join(&rel),
                &name,
                &batches,
                self.cfg.row_group_rows,
            )?;
            rows_total += part.rows.len() as u64;
            let files = self.stats.files.fetch_add(1, Ordering::Relaxed) + 1;
            self.stats.file_bytes.fetch_add(len, Ordering::Relaxed);
            if self.abort_after_files == Some(files) {
                eprintln!("clickgate: {FAILPOINT_ENV}: aborting after archive file {files}");
                std::process::abort();
            }
        }
        self.src
            .commit(s, to)
            .with_context(|| format!("committing {s} at {to}"))?;
        self.stats.rows.fetch_add(rows_total, Ordering::Relaxed);
        self.stats.ranges.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            stream = s,
            from,
            to,
            rows = rows_total,
            hours = parts.len(),
            "archive range written"
        );
        let st = self.streams.get_mut(s).expect("initialised");
        st.from = to;
        st.started = None;
        st.bytes = 0;
        st.redo_to = None;
        Ok(())
    }
}

/// The archiver running on its own thread (file and Parquet work is blocking).
pub struct ArchiverHandle {
    stop: mpsc::Sender<()>,
    thread: std::thread::JoinHandle<anyhow::Result<()>>,
    stats: Arc<ArchiveStats>,
}

impl ArchiverHandle {
    /// Starts polling every `cfg.poll_ms`; errors are logged and retried.
    pub fn spawn<S: RecordSource + 'static>(
        cfg: ArchiveConfig,
        data_dir: &Path,
        src: S,
    ) -> anyhow::Result<ArchiverHandle> {
        fs::create_dir_all(&cfg.dir)
            .with_context(|| format!("creating the archive directory {}", cfg.dir.display()))?;
        let poll = Duration::from_millis(cfg.poll_ms);
        let mut a = Archiver::new(cfg, data_dir, src);
        let stats = a.stats();
        let (stop, stop_rx) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("cg-archiver".into())
            .spawn(move || loop {
                let stopping =
                    !matches!(stop_rx.recv_timeout(poll), Err(RecvTimeoutError::Timeout));
                let r = a.poll(stopping);
                if stopping {
                    // One retry on a clean stop, then give up: the cursor still marks
                    // what is unarchived, the next start picks it up.
                    return r.or_else(|_| a.poll(true));
                }
                if r.is_err() {
                    std::thread::sleep(poll * 10);
                }
            })?;
        Ok(ArchiverHandle {
            stop,
            thread,
            stats,
        })
    }

    pub fn stats(&self) -> Arc<ArchiveStats> {
        self.stats.clone()
    }

    /// Writes everything buffered and read so far, commits, and stops (contract §0).
    pub fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("archiver thread panicked"))?
    }
}
