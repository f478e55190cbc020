//! How the counter store survives a restart: a write-ahead log of applied delta frames
//! plus periodic snapshots.
//!
//! Why this and not "rebuild from the raw log": the controlplane may run on its own, its
//! store holds 90 days of 1d buckets while the dataplane's log is bounded by size, and
//! a WAL of deltas is small (one frame per core per second, a few KB) where the raw log is
//! every event. The frames are already validated, self-describing rkyv archives, so the
//! WAL stores them verbatim.
//!
//! - `store/wal`: records `u32 len | u32 crc32c(body) | body` (`proto::framing`, body: a
//!   delta frame archive). Frames of one group commit are written together and
//!   fdatasync'd once; the ack of a frame is sent only after that. A torn tail (short or
//!   bad CRC) is cut off at start-up: those frames were never acked, the dataplane
//!   resends them.
//! - `store/snapshot`: `CGSNAP01` then records of the same shape holding store chunks
//!   (the first carries the applied-delta marks). Written to `.snapshot.tmp`, fsync'd,
//!   renamed, directory fsync'd (`proto::fsutil::write_atomic`), then the WAL is
//!   truncated. A crash between rename and truncation is harmless: replaying a WAL frame
//!   already in the snapshot is a duplicate by its delta id (the marks are in the
//!   snapshot).
//! - Start-up: snapshot (if any), then WAL replay, both through the same idempotent apply.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clickgate_proto::frames::{access_delta, access_store_chunk, aligned, encode_store_chunk};
use clickgate_proto::framing::{self, Crc};
use clickgate_proto::fsutil::write_atomic;

use crate::store::Store;

const SNAPSHOT_MAGIC: &[u8; 8] = b"CGSNAP01";

pub struct Durable {
    dir: PathBuf,
    wal: File,
    wal_bytes: u64,
    pending: Vec<u8>,
}

/// What start-up found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    pub snapshot_chunks: u64,
    pub wal_frames: u64,
    /// Bytes cut off the WAL's torn tail.
    pub wal_torn_bytes: u64,
}

fn put_record(body: &[u8], out: &mut Vec<u8>) {
    framing::encode(Crc::Body, body, out);
}

/// Splits `buf` into records; returns them and the length of the valid prefix.
fn records(buf: &[u8]) -> (Vec<&[u8]>, usize) {
    framing::split(Crc::Body, buf)
}

impl Durable {
    /// Opens (creating) `dir`, loads the snapshot and replays the WAL into `store`.
    pub fn open(dir: &Path, store: &mut Store, now_ms: u64) -> anyhow::Result<(Durable, Recovery)> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut rec = Recovery::default();
        let snap = dir.join("snapshot");
        if snap.exists() {
            let bytes = fs::read(&snap).with_context(|| format!("reading {}", snap.display()))?;
            if bytes.len() < SNAPSHOT_MAGIC.len() || &bytes[..8] != SNAPSHOT_MAGIC {
                bail!(
                    "{} is not a clickgate snapshot; move it aside to start empty",
                    snap.display()
                );
            }
            let (chunks, valid) = records(&bytes[8..]);
            if valid != bytes.len() - 8 {
                bail!(
                    "{} is corrupt at byte {}; move it aside to start from the WAL only",
                    snap.display(),
                    8 + valid
                );
            }
            for body in chunks {
                let body = aligned(body);
                let chunk = access_store_chunk(&body)
                    .with_context(|| format!("decoding {}", snap.display()))?;
                store.load_chunk(chunk, now_ms)?;
                rec.snapshot_chunks += 1;
            }
        }
        let wal_path = dir.join("wal");
        let mut wal = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&wal_path)
            .with_context(|| format!("opening {}", wal_path.display()))?;
        let mut bytes = Vec::new();
        wal.read_to_end(&mut bytes)?;
        let (frames, valid) = records(&bytes);
        for body in frames {
            let body = aligned(body);
            // A record that passed its CRC but does not decode was written by another
            // version: stop rather than guess.
            let f =
                access_delta(&body).with_context(|| format!("decoding {}", wal_path.display()))?;
            store.apply_frame(f, now_ms)?;
            rec.wal_frames += 1;
        }
        if valid < bytes.len() {
            rec.wal_torn_bytes = (bytes.len() - valid) as u64;
            wal.set_len(valid as u64)?;
            wal.sync_all()?;
        }
        let durable = Durable {
            dir: dir.to_path_buf(),
            wal,
            wal_bytes: valid as u64,
            pending: Vec::new(),
        };
        Ok((durable, rec))
    }

    /// Loads the snapshot and the WAL's valid prefix into `store` without writing
    /// anything (billing reads a live box's counters this way; a torn tail is skipped,
    /// not cut). `Ok(false)`: `dir` holds no store.
    pub fn load_read_only(dir: &Path, store: &mut Store, now_ms: u64) -> anyhow::Result<bool> {
        let (snap, wal) = (dir.join("snapshot"), dir.join("wal"));
        if !snap.exists() && !wal.exists() {
            return Ok(false);
        }
        if snap.exists() {
            let bytes = fs::read(&snap).with_context(|| format!("reading {}", snap.display()))?;
            if bytes.len() < SNAPSHOT_MAGIC.len() || &bytes[..8] != SNAPSHOT_MAGIC {
                bail!("{} is not a clickgate snapshot", snap.display());
            }
            for body in records(&bytes[8..]).0 {
                let body = aligned(body);
                let chunk = access_store_chunk(&body)
                    .with_context(|| format!("decoding {}", snap.display()))?;
                store.load_chunk(chunk, now_ms)?;
            }
        }
        let bytes = match fs::read(&wal) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", wal.display())),
        };
        for body in records(&bytes).0 {
            let body = aligned(body);
            let f = access_delta(&body).with_context(|| format!("decoding {}", wal.display()))?;
            store.apply_frame(f, now_ms)?;
        }
        Ok(true)
    }

    /// Buffers one frame body for the next commit.
    pub fn append(&mut self, body: &[u8]) {
        put_record(body, &mut self.pending);
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Writes buffered frames and fdatasyncs: after this they survive a crash. On an
    /// error the WAL is cut back to its last committed length (no torn record in its
    /// middle) and the frames stay buffered: the next `commit` tries them again.
    pub fn commit(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let written = self
            .wal
            .write_all(&self.pending)
            .and_then(|()| self.wal.sync_data());
        if let Err(e) = written {
            let _ = self.wal.set_len(self.wal_bytes);
            return Err(e);
        }
        self.wal_bytes += self.pending.len() as u64;
        self.pending.clear();
        Ok(())
    }

    pub fn wal_bytes(&self) -> u64 {
        self.wal_bytes
    }

    /// Writes a snapshot of `store` and truncates the WAL. Call with nothing pending
    /// (after `commit`), so the WAL holds only what the snapshot covers.
    pub fn snapshot(&mut self, store: &Store) -> anyhow::Result<u64> {
        self.commit()?;
        let mut out = Vec::with_capacity(1 << 20);
        out.extend_from_slice(SNAPSHOT_MAGIC);
        let mut body = Vec::new();
        for chunk in store.to_chunks() {
            body.clear();
            encode_store_chunk(&chunk, &mut body)?;
            put_record(&body[4..], &mut out); // drop the frame length prefix: the record has its own
        }
        let snap = self.dir.join("snapshot");
        write_atomic(&snap, &out).with_context(|| format!("writing {}", snap.display()))?;
        self.wal.set_len(0)?;
        self.wal.sync_all()?;
        self.wal_bytes = 0;
        Ok(out.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Retention, Store};
    use clickgate_core::agg::{AggConfig, Aggregator, Dim};
    use clickgate_core::window::Window;
    use clickgate_proto::frames::{encode_delta, frames_from_delta};

    const T0: u64 = 1_764_201_600_000;

    fn frame_body(campaign: u64, users: u64, delta_id: u64) -> Vec<u8> {
        let mut a = Aggregator::new(AggConfig::default());
        for u in 0..users {
            a.add(
                &crate::store::tests_support::click(campaign, T0 + u, 1, &format!("u{u}"), 10),
                true,
                false,
            );
        }
        let mut buf = Vec::new();
        encode_delta(
            &frames_from_delta(1, 1, 0, delta_id, &a.drain_delta())[0],
            &mut buf,
        )
        .unwrap();
        buf[4..].to_vec()
    }

    fn apply_and_log(s: &mut Store, d: &mut Durable, body: &[u8]) {
        let b = aligned(body);
        s.apply_frame(access_delta(&b).unwrap(), T0).unwrap();
        d.append(body);
    }

    fn clicks(s: &Store, campaign: u64) -> u64 {
        s.series(campaign, Window::D1, Dim::All, 0, u64::MAX)
            .iter()
            .map(|b| b.clicks)
            .sum()
    }

    fn reopen(dir: &Path) -> (Store, Durable, Recovery) {
        let mut s = Store::new(Retention::default(), 100_000);
        let (d, r) = Durable::open(dir, &mut s, T0).unwrap();
        (s, d, r)
    }

    #[test]
    fn recovers_from_snapshot_plus_wal_and_cuts_a_torn_tail() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("store");
        let (mut s, mut d, r) = reopen(&dir);
        assert_eq!(r, Recovery::default());
        apply_and_log(&mut s, &mut d, &frame_body(1, 10, 1));
        apply_and_log(&mut s, &mut d, &frame_body(2, 20, 2));
        d.commit().unwrap();
        d.snapshot(&s).unwrap();
        assert_eq!(d.wal_bytes(), 0);
        apply_and_log(&mut s, &mut d, &frame_body(1, 5, 3));
        d.commit().unwrap();
        // Not committed: lost, as its ack was never sent.
        apply_and_log(&mut s, &mut d, &frame_body(1, 7, 4));
        drop(d);
        // A torn record at the end.
        let mut wal = OpenOptions::new()
            .append(true)
            .open(dir.join("wal"))
            .unwrap();
        wal.write_all(&[200, 0, 0, 0, 1, 2, 3]).unwrap();
        drop(wal);

        let (s2, d2, r) = reopen(&dir);
        assert_eq!((r.wal_frames, r.wal_torn_bytes), (1, 7));
        assert!(r.snapshot_chunks >= 1);
        assert_eq!((clicks(&s2, 1), clicks(&s2, 2)), (15, 20));
        assert_eq!(s2.mark(1, 1, 0).unwrap().delta_id, 3);
        assert_eq!(
            d2.wal_bytes(),
            std::fs::metadata(dir.join("wal")).unwrap().len()
        );
    }

    #[test]
    fn wal_frames_already_in_the_snapshot_are_not_counted_twice() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("store");
        let (mut s, mut d, _) = reopen(&dir);
        let body = frame_body(1, 10, 1);
        apply_and_log(&mut s, &mut d, &body);
        d.commit().unwrap();
        let wal_copy = std::fs::read(dir.join("wal")).unwrap();
        d.snapshot(&s).unwrap();
        drop(d);
        // Crash between snapshot rename and WAL truncation: the WAL still has the frame.
        std::fs::write(dir.join("wal"), wal_copy).unwrap();
        let (s2, _, r) = reopen(&dir);
        assert_eq!(r.wal_frames, 1);
        assert_eq!(clicks(&s2, 1), 10);
        assert_eq!(s2.stats().frames_duplicate, 1);
    }

    #[test]
    fn refuses_a_corrupt_snapshot() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("store");
        let (mut s, mut d, _) = reopen(&dir);
        apply_and_log(&mut s, &mut d, &frame_body(1, 10, 1));
        d.snapshot(&s).unwrap();
        drop(d);
        let p = dir.join("snapshot");
        let mut b = std::fs::read(&p).unwrap();
        let n = b.len();
        b[n - 3] ^= 0xff;
        std::fs::write(&p, b).unwrap();
        let mut s = Store::new(Retention::default(), 100);
        let err = Durable::open(&dir, &mut s, T0).err().unwrap().to_string();
        assert!(err.contains("corrupt"), "{err}");
    }
}
