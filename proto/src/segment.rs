//! The local log's segment files and a `std::fs` reader for them.
//!
//! Each dataplane core `k` owns `<data_dir>/log/core-<k>/`, a directory of segment files.
//! A position in a core's log is one `u64`, the LSN: the logical byte offset of a frame in
//! the core's stream of frames (headers and padding are not counted), monotonic across
//! segments.
//!
//! ```text
//! file name   <base LSN, 20 digits>.seg      e.g. 00000000000000000000.seg
//! block 0     header, HEADER_BYTES (4096) long, zero padded:
//!             [8] "CGLOG001" | u32 version (=1) | u32 core | u64 base LSN | u64 created ms
//!             | u32 crc32c(the 32 bytes before it)
//! then        frames back to back from file offset HEADER_BYTES:
//!             u32 len (> 0) | u32 crc32c(len as 4 LE bytes ++ payload) | payload
//!             the frame at file offset HEADER_BYTES + (lsn - base) has LSN `lsn`
//! then        zeros up to the end of the file (the writer writes whole 4 KiB blocks)
//! ```
//!
//! Integers are little-endian. How data, padding and a torn tail are told apart:
//!
//! - A frame's `len` is never 0, so a zero `len` (or the end of the file) is the end of
//!   the data written so far. The writer only ever writes past the end of its data with
//!   zeros (a block is rewritten with the same prefix and more frames), so every byte past
//!   the data end of a cleanly written segment is 0.
//! - A frame whose `len` is over [`FRAME_PAYLOAD_MAX`], runs past the bytes available, or
//!   whose crc does not match is *torn*: the end of the data too. In the live segment it is
//!   a write still in flight or cut by a crash (the writer truncates it when it reopens the
//!   log); in a sealed segment (one with a successor) it is corruption and an error.
//! - A frame never straddles two segments, and the writer creates segment `N+1` (under a
//!   temporary name, then renamed) only after every frame of segment `N` is written and
//!   fdatasync'd. So "a successor exists" means "this segment is complete", and the
//!   successor's base LSN must equal the end LSN of its predecessor.
//!
//! The reader follows a live log: at the end of the data it answers `Ok(None)` and a later
//! call rereads from disk. It may return records that were written but not yet fdatasync'd
//! (they survive `kill -9` of the writer, not a power loss).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::framing::{self, Crc, Torn};

pub const MAGIC: &[u8; 8] = b"CGLOG001";
pub const SEGMENT_VERSION: u32 = 1;
/// The header block; frames start at this file offset. A multiple of any O_DIRECT alignment.
pub const HEADER_BYTES: u64 = 4096;
/// The writer's I/O unit: it writes whole blocks at block-aligned offsets.
pub const BLOCK_BYTES: usize = 4096;
/// `u32 len | u32 crc` ([`crate::framing`]).
pub const FRAME_HEADER_BYTES: usize = framing::HEADER_BYTES;
/// The largest payload of one frame; a larger `len` is a torn or corrupt frame.
pub const FRAME_PAYLOAD_MAX: usize = 16 << 20;
/// What the reader reads from a file at once.
const READ_CHUNK_BYTES: usize = 256 << 10;
const HEADER_USED_BYTES: usize = 36;

const _: () = assert!(HEADER_BYTES as usize / BLOCK_BYTES * BLOCK_BYTES == HEADER_BYTES as usize);
const _: () = assert!(HEADER_USED_BYTES <= HEADER_BYTES as usize);
const _: () = assert!(FRAME_PAYLOAD_MAX < u32::MAX as usize);

/// The header block of a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    pub core: u32,
    pub base_lsn: u64,
    pub created_ms: u64,
}

impl SegmentHeader {
    /// Encodes into the first `HEADER_BYTES` of `out` (zero padded).
    pub fn encode(&self, out: &mut [u8]) {
        let out = &mut out[..HEADER_BYTES as usize];
        out.fill(0);
        out[0..8].copy_from_slice(MAGIC);
        out[8..12].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&self.core.to_le_bytes());
        out[16..24].copy_from_slice(&self.base_lsn.to_le_bytes());
        out[24..32].copy_from_slice(&self.created_ms.to_le_bytes());
        let crc = crc32c::crc32c(&out[0..32]);
        out[32..36].copy_from_slice(&crc.to_le_bytes());
    }

    pub fn decode(b: &[u8]) -> io::Result<SegmentHeader> {
        if b.len() < HEADER_USED_BYTES || &b[0..8] != MAGIC {
            return Err(invalid("not a clickgate log segment (bad magic)".into()));
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8"));
        if u32_at(32) != crc32c::crc32c(&b[0..32]) {
            return Err(invalid("segment header crc mismatch".into()));
        }
        let version = u32_at(8);
        if version != SEGMENT_VERSION {
            return Err(invalid(format!("unknown segment version {version}")));
        }
        Ok(SegmentHeader {
            core: u32_at(12),
            base_lsn: u64_at(16),
            created_ms: u64_at(24),
        })
    }
}

/// `00000000000000000042.seg` for base LSN 42.
pub fn segment_file_name(base_lsn: u64) -> String {
    format!("{base_lsn:020}.seg")
}

/// The base LSN of a segment file name, `None` for any other name.
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The segments of a core directory: (base LSN, path), ascending.
pub fn list_segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(base) = entry.file_name().to_str().and_then(parse_segment_file_name) {
            out.push((base, entry.path()));
        }
    }
    out.sort_unstable_by_key(|s| s.0);
    Ok(out)
}

/// The core directories under `<data_dir>/log`: (core index, path), sorted. A missing
/// `log_root` has none.
pub fn core_dirs(log_root: &Path) -> io::Result<Vec<(usize, PathBuf)>> {
    let entries = match std::fs::read_dir(log_root) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(k) = name.to_str().and_then(|n| n.strip_prefix("core-")) else {
            continue;
        };
        if let (Ok(k), true) = (k.parse::<usize>(), entry.file_type()?.is_dir()) {
            out.push((k, entry.path()));
        }
    }
    out.sort_unstable_by_key(|d| d.0);
    Ok(out)
}

/// crc32c of a frame: covers the 4 `len` bytes then the payload ([`Crc::LenAndBody`]).
pub fn frame_crc(payload: &[u8]) -> u32 {
    Crc::LenAndBody.of(payload)
}

/// Writes the 8-byte frame header for `payload` into `header`.
#[inline]
pub fn put_frame_header(header: &mut [u8], payload: &[u8]) {
    framing::put_header(Crc::LenAndBody, header, payload);
}

/// Appends one frame (for tests and tools; the dataplane writer frames in place).
pub fn encode_frame(payload: &[u8], out: &mut Vec<u8>) {
    assert!(
        !payload.is_empty() && payload.len() <= FRAME_PAYLOAD_MAX,
        "frame payload size"
    );
    framing::encode(Crc::LenAndBody, payload, out);
}

/// What the bytes at a frame position hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameCheck {
    /// A whole frame with this payload length.
    Frame(usize),
    /// The end of the data: a zero `len`, or no bytes at all.
    End,
    /// A partial or corrupt frame.
    Torn,
    /// The header says `len` bytes but fewer are available; give it `8 + len` bytes.
    NeedMore(usize),
}

/// Checks the frame at the start of `avail` (all the bytes available from there).
pub fn check_frame(avail: &[u8]) -> FrameCheck {
    if avail.len() < FRAME_HEADER_BYTES {
        return if avail.iter().all(|&b| b == 0) {
            FrameCheck::End
        } else {
            FrameCheck::Torn
        };
    }
    match framing::body_len(avail) {
        Some(0) => return FrameCheck::End,
        Some(len) if len > FRAME_PAYLOAD_MAX => return FrameCheck::Torn,
        _ => {}
    }
    match framing::decode(Crc::LenAndBody, avail) {
        Ok((payload, _)) => FrameCheck::Frame(payload.len()),
        Err(Torn::ShortBody { len }) => FrameCheck::NeedMore(len),
        Err(Torn::ShortHeader(_) | Torn::BadCrc) => FrameCheck::Torn,
    }
}

/// One segment walked to the end of its valid data (what the writer does when it opens).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentScan {
    pub header: SegmentHeader,
    /// File offset just past the last valid frame.
    pub data_end: u64,
    pub records: u64,
    pub file_len: u64,
    /// Bytes from `data_end` to the last non-zero byte of the file: a torn frame or
    /// garbage (zero padding past the data is not counted).
    pub torn_bytes: u64,
}

/// Walks the segment at `path`; errors only on I/O or a bad header.
pub fn scan_segment(path: &Path) -> io::Result<SegmentScan> {
    let mut f = SegmentFile::open(path)?;
    let mut off = HEADER_BYTES;
    let mut records = 0;
    while let FrameCheck::Frame(len) = f.check_at(off)? {
        off += (FRAME_HEADER_BYTES + len) as u64;
        records += 1;
    }
    // The last non-zero byte past the data, read in chunks from the end of the file.
    let mut last_nonzero = off;
    let mut at = off;
    let mut chunk = vec![0u8; READ_CHUNK_BYTES];
    while at < f.len {
        let n = (f.len - at).min(chunk.len() as u64) as usize;
        f.file.read_exact_at(&mut chunk[..n], at)?;
        if let Some(i) = chunk[..n].iter().rposition(|&b| b != 0) {
            last_nonzero = at + i as u64 + 1;
        }
        at += n as u64;
    }
    Ok(SegmentScan {
        header: f.header,
        data_end: off,
        records,
        file_len: f.len,
        torn_bytes: last_nonzero - off,
    })
}

/// An open segment with a read buffer over a window of it.
struct SegmentFile {
    file: File,
    path: PathBuf,
    header: SegmentHeader,
    /// File length when last looked at.
    len: u64,
    buf: Vec<u8>,
    /// File offset of `buf[0]`.
    buf_off: u64,
}

impl SegmentFile {
    fn open(path: &Path) -> io::Result<SegmentFile> {
        let file = File::open(path)?;
        let mut head = vec![0u8; HEADER_BYTES as usize];
        let n = read_full_at(&file, &mut head, 0)?;
        let header = SegmentHeader::decode(&head[..n])
            .map_err(|e| invalid(format!("{}: {e}", path.display())))?;
        let expect = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(parse_segment_file_name);
        if expect != Some(header.base_lsn) {
            return Err(invalid(format!(
                "{}: header base LSN is {}",
                path.display(),
                header.base_lsn
            )));
        }
        let len = file.metadata()?.len();
        Ok(SegmentFile {
            file,
            path: path.to_owned(),
            header,
            len,
            buf: Vec::new(),
            buf_off: 0,
        })
    }

    /// The buffered bytes from `off` on, at least `want` of them when the file has them.
    fn bytes_at(&mut self, off: u64, want: usize) -> io::Result<&[u8]> {
        let have = off >= self.buf_off && off + want as u64 <= self.buf_off + self.buf.len() as u64;
        if !have {
            self.buf.resize(want.max(READ_CHUNK_BYTES), 0);
            let n = read_full_at(&self.file, &mut self.buf, off)?;
            self.buf.truncate(n);
            self.buf_off = off;
            self.len = self.len.max(off + n as u64);
        }
        let start = ((off - self.buf_off) as usize).min(self.buf.len());
        Ok(&self.buf[start..])
    }

    fn check_at(&mut self, off: u64) -> io::Result<FrameCheck> {
        match check_frame(self.bytes_at(off, FRAME_HEADER_BYTES)?) {
            FrameCheck::NeedMore(len) => Ok(
                match check_frame(self.bytes_at(off, FRAME_HEADER_BYTES + len)?) {
                    FrameCheck::NeedMore(_) => FrameCheck::Torn,
                    c => c,
                },
            ),
            c => Ok(c),
        }
    }

    /// Forgets the buffer so the next look rereads the disk (the live tail may have grown).
    fn invalidate(&mut self) {
        self.buf.clear();
        self.buf_off = 0;
    }
}

/// Reads until `buf` is full or the end of the file; returns the bytes read.
fn read_full_at(file: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], off + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Reads one core's log in LSN order, following it as the writer appends.
pub struct LogReader {
    dir: PathBuf,
    /// The segment being read and the file offset of the next frame in it.
    cur: Option<(SegmentFile, u64)>,
    pos: u64,
    /// Opened at LSN 0 and no segment seen yet: start at the oldest one that appears.
    from_oldest: bool,
}

impl LogReader {
    /// Reads core directory `dir` from `from_lsn` (0 = the oldest retained). Errors with
    /// `NotFound` when `from_lsn` was deleted by retention, `InvalidInput` when it is not a
    /// record boundary or lies past the end of the log.
    pub fn open(dir: &Path, from_lsn: u64) -> io::Result<LogReader> {
        let mut r = LogReader {
            dir: dir.to_owned(),
            cur: None,
            pos: from_lsn,
            from_oldest: from_lsn == 0,
        };
        if from_lsn == 0 {
            return Ok(r);
        }
        let segs = list_segments(dir)?;
        let Some((base, path)) = segs.iter().rev().find(|s| s.0 <= from_lsn) else {
            return Err(match segs.first() {
                Some((oldest, _)) => retention_gap(dir, from_lsn, *oldest),
                None => io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "{}: no segments, cannot start at LSN {from_lsn}",
                        dir.display()
                    ),
                ),
            });
        };
        let mut seg = SegmentFile::open(path)?;
        let mut off = HEADER_BYTES;
        let target = HEADER_BYTES + (from_lsn - base);
        while off < target {
            match seg.check_at(off)? {
                FrameCheck::Frame(len) => off += (FRAME_HEADER_BYTES + len) as u64,
                _ => break,
            }
        }
        if off != target {
            let why = if off < target {
                "past the end of the log"
            } else {
                "not a record boundary"
            };
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: LSN {from_lsn} is {why}", dir.display()),
            ));
        }
        r.cur = Some((seg, off));
        Ok(r)
    }

    /// LSN of the next record to read.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The next record: (its LSN, payload). `Ok(None)` at the current end of the data; a
    /// later call may return more. A torn tail of the live segment is the end, not an error.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> io::Result<Option<(u64, &[u8])>> {
        let (lsn, off, len) = loop {
            if self.cur.is_none() && !self.open_next_segment()? {
                return Ok(None);
            }
            let (seg, off) = self.cur.as_mut().expect("segment is open");
            let mut check = seg.check_at(*off)?;
            if check != FrameCheck::End && !matches!(check, FrameCheck::Frame(_)) {
                // Maybe a stale buffer over a write in flight: look at the disk again.
                seg.invalidate();
                check = seg.check_at(*off)?;
            }
            if let FrameCheck::Frame(len) = check {
                let at = *off;
                *off += (FRAME_HEADER_BYTES + len) as u64;
                let lsn = self.pos;
                self.pos += (FRAME_HEADER_BYTES + len) as u64;
                break (lsn, at, len);
            }
            if !self.at_sealed_end()? {
                // The live tail: come back later and reread from here.
                if let Some((seg, _)) = self.cur.as_mut() {
                    seg.invalidate();
                }
                return Ok(None);
            }
        };
        let (seg, _) = self.cur.as_mut().expect("segment is open");
        let start = FRAME_HEADER_BYTES + (off - seg.buf_off) as usize;
        Ok(Some((lsn, &seg.buf[start..start + len])))
    }

    /// At the end of the current segment's data: moves to its successor if there is one
    /// (true), or stays when this is the live segment (false).
    fn at_sealed_end(&mut self) -> io::Result<bool> {
        let (seg, off) = self.cur.as_mut().expect("segment is open");
        let base = seg.header.base_lsn;
        let segs = list_segments(&self.dir)?;
        let Some(&(next, _)) = segs.iter().find(|s| s.0 > base) else {
            return Ok(false);
        };
        // A successor exists, so this segment was complete before it was created: reread
        // the frame from disk; anything but the end of data now is corruption.
        seg.invalidate();
        match seg.check_at(*off)? {
            FrameCheck::Frame(_) => return Ok(true), // it was in flight; read it
            FrameCheck::End if next == self.pos => {}
            // Retention deleted this segment and the ones after it while we read it.
            FrameCheck::End if !segs.iter().any(|s| s.0 == base) => {
                return Err(retention_gap(&self.dir, self.pos, segs[0].0))
            }
            FrameCheck::End => {
                return Err(invalid(format!(
                    "{}: segment {} ends at LSN {} but the next one starts at {next}",
                    self.dir.display(),
                    seg.path.display(),
                    self.pos
                )))
            }
            _ => {
                return Err(invalid(format!(
                    "{}: corrupt frame at LSN {} in sealed segment {}",
                    self.dir.display(),
                    self.pos,
                    seg.path.display()
                )))
            }
        }
        self.cur = None;
        Ok(true)
    }

    /// Opens the segment that holds `pos` (or the oldest one); false when there is none yet.
    fn open_next_segment(&mut self) -> io::Result<bool> {
        let segs = list_segments(&self.dir)?;
        let found = if self.from_oldest {
            segs.first()
        } else {
            match segs.iter().find(|s| s.0 == self.pos) {
                Some(s) => Some(s),
                None => match segs.iter().find(|s| s.0 > self.pos) {
                    // Only a later segment: ours was deleted by retention.
                    Some(&(oldest, _)) => return Err(retention_gap(&self.dir, self.pos, oldest)),
                    None => None,
                },
            }
        };
        let Some((base, path)) = found else {
            return Ok(false);
        };
        let seg = match SegmentFile::open(path) {
            Ok(s) => s,
            // Deleted by retention between the listing and the open.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return self.open_next_segment(),
            Err(e) => return Err(e),
        };
        self.pos = *base;
        self.from_oldest = false;
        self.cur = Some((seg, HEADER_BYTES));
        Ok(true)
    }
}

fn retention_gap(dir: &Path, lsn: u64, oldest: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!(
            "{}: LSN {lsn} was deleted by retention (the oldest retained LSN is {oldest})",
            dir.display()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn payloads(n: usize, seed: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| vec![(i + seed) as u8 | 1; 1 + (i * 37 + seed) % 300])
            .collect()
    }

    /// A segment's bytes: header, frames, zero padding to a block boundary.
    fn segment(base: u64, recs: &[Vec<u8>]) -> Vec<u8> {
        let mut out = vec![0u8; HEADER_BYTES as usize];
        SegmentHeader {
            core: 3,
            base_lsn: base,
            created_ms: 1,
        }
        .encode(&mut out);
        for r in recs {
            encode_frame(r, &mut out);
        }
        out.resize(out.len().next_multiple_of(BLOCK_BYTES), 0);
        out
    }

    fn data_len(recs: &[Vec<u8>]) -> u64 {
        recs.iter()
            .map(|r| (FRAME_HEADER_BYTES + r.len()) as u64)
            .sum()
    }

    fn write_seg(dir: &Path, base: u64, bytes: &[u8]) -> PathBuf {
        let p = dir.join(segment_file_name(base));
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn read_all(r: &mut LogReader) -> io::Result<Vec<(u64, Vec<u8>)>> {
        let mut out = Vec::new();
        while let Some((lsn, p)) = r.next()? {
            out.push((lsn, p.to_vec()));
        }
        Ok(out)
    }

    fn check_records(got: &[(u64, Vec<u8>)], base: u64, want: &[Vec<u8>]) {
        assert_eq!(got.len(), want.len());
        let mut lsn = base;
        for ((l, p), w) in got.iter().zip(want) {
            assert_eq!((*l, p), (lsn, w));
            lsn += (FRAME_HEADER_BYTES + w.len()) as u64;
        }
    }

    #[test]
    fn names_round_trip() {
        assert_eq!(segment_file_name(42), "00000000000000000042.seg");
        assert_eq!(
            parse_segment_file_name("00000000000000000042.seg"),
            Some(42)
        );
        for bad in [
            "42.seg",
            "00000000000000000042.seg.tmp",
            "0000000000000000004x.seg",
        ] {
            assert_eq!(parse_segment_file_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn reads_multiple_segments_in_order_then_follows() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (payloads(50, 0), payloads(30, 7));
        write_seg(dir.path(), 0, &segment(0, &a));
        let b_base = data_len(&a);
        write_seg(dir.path(), b_base, &segment(b_base, &b));
        let mut r = LogReader::open(dir.path(), 0).unwrap();
        let got = read_all(&mut r).unwrap();
        let all: Vec<_> = a.iter().chain(&b).cloned().collect();
        check_records(&got, 0, &all);
        assert_eq!(r.position(), b_base + data_len(&b));
        assert!(r.next().unwrap().is_none(), "stays at the end");

        // The writer appends to the live segment: the reader sees it.
        let c = payloads(5, 3);
        let both: Vec<_> = b.iter().chain(&c).cloned().collect();
        write_seg(dir.path(), b_base, &segment(b_base, &both));
        check_records(&read_all(&mut r).unwrap(), b_base + data_len(&b), &c);

        // Starting in the middle, at a record boundary.
        let mid = got[60].0;
        let mut r = LogReader::open(dir.path(), mid).unwrap();
        assert_eq!(r.next().unwrap().unwrap().0, mid);
        let not_boundary = LogReader::open(dir.path(), mid + 1).err().unwrap();
        assert_eq!(not_boundary.kind(), io::ErrorKind::InvalidInput);
        let past = LogReader::open(dir.path(), 1 << 40).err().unwrap();
        assert_eq!(past.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn reader_waits_for_the_first_segment() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = LogReader::open(dir.path(), 0).unwrap();
        assert!(r.next().unwrap().is_none());
        let a = payloads(3, 1);
        write_seg(dir.path(), 0, &segment(0, &a));
        check_records(&read_all(&mut r).unwrap(), 0, &a);
    }

    #[test]
    fn retention_gap_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let a = payloads(10, 0);
        write_seg(dir.path(), 1000, &segment(1000, &a));
        let e = LogReader::open(dir.path(), 500).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().contains("deleted by retention"), "{e}");
        // From 0: the oldest retained.
        let mut r = LogReader::open(dir.path(), 0).unwrap();
        check_records(&read_all(&mut r).unwrap(), 1000, &a);

        // A reader that falls behind retention: its next segment is gone.
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (payloads(4, 0), payloads(4, 1));
        let p0 = write_seg(dir.path(), 0, &segment(0, &a));
        let b_base = data_len(&a);
        let p1 = write_seg(dir.path(), b_base, &segment(b_base, &b));
        let c_base = b_base + data_len(&b);
        write_seg(dir.path(), c_base, &segment(c_base, &payloads(2, 2)));
        let mut r = LogReader::open(dir.path(), 0).unwrap();
        for _ in 0..4 {
            r.next().unwrap().unwrap();
        }
        std::fs::remove_file(p0).unwrap();
        std::fs::remove_file(p1).unwrap();
        let e = r.next().err().unwrap();
        assert!(e.to_string().contains("deleted by retention"), "{e}");
    }

    #[test]
    fn torn_tails_end_the_data_without_error() {
        let a = payloads(20, 5);
        let clean = segment(0, &a);
        let end = (HEADER_BYTES + data_len(&a)) as usize;
        let mut half_frame = clean[..end].to_vec();
        let mut extra = Vec::new();
        encode_frame(&[9u8; 500], &mut extra);
        half_frame.extend_from_slice(&extra[..200]);
        let mut bad_crc = clean[..end].to_vec();
        bad_crc.extend_from_slice(&extra);
        *bad_crc.last_mut().unwrap() ^= 1;
        let mut short_header = clean[..end].to_vec();
        short_header.extend_from_slice(&[7, 0, 0]);
        let mut garbage_after_zeros = clean.clone();
        garbage_after_zeros.extend_from_slice(&extra);
        for (name, bytes, torn) in [
            ("zero padding", clean.clone(), 0),
            ("half frame", half_frame, 200),
            ("bad crc", bad_crc, extra.len()),
            ("short header", short_header, 1),
            (
                "garbage past zeros",
                garbage_after_zeros,
                clean.len() - end + extra.len(),
            ),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let p = write_seg(dir.path(), 0, &bytes);
            let mut r = LogReader::open(dir.path(), 0).unwrap();
            check_records(&read_all(&mut r).unwrap(), 0, &a);
            assert!(r.next().unwrap().is_none(), "{name}");
            let scan = scan_segment(&p).unwrap();
            assert_eq!(scan.data_end as usize, end, "{name}");
            assert_eq!(scan.records, a.len() as u64, "{name}");
            assert_eq!(scan.torn_bytes as usize, torn, "{name}");
        }
    }

    #[test]
    fn corruption_in_a_sealed_segment_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (payloads(6, 0), payloads(6, 1));
        let mut first = segment(0, &a);
        first[HEADER_BYTES as usize + 20] ^= 0xff; // inside the first payload
        write_seg(dir.path(), 0, &first);
        let b_base = data_len(&a);
        write_seg(dir.path(), b_base, &segment(b_base, &b));
        let mut r = LogReader::open(dir.path(), 0).unwrap();
        assert_eq!(r.next().unwrap().unwrap().1, &a[0][..]);
        let e = r.next().err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("corrupt frame"), "{e}");

        // A successor that does not start where its predecessor ends.
        let dir = tempfile::tempdir().unwrap();
        write_seg(dir.path(), 0, &segment(0, &a));
        write_seg(dir.path(), b_base + 8, &segment(b_base + 8, &b));
        let mut r = LogReader::open(dir.path(), 0).unwrap();
        let e = read_all(&mut r).err().unwrap();
        assert!(e.to_string().contains("next one starts"), "{e}");
    }

    #[test]
    fn bad_header_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = segment(0, &payloads(2, 0));
        bytes[17] ^= 1;
        write_seg(dir.path(), 0, &bytes);
        let mut r = LogReader::open(dir.path(), 0).unwrap();
        assert_eq!(r.next().err().unwrap().kind(), io::ErrorKind::InvalidData);
        // A header whose base LSN disagrees with the file name.
        let dir = tempfile::tempdir().unwrap();
        write_seg(dir.path(), 0, &segment(8, &payloads(2, 0)));
        assert!(LogReader::open(dir.path(), 0).unwrap().next().is_err());
    }

    #[test]
    fn core_dirs_are_sorted_by_index() {
        let root = tempfile::tempdir().unwrap();
        for d in ["core-10", "core-2", "core-0", "core-x", "other"] {
            std::fs::create_dir(root.path().join(d)).unwrap();
        }
        std::fs::write(root.path().join("core-5"), b"file, not a dir").unwrap();
        let got: Vec<usize> = core_dirs(root.path())
            .unwrap()
            .into_iter()
            .map(|d| d.0)
            .collect();
        assert_eq!(got, vec![0, 2, 10]);
        assert!(core_dirs(&root.path().join("missing")).unwrap().is_empty());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn any_truncation_reads_a_prefix(
            sizes in proptest::collection::vec(1usize..700, 1..40),
            cut_frac in 0.0f64..1.0,
            garbage in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let recs: Vec<Vec<u8>> =
                sizes.iter().enumerate().map(|(i, &n)| vec![i as u8 ^ 0x5a; n]).collect();
            let bytes = segment(0, &recs);
            let cut = HEADER_BYTES as usize
                + ((bytes.len() - HEADER_BYTES as usize) as f64 * cut_frac) as usize;
            let mut torn = bytes[..cut].to_vec();
            torn.extend_from_slice(&garbage);
            let dir = tempfile::tempdir().unwrap();
            write_seg(dir.path(), 0, &torn);
            let mut r = LogReader::open(dir.path(), 0).unwrap();
            let got = read_all(&mut r).unwrap();
            prop_assert!(got.len() <= recs.len());
            check_records(&got, 0, &recs[..got.len()]);
            // Everything wholly before the cut is read.
            let whole = recs.iter().scan(HEADER_BYTES as usize, |end, r| {
                *end += FRAME_HEADER_BYTES + r.len();
                Some(*end)
            }).filter(|&end| end <= cut).count();
            prop_assert!(got.len() >= whole);
        }
    }
}
