//! The local log's segment reader on corrupted and truncated segment files.
//!
//! Input: a control byte, then either the raw bytes of one segment file (header
//! included), or a list of payloads (`u8` length + bytes each) that the target frames
//! with valid CRCs, then corrupts: cut at a chosen length, one byte overwritten, and
//! optionally a second (sealed-successor) segment.
//!
//! Asserts: `LogReader` and `scan_segment` return records or errors, never panic; the
//! records read come in ascending LSNs, each LSN = the previous + 8 + payload length,
//! and each payload is the one framed at that position; when nothing was corrupted
//! every payload is read back; `LogReader::open` at a record's LSN reads that record
//! next; `scan_segment` agrees with the reader on the first segment.
#![no_main]

use std::path::Path;

use clickgate_proto::segment::{
    encode_frame, scan_segment, segment_file_name, LogReader, SegmentHeader, FRAME_HEADER_BYTES,
    HEADER_BYTES,
};
use libfuzzer_sys::fuzz_target;

const READS_MAX: usize = 4096;

fn header(base_lsn: u64) -> Vec<u8> {
    let mut h = vec![0u8; HEADER_BYTES as usize];
    SegmentHeader {
        core: 3,
        base_lsn,
        created_ms: 1,
    }
    .encode(&mut h);
    h
}

fn read_all(dir: &Path) -> (Vec<(u64, Vec<u8>)>, bool) {
    let mut out = Vec::new();
    let Ok(mut r) = LogReader::open(dir, 0) else {
        return (out, true);
    };
    for _ in 0..READS_MAX {
        match r.next() {
            Ok(Some((lsn, p))) => out.push((lsn, p.to_vec())),
            Ok(None) => return (out, false),
            Err(_) => return (out, true),
        }
    }
    (out, false)
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let dir = tempfile::tempdir_in(tmp_root()).expect("temp dir");
    let mut framed: Vec<Vec<u8>> = Vec::new();
    let mut corrupted = true;
    let first = if ctl & 1 == 0 {
        rest.to_vec()
    } else {
        // Framed payloads, then at most: a cut, one byte overwritten.
        let (edits, mut p) = rest.split_at(rest.len().min(5));
        let mut seg = header(0);
        while let Some((&n, tail)) = p.split_first() {
            let n = (n as usize).min(tail.len());
            if n == 0 {
                p = tail;
                continue;
            }
            encode_frame(&tail[..n], &mut seg);
            framed.push(tail[..n].to_vec());
            p = &tail[n..];
        }
        corrupted = false;
        if let [cut_hi, cut_lo, at_hi, at_lo, byte] = *edits {
            if ctl & 2 != 0 {
                let cut = u16::from_be_bytes([cut_hi, cut_lo]) as usize;
                if cut < seg.len() {
                    seg.truncate(cut);
                    corrupted = true;
                }
            }
            if ctl & 4 != 0 {
                let at = u16::from_be_bytes([at_hi, at_lo]) as usize;
                if let Some(b) = seg.get_mut(at) {
                    corrupted |= *b != byte;
                    *b = byte;
                }
            }
        }
        seg
    };
    let first_path = dir.path().join(segment_file_name(0));
    std::fs::write(&first_path, &first).expect("write segment");
    let end_lsn: u64 = framed
        .iter()
        .map(|p| (FRAME_HEADER_BYTES + p.len()) as u64)
        .sum();
    let has_successor = ctl & 8 != 0 && (end_lsn > 0 || ctl & 16 == 0);
    if has_successor {
        // A successor: the first segment is sealed, so a torn tail in it is an error.
        let base = if ctl & 16 != 0 { end_lsn } else { end_lsn + 8 };
        let mut next = header(base);
        encode_frame(b"successor", &mut next);
        std::fs::write(dir.path().join(segment_file_name(base)), &next).expect("write");
    }

    let (records, failed) = read_all(dir.path());
    let mut lsn = 0;
    for (i, (at, p)) in records.iter().enumerate() {
        if i > 0 {
            assert_eq!(*at, lsn, "LSNs follow the frames");
        }
        lsn = at + (FRAME_HEADER_BYTES + p.len()) as u64;
        if !corrupted && i < framed.len() {
            assert_eq!(p, &framed[i]);
            let framed_before: u64 = framed[..i]
                .iter()
                .map(|f| (FRAME_HEADER_BYTES + f.len()) as u64)
                .sum();
            assert_eq!(*at, framed_before);
        }
    }
    if !corrupted && ctl & 1 != 0 {
        assert!(
            records.len() >= framed.len(),
            "every framed payload is read back"
        );
        assert!(!failed || has_successor);
        if has_successor && ctl & 16 != 0 {
            assert!(!failed, "a well-formed successor reads on");
            assert_eq!(records.len(), framed.len() + 1);
        }
    }
    // Resuming at a record's LSN reads that record next.
    for (at, p) in records.iter().take(3) {
        if *at == 0 {
            continue;
        }
        let mut r = LogReader::open(dir.path(), *at).expect("open at a record's LSN");
        let got = r.next().expect("read").map(|(l, b)| (l, b.to_vec()));
        assert_eq!(got, Some((*at, p.clone())));
    }
    if let Ok(scan) = scan_segment(&first_path) {
        assert!(scan.data_end >= HEADER_BYTES && scan.data_end <= scan.file_len.max(HEADER_BYTES));
        if !has_successor {
            // One live segment: the writer's scan and the reader stop at the same place.
            assert_eq!(scan.records, records.len() as u64);
            assert_eq!(scan.data_end - HEADER_BYTES, lsn);
        } else if !failed {
            assert!(scan.records <= records.len() as u64);
        }
    }
});

/// Temporary files go to memory when the machine has a tmpfs for them.
fn tmp_root() -> &'static Path {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm
    } else {
        Path::new("/tmp")
    }
}
