//! The Redis outbox's segments read back by the flusher: `Outbox::open` (which cuts a
//! torn tail off the newest segment) then `read_batch` + `advance` until nothing moves.
//!
//! Input: a control byte, then records of `u16` length + body framed with valid CRCs
//! into an older and a newer segment (the record with bit 7 of its length's high byte
//! set starts the newer one); a length past the end makes the rest raw bytes of the
//! segment it is in (a torn or corrupt record). Bit 0 writes a cursor file from two
//! input bytes.
//!
//! Asserts: no panic and no allocation beyond the segment's size (a corrupt length is
//! an error, not a read of that length); the cursor only moves forward and stays within
//! the segments; read from the start, the bodies are the valid records on disk, in
//! order, and all of them when the older segment is clean.
#![no_main]

use std::path::Path;

use clickgate_controlplane::redis_outbox::Outbox;
use clickgate_proto::framing::{self, Crc};
use libfuzzer_sys::fuzz_target;

const SPILL_BYTES_MAX: u64 = 1 << 20;
const ROUNDS_MAX: usize = 4096;

fn tmp_root() -> &'static Path {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm
    } else {
        Path::new("/tmp")
    }
}

fn seg_name(seq: u64) -> String {
    format!("outbox-{seq:016}.seg")
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, mut rest)) = data.split_first() else {
        return;
    };
    let mut cursor_text = None;
    if ctl & 1 != 0 && rest.len() >= 2 {
        cursor_text = Some(format!("{} {}\n", 1 + u64::from(rest[0] % 3), rest[1]));
        rest = &rest[2..];
    }
    // segs[0]: seq 1 (older), segs[1]: seq 2 (newer, takes appends).
    let mut segs: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
    let mut which = 0;
    while rest.len() >= 2 {
        if rest[1] & 0x80 != 0 {
            which = 1;
        }
        let n = u16::from_le_bytes([rest[0], rest[1] & 0x7f]) as usize;
        if n > rest.len() - 2 {
            segs[which].extend_from_slice(&rest[2..]);
            break;
        }
        framing::encode(Crc::Body, &rest[2..2 + n], &mut segs[which]);
        rest = &rest[2 + n..];
    }

    let dir = tempfile::tempdir_in(tmp_root()).expect("temp dir");
    let d = dir.path();
    for (i, seg) in segs.iter().enumerate() {
        std::fs::write(d.join(seg_name(i as u64 + 1)), seg).expect("write");
    }
    if let Some(t) = &cursor_text {
        std::fs::write(d.join("cursor"), t).expect("write");
    }
    let Ok((outbox, _writer)) = Outbox::open(d, SPILL_BYTES_MAX) else {
        return;
    };
    let lens = [segs[0].len() as u64, {
        let valid = framing::split(Crc::Body, &segs[1]).1 as u64;
        let on_disk = std::fs::metadata(d.join(seg_name(2))).expect("seg").len();
        assert_eq!(on_disk, valid, "open cuts the newest segment's torn tail");
        valid
    }];

    let mut read: Vec<Vec<u8>> = Vec::new();
    let mut last = (0u64, 0u64);
    let mut failed = false;
    for _ in 0..ROUNDS_MAX {
        match outbox.read_batch(16, 64) {
            Ok((batch, cursor)) => {
                assert!(
                    cursor >= last,
                    "the cursor moved back: {last:?} -> {cursor:?}"
                );
                if cursor_text.is_none() {
                    assert!((1..=2).contains(&cursor.0), "{cursor:?}");
                    let len = lens[cursor.0 as usize - 1];
                    assert!(cursor.1 <= len, "{cursor:?} past {lens:?}");
                }
                let moved = cursor != last || !batch.is_empty();
                read.extend(batch.iter().map(|b| b.to_vec()));
                last = cursor;
                outbox.advance(cursor).expect("advance");
                if !moved {
                    break;
                }
            }
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    // The records on disk after open, oldest first: what the flusher may read, in order.
    let on_disk: Vec<&[u8]> = framing::split(Crc::Body, &segs[0])
        .0
        .into_iter()
        .chain(framing::split(Crc::Body, &segs[1]).0)
        .collect();
    if cursor_text.is_none() {
        assert!(read.len() <= on_disk.len());
        assert!(
            read.iter().zip(&on_disk).all(|(r, d)| r == d),
            "bodies read out of order"
        );
        if framing::split(Crc::Body, &segs[0]).1 == segs[0].len() {
            // A clean older segment: everything is read, without an error.
            assert!(!failed);
            assert_eq!(read.len(), on_disk.len());
        }
    }
});
