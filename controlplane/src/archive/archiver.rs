//! The archive loop: cut each source stream into ranges, write a range's records as one
//! Parquet file per hour partition, then commit the stream's position.
//!
//! ```text
//! range [from, to) of stream s, records read one by one:
//!   0. each record is decoded (borrowing the source's bytes) and appended to the column
//!      builders of its hour's file, staged under <staging>/<s>/<hour>.parquet.tmp
//!   1. _intents/<s> := "from to"                        (durable, in the archive: the intent)
//!   2. per hour file: footer, fsync, publish as <partition>/<s>-<from>-<to>.parquet
//!      (rename, or S3 multipart upload: visible whole or not at all)
//!   3. commit(s, to)                                    (cursor file / consumer offset)
//! restart: intent.from == committed  ⇒  redo exactly [from, to): same names, same bytes
//! ```
//!
//! A range ends when its records reach `roll_bytes`, when it is `roll_secs` old (checked
//! every [`AGE_CHECK_ROWS`] records too, so a stream that never runs dry still rolls),
//! when one more hour partition would pass `open_files_max`, or on stop. Memory: the
//! column builders of the open files ([`super::columns::BATCH_ROWS`] rows each) plus the
//! Parquet writer's row group in progress, at most about `roll_bytes` per stream.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::store::Target;
use super::writer::PartFile;
use super::{decode_value, file_name, hour_start, ArchiveConfig, RecordSource};

/// Env var of the crash test hook: `after_file:N` aborts the process right after its
/// N-th archive file is durable (before the range's position is committed), the way
/// `kill -9` would. Only tests set it.
pub const FAILPOINT_ENV: &str = "CLICKGATE_ARCHIVE_FAILPOINT";

/// The range's age is checked every this many records read.
pub const AGE_CHECK_ROWS: u64 = 4096;

/// What the archiver did, for logs, metrics and the bench.
#[derive(Debug, Default)]
pub struct ArchiveStats {
    pub rows: AtomicU64,
    pub files: AtomicU64,
    pub file_bytes: AtomicU64,
    pub ranges: AtomicU64,
    pub errors: AtomicU64,
    /// Records read and not yet committed (all streams), for the lag gauge.
    pub pending_rows: AtomicU64,
    /// Age of the oldest record read and not yet committed, in ms (0: none pending).
    pub pending_age_ms: AtomicU64,
}

struct StreamState {
    from: u64,
    to: u64,
    started: Option<Instant>,
    bytes: u64,
    rows: u64,
    parts: BTreeMap<u64, PartFile>,
    /// Redo exactly up to here (a range whose files may exist from before a crash).
    redo_to: Option<u64>,
}

pub struct Archiver<S: RecordSource> {
    cfg: ArchiveConfig,
    target: Target,
    src: S,
    streams: BTreeMap<String, StreamState>,
    stats: Arc<ArchiveStats>,
    abort_after_files: Option<u64>,
    /// One record's bytes kept across a range cut (rare: an hour beyond the open bound).
    carry: Vec<u8>,
}

impl<S: RecordSource> Archiver<S> {
    /// An archiver of `src` into `cfg.location` (an empty directory: `<data_dir>/archive`).
    /// Opening an S3 location checks that it answers (the error names the setting).
    pub fn new(cfg: ArchiveConfig, data_dir: &Path, src: S) -> anyhow::Result<Archiver<S>> {
        let abort_after_files = std::env::var(FAILPOINT_ENV)
            .ok()
            .and_then(|v| v.strip_prefix("after_file:")?.parse().ok());
        let loc = cfg.location_or_default(data_dir);
        let target = Target::open(&loc, data_dir)?;
        Ok(Archiver {
            cfg,
            target,
            src,
            streams: BTreeMap::new(),
            stats: Arc::new(ArchiveStats::default()),
            abort_after_files,
            carry: Vec::new(),
        })
    }

    pub fn stats(&self) -> Arc<ArchiveStats> {
        self.stats.clone()
    }

    pub fn source_mut(&mut self) -> &mut S {
        &mut self.src
    }

    /// The source back (to close it after a last `poll(true)`).
    pub fn into_source(self) -> S {
        self.src
    }

    /// Reads every stream to its current end, writing ranges as they fill. With `flush`,
    /// also writes what is buffered (a clean stop, or a bench's last step).
    pub fn poll(&mut self, flush: bool) -> anyhow::Result<()> {
        let mut first_err = None;
        let streams = self.src.streams()?;
        for s in self.src.revoked() {
            // Another archiver owns it now: what was read is dropped, not committed.
            if self.streams.remove(&s).is_some() {
                tracing::info!(stream = %s, "archive: stream revoked; its open range is dropped");
            }
        }
        self.streams.retain(|s, _| streams.contains(s));
        for s in streams {
            if let Err(e) = self.poll_stream(&s, flush) {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(stream = %s, error = %format!("{e:#}"), "archiving failed; retrying from the committed position");
                // Start over from the committed position and the intent.
                self.streams.remove(&s);
                first_err.get_or_insert(e);
            }
        }
        self.update_pending();
        first_err.map_or(Ok(()), Err)
    }

    fn update_pending(&self) {
        let rows = self.streams.values().map(|st| st.rows).sum();
        let age = self
            .streams
            .values()
            .filter_map(|st| st.started)
            .map(|t| t.elapsed().as_millis() as u64)
            .max()
            .unwrap_or(0);
        self.stats.pending_rows.store(rows, Ordering::Relaxed);
        self.stats.pending_age_ms.store(age, Ordering::Relaxed);
    }

    fn init_stream(&mut self, s: &str) -> anyhow::Result<()> {
        if self.streams.contains_key(s) {
            return Ok(());
        }
        let from = self.src.committed(s)?;
        self.src.seek(s, from)?;
        self.target
            .reset_staging(s)
            .with_context(|| format!("emptying {}", self.target.staging(s).display()))?;
        let redo_to = match self.target.read_intent(s)? {
            Some((f, to)) if f == from => Some(to),
            _ => None,
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
                rows: 0,
                parts: BTreeMap::new(),
                redo_to,
            },
        );
        Ok(())
    }

    fn poll_stream(&mut self, s: &str, flush: bool) -> anyhow::Result<()> {
        self.init_stream(s)?;
        let roll_age = Duration::from_secs(self.cfg.roll_secs);
        while let Some((pos, after, bytes)) = self.src.next(s)? {
            let st = self.streams.get_mut(s).expect("initialised");
            let r = decode_value(bytes).with_context(|| format!("{s}: record at {pos}"))?;
            let hour = hour_start(r.click.ts_ms);
            let len = bytes.len() as u64;
            let open = st.parts.contains_key(&hour);
            if !open && st.redo_to.is_none() && st.parts.len() >= self.cfg.open_files_max {
                // Close the range before this record; keep its bytes across the cut.
                let mut carry = std::mem::take(&mut self.carry);
                carry.clear();
                carry.extend_from_slice(bytes);
                self.write_range(s)?;
                let r = decode_value(&carry).expect("decoded above");
                self.open_part(s, hour)?.push(&r, pos, s)?;
                self.carry = carry;
                self.after_record(s, after, len, roll_age)?;
                continue;
            }
            if !open {
                let path = self.target.staging(s).join(format!("{hour}.parquet.tmp"));
                st.parts
                    .insert(hour, PartFile::create(&path, self.cfg.row_group_rows)?);
            }
            let part = st.parts.get_mut(&hour).expect("opened");
            part.push(&r, pos, s)?;
            self.after_record(s, after, len, roll_age)?;
        }
        let st = self.streams.get(s).expect("initialised");
        let old = st.started.is_some_and(|t| t.elapsed() >= roll_age);
        if st.redo_to.is_none() && (flush || old) {
            self.write_range(s)?;
        }
        Ok(())
    }

    fn open_part(&mut self, s: &str, hour: u64) -> anyhow::Result<&mut PartFile> {
        let path = self.target.staging(s).join(format!("{hour}.parquet.tmp"));
        let st = self.streams.get_mut(s).expect("initialised");
        Ok(match st.parts.entry(hour) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert(PartFile::create(&path, self.cfg.row_group_rows)?)
            }
        })
    }

    #[inline]
    fn after_record(
        &mut self,
        s: &str,
        after: u64,
        len: u64,
        roll_age: Duration,
    ) -> anyhow::Result<()> {
        let st = self.streams.get_mut(s).expect("initialised");
        st.bytes += len;
        st.rows += 1;
        st.to = after;
        let started = *st.started.get_or_insert_with(Instant::now);
        let done = match st.redo_to {
            Some(t) => after >= t,
            None => {
                st.bytes >= self.cfg.roll_bytes
                    || (st.rows.is_multiple_of(AGE_CHECK_ROWS) && started.elapsed() >= roll_age)
            }
        };
        if done {
            self.write_range(s)?;
        }
        Ok(())
    }

    /// Finishes the open files of `s`, publishes them under the range's name, commits.
    fn write_range(&mut self, s: &str) -> anyhow::Result<()> {
        let st = self.streams.get_mut(s).expect("initialised");
        if st.parts.is_empty() {
            return Ok(());
        }
        let (from, to) = (st.from, st.to);
        let parts = std::mem::take(&mut st.parts);
        let hours = parts.len();
        self.target.write_intent(s, from, to)?;
        let name = file_name(s, from, to);
        let mut rows_total = 0u64;
        for (hour, part) in parts {
            rows_total += part.rows();
            let (tmp, len) = part.finish(s)?;
            self.target.publish(&tmp, hour, &name)?;
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
            hours,
            "archive range written"
        );
        let st = self.streams.get_mut(s).expect("initialised");
        st.from = to;
        st.started = None;
        st.bytes = 0;
        st.rows = 0;
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
        let poll = Duration::from_millis(cfg.poll_ms);
        let mut a = Archiver::new(cfg, data_dir, src)?;
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

    /// Writes everything buffered and read so far, commits, and stops (docs/operations.md).
    pub fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("archiver thread panicked"))?
    }
}
