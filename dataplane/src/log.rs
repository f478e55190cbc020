//! The durable local log: one writer per core, on glommio with O_DIRECT, group commit.
//!
//! The embedded stand-in for Kafka `raw_clicks`. Core `k` appends accepted raw records to
//! `<data_dir>/log/core-<k>/`, in the segment format of [`clickgate_proto::segment`] (read
//! there by the controlplane, archiver and replay with `LogReader`).
//!
//! Shape:
//! - [`CoreLog::append_with`] frames a record in place in the *fill* buffer (a `Vec`
//!   allocated once, `buffer_bytes_max` plus one block) and wakes the commit task. No await,
//!   no allocation. The fill buffer starts with a copy of the last partial block already
//!   on disk, so each commit rewrites that block whole (same prefix, more frames).
//! - The commit task swaps the fill buffer with the spare one, copies it into DMA buffers
//!   (up to 1 MiB each, all in flight at once; buffers of the same size reused), writes
//!   whole blocks at block-aligned offsets, fdatasyncs, then advances the durable LSN and wakes the
//!   `durable` waiters (a heap ordered by LSN). Records appended meanwhile form the next
//!   group. Commits start at least `commit_interval_us` apart, so a light but steady load
//!   is still grouped; an idle log commits the first record at once.
//! - Rotation: a frame that would take the segment past `segment_bytes` starts a new one.
//!   The old one is written and fdatasync'd first; the new one is created as `*.tmp`,
//!   given its header, fdatasync'd, renamed and the directory fsync'd. Retention deletes
//!   the oldest sealed segments (never the active one) past `retention_bytes` or older
//!   than `retention_secs` (by the time they were sealed, or mtime after a restart).
//! - Opening scans the newest segment (std::fs, at start-up), truncates any torn tail left
//!   by a crash (logged and counted), and continues appending after the last whole frame.
//!
//! A transient I/O error — disk or quota full, out of descriptors, a short write — stalls
//! the log: the commit task keeps the records it took and retries the same writes (the
//! same blocks at the same offsets, from the run it stopped at) with a backoff of
//! `STALL_BACKOFF_MIN`..`STALL_BACKOFF_MAX`, while `append_with` is refused and `durable`
//! fails at once (the caller answers 503, `/readyz` is not ready). The first success clears
//! the stall: the box recovers by itself when space or descriptors return, and nothing it
//! acknowledged is lost (records of requests answered 503 may still be written; a client
//! retry of them is then a logged duplicate). Any other I/O error stops the log for good:
//! every later `append_with` is refused and every `durable` call fails.

use std::cell::RefCell;
use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, VecDeque};
use std::future::{poll_fn, Future};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant, SystemTime};

use clickgate_proto::fsutil::is_transient;
use clickgate_proto::segment::{
    self, SegmentHeader, BLOCK_BYTES, FRAME_HEADER_BYTES, FRAME_PAYLOAD_MAX, HEADER_BYTES,
};
use glommio::io::{Directory, DmaBuffer, DmaFile, OpenOptions};

/// The largest single write; larger commits are split.
const WRITE_CHUNK_BYTES_MAX: usize = 1 << 20;
/// Free DMA buffers kept for reuse, at most.
const POOL_BUFFERS_MAX: usize = 8;
/// How often an idle log checks time-based retention.
const RETENTION_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Waiters and rotations preallocated, so steady state does not grow them.
const WAITERS_INITIAL: usize = 4096;
const RUNS_INITIAL: usize = 16;
/// Backoff between retries of a stalled commit (doubling).
const STALL_BACKOFF_MIN: Duration = Duration::from_millis(10);
const STALL_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// A log that is closing stops retrying a stalled write after this long (the error is
/// then final; what it held was answered 503, or with `ack = memory` was never promised).
const STALL_CLOSING_MAX: Duration = Duration::from_secs(5);
/// A segment holds at least its header and one block of frames.
const SEGMENT_BYTES_MIN: u64 = HEADER_BYTES + BLOCK_BYTES as u64;

const _: () = assert!(WRITE_CHUNK_BYTES_MAX.is_power_of_two() && BLOCK_BYTES.is_power_of_two());
const _: () = assert!(WRITE_CHUNK_BYTES_MAX >= BLOCK_BYTES);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogConfig {
    /// Bytes appended but not yet written to disk, at most; past it `append_with` fails.
    pub buffer_bytes_max: usize,
    pub segment_bytes: u64,
    /// Oldest segments are deleted past either bound (0 = no bound of that kind).
    pub retention_bytes: u64,
    pub retention_secs: u64,
    /// Commits start at least this far apart, in microseconds (0 = back to back).
    pub commit_interval_us: u64,
    /// 0: every commit is fdatasync'd (`ack = disk | kafka`: answers wait for it).
    /// Otherwise (`ack = memory`) commits only write, and the log is fdatasync'd at most
    /// this many milliseconds after a write: what a power loss can take.
    pub sync_interval_ms: u64,
}

impl LogConfig {
    pub fn from_dataplane(c: &crate::DataplaneConfig) -> LogConfig {
        LogConfig {
            buffer_bytes_max: c.log_buffer_bytes_max,
            segment_bytes: c.log_segment_bytes,
            retention_bytes: c.log_retention_bytes,
            retention_secs: c.log_retention_secs,
            commit_interval_us: c.log_commit_interval_us,
            sync_interval_ms: match c.ack {
                crate::AckMode::Memory => c.log_memory_sync_interval_ms.max(1),
                crate::AckMode::Disk | crate::AckMode::Kafka => 0,
            },
        }
    }

    fn check(&self) -> io::Result<()> {
        let bad = |what: String| Err(io::Error::new(io::ErrorKind::InvalidInput, what));
        if self.segment_bytes < SEGMENT_BYTES_MIN {
            return bad(format!(
                "log segment_bytes must be at least {SEGMENT_BYTES_MIN}"
            ));
        }
        if self.buffer_bytes_max < BLOCK_BYTES {
            return bad(format!(
                "log buffer_bytes_max must be at least {BLOCK_BYTES}"
            ));
        }
        Ok(())
    }
}

/// The record cannot be taken now: the unwritten bytes would pass `buffer_bytes_max`, or
/// the log is closing or failed. The caller answers 503.
#[derive(Debug, thiserror::Error)]
#[error("log buffer full")]
pub struct LogFull;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogStats {
    pub appended_records: u64,
    /// Frame bytes (headers included) appended.
    pub appended_bytes: u64,
    pub commits: u64,
    /// Time spent in the O_DIRECT writes of all commits.
    pub write_nanos_sum: u64,
    pub fsync_nanos_sum: u64,
    pub fsync_count: u64,
    /// Segments on disk, the active one included.
    pub segments: u64,
    pub segments_deleted: u64,
    pub bytes_on_disk: u64,
    /// Torn bytes cut from the tail when the log was opened.
    pub torn_bytes_truncated: u64,
    pub append_lsn: u64,
    pub durable_lsn: u64,
    pub failed: bool,
    /// A transient write error is being retried (appends refused meanwhile).
    pub stalled: bool,
    /// Commits that hit a transient error and were retried until they succeeded.
    pub stalls: u64,
}

/// A stretch of the fill buffer that goes to one segment from a block-aligned offset.
#[derive(Clone, Copy, Debug)]
struct Run {
    seg_base: u64,
    file_off: u64,
    /// Index in `Fill::bytes` where the run starts; it ends where the next one starts.
    start: usize,
}

struct Fill {
    bytes: Vec<u8>,
    runs: Vec<Run>,
}

impl Fill {
    fn with_capacity(bytes: usize) -> Fill {
        Fill {
            bytes: Vec::with_capacity(bytes),
            runs: Vec::with_capacity(RUNS_INITIAL),
        }
    }
}

struct Waiter {
    lsn: u64,
    waker: Waker,
}

impl PartialEq for Waiter {
    fn eq(&self, o: &Self) -> bool {
        self.lsn == o.lsn
    }
}
impl Eq for Waiter {}
impl PartialOrd for Waiter {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Waiter {
    fn cmp(&self, o: &Self) -> Ordering {
        self.lsn.cmp(&o.lsn)
    }
}

/// State shared by the handles and the commit task (same thread, never across an await).
struct Inner {
    cfg: LogConfig,
    fill: Fill,
    /// The other buffer, owned by the commit task while it writes it.
    spare: Option<Fill>,
    /// Base LSN of the segment the appender is filling.
    seg_base: u64,
    append_lsn: u64,
    /// Taken by the commit task / written to disk / fdatasync'd, up to these LSNs.
    taken_lsn: u64,
    written_lsn: u64,
    durable_lsn: u64,
    committer: Option<Waker>,
    waiters: BinaryHeap<Reverse<Waiter>>,
    failed: Option<(io::ErrorKind, String)>,
    /// A transient error the commit task is retrying (see the module docs).
    stalled: Option<String>,
    closing: bool,
    stopped: bool,
    close_waiters: Vec<Waker>,
    stats: LogStats,
    /// The log is over `retention_bytes` and the oldest segment is still needed by a
    /// consumer (`proto::cursor::min_cursor`): appends are refused until it moves on.
    held_by_consumers: bool,
}

impl Inner {
    fn failure(&self) -> Option<io::Error> {
        if let Some(m) = &self.stalled {
            return Some(io::Error::other(format!(
                "local log not writable (retrying): {m}"
            )));
        }
        self.failed
            .as_ref()
            .map(|(k, m)| io::Error::new(*k, format!("local log failed: {m}")))
    }

    fn wake_durable(&mut self) {
        while let Some(Reverse(w)) = self.waiters.peek() {
            if w.lsn > self.durable_lsn
                && self.failed.is_none()
                && self.stalled.is_none()
                && !self.stopped
            {
                break;
            }
            let Reverse(w) = self.waiters.pop().expect("peeked");
            w.waker.wake();
        }
    }
}

/// One core's log. Cheap to clone; every clone is the same log.
#[derive(Clone)]
pub struct CoreLog {
    inner: Rc<RefCell<Inner>>,
}

impl CoreLog {
    /// Opens or creates `dir`, truncates a torn tail left by a crash (logged, counted in
    /// `torn_bytes_truncated`), and spawns the commit task on the current executor.
    /// Start-up only: it reads the newest segment with blocking std::fs calls.
    pub async fn open(dir: PathBuf, core: usize, cfg: LogConfig) -> io::Result<CoreLog> {
        cfg.check()?;
        create_dir_durable(&dir)?;
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "tmp") {
                std::fs::remove_file(&path)?; // a segment whose creation a crash interrupted
            }
        }
        let dir_handle = Directory::open(&dir).await?;
        let mut segs = segment::list_segments(&dir)?;
        let mut stats = LogStats::default();
        let (active, active_base, data_end) = match segs.pop() {
            Some((base, path)) => {
                let scan = segment::scan_segment(&path)?;
                if scan.header.core as usize != core {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "{}: written by core {}, not {core}",
                            path.display(),
                            scan.header.core
                        ),
                    ));
                }
                if scan.file_len != scan.data_end {
                    let f = std::fs::OpenOptions::new().write(true).open(&path)?;
                    f.set_len(scan.data_end)?;
                    f.sync_all()?;
                }
                if scan.torn_bytes > 0 {
                    tracing::warn!(
                        core,
                        segment = %path.display(),
                        torn_bytes = scan.torn_bytes,
                        data_end = scan.data_end,
                        "local log: truncated a torn tail"
                    );
                }
                stats.torn_bytes_truncated = scan.torn_bytes;
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .dma_open(&path)
                    .await?;
                preallocate(&file, cfg.segment_bytes).await;
                (file, base, scan.data_end)
            }
            None => {
                let file = create_segment(&dir, &dir_handle, core, 0, cfg.segment_bytes).await?;
                (file, 0, HEADER_BYTES)
            }
        };
        if active.alignment() as usize > BLOCK_BYTES {
            return Err(io::Error::other(format!(
                "{}: O_DIRECT alignment {} is over {BLOCK_BYTES}",
                dir.display(),
                active.alignment()
            )));
        }
        let mut sealed = VecDeque::with_capacity(segs.len() + RUNS_INITIAL);
        for (base, path) in segs {
            let meta = std::fs::metadata(&path)?;
            sealed.push_back(Sealed {
                base,
                path,
                bytes: meta.len(),
                sealed_at: meta.modified()?,
            });
        }
        let append_lsn = active_base + (data_end - HEADER_BYTES);
        let mut fill = Fill::with_capacity(cfg.buffer_bytes_max + BLOCK_BYTES);
        let tail_off = align_down(data_end);
        fill.bytes.resize((data_end - tail_off) as usize, 0);
        std::fs::File::open(dir.join(segment::segment_file_name(active_base)))?
            .read_exact_at(&mut fill.bytes, tail_off)?;
        fill.runs.push(Run {
            seg_base: active_base,
            file_off: tail_off,
            start: 0,
        });

        stats.segments = sealed.len() as u64 + 1;
        stats.append_lsn = append_lsn;
        stats.durable_lsn = append_lsn;
        let inner = Rc::new(RefCell::new(Inner {
            spare: Some(Fill::with_capacity(cfg.buffer_bytes_max + BLOCK_BYTES)),
            cfg: cfg.clone(),
            fill,
            seg_base: active_base,
            append_lsn,
            taken_lsn: append_lsn,
            written_lsn: append_lsn,
            durable_lsn: append_lsn,
            committer: None,
            waiters: BinaryHeap::with_capacity(WAITERS_INITIAL),
            failed: None,
            stalled: None,
            closing: false,
            stopped: false,
            close_waiters: Vec::new(),
            stats,
            held_by_consumers: false,
        }));
        let committer = Committer {
            inner: inner.clone(),
            cfg,
            core,
            dir,
            dir_handle,
            active,
            active_base,
            active_end: data_end,
            sealed,
            pool: Vec::with_capacity(POOL_BUFFERS_MAX),
            chunks: Vec::new(),
            last_retention_check: Instant::now(),
            last_sync: Instant::now(),
        };
        committer.refresh_disk_stats();
        glommio::spawn_local(committer.run()).detach();
        Ok(CoreLog { inner })
    }

    /// Reserves a frame for a `len`-byte payload (1..=FRAME_PAYLOAD_MAX), lets `fill` write
    /// the payload in place, and returns the LSN just past this record. `fill` must not
    /// call back into this log.
    pub fn append_with(&self, len: usize, fill: impl FnOnce(&mut [u8])) -> Result<u64, LogFull> {
        assert!(
            len > 0 && len <= FRAME_PAYLOAD_MAX,
            "log record of {len} bytes"
        );
        let mut guard = self.inner.borrow_mut();
        let i = &mut *guard;
        let frame = FRAME_HEADER_BYTES + len;
        if i.failed.is_some()
            || i.stalled.is_some()
            || i.closing
            || i.held_by_consumers
            || i.append_lsn + frame as u64 - i.written_lsn > i.cfg.buffer_bytes_max as u64
        {
            return Err(LogFull);
        }
        let used = i.append_lsn - i.seg_base;
        if used > 0 && HEADER_BYTES + used + frame as u64 > i.cfg.segment_bytes {
            let start = i.fill.bytes.len();
            i.fill.runs.push(Run {
                seg_base: i.append_lsn,
                file_off: HEADER_BYTES,
                start,
            });
            i.seg_base = i.append_lsn;
        }
        let at = i.fill.bytes.len();
        debug_assert!(
            at + frame <= i.fill.bytes.capacity(),
            "fill buffer never grows"
        );
        i.fill.bytes.resize(at + frame, 0);
        let (head, payload) = i.fill.bytes[at..].split_at_mut(FRAME_HEADER_BYTES);
        fill(payload);
        segment::put_frame_header(head, payload);
        i.append_lsn += frame as u64;
        i.stats.appended_records += 1;
        i.stats.appended_bytes += frame as u64;
        if let Some(w) = i.committer.take() {
            w.wake();
        }
        Ok(i.append_lsn)
    }

    /// Resolves when every record up to `lsn` is written and fdatasync'd. Fails if the log
    /// failed (and so does every later call) or is stalled (until it recovers).
    pub async fn durable(&self, lsn: u64) -> io::Result<()> {
        poll_fn(|cx| {
            let mut i = self.inner.borrow_mut();
            if i.durable_lsn >= lsn {
                return Poll::Ready(Ok(()));
            }
            if let Some(e) = i.failure() {
                return Poll::Ready(Err(e));
            }
            if i.stopped {
                return Poll::Ready(Err(io::Error::other(format!(
                    "local log closed before LSN {lsn} was durable"
                ))));
            }
            i.waiters.push(Reverse(Waiter {
                lsn,
                waker: cx.waker().clone(),
            }));
            Poll::Pending
        })
        .await
    }

    /// True when `bytes` of framed records can be appended now, one after the other,
    /// without `append_with` refusing any (nothing else appends in between: the caller
    /// does not yield). The bound is on what is not yet written: with `ack = memory` the
    /// periodic sync lets durability lag by design.
    pub fn can_append(&self, bytes: usize) -> bool {
        let i = self.inner.borrow();
        i.failed.is_none()
            && i.stalled.is_none()
            && !i.closing
            && !i.held_by_consumers
            && i.append_lsn + bytes as u64 - i.written_lsn <= i.cfg.buffer_bytes_max as u64
    }

    /// Bytes appended but not yet durable.
    pub fn pending_bytes(&self) -> usize {
        let i = self.inner.borrow();
        (i.append_lsn - i.durable_lsn) as usize
    }

    /// The LSN the next record will get.
    pub fn append_lsn(&self) -> u64 {
        self.inner.borrow().append_lsn
    }

    /// True once an I/O error stopped the log, or while a transient one is retried (for
    /// /readyz and the 503 reason).
    pub fn failed(&self) -> bool {
        let i = self.inner.borrow();
        i.failed.is_some() || i.stalled.is_some()
    }

    pub fn stats(&self) -> LogStats {
        let i = self.inner.borrow();
        LogStats {
            append_lsn: i.append_lsn,
            durable_lsn: i.durable_lsn,
            failed: i.failed.is_some(),
            stalled: i.stalled.is_some(),
            ..i.stats
        }
    }

    /// Refuses new records, writes and fdatasyncs everything appended, stops the commit task.
    pub async fn close(&self) -> io::Result<()> {
        {
            let mut i = self.inner.borrow_mut();
            i.closing = true;
            if let Some(w) = i.committer.take() {
                w.wake();
            }
        }
        poll_fn(|cx| {
            let mut i = self.inner.borrow_mut();
            if !i.stopped {
                i.close_waiters.push(cx.waker().clone());
                return Poll::Pending;
            }
            Poll::Ready(i.failure().map_or(Ok(()), Err))
        })
        .await
    }
}

struct Sealed {
    base: u64,
    path: PathBuf,
    bytes: u64,
    sealed_at: SystemTime,
}

/// The commit task's own state: files and DMA buffers never leave it.
struct Committer {
    inner: Rc<RefCell<Inner>>,
    cfg: LogConfig,
    core: usize,
    dir: PathBuf,
    dir_handle: Directory,
    active: DmaFile,
    active_base: u64,
    /// File offset just past the last frame written to the active segment.
    active_end: u64,
    sealed: VecDeque<Sealed>,
    /// Free DMA buffers, reused when a write has the same size (most recent last).
    pool: Vec<Rc<DmaBuffer>>,
    /// The chunks of the write in flight (kept for its allocation).
    chunks: Vec<(Rc<DmaBuffer>, u64)>,
    last_retention_check: Instant,
    /// When the log was last fdatasync'd (for `sync_interval_ms`).
    last_sync: Instant,
}

impl Committer {
    async fn run(mut self) {
        let result = self.run_loop().await;
        // Partial moves: the files are closed, the rest of `self` is still ours.
        let closed = match self.active.close().await {
            Ok(()) => self.dir_handle.close().await.map_err(io::Error::from),
            Err(e) => Err(e.into()),
        };
        let mut i = self.inner.borrow_mut();
        if let Err(e) = result.and(closed) {
            tracing::error!(core = self.core, dir = %self.dir.display(), error = %e, "local log failed");
            i.failed = Some((e.kind(), e.to_string()));
        }
        i.stopped = true;
        i.stats.failed = i.failed.is_some();
        i.wake_durable();
        for w in i.close_waiters.drain(..) {
            w.wake();
        }
    }

    async fn run_loop(&mut self) -> io::Result<()> {
        let interval = Duration::from_micros(self.cfg.commit_interval_us);
        let mut last_commit: Option<Instant> = None;
        loop {
            self.wait_for_work().await;
            if self.sync_due(false) {
                self.sync().await?;
            }
            let (pending, closing) = {
                let i = self.inner.borrow();
                (i.append_lsn > i.taken_lsn, i.closing)
            };
            if pending {
                if let Some(since) = last_commit.map(|t| t.elapsed()).filter(|&e| e < interval) {
                    if !closing {
                        glommio::timer::sleep(interval - since).await;
                    }
                }
                last_commit = Some(Instant::now());
                self.commit().await?;
            }
            self.enforce_retention(pending).await;
            let done = {
                let i = self.inner.borrow();
                i.closing && i.append_lsn == i.taken_lsn
            };
            if done {
                if self.sync_due(true) {
                    self.sync().await?;
                }
                return Ok(());
            }
        }
    }

    /// Whether written records wait for a periodic fdatasync (`sync_interval_ms`) that is
    /// due now (`force`: due whatever the time, e.g. at close).
    fn sync_due(&self, force: bool) -> bool {
        let i = self.inner.borrow();
        i.written_lsn > i.durable_lsn
            && (force
                || self.last_sync.elapsed() >= Duration::from_millis(self.cfg.sync_interval_ms))
    }

    /// fdatasyncs what is written: everything written is durable.
    async fn sync(&mut self) -> io::Result<()> {
        let t = Instant::now();
        let mut backoff = STALL_BACKOFF_MIN;
        loop {
            match self.active.fdatasync().await.map_err(io::Error::from) {
                Err(e) if is_transient(&e) && !self.give_up(t) => {
                    self.stall(&e, backoff).await;
                    backoff = (backoff * 2).min(STALL_BACKOFF_MAX);
                }
                r => {
                    self.unstall();
                    r?;
                    break;
                }
            }
        }
        self.last_sync = Instant::now();
        let mut i = self.inner.borrow_mut();
        i.durable_lsn = i.written_lsn;
        i.stats.fsync_count += 1;
        i.stats.fsync_nanos_sum += t.elapsed().as_nanos() as u64;
        i.wake_durable();
        Ok(())
    }

    /// Marks the log stalled on `e` (appends refused, waiters failed: 503 and not ready),
    /// lets retention free what it may, and waits `backoff` before the caller retries.
    async fn stall(&mut self, e: &io::Error, backoff: Duration) {
        {
            let mut i = self.inner.borrow_mut();
            if i.stalled.is_none() {
                tracing::error!(core = self.core, dir = %self.dir.display(), error = %e,
                    "local log: write failed; refusing appends and retrying until it succeeds");
                i.stats.stalls += 1;
            }
            i.stalled = Some(e.to_string());
            i.wake_durable();
        }
        self.enforce_retention(false).await;
        glommio::timer::sleep(backoff).await;
    }

    /// A closing log retrying since `started` for longer than `STALL_CLOSING_MAX`.
    fn give_up(&self, started: Instant) -> bool {
        self.inner.borrow().closing && started.elapsed() > STALL_CLOSING_MAX
    }

    fn unstall(&mut self) {
        let mut i = self.inner.borrow_mut();
        if i.stalled.take().is_some() {
            tracing::warn!(core = self.core, dir = %self.dir.display(), "local log: writable again");
        }
    }

    /// Until there is something to write, the log is closing, or a retention check is due.
    async fn wait_for_work(&self) {
        let work = poll_fn(|cx| {
            let mut i = self.inner.borrow_mut();
            if i.append_lsn > i.taken_lsn || i.closing {
                return Poll::Ready(());
            }
            i.committer = Some(cx.waker().clone());
            Poll::Pending
        });
        let unsynced = {
            let i = self.inner.borrow();
            i.written_lsn > i.durable_lsn
        };
        if unsynced {
            // Periodic sync (`ack = memory`): wake when it is due.
            let due = Duration::from_millis(self.cfg.sync_interval_ms)
                .saturating_sub(self.last_sync.elapsed());
            futures_lite::future::or(work, glommio::timer::sleep(due)).await;
        } else if self.cfg.retention_secs > 0 || self.inner.borrow().held_by_consumers {
            futures_lite::future::or(work, glommio::timer::sleep(RETENTION_CHECK_INTERVAL)).await;
        } else {
            work.await;
        }
    }

    /// Writes everything appended so far and fdatasyncs it (every commit, or when the
    /// periodic sync is due): one group commit.
    async fn commit(&mut self) -> io::Result<()> {
        let (taken, end_lsn) = self.take_fill();
        let sync = self.cfg.sync_interval_ms == 0
            || self.last_sync.elapsed() >= Duration::from_millis(self.cfg.sync_interval_ms)
            || self.inner.borrow().closing;
        // Runs already written whole (a retry resumes after them).
        let mut done_runs = 0;
        let mut backoff = STALL_BACKOFF_MIN;
        let started = Instant::now();
        let result = loop {
            match self.write_group(&taken, sync, &mut done_runs).await {
                Err(e) if is_transient(&e) && !self.give_up(started) => {
                    self.stall(&e, backoff).await;
                    backoff = (backoff * 2).min(STALL_BACKOFF_MAX);
                }
                r => break r,
            }
        };
        self.unstall();
        let mut i = self.inner.borrow_mut();
        i.spare = Some(taken);
        let (write_nanos, fsync_nanos) = result?;
        i.written_lsn = end_lsn;
        i.stats.commits += 1;
        if sync {
            self.last_sync = Instant::now();
            i.durable_lsn = end_lsn;
            i.stats.fsync_count += 1;
        }
        i.stats.fsync_nanos_sum += fsync_nanos;
        i.stats.write_nanos_sum += write_nanos;
        i.wake_durable();
        drop(i);
        self.refresh_disk_stats();
        Ok(())
    }

    /// Swaps the fill buffer for the spare one, which starts with the last partial block.
    fn take_fill(&mut self) -> (Fill, u64) {
        let mut guard = self.inner.borrow_mut();
        let i = &mut *guard;
        let spare = i
            .spare
            .take()
            .expect("the spare buffer is back after each commit");
        let taken = std::mem::replace(&mut i.fill, spare);
        let last = *taken.runs.last().expect("a fill has a run");
        let end_off = last.file_off + (taken.bytes.len() - last.start) as u64;
        let tail_off = align_down(end_off);
        let carried = (end_off - tail_off) as usize;
        i.fill.bytes.clear();
        i.fill.runs.clear();
        i.fill
            .bytes
            .extend_from_slice(&taken.bytes[taken.bytes.len() - carried..]);
        i.fill.runs.push(Run {
            seg_base: last.seg_base,
            file_off: tail_off,
            start: 0,
        });
        i.taken_lsn = i.append_lsn;
        (taken, i.append_lsn)
    }

    /// Writes every run of `fill` (rotating segments between runs), then fdatasyncs the
    /// active segment. Returns the write and fdatasync times in nanoseconds.
    /// Runs before `*done_runs` are skipped (written by an earlier try); it is advanced
    /// past each run written whole, so a retry after an error resumes where it stopped.
    async fn write_group(
        &mut self,
        fill: &Fill,
        sync: bool,
        done_runs: &mut usize,
    ) -> io::Result<(u64, u64)> {
        let t = Instant::now();
        for (k, run) in fill.runs.iter().enumerate().skip(*done_runs) {
            let end = fill.runs.get(k + 1).map_or(fill.bytes.len(), |r| r.start);
            if run.seg_base != self.active_base {
                self.rotate(run.seg_base).await?;
            }
            if end > run.start {
                self.write_blocks(&fill.bytes[run.start..end], run.file_off)
                    .await?;
                self.active_end = run.file_off + (end - run.start) as u64;
            }
            *done_runs = k + 1;
        }
        let write_nanos = t.elapsed().as_nanos() as u64;
        if !sync {
            return Ok((write_nanos, 0));
        }
        let t = Instant::now();
        self.active.fdatasync().await?;
        Ok((write_nanos, t.elapsed().as_nanos() as u64))
    }

    /// Writes `bytes` at block-aligned `off`, zero padded to whole blocks, in chunks of
    /// at most `WRITE_CHUNK_BYTES_MAX` that are all in flight at once: a chunk's
    /// completion is only seen when the reactor polls its ring, which under load is once
    /// per pass over every ready task, so chunks awaited one after the other cost one
    /// pass each (measured: 1 MiB per ≈ 10 ms pass at 500 k events/s, 100 MB/s, the log
    /// falling behind its own core), while concurrent chunks cost one pass per commit.
    async fn write_blocks(&mut self, bytes: &[u8], off: u64) -> io::Result<()> {
        debug_assert_eq!(off % BLOCK_BYTES as u64, 0);
        let total = bytes.len().next_multiple_of(BLOCK_BYTES);
        let mut chunks = std::mem::take(&mut self.chunks);
        chunks.clear();
        let mut done = 0;
        while done < total {
            let size = (total - done).min(WRITE_CHUNK_BYTES_MAX);
            let mut buf = match self.pool.iter().position(|b| b.len() == size) {
                Some(k) => self.pool.swap_remove(k),
                None => Rc::new(self.active.alloc_dma_buffer(size)),
            };
            let n = size.min(bytes.len() - done);
            let dst = Rc::get_mut(&mut buf)
                .expect("pooled buffers are not shared")
                .as_bytes_mut();
            dst[..n].copy_from_slice(&bytes[done..done + n]);
            dst[n..].fill(0);
            chunks.push((buf, off + done as u64));
            done += size;
        }
        let file = &self.active;
        let mut writes: Vec<_> = chunks
            .iter()
            .map(|(buf, at)| Some(Box::pin(file.write_rc_at(buf.clone(), *at))))
            .collect();
        let mut outcome: io::Result<()> = Ok(());
        poll_fn(|cx| {
            let mut pending = false;
            for (w, (buf, _)) in writes.iter_mut().zip(&chunks) {
                let Some(f) = w else { continue };
                match f.as_mut().poll(cx) {
                    Poll::Pending => pending = true,
                    Poll::Ready(r) => {
                        *w = None;
                        let failed = match r {
                            Err(e) => Some(io::Error::from(e)),
                            Ok(written) if written != buf.len() => Some(io::Error::new(
                                io::ErrorKind::WriteZero,
                                format!(
                                    "short write: {written} of {} bytes (disk full?)",
                                    buf.len()
                                ),
                            )),
                            Ok(_) => None,
                        };
                        if let (Some(e), Ok(())) = (failed, &outcome) {
                            outcome = Err(e);
                        }
                    }
                }
            }
            if pending {
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await;
        drop(writes);
        for (buf, _) in chunks.drain(..) {
            if Rc::strong_count(&buf) == 1 {
                if self.pool.len() == POOL_BUFFERS_MAX {
                    self.pool.remove(0);
                }
                self.pool.push(buf);
            }
        }
        self.chunks = chunks;
        outcome
    }

    /// Seals the active segment (written and fdatasync'd) and starts one at `base`.
    async fn rotate(&mut self, base: u64) -> io::Result<()> {
        self.active.fdatasync().await?;
        // Sealed segments keep only their data (the preallocated rest goes back).
        self.active
            .truncate(self.active_end.next_multiple_of(BLOCK_BYTES as u64))
            .await?;
        let file = create_segment(
            &self.dir,
            &self.dir_handle,
            self.core,
            base,
            self.cfg.segment_bytes,
        )
        .await?;
        let old = std::mem::replace(&mut self.active, file);
        old.close().await?;
        self.sealed.push_back(Sealed {
            base: self.active_base,
            path: self.dir.join(segment::segment_file_name(self.active_base)),
            bytes: self.active_end.next_multiple_of(BLOCK_BYTES as u64),
            sealed_at: SystemTime::now(),
        });
        self.active_base = base;
        self.active_end = HEADER_BYTES;
        self.inner.borrow_mut().stats.segments += 1;
        self.refresh_disk_stats();
        Ok(())
    }

    /// Deletes the oldest sealed segments past the size or age bound. A failed delete is
    /// logged, not fatal: the data is safe, only space is not reclaimed.
    async fn enforce_retention(&mut self, committed: bool) {
        let held = self.inner.borrow().held_by_consumers;
        let by_age = (self.cfg.retention_secs > 0 || held)
            && self.last_retention_check.elapsed() >= RETENTION_CHECK_INTERVAL;
        let by_size = committed && self.cfg.retention_bytes > 0;
        if !by_age && !by_size {
            return;
        }
        if by_age {
            self.last_retention_check = Instant::now();
        }
        let max_age = Duration::from_secs(self.cfg.retention_secs);
        let now = SystemTime::now();
        // Read lazily (a few small files), only when a segment is due for deletion.
        let mut kept_for: Option<Option<u64>> = None;
        let mut held_now = false;
        while let Some(oldest) = self.sealed.front() {
            let total = self.disk_bytes();
            let over_size = self.cfg.retention_bytes > 0 && total > self.cfg.retention_bytes;
            let age = now.duration_since(oldest.sealed_at).unwrap_or_default();
            let too_old = self.cfg.retention_secs > 0 && age > max_age;
            if !over_size && !too_old {
                break;
            }
            // A consumer (Kafka forwarder, archiver) that has not passed the end of this
            // segment still needs it: keep it, and refuse new data while over the size bound.
            let end = self.sealed.get(1).map_or(self.active_base, |s| s.base);
            let min = *kept_for.get_or_insert_with(|| self.min_cursor());
            if min.is_some_and(|c| c < end) {
                held_now = over_size;
                break;
            }
            if let Err(e) = glommio::io::remove(&oldest.path).await {
                tracing::warn!(core = self.core, segment = %oldest.path.display(), error = %e, "local log: retention could not delete a segment");
                break;
            }
            tracing::debug!(
                core = self.core,
                base_lsn = oldest.base,
                "local log: retention deleted a segment"
            );
            self.sealed.pop_front();
            let mut i = self.inner.borrow_mut();
            i.stats.segments -= 1;
            i.stats.segments_deleted += 1;
        }
        let mut i = self.inner.borrow_mut();
        if held_now != i.held_by_consumers {
            if held_now {
                tracing::warn!(core = self.core, retention_bytes = self.cfg.retention_bytes, "local log full: a consumer (see <data_dir>/cursors/) has not passed its oldest segment; refusing new records (503)");
            } else {
                tracing::info!(
                    core = self.core,
                    "local log: consumers caught up; taking records again"
                );
            }
            i.held_by_consumers = held_now;
        }
        drop(i);
        self.refresh_disk_stats();
    }

    /// The lowest consumer cursor on this core (`<data_dir>/cursors/*/core-<k>`); the
    /// data dir is two levels above the core's log directory. An unreadable cursor holds
    /// everything (logged): deleting data a consumer may need is the worse failure.
    fn min_cursor(&self) -> Option<u64> {
        let data_dir = self.dir.parent().and_then(Path::parent)?;
        match clickgate_proto::cursor::min_cursor(data_dir, self.core as u32) {
            Ok(min) => min,
            Err(e) => {
                tracing::warn!(core = self.core, error = %e, "local log: cannot read consumer cursors; keeping every segment");
                Some(0)
            }
        }
    }

    fn disk_bytes(&self) -> u64 {
        self.sealed.iter().map(|s| s.bytes).sum::<u64>()
            + self.active_end.next_multiple_of(BLOCK_BYTES as u64)
    }

    fn refresh_disk_stats(&self) {
        let bytes = self.disk_bytes();
        self.inner.borrow_mut().stats.bytes_on_disk = bytes;
    }
}

/// Creates segment `base` durably: `*.tmp`, header, fdatasync, rename, directory fsync.
async fn create_segment(
    dir: &Path,
    dir_handle: &Directory,
    core: usize,
    base: u64,
    segment_bytes: u64,
) -> io::Result<DmaFile> {
    let name = segment::segment_file_name(base);
    let tmp = dir.join(format!("{name}.tmp"));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .dma_open(&tmp)
        .await?;
    let mut head = file.alloc_dma_buffer(HEADER_BYTES as usize);
    let created_ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    SegmentHeader {
        core: core as u32,
        base_lsn: base,
        created_ms,
    }
    .encode(head.as_bytes_mut());
    let written = file.write_at(head, 0).await?;
    if written != HEADER_BYTES as usize {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("short write of segment header: {written}"),
        ));
    }
    preallocate(&file, segment_bytes).await;
    file.fdatasync().await?;
    file.rename(dir.join(&name)).await?;
    dir_handle.sync().await?;
    Ok(file)
}

/// Gives the active segment its full size up front (zeros past the data read as its
/// end), so commits never extend the file: an O_DIRECT write that extends a file cannot
/// complete inline in io_uring (it goes through a kernel worker, milliseconds here) and
/// its fdatasync must also commit the new size. Best effort: a file system without
/// fallocate keeps extending writes.
async fn preallocate(file: &DmaFile, segment_bytes: u64) {
    if let Err(e) = file.pre_allocate(segment_bytes, false).await {
        tracing::debug!(error = %e, "local log: segment not preallocated");
    }
}

/// `create_dir_all`, fsyncing the parent of every directory it creates.
fn create_dir_durable(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dir_durable(parent)?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(e),
    }
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(parent)?.sync_all()
}

fn align_down(off: u64) -> u64 {
    off / BLOCK_BYTES as u64 * BLOCK_BYTES as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use clickgate_proto::segment::LogReader;
    use glommio::{LocalExecutorBuilder, Placement};

    fn run<G, F>(gen: G)
    where
        G: FnOnce() -> F + Send + 'static,
        F: Future<Output = ()> + 'static,
    {
        LocalExecutorBuilder::new(Placement::Unbound)
            .io_memory(512 << 10)
            .spawn(gen)
            .expect("executor")
            .join()
            .expect("test task");
    }

    fn cfg() -> LogConfig {
        LogConfig {
            buffer_bytes_max: 1 << 20,
            segment_bytes: 1 << 20,
            retention_bytes: 0,
            retention_secs: 0,
            commit_interval_us: 0,
            sync_interval_ms: 0,
        }
    }

    /// Record `i`: 1..=700 bytes of a pattern that names it.
    fn record(i: u64) -> Vec<u8> {
        let len = 1 + (i as usize * 131) % 700;
        (0..len).map(|k| (i as usize * 7 + k) as u8).collect()
    }

    fn append(log: &CoreLog, i: u64) -> Result<u64, LogFull> {
        let r = record(i);
        log.append_with(r.len(), |b| b.copy_from_slice(&r))
    }

    /// Reads everything available; checks the records are `first..` in order.
    fn read_check(reader: &mut LogReader, first: u64) -> u64 {
        let mut i = first;
        while let Some((_, p)) = reader.next().expect("read") {
            assert_eq!(p, &record(i)[..], "record {i}");
            i += 1;
        }
        i - first
    }

    #[test]
    fn appends_are_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log/core-0");
        let p = path.clone();
        run(move || async move {
            let log = CoreLog::open(p, 0, cfg()).await.unwrap();
            let mut ends = Vec::new();
            for i in 0..3000 {
                ends.push(append(&log, i).unwrap());
                if i % 500 == 0 {
                    log.durable(ends[i as usize]).await.unwrap();
                }
            }
            log.close().await.unwrap();
            let s = log.stats();
            assert_eq!(
                (s.appended_records, s.durable_lsn),
                (3000, *ends.last().unwrap())
            );
            assert!(s.commits >= 6 && s.fsync_count == s.commits, "{s:?}");
            assert!(append(&log, 0).is_err(), "closed");
            let mut r = LogReader::open(&path, 0).unwrap();
            let mut prev_end = 0;
            for (i, end) in ends.iter().enumerate() {
                let (lsn, p) = r.next().unwrap().unwrap();
                assert_eq!((lsn, p), (prev_end, &record(i as u64)[..]));
                assert_eq!(r.position(), *end);
                prev_end = *end;
            }
            assert!(r.next().unwrap().is_none());
        });
    }

    /// One commit larger than `WRITE_CHUNK_BYTES_MAX` goes as several chunks in flight at
    /// once: every byte lands at its offset, in order, across a segment rotation too.
    #[test]
    fn a_commit_of_several_chunks_is_written_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log/core-0");
        let p = path.clone();
        run(move || async move {
            let cfg = LogConfig {
                buffer_bytes_max: 6 * WRITE_CHUNK_BYTES_MAX,
                segment_bytes: 4 * WRITE_CHUNK_BYTES_MAX as u64,
                ..cfg()
            };
            let log = CoreLog::open(p, 0, cfg).await.unwrap();
            // Appended without yielding: the commit task takes them in one group.
            let (mut n, mut last) = (0u64, 0);
            while log.pending_bytes() < 5 * WRITE_CHUNK_BYTES_MAX + 4096 {
                last = append(&log, n).unwrap();
                n += 1;
            }
            log.durable(last).await.unwrap();
            let s = log.stats();
            assert_eq!(s.commits, 1, "one group: {s:?}");
            assert!(s.segments >= 2, "rotated within the commit: {s:?}");
            log.close().await.unwrap();
            let mut r = LogReader::open(&path, 0).unwrap();
            assert_eq!(read_check(&mut r, 0), n);
        });
    }

    #[test]
    fn durable_resolves_in_order_and_data_is_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_owned();
        run(move || async move {
            let log = CoreLog::open(
                path.clone(),
                0,
                LogConfig {
                    commit_interval_us: 300,
                    ..cfg()
                },
            )
            .await
            .unwrap();
            let done = Rc::new(RefCell::new(Vec::new()));
            let mut tasks = Vec::new();
            for t in 0..8u64 {
                let (log, done) = (log.clone(), done.clone());
                tasks.push(glommio::spawn_local(async move {
                    for k in 0..50 {
                        let lsn = append(&log, t * 50 + k).unwrap();
                        log.durable(lsn).await.unwrap();
                        assert!(log.stats().durable_lsn >= lsn);
                        done.borrow_mut().push(lsn);
                    }
                }));
            }
            for t in tasks {
                t.await;
            }
            assert_eq!(log.pending_bytes(), 0);
            let s = log.stats();
            assert!(
                s.commits < 400,
                "grouped: {} commits for 400 records",
                s.commits
            );
            // Durable means readable from disk by another reader.
            let mut r = LogReader::open(&path, 0).unwrap();
            let mut n = 0;
            while r.next().unwrap().is_some() {
                n += 1;
            }
            assert_eq!((n, r.position()), (400, s.durable_lsn));
            log.close().await.unwrap();
        });
    }

    /// `ack = memory`: commits write without fdatasync; the periodic sync makes them
    /// durable within `sync_interval_ms`, and close syncs what is left.
    #[test]
    fn memory_mode_syncs_periodically_not_per_commit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_owned();
        run(move || async move {
            let log = CoreLog::open(
                path.clone(),
                0,
                LogConfig {
                    sync_interval_ms: 2_000,
                    ..cfg()
                },
            )
            .await
            .unwrap();
            let syncs0 = log.stats().fsync_count;
            let mut last = 0;
            for i in 0..50 {
                last = append(&log, i).unwrap();
                glommio::timer::sleep(Duration::from_millis(1)).await;
            }
            glommio::timer::sleep(Duration::from_millis(100)).await;
            // Written by now (commits are back to back), but not one fdatasync yet.
            let written = log.inner.borrow().written_lsn;
            assert_eq!(written, last, "commits keep writing");
            let st = log.stats();
            assert!(st.commits > 1, "{st:?}");
            assert_eq!(st.fsync_count, syncs0, "no fdatasync per commit: {st:?}");
            assert!(st.durable_lsn < last);
            // The periodic sync comes within the interval, with no further append.
            log.durable(last).await.unwrap();
            let st = log.stats();
            assert_eq!(st.durable_lsn, last);
            assert!(st.fsync_count <= syncs0 + 2, "{st:?}");
            append(&log, 50).unwrap();
            log.close().await.unwrap();
            let mut reader = LogReader::open(&path, 0).unwrap();
            let mut n = 0;
            while reader.next().unwrap().is_some() {
                n += 1;
            }
            assert_eq!(n, 51);
        });
    }

    #[test]
    fn log_full_at_the_bound_then_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_owned();
        run(move || async move {
            let log = CoreLog::open(
                path,
                0,
                LogConfig {
                    buffer_bytes_max: 16 << 10,
                    ..cfg()
                },
            )
            .await
            .unwrap();
            // No await in between: the commit task cannot run.
            let mut last = 0;
            let mut n = 0;
            while let Ok(lsn) = log.append_with(1000, |b| b.fill(7)) {
                last = lsn;
                n += 1;
            }
            assert_eq!(n, (16 << 10) / 1008);
            assert!(log.pending_bytes() <= 16 << 10);
            log.durable(last).await.unwrap();
            assert_eq!(log.pending_bytes(), 0);
            assert!(log.append_with(1000, |b| b.fill(7)).is_ok());
            log.close().await.unwrap();
        });
    }

    #[test]
    fn rotates_and_retention_deletes_oldest_segments() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_owned();
        run(move || async move {
            let c = LogConfig {
                segment_bytes: 16 << 10,
                retention_bytes: 64 << 10,
                ..cfg()
            };
            let log = CoreLog::open(path.clone(), 3, c).await.unwrap();
            let mut reader = LogReader::open(&path, 0).unwrap();
            let mut read = 0;
            for i in 0..1000 {
                let lsn = append(&log, i).unwrap();
                if i % 10 == 9 {
                    log.durable(lsn).await.unwrap();
                    if i < 100 {
                        read += read_check(&mut reader, read); // follows across rotations
                    }
                }
            }
            assert_eq!(read, 100);
            let s = log.stats();
            assert!(s.segments_deleted > 0 && s.segments >= 4, "{s:?}");
            assert!(s.bytes_on_disk <= (64 + 16 + 4) << 10, "{s:?}");
            let segs = segment::list_segments(&path).unwrap();
            assert_eq!(segs.len() as u64, s.segments);
            // From 0: the oldest retained, contiguous to the end.
            let mut r = LogReader::open(&path, 0).unwrap();
            let (first_lsn, _) = r.next().unwrap().unwrap();
            assert_eq!(first_lsn, segs[0].0);
            while r.next().unwrap().is_some() {}
            assert_eq!(r.position(), s.durable_lsn);
            let gone = LogReader::open(&path, 8).err().unwrap();
            assert_eq!(gone.kind(), io::ErrorKind::NotFound);
            // The reader that stopped at record 100 fell behind retention.
            assert!(reader.next().is_err());
            log.close().await.unwrap();
        });
    }

    /// Retention keeps what a consumer (the Kafka forwarder) has not passed; over the size
    /// bound the log refuses records until the consumer's cursor moves on.
    #[test]
    fn retention_waits_for_consumer_cursors_then_refuses_records() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().to_owned();
        run(move || async move {
            let path = data_dir.join("log").join("core-3");
            let c = LogConfig {
                segment_bytes: 16 << 10,
                retention_bytes: 64 << 10,
                ..cfg()
            };
            clickgate_proto::cursor::write_cursor(&data_dir, "kafka", 3, 0).unwrap();
            let log = CoreLog::open(path.clone(), 3, c).await.unwrap();
            let mut refused = None;
            for i in 0..1000 {
                match append(&log, i) {
                    Ok(lsn) => log.durable(lsn).await.unwrap(),
                    Err(LogFull) => {
                        refused = Some(i);
                        break;
                    }
                }
            }
            let s = log.stats();
            assert!(
                refused.is_some(),
                "a lagging consumer must stop the log: {s:?}"
            );
            assert_eq!(s.segments_deleted, 0, "{s:?}");
            assert_eq!(
                LogReader::open(&path, 0)
                    .unwrap()
                    .next()
                    .unwrap()
                    .unwrap()
                    .0,
                0
            );
            // The consumer catches up: old segments go, records are taken again.
            clickgate_proto::cursor::write_cursor(&data_dir, "kafka", 3, s.durable_lsn).unwrap();
            let mut taken = false;
            for _ in 0..100 {
                if append(&log, 5000).is_ok() {
                    taken = true;
                    break;
                }
                glommio::timer::sleep(Duration::from_millis(100)).await;
            }
            assert!(
                taken,
                "the log still refuses after the cursor moved: {:?}",
                log.stats()
            );
            assert!(log.stats().segments_deleted > 0);
            log.close().await.unwrap();
        });
    }

    #[test]
    fn reopen_cuts_a_torn_tail_and_appends_continue() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_owned();
        run(move || async move {
            let c = LogConfig {
                segment_bytes: 64 << 10,
                ..cfg()
            };
            let log = CoreLog::open(path.clone(), 0, c.clone()).await.unwrap();
            for i in 0..300 {
                append(&log, i).unwrap();
            }
            log.close().await.unwrap();
            let end = log.stats().durable_lsn;

            // A crash mid-write: half a frame past the data.
            let (_, last) = segment::list_segments(&path).unwrap().pop().unwrap();
            let scan = segment::scan_segment(&last).unwrap();
            let mut half = Vec::new();
            segment::encode_frame(&[0xab; 900], &mut half);
            std::fs::OpenOptions::new()
                .write(true)
                .open(&last)
                .unwrap()
                .write_all_at(&half[..500], scan.data_end)
                .unwrap();

            let log = CoreLog::open(path.clone(), 0, c.clone()).await.unwrap();
            assert_eq!(log.stats().torn_bytes_truncated, 500);
            assert_eq!(log.append_lsn(), end);
            for i in 300..600 {
                append(&log, i).unwrap();
            }
            log.close().await.unwrap();

            // Garbage that is not even a frame header, after the zero padding.
            let (_, last) = segment::list_segments(&path).unwrap().pop().unwrap();
            let len = std::fs::metadata(&last).unwrap().len();
            std::fs::OpenOptions::new()
                .write(true)
                .open(&last)
                .unwrap()
                .write_all_at(&[1, 2, 3], len.next_multiple_of(4096) + 100)
                .unwrap();
            let log = CoreLog::open(path.clone(), 0, c).await.unwrap();
            assert!(log.stats().torn_bytes_truncated > 0);
            for i in 600..700 {
                append(&log, i).unwrap();
            }
            log.close().await.unwrap();

            let mut r = LogReader::open(&path, 0).unwrap();
            assert_eq!(read_check(&mut r, 0), 700);
        });
    }

    #[test]
    fn a_live_reader_sees_records_as_they_are_committed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_owned();
        run(move || async move {
            let c = LogConfig {
                segment_bytes: 8 << 10,
                ..cfg()
            };
            let log = CoreLog::open(path.clone(), 0, c).await.unwrap();
            let mut r = LogReader::open(&path, 0).unwrap();
            assert!(r.next().unwrap().is_none());
            let mut next = 0;
            for batch in 1..=20u64 {
                let mut lsn = 0;
                for _ in 0..batch {
                    lsn = append(&log, next).unwrap();
                    next += 1;
                }
                log.durable(lsn).await.unwrap();
                let before = next - batch;
                assert_eq!(read_check(&mut r, before), batch, "batch {batch}");
                assert_eq!(r.position(), lsn);
            }
            log.close().await.unwrap();
        });
    }
}
