//! The Redis outbox: the delta frames the store applied, on disk, in apply order, until
//! the Redis flusher has written them.
//!
//! Why a file of its own and not the store's WAL: the WAL is truncated at every snapshot,
//! whatever Redis has taken; the outbox is truncated only behind the flusher's cursor, so
//! a Redis outage of hours or a controlplane crash loses nothing for Redis.
//!
//! Crash order (see `ingest::writer_loop`): a group's frames are written and fdatasync'd
//! here *before* the WAL commit, and acks go out after both. A crash between the two
//! leaves a frame here that the store forgets; the dataplane resends it, the store
//! applies it again, and it lands here twice: the flusher's Lua script applies a frame
//! only if its delta id is above the mark kept in Redis, so the copy is a no-op. A crash
//! before this commit loses nothing (no ack went out).
//!
//! Layout: `<data_dir>/redis/outbox-<seq>.seg` segments of records
//! `u32 len | u32 crc32c(body) | body` (`proto::framing`; body: a delta frame archive, as
//! in the WAL), and `cursor` (`<seq> <offset>`: everything before it is in Redis),
//! replaced atomically after each successful flush; a stale cursor only replays frames
//! Redis skips.
//!
//! Bound: `spill_bytes_max` bytes of segments. Past it new frames are not written here
//! (the store still has them; billing still counts them): they are counted in
//! `clickgate_redis_outbox_dropped_deltas_total` and `/readyz` answers 503 until the
//! flusher catches up. Ingest never waits for Redis.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use rkyv::util::AlignedVec;

use clickgate_proto::framing::{self, Crc, HEADER_BYTES};

/// State shared by the writer (appends) and the flusher (reads, trims).
#[derive(Debug)]
struct Segments {
    /// `(seq, committed bytes)`, oldest first; the last one takes appends.
    segs: VecDeque<(u64, u64)>,
    /// Where the flusher stands.
    cursor: (u64, u64),
    /// `(end position, wall-clock ms)` of each commit not yet wholly in Redis, oldest
    /// first: the flush lag is the age of the first. At most [`COMMITS_TRACKED_MAX`]
    /// (past it the newest entry's end moves on: the lag reads older, never younger).
    commits: VecDeque<((u64, u64), u64)>,
}

/// Commit times kept for the flush lag, at most.
const COMMITS_TRACKED_MAX: usize = 65_536;

/// Counters exported on `/metrics`.
#[derive(Debug, Default)]
pub struct OutboxStats {
    pub bytes: AtomicU64,
    pub dropped_deltas: AtomicU64,
    pub write_errors: AtomicU64,
    /// Wall-clock ms of the commit of the oldest frame not yet in Redis (0: caught up):
    /// `clickgate_redis_flush_lag_seconds`. Set by a commit when the flusher had caught
    /// up, moved on by each advance to the oldest commit still behind.
    pub pending_since_ms: AtomicU64,
    /// Set when a commit dropped frames, cleared by the next commit that fits.
    pub dropping: std::sync::atomic::AtomicBool,
}

#[derive(Clone)]
pub struct Outbox {
    dir: PathBuf,
    shared: Arc<Mutex<Segments>>,
    pub stats: Arc<OutboxStats>,
    spill_bytes_max: u64,
    segment_bytes: u64,
}

/// The writer thread's end: buffers frames, commits them with one fdatasync.
pub struct OutboxWriter {
    outbox: Outbox,
    file: Option<File>,
    pending: Vec<u8>,
    pending_frames: u64,
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_millis() as u64)
        .max(1)
}

fn seg_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("outbox-{seq:016}.seg"))
}

/// Splits `buf` into records; returns them and the length of the valid prefix.
fn records(buf: &[u8]) -> (Vec<&[u8]>, usize) {
    framing::split(Crc::Body, buf)
}

impl Outbox {
    /// Opens `dir` (creating it), cuts a torn tail off the newest segment, reads the cursor.
    pub fn open(dir: &Path, spill_bytes_max: u64) -> anyhow::Result<(Outbox, OutboxWriter)> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut seqs: Vec<u64> = fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_prefix("outbox-")?
                    .strip_suffix(".seg")?
                    .parse()
                    .ok()
            })
            .collect();
        seqs.sort_unstable();
        let mut segs = VecDeque::new();
        for (i, &seq) in seqs.iter().enumerate() {
            let p = seg_path(dir, seq);
            let mut len = fs::metadata(&p)?.len();
            if i + 1 == seqs.len() {
                let bytes = fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
                let valid = records(&bytes).1 as u64;
                if valid < len {
                    let f = OpenOptions::new().write(true).open(&p)?;
                    f.set_len(valid)?;
                    f.sync_all()?;
                    tracing::warn!(segment = %p.display(), torn_bytes = len - valid, "redis outbox: cut a torn tail");
                    len = valid;
                }
            }
            segs.push_back((seq, len));
        }
        let cursor = match fs::read_to_string(dir.join("cursor")) {
            Ok(t) => {
                let mut it = t.split_whitespace().map(str::parse::<u64>);
                match (it.next(), it.next()) {
                    (Some(Ok(s)), Some(Ok(o))) => (s, o),
                    _ => anyhow::bail!(
                        "{} is not `<seq> <offset>`; remove it to replay the whole outbox",
                        dir.join("cursor").display()
                    ),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                (segs.front().map_or(0, |s: &(u64, u64)| s.0), 0)
            }
            Err(e) => return Err(e).context("reading the redis outbox cursor"),
        };
        if segs.is_empty() {
            let seq = cursor.0.max(1);
            File::create(seg_path(dir, seq))?;
            segs.push_back((seq, 0));
        }
        // A cursor before the oldest segment (trimmed) starts at the oldest.
        let cursor = if cursor.0 < segs[0].0 {
            (segs[0].0, 0)
        } else {
            cursor
        };
        let file = OpenOptions::new()
            .append(true)
            .open(seg_path(dir, segs.back().expect("one segment").0))?;
        // A backlog left from an earlier run counts as committed now.
        let mut commits = VecDeque::new();
        let end = (
            segs.back().expect("one segment").0,
            segs.back().expect("one").1,
        );
        let backlog = segs
            .iter()
            .any(|&(seq, len)| seq > cursor.0 || (seq == cursor.0 && len > cursor.1));
        let now = wall_ms();
        if backlog {
            commits.push_back((end, now));
        }
        let outbox = Outbox {
            dir: dir.to_path_buf(),
            shared: Arc::new(Mutex::new(Segments {
                segs,
                cursor,
                commits,
            })),
            stats: Arc::new(OutboxStats::default()),
            spill_bytes_max,
            segment_bytes: (spill_bytes_max / 8).clamp(1 << 20, 64 << 20),
        };
        outbox.update_bytes();
        if backlog {
            outbox.stats.pending_since_ms.store(now, Ordering::Relaxed);
        }
        let writer = OutboxWriter {
            outbox: outbox.clone(),
            file: Some(file),
            pending: Vec::new(),
            pending_frames: 0,
        };
        Ok((outbox, writer))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Segments> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes not yet flushed (from the cursor to the end).
    pub fn backlog_bytes(&self) -> u64 {
        let s = self.lock();
        s.segs
            .iter()
            .filter(|(seq, _)| *seq >= s.cursor.0)
            .map(|&(seq, len)| {
                if seq == s.cursor.0 {
                    len.saturating_sub(s.cursor.1)
                } else {
                    len
                }
            })
            .sum()
    }

    fn total_bytes(s: &Segments) -> u64 {
        s.segs.iter().map(|(_, l)| l).sum()
    }

    /// Refreshes the byte gauge; once the flusher has drained the outbox to half its
    /// bound, a full outbox is no longer full (the next commit has room), even before a
    /// new frame arrives to prove it.
    fn update_bytes(&self) {
        let b = Self::total_bytes(&self.lock());
        self.stats.bytes.store(b, Ordering::Relaxed);
        if self.backlog_bytes() <= self.spill_bytes_max / 2 {
            self.stats.dropping.store(false, Ordering::Relaxed);
        }
    }

    /// Whether the last commit had to drop its frames (the outbox was full) and the
    /// flusher has not drained it to half its bound since.
    pub fn is_full(&self) -> bool {
        self.stats.dropping.load(Ordering::Relaxed)
    }

    /// Reads up to `frames_max` frames / about `bytes_max` bytes from the cursor. Returns
    /// the frame bodies (aligned for rkyv) and the cursor just past them.
    pub fn read_batch(
        &self,
        frames_max: usize,
        bytes_max: usize,
    ) -> anyhow::Result<(Vec<AlignedVec>, (u64, u64))> {
        let (mut cursor, segs) = {
            let s = self.lock();
            (s.cursor, s.segs.clone())
        };
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for (i, &(seq, len)) in segs.iter().enumerate() {
            if seq < cursor.0 {
                continue;
            }
            if seq > cursor.0 {
                cursor = (seq, 0);
            }
            if cursor.1 < len {
                let mut f = File::open(seg_path(&self.dir, seq))?;
                f.seek(SeekFrom::Start(cursor.1))?;
                let want = ((len - cursor.1) as usize).min(bytes_max.max(1 << 20));
                let mut buf = vec![0u8; want];
                f.read_exact(&mut buf)?;
                let mut at = 0usize;
                for body in records(&buf).0 {
                    if out.len() >= frames_max || (bytes > 0 && bytes + body.len() > bytes_max) {
                        break;
                    }
                    out.push(clickgate_proto::frames::aligned(body));
                    at += HEADER_BYTES + body.len();
                    bytes += body.len();
                }
                if at == 0 && out.is_empty() && !buf.is_empty() {
                    // A record longer than what we read: read it whole.
                    // A length past the segment's end is corruption, never a read (nor
                    // an allocation) of that length.
                    let Some(len) = framing::body_len(&buf)
                        .filter(|&n| (HEADER_BYTES + n) as u64 <= len - cursor.1)
                    else {
                        anyhow::bail!(
                            "redis outbox segment {} is corrupt at byte {}",
                            seq,
                            cursor.1
                        );
                    };
                    let mut one = vec![0u8; HEADER_BYTES + len];
                    f.seek(SeekFrom::Start(cursor.1))?;
                    f.read_exact(&mut one)?;
                    match records(&one).0.first() {
                        Some(body) => {
                            out.push(clickgate_proto::frames::aligned(body));
                            at = one.len();
                        }
                        None => anyhow::bail!(
                            "redis outbox segment {} is corrupt at byte {}",
                            seq,
                            cursor.1
                        ),
                    }
                }
                cursor.1 += at as u64;
                if cursor.1 < len {
                    return Ok((out, cursor));
                }
            }
            // This segment is read to its end; move on only if a newer one exists.
            if i + 1 == segs.len() || out.len() >= frames_max {
                return Ok((out, cursor));
            }
        }
        Ok((out, cursor))
    }

    /// Records that everything before `cursor` is in Redis: persists the cursor and
    /// deletes segments wholly behind it.
    pub fn advance(&self, cursor: (u64, u64)) -> anyhow::Result<()> {
        clickgate_proto::fsutil::write_atomic(
            &self.dir.join("cursor"),
            format!("{} {}\n", cursor.0, cursor.1).as_bytes(),
        )?;
        let stale: Vec<u64> = {
            let mut s = self.lock();
            s.cursor = cursor;
            while s.commits.front().is_some_and(|&(end, _)| end <= cursor) {
                s.commits.pop_front();
            }
            let oldest = s.commits.front().map_or(0, |&(_, at)| at);
            self.stats.pending_since_ms.store(oldest, Ordering::Relaxed);
            let mut stale = Vec::new();
            while s.segs.len() > 1 && s.segs[0].0 < cursor.0 {
                stale.push(s.segs.pop_front().expect("len > 1").0);
            }
            stale
        };
        for seq in stale {
            let _ = fs::remove_file(seg_path(&self.dir, seq));
        }
        self.update_bytes();
        Ok(())
    }
}

impl OutboxWriter {
    /// Buffers one applied frame for the next [`OutboxWriter::commit`].
    pub fn append(&mut self, body: &[u8]) {
        framing::encode(Crc::Body, body, &mut self.pending);
        self.pending_frames += 1;
    }

    /// Writes the buffered frames and fdatasyncs. Never fails the caller: a full outbox
    /// or a write error drops these frames for Redis (counted, logged); the embedded
    /// store and billing still have them.
    pub fn commit(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let n = self.pending_frames;
        self.pending_frames = 0;
        let ob = self.outbox.clone();
        // The bound is on what Redis has not taken yet: a consumed segment still on disk
        // (the active one is deleted only once a newer one exists) does not count.
        let backlog = ob.backlog_bytes();
        if backlog + self.pending.len() as u64 > ob.spill_bytes_max {
            ob.stats.dropped_deltas.fetch_add(n, Ordering::Relaxed);
            ob.stats.dropping.store(true, Ordering::Relaxed);
            tracing::warn!(
                frames = n,
                spill_bytes_max = ob.spill_bytes_max,
                "redis outbox full: deltas not kept for Redis"
            );
            self.pending.clear();
            return;
        }
        ob.stats.dropping.store(false, Ordering::Relaxed);
        if let Err(e) = self.write_pending() {
            ob.stats.write_errors.fetch_add(1, Ordering::Relaxed);
            ob.stats.dropped_deltas.fetch_add(n, Ordering::Relaxed);
            tracing::error!(error = %e, frames = n, "redis outbox write failed: deltas not kept for Redis");
            self.file = None; // reopened (new segment) next time
        }
        self.pending.clear();
        ob.update_bytes();
    }

    fn write_pending(&mut self) -> anyhow::Result<()> {
        let ob = self.outbox.clone();
        let (seq, len) = *ob.lock().segs.back().expect("one segment");
        if self.file.is_none() || len >= ob.segment_bytes {
            let next = seq + 1;
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(seg_path(&ob.dir, next))?;
            File::open(&ob.dir)?.sync_all()?;
            ob.lock().segs.push_back((next, 0));
            self.file = Some(f);
        }
        let f = self.file.as_mut().expect("opened above");
        f.write_all(&self.pending)?;
        f.sync_data()?;
        let mut s = ob.lock();
        let last = s.segs.back_mut().expect("one segment");
        last.1 += self.pending.len() as u64;
        let end = *last;
        let now = wall_ms();
        if s.commits.len() < COMMITS_TRACKED_MAX {
            s.commits.push_back((end, now));
        } else if let Some(newest) = s.commits.back_mut() {
            newest.0 = end;
        }
        let _ = ob.stats.pending_since_ms.compare_exchange(
            0,
            now,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bodies(v: &[AlignedVec]) -> Vec<Vec<u8>> {
        v.iter().map(|b| b.to_vec()).collect()
    }

    #[test]
    fn frames_come_back_in_order_across_segments_and_restarts() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("redis");
        let (ob, mut w) = Outbox::open(&dir, 16 << 20).unwrap();
        let big = vec![7u8; 700 << 10];
        for i in 0..5u8 {
            w.append(&[i; 10]);
            w.append(&big); // 5 × 0.7 MiB: rotates past the 1 MiB segment size
            w.commit();
        }
        let (b, c) = ob.read_batch(3, 64 << 20).unwrap();
        assert_eq!(bodies(&b), vec![vec![0u8; 10], big.clone(), vec![1u8; 10]]);
        ob.advance(c).unwrap();
        drop((ob, w));
        let (ob, _w) = Outbox::open(&dir, 16 << 20).unwrap();
        let (b, c) = ob.read_batch(100, 64 << 20).unwrap();
        assert_eq!(b.len(), 7);
        assert_eq!(b[0].to_vec(), big);
        ob.advance(c).unwrap();
        assert_eq!(ob.backlog_bytes(), 0);
        assert!(ob.read_batch(100, 1 << 20).unwrap().0.is_empty());
        // Old segments are gone.
        let segs = fs::read_dir(&dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".seg")
            })
            .count();
        assert_eq!(segs, 1);
    }

    /// Found by the `redis_outbox` fuzz target: a corrupt record in an older segment whose
    /// length says 4 GiB made the flusher allocate 4 GiB before reading it.
    #[test]
    fn a_corrupt_length_is_an_error_not_an_allocation() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("redis");
        fs::create_dir_all(&dir).unwrap();
        let mut older = Vec::new();
        framing::encode(Crc::Body, b"ok", &mut older);
        older.extend_from_slice(&u32::MAX.to_le_bytes());
        older.extend_from_slice(&[0; 4]);
        fs::write(seg_path(&dir, 1), &older).unwrap();
        fs::write(seg_path(&dir, 2), b"").unwrap();
        let (ob, _w) = Outbox::open(&dir, 16 << 20).unwrap();
        let (b, c) = ob.read_batch(10, 1 << 20).unwrap();
        assert_eq!(bodies(&b), vec![b"ok".to_vec()]);
        assert_eq!(c, (1, 10));
        ob.advance(c).unwrap();
        let e = ob.read_batch(10, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("corrupt at byte 10"), "{e}");
    }

    #[test]
    fn a_full_outbox_drops_and_counts_and_a_torn_tail_is_cut() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("redis");
        let (ob, mut w) = Outbox::open(&dir, 100).unwrap();
        w.append(&[1; 50]);
        w.commit();
        w.append(&[2; 50]);
        w.commit();
        assert_eq!(ob.stats.dropped_deltas.load(Ordering::Relaxed), 1);
        assert!(ob.is_full());
        drop((ob, w));
        let seg = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "seg"))
            .unwrap();
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[99, 0, 0, 0, 1]).unwrap();
        drop(f);
        let (ob, _) = Outbox::open(&dir, 100).unwrap();
        assert_eq!(
            bodies(&ob.read_batch(10, 1 << 20).unwrap().0),
            vec![vec![1u8; 50]]
        );
    }
}
